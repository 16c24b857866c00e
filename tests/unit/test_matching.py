"""Cross-camera matching: Beam transform and numpy core against a brute-force reference.

The reference below is a plain double loop over pairs, written from the semantics in
``transforms/match_blocks.py`` and sharing no code with it. Test data make distances
exact in float32 (integer l2 embeddings; cosine embeddings with four +-1 entries, so
every norm is 2 and every dot product a multiple of 0.25), so exact ties are common and
the (distance, detection_id) tie-break is checked exactly.

Pipelines run on the FnApiRunner (the engine the DirectRunner uses for batch; the
DirectRunner of Beam 2.77 first tries to download the Prism runner from GitHub).
"""
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from transforms import match_blocks as mb

T0 = 1_700_000_000_000


# ------------------------------------------------------------------- reference
def ref_distance(x, y, metric):
    if metric == "l2":
        return math.sqrt(sum((float(u) - float(v)) ** 2 for u, v in zip(x, y)))
    nx = math.sqrt(sum(float(u) ** 2 for u in x))
    ny = math.sqrt(sum(float(v) ** 2 for v in y))
    if nx == 0 or ny == 0:
        return 1.0
    return 1.0 - sum(float(u) * float(v) for u, v in zip(x, y)) / (nx * ny)


def ref_is_candidate(a, b, max_gap_s, links):
    """a, b: detections with a camera < b camera."""
    dt_ms = b["frame_ts_ms"] - a["frame_ts_ms"]
    if dt_ms == 0:
        return False
    if links is None:
        return abs(dt_ms) <= max_gap_s * 1000
    return any(l["camera_a"] == a["camera_id"] and l["camera_b"] == b["camera_id"]
               and l["offset_s"] - l["spread_s"] <= dt_ms / 1000 <= l["offset_s"] + l["spread_s"]
               for l in links)


def ref_candidates(dets, metric, max_gap_s, links):
    """{(id_a, id_b): distance} over every unordered candidate pair."""
    out = {}
    for a in dets:
        for b in dets:
            if a["camera_id"] < b["camera_id"] and ref_is_candidate(a, b, max_gap_s, links):
                out[(a["detection_id"], b["detection_id"])] = ref_distance(
                    a["embedding"], b["embedding"], metric)
    return out


