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
from __future__ import annotations

import math
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

POLICIES = ("all", "topk", "mutual", "assignment")
METRICS = ("l2", "cosine")
DEFAULT_MAX_GAP_S = 300.0
DEFAULT_WINDOW_S = 60.0
DEFAULT_MAX_CANDIDATES_PER_BLOCK = 50_000_000
# Distance tiles: 1024 x 4096 cells = 16 MiB of float32 plus an int64 dt tile.
DEFAULT_Q_TILE = 1024
DEFAULT_R_TILE = 4096

_EPS_MS = 1e-6  # 1 ns, in ms: absorbs 0.1 s -> 100.00000000000001 ms style errors


# --------------------------------------------------------------------------- params
def seconds_to_ms_floor(seconds: float) -> int:
    return int(math.floor(float(seconds) * 1000.0 + _EPS_MS))


def seconds_to_ms_ceil(seconds: float) -> int:
    return int(math.ceil(float(seconds) * 1000.0 - _EPS_MS))


def window_ms_of(window_s: float) -> int:
    """The window size in whole ms (>= 1)."""
    w = int(round(float(window_s) * 1000.0))
    if not w >= 1:
        raise ValueError("window_s must be at least 0.001 s, got %r" % (window_s,))
    return w


def window_start_ms(ts_ms: int, window_ms: int) -> int:
    """Start of the fixed window ``[kW, (k+1)W)`` that contains ``ts_ms``."""
    return (int(ts_ms) // window_ms) * window_ms


def check_params(policy: str, metric: str, top_k: int, threshold) -> None:
    if policy not in POLICIES:
        raise ValueError("policy must be one of %s, got %r" % (POLICIES, policy))
    if metric not in METRICS:
        raise ValueError("metric must be one of %s, got %r" % (METRICS, metric))
    if int(top_k) != top_k or top_k < 1:
        raise ValueError("top_k must be an integer >= 1, got %r" % (top_k,))
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError("threshold must be a finite number or None, got %r" % (threshold,))


def normalize_links(links: Optional[Iterable[dict]]) -> Optional[list]:
    """Validates links.json objects; returns them with ``camera_a < camera_b``.

    Extra keys (``support``, ``significance``) are kept. A link given the other way
    round is flipped (cameras swapped, ``offset_s`` negated). ``None`` stays ``None``
    (no links = every camera pair within ``max_gap_s``); an empty list means no pair is
    linked, so nothing can match.
    """
    if links is None:
        return None
    out = []
    for link in links:
        try:
            a, b = str(link["camera_a"]), str(link["camera_b"])
            offset, spread = float(link["offset_s"]), float(link["spread_s"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError("bad link %r: needs camera_a, camera_b, offset_s, spread_s (%s)"
                             % (link, e)) from None
        if a == b:
            raise ValueError("bad link %r: camera_a == camera_b" % (link,))
        if not (math.isfinite(offset) and math.isfinite(spread)) or spread < 0:
            raise ValueError("bad link %r: offset_s/spread_s must be finite, spread_s >= 0"
                             % (link,))
        d = dict(link)
        if a > b:
            a, b, offset = b, a, -offset
        d.update(camera_a=a, camera_b=b, offset_s=offset, spread_s=spread)
        out.append(d)
    return out


class CandidateBands:
    """Which ``dt`` make a candidate, per directed camera pair.

    ``intervals(q_cam, r_cam)`` gives the inclusive integer-ms intervals of
    ``t_r - t_q`` (note: relative to the *query* camera, so the links' bands are negated
    and swapped when ``q_cam > r_cam``); ``dt == 0`` is never a candidate. Picklable,
    comparable (the Beam WindowFn that holds it must be).
    """

    def __init__(self, max_gap_s: float = DEFAULT_MAX_GAP_S, links=None):
        links = normalize_links(links)
        self.links = links
        if links is None:
            if not float(max_gap_s) > 0:
                raise ValueError("max_gap_s must be > 0, got %r" % (max_gap_s,))
            self.max_gap_ms = seconds_to_ms_floor(max_gap_s)
            self._pairs = None
            self._default = np.array([[-self.max_gap_ms, self.max_gap_ms]], dtype=np.int64)
        else:
            self.max_gap_ms = None
            pairs: dict = {}
            for link in links:
                lo = seconds_to_ms_ceil(link["offset_s"] - link["spread_s"])
                hi = seconds_to_ms_floor(link["offset_s"] + link["spread_s"])
                if lo <= hi:
                    pairs.setdefault((link["camera_a"], link["camera_b"]), []).append((lo, hi))
            self._pairs = {k: np.array(sorted(set(v)), dtype=np.int64) for k, v in pairs.items()}
            self._default = None
        self._empty = np.zeros((0, 2), dtype=np.int64)

    @property
    def linked(self) -> bool:
        return self._pairs is not None

    def _key(self):
        if self._pairs is None:
            return ("gap", self.max_gap_ms)
        return ("links", tuple(sorted((k, tuple(map(tuple, v.tolist())))
                                      for k, v in self._pairs.items())))

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return "CandidateBands%r" % (self._key(),)

    def intervals(self, q_cam: str, r_cam: str) -> np.ndarray:
        """(m, 2) int64 inclusive intervals of ``t_r - t_q`` in ms; (0, 2) if none."""
        if q_cam == r_cam:
            return self._empty
        if self._pairs is None:
            return self._default
        if q_cam < r_cam:
            return self._pairs.get((q_cam, r_cam), self._empty)
        iv = self._pairs.get((r_cam, q_cam))
        if iv is None:
            return self._empty
        return np.ascontiguousarray(-iv[::-1, ::-1])

    def partners(self, cam: str, cameras: Iterable[str] = ()) -> list:
        """The cameras ``cam`` can have candidates in (sorted)."""
        if self._pairs is None:
            return sorted({c for c in cameras if c != cam})
        out = set()
        for a, b in self._pairs:
            if a == cam:
                out.add(b)
            elif b == cam:
                out.add(a)
        return sorted(out)


def candidate_mask(q_ts: np.ndarray, r_ts: np.ndarray, intervals: np.ndarray) -> np.ndarray:
    """(n, m) bool: ``r_ts[j] - q_ts[i]`` is non-zero and inside one of the intervals."""
    dt = np.subtract.outer(np.asarray(r_ts, np.int64), np.asarray(q_ts, np.int64)).T
    mask = np.zeros(dt.shape, dtype=bool)
    for lo, hi in intervals:
        mask |= (dt >= lo) & (dt <= hi)
    mask &= dt != 0
    return mask


# ------------------------------------------------------------------ windows & reach
def reach_window_starts(t_ms: int, window_ms: int, intervals: np.ndarray,
                        t_max_ms: Optional[int] = None) -> list:
    """Starts of every fixed window ``[kW, (k+1)W)`` whose reach contains ``t_ms``.

    The reach of a window for a reference detection is the set of times a candidate of
    one of the window's queries can have: ``[kW + lo, (k+1)W + hi)`` for each interval
    ``[lo, hi]`` of ``t_ref - t_query`` (open at the end because query times are
    ``< (k+1)W``). Equivalently ``k`` in ``[floor((t-hi)/W), floor((t-lo)/W)]``.
    With ``t_max_ms``: the windows whose reach contains some time in
    ``[t_ms, t_max_ms]`` (for a batch of references spanning at most one window this is
    exactly the union of its detections' windows: the ranges of consecutive times
    overlap or touch, so there is no gap).
    """
    t0 = int(t_ms)
    t1 = t0 if t_max_ms is None else int(t_max_ms)
    ks = set()
    for lo, hi in intervals:
        k0 = (t0 - int(hi)) // window_ms
        k1 = (t1 - int(lo)) // window_ms
        ks.update(range(k0, k1 + 1))
    return [k * window_ms for k in sorted(ks)]


def in_reach(r_ts: np.ndarray, start_ms: int, window_ms: int, intervals: np.ndarray) -> np.ndarray:
    """Bool per reference time: inside the reach of window ``[start, start+W)``."""
    r_ts = np.asarray(r_ts, np.int64)
    out = np.zeros(r_ts.shape, dtype=bool)
    for lo, hi in intervals:
        out |= (r_ts >= start_ms + lo) & (r_ts < start_ms + window_ms + hi)
    return out


# ----------------------------------------------------------------------- distances
def prepare_embeddings(emb, metric: str) -> np.ndarray:
    """(n, D) float32, C-contiguous; rows L2-normalised for ``cosine`` (zero rows stay 0)."""
    e = np.asarray(emb, dtype=np.float32)
    if e.ndim == 1:
        e = e.reshape(1, -1) if e.size else e.reshape(0, 0)
    e = np.ascontiguousarray(e)
    if metric == "cosine" and e.size:
        norms = np.sqrt(np.einsum("ij,ij->i", e, e, dtype=np.float32))
        safe = np.where(norms > 0, norms, np.float32(1.0)).astype(np.float32)
        e = np.ascontiguousarray(e / safe[:, None])
    return e


def pair_distances(q: np.ndarray, r: np.ndarray, metric: str) -> np.ndarray:
    """(n, m) float32 distances between prepared embeddings (see prepare_embeddings)."""
    if q.shape[1] != r.shape[1]:
        raise ValueError("embedding dimensions differ: %d vs %d" % (q.shape[1], r.shape[1]))
    prod = q @ r.T
    if metric == "cosine":
        d = np.float32(1.0) - prod
        np.clip(d, np.float32(0.0), np.float32(2.0), out=d)
        return d
    qn = np.einsum("ij,ij->i", q, q, dtype=np.float32)
    rn = np.einsum("ij,ij->i", r, r, dtype=np.float32)
    d2 = qn[:, None] + rn[None, :]
    d2 -= np.float32(2.0) * prod
    np.maximum(d2, np.float32(0.0), out=d2)
    return np.sqrt(d2, out=d2)


# ---------------------------------------------------------------------- block sides
class Side(NamedTuple):
    """One side of a block: detections of one camera sorted by (ts, id).

    ``emb`` is already prepared for the metric (see prepare_embeddings).
    """
    camera_id: str
    ids: np.ndarray  # str (unicode) array
    ts: np.ndarray  # int64 ms
    emb: np.ndarray  # (n, D) float32

    def __len__(self):
        return len(self.ids)

    def take(self, sl) -> "Side":
        return Side(self.camera_id, self.ids[sl], self.ts[sl], self.emb[sl])


def make_side(camera_id: str, ids: Sequence[str], ts: Sequence[int], emb, metric: str) -> Side:
    """Builds a Side sorted by (ts, id) with prepared float32 embeddings."""
    ids = np.asarray([str(i) for i in ids], dtype=str)
    ts = np.asarray(ts, dtype=np.int64).reshape(-1)
    e = prepare_embeddings(emb, metric)
    if len(ids) == 0:
        e = e.reshape(0, e.shape[-1] if e.ndim == 2 else 0)
    if not len(ids) == len(ts) == e.shape[0]:
        raise ValueError("ids, ts and embeddings disagree in length")
    order = np.lexsort((ids, ts))
    return Side(str(camera_id), ids[order], ts[order], e[order])


class Batch(NamedTuple):
    """Detections of one camera in one fixed window (what the Beam transform shuffles).

    ``emb`` is raw (float16 or float32, not normalised); ``ts`` and ``ids`` are sorted
    by (ts, id).
    """
    window_start_ms: int
    ids: np.ndarray
    ts: np.ndarray
    emb: np.ndarray

    def __len__(self):
        return len(self.ids)


def make_batches(window_start_ms: int, records: Iterable[tuple], max_size: int) -> list:
    """``(detection_id, ts_ms, embedding)`` tuples of one window -> Batches of at most
    ``max_size`` detections each, in (ts, id) order."""
    records = sorted(records, key=lambda r: (r[1], r[0]))
    out = []
    for i in range(0, len(records), max_size):
        part = records[i:i + max_size]
        emb = np.stack([np.asarray(r[2]).reshape(-1) for r in part])
        if emb.dtype not in (np.float16, np.float32):
            emb = emb.astype(np.float32)
        out.append(Batch(int(window_start_ms), np.asarray([str(r[0]) for r in part], dtype=str),
                         np.asarray([r[1] for r in part], dtype=np.int64), emb))
    return out


def side_from_batches(camera_id: str, batches: Sequence[Batch], metric: str,
                      keep: Optional[Sequence[np.ndarray]] = None) -> Side:
    """Concatenates batches (optionally only the ``keep`` masks' rows) into a Side."""
    if keep is not None:
        batches = [Batch(b.window_start_ms, b.ids[k], b.ts[k], b.emb[k])
                   for b, k in zip(batches, keep)]
    batches = [b for b in batches if len(b)]
    if not batches:
        return make_side(camera_id, [], [], np.zeros((0, 0), np.float32), metric)
    return make_side(camera_id, np.concatenate([b.ids for b in batches]),
                     np.concatenate([b.ts for b in batches]),
                     np.concatenate([np.asarray(b.emb, np.float32) for b in batches]), metric)


def _id_ranks(ids: np.ndarray) -> np.ndarray:
    """rank[i] = position of ids[i] in string order (ids unique)."""
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[np.argsort(ids, kind="stable")] = np.arange(len(ids), dtype=np.int64)
    return ranks


# ----------------------------------------------------------------------- block scan
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
    are kept (ranks are still ranks among all its candidates). Memory is bounded by
    ``q_tile x r_tile`` cells plus what is kept; references are scanned only in the
    time range the chunk's candidate intervals can reach (both sides are sorted by time).
    """
    nq, nr = len(q), len(r)
    if nq == 0 or nr == 0 or len(intervals) == 0:
        return
    thr = None if threshold is None else np.float32(threshold)
    lo_all, hi_all = int(intervals[:, 0].min()), int(intervals[:, 1].max())
    r_rank = _id_ranks(r.ids)
    for i0 in range(0, nq, q_tile):
        i1 = min(nq, i0 + q_tile)
        j0 = int(np.searchsorted(r.ts, q.ts[i0] + lo_all, side="left"))
        j1 = int(np.searchsorted(r.ts, q.ts[i1 - 1] + hi_all, side="right"))
        parts_q, parts_r, parts_d = [], [], []
        n_cand = n_cells = 0
        for jj0 in range(j0, j1, r_tile):
            jj1 = min(j1, jj0 + r_tile)
            mask = candidate_mask(q.ts[i0:i1], r.ts[jj0:jj1], intervals)
            c = int(np.count_nonzero(mask))
            if c == 0:
                continue
            n_cand += c
            n_cells += mask.size
            d = pair_distances(q.emb[i0:i1], r.emb[jj0:jj1], metric)
            keep = mask & (np.isfinite(d) if thr is None else (d <= thr))
            if keep_k is not None and keep.shape[1] > keep_k:
                dm = np.where(keep, d, np.float32(np.inf))
                kth = np.partition(dm, keep_k - 1, axis=1)[:, keep_k - 1]
                keep &= dm <= kth[:, None]
            qi, rj = np.nonzero(keep)
            parts_q.append(qi + i0)
            parts_r.append(rj + jj0)
            parts_d.append(d[qi, rj])
        if not parts_q:
            if n_cand:
                yield ChunkResult(*_empty_cells(), n_cand, n_cells)
            continue
        qi = np.concatenate(parts_q)
        rj = np.concatenate(parts_r)
        dist = np.concatenate(parts_d)
        order = np.lexsort((r_rank[rj], dist, qi))
        qi, rj, dist = qi[order], rj[order], dist[order]
        rank = _ranks_within_groups(qi)
        if keep_k is not None:
            sel = rank <= keep_k
            qi, rj, dist, rank = qi[sel], rj[sel], dist[sel], rank[sel]
        yield ChunkResult(qi, rj, dist, rank, n_cand, n_cells)


def _empty_cells():
    return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
            np.zeros(0, np.int64))


def _ranks_within_groups(sorted_keys: np.ndarray) -> np.ndarray:
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


# ------------------------------------------------------------------ policy blocks
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
    """Runs one block (queries of camera Q vs references of camera R) for a policy.

    Yields ``(qi, rj, dist, rank, n_candidates, n_cells)`` chunks (numpy arrays):
    ``all``: every kept cell; ``topk``/``mutual``: each query's first ``top_k`` / 1
    cells (directed neighbour records); ``assignment``: the assigned cells (one chunk).
    """
    if policy in ("topk", "mutual"):
        k = top_k if policy == "topk" else 1
        yield from scan_block(q, r, intervals, metric, threshold, keep_k=k,
                              q_tile=q_tile, r_tile=r_tile)
    elif policy == "all":
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
        raise ValueError("unknown policy %r" % (policy,))


# ------------------------------------------------------------------------- records
def make_match(id_a, id_b, cam_a, cam_b, ts_a, ts_b, distance, policy, rank_a, rank_b,
               window_ms: int) -> dict:
    """A Match dict (see transforms/records.py); the window is the one of ``ts_a``."""
    ts_a, ts_b = int(ts_a), int(ts_b)
    ws = window_start_ms(ts_a, window_ms)
    return {
        "detection_id_a": str(id_a),
        "detection_id_b": str(id_b),
        "camera_id_a": str(cam_a),
        "camera_id_b": str(cam_b),
        "frame_ts_a_ms": ts_a,
        "frame_ts_b_ms": ts_b,
        "dt_seconds": (ts_b - ts_a) / 1000.0,
        "distance": float(distance),
        "policy": policy,
        "rank_a": None if rank_a is None else int(rank_a),
        "rank_b": None if rank_b is None else int(rank_b),
        "window_start_ms": ws,
        "window_end_ms": ws + window_ms,
    }


def block_outputs(q: Side, r: Side, chunk: ChunkResult, policy: str, window_ms: int):
    """Turns a block chunk into output records.

    ``all``/``assignment`` (blocks with ``q.camera_id < r.camera_id`` only): Match
    dicts. ``topk``/``mutual``: directed neighbour records
    ``((id_a, id_b), (q_is_a, rank, distance, cam_a, cam_b, ts_a, ts_b))`` to be merged
    by :func:`merge_directed`.
    """
    qa = q.camera_id < r.camera_id
    for i, j, d, k in zip(chunk.qi.tolist(), chunk.rj.tolist(), chunk.dist.tolist(),
                          chunk.rank.tolist()):
        if policy in ("all", "assignment"):
            yield make_match(q.ids[i], r.ids[j], q.camera_id, r.camera_id, q.ts[i], r.ts[j],
                             d, policy, k, None, window_ms)
        elif qa:
            yield ((str(q.ids[i]), str(r.ids[j])),
                   (True, k, d, q.camera_id, r.camera_id, int(q.ts[i]), int(r.ts[j])))
        else:
            yield ((str(r.ids[j]), str(q.ids[i])),
                   (False, k, d, r.camera_id, q.camera_id, int(r.ts[j]), int(q.ts[i])))


def merge_directed(key, values, policy: str, window_ms: int) -> Optional[dict]:
    """Merges the directed records of one unordered pair into a Match (or None).

    ``topk``: output if either side selected the other; ``mutual``: only if both did.
    The distance is taken from the a->b record when present.
    """
    fwd = bwd = None
    for v in values:
        if v[0]:
            fwd = v
        else:
            bwd = v
    if policy == "mutual" and (fwd is None or bwd is None):
        return None
    src = fwd if fwd is not None else bwd
    if src is None:
        return None
    _, _, d, cam_a, cam_b, ts_a, ts_b = src
    return make_match(key[0], key[1], cam_a, cam_b, ts_a, ts_b, d, policy,
                      None if fwd is None else fwd[1], None if bwd is None else bwd[1],
                      window_ms)


def assignment_key(m: dict) -> tuple:
    """Deduplication key of an assignment: per camera pair, per B detection."""
    return (m["camera_id_a"], m["camera_id_b"], m["detection_id_b"])


def assignment_order(m: dict) -> tuple:
    """Lower is better: (distance, detection_id_a)."""
    return (m["distance"], m["detection_id_a"])


def match_sort_key(m: dict) -> tuple:
    return (m["camera_id_a"], m["camera_id_b"], m["detection_id_a"], m["detection_id_b"])


# ----------------------------------------------------------------- in-memory API
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
    directed: dict = {}
    assigned: dict = {}
    for qc in cameras:
        for rc in bands.partners(qc, cameras):
            if rc not in sides or (policy in ("all", "assignment") and not qc < rc):
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
                                k = assignment_key(m)
                                if k not in assigned or assignment_order(m) < assignment_order(
                                        assigned[k]):
                                    assigned[k] = m
                continue
            for ch in block_matches(q, r, iv, policy, metric, threshold, top_k, q_tile, r_tile):
                for rec in block_outputs(q, r, ch, policy, window_ms):
                    if policy == "all":
                        out.append(rec)
                    else:
                        directed.setdefault(rec[0], []).append(rec[1])
    if policy == "assignment":
        out = list(assigned.values())
    elif policy in ("topk", "mutual"):
        for key, vals in directed.items():
            m = merge_directed(key, vals, policy, window_ms)
            if m is not None:
                out.append(m)
    out.sort(key=match_sort_key)
    return out
