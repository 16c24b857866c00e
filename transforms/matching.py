"""Cross-camera matching as a Beam transform: Detections -> Matches.

Public API: :class:`MatchDetections`. The semantics (candidates, metrics, policies,
ties, ranks, output fields) are specified in :mod:`transforms.match_blocks`, whose pure
numpy functions do the work; :func:`transforms.match_blocks.match_arrays` gives the same
results for in-memory arrays.

Pipeline shape
==============
Work is cut into *blocks of event time* ``[kS, (k+1)S)``, one block holding every
camera. ``S`` is ``window_s`` for ``assignment`` (its semantics are per window) and,
for ``all``/``topk``/``mutual`` (whose results do not depend on ``window_s``),
``block_s`` or by default the smallest multiple of ``window_s`` that is at least twice
the widest candidate band (``2 * max_gap_s`` without links). Inside block k, every
camera pair (A, B), A < B, that has candidates is computed in one place: the queries
are A's detections of ``[kS, (k+1)S)``, the references B's detections in their reach
(``[kS + lo, (k+1)S + hi)`` for each candidate interval ``[lo, hi]`` of ``t_B - t_A``:
:func:`~transforms.match_blocks.reach_window_starts`). Each candidate cell (a, b) is
computed exactly once, in the block of a (for ``topk`` and ``mutual`` too: both
directions come out of the same distances).

1. ``BatchDetections``: detections are buffered per (camera, block) over a bundle and
   leave as a few :class:`~transforms.match_blocks.Batch` elements (at most
   ``DEFAULT_MAX_BATCH`` detections each, sorted by (ts, id)) in a plain-bytes wire
   format (:mod:`transforms.match_blocks.wire`; float32 embeddings that float16 holds
   exactly travel as float16). Column chunks whose embeddings are
   :class:`~transforms.match_blocks.StoredRows` (``ReadDetections(as_columns=True)``)
   stay references, 8 bytes a detection, unless their rows span more than half a block
   (each block would decode the whole row group): those are read here.
2. ``RouteToBlocks``: a batch of camera C goes once to every block that needs any of
   its detections: its own block (as queries, when C has a partner after it) and every
   block whose reach, as a reference of some camera before C, contains some of them
   (sliced to exactly those). A detection therefore crosses the shuffle about
   ``1 + (hi - lo) / S`` times (1.5 with the defaults), **whatever the number of
   partner cameras**: partners share the copy that reaches their block.
3. ``GroupBlocks`` (``GroupByKey``, key = block start) then ``ComputeBlocks``: the
   block reads the row groups its references point to (each once:
   :func:`~transforms.detections_io.load_stored_rows`), then every
   camera pair of the block is computed with numpy (tiled matrix products, memory
   bounded by the tile), its two Sides built in float32 arrays reused from pair to
   pair. (Splitting a large pair into separately shuffled parts would copy its
   references in float32 into the shuffle: more memory for no gain, since the tiles
   already bound a pair's working memory and blocks are the unit of parallelism.)
4. ``all`` emits its pairs; ``assignment`` runs the Hungarian algorithm per (window,
   pair) and a per-key combine keeps, for each camera-B detection, its lowest
   (distance, detection_id_a) assignment. ``topk``/``mutual``: each A detection's
   nearest B candidates are final in its block; each B detection's nearest A
   candidates *within the block* (small arrays, keyed by the B detection's block) are
   merged per B detection by a ``GroupByKey`` (``MergeNeighbours``,
   :func:`~transforms.match_blocks.merge_partials`), so ranks are exact.

The shifted control (:class:`ShiftedControl`, calibration) lays the blocks on the
period's own origin, ``2H`` of them, and shifts camera B by ``H`` blocks, circularly.
Block k's control references are then block ``k + H``'s real references moved, so the
two blocks are keyed together (a *unit*, key = block ``k mod H``) and computed in one
place from one set of copies: a detection crosses the shuffle once per unit that needs
it, as itself or shifted (the same ``1 + (hi - lo) / S`` copies, plus the ``hi`` ms that
wrap around the period's ends). A unit holds two blocks.

Memory: a worker holds one block at a time: the detections of every camera in
``S + (hi - lo)`` of event time as received or read (float16 when exact or stored so),
plus two cameras' parts of it in float32 and, while reading, one row group. What a runner
holds between stages is the shuffled volume: about 1.5 copies of every embedding (in
float16 when exact; of a reference for stored rows) plus the partials. On Dataflow that is shuffle storage; the
DirectRunner keeps it in memory, which is why ``cctview match`` and ``calibrate`` run a
long period there as consecutive time chunks (``owned_ms``, :mod:`pipelines.chunks`).

Ownership (``owned_ms=(lo, hi)``): only matches whose camera-A detection has
``lo <= ts < hi`` are emitted. Run on the detections of ``[lo - M, hi + M)`` with ``M``
from :func:`context_margin_ms`, the owned matches are exactly those of a run over all
detections: every detection that can change an owned pair's ranks, neighbours or
assignment lies within the margin.

Metrics (namespace ``cctview.matching``): counters ``candidate_pairs`` (each unordered
candidate pair counted once, before threshold), ``distance_cells`` (cells computed),
``block_compute_ms`` (worker time spent computing blocks' distances and neighbours),
``blocks``, ``blocks_split``, ``matches_emitted``, ``detections_batched`` (detections
in), ``detections_computed`` (each batched detection once: when its own block is
computed, or at routing when no block needs it there; with ``detections_batched`` the
progress line's matching phase, :mod:`transforms.progress`),
``embedding_copies_shuffled`` (detection rows sent to blocks with their embedding:
divided by ``detections_batched`` it is the copies of each embedding that cross the
shuffle), ``row_references_shuffled`` (rows sent as references to their stored row),
``stored_rows_read`` (stored rows decoded to get referenced embeddings),
``shuffled_bytes`` (bytes of block parts and partials sent to a ``GroupByKey``);
distribution ``block_cells`` (query x reference cells per camera pair and block).

Streaming note: blocks are keyed explicitly in the GlobalWindow and a block needs
references up to ``hi`` after its end, which is fine in batch (all inputs are bounded
here); an unbounded source would need event-time windows extended by the reach.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms import match_blocks as mb
from transforms import progress
from transforms.control import SHIFTED, base_camera
from transforms.detections_io import DetectionColumns, load_stored_rows

__all__ = ["DEFAULT_MAX_GAP_S", "DEFAULT_METRIC", "DEFAULT_POLICY", "DEFAULT_TOP_K",
           "DEFAULT_WINDOW_S", "MatchDetections", "ShiftedControl", "block_ms_of",
           "context_margin_ms"]

NAMESPACE = "cctview.matching"
# The defaults of every matching transform, which the CLI's flags show and use
# (pipelines/options.py); the max gap and the window (600 s: `assignment` results depend
# on it) are match_blocks' own, so its in-memory functions agree.
DEFAULT_POLICY = "mutual"
DEFAULT_METRIC = "l2"
DEFAULT_MAX_GAP_S = mb.DEFAULT_MAX_GAP_S
DEFAULT_WINDOW_S = mb.DEFAULT_WINDOW_S
DEFAULT_TOP_K = 1
# Detections of one camera and block travel together, up to this many per element.
DEFAULT_MAX_BATCH = 2048


def block_ms_of(policy: str, window_ms: int, bands: mb.CandidateBands,
                block_s: Optional[float] = None) -> int:
    """The event-time span of a block (ms): ``window_ms`` for ``assignment``; else
    ``block_s`` if given, or the smallest multiple of ``window_ms`` that is at least
    twice the widest candidate band (each reference then travels to 1.5 blocks on
    average: ``1 + band / S``)."""
    if policy == "assignment":
        return window_ms
    if block_s is not None:
        return mb.window_ms_of(block_s)
    return window_ms * max(1, math.ceil(2 * bands.max_width_ms() / window_ms))


def context_margin_ms(policy: str, bands: mb.CandidateBands, window_ms: int) -> int:
    """How far beyond an owned time range the detections that decide its matches lie.

    With ``R`` the largest ``|dt|`` of a candidate: ``all`` needs ``R`` (an owned A
    detection's candidates and ranks); ``topk``/``mutual`` ``2R`` (the candidates of
    those candidates decide B's ranks and nearest neighbours); ``assignment``
    ``3R + 2W`` (``W`` = the window: the whole windows of the A detections that compete
    for those B detections, wherever the range's edges fall, and their columns)."""
    reach = bands.reach_ms()
    if policy == "all":
        return reach
    if policy == "assignment":
        return 3 * reach + 2 * window_ms
    return 2 * reach


class _BatchDetections(beam.DoFn):
    """Detections -> encoded Batches per (camera, block), buffered over a bundle.

    Batches leave in their detections' window (re-windowed into the GlobalWindow right
    after, a few elements instead of every detection); a (camera, block) may leave as
    several batches (full buffers, several bundles or input windows): blocks
    concatenate them.
    """

    def __init__(self, block_ms: int, max_size: int, origin_ms: int = 0):
        self.block_ms = int(block_ms)
        self.origin_ms = int(origin_ms)
        self.max_size = int(max_size)
        self.detections = progress.counter(NAMESPACE, "detections_batched")
        self.stored_rows = Metrics.counter(NAMESPACE, "stored_rows_read")
        self._buffers: dict = {}

    def start_bundle(self):
        self._buffers = {}

    def process(self, det, window=beam.DoFn.WindowParam):
        if isinstance(det, DetectionColumns):
            yield from self._columns(det, window)
            return
        ts = int(det["frame_ts_ms"])
        key = (window, str(det["camera_id"]), (ts - self.origin_ms) // self.block_ms)
        buf = self._buffers.setdefault(key, [])
        buf.append((str(det["detection_id"]), ts, np.asarray(det["embedding"]).reshape(-1)))
        if len(buf) >= self.max_size:
            del self._buffers[key]
            yield from self._emit(key, buf)

    def finish_bundle(self):
        buffers, self._buffers = self._buffers, {}
        for key, buf in buffers.items():
            yield from self._emit(key, buf)

    def _emit(self, key, records):
        window, cam, k = key
        yield from self._encoded(window, mb.make_batches(
            self.origin_ms + k * self.block_ms, records, self.max_size, cam))

    def _columns(self, cols: DetectionColumns, window):
        """A chunk of many detections: grouped by (camera, block) with numpy, no buffering
        (a chunk is already thousands of detections). Stored rows that span more than
        half a block are read here (the blocks would each decode all of their row group)."""
        if isinstance(cols.embedding, mb.StoredRows) and len(cols) and (
                cols.frame_ts_ms.max() - cols.frame_ts_ms.min() > self.block_ms // 2):
            (emb,), decoded = load_stored_rows([cols.embedding])
            self.stored_rows.inc(decoded)
            cols = DetectionColumns(cols.camera_id, cols.frame_ts_ms, cols.detection_id, emb)
        blocks = (cols.frame_ts_ms - self.origin_ms) // self.block_ms
        groups = np.lexsort((blocks, cols.camera_id))
        cams, ks = cols.camera_id[groups], blocks[groups]
        edges = np.flatnonzero((cams[1:] != cams[:-1]) | (ks[1:] != ks[:-1])) + 1
        for rows in np.split(groups, edges):
            yield from self._encoded(window, mb.batches_from_arrays(
                self.origin_ms + int(blocks[rows[0]]) * self.block_ms, cols.detection_id[rows],
                cols.frame_ts_ms[rows], cols.embedding[rows], self.max_size,
                str(cols.camera_id[rows[0]])))

    def _encoded(self, window, batches):
        for batch in batches:
            self.detections.inc(len(batch))
            batch = mb.Batch(batch.window_start_ms, batch.ids, batch.ts,
                             mb.compact_embeddings(batch.emb), batch.camera_id)
            yield WindowedValue(mb.encode_batch(batch),
                                Timestamp(micros=int(batch.ts[0]) * 1000), (window,))


class _RouteToBlocks(beam.DoFn):
    """Encoded Batch -> (block start, encoded Batch) once per block that needs any of
    its detections; a reference part holds exactly the detections in that block's
    reach. With a :class:`ShiftedControl`, the key is the block's unit, and a part holds
    the detections the unit's two blocks need, as themselves or shifted."""

    def __init__(self, bands: mb.CandidateBands, block_ms: int, control=None,
                 origin_ms: int = 0):
        self.bands = bands
        self.block_ms = int(block_ms)
        self.origin_ms = int(origin_ms)
        self.control = control
        self.copies = Metrics.counter(NAMESPACE, "embedding_copies_shuffled")
        self.references = Metrics.counter(NAMESPACE, "row_references_shuffled")
        self.bytes = Metrics.counter(NAMESPACE, "shuffled_bytes")
        self.computed = progress.counter(NAMESPACE, "detections_computed")

    def process(self, data):
        batch = mb.decode_batch(data)
        stored = isinstance(batch.emb, mb.StoredRows)
        cam, own = batch.camera_id, batch.window_start_ms
        targets: dict = {}  # block start -> rows needed there (None: all)
        if self.bands.has_later_partner(cam):
            targets[own] = None
        iv = self.bands.reference_intervals(cam)
        if len(iv):
            self._reach(targets, batch.ts, iv)
            if self.control is not None:  # and where its shifted copy is needed
                self._reach(targets, self.control.shift(batch.ts), iv)
        if self.control is not None:
            targets, own = self._units(targets), self.control.unit_of(own)
        at_own = 0  # rows that go to their own block, counted computed there
        for start, keep in sorted(targets.items()):
            if keep is None or keep.all():
                part, rows = data, len(batch)
            elif keep.any():
                part, rows = mb.encode_batch(batch.take(keep)), int(keep.sum())
            else:
                continue
            at_own += rows if start == own else 0
            (self.references if stored else self.copies).inc(rows)
            self.bytes.inc(len(part))
            yield start, part
        self.computed.inc(len(batch) - at_own)

    def _units(self, targets: dict) -> dict:
        """Block starts -> rows needed there, merged per unit of the control."""
        units: dict = {}
        for start, keep in targets.items():
            unit = self.control.unit_of(start)
            if unit is None:
                continue
            if unit in units:
                keep = None if keep is None or units[unit] is None else keep | units[unit]
            units[unit] = keep
        return units

    def _reach(self, targets: dict, ts: np.ndarray, iv: np.ndarray) -> None:
        """Adds, per block whose reach holds some of the times ``ts`` (sorted, or two
        sorted runs where a circular shift wrapped), the rows it needs."""
        cut = int(np.argmax(np.diff(ts) < 0)) + 1 if len(ts) > 1 and (np.diff(ts) < 0).any() else 0
        for run in ((ts[:cut], ts[cut:]) if cut else (ts,)):
            for k_start in mb.reach_window_starts(int(run.min()) - self.origin_ms,
                                                  self.block_ms, iv,
                                                  t_max_ms=int(run.max()) - self.origin_ms):
                start = self.origin_ms + k_start
                if start in targets and targets[start] is None:
                    continue
                keep = mb.in_reach(ts, start, self.block_ms, iv)
                previous = targets.get(start)
                targets[start] = keep if previous is None else (keep | previous)


class _ComputeBlock(beam.DoFn):
    """A (query Side, reference Side) camera pair of a block -> Match dicts (main output)
    and, for ``topk``/``mutual``, tagged ``partials``: ((cam_a, cam_b, block of the B
    detections), encoded :class:`~transforms.match_blocks.Partial`) for
    ``MergeNeighbours``."""

    def __init__(self, bands, policy, metric, threshold, top_k, window_ms, block_ms):
        self.bands = bands
        self.policy = policy
        self.metric = metric
        self.threshold = threshold
        self.top_k = top_k
        self.window_ms = window_ms
        self.block_ms = block_ms
        self.candidate_pairs = Metrics.counter(NAMESPACE, "candidate_pairs")
        self.distance_cells = Metrics.counter(NAMESPACE, "distance_cells")
        self.compute_ms = Metrics.counter(NAMESPACE, "block_compute_ms")
        self.bytes = Metrics.counter(NAMESPACE, "shuffled_bytes")
        self._workspace = None

    def setup(self):
        self._workspace = mb.Workspace()

    def process(self, pair):
        yield from self.compute(*pair)

    def compute(self, q, r):
        iv = self.bands.intervals(q.camera_id, base_camera(r.camera_id))
        if self.policy in ("all", "assignment"):
            chunks = mb.block_matches(q, r, iv, self.policy, self.metric, self.threshold,
                                      self.top_k)
            while True:
                started = time.perf_counter()
                chunk = next(chunks, None)
                self.compute_ms.inc(round((time.perf_counter() - started) * 1000))
                if chunk is None:
                    break
                self.distance_cells.inc(chunk.n_cells)
                self.candidate_pairs.inc(chunk.n_candidates)
                yield from mb.block_outputs(q, r, chunk, self.policy, self.window_ms)
            return
        k = 1 if self.policy == "mutual" else self.top_k
        if self._workspace is None:
            self._workspace = mb.Workspace()
        started = time.perf_counter()
        nb = mb.neighbour_block(q, r, iv, self.metric, self.threshold, k,
                                workspace=self._workspace)
        self.compute_ms.inc(round((time.perf_counter() - started) * 1000))
        self.distance_cells.inc(nb.n_cells)
        self.candidate_pairs.inc(nb.n_candidates)
        matches, partial = mb.neighbour_outputs(q, r, nb, self.policy, self.window_ms)
        yield from matches
        if not len(partial):
            return
        groups = partial.ts_b // self.block_ms
        for g in np.unique(groups).tolist():
            part = mb.encode_partial(
                partial if groups[0] == groups[-1] == g else partial.take(groups == g))
            self.bytes.inc(len(part))
            yield beam.pvalue.TaggedOutput(
                "partials", ((q.camera_id, r.camera_id, g * self.block_ms), part))


class ShiftedControl:
    """A time-shift control computed in the real pairs' own blocks: camera B's
    detections moved half the period later, circularly within ``[start_ms, start_ms +
    span_ms)`` (so the control has the real traffic density everywhere), on the virtual
    camera ``B~`` with ids ``id~`` (:mod:`transforms.control`).

    The period is laid out as ``2H`` blocks of ``block_ms`` on its own origin
    (``start_ms``), with ``H`` as many pairs of blocks of at least ``min_block_ms`` as
    the data's span holds; ``span_ms`` is that span rounded up to ``2H`` ms, and the
    shift is ``H`` blocks. Block ``k`` and block ``k + H`` are then computed together
    (a *unit*, keyed by block ``k mod H``): each holds the other's control references,
    so the control crosses the shuffle in the real pairs' copies and costs no shuffled
    bytes of its own (only the ``hi`` ms that wrap around the period's ends travel
    again).
    """

    def __init__(self, start_ms: int, span_ms: int, min_block_ms: int):
        if int(span_ms) < 2 or int(min_block_ms) < 1:
            raise ValueError("the control needs a period of at least 2 ms and blocks of 1 ms")
        self.half_blocks = max(1, int(span_ms) // (2 * int(min_block_ms)))
        self.block_ms = -(-int(span_ms) // (2 * self.half_blocks))
        self.start_ms = int(start_ms)
        self.shift_ms = self.half_blocks * self.block_ms
        self.span_ms = 2 * self.shift_ms

    def shift(self, ts: np.ndarray) -> np.ndarray:
        return self.start_ms + (ts - self.start_ms + self.shift_ms) % self.span_ms

    def shifted(self, batch: mb.Batch) -> mb.Batch:
        return mb.Batch(batch.window_start_ms, np.char.add(batch.ids, SHIFTED),
                        self.shift(batch.ts), batch.emb, batch.camera_id + SHIFTED)

    def unit_of(self, block_start_ms: int) -> Optional[int]:
        """The unit (its first block's start) that computes a block; None for a block
        outside the period, which holds no queries."""
        k = (int(block_start_ms) - self.start_ms) // self.block_ms
        if not 0 <= k < 2 * self.half_blocks:
            return None
        return self.start_ms + (k % self.half_blocks) * self.block_ms

    def unit_blocks(self, unit_ms: int) -> Tuple[int, int]:
        """The starts of a unit's two blocks, half a period apart."""
        return int(unit_ms), int(unit_ms) + self.shift_ms


class _ComputeBlocks(_ComputeBlock):
    """(block start, [encoded Batch]) -> the results of every camera pair of the block
    (as :class:`_ComputeBlock`), its Sides in this worker's reused workspace. With a
    :class:`ShiftedControl` the key is a unit: both its blocks are computed, each
    against its references as they are and shifted.

    For ``assignment``, a camera pair above ``max_cells`` query x reference cells is
    solved in query chunks (its semantics; the other policies' results do not depend on
    it, and their tiles bound the memory anyway).
    """

    def __init__(self, bands, policy, metric, threshold, top_k, window_ms, block_ms,
                 max_cells, control=None):
        super().__init__(bands, policy, metric, threshold, top_k, window_ms, block_ms)
        self.max_cells = max_cells
        self.control = control
        self.blocks = Metrics.counter(NAMESPACE, "blocks")
        self.blocks_split = Metrics.counter(NAMESPACE, "blocks_split")
        self.block_cells = Metrics.distribution(NAMESPACE, "block_cells")
        self.computed = progress.counter(NAMESPACE, "detections_computed")
        self.stored_rows = Metrics.counter(NAMESPACE, "stored_rows_read")

    def process(self, element):
        start, parts = element
        if self._workspace is None:
            self._workspace = mb.Workspace()
        batches = self._loaded([mb.decode_batch(p) for p in parts])
        starts = (int(start),) if self.control is None else self.control.unit_blocks(start)
        for q, r in (pair for s in starts for pair in self._pairs(s, batches)):
            self.blocks.inc()
            self.block_cells.update(len(q) * len(r))
            split = [(q, r)]
            if self.policy == "assignment" and len(q) * len(r) > self.max_cells:
                split = mb.split_block(
                    q, r, self.bands.intervals(q.camera_id, base_camera(r.camera_id)),
                    self.max_cells)
                self.blocks_split.inc(len(split) > 1)
            for sq, sr in split:
                yield from self.compute(sq, sr)
        self.computed.inc(sum(len(b) for b in batches if b.window_start_ms in starts))

    def _loaded(self, batches: list) -> list:
        """The batches with the embeddings of their :class:`~transforms.match_blocks.StoredRows`
        read from storage (each row group the block needs decoded once)."""
        stored = [i for i, b in enumerate(batches) if isinstance(b.emb, mb.StoredRows)]
        if not stored:
            return batches
        embs, decoded = load_stored_rows([batches[i].emb for i in stored])
        self.stored_rows.inc(decoded)
        batches = list(batches)
        for i, emb in zip(stored, embs):
            b = batches[i]
            batches[i] = mb.Batch(b.window_start_ms, b.ids, b.ts, emb, b.camera_id)
        return batches

    def _pairs(self, start: int, batches):
        """(queries of camera A in the block, references of camera B in their reach) for
        every camera pair A < B of the block that has candidates.

        Sides are built pair by pair in two workspace arrays ("q", kept while A's pairs
        are computed, and "r"): a block's float32 memory is two cameras' parts, however
        many cameras it holds (the batches themselves stay as received, float16 when
        exact)."""
        by_camera: dict = {}
        for batch in batches:
            if len(batch):
                by_camera.setdefault(batch.camera_id, []).append(batch)
        cameras = sorted(by_camera)
        for i, qc in enumerate(cameras):
            q_keep = [(b.ts >= start) & (b.ts < start + self.block_ms) for b in by_camera[qc]]
            q = None
            for rc in cameras[i + 1:]:
                iv = self.bands.intervals(qc, rc)
                if not len(iv):
                    continue
                if q is None:
                    q = self._side(qc, [b.take(k) for b, k in zip(by_camera[qc], q_keep)], "q")
                if not len(q):
                    break
                for camera_r, batches_r in self._references(rc, by_camera[rc], start, iv):
                    r = self._side(camera_r, batches_r, "r")
                    if len(r):
                        yield q, r

    def _references(self, camera: str, batches, start: int, iv: np.ndarray):
        """(camera, batches) of camera B's references in the reach of block ``start``: as
        they are and, with the control, shifted (only the rows whose shifted time is in
        the reach are shifted)."""
        yield camera, [b.take(mb.in_reach(b.ts, start, self.block_ms, iv)) for b in batches]
        if self.control is not None:
            shift = self.control.shift
            yield camera + SHIFTED, [
                self.control.shifted(b.take(mb.in_reach(shift(b.ts), start, self.block_ms, iv)))
                for b in batches]

    def _side(self, camera: str, batches, name: str) -> mb.Side:
        batches = [b for b in batches if len(b)]
        rows = sum(len(b) for b in batches)
        out = None
        if rows:
            dim = int(np.asarray(batches[0].emb).reshape(len(batches[0]), -1).shape[1])
            out = self._workspace.get(name, (rows, dim))
        return mb.side_from_batches(camera, batches, self.metric, out=out)


class _MergeNeighbours(beam.DoFn):
    def __init__(self, policy, top_k, window_ms):
        self.policy = policy
        self.top_k = top_k
        self.window_ms = window_ms

    def process(self, element):
        (cam_a, cam_b, _), partials = element
        yield from mb.merge_partials(cam_a, cam_b, [mb.decode_partial(p) for p in partials],
                                     self.policy, self.top_k, self.window_ms)


class _LowestAssignment(beam.CombineFn):
    """Keeps the Match with the lowest (distance, detection_id_a)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, m):
        if acc is None or mb.assignment_order(m) < mb.assignment_order(acc):
            return m
        return acc

    def merge_accumulators(self, accs):
        best = None
        for a in accs:
            if a is not None:
                best = self.add_input(best, a)
        return best

    def extract_output(self, acc):
        return acc


class _CountMatches(beam.DoFn):
    """Emits the owned matches, timestamped with their camera-A detection's time."""

    def __init__(self, owned_ms: Optional[Tuple[int, int]]):
        self.owned_ms = owned_ms
        self.matches = Metrics.counter(NAMESPACE, "matches_emitted")

    def process(self, m):
        if m is None:
            return
        ts = m["frame_ts_a_ms"]
        if self.owned_ms is not None and not self.owned_ms[0] <= ts < self.owned_ms[1]:
            return
        self.matches.inc()
        yield TimestampedValue(m, Timestamp(micros=ts * 1000))


class MatchDetections(beam.PTransform):
    """PCollection of Detection dicts -> PCollection of Match dicts (GlobalWindow).

    Args:
      policy: ``all``, ``topk``, ``mutual`` (default) or ``assignment``.
      metric: ``l2`` (default) or ``cosine``.
      max_gap_s: candidates have ``0 < |dt| <= max_gap_s`` (ignored with ``links``).
      window_s: size of the fixed event-time windows; results of
        ``all``/``topk``/``mutual`` do not depend on it (only ``window_start_ms`` /
        ``window_end_ms``, the window of the camera-A detection, do); ``assignment`` is
        solved per window of the camera-A detections, so it does (and its blocks are
        these windows).
      threshold: keep pairs with ``distance <= threshold``; None = no threshold.
      top_k: neighbours per detection and other camera for ``topk``.
      links: None or a list of links.json objects (validated, e.g. by
        :func:`transforms.links.load_links`): only linked camera pairs, only inside the
        links' dt bands.
      max_candidates_per_block: for ``assignment``, a camera pair of a block with more
        query x reference cells is solved in consecutive query chunks (see
        ``assignment`` in :mod:`transforms.match_blocks`); no effect on the other
        policies.
      block_s: span of the blocks of ``all``/``topk``/``mutual`` (a performance knob
        with no effect on results); None: the smallest multiple of ``window_s`` that
        covers the widest candidate band.
      owned_ms: ``(lo, hi)`` epoch ms: emit only the matches whose camera-A detection
        has ``lo <= ts < hi`` (see the module docstring: one time chunk of a longer
        run); None: every match.
      control: a :class:`ShiftedControl`: also match every pair (A, B) against B's
        detections shifted in time (virtual camera ``B~``): a time-shift control
        computed in the same blocks as the real pairs, from the same shuffled copies
        (calibration), its matches emitted beside the real ones. Its blocks (their
        span and origin) replace ``block_s``; not with ``assignment``.

    Output elements are in the GlobalWindow, timestamped with ``frame_ts_a_ms``.

    Input elements need ``camera_id`` (str), ``frame_ts_ms`` (int, UTC epoch ms),
    ``detection_id`` (unique str) and ``embedding`` (1-d array-like, same length for
    all); other keys are ignored. They may also be
    :class:`~transforms.detections_io.DetectionColumns` chunks (``ReadDetections(...,
    as_columns=True)``): the same detections as arrays, which skips building a Python
    object per detection between Parquet and the blocks. Event timestamps are
    (re)assigned from ``frame_ts_ms``; any input windowing is discarded. The full
    semantics are in :mod:`transforms.match_blocks`.
    """

    # Callers that read stored detections may hand DetectionColumns chunks (see above).
    accepts_columns = True

    def __init__(self, policy: str = DEFAULT_POLICY, metric: str = DEFAULT_METRIC,
                 max_gap_s: float = DEFAULT_MAX_GAP_S, window_s: float = DEFAULT_WINDOW_S,
                 threshold: Optional[float] = None, top_k: int = DEFAULT_TOP_K, links=None,
                 max_candidates_per_block: int = mb.DEFAULT_MAX_CANDIDATES_PER_BLOCK,
                 label: Optional[str] = None, block_s: Optional[float] = None,
                 owned_ms: Optional[Tuple[int, int]] = None,
                 control: Optional[ShiftedControl] = None):
        super().__init__(label)
        mb.check_params(policy, metric, top_k, threshold)
        if int(max_candidates_per_block) < 1:
            raise ValueError("max_candidates_per_block must be >= 1")
        self.policy = policy
        self.metric = metric
        self.threshold = None if threshold is None else float(threshold)
        self.top_k = int(top_k)
        self.window_ms = mb.window_ms_of(window_s)
        self.bands = mb.CandidateBands(max_gap_s, links)
        if control is not None and policy == "assignment":
            raise ValueError("a shifted control needs the blocks of all/topk/mutual")
        self.block_ms = (block_ms_of(policy, self.window_ms, self.bands, block_s)
                         if control is None else control.block_ms)
        self.origin_ms = 0 if control is None else control.start_ms
        self.max_cells = int(max_candidates_per_block)
        self.max_batch = DEFAULT_MAX_BATCH
        self.owned_ms = None if owned_ms is None else (int(owned_ms[0]), int(owned_ms[1]))
        self.control = control

    def expand(self, detections):
        p = self.policy
        keyed = (detections
                 | "BatchDetections" >> beam.ParDo(
                     _BatchDetections(self.block_ms, self.max_batch, self.origin_ms))
                 | "InGlobalWindow" >> beam.WindowInto(GlobalWindows())
                 | "RouteToBlocks" >> beam.ParDo(
                     _RouteToBlocks(self.bands, self.block_ms, self.control, self.origin_ms)))
        compute = dict(bands=self.bands, policy=p, metric=self.metric,
                       threshold=self.threshold, top_k=self.top_k, window_ms=self.window_ms,
                       block_ms=self.block_ms)
        whole = (keyed
                 | "GroupBlocks" >> beam.GroupByKey()
                 | "ComputeBlocks" >> beam.ParDo(
                     _ComputeBlocks(max_cells=self.max_cells, control=self.control,
                                    **compute)).with_outputs("partials", main="matches"))
        matches = whole.matches
        count = _CountMatches(self.owned_ms)
        if p == "assignment":
            return (matches
                    | "KeyByDetectionB" >> beam.WithKeys(mb.assignment_key)
                    | "LowestPerDetectionB" >> beam.CombinePerKey(_LowestAssignment())
                    | "DropKeys" >> beam.Values()
                    | "CountMatches" >> beam.ParDo(count))
        if p == "all":
            return matches | "CountMatches" >> beam.ParDo(count)
        merged = (whole.partials
                  | "GroupNeighbours" >> beam.GroupByKey()
                  | "MergeNeighbours" >> beam.ParDo(
                      _MergeNeighbours(p, self.top_k, self.window_ms)))
        return ((matches, merged)
                | "FlattenMatches" >> beam.Flatten()
                | "CountMatches" >> beam.ParDo(count))