def ref_match(dets, policy, metric="l2", max_gap_s=300, window_s=60, threshold=None,
              top_k=1, links=None):
    """Brute-force matches as {(id_a, id_b): (distance, rank_a, rank_b)}."""
    from scipy.optimize import linear_sum_assignment

    by_id = {d["detection_id"]: d for d in dets}
    cand = ref_candidates(dets, metric, max_gap_s, links)
    thr = math.inf if threshold is None else threshold

    def dist(x, y):
        return cand[(x, y)] if (x, y) in cand else cand[(y, x)]

    neighbours = {}
    for (p, q) in cand:
        neighbours.setdefault((p, by_id[q]["camera_id"]), []).append(q)
        neighbours.setdefault((q, by_id[p]["camera_id"]), []).append(p)

    def ordered(x, cam):
        """x's candidates in camera cam, nearest first, ties by id."""
        return sorted(neighbours.get((x, cam), []), key=lambda y: (dist(x, y), y))

    def rank(x, y):
        return ordered(x, by_id[y]["camera_id"]).index(y) + 1

    out = {}
    if policy == "all":
        for (a, b), d in cand.items():
            if d <= thr:
                out[(a, b)] = (d, rank(a, b), None)
    elif policy in ("topk", "mutual"):
        k = top_k if policy == "topk" else 1

        def selected(x, y):
            return rank(x, y) <= k and dist(x, y) <= thr

        for (a, b), d in cand.items():
            sa, sb = selected(a, b), selected(b, a)
            if (policy == "topk" and (sa or sb)) or (policy == "mutual" and sa and sb):
                out[(a, b)] = (d, rank(a, b) if sa else None, rank(b, a) if sb else None)
    elif policy == "assignment":
        w_ms = round(window_s * 1000)
        cams = sorted({d["camera_id"] for d in dets})
        best = {}
        for ca, cb in itertools.combinations(cams, 2):
            windows = {}
            for d in dets:
                if d["camera_id"] == ca:
                    windows.setdefault(d["frame_ts_ms"] // w_ms, []).append(d["detection_id"])
            cols = sorted(d["detection_id"] for d in dets if d["camera_id"] == cb)
            for rows in windows.values():
                allowed = {(a, b): cand[(a, b)] for a in rows for b in cols
                           if (a, b) in cand and cand[(a, b)] <= thr}
                if not allowed:
                    continue
                big = 1.0 + sum(allowed.values())
                cost = np.array([[allowed.get((a, b), big) for b in cols] for a in rows])
                for i, j in zip(*linear_sum_assignment(cost)):
                    a, b = rows[i], cols[j]
                    if (a, b) in allowed:
                        key = (ca, b)
                        if key not in best or (allowed[(a, b)], a) < (best[key][1], best[key][0]):
                            best[key] = (a, allowed[(a, b)])
        for (ca, b), (a, d) in best.items():
            out[(a, b)] = (d, rank(a, b), None)
    return out


def check_against_reference(got, dets, policy, metric, window_s, **kw):
    """Asserts that Match dicts ``got`` equal the reference, field by field."""
    exp = ref_match(dets, policy, metric=metric, window_s=window_s, **kw)
    by_id = {d["detection_id"]: d for d in dets}
    keys = [(m["detection_id_a"], m["detection_id_b"]) for m in got]
    assert len(keys) == len(set(keys)), "duplicate pairs"
    assert set(keys) == set(exp), (sorted(set(keys) - set(exp))[:5],
                                   sorted(set(exp) - set(keys))[:5])
    w_ms = round(window_s * 1000)
    for m in got:
        d, ra, rb = exp[(m["detection_id_a"], m["detection_id_b"])]
        a, b = by_id[m["detection_id_a"]], by_id[m["detection_id_b"]]
        assert m["camera_id_a"] == a["camera_id"] < m["camera_id_b"] == b["camera_id"]
        assert m["frame_ts_a_ms"] == a["frame_ts_ms"] and m["frame_ts_b_ms"] == b["frame_ts_ms"]
        assert m["dt_seconds"] == (b["frame_ts_ms"] - a["frame_ts_ms"]) / 1000
        assert m["distance"] == pytest.approx(d, rel=1e-5, abs=1e-5)
        assert (m["rank_a"], m["rank_b"]) == (ra, rb), m
        assert m["policy"] == policy
        assert m["window_start_ms"] == a["frame_ts_ms"] // w_ms * w_ms
        assert m["window_end_ms"] == m["window_start_ms"] + w_ms


def assert_one_to_one(got, dets, metric, threshold, **kw):
    cand = ref_candidates(dets, metric, **kw)
    thr = math.inf if threshold is None else threshold
    seen_a, seen_b = set(), set()
    for m in got:
        key = (m["detection_id_a"], m["detection_id_b"])
        assert key in cand and cand[key] <= thr
        pair = (m["camera_id_a"], m["camera_id_b"])
        assert (pair, key[0]) not in seen_a and (pair, key[1]) not in seen_b
        seen_a.add((pair, key[0]))
        seen_b.add((pair, key[1]))


# ------------------------------------------------------------------------ data
@st.composite
def cases(draw, embeddings="ties", max_bursts=1):
    """A random small data set and matching parameters.

    embeddings: "ties" (few distinct integer values: exact ties), "distinct" (wide
    integer range, still exact in float32, ties unlikely). max_bursts > 1 puts several
    independent bursts of detections ~28 h apart in one data set (several cases for the
    price of one pipeline run).
    """
    n_cams = draw(st.integers(2, 4))
    cams = draw(st.lists(st.text("abz-9", min_size=1, max_size=3), min_size=n_cams,
                         max_size=n_cams, unique=True))
    bursts = []
    for b in range(draw(st.integers(1, max_bursts))):
        n_b = draw(st.one_of(st.integers(4, 40), st.integers(20, 40), st.integers(0, 3)))
        span = draw(st.integers(5_000, 300_000))
        step = draw(st.sampled_from([1, 250, 1000, 2500]))  # coarse: equal times, exact edges
        t0 = T0 + b * 100_000_000 + draw(st.integers(-200_000, 200_000))
        bursts += [(t0, span, step)] * n_b
    n = len(bursts)
    seed = draw(st.integers(0, 2 ** 32 - 1))
    dim = draw(st.integers(4, 8))
    metric = "l2" if embeddings == "distinct" else draw(st.sampled_from(["l2", "cosine"]))
    max_gap_s = draw(st.integers(2, 240)) / 2
    w1, w2 = draw(st.lists(st.integers(2, 400), min_size=2, max_size=2, unique=True))
    top_k = draw(st.integers(1, 3))
    rng = np.random.default_rng(seed)
    if metric == "l2":
        v = 600 if embeddings == "distinct" else draw(st.sampled_from([1, 2, 3]))
        emb = rng.integers(-v, v + 1, size=(n, dim)).astype(np.float32)
        threshold = draw(st.one_of(st.none(), st.integers(0, 12).map(lambda k: k + 0.5)))
    else:
        emb = np.zeros((n, dim), np.float32)
        for row in emb:
            row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
        threshold = draw(st.one_of(st.none(), st.integers(0, 7).map(lambda k: k / 4 + 0.125)))
    links = None
    if draw(st.booleans()):
        links = []
        for a, b in itertools.combinations(sorted(cams), 2):
            for _ in range(draw(st.integers(0, 2))):
                links.append({"camera_a": a, "camera_b": b,
                              "offset_s": draw(st.integers(-120, 120)) / 2,
                              "spread_s": draw(st.integers(0, 60)) / 2})
    ids = ["%06x" % x for x in rng.choice(16 ** 6, size=n, replace=False)]
    dets = [{"camera_id": cams[int(rng.integers(n_cams))],
             "frame_ts_ms": int(t0 + rng.integers(0, span // step + 1) * step),
             "detection_id": ids[i], "embedding": emb[i], "label": "car", "score": 0.9}
            for i, (t0, span, step) in enumerate(bursts)]
    return {"dets": dets, "metric": metric, "max_gap_s": max_gap_s, "windows": (w1 / 2, w2 / 2),
            "threshold": threshold, "top_k": top_k, "links": links}


def arrays(dets):
    if not dets:
        return [], [], np.zeros((0, 4), np.float32), []
    return ([d["camera_id"] for d in dets], [d["frame_ts_ms"] for d in dets],
            np.stack([d["embedding"] for d in dets]), [d["detection_id"] for d in dets])


def _params(case, policy, window_s, **extra):
    return dict(policy=policy, metric=case["metric"], max_gap_s=case["max_gap_s"],
                window_s=window_s, threshold=case["threshold"], top_k=case["top_k"],
                links=case["links"], **extra)


def _ref_kw(case):
    return dict(max_gap_s=case["max_gap_s"], threshold=case["threshold"],
                top_k=case["top_k"], links=case["links"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), policy=st.sampled_from(["all", "topk", "mutual"]),
       tiles=st.sampled_from([(mb.DEFAULT_Q_TILE, mb.DEFAULT_R_TILE), (3, 5), (1, 1)]))
def test_match_arrays_matches_reference(case, policy, tiles):
    w = case["windows"][0]
    got = mb.match_arrays(*arrays(case["dets"]), **_params(case, policy, w),
                          q_tile=tiles[0], r_tile=tiles[1])
    check_against_reference(got, case["dets"], policy, case["metric"], w, **_ref_kw(case))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(embeddings="distinct"), window_idx=st.integers(0, 1))
def test_match_arrays_assignment_matches_reference(case, window_idx):
    """Without exact ties (wide integer embeddings) the optimum is unique."""
    cand = ref_candidates(case["dets"], case["metric"], case["max_gap_s"], case["links"])
    dists = sorted(cand.values())
    assume(all(x != y for x, y in zip(dists, dists[1:])))
    w = case["windows"][window_idx]
    got = mb.match_arrays(*arrays(case["dets"]), **_params(case, "assignment", w))
    check_against_reference(got, case["dets"], "assignment", case["metric"], w, **_ref_kw(case))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), max_cells=st.integers(1, 60), window_idx=st.integers(0, 1))
