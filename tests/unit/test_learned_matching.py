"""Learned linked-pair matching (transforms/learned_matching.py, models/pair_scorer.py).

Synthetic data with a planted structure: vehicles (an identity vector + per-detection
noise) are seen at camera a and half of them reappear at camera b dt ~ N(12, 2) s
later, in one lane; camera b also sees distractors. Ground truth (the vehicle of every
detection) is known, so true precision and recall are measured directly. Pipelines
run on the FnApiRunner (the DirectRunner's batch engine; see tests/*/test_matching.py).

The boxes here do not move with their vehicle, so within-camera tracklets (on by
default) would join unrelated detections: these tests call the detection-level matcher
(``tracklets=False``); tests/unit/test_tracklets.py tests tracklets on moving boxes.
"""
import functools

import numpy as np
import pytest


from models.pair_scorer import PairScorer
from transforms import learned_matching as lm
from transforms import match_blocks as mb

T0_MS = 1_700_000_400_000  # a multiple of 600 s: period boundaries at T0 + k * 600 s
BANDS = np.array([[4.0, 20.0]])
match_pair = functools.partial(lm.match_linked_pair, tracklets=False)


def synth(seed=0, span_s=1200, rate_a=0.6, frac_to_b=0.5, rate_b_extra=0.5, dim=24, sigma=1.1,
          offset_s=12.0, sd_s=2.0, linked=True):
    """Detection dicts (plus ``vid``, the true vehicle) of two cameras.

    Vehicles going on to b drive in lane 0 at a (box centre x ~ 50 px), the others in
    lanes 1-2; each vehicle gives 1-2 detections (1 s apart) per camera. Unlinked:
    the vehicles at b have fresh identities (no true pair exists).
    """
    rng = np.random.default_rng(seed)
    dets, seen = [], set()

    def emit(cam, vid, ident, t_s, lane):
        for k in range(int(rng.integers(1, 3))):
            det_id = "%s-%d-%d" % (cam, vid, k)
            if det_id in seen:
                continue
            seen.add(det_id)
            cx, cy = lane * 100 + 50 + rng.normal(0, 15), 100 + rng.normal(0, 30)
            w = max(8.0, rng.normal(30, 8))
            dets.append({"camera_id": cam, "frame_ts_ms": T0_MS + int(round(t_s + k)) * 1000,
                         "detection_id": det_id, "vid": vid,
                         "embedding": (ident + sigma * rng.normal(size=dim)).astype(np.float32),
                         "box_xyxy": [cx - w / 2, cy - w / 3, cx + w / 2, cy + w / 3]})

    vid = 0
    for t in np.sort(rng.uniform(0, span_s, rng.poisson(rate_a * span_s))):
        ident = rng.normal(size=dim)
        goes = rng.random() < frac_to_b
        emit("cam-a", vid, ident, t, 0 if goes else int(rng.integers(1, 3)))
        if goes:
            tb = t + rng.normal(offset_s, sd_s)
            if 0 <= tb < span_s:
                emit("cam-b", vid if linked else -vid - 1,
                     ident if linked else rng.normal(size=dim), tb, 1)
        vid += 1
    for t in rng.uniform(0, span_s, rng.poisson(rate_b_extra * span_s)):
        emit("cam-b", vid, rng.normal(size=dim), t, int(rng.integers(0, 3)))
        vid += 1
    return dets


def sides(dets):
    out = []
    for cam in ("cam-a", "cam-b"):
        ds = [d for d in dets if d["camera_id"] == cam]
        out.append({"camera_id": cam, "ids": [d["detection_id"] for d in ds],
                    "ts_ms": np.array([d["frame_ts_ms"] for d in ds]),
                    "emb": np.stack([d["embedding"] for d in ds]),
                    "box": np.array([d["box_xyxy"] for d in ds])})
    return out


@pytest.fixture(scope="module")
def linked():
    dets = synth(seed=0)
    a, b = sides(dets)
    matches, stats = match_pair(a, b, BANDS, min_precision=0.8)
    return dets, matches, stats


def check_one_to_one(matches):
    pairs = {(m["camera_id_a"], m["camera_id_b"]) for m in matches}
    for pair in pairs:
        ms = [m for m in matches if (m["camera_id_a"], m["camera_id_b"]) == pair]
        assert len({m["detection_id_a"] for m in ms}) == len(ms)
        assert len({m["detection_id_b"] for m in ms}) == len(ms)


