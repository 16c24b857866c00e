"""EstimateBackgrounds: each camera's empty-road image, for the ``background`` detector.

A per-pixel median over a sample of the camera's own frames; the sample is the frames
with the smallest hashes of their URIs, so a re-run (or a retried bundle) picks the same
frames and gets the same background, whatever order the frames arrive in. The result is
a dict camera_id -> HxWx3 uint8, passed to detection as a side input.
"""
import hashlib

import apache_beam as beam
from apache_beam.metrics import Metrics

NAMESPACE = "cctview"


def _sample_rank(uri: str) -> int:
    return int.from_bytes(hashlib.sha1(uri.encode("utf-8")).digest()[:8], "big")


class _EstimateFn(beam.DoFn):
    def __init__(self):
        self.cameras = Metrics.counter(NAMESPACE, "backgrounds_estimated")

    def process(self, element):
        from models.background import estimate_background  # numpy only, no torch

        camera, sampled = element
        self.cameras.inc()
        yield camera, estimate_background([image for _, image in sampled])


class EstimateBackgrounds(beam.PTransform):
    """Frames -> (camera_id, background) pairs, from up to ``sample`` frames a camera."""

    def __init__(self, sample: int = 60):
        super().__init__()
        self._sample = sample

    def expand(self, frames):
        return (
            frames
            | "GlobalWindow" >> beam.WindowInto(beam.window.GlobalWindows())
            | "ByCamera" >> beam.Map(
                lambda f: (f["camera_id"], (-_sample_rank(f["uri"]), f["image"])))
            | "Sample" >> beam.combiners.Top.PerKey(self._sample, key=lambda v: v[0])
            | "Median" >> beam.ParDo(_EstimateFn())
        )