def test_split_blocks_assignment_one_to_one(case, max_cells, window_idx):
    got = mb.match_arrays(*arrays(case["dets"]),
                          **_params(case, "assignment", case["windows"][window_idx],
                                    max_candidates_per_block=max_cells))
    assert_one_to_one(got, case["dets"], case["metric"], case["threshold"],
                      max_gap_s=case["max_gap_s"], links=case["links"])


# ------------------------------------------------------------ numpy core units
def test_pair_distances_match_float64():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(13, 32)).astype(np.float32)
    r = rng.normal(size=(17, 32)).astype(np.float32)
    r[3] = q[2]
    r[4] = 0.0
    for metric in ("l2", "cosine"):
        got = mb.pair_distances(mb.prepare_embeddings(q, metric),
                                mb.prepare_embeddings(r, metric), metric)
        assert got.dtype == np.float32
        exp = np.array([[ref_distance(x, y, metric) for y in r] for x in q])
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=2e-3)
        assert got.min() >= 0
    d = mb.pair_distances(mb.prepare_embeddings(q, "cosine"), mb.prepare_embeddings(r, "cosine"),
                          "cosine")
    assert np.all(d[:, 4] == 1.0)  # zero vector: cosine similarity 0


@pytest.mark.parametrize("seed", range(6))
def test_query_chunks_enumerate_exactly_the_candidates(seed):
    """The one enumerator (every policy, learned matching, calibration) gives each
    candidate cell exactly once, in chunks and tiles within their bounds, and computes
    few cells beyond the candidates even for narrow, disjoint bands."""
    rng = np.random.default_rng(seed)
    q_ts = np.sort(rng.integers(0, 600_000, 400))
    r_ts = np.sort(np.r_[rng.integers(0, 600_000, 500), q_ts[:20]])  # some dt == 0
    iv = [np.array([[-300_000, 300_000]]), np.array([[-31_000, -25_000], [25_000, 33_000]]),
          np.array([[0, 4_000]])][seed % 3]
    want = mb.candidate_mask(q_ts, r_ts, iv)
    got = np.zeros_like(want, dtype=int)
    cells = 0
    for chunk in mb.query_chunks(q_ts, r_ts, iv, q_tile=64, r_tile=100):
        assert chunk.i1 - chunk.i0 <= 64
        assert chunk.n_candidates == want[chunk.i0:chunk.i1].sum()
        for tile in chunk.tiles:
            assert tile.j1 - tile.j0 <= 100
            got[chunk.i0:chunk.i1, tile.j0:tile.j1] += mb.tile_mask(tile)
            d = np.zeros((chunk.i1 - chunk.i0, tile.j1 - tile.j0), np.float32)
            mb.mask_outside(d, tile)
            assert np.array_equal(np.isfinite(d), mb.tile_mask(tile))
            cells += d.size
    assert np.array_equal(got, want.astype(int))
    assert cells <= 2.5 * want.sum()