# ---------------------------------------------------------------- the matcher
def test_planted_pairs_found_with_high_true_precision(linked):
    dets, matches, stats = linked
    vid = {d["detection_id"]: d["vid"] for d in dets}
    ts = {d["detection_id"]: d["frame_ts_ms"] for d in dets}
    true = [m for m in matches if vid[m["detection_id_a"]] == vid[m["detection_id_b"]]]
    assert not stats["abstained"] and len(matches) == stats["matches"]
    assert len(true) / len(matches) >= 0.8
    # vehicles seen at both cameras with some dt inside the band
    at_a = {}
    for d in dets:
        if d["camera_id"] == "cam-a":
            at_a.setdefault(d["vid"], []).append(d["frame_ts_ms"])
    findable = {d["vid"] for d in dets if d["camera_id"] == "cam-b" and any(
        4000 <= d["frame_ts_ms"] - t <= 20000 for t in at_a.get(d["vid"], []))}
    found = {vid[m["detection_id_a"]] for m in true}
    print("true precision %.3f, vehicles found %d of %d" % (
        len(true) / len(matches), len(found), len(findable)))
    assert len(found) >= 0.4 * len(findable)
    check_one_to_one(matches)
    for m in matches:
        assert m["policy"] == "learned" and m["camera_id_a"] == "cam-a"
        assert m["dt_seconds"] == (ts[m["detection_id_b"]] - ts[m["detection_id_a"]]) / 1000
        assert 4.0 <= m["dt_seconds"] <= 20.0 and m["score"] >= stats["threshold"]
        assert m["rank_a"] >= 1 and m["rank_b"] >= 1 and m["distance"] >= 0
        assert m["window_start_ms"] is None and m["window_end_ms"] is None
    # the estimate behind the threshold is what the stats say
    assert stats["est_real"] == len(matches)
    assert stats["est_precision"] >= 0.8
    # q-values: monotone in the score, the last one the selection's estimated false share
    by_score = sorted(matches, key=lambda m: -m["score"])
    q = [m["q_value"] for m in by_score]
    assert q == sorted(q) and 0.0 <= q[0] and q[-1] <= 1 - stats["est_precision"] + 1e-6
    true_share = np.mean([vid[m["detection_id_a"]] != vid[m["detection_id_b"]] for m in by_score])
    assert abs(q[-1] - true_share) < 0.15, (q[-1], true_share)


def test_selection_visits_mutual_nearest_neighbours_in_rounds(linked):
    """One round (mutual) keeps only pairs that are each other's nearest candidate; the
    default's three rounds also visit a detection's next candidate once its nearest was
    taken by a closer pair, so they return more true matches, some not ranked first;
    the greedy selection over every candidate picks non-first pairs too."""
    dets, matches, _ = linked
    assert lm.DEFAULT_SELECTION == "mutual-3"
    a, b = sides(dets)
    vid = {d["detection_id"]: d["vid"] for d in dets}
    n_true = lambda ms: sum(vid[m["detection_id_a"]] == vid[m["detection_id_b"]] for m in ms)
    one, _ = match_pair(a, b, BANDS, min_precision=0.8, selection="mutual")
    assert one and all(m["rank_a"] == 1 and m["rank_b"] == 1 for m in one)
    assert any(m["rank_a"] > 1 or m["rank_b"] > 1 for m in matches)
    assert n_true(matches) > n_true(one), (n_true(matches), n_true(one))
    print("true matches: mutual-3 %d, mutual %d" % (n_true(matches), n_true(one)))
    greedy, _ = match_pair(a, b, BANDS, min_precision=0.8, selection="greedy")
    assert any(m["rank_a"] > 1 or m["rank_b"] > 1 for m in greedy)
    with pytest.raises(ValueError):
        match_pair(a, b, BANDS, selection="hungarian")


def test_zone_gate_keeps_the_places_a_link_joins():
    """The vehicles that reach b leave a in lane 0 and enter b in lane 1; the gate,
    trained on the real alignment's mutual pairs against the training negatives' (no
    truth), drops most candidates elsewhere, so fewer chance pairs take a true pair's
    nearest neighbour: more true matches at the same estimated precision."""
    dets = synth(seed=3)
    vid = {d["detection_id"]: d["vid"] for d in dets}
    a, b = sides(dets)
    plain, _ = match_pair(a, b, BANDS, min_precision=0.8)
    gated, stats = match_pair(a, b, BANDS, min_precision=0.8, zone_gate=True)
    gate = stats["zone_gate"]
    assert gate["folds_gated"] == 2 and 0.2 < gate["kept"] < 0.6, gate
    n_true = [sum(vid[m["detection_id_a"]] == vid[m["detection_id_b"]] for m in ms)
              for ms in (plain, gated)]
    print("true matches without / with the gate:", n_true, "of", len(plain), len(gated))
    assert n_true[1] >= 1.1 * n_true[0] and n_true[1] >= 0.85 * len(gated)
    check_one_to_one(gated)
    assert stats["est_precision"] >= 0.8


