"""Nearest neighbours of both sides of a block from one pass over its distances
(policies ``topk`` and ``mutual``), and their merge over blocks."""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional, Sequence

import numpy as np

from transforms.match_blocks.bands import dt_intervals
from transforms.match_blocks.cells import mask_outside, query_chunks
from transforms.match_blocks.kernels import (DEFAULT_Q_TILE, DEFAULT_R_TILE, Workspace,
                                            exact_distances, finite_block, prepare_side,
                                            raw_distances, tile_buffer)
from transforms.match_blocks.records import make_match
from transforms.match_blocks.bounds import line_slack, row_sizes
from transforms.match_blocks.scan import ranks_within_groups
from transforms.match_blocks.sides import Side, id_ranks
from transforms.match_blocks.wire import decode_ids, encode_ids, pad8

__all__ = ["Neighbours", "neighbour_block", "Partial", "encode_partial", "decode_partial",
           "neighbour_outputs", "merge_partials"]


_F32_MAX = np.float32(np.finfo(np.float32).max)
# How far above a line's k-th smallest tile value a cell's tile value may be and still
# be among the first k once recomputed exactly: the same cell's float32 value differs
# with the tile it is computed in (by ~sqrt(D) ulps of |q| |r|), and l2 tile values are
# squared distances (a relative margin), cosine ones distances in [0, 2] (absolute).
_SQ_MARGIN = np.float32(1e-3)
_COS_MARGIN = np.float32(1e-4)


def _widen(bound: np.ndarray, metric: str, slack: np.ndarray) -> np.ndarray:
    """``bound`` (k-th smallest tile values, float32) -> the largest tile value that can
    still be among the first k, in place; lines of +inf only select nothing. ``slack``:
    the lines' bounds on a tile value's error (:mod:`.bounds`), added twice."""
    if metric == "l2":
        np.maximum(bound, np.float32(0.0), out=bound)
        bound *= np.float32(1.0) + _SQ_MARGIN
    else:
        bound += _COS_MARGIN
    bound += np.float32(2.0) * slack
    return np.minimum(bound, _F32_MAX, out=bound)


def _near_cells(x: np.ndarray, k: int, axis: int, metric: str, slack: np.ndarray,
                mask_buf: Optional[np.ndarray] = None):
    """(rows, cols) of cells of the :func:`raw_distances` tile ``x`` that can be among
    their row's (axis=1) or column's (axis=0) first ``k`` finite cells in (distance, id)
    order once recomputed exactly (:func:`_widen`; ``slack``: per line of the axis).
    Masked cells are +inf and never returned."""
    if x.size == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    if k == 1:
        bound = x.min(axis=axis)
    elif x.shape[axis] <= k:
        bound = np.full(x.shape[1 - axis], np.inf, dtype=np.float32)
    else:
        bound = np.partition(x, k - 1, axis=axis).take(k - 1, axis=axis)
    _widen(bound, metric, slack)
    sel = tile_buffer(mask_buf, x.shape[0], x.shape[1], bool)
    np.less_equal(x, bound[:, None] if axis == 1 else bound[None, :], out=sel)
    return np.divmod(np.flatnonzero(sel), x.shape[1])


def _near_in_groups(groups: np.ndarray, values: np.ndarray, k: int, metric: str,
                    slack: np.ndarray) -> np.ndarray:
    """Positions of the cells (tile values ``values``, one line each in ``groups``,
    gathered over several tiles) that can be among their line's first ``k`` once
    recomputed exactly: the cross-tile counterpart of :func:`_near_cells` (``slack``:
    indexed by group)."""
    order = np.lexsort((values, groups))
    g, v = groups[order], values[order]
    rank = ranks_within_groups(g)
    starts = np.flatnonzero(rank == 1)
    counts = np.diff(np.r_[starts, len(g)])
    kth = np.full(len(starts), np.inf, np.float32)
    full = counts >= k
    kth[full] = v[starts[full] + k - 1]
    bound = np.repeat(_widen(kth, metric, slack[g[starts]]), counts)
    return np.sort(order[v <= bound])