def test_candidate_mask_and_bands():
    bands = mb.CandidateBands(max_gap_s=2)
    iv = bands.intervals("a", "b")
    m = mb.candidate_mask(np.array([0, 1000]), np.array([-2000, -2001, 0, 1000, 2000, 3000, 3001]),
                          iv)
    assert m.tolist() == [[True, False, False, True, True, False, False],
                          [False, False, True, False, True, True, False]]
    assert len(bands.intervals("a", "a")) == 0
    linked = mb.CandidateBands(links=[{"camera_a": "b", "camera_b": "a", "offset_s": 10,
                                       "spread_s": 2.5}])
    # flipped to a < b with offset -10: t_b - t_a in [-12.5, -7.5] s
    assert linked.intervals("a", "b").tolist() == [[-12500, -7500]]
    assert linked.intervals("b", "a").tolist() == [[7500, 12500]]
    assert linked.partners("a") == ["b"] and linked.partners("c") == []
    assert len(linked.intervals("a", "c")) == 0
    # decimal seconds: 0.1 + 0.2 s must give 300 ms inclusive, not 301 / 299
    dec = mb.CandidateBands(links=[{"camera_a": "a", "camera_b": "b", "offset_s": 0.2,
                                    "spread_s": 0.1}])
    assert dec.intervals("a", "b").tolist() == [[100, 300]]
    zero = mb.CandidateBands(links=[{"camera_a": "a", "camera_b": "b", "offset_s": 0,
                                     "spread_s": 1}])
    assert mb.candidate_mask(np.array([5]), np.array([4, 5, 6]),
                             zero.intervals("a", "b")).tolist() == [[True, False, True]]
    with pytest.raises(ValueError):
        mb.CandidateBands(links=[{"camera_a": "a", "camera_b": "a", "offset_s": 0, "spread_s": 1}])
    with pytest.raises(ValueError):
        mb.CandidateBands(links=[{"camera_a": "a", "camera_b": "b", "offset_s": 0, "spread_s": -1}])
    assert mb.CandidateBands(3) == mb.CandidateBands(3) != mb.CandidateBands(4)