def test_mutual_rounds_pair_the_detections_left_free():
    """Round r's pairs are the mutual nearest neighbours (by distance, ties by id) among
    the candidates of detections no earlier round paired: checked against a direct
    reading of that rule on random candidate sets with ties."""
    from types import SimpleNamespace

    rng = np.random.default_rng(11)
    for case in range(40):
        na, nb = rng.integers(1, 9, size=2)
        cells = [(i, j) for i in range(na) for j in range(nb) if rng.random() < 0.6]
        if not cells:
            continue
        ia, ib = (np.asarray(x, dtype=np.int64) for x in zip(*cells))
        dist = rng.integers(0, 4, len(cells)).astype(np.float32)  # many ties
        c = lm.Candidates(ia, ib, dist, np.zeros(len(cells), np.int64))
        a, b = (SimpleNamespace(id_rank=rng.permutation(n)) for n in (na, nb))
        for rounds in (1, 2, 4):
            want, taken_a, taken_b = [], set(), set()
            for _ in range(rounds):
                live = [k for k in range(len(cells)) if ia[k] not in taken_a and ib[k] not in taken_b]
                best_a = {i: min((k for k in live if ia[k] == i), key=lambda k: (dist[k], b.id_rank[ib[k]]))
                          for i in {ia[k] for k in live}}
                best_b = {j: min((k for k in live if ib[k] == j), key=lambda k: (dist[k], a.id_rank[ia[k]]))
                          for j in {ib[k] for k in live}}
                pairs = [k for k in live if best_a[ia[k]] == k and best_b[ib[k]] == k]
                want += pairs
                taken_a |= {ia[k] for k in pairs}
                taken_b |= {ib[k] for k in pairs}
            assert lm.mutual_rounds(a, b, c, rounds).tolist() == sorted(want), (case, rounds)


@pytest.mark.parametrize("zone_gate", [False, True])
def test_no_true_pairs_abstains_or_nearly(zone_gate):
    a, b = sides(synth(seed=1, linked=False))
    matches, stats = match_pair(a, b, BANDS, zone_gate=zone_gate)
    assert len(matches) <= 5
    if not matches:
        assert stats["abstained"] and stats["reason"] == "precision_not_reached"
        record = lm.summary_record(dict(stats, period=0))
        assert record["abstained"] and record["matches"] == 0


def test_abstaining_pair_says_what_min_precision_would_match():
    """A target above what weak data supports: no matches, and the summary names the
    best estimated precision; asking for that much returns matches."""
    a, b = sides(synth(seed=5, sigma=1.6))
    none, stats = match_pair(a, b, BANDS, min_precision=0.9)
    best = stats["best"]
    assert not none and stats["abstained"] and best is not None and best["precision"] < 1.0
    record = lm.summary_record(dict(stats, period=0))
    again, stats2 = match_pair(a, b, BANDS,
                                         min_precision=record["min_precision_for_matches"])
    assert len(again) >= best["matches"] and not stats2["abstained"]
    from pipelines.commands import format_match_summary

    text = format_match_summary([record])
    assert "no matches: --min-precision 0.90 is not reached" in text
    assert "--min-precision %.2f would return matches" % record["min_precision_for_matches"] in text


