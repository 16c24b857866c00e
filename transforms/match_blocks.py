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
import struct
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

    def max_width_ms(self) -> int:
        """The widest span ``hi - lo`` of the candidate ``dt`` of any camera pair (ms):
        how far past a window of queries its references can reach in all."""
        if self._pairs is None:
            return 2 * self.max_gap_ms
        return max((int(iv[:, 1].max() - iv[:, 0].min()) for iv in self._pairs.values()),
                   default=0)

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


def row_norms(e: np.ndarray) -> np.ndarray:
    """Squared L2 norm of each row, float32 (the ``|q|^2`` of the l2 distance)."""
    return np.einsum("ij,ij->i", e, e, dtype=np.float32)


class Prepared(NamedTuple):
    """A block side ready for :func:`raw_distances`: the embeddings (for the query side
    of l2, times 2: exact in float32, so ``(2q) @ r.T == 2 (q @ r.T)`` bit for bit) and,
    for l2, the rows' :func:`row_norms` of the unscaled embeddings."""
    emb: np.ndarray
    norms: Optional[np.ndarray]

    def rows(self, i0: int, i1: int) -> "Prepared":
        return Prepared(self.emb[i0:i1], None if self.norms is None else self.norms[i0:i1])


def prepare_side(emb: np.ndarray, metric: str, role: str,
                 workspace: Optional["Workspace"] = None) -> Prepared:
    """``role`` ``"q"`` (query) or ``"r"`` (reference) rows for :func:`raw_distances`."""
    if metric != "l2":
        return Prepared(emb, None)
    norms = row_norms(emb)
    if role == "q":
        out = None if workspace is None else workspace.get("q2", emb.shape)
        emb = np.multiply(emb, np.float32(2.0), out=out, dtype=np.float32)
    return Prepared(emb, norms)


def finite_block(q: Prepared, r: Prepared, metric: str) -> bool:
    """True when every :func:`raw_distances` value of the two sides is finite (finite
    embeddings and norms small enough that no sum or product can overflow), so tiles
    need no NaN/inf check."""
    if metric == "l2":
        if not (len(q.norms) and len(r.norms)):
            return True
        bound = float(q.norms.max()) + float(r.norms.max())
        return bool(np.isfinite(q.norms).all() and np.isfinite(r.norms).all()
                    and bound < 1e37)
    return bool(np.isfinite(q.emb).all() and np.isfinite(r.emb).all())


def _tile_buffer(buf: Optional[np.ndarray], n: int, m: int, dtype=np.float32) -> np.ndarray:
    """An (n, m) C-contiguous view of the flat ``buf`` when it is large enough, else new."""
    if buf is None or buf.size < n * m:
        return np.empty((n, m), dtype=dtype)
    return buf[:n * m].reshape(n, m)


