"""Cross-camera matching: Beam transform and numpy core against a brute-force reference.

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_matching.py.
"""
import json
import os
import pickle
import tempfile

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.transforms.window import FixedWindows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms import match_blocks as mb
from transforms.detections_io import DetectionColumns
from transforms.links import load_links, write_links
from transforms.control import SHIFTED, control_links
from transforms.matching import MatchDetections, ShiftedControl

from unit.test_matching import (T0, _params, _ref_kw, arrays, assert_one_to_one, cases,
                                check_against_reference, ref_candidates)


# ------------------------------------------------------------ running pipelines
def _dump(values, path):
    with open(path, "wb") as f:
        pickle.dump(values, f)


def run_matchers(dets, configs):
    """Runs one pipeline with a MatchDetections per config; returns (outputs, counters).

    outputs[name] = list of Match dicts; counters[(name, metric)] = committed value.
    """
    tmp = tempfile.mkdtemp(prefix="test_matching_")
    p = beam.Pipeline(runner=FnApiRunner())
    src = p | "Dets" >> beam.Create(dets, reshuffle=False)
    for name, params in configs.items():
        (src
         | name >> MatchDetections(**params)
         | "List_" + name >> beam.combiners.ToList()
         | "Dump_" + name >> beam.Map(_dump, os.path.join(tmp, name)))
    result = p.run()
    result.wait_until_finish()
    outputs = {}
    for name in configs:
        with open(os.path.join(tmp, name), "rb") as f:
            outputs[name] = sorted(pickle.load(f), key=mb.match_sort_key)
    counters = {}
    for c in result.metrics().query(MetricsFilter())["counters"]:
        name = c.key.step.split("/")[0]
        key = (name, c.key.metric.name)
        counters[key] = counters.get(key, 0) + c.committed
    return outputs, counters


def _strip_window(ms):
    return [{k: v for k, v in m.items() if not k.startswith("window_")} for m in ms]


# ------------------------------------------------------------ property tests
BEAM_SETTINGS = settings(max_examples=12, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@BEAM_SETTINGS
@given(case=cases(max_bursts=3), small_blocks=st.booleans())
def test_beam_matches_reference_all_policies(case, small_blocks):
    """Beam == brute-force reference for all/topk/mutual, independent of window_s;
    assignment == match_arrays and one-to-one; candidate_pairs counted once."""
    dets = case["dets"]
    extra = {"max_candidates_per_block": 7} if small_blocks else {}
    configs = {}
    for policy in mb.POLICIES:
        for i, w in enumerate(case["windows"]):
            configs["%s_w%d" % (policy, i)] = _params(case, policy, w, **extra)
    outputs, counters = run_matchers(dets, configs)
    n_cand = len(ref_candidates(dets, case["metric"], case["max_gap_s"], case["links"]))
    for name, params in configs.items():
        policy, w = params["policy"], params["window_s"]
        got = outputs[name]
        if policy == "assignment":
            assert_one_to_one(got, dets, case["metric"], case["threshold"],
                              max_gap_s=case["max_gap_s"], links=case["links"])
            assert got == mb.match_arrays(*arrays(dets), **params)
        else:
            check_against_reference(got, dets, policy, case["metric"], w, **_ref_kw(case))
        assert counters.get((name, "candidate_pairs"), 0) == n_cand, name
        assert counters.get((name, "matches_emitted"), 0) == len(got), name
    for policy in ("all", "topk", "mutual"):
        assert _strip_window(outputs[policy + "_w0"]) == _strip_window(outputs[policy + "_w1"])


def _columns(dets, cuts, dtype):
    """``dets`` (in their order) as DetectionColumns chunks cut at ``cuts``."""
    chunks = []
    for lo, hi in zip([0] + cuts, cuts + [len(dets)]):
        part = dets[lo:hi]
        if part:
            chunks.append(DetectionColumns(
                np.asarray([d["camera_id"] for d in part], dtype=str),
                np.asarray([d["frame_ts_ms"] for d in part], dtype=np.int64),
                np.asarray([d["detection_id"] for d in part], dtype=str),
                np.stack([d["embedding"] for d in part]).astype(dtype)))
    return chunks


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(max_bursts=2), data=st.data())
def test_column_chunks_match_like_detection_dicts(case, data):
    """The same detections as DetectionColumns chunks (any order, any cut, cameras and
    blocks mixed within a chunk, float16 or float32) give exactly the matches of the
    detection dicts, for every policy."""
    dets = case["dets"]
    order = data.draw(st.permutations(range(len(dets))))
    shuffled = [dets[i] for i in order]
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(dets) - 1)), max_size=4)))
    dtype = data.draw(st.sampled_from([np.float32, np.float16]))
    if dtype == np.float16:  # the dicts get the same (rounded) values
        dets = [dict(d, embedding=np.asarray(d["embedding"]).astype(np.float16)) for d in dets]
        shuffled = [dets[i] for i in order]
    configs = {p: _params(case, p, case["windows"][0]) for p in mb.POLICIES}
    expected, _ = run_matchers(dets, configs)
    got, counters = run_matchers(_columns(shuffled, cuts, dtype), configs)
    for name in configs:
        assert got[name] == expected[name], name
        assert counters.get((name, "matches_emitted"), 0) == len(got[name])