def test_normalize_embeddings_removes_the_camera_bias():
    rng = np.random.default_rng(0)
    ident = rng.random((50, 8)).astype(np.float32)
    cast = np.array([3, 0, 0, 0, 0, 0, 0, 1], np.float32)  # one camera's colour cast
    x = lm.normalize_embeddings(ident + cast, power=False)
    y = lm.normalize_embeddings(ident, power=False)
    assert np.allclose(x, y, atol=1e-5)  # the same crops, with and without the cast
    assert np.allclose(np.linalg.norm(lm.normalize_embeddings(ident), axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError):
        match_pair(*sides(synth(seed=1, span_s=60)), BANDS, normalize="whiten")


def test_q_values_and_best_achievable():
    real = np.array([10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1])
    ctrl = [np.array([8.5, 3.5, 2.5, 1.5]), np.array([6.5, 0.5])]
    thr, R, C = lm.threshold_curve(real, ctrl)
    assert R.tolist() == list(range(1, 11)) and C[2] == 0.5 and C[-1] == 2.5
    q = lm.q_values(np.array([10.0, 8.0, 5.5, 1.0]), real, ctrl)
    fdr = np.clip(C / R, 0, 1)
    assert q.tolist() == pytest.approx([fdr[:].min(), fdr[2:].min(), fdr[5:].min(), fdr[9]])
    best = lm.best_achievable(real, ctrl, 0.0)
    assert best["precision"] == 1.0 and best["matches"] == 2  # ties -> more excess
    assert lm.best_achievable(real, ctrl, 100.0) is None


def test_deterministic_for_a_seed(linked):
    dets, matches, _ = linked
    a, b = sides(dets)
    again, _ = match_pair(a, b, BANDS, min_precision=0.8)
    assert again == matches
    # input order does not matter (sides are sorted by (ts, id))
    perm = np.random.default_rng(3).permutation(len(b["ids"]))
    b2 = {"camera_id": "cam-b", "ids": [b["ids"][i] for i in perm], "ts_ms": b["ts_ms"][perm],
          "emb": b["emb"][perm], "box": b["box"][perm]}
    shuffled, _ = match_pair(a, b2, BANDS, min_precision=0.8)
    assert shuffled == matches


def test_without_boxes_still_works():
    a, b = sides(synth(seed=0))
    a["box"] = b["box"] = None
    matches, stats = match_pair(a, b, BANDS)
    assert stats["reason"] in (None, "precision_not_reached")
    check_one_to_one(matches)


def test_candidates_equal_brute_force():
    """Band-limited enumeration (two bands, one negative; dt == 0 excluded) against a
    dense double loop, with and without a shifted alignment."""
    rng = np.random.default_rng(5)
    n_a, n_b, dim = 150, 170, 8
    a = lm._Side({"ids": ["a%d" % i for i in range(n_a)],
                  "ts_ms": rng.integers(0, 200, n_a) * 500, "emb": rng.normal(size=(n_a, dim))})
    b = lm._Side({"ids": ["b%d" % i for i in range(n_b)],
                  "ts_ms": rng.integers(0, 200, n_b) * 500, "emb": rng.normal(size=(n_b, dim))})
    bands = mb.bands_to_ms([[-6.0, -1.5], [0.0, 4.0]])
    for b_ts in (None, lm._shifted_ts(b.ts, 0, 100_000, 0.375)):
        tb = b.ts if b_ts is None else b_ts
        c = lm.enumerate_candidates(a, b, bands, b_ts, max_chunk=7)
        got = {(int(i), int(j)): (float(d), int(t)) for i, j, d, t in
               zip(c.ia, c.ib, c.dist, c.dt_ms)}
        want = {}
        for i in range(n_a):
            for j in range(n_b):
                dt = int(tb[j] - a.ts[i])
                if dt != 0 and any(lo <= dt <= hi for lo, hi in bands):
                    want[(i, j)] = (float(np.linalg.norm(a.emb[i] - b.emb[j])), dt)
        assert got.keys() == want.keys() and len(got) == len(c)
        for k, (d, dt) in want.items():
            assert got[k][1] == dt and got[k][0] == pytest.approx(d, rel=1e-4, abs=1e-4)
    with pytest.raises(lm.TooManyCandidates):
        lm.enumerate_candidates(a, b, bands, max_candidates=10)


def test_choose_threshold_and_greedy():
    real = np.arange(10, 0, -1, dtype=float)  # greedy-selected real scores
    ctrl = [np.array([9.0, 5.0, 1.0]), np.array([7.0, 6.0, 2.0])]
    # t: R, mean C -> precision: 8: 3, .5 -> .83; 7: 4, 1 -> .75; 3: 8, 2 -> .75;
    # 2: 9, 2.5 -> .72; 1: 10, 3 -> .70
    assert lm.choose_threshold(real, ctrl, 0.75, 0.0) == (3.0, 8, 2.0, 0.75)
    assert lm.choose_threshold(real, ctrl, 0.7, 0.0)[:3] == (1.0, 10, 3.0)
    assert lm.choose_threshold(real, ctrl, 0.8, 0.0)[:3] == (8.0, 3, 0.5)
    # excess 6 at t=3 is under 3 standard errors (3 * sqrt(8 + 2/2) = 9): abstain
    assert lm.choose_threshold(real, ctrl, 0.75, 3.0)[0] is None
    assert lm.choose_threshold(real, ctrl, 0.99, 0.0) == (10.0, 1, 0.0, 1.0)
    assert lm.choose_threshold(np.zeros(0), ctrl, 0.5, 0.0)[0] is None
    s = np.array([0.9, 0.8, 0.7, 0.6])
    ia, ib = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert lm.greedy_one_to_one(s, ia, ib, ia, ib).tolist() == [0, 3]


def test_shift_and_parameter_validation():
    a, b = sides(synth(seed=0, span_s=200))
    with pytest.raises(ValueError):
        match_pair(a, b, BANDS, train_shifts=(0.0, 0.5))
    with pytest.raises(ValueError):
        match_pair(a, b, BANDS, folds=1)
    with pytest.raises(ValueError):
        match_pair(a, b, BANDS, features=("nope",))
    matches, stats = match_pair(a, b, BANDS, max_candidates=5)
    assert matches == [] and stats["reason"] == "too_many_candidates"
    matches, stats = match_pair(a, b, np.array([[500.0, 600.0]]))
    assert matches == [] and stats["reason"] == "no_candidates"


def test_pair_scorer_deterministic_and_learns():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 3)).astype(np.float32)
    y = X[:, 0] + 0.5 * X[:, 1] ** 2 > 0.5
    def fit():
        return PairScorer(hidden=16, epochs=10, max_per_class=1500, batch_size=256).fit(
            X, y, seed=4)

    s1, s2 = fit().score(X), fit().score(X)
    assert np.array_equal(s1, s2)
    ranks = np.argsort(np.argsort(s1)) + 1  # AUC from the rank sum
    auc = (ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum())
    assert auc > 0.95
    assert fit().n_train_ == (1500, 1500)
    with pytest.raises(ValueError):
        PairScorer().fit(X, np.zeros(len(X), bool))