@settings(max_examples=300, deadline=None)
@given(t=st.integers(-10 ** 7, 10 ** 7), w=st.integers(1, 100_000), data=st.data())
def test_reach_window_starts_exact(t, w, data):
    span = 20 * w + 1000  # keeps the brute force below short
    bounds = data.draw(st.lists(st.tuples(st.integers(-span, span), st.integers(0, span)),
                                min_size=1, max_size=3))
    iv = np.array([(lo, lo + width) for lo, width in bounds], dtype=np.int64)
    starts = mb.reach_window_starts(t, w, iv)
    assert starts == sorted(set(starts))
    # brute force over every window whose reach could contain t
    lo_all, hi_all = int(iv[:, 0].min()), int(iv[:, 1].max())
    k_lo, k_hi = (t - hi_all) // w - 2, (t - lo_all) // w + 2
    exp = []
    for k in range(k_lo, k_hi + 1):
        # some query time q in [kW, (k+1)W) has t - q in some [lo, hi]
        if any(max(k * w, t - hi) <= min((k + 1) * w - 1, t - lo) for lo, hi in iv.tolist()):
            exp.append(k * w)
    assert starts == exp
    for s in range(k_lo * w, (k_hi + 1) * w, w):
        assert bool(mb.in_reach(np.array([t]), s, w, iv)[0]) == (s in starts)


def test_make_batches():
    recs = [("d%d" % i, 1000 - i % 3, np.full(3, i, np.float16)) for i in range(7)]
    batches = mb.make_batches(0, recs, max_size=3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert all(b.emb.dtype == np.float16 for b in batches)
    ts = np.concatenate([b.ts for b in batches])
    ids = np.concatenate([b.ids for b in batches])
    assert list(zip(ts.tolist(), ids.tolist())) == sorted((r[1], r[0]) for r in recs)
    side = mb.side_from_batches("c", batches, "l2", keep=[b.ts >= 999 for b in batches])
    assert side.emb.dtype == np.float32 and len(side) == 5


def _side(cam, ids, ts, emb, metric="l2"):
    return mb.make_side(cam, ids, ts, np.asarray(emb, np.float32), metric)


def test_scan_block_ties_ranks_and_topk():
    q = _side("a", ["q1"], [1000], [[0, 0]])
    # four refs at distance 1 (tie), one at 0; ids chosen out of time order
    r = _side("b", ["r9", "r2", "r5", "r1", "r0"], [1500, 1600, 1700, 1800, 50_000],
              [[1, 0], [0, 1], [-1, 0], [0, 0], [0, 0]])
    iv = mb.CandidateBands(max_gap_s=10).intervals("a", "b")
    (ch,) = list(mb.scan_block(q, r, iv, "l2"))
    assert [r.ids[j] for j in ch.rj] == ["r1", "r2", "r5", "r9"]  # r0 is too far in time
    assert ch.rank.tolist() == [1, 2, 3, 4] and ch.n_candidates == 4
    (ch,) = list(mb.scan_block(q, r, iv, "l2", keep_k=2, q_tile=1, r_tile=1))
    assert [r.ids[j] for j in ch.rj] == ["r1", "r2"] and ch.rank.tolist() == [1, 2]
    (ch,) = list(mb.scan_block(q, r, iv, "l2", threshold=0.5))
    assert [r.ids[j] for j in ch.rj] == ["r1"]


def test_split_block_keeps_every_candidate():
    rng = np.random.default_rng(3)
    q = _side("a", ["q%d" % i for i in range(50)], rng.integers(0, 100_000, 50),
              rng.normal(size=(50, 4)))
    r = _side("b", ["r%d" % i for i in range(70)], rng.integers(-20_000, 120_000, 70),
              rng.normal(size=(70, 4)))
    iv = mb.CandidateBands(max_gap_s=7).intervals("a", "b")
    whole = mb.candidate_mask(q.ts, r.ts, iv)
    pairs = {(q.ids[i], r.ids[j]) for i, j in zip(*np.nonzero(whole))}
    parts = mb.split_block(q, r, iv, max_cells=300)
    assert len(parts) > 1
    got = []
    for qs, rs in parts:
        m = mb.candidate_mask(qs.ts, rs.ts, iv)
        got += [(qs.ids[i], rs.ids[j]) for i, j in zip(*np.nonzero(m))]
    assert len(got) == len(set(got)) and set(got) == pairs
    assert sum(len(qs) for qs, _ in parts) == len(q)


def _camera_sides(dets, metric):
    """{camera: Side} of a case's detections."""
    out = {}
    for cam in sorted({d["camera_id"] for d in dets}):
        mine = [d for d in dets if d["camera_id"] == cam]
        out[cam] = mb.make_side(cam, [d["detection_id"] for d in mine],
                                [d["frame_ts_ms"] for d in mine],
                                np.stack([d["embedding"] for d in mine]), metric)
    return out


def _scan_firsts(q, r, iv, metric, threshold, k):
    """{(q id, r id): (distance, rank)} of each query's first k cells, by scan_block."""
    out = {}
    for ch in mb.scan_block(q, r, iv, metric, threshold, keep_k=k):
        for i, j, d, rank in zip(ch.qi, ch.rj, ch.dist, ch.rank):
            out[(q.ids[i], r.ids[j])] = (float(d), int(rank))
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), k=st.integers(1, 3),
       tiles=st.sampled_from([(mb.DEFAULT_Q_TILE, mb.DEFAULT_R_TILE), (3, 5), (1, 1), (2, 64)]),
       shared_workspace=st.booleans())
