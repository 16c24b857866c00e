"""What the report and `evaluate` say about a camera pair that cannot be trusted."""
from pipelines import report
from pipelines.commands import precision_notes
from pipelines.report_estimate import shortfall

GOOD = {"camera_a": "a", "camera_b": "b", "target_hits": 900, "decoy_hits": 90,
        "false": 90.0, "excess": 810.0, "precision": 0.82, "best_precision": 0.95,
        "best_excess": 120.0, "best_min_precision": 0.9}
# the matcher abstained at the run's --min-precision, but its curve reached 0.81
ABSTAINED = {"camera_a": "a", "camera_b": "c", "target_hits": 0, "decoy_hits": 0,
             "false": 0.0, "excess": 0.0, "precision": 0.0, "best_precision": 0.81,
             "best_excess": 24.0, "best_min_precision": 0.64}
UNSCORED = {"camera_a": "b", "camera_b": "c", "real": 0, "control": 0.0, "excess": 0.0,
            "precision": 0.0}


def test_shortfall_names_the_flag_value_that_returns_matches():
    assert shortfall(GOOD, 0.7) is None
    assert "below --min-precision 0.90" in shortfall(GOOD, 0.9)
    assert shortfall(ABSTAINED, 0.7) == ("no matches; the best estimated precision is 0.81 "
                                         "(excess 24): --min-precision 0.64 would return it")
    assert shortfall(UNSCORED, 0.7) == "no matches"
    notes = precision_notes([GOOD, ABSTAINED, UNSCORED], 0.7).splitlines()
    assert [n.split(":")[0] for n in notes] == ["a / c", "b / c"]


def test_the_report_says_why_a_pair_has_no_matches():
    assert "class=ok>significant" in report._verdict(GOOD, 0.7)
    verdict = report._verdict(ABSTAINED, 0.7)
    assert "not significant: no matches" in verdict and "--min-precision 0.64" in verdict
    # without the run's settings it cannot say which flag value would help
    assert "too few matches to judge" in report._verdict(ABSTAINED, None)
    few = dict(GOOD, target_hits=12, decoy_hits=6, false=6.0, excess=6.0, precision=0.33)
    assert "too few matches to judge" in report._verdict(few, 0.7)