def _first_k(groups: np.ndarray, others: np.ndarray, dist: np.ndarray, other_rank: np.ndarray,
             k: int):
    """Sorts cells by (group, distance, other id) and keeps each group's first k.

    Returns (positions into the inputs, 1-based ranks)."""
    order = np.lexsort((other_rank[others], dist, groups))
    rank = ranks_within_groups(groups[order])
    keep = rank <= k
    return order[keep], rank[keep]


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> tuple:
    """(found, value) of each query key in ``keys`` (unique int64); value 0 where absent."""
    if len(keys) == 0 or len(queries) == 0:
        return np.zeros(len(queries), bool), np.zeros(len(queries), np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    pos = np.minimum(np.searchsorted(sk, queries), len(sk) - 1)
    found = sk[pos] == queries
    return found, np.where(found, values[order][pos], 0)


class Neighbours(NamedTuple):
    """The nearest-neighbour cells of one block (indices into its query/reference Sides).

    Eligible cells: candidates with a finite distance <= threshold. ``row_*``: each
    query's first ``k`` eligible cells in (distance, reference id) order, sorted by
    (qi, distance, id); ``row_rank``: their 1-based ranks, which are the ranks among all
    of the query's candidates in the reference camera (a block holds all of them: the
    references are every detection in its queries' reach). ``col_*``: each reference's
    first ``k`` eligible cells *within this block* in (distance, query id) order, sorted
    by (rj, distance, id), partial over the query camera (other blocks hold the
    reference's other candidates); ``col_rank_q``: the query's ``row_rank`` of the cell
    where the query selected it, else 0. ``row_in_cols``: whether each row cell is one of
    the col cells. ``n_candidates``: candidate cells; ``n_cells``: distances computed.
    """
    row_q: np.ndarray
    row_r: np.ndarray
    row_dist: np.ndarray
    row_rank: np.ndarray
    row_in_cols: np.ndarray
    col_q: np.ndarray
    col_r: np.ndarray
    col_dist: np.ndarray
    col_rank_q: np.ndarray
    n_candidates: int
    n_cells: int


def _empty_neighbours(n_candidates: int = 0, n_cells: int = 0) -> Neighbours:
    i = np.zeros(0, np.int64)
    return Neighbours(i, i, np.zeros(0, np.float32), i, np.zeros(0, bool), i, i,
                      np.zeros(0, np.float32), i, n_candidates, n_cells)


def neighbour_block(q: Side, r: Side, intervals: np.ndarray, metric: str, threshold=None,
                    k: int = 1, q_tile: int = DEFAULT_Q_TILE, r_tile: int = DEFAULT_R_TILE,
                    workspace: Optional[Workspace] = None) -> Neighbours:
    """Both directions of nearest neighbours from one pass over a block's distances.

    The cells are the tiles of :func:`~transforms.match_blocks.cells.query_chunks`
    (at most ``q_tile x r_tile`` at a time, in buffers of ``workspace`` when given);
    a line's cells within its k-th smallest tile value plus the tiles' error bound
    (:mod:`.bounds`) are recomputed exactly.
    Rows give each query's first ``k`` (final: the block holds all its candidates);
    columns give each reference's first ``k`` among this block's queries (partial:
    merge them over the blocks with :func:`merge_partials`). The first ``k`` of a
    reference over all blocks are among the union of its per-block first ``k``, with
    the same order, so the merge gives its exact ranks.
    """
    nq, nr = len(q), len(r)
    iv = dt_intervals(intervals)
    if nq == 0 or nr == 0 or len(iv) == 0:
        return _empty_neighbours()
    thr = None if threshold is None else np.float32(threshold)
    inf = np.float32(np.inf)
    q_rank, r_rank = id_ranks(q.ids), id_ranks(r.ids)
    ws = Workspace() if workspace is None else workspace
    qp, rp = prepare_side(q.emb, metric, "q", ws), prepare_side(r.emb, metric, "r", ws)
    size = min(q_tile, nq) * min(r_tile, nr)
    buf, work = ws.get("tile", (size,)), ws.get("tile_work", (size,))
    mask_buf = ws.get("tile_mask", (size,), bool)
    finite = finite_block(qp, rp, metric)
    row_slack, col_slack = line_slack(
        row_sizes(qp.emb, qp.norms, 2.0 if metric == "l2" else 1.0),
        row_sizes(rp.emb, rp.norms), qp.norms, rp.norms, q.emb.shape[1])
    rows_q, rows_r, rows_d, rows_rank = [], [], [], []
    cols_q, cols_r, cols_x = [], [], []
    n_cand = n_cells = 0

    def exact(qi, rj, x, by_row=True):
        """The cells that can be among their line's first k, with exact distances
        <= the threshold (eligible cells are a prefix of each line's order)."""
        near = _near_in_groups(qi if by_row else rj, x, k, metric,
                               row_slack if by_row else col_slack)
        qi, rj = qi[near], rj[near]
        dv = exact_distances(q.emb, r.emb, metric, qi, rj)
        if thr is not None:
            ok = dv <= thr
            qi, rj, dv = qi[ok], rj[ok], dv[ok]
        return qi, rj, dv

    for chunk in query_chunks(q.ts, r.ts, iv, q_tile, r_tile):
        i0, i1 = chunk.i0, chunk.i1
        n_cand += chunk.n_candidates
        tq, tr, tx = [], [], []
        for tile in chunk.tiles:
            jj0 = tile.j0
            x = raw_distances(qp.rows(i0, i1), rp.rows(jj0, tile.j1), metric, buf, work)
            n_cells += x.size
            if not finite and not np.isfinite(x.max()):  # NaN/inf: never a match
                x[~np.isfinite(x)] = inf
            mask_outside(x, tile)
            for axis, (aq, ar, ax) in ((1, (tq, tr, tx)), (0, (cols_q, cols_r, cols_x))):
                slack = row_slack[i0:i1] if axis == 1 else col_slack[jj0:tile.j1]
                ri, cj = _near_cells(x, k, axis, metric, slack, mask_buf)
                aq.append(ri + i0)
                ar.append(cj + jj0)
                ax.append(x[ri, cj])
        if tq:
            qi, rj, dv = exact(np.concatenate(tq), np.concatenate(tr), np.concatenate(tx))
            pos, rank = _first_k(qi, rj, dv, r_rank, k)
            rows_q.append(qi[pos])
            rows_r.append(rj[pos])
            rows_d.append(dv[pos])
            rows_rank.append(rank)
    if not rows_q:
        return _empty_neighbours(n_cand, n_cells)
    row_q, row_r = np.concatenate(rows_q).astype(np.int64), np.concatenate(rows_r).astype(np.int64)
    row_d, row_rank = np.concatenate(rows_d), np.concatenate(rows_rank).astype(np.int64)
    cq, cr, cd = exact(np.concatenate(cols_q), np.concatenate(cols_r),
                       np.concatenate(cols_x), by_row=False)
    pos, _ = _first_k(cr, cq, cd, q_rank, k)
    col_q, col_r, col_d = cq[pos].astype(np.int64), cr[pos].astype(np.int64), cd[pos]
    row_keys, col_keys = row_q * nr + row_r, col_q * nr + col_r
    _, col_rank_q = _lookup(row_keys, row_rank, col_keys)
    row_in_cols, _ = _lookup(col_keys, np.zeros(len(col_keys), np.int64), row_keys)
    return Neighbours(row_q, row_r, row_d, row_rank, row_in_cols, col_q, col_r, col_d,
                      col_rank_q, n_cand, n_cells)


class Partial(NamedTuple):
    """Candidates of camera-B detections found in one block (see :func:`merge_partials`).

    Parallel arrays, one entry per (B detection, A detection) cell: ``rank_a`` is the
    A detection's rank of the cell where it selected the B detection, else 0.
    """
    ids_b: np.ndarray
    ts_b: np.ndarray
    ids_a: np.ndarray
    ts_a: np.ndarray
    dist: np.ndarray
    rank_a: np.ndarray

    def __len__(self):
        return len(self.ids_b)

    def take(self, sel) -> "Partial":
        return Partial(*(a[sel] for a in self))


_PARTIAL_HEADER = struct.Struct("<4sq")  # magic, rows
_PARTIAL_MAGIC = b"CVP1"


def encode_partial(part: Partial) -> bytes:
    """A :class:`Partial` as bytes (ids as UTF-8, not as numpy's 4 bytes a character);
    :func:`decode_partial` inverts it."""
    n = len(part.ids_b)
    lens_b, blob_b = encode_ids(part.ids_b)
    lens_a, blob_a = encode_ids(part.ids_a)
    numbers = [np.asarray(a, dtype=t).tobytes() for a, t in (
        (part.ts_b, "<i8"), (part.ts_a, "<i8"), (part.rank_a, "<i8"), (part.dist, "<f4"))]
    return b"".join([_PARTIAL_HEADER.pack(_PARTIAL_MAGIC, n), lens_b, lens_a, *numbers,
                     b"\0" * pad8(4 * n), blob_b, blob_a])


def decode_partial(data: bytes) -> Partial:
    """:func:`encode_partial`'s bytes -> the Partial (numbers as views of ``data``)."""
    magic, n = _PARTIAL_HEADER.unpack_from(data, 0)
    if magic != _PARTIAL_MAGIC:
        raise ValueError("not an encoded Partial")
    off = _PARTIAL_HEADER.size
    lens_b, lens_a, off = off, off + 8 * n, off + 16 * n
    ts_b, ts_a, rank_a = (np.frombuffer(data, dtype="<i8", count=n, offset=off + 8 * n * k)
                          for k in range(3))
    dist = np.frombuffer(data, dtype="<f4", count=n, offset=off + 24 * n)
    off += 28 * n + pad8(4 * n)
    ids_b, off = decode_ids(data, off, n, lens_b)
    ids_a, _ = decode_ids(data, off, n, lens_a)
    return Partial(ids_b, ts_b.astype(np.int64, copy=False), ids_a,
                   ts_a.astype(np.int64, copy=False), dist, rank_a.astype(np.int64, copy=False))


def neighbour_outputs(q: Side, r: Side, nb: Neighbours, policy: str, window_ms: int):
    """A block's :class:`Neighbours` (``q`` = camera A, ``r`` = camera B, A < B) ->
    ``(matches, partial)``.

    ``matches``: Match dicts that are final here: for ``topk``, the cells an A detection
    selected that are not among their B detection's first ``top_k`` in this block (so
    not in its first ``top_k`` over all blocks: ``rank_b`` None); none for ``mutual``.
    ``partial``: the B detections' per-block first cells, for :func:`merge_partials`.
    """
    matches = []
    if policy == "topk":
        sel = np.nonzero(~nb.row_in_cols)[0]
        for i, j, d, k in zip(nb.row_q[sel].tolist(), nb.row_r[sel].tolist(),
                              nb.row_dist[sel].tolist(), nb.row_rank[sel].tolist()):
            matches.append(make_match(q.ids[i], r.ids[j], q.camera_id, r.camera_id, q.ts[i],
                                      r.ts[j], d, policy, k, None, window_ms))
    partial = Partial(r.ids[nb.col_r], r.ts[nb.col_r], q.ids[nb.col_q], q.ts[nb.col_q],
                      nb.col_dist.astype(np.float32, copy=False), nb.col_rank_q)
    return matches, partial


def merge_partials(cam_a: str, cam_b: str, partials: Sequence[Partial], policy: str,
                   top_k: int, window_ms: int) -> list:
    """Merges the per-block partials of camera-B detections (each B detection's cells
    from every block that holds it) into Match dicts.

    Each B detection's first ``k`` (``k = 1`` for ``mutual``) over the union, in
    (distance, detection_id_a) order, are its selections with their exact ranks.
    ``topk``: a cell is output if B selected it or A did (``rank_a > 0``); ``mutual``:
    if both did.
    """
    partials = [p for p in partials if len(p)]
    if not partials:
        return []
    p = partials[0] if len(partials) == 1 else Partial(
        *(np.concatenate(cols) for cols in zip(*partials)))
    k = 1 if policy == "mutual" else int(top_k)
    order = np.lexsort((p.ids_a, p.dist, p.ids_b))
    p = p.take(order)
    rank_b = ranks_within_groups(p.ids_b)
    chosen_b = rank_b <= k
    if policy == "mutual":
        out = chosen_b & (p.rank_a == 1)
    else:
        out = chosen_b | (p.rank_a > 0)
    sel = np.nonzero(out)[0]
    matches = []
    for i, ra, rb, cb in zip(sel.tolist(), p.rank_a[sel].tolist(), rank_b[sel].tolist(),
                             chosen_b[sel].tolist()):
        matches.append(make_match(p.ids_a[i], p.ids_b[i], cam_a, cam_b, p.ts_a[i], p.ts_b[i],
                                  p.dist[i], policy, ra if ra > 0 else None,
                                  rb if cb else None, window_ms))
    return matches