# ------------------------------------------------------------------ Beam extras
def test_beam_input_shapes_windowing_and_links_file(tmp_path):
    """Lists / float16 embeddings, input already windowed and timestamped otherwise,
    links from a file; output in the GlobalWindow."""
    rng = np.random.default_rng(7)
    dets = []
    for i in range(30):
        e = rng.integers(-2, 3, size=6)
        dets.append({"camera_id": "cam%d" % (i % 3),
                     "frame_ts_ms": T0 + int(rng.integers(0, 90_000)),
                     "detection_id": "d%02d" % i,
                     "embedding": e.tolist() if i % 2 else e.astype(np.float16)})
    links = [{"camera_a": "cam0", "camera_b": "cam1", "offset_s": 10, "spread_s": 30},
             {"camera_a": "cam2", "camera_b": "cam1", "offset_s": -5, "spread_s": 20}]
    path = tmp_path / "links.json"
    write_links(links, str(path))
    loaded = load_links(str(path))
    assert [(l["camera_a"], l["camera_b"], l["offset_s"]) for l in loaded] == \
        [("cam0", "cam1", 10.0), ("cam1", "cam2", 5.0)]
    out = os.path.join(tempfile.mkdtemp(), "out")
    p = beam.Pipeline(runner=FnApiRunner())
    (p
     | beam.Create(dets)
     | "OddTimes" >> beam.Map(lambda d: beam.window.TimestampedValue(d, 5))
     | "OddWindows" >> beam.WindowInto(FixedWindows(1))
     | MatchDetections(policy="topk", top_k=2, links=load_links(str(path)), window_s=7)
     | "InGlobal" >> beam.Map(lambda m, w=beam.DoFn.WindowParam, t=beam.DoFn.TimestampParam:
                              (m, type(w).__name__, t.micros))
     | beam.combiners.ToList()
     | beam.Map(_dump, out))
    p.run().wait_until_finish()
    with open(out, "rb") as f:
        got = pickle.load(f)
    assert got and all(w == "GlobalWindow" for _, w, _ in got)
    assert all(t == m["frame_ts_a_ms"] * 1000 for m, _, t in got)
    got = sorted((m for m, _, _ in got), key=mb.match_sort_key)
    plain = [dict(d, embedding=np.asarray(d["embedding"], np.float32)) for d in dets]
    assert got == mb.match_arrays(*arrays(plain), policy="topk", top_k=2, links=loaded,
                                  window_s=7)
    check_against_reference(got, plain, "topk", "l2", 7, max_gap_s=None, top_k=2, links=loaded)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(max_bursts=2), block_s=st.sampled_from([0.25, 3.7, 45.0, 10_000.0]))
def test_beam_block_span_changes_nothing(case, block_s):
    """all/topk/mutual give the same matches and counters whatever the block span
    (how many blocks a reference travels to, how partials are merged)."""
    configs = {}
    for policy in ("all", "topk", "mutual"):
        params = _params(case, policy, case["windows"][0])
        configs[policy + "_auto"] = params
        configs[policy + "_span"] = dict(params, block_s=block_s)
    outputs, counters = run_matchers(case["dets"], configs)
    for policy in ("all", "topk", "mutual"):
        for variant in ("_span",):
            assert outputs[policy + variant] == outputs[policy + "_auto"]
            for counter in ("candidate_pairs", "matches_emitted"):
                assert counters.get((policy + variant, counter), 0) == \
                    counters.get((policy + "_auto", counter), 0)
    check_against_reference(outputs["mutual_span"], case["dets"], "mutual", case["metric"],
                            case["windows"][0], **_ref_kw(case))