def test_neighbour_block_both_directions_in_one_pass(case, k, tiles, shared_workspace):
    """Rows = each query's first k (as scan_block finds them); columns of one block that
    holds every candidate = each reference's first k, found by scanning the block the
    other way; flags and ranks agree. Exact data: distances compare exactly."""
    sides = _camera_sides(case["dets"], case["metric"]) if case["dets"] else {}
    bands = mb.CandidateBands(case["max_gap_s"], case["links"])
    workspace = mb.Workspace() if shared_workspace else None
    for qc, rc in itertools.combinations(sorted(sides), 2):
        q, r = sides[qc], sides[rc]
        iv = bands.intervals(qc, rc)
        nb = mb.neighbour_block(q, r, iv, case["metric"], case["threshold"], k, *tiles,
                                workspace=workspace)
        n_cand = int(mb.candidate_mask(q.ts, r.ts, iv).sum()) if len(iv) else 0
        assert nb.n_candidates == n_cand
        rows = {(q.ids[i], r.ids[j]): (float(d), int(rank)) for i, j, d, rank in
                zip(nb.row_q, nb.row_r, nb.row_dist, nb.row_rank)}
        assert rows == _scan_firsts(q, r, iv, case["metric"], case["threshold"], k)
        back = _scan_firsts(r, q, bands.intervals(rc, qc), case["metric"],
                            case["threshold"], k)
        cols = {(q.ids[i], r.ids[j]): float(d) for i, j, d in
                zip(nb.col_q, nb.col_r, nb.col_dist)}
        assert cols == {(a, b): d for (b, a), (d, _) in back.items()}
        for i, j, ra in zip(nb.col_q, nb.col_r, nb.col_rank_q):
            assert ra == rows.get((q.ids[i], r.ids[j]), (None, 0))[1]
        col_keys = set(cols)
        assert [(q.ids[i], r.ids[j]) in col_keys for i, j in zip(nb.row_q, nb.row_r)] == \
            nb.row_in_cols.tolist()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), policy=st.sampled_from(["topk", "mutual"]), data=st.data())
def test_merge_partials_any_split_of_the_references_candidates(case, policy, data):
    """Merging a reference's candidates from any number of partials (any grouping, any
    order, as blocks deliver them) gives what one partial with all of them gives."""
    sides = _camera_sides(case["dets"], case["metric"]) if case["dets"] else {}
    bands = mb.CandidateBands(case["max_gap_s"], case["links"])
    k = 1 if policy == "mutual" else case["top_k"]
    for qc, rc in itertools.combinations(sorted(sides), 2):
        q, r = sides[qc], sides[rc]
        nb = mb.neighbour_block(q, r, bands.intervals(qc, rc), case["metric"],
                                case["threshold"], k)
        _, partial = mb.neighbour_outputs(q, r, nb, policy, 60_000)
        whole = mb.merge_partials(qc, rc, [partial], policy, case["top_k"], 60_000)
        labels = np.asarray(data.draw(st.lists(st.integers(0, 3), min_size=len(partial),
                                               max_size=len(partial))), dtype=np.int64)
        pieces = [partial.take(labels == g) for g in data.draw(st.permutations(range(4)))]
        merged = mb.merge_partials(qc, rc, pieces, policy, case["top_k"], 60_000)
        assert sorted(merged, key=mb.match_sort_key) == sorted(whole, key=mb.match_sort_key)


