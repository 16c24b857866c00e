"""Cross-camera matching as a Beam transform: Detections -> Matches.

Public API: :class:`MatchDetections` (and :class:`MatchBlockWindows`, the WindowFn it
uses). The semantics (candidates, metrics, policies, ties, ranks, output fields) are
specified in :mod:`transforms.match_blocks`, whose pure numpy functions do the work;
:func:`transforms.match_blocks.match_arrays` gives the same results for in-memory
arrays.

Pipeline shape
==============
1. Detections are re-windowed into the GlobalWindow and re-timestamped from
   ``frame_ts_ms`` (event time), reduced to ``(detection_id, frame_ts_ms, embedding)``,
   windowed into ``FixedWindows(window_s)`` and grouped per camera: one
   :class:`~transforms.match_blocks.Batch` per (camera, window) (at most
   ``DEFAULT_MAX_BATCH`` detections each), so that what is shuffled and replicated
   below are a few large elements rather than one small element per detection.
2. Fan-out by camera pair: every batch of camera C becomes a *query* of the block key
   ``(C, R)`` and a *reference* of the block key ``(Q, C)`` for every partner camera
   (R, Q): all other cameras (a side input of distinct camera ids) or, with links,
   the linked ones. ``all``/``assignment`` only need blocks with ``Q < R``;
   ``topk``/``mutual`` need both directions.
3. :class:`MatchBlockWindows` windows both roles in one step: a query batch stays in its
   fixed window ``[kW, (k+1)W)``, a reference batch goes to every fixed window whose
   *reach* contains one of its detections (``[kW+lo, (k+1)W+hi)`` for each candidate
   interval ``[lo, hi]`` of the pair). One WindowFn for both roles keeps one windowing
   strategy (no Flatten of differently windowed inputs, which Beam only warns about).
4. ``GroupByKey``: one group per (window, query camera, reference camera) = a block;
   references outside the window's reach are dropped there. A busy window is thus
   split by camera pair, never held by one worker as a whole. A block above
   ``max_candidates_per_block`` query x reference cells is split into query chunks
   that go through a ``Reshuffle`` so that they spread over workers.
5. The block is computed with numpy (tiled matrix products, memory bounded by the
   tile). ``all`` emits its pairs directly (``Q < R`` blocks: each pair once);
   ``topk``/``mutual`` emit directed neighbour records that are merged per unordered
   pair by a ``GroupByKey`` in the GlobalWindow; ``assignment`` runs the Hungarian
   algorithm per block and a per-key combine keeps, for each camera-B detection, its
   lowest (distance, detection_id_a) assignment.

Cost: every reference is shuffled into ``1 + (hi - lo) / window_s`` windows on average
(``hi - lo = 2 * max_gap_s`` without links, the band width with links). For
all/topk/mutual, whose results do not depend on ``window_s``, a window of about
``max_gap_s`` or more keeps that factor small (60 s with the default 300 s gap: ~11x;
600 s: 2x); blocks are computed tile by tile, so larger windows cost no more compute.

Metrics (namespace ``cctview.matching``): counters ``candidate_pairs`` (each unordered
candidate pair counted once, before threshold), ``distance_cells`` (cells computed),
``blocks``, ``blocks_split``, ``matches_emitted``; distribution ``block_cells``
(query x reference cells per block).

Streaming note: a reference is assigned to windows that end before its own timestamp
(the reach extends past the window end), which is fine in batch (all inputs are bounded
here); an unbounded source would need allowed lateness of ``hi`` or windows extended by
the reach.
"""
from __future__ import annotations

from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import (FixedWindows, GlobalWindows, IntervalWindow,
                                           NonMergingWindowFn, TimestampedValue)
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms import match_blocks as mb

NAMESPACE = "cctview.matching"
# Detections of one camera and window travel together, up to this many per element.
DEFAULT_MAX_BATCH = 2048
QUERY, REF = 0, 1


