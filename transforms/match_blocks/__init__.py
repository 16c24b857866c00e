"""The numpy core of cross-camera matching: pure functions, no Beam.

``transforms.matching.MatchDetections`` (the Beam transform) and :func:`match_arrays`
(the in-memory API used by calibration and evaluation code) both call the functions
here, so the two give the same answers by construction.

Semantics (the contract; ``MatchDetections`` refers to this docstring)
======================================================================

Times are integer UTC epoch milliseconds. For two detections of different cameras,
``a`` is the one whose camera id sorts first (Python string order) and
``dt = t_b - t_a`` (ms).

Candidates
    Without links: ``0 < |dt| <= max_gap_s`` (``max_gap_ms = floor(max_gap_s*1000)``).
    With links (``links.json`` objects ``camera_a < camera_b``, ``offset_s``,
    ``spread_s``): only camera pairs that have at least one link, and only when
    ``offset_s - spread_s <= dt/1000 <= offset_s + spread_s`` for at least one link of
    the pair, and ``dt != 0``. The link bands replace ``max_gap_s`` (it is ignored
    when links are given). Band edges are converted to whole milliseconds, inclusive
    (``ceil`` of the lower, ``floor`` of the upper edge, with 1 ns of tolerance for the
    binary representation of decimal seconds). A link given as ``camera_a > camera_b``
    is flipped (cameras swapped, offset negated).

Distance
    ``l2``: Euclidean, ``sqrt(max(|q|^2 + |r|^2 - 2 q.r, 0))``; ``cosine``:
    ``1 - q.r / (|q| |r|)`` clamped to ``[0, 2]``, with a zero vector treated as having
    cosine similarity 0 with everything (distance 1). Computed in float32 with matrix
    products, tile by tile (at most ``q_tile x r_tile`` cells at a time), so memory is
    bounded by the tile size, never by the window or the data set. Embeddings are cast
    to float32 (float16 inputs are fine). A non-finite distance is never a match.
    ``topk``/``mutual`` then recompute the distances of the cells that can be selected
    (each line's nearest) in float64 from the float32 embeddings
    (:func:`~transforms.match_blocks.kernels.exact_distances`): their ranks and the
    reported distances do not depend on how the work was tiled or chunked (a matrix
    product's last bit does), and they are the ranks of those exact distances, nearly
    equal embeddings included (which cells can be selected is decided with a proven
    bound on the tiles' error, :mod:`~transforms.match_blocks.bounds`).
    ``all``/``assignment`` report the tiled values.
    ``threshold`` (None = no threshold) keeps ``float32(distance) <= float32(threshold)``.

Order and ties
    Wherever detections are ranked, the order is (distance, detection_id): equal
    distances are broken by the detection id (string order), so every result is
    deterministic. Detection ids must be unique.

Ranks
    ``rank_a`` is the 1-based rank of ``b`` among **all** of ``a``'s candidates in
    ``b``'s camera (threshold or not: the threshold only cuts the tail of that order),
    ``rank_b`` likewise for ``a`` among ``b``'s candidates in ``a``'s camera; ``None``
    where not computed (see the policies).

Policies
    ``all``: every candidate pair with distance <= threshold. ``rank_a`` filled,
    ``rank_b`` None (it would need a second shuffle).
    ``topk``: every detection selects, in each other camera, its ``top_k`` nearest
    candidates with distance <= threshold; a pair is output once if either side
    selected it; ``rank_a`` is filled when ``a`` selected ``b``, ``rank_b`` when ``b``
    selected ``a`` (the other is None).
    ``mutual``: mutual nearest neighbours per camera pair: ``b`` is ``a``'s nearest
    candidate in ``b``'s camera and ``a`` is ``b``'s nearest candidate in ``a``'s
    camera, and distance <= threshold. ``rank_a = rank_b = 1``.
    ``assignment``: one-to-one per camera pair (A, B), A < B, and per fixed event-time
    window ``[kW, (k+1)W)`` (``W = window_s``) of the camera-A detections: rows = the
    A detections of the window, columns = every B detection that is a candidate of
    at least one of them; allowed cells = candidates with distance <= threshold. The
    assignment maximises the number of allowed pairs, then minimises their total
    distance (scipy's ``linear_sum_assignment`` with a forbidding cost larger than any
    sum of allowed costs), solved per connected component of the allowed graph with
    rows and columns in detection-id order (so equal-cost optima are resolved the same
    way everywhere). A B detection can then be assigned in several windows; only its
    lowest (distance, detection_id_a) assignment is kept, the others are dropped (their
    A detections stay unmatched). ``rank_a`` filled, ``rank_b`` None. This policy
    depends on ``window_s`` by definition; the other three do not depend on it at all.
    A block (window x camera pair) with more than ``max_candidates_per_block`` query x
    reference cells is solved in consecutive chunks of its A detections (time order),
    as if the window were shorter for that block (one-to-one still holds).

Output (``Match`` of ``transforms/records.py``), one per unordered pair:
    ``detection_id_a, detection_id_b, camera_id_a, camera_id_b, frame_ts_a_ms,
    frame_ts_b_ms, dt_seconds (= (frame_ts_b_ms - frame_ts_a_ms)/1000), distance
    (float32 value as a Python float), policy, rank_a, rank_b, window_start_ms,
    window_end_ms`` where the window is the fixed window of ``window_s`` that contains
    ``frame_ts_a_ms`` (the window that owns the pair; for all/topk/mutual only these
    two fields depend on ``window_s``).
"""
from transforms.match_blocks.bands import (POLICIES, METRICS, DEFAULT_MAX_GAP_S,
                                           DEFAULT_WINDOW_S,
                                           DEFAULT_MAX_CANDIDATES_PER_BLOCK,
                                           seconds_to_ms_floor, seconds_to_ms_ceil,
                                           window_ms_of, window_start_ms, check_params,
                                           normalize_links, link_bands, bands_to_ms,
                                           CandidateBands, candidate_mask,
                                           reach_window_starts, in_reach, dt_intervals)
from transforms.match_blocks.cells import (Tile, QueryChunk, query_chunks, tile_mask,
                                           mask_outside)
from transforms.match_blocks.kernels import (DEFAULT_Q_TILE, DEFAULT_R_TILE,
                                             prepare_embeddings, row_norms, Prepared,
                                             prepare_side, finite_block, tile_buffer,
                                             Workspace, raw_distances, finish_distances,
                                             exact_distances, pair_distances)
from transforms.match_blocks.wire import (Batch, StoredRows, encode_batch, decode_batch,
                                          make_batches, batches_from_arrays, sorted_by_ts_id,
                                          compact_embeddings)
from transforms.match_blocks.sides import Side, id_ranks, make_side, side_from_batches
from transforms.match_blocks.records import (make_match, assignment_key, assignment_order,
                                             match_sort_key)
from transforms.match_blocks.scan import (ChunkResult, scan_block, ranks_within_groups,
                                          split_block)
from transforms.match_blocks.neighbours import (Neighbours, neighbour_block, Partial,
                                                encode_partial, decode_partial,
                                                neighbour_outputs, merge_partials)
from transforms.match_blocks.assignment import assign_cells, block_matches, block_outputs
from transforms.match_blocks.arrays import match_arrays

__all__ = [name for name in dir() if not name.startswith("_") and name not in (
    "annotations", "arrays", "assignment", "bands", "bounds", "cells", "kernels", "neighbours", "records", "scan",
    "sides", "wire")]
