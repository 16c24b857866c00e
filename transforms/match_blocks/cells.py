"""The one candidate enumerator: which (query, reference) cells are candidates, tile by
tile, for every policy, learned matching, calibration and backfill.

Both sides are sorted by time. Queries are taken in chunks of at most ``q_tile`` rows
that span less than half the narrowest candidate interval, so the references a chunk
can reach are at most ~1.5x its candidates whatever the bands (wide ``max_gap`` bands
or narrow link bands). A chunk's reference columns are the union of its intervals'
reaches (disjoint bands, e.g. the two directions of traffic, leave the gap between them
out), cut into tiles of at most ``r_tile`` contiguous columns. Each tile carries, per
query row and interval, the half-open column range of its candidates.

Memory: O(rows x intervals) per chunk; the cells themselves are never materialised
unless :func:`tile_mask` is asked for one tile.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from transforms.match_blocks.bands import dt_intervals

__all__ = ["Tile", "QueryChunk", "query_chunks", "tile_mask", "mask_outside"]


class Tile(NamedTuple):
    """Reference columns ``[j0, j1)`` of one query chunk; ``starts``/``ends``:
    (intervals, rows) candidate column ranges of each query row, relative to ``j0``
    (``starts == ends``: none in this tile)."""
    j0: int
    j1: int
    starts: np.ndarray
    ends: np.ndarray


class QueryChunk(NamedTuple):
    """Query rows ``[i0, i1)``, their candidate count and the tiles that hold them."""
    i0: int
    i1: int
    n_candidates: int
    tiles: list


def _chunk_ends(q_ts: np.ndarray, span_ms: int, max_rows: int) -> Iterator[tuple]:
    n, i0 = len(q_ts), 0
    while i0 < n:
        i1 = int(np.searchsorted(q_ts, q_ts[i0] + span_ms, "left"))
        i1 = min(max(i1, i0 + 1), i0 + max_rows, n)
        yield i0, i1
        i0 = i1


def _merged(ranges: list) -> list:
    out: list = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def query_chunks(q_ts: np.ndarray, r_ts: np.ndarray, intervals: np.ndarray,
                 q_tile: int, r_tile: int) -> Iterator[QueryChunk]:
    """The candidate cells ``r_ts[j] - q_ts[i]`` in ``intervals`` (inclusive ms, never 0),
    chunk by chunk of queries (both time arrays sorted). Chunks without candidates are
    skipped."""
    iv = dt_intervals(intervals)
    if len(q_ts) == 0 or len(r_ts) == 0 or len(iv) == 0:
        return
    span = max(int((iv[:, 1] - iv[:, 0]).min()) // 2, 1)
    for i0, i1 in _chunk_ends(q_ts, span, q_tile):
        qt = q_ts[i0:i1]
        starts = np.searchsorted(r_ts, qt[None, :] + iv[:, :1], side="left")
        ends = np.searchsorted(r_ts, qt[None, :] + iv[:, 1:], side="right")
        n_cand = int((ends - starts).sum())
        if n_cand == 0:
            continue
        tiles = []
        for a, b in _merged([(int(s.min()), int(e.max())) for s, e in zip(starts, ends)]):
            for j0 in range(a, b, r_tile):
                j1 = min(b, j0 + r_tile)
                s_t, e_t = np.clip(starts, j0, j1) - j0, np.clip(ends, j0, j1) - j0
                if (e_t > s_t).any():
                    tiles.append(Tile(j0, j1, s_t, e_t))
        yield QueryChunk(i0, i1, n_cand, tiles)


def tile_mask(tile: Tile) -> np.ndarray:
    """(rows, j1 - j0) bool: the tile's candidate cells."""
    cols = np.arange(tile.j1 - tile.j0)
    mask = np.zeros((tile.starts.shape[1], len(cols)), bool)
    for s, e in zip(tile.starts, tile.ends):
        mask |= (cols[None, :] >= s[:, None]) & (cols[None, :] < e[:, None])
    return mask


def mask_outside(d: np.ndarray, tile: Tile) -> None:
    """Sets every cell of the distance tile ``d`` that is not a candidate to +inf.

    A row's candidate ranges are in interval order and do not overlap (intervals are
    sorted and disjoint, references sorted by time), so its other cells are the gaps
    before, between and after them: a few slice writes per row, no (rows x columns)
    mask (the mask costs as much as the distances' add and subtract passes)."""
    inf = np.float32(np.inf)
    width = d.shape[1]
    starts, ends = tile.starts.T.tolist(), tile.ends.T.tolist()
    for i, (row_starts, row_ends) in enumerate(zip(starts, ends)):
        line, done = d[i], 0
        for a, b in zip(row_starts, row_ends):
            if b <= a:
                continue
            if a > done:
                line[done:a] = inf
            done = b
        if done < width:
            line[done:] = inf
