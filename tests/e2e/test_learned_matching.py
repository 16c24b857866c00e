"""Learned linked-pair matching (transforms/learned_matching.py, models/pair_scorer.py).

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_learned_matching.py.
"""
import numpy as np
import pytest

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from conftest import collect, counters
from transforms import learned_matching as lm
from transforms import match_blocks as mb

from unit.test_learned_matching import BANDS, T0_MS, check_one_to_one, synth
LINKS = [{"camera_a": "cam-a", "camera_b": "cam-b", "offset_s": 12.0, "spread_s": 8.0}]


# ----------------------------------------------------------------------- Beam
def test_period_keys_and_one_match_per_b():
    iv = {("cam-a", "cam-b"): mb.bands_to_ms(BANDS)}  # dt in [4, 20] s
    p_ms = 600_000
    k = T0_MS // p_ms
    assert lm.period_keys("cam-a", T0_MS + 599_999, iv, p_ms) == [(("cam-a", "cam-b", k), "a")]
    # a b-detection 10 s into a period pairs with a-detections 6..-10 s around the boundary
    assert lm.period_keys("cam-b", T0_MS + 10_000, iv, p_ms) == [
        (("cam-a", "cam-b", k - 1), "b"), (("cam-a", "cam-b", k), "b")]
    assert lm.period_keys("cam-b", T0_MS + 30_000, iv, p_ms) == [(("cam-a", "cam-b", k), "b")]
    assert lm.period_keys("cam-c", T0_MS, iv, p_ms) == []
    m1 = {"score": 2.0, "detection_id_a": "x"}
    m2 = {"score": 2.0, "detection_id_a": "w"}
    m3 = {"score": 3.0, "detection_id_a": "z"}
    assert lm.better_match(m1, m2) is m2 and lm.better_match(m2, m3) is m3
    assert lm.better_match(None, m1) is m1
    with pytest.raises(TypeError):
        lm.LearnedLinkMatch(LINKS, no_such_option=1)


def test_beam_equals_pure_across_period_boundary():
    """LearnedLinkMatch (FnApiRunner) == match_linked_periods, with 600 s periods over
    1200 s of data: two groups per pair, and pairs whose a and b lie in different
    periods are found (b-detections go to every period that can reach them)."""
    dets = synth(seed=2)
    dets.append({"camera_id": "cam-c", "frame_ts_ms": T0_MS, "detection_id": "c-0",
                 "embedding": np.zeros(24, np.float32)})  # unlinked camera: ignored
    beam_dets = [{k: v for k, v in d.items() if k != "vid"} for d in dets]
    want, group_stats = lm.match_linked_periods(beam_dets, LINKS, period_s=600)
    # two periods with traffic (plus stragglers: a vehicle's 2nd detection after the end)
    big = [s for s in group_stats if s["n_a"] > 100]
    assert [s["period"] for s in big] == [T0_MS // 600_000, T0_MS // 600_000 + 1]
    assert not any(s["abstained"] for s in big)
    straddling = [m for m in want
                  if (m["frame_ts_a_ms"] - T0_MS) // 600_000 != (m["frame_ts_b_ms"] - T0_MS) // 600_000]
    assert straddling
    for m in want:
        assert m["window_start_ms"] <= m["frame_ts_a_ms"] < m["window_end_ms"]
        assert m["window_end_ms"] - m["window_start_ms"] == 600_000
    check_one_to_one(want)

    p = beam.Pipeline(runner=FnApiRunner())
    matcher = lm.LearnedLinkMatch(LINKS, period_s=600)
    out = collect(p | beam.Create(beam_dets, reshuffle=False) | matcher, "learned")
    summaries = collect(matcher.group_stats, "stats")
    result = p.run()
    result.wait_until_finish()
    got = sorted(out, key=mb.match_sort_key)
    assert got == want
    c = counters(result)
    assert c["learned_groups"] == len(group_stats)
    assert c.get("learned_abstained", 0) == sum(s["abstained"] for s in group_stats)
    assert c["learned_matches"] == len(want)
    assert c["learned_candidates"] == sum(s["candidates"] for s in group_stats)
    assert sorted(summaries, key=lambda r: r["period"]) == [lm.summary_record(s)
                                                           for s in group_stats]


def test_cli_selection_flag_reaches_the_matcher_and_its_settings(tmp_path):
    """`cctview match --selection mutual` returns what the library returns with
    selection="mutual" (one round of mutual nearest neighbours: fewer pairs than the
    default's three), and match_settings.json records it so that `cctview report`
    estimates the same matcher."""
    import json

    import pyarrow.dataset as pds

    from e2e.test_tracklets import LINKS as links, write_two_cameras
    from pipelines.cli import main
    from pipelines.report_estimate import _matcher

    dets = write_two_cameras(tmp_path)
    out = tmp_path / "out"
    assert main(["match", "--detections", str(tmp_path / "dets.parquet"), "--output", str(out),
                 "--links", str(tmp_path / "links.json"), "--min-precision", "0.8",
                 "--selection", "mutual"]) == 0
    got = sorted((r["detection_id_a"], r["detection_id_b"]) for r in
                 pds.dataset(out / "matches", partitioning="hive").to_table().to_pylist())
    plain = [{k: v for k, v in d.items() if k != "vid"} for d in dets]
    want, _ = lm.match_linked_periods(plain, links, min_precision=0.8, selection="mutual")
    default, _ = lm.match_linked_periods(plain, links, min_precision=0.8)
    assert got == sorted((m["detection_id_a"], m["detection_id_b"]) for m in want)
    assert 0 < len(want) < len(default), (len(want), len(default))
    settings = json.loads((out / "match_settings.json").read_text())
    assert settings["selection"] == "mutual"
    make, _ = _matcher(settings)
    from_settings = [m for m in make(plain, links) if m["q_value"] <= 0.2 + 1e-6]
    assert 0 < len(from_settings) < len(default)
