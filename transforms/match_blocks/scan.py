"""Scanning a block's candidate cells (policies ``all`` and ``assignment``), and
splitting blocks that are too large."""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import numpy as np

from transforms.match_blocks.cells import query_chunks, tile_mask
from transforms.match_blocks.kernels import (DEFAULT_Q_TILE, DEFAULT_R_TILE, finish_distances,
                                            prepare_side, raw_distances)
from transforms.match_blocks.sides import Side, id_ranks

__all__ = ["ChunkResult", "scan_block", "ranks_within_groups", "split_block"]


class ChunkResult(NamedTuple):
    """Kept (query, reference) cells of one query chunk, sorted by (qi, distance, r id).

    ``qi``/``rj`` index the block's query/reference Sides; ``rank`` is the 1-based rank
    of ``rj`` among all of ``qi``'s candidates; ``n_candidates`` counts every candidate
    cell of the chunk (before threshold / top-k); ``n_cells`` the distances computed.
    """
    qi: np.ndarray
    rj: np.ndarray
    dist: np.ndarray
    rank: np.ndarray
    n_candidates: int
    n_cells: int


def scan_block(q: Side, r: Side, intervals: np.ndarray, metric: str, threshold=None,
               keep_k: Optional[int] = None, q_tile: int = DEFAULT_Q_TILE,
               r_tile: int = DEFAULT_R_TILE) -> Iterator[ChunkResult]:
    """Candidate cells with distance <= threshold, query chunk by query chunk.

    With ``keep_k``, only each query's ``keep_k`` first cells in (distance, id) order
    are kept (ranks are still ranks among all its candidates). The chunks and cells are
    those of :func:`~transforms.match_blocks.cells.query_chunks`: memory is bounded by
    ``q_tile x r_tile`` cells plus what is kept.
    """
    nq, nr = len(q), len(r)
    if nq == 0 or nr == 0 or len(intervals) == 0:
        return
    thr = None if threshold is None else np.float32(threshold)
    r_rank = id_ranks(r.ids)
    qp, rp = prepare_side(q.emb, metric, "q"), prepare_side(r.emb, metric, "r")
    size = min(q_tile, nq) * min(r_tile, nr)
    buf, work = np.empty(size, np.float32), np.empty(size, np.float32)
    for chunk in query_chunks(q.ts, r.ts, intervals, q_tile, r_tile):
        i0, i1 = chunk.i0, chunk.i1
        parts_q, parts_r, parts_d = [], [], []
        n_cand, n_cells = chunk.n_candidates, 0
        for tile in chunk.tiles:
            jj0 = tile.j0
            mask = tile_mask(tile)
            n_cells += mask.size
            d = finish_distances(raw_distances(qp.rows(i0, i1), rp.rows(jj0, tile.j1), metric,
                                               buf, work), metric)
            keep = mask & (np.isfinite(d) if thr is None else (d <= thr))
            if keep_k is not None and keep.shape[1] > keep_k:
                dm = np.where(keep, d, np.float32(np.inf))
                kth = np.partition(dm, keep_k - 1, axis=1)[:, keep_k - 1]
                keep &= dm <= kth[:, None]
            qi, rj = np.nonzero(keep)
            parts_q.append(qi + i0)
            parts_r.append(rj + jj0)
            parts_d.append(d[qi, rj])
        qi = np.concatenate(parts_q)
        rj = np.concatenate(parts_r)
        dist = np.concatenate(parts_d)
        order = np.lexsort((r_rank[rj], dist, qi))
        qi, rj, dist = qi[order], rj[order], dist[order]
        rank = ranks_within_groups(qi)
        if keep_k is not None:
            sel = rank <= keep_k
            qi, rj, dist, rank = qi[sel], rj[sel], dist[sel], rank[sel]
        yield ChunkResult(qi, rj, dist, rank, n_cand, n_cells)


def ranks_within_groups(sorted_keys: np.ndarray) -> np.ndarray:
    """1-based position of each element within its run of equal keys."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    start_idx = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - start_idx + 1


def split_block(q: Side, r: Side, intervals: np.ndarray, max_cells: int) -> list:
    """Splits a block whose ``len(q) * len(r)`` exceeds ``max_cells`` into sub-blocks.

    Each sub-block is a consecutive (time-ordered) chunk of ``max(1, max_cells //
    len(r))`` queries with the references in the time range its queries can reach.
    Returns ``[(q, r)]`` unchanged when the block is small enough. Nothing is dropped:
    every candidate cell of the block is in exactly one sub-block.
    """
    nq, nr = len(q), len(r)
    if nq * nr <= max_cells or nq <= 1 or len(intervals) == 0:
        return [(q, r)]
    size = max(1, int(max_cells) // max(nr, 1))
    lo_all, hi_all = int(intervals[:, 0].min()), int(intervals[:, 1].max())
    out = []
    for i0 in range(0, nq, size):
        i1 = min(nq, i0 + size)
        j0 = int(np.searchsorted(r.ts, q.ts[i0] + lo_all, side="left"))
        j1 = int(np.searchsorted(r.ts, q.ts[i1 - 1] + hi_all, side="right"))
        out.append((q.take(slice(i0, i1)), r.take(slice(j0, j1))))
    return out
