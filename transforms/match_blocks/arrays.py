"""The in-memory API: :func:`match_arrays`, the same semantics as the Beam transform
for detections held in arrays (calibration, evaluation and tests use it)."""
from __future__ import annotations

import numpy as np

from transforms.match_blocks.assignment import block_matches, block_outputs
from transforms.match_blocks.bands import (DEFAULT_MAX_CANDIDATES_PER_BLOCK, DEFAULT_MAX_GAP_S,
                                          DEFAULT_WINDOW_S, CandidateBands, check_params,
                                          in_reach, window_ms_of)
from transforms.match_blocks.kernels import DEFAULT_Q_TILE, DEFAULT_R_TILE
from transforms.match_blocks.neighbours import merge_partials, neighbour_block, neighbour_outputs
from transforms.match_blocks.records import assignment_key, assignment_order, match_sort_key
from transforms.match_blocks.scan import split_block
from transforms.match_blocks.sides import make_side

__all__ = ["match_arrays"]


def match_arrays(cam, ts_ms, emb, ids, policy: str = "mutual", metric: str = "l2",
                 max_gap_s: float = DEFAULT_MAX_GAP_S, window_s: float = DEFAULT_WINDOW_S,
                 threshold=None, top_k: int = 1, links=None,
                 max_candidates_per_block: int = DEFAULT_MAX_CANDIDATES_PER_BLOCK,
                 q_tile: int = DEFAULT_Q_TILE, r_tile: int = DEFAULT_R_TILE) -> list:
    """Cross-camera matches of in-memory detections, same semantics as MatchDetections.

    ``cam``: camera ids (n,), ``ts_ms``: int epoch ms (n,), ``emb``: (n, D) embeddings,
    ``ids``: unique detection ids (n,). Returns Match dicts sorted by (camera_id_a,
    camera_id_b, detection_id_a, detection_id_b). Every camera pair is one block (tiled;
    memory bounded by the tiles and the output), except for ``assignment``, which is
    blocked per window exactly like the Beam transform. See the module docstring for
    the semantics.
    """
    check_params(policy, metric, top_k, threshold)
    window_ms = window_ms_of(window_s)
    bands = CandidateBands(max_gap_s, links)
    cam = np.asarray([str(c) for c in cam], dtype=object)
    ts_ms = np.asarray(ts_ms, dtype=np.int64).reshape(-1)
    ids = [str(i) for i in ids]
    emb = np.asarray(emb, dtype=np.float32)
    n = len(ids)
    if not (len(cam) == len(ts_ms) == n) or (n and emb.shape[0] != n):
        raise ValueError("cam, ts_ms, emb and ids must have the same length")
    if len(set(ids)) != n:
        raise ValueError("detection ids must be unique")
    if n == 0:
        return []
    emb = emb.reshape(n, -1)
    sides = {}
    for c in sorted(set(cam.tolist())):
        sel = np.nonzero(cam == c)[0]
        sides[c] = make_side(c, [ids[i] for i in sel], ts_ms[sel], emb[sel], metric)
    cameras = sorted(sides)
    out: list = []
    assigned: dict = {}
    k = 1 if policy == "mutual" else top_k
    for qc in cameras:
        for rc in bands.partners(qc, cameras):
            if rc not in sides or not qc < rc:
                continue
            iv = bands.intervals(qc, rc)
            q, r = sides[qc], sides[rc]
            if policy == "assignment":
                starts = (q.ts // window_ms) * window_ms
                for ws in np.unique(starts).tolist():
                    qw = q.take(starts == ws)
                    rw = r.take(in_reach(r.ts, ws, window_ms, iv))
                    for qs, rs in split_block(qw, rw, iv, max_candidates_per_block):
                        for ch in block_matches(qs, rs, iv, policy, metric, threshold, top_k,
                                                q_tile, r_tile):
                            for m in block_outputs(qs, rs, ch, policy, window_ms):
                                key = assignment_key(m)
                                if key not in assigned or assignment_order(m) < assignment_order(
                                        assigned[key]):
                                    assigned[key] = m
            elif policy == "all":
                for ch in block_matches(q, r, iv, policy, metric, threshold, top_k, q_tile,
                                        r_tile):
                    out.extend(block_outputs(q, r, ch, policy, window_ms))
            else:
                nb = neighbour_block(q, r, iv, metric, threshold, k, q_tile, r_tile)
                matches, partial = neighbour_outputs(q, r, nb, policy, window_ms)
                out.extend(matches)
                out.extend(merge_partials(qc, rc, [partial], policy, top_k, window_ms))
    if policy == "assignment":
        out = list(assigned.values())
    out.sort(key=match_sort_key)
    return out
