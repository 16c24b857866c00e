"""Cross-camera matching as a Beam transform: Detections -> Matches.

Public API: :class:`MatchDetections` (and :class:`MatchBlockWindows`, the same block
assignment as a Beam WindowFn). The semantics (candidates, metrics, policies, ties,
ranks, output fields) are specified in :mod:`transforms.match_blocks`, whose pure numpy
functions do the work; :func:`transforms.match_blocks.match_arrays` gives the same
results for in-memory arrays.

Pipeline shape
==============
Work is cut into *blocks*: (camera A, camera B, A < B, block of event time
``[kS, (k+1)S)`` of the camera-A detections). ``S`` is ``window_s`` for ``assignment``
(its semantics are per window) and, for ``all``/``topk``/``mutual`` (whose results do
not depend on ``window_s``), ``block_s`` or by default the smallest multiple of
``window_s`` that is at least twice the widest candidate band (``2 * max_gap_s``
without links): each reference detection then travels to ``1 + band / S`` = 1.5 blocks
on average instead of ``1 + band / window_s`` windows (11 with the defaults). Each
candidate cell (a, b) is computed exactly once, in the block of a (for ``topk`` and
``mutual`` too: both directions come out of the same distances).

1. ``BatchDetections``: detections are buffered per (camera, block) over a bundle and
   leave as a few :class:`~transforms.match_blocks.Batch` elements (at most
   ``DEFAULT_MAX_BATCH`` detections each, sorted by (ts, id)), in a plain-bytes wire
   format (:func:`~transforms.match_blocks.encode_batch`: no pickled arrays, UTF-8 ids,
   arrays that decode as views). float32 embeddings that float16 holds exactly (e.g.
   CCTView's float16 Parquet read as float32) travel as float16, which halves the bytes
   shuffled below and loses nothing.
2. ``KeyByBlock``: every batch of camera C becomes the *query* part of the blocks
   ``(C, R, k)`` for every partner R > C and, sliced to exactly the detections in each
   block's reach, a *reference* part of every block ``(Q, C, j)`` (Q < C) whose reach
   contains some of them (the reach of block j is ``[jS + lo, (j+1)S + hi)`` for each
   candidate interval ``[lo, hi]`` of ``t_ref - t_query``: see
   :func:`~transforms.match_blocks.reach_window_starts`). Partners: every other camera
   (a side input of distinct camera ids) or, with links, the linked ones.
3. ``GroupBlocks`` (``GroupByKey`` in the GlobalWindow, keys carry the block): one
   group per block, built and computed in the same step (``ComputeBlocks``), the Sides
   in arrays the worker reuses from block to block. A block above
   ``max_candidates_per_block`` query x reference cells is split into query chunks
   that go through a ``Reshuffle`` so that they spread over workers.
4. The block is computed with numpy (tiled matrix products, memory bounded by the
   tile). ``all`` emits its pairs; ``assignment`` runs the Hungarian algorithm per block
   and a per-key combine keeps, for each camera-B detection, its lowest
   (distance, detection_id_a) assignment. ``topk``/``mutual``: one pass over the block's
   distances (:func:`~transforms.match_blocks.neighbour_block`) gives each A detection
   its final nearest B candidates (the block holds all of them) and each B detection
   its nearest A candidates *within the block*; the latter (small arrays, grouped by the
   B detection's block) are merged per B detection by a ``GroupByKey``
   (``MergeNeighbours``, :func:`~transforms.match_blocks.merge_partials`): the merged
   order is exact, so ranks are exact, and a pair is output when the policy's sides
   selected it (``mutual``: both, ranks 1 and 1).

Metrics (namespace ``cctview.matching``): counters ``candidate_pairs`` (each unordered
candidate pair counted once, before threshold), ``distance_cells`` (cells computed),
``block_compute_ms`` (worker time spent computing blocks' distances and neighbours,
summed over workers: set against the wall time it shows what the runner itself costs),
``blocks``, ``blocks_split``, ``matches_emitted``; distribution ``block_cells``
(query x reference cells per block).

Streaming note: blocks are keyed explicitly in the GlobalWindow and a block needs
references up to ``hi`` after its end, which is fine in batch (all inputs are bounded
here); an unbounded source would need event-time windows extended by the reach.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import (GlobalWindows, IntervalWindow,
                                           NonMergingWindowFn, TimestampedValue)
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms import match_blocks as mb
from transforms.detections_io import DetectionColumns

NAMESPACE = "cctview.matching"
# Detections of one camera and block travel together, up to this many per element.
DEFAULT_MAX_BATCH = 2048
QUERY, REF = 0, 1


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


class MatchBlockWindows(NonMergingWindowFn):
    """Fixed windows of ``window_ms`` for block elements ``((q_cam, r_cam), (role, batch))``.

    The WindowFn form of the blocks :class:`MatchDetections` keys explicitly (same
    reach): ``batch`` is a :class:`transforms.match_blocks.Batch`: detections of one
    camera in one fixed window. ``role == QUERY``: the batch's own fixed window
    ``[kW, (k+1)W)`` (what ``FixedWindows(window_s)`` gives its detections).
    ``role == REF``: every fixed window whose reach contains one of the batch's
    detections, the reach of window k for the pair being ``[kW + lo, (k+1)W + hi)`` for
    each interval ``[lo, hi]`` of ``t_ref - t_query`` allowed by
    ``bands.intervals(q_cam, r_cam)`` (see
    :func:`transforms.match_blocks.reach_window_starts`): each reference detection is in
    exactly the windows whose reach covers it, and its batch in their union.
    """

    def __init__(self, window_ms: int, bands: mb.CandidateBands):
        self.window_ms = int(window_ms)
        self.bands = bands

    def assign(self, context):
        (q_cam, r_cam), (role, batch) = context.element
        if role == QUERY:
            starts = [batch.window_start_ms]
        else:
            starts = mb.reach_window_starts(int(batch.ts[0]), self.window_ms,
                                            self.bands.intervals(q_cam, r_cam),
                                            t_max_ms=int(batch.ts[-1]))
        w_us = self.window_ms * 1000
        return [IntervalWindow(Timestamp(micros=s * 1000), Timestamp(micros=s * 1000 + w_us))
                for s in starts]

    def get_window_coder(self):
        return coders.IntervalWindowCoder()

    def __eq__(self, other):
        return (type(self) is type(other) and self.window_ms == other.window_ms
                and self.bands == other.bands)

    def __hash__(self):
        return hash((type(self).__name__, self.window_ms, self.bands))

    def __repr__(self):
        return "MatchBlockWindows(%d ms, %r)" % (self.window_ms, self.bands)


def compact_embeddings(emb: np.ndarray) -> np.ndarray:
    """float32 embeddings as float16 when float16 holds every value exactly (a lossless
    halving of what is shuffled; the blocks compute in float32 either way)."""
    if emb.dtype != np.float32 or not emb.size:
        return emb
    with np.errstate(over="ignore", invalid="ignore"):  # out of range: not exact anyway
        half = emb.astype(np.float16)
    return half if np.array_equal(half, emb) else emb


class _BatchDetections(beam.DoFn):
    """Detections -> (camera, encoded Batch) per (camera, block), buffered over a bundle.

    Batches leave in their detections' window (re-windowed into the GlobalWindow right
    after, a few elements instead of every detection); a (camera, block) may leave as
    several batches (full buffers, several bundles or input windows): blocks
    concatenate them.
    """

    def __init__(self, block_ms: int, max_size: int):
        self.block_ms = int(block_ms)
        self.max_size = int(max_size)
        self._buffers: dict = {}

    def start_bundle(self):
        self._buffers = {}

    def process(self, det, window=beam.DoFn.WindowParam):
        if isinstance(det, DetectionColumns):
            yield from self._columns(det, window)
            return
        emb = np.asarray(det["embedding"])
        ts = int(det["frame_ts_ms"])
        key = (window, str(det["camera_id"]), ts // self.block_ms)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = []
        buf.append((str(det["detection_id"]), ts, emb.reshape(-1)))
        if len(buf) >= self.max_size:
            del self._buffers[key]
            yield from self._emit(key, buf)

    def finish_bundle(self):
        buffers, self._buffers = self._buffers, {}
        for key, buf in buffers.items():
            yield from self._emit(key, buf)

    def _emit(self, key, records):
        window, cam, k = key
        yield from self._encoded(window, cam, mb.make_batches(k * self.block_ms, records, self.max_size))

    def _columns(self, cols: DetectionColumns, window):
        """A chunk of many detections: grouped by (camera, block) with numpy, no buffering
        (a chunk is already thousands of detections)."""
        blocks = cols.frame_ts_ms // self.block_ms
        groups = np.lexsort((blocks, cols.camera_id))
        cams, ks = cols.camera_id[groups], blocks[groups]
        edges = np.flatnonzero((cams[1:] != cams[:-1]) | (ks[1:] != ks[:-1])) + 1
        for rows in np.split(groups, edges):
            yield from self._encoded(window, str(cols.camera_id[rows[0]]), mb.batches_from_arrays(
                int(blocks[rows[0]]) * self.block_ms, cols.detection_id[rows],
                cols.frame_ts_ms[rows], cols.embedding[rows], self.max_size))

    @staticmethod
    def _encoded(window, cam, batches):
        for batch in batches:
            batch = mb.Batch(batch.window_start_ms, batch.ids, batch.ts,
                             compact_embeddings(batch.emb))
            yield WindowedValue((cam, mb.encode_batch(batch)),
                                Timestamp(micros=int(batch.ts[0]) * 1000), (window,))


class _KeyByBlock(beam.DoFn):
    """(camera, encoded Batch) -> ((q_cam, r_cam, block_start_ms), (role, encoded Batch))
    per block fed (batches travel as :func:`~transforms.match_blocks.encode_batch`
    bytes). A reference part holds exactly the batch's detections in that block's reach.
    """

    def __init__(self, bands: mb.CandidateBands, block_ms: int, cameras=None):
        self.bands = bands
        self.block_ms = int(block_ms)
        self.cameras = None if cameras is None else frozenset(cameras)

    def process(self, cam_batch, cameras=()):
        cam, data = cam_batch
        if self.cameras is not None:
            if cam not in self.cameras:
                raise ValueError("camera %r is not among the cameras MatchDetections was "
                                 "given" % (cam,))
            cameras = self.cameras
        batch = mb.decode_batch(data)
        for other in self.bands.partners(cam, cameras):
            if cam < other:
                yield (cam, other, batch.window_start_ms), (QUERY, data)
                continue
            iv = self.bands.intervals(other, cam)
            for start in mb.reach_window_starts(int(batch.ts[0]), self.block_ms, iv,
                                                t_max_ms=int(batch.ts[-1])):
                keep = mb.in_reach(batch.ts, start, self.block_ms, iv)
                if keep.all():
                    part = data
                else:
                    if not keep.any():
                        continue
                    part = mb.encode_batch(mb.Batch(batch.window_start_ms, batch.ids[keep],
                                                    batch.ts[keep], batch.emb[keep]))
                yield (other, cam, start), (REF, part)


class _ComputeBlock(beam.DoFn):
    """A (query Side, reference Side) block -> Match dicts (main output) and, for
    ``topk``/``mutual``, tagged ``partials``: ((cam_a, cam_b, block of the B
    detections), :class:`~transforms.match_blocks.Partial`) for ``MergeNeighbours``."""

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
        self._workspace = None

    def setup(self):
        self._workspace = mb.Workspace()

    def process(self, block):
        yield from self.compute(*block)

    def compute(self, q, r):
        iv = self.bands.intervals(q.camera_id, r.camera_id)
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
            part = partial if groups[0] == groups[-1] == g else partial.take(groups == g)
            yield beam.pvalue.TaggedOutput(
                "partials", ((q.camera_id, r.camera_id, g * self.block_ms), part))


class _BuildAndComputeBlocks(_ComputeBlock):
    """(q_cam, r_cam, start), [(role, encoded Batch)] -> the block's results (as
    :class:`_ComputeBlock`), its Sides built in this worker's reused workspace.

    A block above ``max_cells`` query x reference cells is split into query chunks
    instead, emitted (on fresh arrays) to the tagged output ``split`` to be reshuffled.
    """

    def __init__(self, bands, policy, metric, threshold, top_k, window_ms, block_ms,
                 max_cells):
        super().__init__(bands, policy, metric, threshold, top_k, window_ms, block_ms)
        self.max_cells = max_cells
        self.blocks = Metrics.counter(NAMESPACE, "blocks")
        self.blocks_split = Metrics.counter(NAMESPACE, "blocks_split")
        self.block_cells = Metrics.distribution(NAMESPACE, "block_cells")

    def process(self, element):
        (q_cam, r_cam, _), values = element
        qs, rs = [], []
        for role, data in values:
            (qs if role == QUERY else rs).append(mb.decode_batch(data))
        nq, nr = sum(len(b) for b in qs), sum(len(b) for b in rs)
        if not nq or not nr:
            return
        self.blocks.inc()
        self.block_cells.update(nq * nr)
        if nq * nr > self.max_cells:
            q = mb.side_from_batches(q_cam, qs, self.metric)
            r = mb.side_from_batches(r_cam, rs, self.metric)
            parts = mb.split_block(q, r, self.bands.intervals(q_cam, r_cam), self.max_cells)
            if len(parts) > 1:
                self.blocks_split.inc()
                for part in parts:
                    yield beam.pvalue.TaggedOutput("split", part)
                return
        else:
            if self._workspace is None:
                self._workspace = mb.Workspace()
            ws = self._workspace
            q = mb.side_from_batches(q_cam, qs, self.metric, workspace=ws, name="q")
            r = mb.side_from_batches(r_cam, rs, self.metric, workspace=ws, name="r")
        yield from self.compute(q, r)


class _MergeNeighbours(beam.DoFn):
    def __init__(self, policy, top_k, window_ms):
        self.policy = policy
        self.top_k = top_k
        self.window_ms = window_ms

    def process(self, element):
        (cam_a, cam_b, _), partials = element
        yield from mb.merge_partials(cam_a, cam_b, list(partials), self.policy, self.top_k,
                                     self.window_ms)


def _stamped(m: dict):
    """A Match with the event timestamp of its camera-A detection."""
    return TimestampedValue(m, Timestamp(micros=m["frame_ts_a_ms"] * 1000))


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
    def __init__(self):
        self.matches = Metrics.counter(NAMESPACE, "matches_emitted")

    def process(self, m):
        if m is not None:
            self.matches.inc()
            yield _stamped(m)


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
      links: None, a list of links.json objects, or a path/URI of a links.json file:
        only linked camera pairs, only inside the links' dt bands.
      max_candidates_per_block: blocks with more query x reference cells are split into
        query chunks that are reshuffled across workers (see ``assignment`` for its
        effect there; none on the other policies).
      block_s: span of the blocks of ``all``/``topk``/``mutual`` (a performance knob
        with no effect on results); None: the smallest multiple of ``window_s`` that
        covers the widest candidate band.
      cameras: every camera id of the input, when known before the job runs (e.g.
        from the files' ``camera_id`` columns); None: found from the data. Without
        links, batches are paired with every other camera, and finding the cameras from
        the data makes the runner hold every batch until all are known (one more full
        copy of the embeddings between stages). A detection of a camera not listed
        fails the job: its pairs would otherwise be lost silently.

    Output elements are in the GlobalWindow, timestamped with ``frame_ts_a_ms``.

    Input elements need ``camera_id`` (str), ``frame_ts_ms`` (int, UTC epoch ms),
    ``detection_id`` (unique str) and ``embedding`` (1-d array-like, same length for
    all); other keys are ignored. They may also be
    :class:`~transforms.detections_io.DetectionColumns` chunks (``ReadDetections(...,
    as_columns=True)``): the same detections as arrays, which skips building a Python
    object per detection between Parquet and the blocks. Event timestamps are (re)assigned from
    ``frame_ts_ms``; any input windowing is discarded. The full semantics are in
    :mod:`transforms.match_blocks`.
    """

    # Callers that read stored detections may hand DetectionColumns chunks (see above).
    accepts_columns = True

    def __init__(self, policy: str = "mutual", metric: str = "l2",
                 max_gap_s: float = mb.DEFAULT_MAX_GAP_S, window_s: float = mb.DEFAULT_WINDOW_S,
                 threshold: Optional[float] = None, top_k: int = 1, links=None,
                 max_candidates_per_block: int = mb.DEFAULT_MAX_CANDIDATES_PER_BLOCK,
                 label: Optional[str] = None, block_s: Optional[float] = None,
                 cameras: Optional[Sequence[str]] = None):
        super().__init__(label)
        mb.check_params(policy, metric, top_k, threshold)
        if isinstance(links, str) or hasattr(links, "__fspath__"):
            from transforms.links import load_links
            links = load_links(links)
        if int(max_candidates_per_block) < 1:
            raise ValueError("max_candidates_per_block must be >= 1")
        self.policy = policy
        self.metric = metric
        self.threshold = None if threshold is None else float(threshold)
        self.top_k = int(top_k)
        self.window_ms = mb.window_ms_of(window_s)
        self.bands = mb.CandidateBands(max_gap_s, links)
        self.block_ms = block_ms_of(policy, self.window_ms, self.bands, block_s)
        self.max_cells = int(max_candidates_per_block)
        self.max_batch = DEFAULT_MAX_BATCH
        self.cameras = None if cameras is None else sorted({str(c) for c in cameras})

    def expand(self, detections):
        p = self.policy
        batches = (detections
                   | "BatchDetections" >> beam.ParDo(
                       _BatchDetections(self.block_ms, self.max_batch))
                   | "InGlobalWindow" >> beam.WindowInto(GlobalWindows()))
        if self.bands.linked or self.cameras is not None:
            keyed = batches | "KeyByBlock" >> beam.ParDo(
                _KeyByBlock(self.bands, self.block_ms, self.cameras))
        else:
            cameras = (batches
                       | "CameraIds" >> beam.Keys()
                       | "DistinctCameras" >> beam.Distinct())
            keyed = batches | "KeyByBlock" >> beam.ParDo(
                _KeyByBlock(self.bands, self.block_ms), cameras=beam.pvalue.AsList(cameras))
        compute = dict(bands=self.bands, policy=p, metric=self.metric,
                       threshold=self.threshold, top_k=self.top_k, window_ms=self.window_ms,
                       block_ms=self.block_ms)
        whole = (keyed
                 | "GroupBlocks" >> beam.GroupByKey()
                 | "ComputeBlocks" >> beam.ParDo(
                     _BuildAndComputeBlocks(max_cells=self.max_cells, **compute)).with_outputs(
                         "split", "partials", main="matches"))
        split = (whole.split
                 | "SpreadSplitBlocks" >> beam.Reshuffle()
                 | "ComputeSplitBlocks" >> beam.ParDo(_ComputeBlock(**compute)).with_outputs(
                     "partials", main="matches"))
        matches = (whole.matches, split.matches) | "FlattenBlocks" >> beam.Flatten()
        if p == "assignment":
            return (matches
                    | "KeyByDetectionB" >> beam.WithKeys(mb.assignment_key)
                    | "LowestPerDetectionB" >> beam.CombinePerKey(_LowestAssignment())
                    | "DropKeys" >> beam.Values()
                    | "CountMatches" >> beam.ParDo(_CountMatches()))
        if p == "all":
            return matches | "CountMatches" >> beam.ParDo(_CountMatches())
        merged = ((whole.partials, split.partials)
                  | "FlattenPartials" >> beam.Flatten()
                  | "GroupNeighbours" >> beam.GroupByKey()
                  | "MergeNeighbours" >> beam.ParDo(
                      _MergeNeighbours(p, self.top_k, self.window_ms)))
        return ((matches, merged)
                | "FlattenMatches" >> beam.Flatten()
                | "CountMatches" >> beam.ParDo(_CountMatches()))