def _control_and_virtual(dets, params, control):
    """Per policy of ``params``: (matches with the in-block control, matches of plain
    matching over ``dets`` plus their shifted copies on virtual cameras, matches
    without the control)."""
    shifted = [dict(d, camera_id=d["camera_id"] + SHIFTED,
                    detection_id=d["detection_id"] + SHIFTED,
                    frame_ts_ms=int(control.shift(np.int64(d["frame_ts_ms"])))) for d in dets]
    cameras = sorted({d["camera_id"] for d in dets})
    configs = {}
    for policy, p in params.items():
        configs[policy] = p
        configs[policy + "_control"] = dict(p, control=control)
    outputs, _ = run_matchers(dets, configs)
    virtual = {policy: dict(p, links=control_links(p.get("links"), cameras, p["max_gap_s"]))
               for policy, p in params.items()}
    expected, _ = run_matchers(dets + shifted, virtual)
    return {policy: (outputs[policy + "_control"], expected[policy], outputs[policy])
            for policy in params}


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(max_bursts=1), min_block_s=st.sampled_from([1.0, 7.5, 40.0, 10_000.0]),
       slack_ms=st.integers(0, 20_000))
def test_shifted_control_is_matching_against_shifted_copies(case, min_block_s, slack_ms):
    """The in-block control (blocks k and k + H computed together from the real pairs'
    copies) gives exactly the matches of plain matching over the detections plus their
    shifted copies on virtual cameras, and the same real matches as without it."""
    ts = [d["frame_ts_ms"] for d in case["dets"]] or [T0]
    control = ShiftedControl(min(ts) - slack_ms, max(ts) - min(ts) + 1000 + 2 * slack_ms,
                             int(min_block_s * 1000))
    params = {p: _params(case, p, case["windows"][0]) for p in ("all", "mutual")}
    for got, expected, real in _control_and_virtual(case["dets"], params, control).values():
        assert got == expected
        assert [m for m in got if not m["camera_id_b"].endswith(SHIFTED)] == real


def test_shifted_control_pairs_across_the_period_wrap():
    """Control pairs whose shifted reference wrapped around the period's end (they are
    in neither block's real copies): 4 blocks of 10 s, shift 20 s."""
    control = ShiftedControl(T0, 40_000, 10_000)
    assert (control.block_ms, control.shift_ms, control.span_ms) == (10_000, 20_000, 40_000)
    emb = np.ones(4, np.float32)
    dets = [{"camera_id": cam, "frame_ts_ms": T0 + t, "detection_id": cam + str(t),
             "embedding": emb * (i + 1)}
            for i, (cam, t) in enumerate([("a", 19_000), ("b", 1_000), ("a", 21_500),
                                          ("b", 39_000)])]
    params = {"all": dict(policy="all", max_gap_s=5.0)}
    got, expected, real = _control_and_virtual(dets, params, control)["all"]
    assert got == expected and real == []
    assert sorted((m["detection_id_a"], m["detection_id_b"]) for m in got) == [
        ("a19000", "b1000~"), ("a21500", "b1000~"), ("a21500", "b39000~")]


def test_beam_empty_input():
    outputs, _ = run_matchers([], {p: {"policy": p} for p in mb.POLICIES})
    assert all(v == [] for v in outputs.values())


def test_constructor_validation():
    with pytest.raises(ValueError):
        MatchDetections(policy="nearest")
    with pytest.raises(ValueError):
        MatchDetections(metric="manhattan")
    with pytest.raises(ValueError):
        MatchDetections(top_k=0)
    with pytest.raises(ValueError):
        MatchDetections(window_s=0)
    with pytest.raises(ValueError):
        MatchDetections(max_gap_s=0)
    with pytest.raises(ValueError):
        MatchDetections(block_s=0)
    with pytest.raises(ValueError):
        MatchDetections(links=[{"camera_a": "a"}])
    json.dumps(mb.normalize_links([{"camera_a": "b", "camera_b": "a", "offset_s": 1,
                                    "spread_s": 0, "support": 3}]))
