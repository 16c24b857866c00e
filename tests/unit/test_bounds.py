"""The error bound of float32 distance tiles (transforms/match_blocks/bounds.py): with
it, nearest neighbours are those of the exact distances even for nearly equal
embeddings, whose tile values are mostly rounding."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms import match_blocks as mb
from transforms.match_blocks import bounds


def _side(cam, ts, emb, metric):
    return mb.make_side(cam, ["%s%d" % (cam, i) for i in range(len(ts))], ts, emb, metric)


def _firsts(lines, others, dist, other_ids, k):
    """{(line, other): distance} of each line's first k cells in (distance, id) order."""
    out, count = {}, {}
    for n in sorted(range(len(lines)), key=lambda n: (lines[n], dist[n], other_ids[others[n]])):
        count[lines[n]] = count.get(lines[n], 0) + 1
        if count[lines[n]] <= k:
            out[(int(lines[n]), int(others[n]))] = float(dist[n])
    return out


def _brute(q, r, iv, metric, threshold, k):
    """Rows' and columns' first k over every candidate, each distance computed exactly."""
    qi, rj = np.nonzero(mb.candidate_mask(q.ts, r.ts, iv))
    d = mb.exact_distances(q.emb, r.emb, metric, qi, rj)
    ok = np.isfinite(d) & (True if threshold is None else d <= np.float32(threshold))
    qi, rj, d = qi[ok], rj[ok], d[ok]
    rows = _firsts(qi, rj, d, r.ids, k)
    cols = {(a, b): v for (b, a), v in _firsts(rj, qi, d, q.ids, k).items()}
    return rows, cols


@st.composite
def near_ties(draw):
    """Real-valued embeddings, many near ties: a few centres, each row a centre plus
    noise (``scale``) down to far below what float32 tile values resolve, centres
    positive or signed."""
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    nq, nr = draw(st.integers(1, 60)), draw(st.integers(1, 90))
    dim = draw(st.sampled_from([3, 8, 64, 300]))
    centres = rng.normal(size=(draw(st.integers(1, 4)), dim)) * draw(st.sampled_from([1, 30]))
    if draw(st.booleans()):
        centres = np.abs(centres)  # like post-ReLU features: products far from zero
    scale = draw(st.sampled_from([1e-6, 1e-4, 1e-2, 1.0]))

    def rows(n):
        return (centres[rng.integers(len(centres), size=n)]
                + rng.normal(size=(n, dim)) * scale).astype(np.float32)

    span = draw(st.integers(1_000, 120_000))
    q_ts = np.sort(rng.integers(0, span, nq))
    r_ts = np.sort(rng.integers(0, span, nr))
    metric = draw(st.sampled_from(["l2", "cosine"]))
    return rows(nq), q_ts, rows(nr), r_ts, metric


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=near_ties(), k=st.integers(1, 3), max_gap_s=st.sampled_from([5, 40, 200]),
       tiles=st.sampled_from([(mb.DEFAULT_Q_TILE, mb.DEFAULT_R_TILE), (7, 16), (1, 3)]),
       threshold=st.one_of(st.none(), st.floats(0.01, 50)))
def test_neighbours_are_those_of_the_exact_distances(data, k, max_gap_s, tiles, threshold):
    """Near ties included: each line's first k are those of the exact distances."""
    q_emb, q_ts, r_emb, r_ts, metric = data
    q, r = _side("a", q_ts, q_emb, metric), _side("b", r_ts, r_emb, metric)
    iv = mb.CandidateBands(max_gap_s).intervals("a", "b")
    rows, cols = _brute(q, r, iv, metric, threshold, k)
    nb = mb.neighbour_block(q, r, iv, metric, threshold, k, *tiles)
    assert {(int(i), int(j)): float(d) for i, j, d in zip(nb.row_q, nb.row_r, nb.row_dist)} == rows
    assert {(int(i), int(j)): float(d) for i, j, d in zip(nb.col_q, nb.col_r, nb.col_dist)} == cols


def test_nearly_equal_embeddings_in_their_exact_order():
    """The case that showed the relative margin alone fails: three rows a millionth
    apart, whose float32 tile values put the farther reference first."""
    q_emb = np.asarray([[0.12573059, -0.13210356, 0.6404236]], np.float32)
    r_emb = np.asarray([[0.12572952, -0.13210613, 0.64042205],
                        [0.12573026, -0.13210718, 0.6404224]], np.float32)
    q, r = _side("a", [75], q_emb, "l2"), _side("b", [16, 175], r_emb, "l2")
    iv = mb.CandidateBands(5).intervals("a", "b")
    rows, _ = _brute(q, r, iv, "l2", None, 1)
    x = mb.raw_distances(mb.prepare_side(q.emb, "l2", "q"), mb.prepare_side(r.emb, "l2", "r"),
                         "l2")
    assert int(np.argmin(x[0])) != next(iter(rows))[1]  # the tile alone misorders them
    nb = mb.neighbour_block(q, r, iv, "l2", None, 1)
    assert {(int(i), int(j)) for i, j in zip(nb.row_q, nb.row_r)} == set(rows)


def test_the_slack_bounds_every_tile_value():
    """Each float32 tile value is within its row's and its column's slack of the exact
    value; the bound is not vacuous (within a few orders of the largest error)."""
    rng = np.random.default_rng(0)
    for metric in ("l2", "cosine"):
        q = np.abs(rng.normal(size=(200, 1920))).astype(np.float32)
        r = (q[rng.integers(200, size=300)] + rng.normal(size=(300, 1920)) * 1e-4)
        q, r = mb.prepare_embeddings(q, metric), mb.prepare_embeddings(r.astype(np.float32), metric)
        qp, rp = mb.prepare_side(q, metric, "q"), mb.prepare_side(r, metric, "r")
        sizes = (bounds.row_sizes(qp.emb, qp.norms, 2.0 if metric == "l2" else 1.0),
                 bounds.row_sizes(rp.emb, rp.norms))
        assert np.allclose(sizes[0], np.linalg.norm(qp.emb.astype(np.float64), axis=1),
                           rtol=2e-3)
        rows, cols = bounds.line_slack(*sizes, qp.norms, rp.norms, 1920)
        x = mb.raw_distances(qp, rp, metric)
        q64, r64 = q.astype(np.float64), r.astype(np.float64)
        if metric == "l2":
            exact = (q64 ** 2).sum(1)[:, None] + (r64 ** 2).sum(1)[None, :] - 2 * q64 @ r64.T
        else:
            exact = np.clip(1 - q64 @ r64.T, 0, 2)
        err = np.abs(x - exact)
        assert (err <= rows[:, None]).all() and (err <= cols[None, :]).all(), metric
        assert err.max() > 1e-3 * rows.min(), metric


def test_rows_of_nan_or_inf_get_no_slack_and_leave_the_others_theirs():
    emb = np.asarray([[1.0, 2.0], [np.nan, 0.0], [np.inf, 1.0]], np.float32)
    rows, cols = bounds.line_slack(bounds.row_sizes(emb), bounds.row_sizes(emb[:1]),
                                   None, None, 2)
    assert rows[0] > 0 and rows[1] == rows[2] == 0 and np.isfinite(cols).all() and cols[0] > 0