def _shared_pairs(bands_s, span_s, lag_s):
    """Whether two alignments ``lag_s`` apart share a candidate pair: some dt inside a
    band lands inside a band again (brute force on a 0.5 s grid, circular)."""
    dts = np.concatenate([np.arange(lo, hi + 0.25, 0.5) for lo, hi in bands_s])
    moved = (dts - lag_s + span_s / 2) % span_s - span_s / 2
    return any(((lo - 1 <= moved) & (moved <= hi + 1)).any() for lo, hi in bands_s)


def test_shifts_are_placed_where_no_two_alignments_share_a_pair():
    fracs = lm.DEFAULT_TRAIN_SHIFTS + lm.DEFAULT_CONTROL_SHIFTS
    # a long span against a narrow band: the requested shifts, exactly
    assert lm.place_shifts(fracs, np.array([[7000, 23000]]), 1_800_000) == fracs
    # traffic both ways (+-28 s) over 8 minutes: 1/8 of the span (60 s) would map one
    # direction's true pairs onto the other's band; the controls move, the set stays
    # closed under +1/2, and no two alignments (with the real one and the judge's
    # half-span one) share a candidate pair
    bands_s, span_s = [(-34.5, -19.5), (20.5, 35.5)], 481.0
    assert _shared_pairs(bands_s, span_s, span_s / 8)
    placed = lm.place_shifts(fracs, np.array(bands_s) * 1000, int(span_s * 1000))
    assert placed[:2] == lm.DEFAULT_TRAIN_SHIFTS and placed[2:] != lm.DEFAULT_CONTROL_SHIFTS
    spots = [0.0, 0.5] + list(placed)
    for i, p in enumerate(spots):
        for q in spots[i + 1:]:
            assert not _shared_pairs(bands_s, span_s, (p - q) * span_s), (p, q)
    assert {round((f + 0.5) % 1.0, 9) for f in placed} == {round(f, 9) for f in placed}
    # too short for any clear place: None, and the matcher abstains saying why
    assert lm.place_shifts(fracs, np.array([[-40000, -20000], [20000, 40000]]), 200_000) is None
    a, b = sides(synth(seed=0, span_s=200))
    matches, stats = match_pair(a, b, np.array([[-40.0, -20.0], [20.0, 40.0]]))
    assert matches == [] and stats["reason"] == "span_too_short"