class Workspace:
    """Scratch arrays reused from block to block (by name), so that every block after the
    first writes into memory already mapped instead of faulting in fresh pages (blocks
    are tens of MB). An array from :meth:`get` is valid until the next :meth:`get` of
    the same name; nothing that outlives a block may point into one."""

    def __init__(self):
        self._buffers: dict = {}

    def get(self, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
        n = 1
        for s in shape:
            n *= int(s)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != np.dtype(dtype) or buf.size < n:
            grown = n if buf is None or buf.dtype != np.dtype(dtype) else max(n, buf.size * 5 // 4)
            buf = self._buffers[name] = np.empty(grown, dtype=dtype)
        return buf[:n].reshape(shape)


def raw_distances(q: Prepared, r: Prepared, metric: str, out: Optional[np.ndarray] = None,
                  work: Optional[np.ndarray] = None) -> np.ndarray:
    """(n, m) float32 between :func:`prepare_side` rows: l2: ``(|q|^2 + |r|^2) - 2 q.r``,
    the squared distance before the clamp at 0 (finish with :func:`finish_distances`);
    cosine: the distance ``1 - q.r`` clipped to [0, 2]. ``out``/``work``: flat float32
    buffers to reuse from tile to tile (the result is a view of ``out``)."""
    if q.emb.shape[1] != r.emb.shape[1]:
        raise ValueError("embedding dimensions differ: %d vs %d"
                         % (q.emb.shape[1], r.emb.shape[1]))
    n, m = q.emb.shape[0], r.emb.shape[0]
    x = _tile_buffer(out, n, m)
    if metric == "cosine":
        np.matmul(q.emb, r.emb.T, out=x)
        np.subtract(np.float32(1.0), x, out=x)
        np.clip(x, np.float32(0.0), np.float32(2.0), out=x)
        return x
    prod2 = _tile_buffer(work, n, m)
    np.matmul(q.emb, r.emb.T, out=prod2)
    np.add(q.norms[:, None], r.norms[None, :], out=x)
    x -= prod2
    return x


def finish_distances(x: np.ndarray, metric: str) -> np.ndarray:
    """:func:`raw_distances` values -> distances, in place (l2: ``sqrt(max(x, 0))``)."""
    if metric == "l2":
        np.maximum(x, np.float32(0.0), out=x)
        np.sqrt(x, out=x)
    return x


def pair_distances(q: np.ndarray, r: np.ndarray, metric: str) -> np.ndarray:
    """(n, m) float32 distances between prepared embeddings (see prepare_embeddings)."""
    if q.shape[1] != r.shape[1]:
        raise ValueError("embedding dimensions differ: %d vs %d" % (q.shape[1], r.shape[1]))
    return finish_distances(raw_distances(prepare_side(q, metric, "q"),
                                          prepare_side(r, metric, "r"), metric), metric)


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


# Wire format of a Batch between Beam stages (``encode_batch``/``decode_batch``): plain
# bytes, which Beam's coders copy as they are (no pickling of numpy arrays), ids as UTF-8
# (not 4 bytes a character), and arrays that decode as views of the received bytes.
_BATCH_HEADER = struct.Struct("<4sqqqq")  # magic, window start, rows, dim, dtype code
_BATCH_MAGIC = b"CVB1"
_BATCH_DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}


def _pad8(n: int) -> int:
    return -n % 8


def encode_batch(batch: Batch) -> bytes:
    """A :class:`Batch` as bytes (float16/float32 embeddings kept as they are, any other
    dtype as float32); :func:`decode_batch` inverts it."""
    emb = np.asarray(batch.emb)
    n = len(batch.ids)
    emb = emb.reshape(n, -1) if n else emb.reshape(0, emb.shape[-1] if emb.ndim == 2 else 0)
    code = 1 if emb.dtype == np.float16 else 2
    emb = np.ascontiguousarray(emb, dtype=_BATCH_DTYPES[code])
    ids = [str(i).encode("utf-8") for i in np.asarray(batch.ids).tolist()]
    lens = np.fromiter((len(i) for i in ids), dtype="<i8", count=n)
    blob = b"".join(ids)
    ts = np.ascontiguousarray(batch.ts, dtype="<i8")
    header = _BATCH_HEADER.pack(_BATCH_MAGIC, int(batch.window_start_ms), n, emb.shape[1], code)
    return b"".join((header, lens.data, ts.data, blob, b"\0" * _pad8(len(blob)), emb.data))


def decode_batch(data: bytes) -> Batch:
    """:func:`encode_batch`'s bytes -> a :class:`Batch` whose ``ts`` and ``emb`` are
    read-only views of ``data``."""
    magic, start, n, dim, code = _BATCH_HEADER.unpack_from(data, 0)
    if magic != _BATCH_MAGIC:
        raise ValueError("not an encoded Batch")
    off = _BATCH_HEADER.size
    lens = np.frombuffer(data, dtype="<i8", count=n, offset=off)
    off += 8 * n
    ts = np.frombuffer(data, dtype="<i8", count=n, offset=off)
    off += 8 * n
    ends = np.cumsum(lens).tolist()
    view = memoryview(data)
    ids, prev = [], off
    for end in ends:
        ids.append(str(view[prev:off + end], "utf-8"))
        prev = off + end
    blob_len = ends[-1] if ends else 0
    off += blob_len + _pad8(blob_len)
    emb = np.frombuffer(data, dtype=_BATCH_DTYPES[code], count=n * dim, offset=off)
    return Batch(int(start), np.asarray(ids, dtype=str), ts.astype(np.int64, copy=False),
                 emb.reshape(n, dim))


def make_batches(window_start_ms: int, records: Iterable[tuple], max_size: int) -> list:
    """``(detection_id, ts_ms, embedding)`` tuples of one window -> Batches of at most
    ``max_size`` detections each, in (ts, id) order."""
    records = list(records)
    if not records:
        return []
    return batches_from_arrays(
        window_start_ms, np.asarray([str(r[0]) for r in records], dtype=str),
        np.asarray([r[1] for r in records], dtype=np.int64),
        np.stack([np.asarray(r[2]).reshape(-1) for r in records]), max_size)


def batches_from_arrays(window_start_ms: int, ids: np.ndarray, ts: np.ndarray, emb: np.ndarray,
                        max_size: int) -> list:
    """Detections of one window as arrays -> Batches of at most ``max_size`` detections
    each, in (ts, id) order; embeddings other than float16/float32 become float32."""
    if emb.dtype not in (np.float16, np.float32):
        emb = emb.astype(np.float32)
    if len(ids) > 1 and not _sorted_by_ts_id(ts, ids):
        order = np.lexsort((ids, ts))
        ids, ts, emb = ids[order], ts[order], emb[order]
    return [Batch(int(window_start_ms), ids[i:i + max_size], ts[i:i + max_size].astype(np.int64),
                  emb[i:i + max_size]) for i in range(0, len(ids), max_size)]


def side_from_batches(camera_id: str, batches: Sequence[Batch], metric: str,
                      keep: Optional[Sequence[np.ndarray]] = None,
                      workspace: Optional["Workspace"] = None, name: str = "side") -> Side:
    """Concatenates batches (optionally only the ``keep`` masks' rows) into a Side.

    The embeddings are converted to float32 once, straight into the Side's array (a
    float16 batch is never copied as float32 first; with a ``workspace``, into its
    array ``name``, reused by the next block), and reordered only when the batches are
    not already in (ts, id) order.
    """
    if keep is not None:
        batches = [Batch(b.window_start_ms, b.ids[k], b.ts[k], b.emb[k])
                   for b, k in zip(batches, keep)]
    batches = [b for b in batches if len(b)]
    if not batches:
        return make_side(camera_id, [], [], np.zeros((0, 0), np.float32), metric)
    if len(batches) > 1:
        batches = sorted(batches, key=lambda b: (int(b.ts[0]), str(b.ids[0])))
    ids = np.concatenate([np.asarray(b.ids, dtype=str) for b in batches])
    ts = np.concatenate([np.asarray(b.ts, dtype=np.int64) for b in batches])
    embs = [np.asarray(b.emb).reshape(len(b), -1) for b in batches]
    if len({e.shape[1] for e in embs}) > 1:
        raise ValueError("embedding dimensions differ within camera %s" % (camera_id,))
    shape = (len(ids), embs[0].shape[1])
    emb = np.empty(shape, np.float32) if workspace is None else workspace.get(name, shape)
    np.concatenate(embs, out=emb, casting="same_kind")
    if len(ids) > 1 and not _sorted_by_ts_id(ts, ids):
        order = np.lexsort((ids, ts))
        ids, ts, emb = ids[order], ts[order], emb[order]
    return Side(str(camera_id), ids, ts, prepare_embeddings(emb, metric))


def _sorted_by_ts_id(ts: np.ndarray, ids: np.ndarray) -> bool:
    """Whether rows are in (ts, id) order (ids unique)."""
    dts = np.diff(ts)
    if np.any(dts < 0):
        return False
    same = np.nonzero(dts == 0)[0]
    return not len(same) or bool(np.all(ids[same] < ids[same + 1]))


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
    qp, rp = prepare_side(q.emb, metric, "q"), prepare_side(r.emb, metric, "r")
    size = min(q_tile, nq) * min(r_tile, nr)
    buf, work = np.empty(size, np.float32), np.empty(size, np.float32)
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
            d = finish_distances(raw_distances(qp.rows(i0, i1), rp.rows(jj0, jj1), metric,
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


# ------------------------------------------------------------ nearest neighbours
def dt_intervals(intervals: np.ndarray) -> np.ndarray:
    """The candidate ``dt`` set of ``intervals`` (inclusive, ms) without ``dt == 0``, as
    sorted, disjoint, non-adjacent inclusive intervals ((m, 2) int64)."""
    parts = []
    for lo, hi in np.asarray(intervals, dtype=np.int64).reshape(-1, 2).tolist():
        if lo <= -1:
            parts.append((lo, min(hi, -1)))
        if hi >= 1:
            parts.append((max(lo, 1), hi))
    merged: list = []
    for lo, hi in sorted(parts):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return np.asarray(merged, dtype=np.int64).reshape(-1, 2)


def _mask_outside(d: np.ndarray, starts: list, ends: list) -> None:
    """Sets ``d[i, j] = inf`` for every column ``j`` outside row ``i``'s candidate ranges
    ``[starts[i][k], ends[i][k])`` (tile columns, sorted, disjoint)."""
    inf = np.float32(np.inf)
    width = d.shape[1]
    for i, (row_s, row_e) in enumerate(zip(starts, ends)):
        prev = 0
        row = None
        for a, b in zip(row_s, row_e):
            if a >= b:
                continue
            if a > prev:
                if row is None:
                    row = d[i]
                row[prev:a] = inf
            prev = b
        if prev < width:
            d[i, prev:] = inf


_F32_MAX = np.float32(np.finfo(np.float32).max)
# Relative margin on squared l2 distances: every x whose float32 sqrt equals sqrt(m) is
# <= m * (1 + 2.4e-7) (correctly rounded sqrt), so this keeps a superset of the ties.
_SQ_MARGIN = np.float32(1e-5)


def _near_cells(x: np.ndarray, k: int, axis: int, metric: str,
                mask_buf: Optional[np.ndarray] = None):
    """(rows, cols) of cells of the :func:`raw_distances` tile ``x`` that can be among
    their row's (axis=1) or column's (axis=0) first ``k`` finite cells in (distance, id)
    order: every finite cell whose distance is <= the k-th smallest of its line, ties
    included (for l2, a small margin on the squared value keeps every cell whose rounded
    distance may equal it). Masked cells are +inf and never returned."""
    if x.size == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    if k == 1:
        bound = x.min(axis=axis)
    elif x.shape[axis] <= k:
        bound = np.full(x.shape[1 - axis], np.inf, dtype=np.float32)
    else:
        bound = np.partition(x, k - 1, axis=axis).take(k - 1, axis=axis)
    if metric == "l2":
        np.maximum(bound, np.float32(0.0), out=bound)
        bound *= np.float32(1.0) + _SQ_MARGIN
    np.minimum(bound, _F32_MAX, out=bound)  # lines of inf only: nothing
    sel = _tile_buffer(mask_buf, x.shape[0], x.shape[1], bool)
    np.less_equal(x, bound[:, None] if axis == 1 else bound[None, :], out=sel)
    return np.divmod(np.flatnonzero(sel), x.shape[1])


def _first_k(groups: np.ndarray, others: np.ndarray, dist: np.ndarray, other_rank: np.ndarray,
             k: int):
    """Sorts cells by (group, distance, other id) and keeps each group's first k.

    Returns (positions into the inputs, 1-based ranks)."""
    order = np.lexsort((other_rank[others], dist, groups))
    rank = _ranks_within_groups(groups[order])
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

    Each candidate cell is computed once (tile by tile, at most ``q_tile x r_tile``
    cells at a time, in buffers of ``workspace`` when given). Rows give each query's first ``k`` (final: the
    block holds all its candidates); columns give each reference's first ``k`` among
    this block's queries (partial: merge them over the blocks with
    :func:`merge_partials`). The first ``k`` of a reference over all blocks are among
    the union of its per-block first ``k``, with the same order, so the merge gives its
    exact ranks. Only the candidate columns of each query tile are scanned (both sides
    are sorted by time).
    """
    nq, nr = len(q), len(r)
    iv = dt_intervals(intervals)
    if nq == 0 or nr == 0 or len(iv) == 0:
        return _empty_neighbours()
    thr = None if threshold is None else np.float32(threshold)
    inf = np.float32(np.inf)
    q_rank, r_rank = _id_ranks(q.ids), _id_ranks(r.ids)
    ws = Workspace() if workspace is None else workspace
    qp, rp = prepare_side(q.emb, metric, "q", ws), prepare_side(r.emb, metric, "r", ws)
    size = min(q_tile, nq) * min(r_tile, nr)
    buf, work = ws.get("tile", (size,)), ws.get("tile_work", (size,))
    mask_buf = ws.get("tile_mask", (size,), bool)
    finite = finite_block(qp, rp, metric)
    rows_q, rows_r, rows_d, rows_rank = [], [], [], []
    cols_q, cols_r, cols_d = [], [], []
    n_cand = n_cells = 0
    for i0 in range(0, nq, q_tile):
        i1 = min(nq, i0 + q_tile)
        qt = q.ts[i0:i1]
        starts = np.stack([np.searchsorted(r.ts, qt + lo, side="left") for lo in iv[:, 0]])
        ends = np.stack([np.searchsorted(r.ts, qt + hi, side="right") for hi in iv[:, 1]])
        c = int((ends - starts).sum())
        if c == 0:
            continue
        n_cand += c
        nonempty = ends > starts
        j0, j1 = int(starts[nonempty].min()), int(ends[nonempty].max())
        tq, tr, td = [], [], []
        for jj0 in range(j0, j1, r_tile):
            jj1 = min(j1, jj0 + r_tile)
            s_t = np.clip(starts, jj0, jj1) - jj0
            e_t = np.clip(ends, jj0, jj1) - jj0
            if not (e_t > s_t).any():
                continue
            x = raw_distances(qp.rows(i0, i1), rp.rows(jj0, jj1), metric, buf, work)
            n_cells += x.size
            if not finite and not np.isfinite(x.max()):  # NaN/inf: never a match
                x[~np.isfinite(x)] = inf
            _mask_outside(x, s_t.T.tolist(), e_t.T.tolist())
            for axis, (aq, ar, ad) in ((1, (tq, tr, td)), (0, (cols_q, cols_r, cols_d))):
                ri, cj = _near_cells(x, k, axis, metric, mask_buf)
                dv = finish_distances(x[ri, cj], metric)
                if thr is not None:  # eligible cells are a prefix of each line's order
                    ok = dv <= thr
                    ri, cj, dv = ri[ok], cj[ok], dv[ok]
                aq.append(ri + i0)
                ar.append(cj + jj0)
                ad.append(dv)
        if tq:
            qi, rj, dv = np.concatenate(tq), np.concatenate(tr), np.concatenate(td)
            pos, rank = _first_k(qi, rj, dv, r_rank, k)
            rows_q.append(qi[pos])
            rows_r.append(rj[pos])
            rows_d.append(dv[pos])
            rows_rank.append(rank)
    if not rows_q:
        return _empty_neighbours(n_cand, n_cells)
    row_q, row_r = np.concatenate(rows_q).astype(np.int64), np.concatenate(rows_r).astype(np.int64)
    row_d, row_rank = np.concatenate(rows_d), np.concatenate(rows_rank).astype(np.int64)
    cq, cr, cd = np.concatenate(cols_q), np.concatenate(cols_r), np.concatenate(cols_d)
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
    rank_b = _ranks_within_groups(p.ids_b)
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
    """Turns an ``all``/``assignment`` block chunk (``q.camera_id < r.camera_id``) into
    Match dicts."""
    for i, j, d, k in zip(chunk.qi.tolist(), chunk.rj.tolist(), chunk.dist.tolist(),
                          chunk.rank.tolist()):
        yield make_match(q.ids[i], r.ids[j], q.camera_id, r.camera_id, q.ts[i], r.ts[j],
                         d, policy, k, None, window_ms)


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