def test_batch_wire_format_round_trip():
    rng = np.random.default_rng(5)
    ids = np.asarray(["d\n%d\u00e9" % i for i in range(5)] + ["x" * 90], dtype=str)
    ts = np.arange(6, dtype=np.int64) * 7 - 3
    for dtype in (np.float16, np.float32, np.float64):
        batch = mb.Batch(-120_000, ids, ts, rng.normal(size=(6, 5)).astype(dtype), "cém-7")
        got = mb.decode_batch(mb.encode_batch(batch))
        assert got.window_start_ms == -120_000 and got.camera_id == "cém-7"
        assert got.ids.tolist() == ids.tolist() and got.ts.tolist() == ts.tolist()
        want = np.float16 if dtype == np.float16 else np.float32
        assert got.emb.dtype == want and np.array_equal(got.emb, batch.emb.astype(want))
    empty = mb.decode_batch(mb.encode_batch(mb.Batch(0, np.asarray([], dtype=str),
                                                     np.zeros(0, np.int64),
                                                     np.zeros((0, 4), np.float16))))
    assert len(empty) == 0 and empty.emb.shape == (0, 4)
    with pytest.raises(ValueError):
        mb.decode_batch(b"\0" * 64)


def test_stored_rows_travel_as_references():
    """A batch whose embeddings are StoredRows encodes its path, group and row numbers
    (a few bytes a detection), slices like embeddings, and decodes to the same place."""
    ids = np.asarray(["a%d" % i for i in range(4)], dtype=str)
    ts = np.asarray([5, 6, 6, 9], dtype=np.int64)
    stored = mb.StoredRows("gs://bücket/cam/2020-05-05-13.parquet", 7, np.asarray([3, 0, 9, 2]))
    batch = mb.Batch(1200, ids, ts, stored, "cam")
    data = mb.encode_batch(batch)
    got = mb.decode_batch(data)
    assert got.emb == stored and got.ids.tolist() == ids.tolist() and got.ts.tolist() == [5, 6, 6, 9]
    assert len(data) < 240
    part = mb.decode_batch(mb.encode_batch(batch.take(np.asarray([False, True, True, False]))))
    assert part.emb == mb.StoredRows(stored.path, 7, np.asarray([0, 9])) and len(part) == 2
    assert mb.compact_embeddings(stored) is stored
    made = mb.batches_from_arrays(0, ids[::-1], ts[::-1], stored[::-1], 3, "cam")
    assert [b.emb.rows.tolist() for b in made] == [[3, 0, 9], [2]]  # (ts, id) order


def test_partial_wire_format_round_trip():
    """Neighbour partials travel as bytes with UTF-8 ids: equal arrays back, a fraction of
    numpy's 4 bytes per character."""
    rng = np.random.default_rng(6)
    for n in (0, 1, 7):
        part = mb.Partial(np.asarray(["b\u00e9-%d" % i for i in range(n)], dtype=str),
                          rng.integers(-10**12, 10**12, n), np.asarray(["a" * 60] * n, dtype=str),
                          rng.integers(0, 10**13, n), rng.random(n).astype(np.float32),
                          rng.integers(0, 3, n))
        data = mb.encode_partial(part)
        got = mb.decode_partial(data)
        for want, have in zip(part, got):
            assert have.tolist() == want.tolist()
        assert got.dist.dtype == np.float32 and got.ts_b.dtype == np.int64
        if n:
            assert len(data) < sum(a.nbytes for a in part) / 2
    with pytest.raises(ValueError):
        mb.decode_partial(b"\0" * 64)

def test_compact_embeddings_only_when_lossless():
    from transforms.match_blocks import compact_embeddings

    exact = np.asarray([[0.5, -2.0, 0.0, 6.1035156e-05, 65504.0]], np.float16).astype(np.float32)
    assert compact_embeddings(exact).dtype == np.float16
    assert np.array_equal(compact_embeddings(exact).astype(np.float32), exact)
    for value in (0.1, 1e-9, 70000.0, np.nan):
        inexact = exact.copy()
        inexact[0, 0] = value
        assert compact_embeddings(inexact).dtype == np.float32


def _brute_assignment_value(cost):
    """(max pairs, min total) over every partial one-to-one matching of allowed cells."""
    n, m = cost.shape
    best = (0, 0.0)
    for perm in itertools.permutations(range(m), min(n, m)) if n <= m else \
            (tuple(p) for p in itertools.permutations(range(n), m)):
        if n <= m:
            cells = [(i, perm[i]) for i in range(n)]
        else:
            cells = [(perm[j], j) for j in range(m)]
        cells = [(i, j) for i, j in cells if np.isfinite(cost[i, j])]
        val = (len(cells), sum(cost[i, j] for i, j in cells))
        if val[0] > best[0] or (val[0] == best[0] and val[1] < best[1] - 1e-9):
            best = val
    return best


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 5), m=st.integers(1, 5), seed=st.integers(0, 10 ** 6),
       density=st.floats(0.1, 1.0))
