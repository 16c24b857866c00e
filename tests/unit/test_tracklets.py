"""Within-camera tracklets (transforms/tracklets.py) on synthetic tracks with known truth.

Vehicles drive across a 352x240 image at constant velocity, seen every 2 s (some gaps
of 1 s and some missed frames), with an identity embedding plus noise; several are in
view at once, in parallel lanes. The true vehicle of every detection is known, so
purity (a tracklet holds one vehicle) and completeness (a vehicle's detections stay in
one tracklet) are measured directly.
"""
import numpy as np
import pytest

from transforms.tracklets import aggregate_embeddings, chance_gate, link_tracklets

T0 = 1_700_000_000_000


def scene(seed=0, n_vehicles=150, span_s=400, dim=32, sigma=0.35, miss=0.1):
    rng = np.random.default_rng(seed)
    frames = np.cumsum(rng.choice([1000, 2000, 2000, 2000], size=span_s // 2))
    rows = []
    for v in range(n_vehicles):
        ident = rng.normal(size=dim)
        t_in = rng.uniform(0, span_s - 20) * 1000
        lane = int(rng.integers(0, 4))
        size = rng.uniform(15, 40)
        vx = rng.choice([-1, 1]) * size * rng.uniform(0.2, 0.8)   # px/s (box sizes / s)
        x0 = 0.0 if vx > 0 else 352.0
        y = 40 + 50 * lane + rng.normal(0, 3)
        for t in frames[(frames >= t_in) & (frames <= t_in + 9000)]:
            if rng.random() < miss:
                continue
            x = x0 + vx * (t - t_in) / 1000 + rng.normal(0, 1.5)
            if not 0 <= x <= 352:
                continue
            s = size * (1 + rng.normal(0, 0.05))
            rows.append(dict(id="v%03d-%d" % (v, t), vid=v, ts=T0 + int(t),
                             box=[x - s / 2, y - s / 2, x + s / 2, y + s / 2],
                             emb=(ident + sigma * rng.normal(size=dim)).astype(np.float32)))
    return rows


def link(rows, **kw):
    return link_tracklets([r["id"] for r in rows], [r["ts"] for r in rows],
                          [r["box"] for r in rows], np.stack([r["emb"] for r in rows]), **kw)


def purity_completeness(vid, index):
    vid, index = np.asarray(vid), np.asarray(index)
    pure = 0
    for k in np.unique(index):
        _, c = np.unique(vid[index == k], return_counts=True)
        pure += c.max()
    complete = []
    for v in np.unique(vid):
        _, c = np.unique(index[vid == v], return_counts=True)
        complete.append(c.max() / c.sum())
    return pure / len(vid), float(np.mean(complete))


def test_recovers_true_tracks():
    rows = scene()
    t = link(rows)
    purity, completeness = purity_completeness([r["vid"] for r in rows], t.index)
    assert purity >= 0.97, purity
    assert completeness >= 0.85, completeness
    # far better than leaving every detection alone (completeness of singletons)
    _, single = purity_completeness([r["vid"] for r in rows], np.arange(len(rows)))
    assert completeness > single + 0.4
    assert np.isfinite(t.emb_gate) and 0 < t.emb_gate < 1
    # multi-member tracklets move along the lanes at 0.2-0.8 box sizes per second
    multi = t.length > 2
    assert (np.abs(np.abs(t.speed[multi, 0]) - 0.5) < 0.35).mean() > 0.9
    assert (np.abs(t.speed[multi, 1]) < 0.15).mean() > 0.9
    assert (t.length <= 8).all()


def test_motion_alone_when_embeddings_are_noise():
    """With useless embeddings (no identity) position and motion still link most."""
    rows = scene(seed=1, sigma=50.0)
    t = link(rows)
    purity, completeness = purity_completeness([r["vid"] for r in rows], t.index)
    assert purity >= 0.85, purity


def test_ids_deterministic_under_permutation():
    rows = scene(seed=2)
    t = link(rows)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(rows))
        tp = link([rows[i] for i in perm])
        assert (tp.detection_tracklet_ids == t.detection_tracklet_ids[perm]).all()
        assert sorted(tp.ids.tolist()) == sorted(t.ids.tolist())
    # a tracklet's id is its earliest member's detection id
    by_id = {r["id"]: r["ts"] for r in rows}
    for tid, members in zip(t.ids, t.members()):
        assert by_id[tid] == min(by_id[rows[p]["id"]] for p in members)
        assert rows[members[0]]["id"] == tid


def _pair(dx_boxes=0.5, size_b=20.0, emb_b=None, dt_ms=2000):
    e = np.ones(8, np.float32)
    s = 20.0
    boxes = [[100, 100, 100 + s, 100 + s],
             [100 + dx_boxes * s, 100, 100 + dx_boxes * s + size_b, 100 + size_b]]
    return link_tracklets(["a", "b"], [T0, T0 + dt_ms], boxes,
                          np.stack([e, e if emb_b is None else emb_b]), emb_gate=0.3)


def test_gates_refuse_jumps():
    assert len(_pair(dx_boxes=0.5)) == 1                 # plausible: linked
    assert len(_pair(dx_boxes=10.0)) == 2                # jump of 10 box sizes in 2 s
    assert len(_pair(size_b=80.0)) == 2                  # car box -> bus box
    other = np.r_[np.ones(4), -np.ones(4)].astype(np.float32)
    assert len(_pair(emb_b=other)) == 2                  # looks like another vehicle
    assert len(_pair(dt_ms=6000)) == 2                   # gap above max_gap_s = 4
    assert len(_pair(dt_ms=0)) == 2                      # same frame: never one track


def test_velocity_gate_refuses_turnaround():
    """A tracklet moving right is not continued by a box back where it came from."""
    e = np.ones((3, 8), np.float32)
    s = 20.0
    xs = [100, 130, 100]   # right by 1.5 boxes, then back
    boxes = [[x, 100, x + s, 100 + s] for x in xs]
    t = link_tracklets(["a", "b", "c"], [T0, T0 + 2000, T0 + 4000], boxes, e, emb_gate=0.3)
    assert t.length.tolist() == [2, 1]
    xs = [100, 130, 160]   # steady
    t = link_tracklets(["a", "b", "c"], [T0, T0 + 2000, T0 + 4000],
                       [[x, 100, x + s, 100 + s] for x in xs], e, emb_gate=0.3)
    assert t.length.tolist() == [3]
    assert t.velocity[0, 0] == pytest.approx(15.0)


def test_missing_boxes_are_singletons():
    rows = scene(seed=3)
    ids, ts = [r["id"] for r in rows], [r["ts"] for r in rows]
    emb = np.stack([r["emb"] for r in rows])
    t = link_tracklets(ids, ts, None, emb)
    assert len(t) == len(rows) and (t.length == 1).all()
    boxes = [None if i % 3 == 0 else r["box"] for i, r in enumerate(rows)]
    t = link_tracklets(ids, ts, boxes, emb)
    alone = np.bincount(t.index)[t.index] == 1
    assert all(alone[i] for i in range(0, len(rows), 3))
    assert (t.length > 1).any()
    assert np.isnan(t.velocity[t.length == 1]).all()


def test_caps_and_validation():
    e = np.ones((12, 4), np.float32)
    boxes = [[10 + 5 * k, 10, 30 + 5 * k, 30] for k in range(12)]
    ts = [T0 + 1000 * k for k in range(12)]
    ids = ["d%02d" % k for k in range(12)]
    t = link_tracklets(ids, ts, boxes, e, emb_gate=0.3, max_len=5)
    assert t.length.tolist() == [5, 5, 2]
    t = link_tracklets(ids, ts, boxes, e, emb_gate=0.3, max_duration_s=3)
    assert t.length.tolist() == [4, 4, 4]
    with pytest.raises(ValueError):
        link_tracklets(["x", "x"], [T0, T0 + 1000], boxes[:2], e[:2])
    assert len(link_tracklets([], [], None, np.zeros((0, 4)))) == 0


def test_aggregate_and_chance_gate():
    emb = np.array([[3, 0], [0, 1], [5, 5]], np.float32)
    agg = aggregate_embeddings(emb, [0, 0, 1], 2)
    assert np.allclose(agg, [[0.5, 0.5], [2 ** -0.5, 2 ** -0.5]])
    raw = aggregate_embeddings(emb, [0, 0, 1], 2, normalize=False)
    assert np.allclose(raw, [[1.5, 0.5], [5, 5]])
    # too few chance pairs -> the embedding gate is off
    unit = np.eye(3, dtype=np.float32)
    assert chance_gate(np.array([0, 1000, 2000]), unit, 0.1) == float("inf")


# ------------------------------------------------------- the learned matcher with tracklets
BANDS = np.array([[6.0, 18.0]])
T_MATCH = 1_700_000_400_000


def two_cameras(seed=0, span_s=1200, rate=0.25, dim=24, sigma=1.3):
    """Vehicles tracked over 2-4 frames (2 s apart) at camera a, half of them again at
    camera b 12 +- 2 s later, plus distractors at b; ``vid`` = the true vehicle."""
    rng = np.random.default_rng(seed)
    dets = []

    def track(cam, vid, ident, t0_s, lane):
        size = rng.uniform(20, 35)
        x, vx = rng.uniform(40, 120), size * rng.uniform(0.2, 0.6)
        t0_s = 2 * int(t0_s // 2)  # a 2 s frame grid
        for k in range(int(rng.integers(2, 5))):
            cx, cy = x + vx * 2 * k, 40 + 45 * lane
            dets.append({"camera_id": cam, "frame_ts_ms": T_MATCH + (t0_s + 2 * k) * 1000,
                         "detection_id": "%s-%d-%d" % (cam, vid, k), "vid": vid,
                         "embedding": (ident + sigma * rng.normal(size=dim)).astype(np.float32),
                         "box_xyxy": [cx - size / 2, cy - size / 2, cx + size / 2,
                                      cy + size / 2]})

    vid = 0
    for t in np.sort(rng.uniform(0, span_s - 30, rng.poisson(rate * span_s))):
        ident = rng.normal(size=dim)
        goes = rng.random() < 0.5
        track("cam-a", vid, ident, t, 0 if goes else int(rng.integers(1, 4)))
        if goes:
            track("cam-b", vid, ident, t + rng.normal(12, 2), 1)
        vid += 1
    for t in rng.uniform(0, span_s - 30, rng.poisson(0.2 * span_s)):
        track("cam-b", vid, rng.normal(size=dim), t, int(rng.integers(0, 4)))
        vid += 1
    return dets


def side(dets, cam):
    ds = [d for d in dets if d["camera_id"] == cam]
    return {"camera_id": cam, "ids": [d["detection_id"] for d in ds],
            "ts_ms": np.array([d["frame_ts_ms"] for d in ds]),
            "emb": np.stack([d["embedding"] for d in ds]),
            "box": [d["box_xyxy"] for d in ds]}


@pytest.fixture(scope="module")
def matched():
    import torch

    from transforms import learned_matching as lm

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    dets = two_cameras()
    a, b = side(dets, "cam-a"), side(dets, "cam-b")
    on = lm.match_linked_pair(a, b, BANDS, min_precision=0.8, tracklets=True)
    off = lm.match_linked_pair(a, b, BANDS, min_precision=0.8, tracklets=False)
    torch.set_num_threads(prev)
    return dets, a, b, on, off


def test_matcher_with_tracklets_true_precision_and_ids(matched):
    dets, a, b, (matches, stats), (plain, plain_stats) = matched
    vid = {d["detection_id"]: d["vid"] for d in dets}
    assert not stats["abstained"] and stats["tracklets"]
    true = [m for m in matches if vid[m["detection_id_a"]] == vid[m["detection_id_b"]]]
    assert len(true) / len(matches) >= 0.8
    # the tracklet ids are those of the sides' own tracklets (linked per camera)
    for s_, key, det_key in ((a, "tracklet_id_a", "detection_id_a"),
                             (b, "tracklet_id_b", "detection_id_b")):
        t = link_tracklets(s_["ids"], s_["ts_ms"], s_["box"], s_["emb"])
        of = dict(zip(s_["ids"], t.detection_tracklet_ids.tolist()))
        assert all(m[key] == of[m[det_key]] for m in matches)
    # one detection pair per detection, a tracklet pair may give several
    assert len({m["detection_id_a"] for m in matches}) == len(matches)
    assert len({m["detection_id_b"] for m in matches}) == len(matches)
    assert len({(m["tracklet_id_a"], m["tracklet_id_b"]) for m in matches}) < len(matches)
    # without tracklets: no tracklet columns
    assert plain and not any("tracklet_id_a" in m for m in plain)
    assert not plain_stats["tracklets"]
    print("tracklets: %d matches, true %.3f; plain %d, true %.3f" % (
        len(matches), len(true) / len(matches), len(plain),
        np.mean([vid[m["detection_id_a"]] == vid[m["detection_id_b"]] for m in plain])))


def test_pooling_and_tracklet_selection():
    from transforms import learned_matching as lm

    ta, tb = np.array([0, 0, 0, 1]), np.array([5, 5, 6, 5])
    s = np.array([1.0, 3.0, 2.0, 0.5], np.float32)
    assert lm.pool_tracklet_scores(ta, tb, s, "max").tolist() == [3.0, 3.0, 2.0, 0.5]
    assert lm.pool_tracklet_scores(ta, tb, s, "mean").tolist() == [2.0, 2.0, 2.0, 0.5]
    # tracklet binding: a-tracklet 0 is bound to b-tracklet 5 by its best pair, so its
    # pair with b-tracklet 6 is refused although both detections are free
    ia, ib = np.array([0, 1, 2]), np.array([0, 1, 2])
    ga, gb = np.array([0, 0, 0]), np.array([5, 6, 5])
    sc = np.array([3.0, 2.0, 1.0])
    assert lm.greedy_one_to_one(sc, ia, ib, ia, ib).tolist() == [0, 1, 2]
    assert lm.greedy_one_to_one(sc, ia, ib, ia, ib, group_a=ga, group_b=gb).tolist() == [0, 2]
    a, b = side(two_cameras(span_s=100), "cam-a"), side(two_cameras(span_s=100), "cam-b")
    with pytest.raises(ValueError):
        lm.match_linked_pair(a, b, BANDS, tracklets=False, tracklet_pooling="max")
    with pytest.raises(ValueError):
        lm.match_linked_pair(a, b, BANDS, tracklets={"no_such": 1})
    with pytest.raises(ValueError):
        lm.match_linked_pair(a, b, BANDS, tracklets=False,
                             features=lm.DEFAULT_FEATURES + ("trk_cos",))