class MatchBlockWindows(NonMergingWindowFn):
    """Fixed windows of ``window_ms`` for block elements ``((q_cam, r_cam), (role, batch))``.

    ``batch`` is a :class:`transforms.match_blocks.Batch`: detections of one camera in
    one fixed window. ``role == QUERY``: the batch's own fixed window ``[kW, (k+1)W)``
    (what ``FixedWindows(window_s)`` gives its detections). ``role == REF``: every
    fixed window whose reach contains one of the batch's detections, the reach of
    window k for the pair being ``[kW + lo, (k+1)W + hi)`` for each interval ``[lo, hi]``
    of ``t_ref - t_query`` allowed by ``bands.intervals(q_cam, r_cam)`` (see
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


def _payload(det: dict):
    """Timestamped (camera_id, (detection_id, frame_ts_ms, embedding)).

    The embedding travels as float16 when it comes as float16 (Parquet halffloat: half
    the shuffle bytes, nothing lost), else as float32; blocks compute in float32.
    """
    emb = np.asarray(det["embedding"])
    emb = emb.astype(np.float16 if emb.dtype == np.float16 else np.float32, copy=False).reshape(-1)
    ts = int(det["frame_ts_ms"])
    return TimestampedValue((str(det["camera_id"]), (str(det["detection_id"]), ts, emb)),
                            Timestamp(micros=ts * 1000))


class _MakeBatches(beam.DoFn):
    """(camera, detections of one fixed window) -> (camera, Batch) of <= max_size."""

    def __init__(self, max_size: int):
        self.max_size = max_size

    def process(self, element, window=beam.DoFn.WindowParam):
        cam, records = element
        start_ms = window.start.micros // 1000
        for batch in mb.make_batches(start_ms, records, self.max_size):
            yield cam, batch


class _FanOut(beam.DoFn):
    """(camera, Batch) -> ((q_cam, r_cam), (role, Batch)) for every block it feeds."""

    def __init__(self, bands: mb.CandidateBands, both_directions: bool):
        self.bands = bands
        self.both = both_directions

    def process(self, cam_batch, cameras=()):
        cam, batch = cam_batch
        for other in self.bands.partners(cam, cameras):
            if self.both or cam < other:
                yield (cam, other), (QUERY, batch)
            if self.both or other < cam:
                yield (other, cam), (REF, batch)


class _BuildBlocks(beam.DoFn):
    """(q_cam, r_cam), [(role, Batch)] in a window -> (query Side, reference Side) block(s).

    References outside the window's reach (batches are whole windows) are dropped here,
    so a block holds exactly the detections the per-detection reach assigns to it.
    Main output: blocks within ``max_cells``; tagged output ``split``: the query chunks
    of larger blocks (to be reshuffled).
    """

    def __init__(self, bands, metric, window_ms, max_cells):
        self.bands = bands
        self.metric = metric
        self.window_ms = window_ms
        self.max_cells = max_cells
        self.blocks = Metrics.counter(NAMESPACE, "blocks")
        self.blocks_split = Metrics.counter(NAMESPACE, "blocks_split")
        self.block_cells = Metrics.distribution(NAMESPACE, "block_cells")

    def process(self, element, window=beam.DoFn.WindowParam):
        (q_cam, r_cam), values = element
        qs, rs = [], []
        for role, batch in values:
            (qs if role == QUERY else rs).append(batch)
        if not qs or not rs:
            return
        iv = self.bands.intervals(q_cam, r_cam)
        start_ms = window.start.micros // 1000
        keep = [mb.in_reach(b.ts, start_ms, self.window_ms, iv) for b in rs]
        r = mb.side_from_batches(r_cam, rs, self.metric, keep)
        if not len(r):
            return
        q = mb.side_from_batches(q_cam, qs, self.metric)
        self.blocks.inc()
        self.block_cells.update(len(q) * len(r))
        parts = mb.split_block(q, r, iv, self.max_cells)
        if len(parts) == 1:
            yield parts[0]
            return
        self.blocks_split.inc()
        for part in parts:
            yield beam.pvalue.TaggedOutput("split", part)


class _ComputeBlock(beam.DoFn):
    """A (query Side, reference Side) block -> policy records (see match_blocks)."""

    def __init__(self, bands, policy, metric, threshold, top_k, window_ms):
        self.bands = bands
        self.policy = policy
        self.metric = metric
        self.threshold = threshold
        self.top_k = top_k
        self.window_ms = window_ms
        self.candidate_pairs = Metrics.counter(NAMESPACE, "candidate_pairs")
        self.distance_cells = Metrics.counter(NAMESPACE, "distance_cells")

    def process(self, block):
        q, r = block
        iv = self.bands.intervals(q.camera_id, r.camera_id)
        count = q.camera_id < r.camera_id  # each unordered pair counted once
        for chunk in mb.block_matches(q, r, iv, self.policy, self.metric, self.threshold,
                                      self.top_k):
            self.distance_cells.inc(chunk.n_cells)
            if count:
                self.candidate_pairs.inc(chunk.n_candidates)
            yield from mb.block_outputs(q, r, chunk, self.policy, self.window_ms)


def _stamped(m: dict):
    """A Match with the event timestamp of its camera-A detection."""
    return TimestampedValue(m, Timestamp(micros=m["frame_ts_a_ms"] * 1000))


class _MergeDirected(beam.DoFn):
    def __init__(self, policy, window_ms):
        self.policy = policy
        self.window_ms = window_ms
        self.matches = Metrics.counter(NAMESPACE, "matches_emitted")

    def process(self, element):
        key, values = element
        m = mb.merge_directed(key, values, self.policy, self.window_ms)
        if m is not None:
            self.matches.inc()
            yield _stamped(m)


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
      window_s: size of the fixed event-time windows that partition the work; results of
        ``all``/``topk``/``mutual`` do not depend on it (only ``window_start_ms`` /
        ``window_end_ms``, the window of the camera-A detection, do); ``assignment`` is
        solved per window of the camera-A detections, so it does.
      threshold: keep pairs with ``distance <= threshold``; None = no threshold.
      top_k: neighbours per detection and other camera for ``topk``.
      links: None, a list of links.json objects, or a path/URI of a links.json file:
        only linked camera pairs, only inside the links' dt bands.
      max_candidates_per_block: blocks with more query x reference cells are split into
        query chunks that are reshuffled across workers (see ``assignment`` for its
        effect there; none on the other policies).

    Output elements are in the GlobalWindow, timestamped with ``frame_ts_a_ms``.

    Input elements need ``camera_id`` (str), ``frame_ts_ms`` (int, UTC epoch ms),
    ``detection_id`` (unique str) and ``embedding`` (1-d array-like, same length for
    all); other keys are ignored. Event timestamps are (re)assigned from
    ``frame_ts_ms``; any input windowing is discarded. The full semantics are in
    :mod:`transforms.match_blocks`.
    """

    def __init__(self, policy: str = "mutual", metric: str = "l2",
                 max_gap_s: float = mb.DEFAULT_MAX_GAP_S, window_s: float = mb.DEFAULT_WINDOW_S,
                 threshold: Optional[float] = None, top_k: int = 1, links=None,
                 max_candidates_per_block: int = mb.DEFAULT_MAX_CANDIDATES_PER_BLOCK,
                 label: Optional[str] = None):
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
        self.max_cells = int(max_candidates_per_block)
        self.max_batch = DEFAULT_MAX_BATCH

    def expand(self, detections):
        p = self.policy
        batches = (detections
                   | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
                   | "Timestamp" >> beam.Map(_payload)
                   | "FixedWindows" >> beam.WindowInto(
                       FixedWindows(Duration(micros=self.window_ms * 1000)))
                   | "GroupCameraWindows" >> beam.GroupByKey()
                   | "Batches" >> beam.ParDo(_MakeBatches(self.max_batch)))
        both = p in ("topk", "mutual")
        if self.bands.linked:
            keyed = batches | "KeyByCameraPair" >> beam.ParDo(_FanOut(self.bands, both))
        else:
            cameras = (batches
                       | "CameraIds" >> beam.Keys()
                       | "CamerasInGlobalWindow" >> beam.WindowInto(GlobalWindows())
                       | "DistinctCameras" >> beam.Distinct())
            keyed = batches | "KeyByCameraPair" >> beam.ParDo(
                _FanOut(self.bands, both), cameras=beam.pvalue.AsList(cameras))
        built = (keyed
                 | "BlockWindows" >> beam.WindowInto(MatchBlockWindows(self.window_ms, self.bands))
                 | "GroupBlocks" >> beam.GroupByKey()
                 | "BuildBlocks" >> beam.ParDo(
                     _BuildBlocks(self.bands, self.metric, self.window_ms,
                                  self.max_cells)).with_outputs(
                         "split", main="whole"))
        compute = lambda: _ComputeBlock(self.bands, p, self.metric, self.threshold,  # noqa: E731
                                        self.top_k, self.window_ms)
        whole = built.whole | "ComputeBlocks" >> beam.ParDo(compute())
        split = (built.split
                 | "SpreadSplitBlocks" >> beam.Reshuffle()
                 | "ComputeSplitBlocks" >> beam.ParDo(compute()))
        records = ((whole, split)
                   | "FlattenBlocks" >> beam.Flatten()
                   | "ToGlobalWindow" >> beam.WindowInto(GlobalWindows()))
        if p == "all":
            return records | "CountMatches" >> beam.ParDo(_CountMatches())
        if p == "assignment":
            return (records
                    | "KeyByDetectionB" >> beam.WithKeys(mb.assignment_key)
                    | "LowestPerDetectionB" >> beam.CombinePerKey(_LowestAssignment())
                    | "DropKeys" >> beam.Values()
                    | "CountMatches" >> beam.ParDo(_CountMatches()))
        return (records
                | "GroupPairs" >> beam.GroupByKey()
                | "MergeDirections" >> beam.ParDo(_MergeDirected(p, self.window_ms)))