def test_assign_cells_optimal_and_deterministic(n, m, seed, density):
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, 4, size=(n, m)).astype(np.float32)  # many ties
    allowed = rng.random((n, m)) < density
    q = _side("a", ["q%d" % i for i in range(n)], np.zeros(n), np.zeros((n, 2)))
    r = _side("b", ["r%d" % j for j in range(m)], np.zeros(m), np.zeros((m, 2)))
    qi, rj = np.nonzero(allowed)
    dist = cost[qi, rj]
    pick = mb.assign_cells(q, r, qi, rj, dist)
    assert len(set(qi[pick].tolist())) == len(pick) == len(set(rj[pick].tolist()))
    exp = _brute_assignment_value(np.where(allowed, cost, np.inf))
    assert (len(pick), float(dist[pick].sum())) == (exp[0], pytest.approx(exp[1]))
    perm = rng.permutation(len(qi))
    pick2 = mb.assign_cells(q, r, qi[perm], rj[perm], dist[perm])
    assert sorted(zip(qi[perm][pick2].tolist(), rj[perm][pick2].tolist())) == \
        sorted(zip(qi[pick].tolist(), rj[pick].tolist()))


def test_match_arrays_small_example():
    # cameras "x" < "y"; y1 is nearest to x1 but x2 is nearer to y1 -> not mutual for x1
    cam = ["x", "x", "y", "y"]
    ts = [T0, T0 + 1000, T0 + 5000, T0 + 6000]
    emb = [[0.0, 0.0], [1.0, 0.0], [0.9, 0.0], [5.0, 0.0]]
    ids = ["x1", "x2", "y1", "y2"]
    mutual = mb.match_arrays(cam, ts, emb, ids, "mutual", max_gap_s=10, window_s=60)
    assert [(m["detection_id_a"], m["detection_id_b"]) for m in mutual] == [("x2", "y1")]
    m = mutual[0]
    assert m["dt_seconds"] == 4.0 and m["rank_a"] == m["rank_b"] == 1
    assert m["distance"] == pytest.approx(0.1, abs=1e-6) and m["policy"] == "mutual"
    assert m["window_start_ms"] == T0 // 60_000 * 60_000
    allp = mb.match_arrays(cam, ts, emb, ids, "all", max_gap_s=10, threshold=1.0)
    assert {(m["detection_id_a"], m["detection_id_b"]): m["rank_a"] for m in allp} == \
        {("x1", "y1"): 1, ("x2", "y1"): 1}
    assign = mb.match_arrays(cam, ts, emb, ids, "assignment", max_gap_s=10)
    assert {(m["detection_id_a"], m["detection_id_b"]) for m in assign} == \
        {("x1", "y1"), ("x2", "y2")}  # max cardinality first, then total distance
    # no candidates when timestamps are equal (dt == 0) or beyond max_gap
    assert mb.match_arrays(["x", "y"], [T0, T0], [[0.0], [0.0]], ["a", "b"], "all") == []
    assert mb.match_arrays(["x", "y"], [T0, T0 + 10_001], [[0.0], [0.0]], ["a", "b"], "all",
                           max_gap_s=10) == []
    with pytest.raises(ValueError):
        mb.match_arrays(cam, ts, emb, ["x1", "x1", "y1", "y2"], "all")
    with pytest.raises(ValueError):
        mb.match_arrays(cam, ts, emb, ids, "nearest")


def test_assignment_keeps_lowest_per_detection_b():
    """b is assigned in two windows of camera a; only the closer assignment survives."""
    cam = ["a", "a", "b"]
    ts = [T0 + 59_000 - T0 % 60_000, T0 + 61_000 - T0 % 60_000, T0 + 60_500 - T0 % 60_000]
    emb = [[0.0], [0.3], [0.2]]
    got = mb.match_arrays(cam, ts, emb, ["a1", "a2", "b1"], "assignment", window_s=60)
    assert [(m["detection_id_a"], m["detection_id_b"]) for m in got] == [("a2", "b1")]
    got = mb.match_arrays(cam, ts, emb, ["a1", "a2", "b1"], "assignment", window_s=600)
    assert [(m["detection_id_a"], m["detection_id_b"]) for m in got] == [("a2", "b1")]
