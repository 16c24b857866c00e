"""Target-decoy competition (transforms/decoy.py) against a planted ground truth.

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_decoy.py.
"""
import apache_beam as beam
import numpy as np
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from conftest import collect
from transforms import decoy
from transforms.matching import MatchDetections

from unit.test_decoy import LINKS, _mutual, world


def test_beam_transform_equals_the_in_memory_twin():
    dets, _ = world(seed=3, vehicles=400, span_s=900)

    def make(links):
        return MatchDetections(policy="mutual", links=links, max_gap_s=120, window_s=600)

    p = beam.Pipeline(runner=FnApiRunner())
    out = collect(p | beam.Create(dets, reshuffle=False)
                  | decoy.EvaluateWithDecoys(make, ["c1", "c2", "c3"], LINKS, 120), "out")
    p.run().wait_until_finish()
    rows, _ = decoy.evaluate_in_memory(dets, _mutual, LINKS)
    assert out == rows


def _write_parquet(dets, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "camera_id": [d["camera_id"] for d in dets],
        "frame_ts": pa.array([d["frame_ts_ms"] for d in dets], pa.timestamp("ms", tz="UTC")),
        "detection_id": [d["detection_id"] for d in dets],
        "embedding": [d["embedding"].tolist() for d in dets]}), path)


def test_evaluate_command_both_controls(tmp_path, capsys):
    import json

    from pipelines.cli import main

    dets, _ = world(seed=4, vehicles=300, span_s=900)
    _write_parquet(dets, tmp_path / "d.parquet")
    (tmp_path / "links.json").write_text(json.dumps(LINKS))
    common = ["evaluate", "--detections", str(tmp_path / "d.parquet"), "--policy", "mutual",
              "--links", str(tmp_path / "links.json")]
    assert main(common + ["--output", str(tmp_path / "decoy.json")]) == 0
    printed = capsys.readouterr().out
    assert "decoy hits" in printed
    rows = json.loads((tmp_path / "decoy.json").read_text())
    assert [(r["camera_a"], r["camera_b"], r["control"]) for r in rows] == [("c1", "c2", "decoy")]
    assert main(common + ["--control", "shift", "--output", str(tmp_path / "shift.json")]) == 0
    shift = json.loads((tmp_path / "shift.json").read_text())
    assert [(r["camera_a"], r["camera_b"]) for r in shift] == [("c1", "c2")] and "real" in shift[0]
    assert "| control |" in capsys.readouterr().out


def test_scored_matcher_runs_once_at_every_threshold():
    """The learned policy under decoys: one run at min_precision 0; the row is what
    --min-precision returns (q_value <= 1 - min_precision), Beam == in memory, and on
    planted pairs the estimate is within 0.05 above and 0.15 below the true precision of
    the real run (without decoys)."""
    from e2e.test_learned_matching import LINKS as LEARNED_LINKS
    from unit.test_learned_matching import synth

    from transforms import learned_matching as lm

    dets = synth(seed=0, span_s=1200)  # >= 100 target hits: a meaningful +0.05 bound
    vid = {d["detection_id"]: d["vid"] for d in dets}
    dets = [{k: v for k, v in d.items() if k != "vid"} for d in dets]

    def make(links, min_precision=0.7):
        return lm.LearnedLinkMatch(links, min_precision=min_precision)

    make.scored = True
    p = beam.Pipeline(runner=FnApiRunner())
    out = collect(p | beam.Create(dets, reshuffle=False)
                  | decoy.EvaluateWithDecoys(make, ["cam-a", "cam-b"], LEARNED_LINKS, 120,
                                             min_precision=0.7), "out")
    p.run().wait_until_finish()
    decoy_hits = []
    rows, targets = decoy.evaluate_in_memory(
        dets, lambda d, links: lm.match_linked_periods(d, links, min_precision=0.0)[0],
        LEARNED_LINKS, 120, min_precision=0.7, decoys=decoy_hits)
    assert out == rows and len(rows) == 1
    row = rows[0]
    # the hits given back are the ones the row counts: what --min-precision 0.7 returns
    assert row["target_hits"] == len(targets) and row["decoy_hits"] == len(decoy_hits)
    assert all(m["q_value"] <= 0.3 + 1e-6 for m in targets + decoy_hits)
    # against the run the user gets: the learned matcher without decoys, at 0.7
    real = lm.match_linked_periods(dets, LEARNED_LINKS, min_precision=0.7)[0]
    true = np.mean([vid[m["detection_id_a"]] == vid[m["detection_id_b"]] for m in real])
    assert true - 0.15 <= row["precision"] <= true + 0.05, (row, true)
    # the plain competition ratio describes the purer decoy run: above that truth here
    assert row["excess"] / row["target_hits"] > true + 0.03, (row, true)
    assert row["target_hits"] >= 100
    assert 0.0 <= row["best_min_precision"] <= 1.0 and row["best_precision"] >= row["precision"]
