"""One-to-one assignment of a block's allowed cells, and the ``all``/``assignment``
block runner."""
from __future__ import annotations

import numpy as np

from transforms.match_blocks.kernels import DEFAULT_Q_TILE, DEFAULT_R_TILE
from transforms.match_blocks.records import make_match
from transforms.match_blocks.scan import ChunkResult, scan_block
from transforms.match_blocks.sides import Side

__all__ = ["assign_cells", "block_matches", "block_outputs"]


def assign_cells(q: Side, r: Side, qi: np.ndarray, rj: np.ndarray, dist: np.ndarray):
    """One-to-one assignment over the allowed cells ``(qi, rj, dist)``.

    Maximises the number of pairs, then minimises their total distance, per connected
    component of the allowed graph, rows/columns in detection-id order. Returns the
    positions (into the given arrays) of the assigned cells, sorted.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(qi)
    if n == 0:
        return np.zeros(0, np.int64)
    rows, row_inv = np.unique(qi, return_inverse=True)
    cols, col_inv = np.unique(rj, return_inverse=True)
    nr_, nc_ = len(rows), len(cols)
    graph = coo_matrix((np.ones(n, np.int8), (row_inv, nr_ + col_inv)),
                       shape=(nr_ + nc_, nr_ + nc_))
    _, labels = connected_components(graph, directed=False)
    cell_comp = labels[row_inv]
    order = np.argsort(cell_comp, kind="stable")
    bounds = np.r_[0, np.nonzero(np.diff(cell_comp[order]))[0] + 1, n]
    chosen = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        cells = order[s:e]
        if len(cells) == 1:
            chosen.append(cells[0])
            continue
        c_rows = np.unique(row_inv[cells])
        c_cols = np.unique(col_inv[cells])
        # detection-id order for rows and columns: deterministic tie resolution
        c_rows = c_rows[np.argsort(q.ids[rows[c_rows]], kind="stable")]
        c_cols = c_cols[np.argsort(r.ids[cols[c_cols]], kind="stable")]
        rpos = np.empty(nr_, np.int64)
        rpos[c_rows] = np.arange(len(c_rows))
        cpos = np.empty(nc_, np.int64)
        cpos[c_cols] = np.arange(len(c_cols))
        d = dist[cells].astype(np.float64)
        big = (float(d.max()) + 1.0) * (min(len(c_rows), len(c_cols)) + 1)
        cost = np.full((len(c_rows), len(c_cols)), big, dtype=np.float64)
        cell_at = np.full(cost.shape, -1, dtype=np.int64 if n >= 2 ** 31 else np.int32)
        cost[rpos[row_inv[cells]], cpos[col_inv[cells]]] = d
        cell_at[rpos[row_inv[cells]], cpos[col_inv[cells]]] = cells
        ri, ci = linear_sum_assignment(cost)
        picked = cell_at[ri, ci]
        chosen.extend(picked[picked >= 0].tolist())
    return np.sort(np.asarray(chosen, dtype=np.int64))


def block_matches(q: Side, r: Side, intervals: np.ndarray, policy: str, metric: str,
                  threshold=None, top_k: int = 1, q_tile: int = DEFAULT_Q_TILE,
                  r_tile: int = DEFAULT_R_TILE):
    """Runs one ``all`` or ``assignment`` block (queries of camera Q < references of R).

    Yields ``(qi, rj, dist, rank, n_candidates, n_cells)`` chunks (numpy arrays):
    ``all``: every kept cell; ``assignment``: the assigned cells (one chunk).
    ``topk``/``mutual`` blocks go through :func:`neighbour_block` instead.
    """
    if policy == "all":
        yield from scan_block(q, r, intervals, metric, threshold, q_tile=q_tile, r_tile=r_tile)
    elif policy == "assignment":
        chunks = list(scan_block(q, r, intervals, metric, threshold, q_tile=q_tile,
                                 r_tile=r_tile))
        if not chunks:
            return
        qi = np.concatenate([c.qi for c in chunks])
        rj = np.concatenate([c.rj for c in chunks])
        dist = np.concatenate([c.dist for c in chunks])
        rank = np.concatenate([c.rank for c in chunks])
        pick = assign_cells(q, r, qi, rj, dist)
        yield ChunkResult(qi[pick], rj[pick], dist[pick], rank[pick],
                          sum(c.n_candidates for c in chunks), sum(c.n_cells for c in chunks))
    else:
        raise ValueError("block_matches runs all/assignment blocks, not %r" % (policy,))

def block_outputs(q: Side, r: Side, chunk: ChunkResult, policy: str, window_ms: int):
    """Turns an ``all``/``assignment`` block chunk (``q.camera_id < r.camera_id``) into
    Match dicts."""
    for i, j, d, k in zip(chunk.qi.tolist(), chunk.rj.tolist(), chunk.dist.tolist(),
                          chunk.rank.tolist()):
        yield make_match(q.ids[i], r.ids[j], q.camera_id, r.camera_id, q.ts[i], r.ts[j],
                         d, policy, k, None, window_ms)
