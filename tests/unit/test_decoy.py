"""Target-decoy competition (transforms/decoy.py) against a planted ground truth."""
import numpy as np

from transforms import decoy
from transforms import match_blocks as mb

T0 = 1_600_000_000_000
LINKS = [{"camera_a": "c1", "camera_b": "c2", "offset_s": 25.0, "spread_s": 8.0}]


def world(seed=0, vehicles=1200, span_s=2400, sigma=0.9, dim=16):
    """c1 -> c2 25 +- 2 s later for half the vehicles, c2 also sees others, c3 unrelated."""
    rng = np.random.default_rng(seed)
    ident = rng.normal(size=(3 * vehicles, dim)).astype(np.float32)
    dets, owner = [], {}

    def add(cam, v, t_s):
        det_id = "%s-%d" % (cam, v)
        owner[det_id] = v
        dets.append({"camera_id": cam, "frame_ts_ms": T0 + int(t_s * 1000) % (span_s * 1000),
                     "detection_id": det_id,
                     "embedding": ident[v] + rng.normal(0, sigma, dim).astype(np.float32)})

    for v, t in enumerate(rng.uniform(0, span_s, vehicles)):
        add("c1", v, t)
        add("c2", v, t + rng.normal(25, 2)) if v % 2 == 0 else add("c2", vehicles + v, t)
        add("c3", 2 * vehicles + v, rng.uniform(0, span_s))
    return dets, owner


def _mutual(dets, links):
    return mb.match_arrays([d["camera_id"] for d in dets], [d["frame_ts_ms"] for d in dets],
                           np.stack([d["embedding"] for d in dets]),
                           [d["detection_id"] for d in dets], policy="mutual", links=links,
                           max_gap_s=120)


def _true_precision(matches, owner):
    return float(np.mean([owner[m["detection_id_a"]] == owner[m["detection_id_b"]]
                          for m in matches]))


def test_decoy_estimate_is_close_to_the_truth_and_not_above_it():
    dets, owner = world()
    rows, targets = decoy.evaluate_in_memory(dets, _mutual, LINKS)
    assert [(r["camera_a"], r["camera_b"]) for r in rows] == [("c1", "c2")]
    row = rows[0]
    assert row["target_hits"] == len(targets) and row["decoy_hits"] > 0
    # the estimate is of the run without decoys (what `cctview match` returns)
    true = _true_precision(_mutual(dets, LINKS), owner)
    assert 0.2 < true < 0.95, true
    assert row["precision"] <= true + 0.05, (row, true)
    # conservative for mutual NN (most decoy hits are detections a real run leaves
    # unmatched, counted as false), but not uselessly so
    assert row["precision"] >= true - 0.3, (row, true)
    # the competition's own target hits are purer: the plain ratio reads above the estimate
    assert row["excess"] / row["target_hits"] > row["precision"] + 0.1, row
    # no decoy is ever a true match
    assert all(not m["detection_id_b"].endswith(decoy.DECOY) for m in targets)


def test_unlinked_pairs_without_signal_read_no_precision():
    dets, _ = world(seed=1)
    rows, _ = decoy.evaluate_in_memory([d for d in dets if d["camera_id"] != "c2"], _mutual,
                                       None, max_gap_s=120)
    assert [(r["camera_a"], r["camera_b"]) for r in rows] == [("c1", "c3")]
    r = rows[0]
    assert abs(r["excess"]) <= 3 * np.sqrt(r["target_hits"] + r["decoy_hits"]), r


def test_per_pair_namespaces_keep_decoys_of_both_cameras_apart():
    """c2 is b of (c1, c2) and a of (c2, c3): its copies never meet each other."""
    dets, _ = world(seed=2, vehicles=200)
    pairs = decoy.evaluated_pairs(None, ["c1", "c2", "c3"])
    roles = decoy.roles_of(pairs)
    copies = [c for d in dets[:30] for c in decoy.with_decoys(d, roles, T0, 2_400_000)]
    cams = {c["camera_id"] for c in copies}
    assert cams == {decoy.pair_camera(a, b, r) for a, b in pairs for r in "ab"}
    ids = [c["detection_id"] for c in copies]
    assert len(ids) == len(set(ids))
    assert {decoy.original_id(i) for i in ids} == {d["detection_id"] for d in dets[:30]}


def test_precision_curve_and_best_point():
    hits = [("target", 0, 0.9), ("target", 0, 0.8), ("decoy", 1, 0.7), ("target", 1, 0.6),
            ("decoy", 0, 0.5), ("target", 1, 0.4)]
    curve = decoy.precision_curve(hits, targets_b=[10, 10], decoys_b=[5, 20])
    # half 0 decoys scale by 10/5, half 1 by 10/20
    assert [p["target_hits"] for p in curve] == [1, 2, 2, 3, 3, 4]
    assert curve[2]["false"] == 0.5 and curve[4]["false"] == 2.5
    best = decoy.best_point(curve, min_significance=0.0)
    assert best["threshold"] == 0.8 and best["precision"] == 1.0
    assert decoy.best_point(curve) is None  # no excess 3 standard errors above zero
    # scored rows: what --min-precision 0.9 returns (q <= 0.1), and the flag for the best
    q = [0.0, 0.0, 0.05, 0.05, 0.3, 0.3]
    scored = [h + (qq,) for h, qq in zip(hits, q)]
    counts = [("target", 0)] * 10 + [("target", 1)] * 10 + [("decoy", 0)] * 5 + [
        ("decoy", 1)] * 20
    row = decoy.summarize(("c1", "c2"), scored, counts, min_precision=0.9)
    assert (row["target_hits"], row["decoy_hits"]) == (3, 1)
