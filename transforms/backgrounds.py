"""EstimateBackgrounds: each camera's empty-road image, for the ``background`` detector.

A per-pixel median over a sample of the camera's own frames; the sample is the frames
with the smallest hashes of their file names, so a re-run (or a retried bundle) picks the
same frames and gets the same background, whatever order the frames arrive in. The file
name, not the whole URI: the same archive copied to another folder or bucket gets the
same sample, and so the same detections (the layout's file names hold the camera and
the second). The result is
a dict camera_id -> HxWx3 uint8, passed to detection as a side input.

Two inputs are accepted:

* the frame *index* of :class:`transforms.frames.ReadFrames` (``(camera_id, uri)`` for
  every listed, parseable, in-range file, computed from the listing): the sample is
  chosen among the URIs and only the sampled files are read and decoded here. This is
  what the commands use. The side input then depends on the listing only, so the
  runner can fuse decoding, detection and everything after it into one stage that
  streams; with decoded frames as the input, every decoded image of the run had to be
  held between two stages until the backgrounds were known (25 GB for 100,000
  352x240 frames in the DirectRunner, which keeps such buffers in memory).
* decoded frame dicts (``{"uri", "camera_id", "image", ...}``), for callers that
  have no index.

Both give the same background when the sampled files decode: among the
``2 * sample`` smallest-hash files of a camera the first ``sample`` that decode are used
(a file that does not decode is dead-lettered by ReadFrames anyway).
"""
import hashlib
import os

import apache_beam as beam
from apache_beam.metrics import Metrics

__all__ = ["EstimateBackgrounds"]

NAMESPACE = "cctview"


def _sample_rank(uri: str) -> int:
    """The rank of a frame in the sample order: a hash of its file name (ties: by URI)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")


class _EstimateFn(beam.DoFn):
    def __init__(self):
        self.cameras = Metrics.counter(NAMESPACE, "backgrounds_estimated")

    def process(self, element):
        from models.background import estimate_background  # numpy only, no torch

        camera, sampled = element
        self.cameras.inc()
        yield camera, estimate_background([image for _, image in sampled])


class _SmallestDistinct(beam.CombineFn):
    """The ``n`` distinct URIs with the smallest sample ranks, smallest first.

    Distinct, because the same file may be listed twice (overlapping patterns)."""

    def __init__(self, n: int):
        self._n = n

    def create_accumulator(self):
        return {}

    def add_input(self, accumulator, uri):
        accumulator[uri] = _sample_rank(uri)
        if len(accumulator) > 2 * self._n:
            accumulator = dict(sorted(accumulator.items(), key=lambda kv: (kv[1], kv[0]))[:self._n])
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = {}
        for accumulator in accumulators:
            merged.update(accumulator)
        return dict(sorted(merged.items(), key=lambda kv: (kv[1], kv[0]))[:self._n])

    def extract_output(self, accumulator):
        return [uri for uri, _ in sorted(accumulator.items(), key=lambda kv: (kv[1], kv[0]))
                ][:self._n]

    def compact(self, accumulator):
        return self.merge_accumulators([accumulator])


class _EstimateFromFilesFn(beam.DoFn):
    """(camera_id, candidate URIs, smallest rank first) -> (camera_id, background)."""

    def __init__(self, sample: int):
        self._sample = sample
        self.cameras = Metrics.counter(NAMESPACE, "backgrounds_estimated")

    def process(self, element):
        from apache_beam.io.filesystems import FileSystems

        from models.background import estimate_background  # numpy only, no torch
        from transforms.frames import DEFAULT_MAX_BYTES, decode_image

        camera, uris = element
        images = []
        for uri in uris:
            if len(images) >= self._sample:
                break
            if "://" not in uri and not os.path.isfile(uri):
                continue  # a FIFO named like a frame would block the read forever
            try:
                with FileSystems.open(uri) as handle:
                    data = handle.read(DEFAULT_MAX_BYTES + 1)
                if len(data) > DEFAULT_MAX_BYTES:
                    continue
                images.append(decode_image(data))
            except Exception:  # unreadable or undecodable: ReadFrames dead-letters it
                continue
        if images:  # none: detection falls back to the frame itself (see DetectFrames)
            self.cameras.inc()
            yield camera, estimate_background(images)


class EstimateBackgrounds(beam.PTransform):
    """Frames, or the frame index, -> (camera_id, background) pairs, from up to
    ``sample`` frames a camera (see the module's docstring)."""

    def __init__(self, sample: int = 60, from_index: bool = False):
        super().__init__()
        self._sample = sample
        self._from_index = from_index

    def expand(self, frames):
        if self._from_index:
            return (
                frames
                | "GlobalWindow" >> beam.WindowInto(beam.window.GlobalWindows())
                | "Sample" >> beam.CombinePerKey(_SmallestDistinct(2 * self._sample))
                | "Median" >> beam.ParDo(_EstimateFromFilesFn(self._sample))
            )
        return (
            frames
            | "GlobalWindow" >> beam.WindowInto(beam.window.GlobalWindows())
            | "ByCamera" >> beam.Map(
                lambda f: (f["camera_id"], (-_sample_rank(f["uri"]), f["image"])))
            | "Sample" >> beam.combiners.Top.PerKey(self._sample, key=lambda v: v[0])
            | "Median" >> beam.ParDo(_EstimateFn())
        )
