"""Beam ``ModelHandler``s that run the models inside ``RunInference``.

With :mod:`models.tf_handlers` (its TensorFlow counterpart) the only modules of
:mod:`models` that import apache_beam. A handler is built
from model names, weight URIs and options (all cheap to pickle); the model
itself is built on the worker, in :meth:`load_model`, through the registry.
On a GPU the model is shared across the SDK worker processes of a VM (one
copy per GPU, ``model_copies`` to change it) instead of one copy per process,
which runs the GPU out of memory (apache/beam#22895).
"""
from typing import Any, NamedTuple, Optional

import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from models.fused import DetectAndEmbed, with_embeddings
from models.registry import build_detector, build_embedder


NAMESPACE = "cctview"


class FailedInference(NamedTuple):
    """The inference of an element that failed on its own, after its batch failed: the
    error in one line. DetectFrames sends its frame to the dead-letter output."""
    error: str

    @classmethod
    def of(cls, error: Exception) -> "FailedInference":
        lines = str(error).strip().splitlines()
        return cls("%s: %s" % (type(error).__name__, lines[0] if lines else ""))


def infer_with_retry(infer, batch) -> list:
    """``infer(batch)``; if that raises, each element once more on its own, so that one bad
    frame costs only itself, a transient failure costs nothing, and a batch too large for
    the device is retried in the smallest pieces. An element that fails on its own gets a
    :class:`FailedInference` as its inference."""
    try:
        return infer(batch)
    except Exception:  # the model's own errors have no common type
        Metrics.counter(NAMESPACE, "inference_batches_retried_one_by_one").inc()
    results = []
    for element in batch:
        try:
            results.extend(infer([element]))
        except Exception as error:
            results.append(PredictionResult(element, FailedInference.of(error)))
    return results


def nbytes(element) -> int:
    if isinstance(element, (tuple, list)):
        return sum(nbytes(e) for e in element)
    return int(getattr(element, "nbytes", 0))


class _Handler(ModelHandler):
    """``threads`` (0: torch's default) is the worker's torch thread count, set when
    the model loads: the runner's own parallelism decides it (one bundle per core
    wants one thread per model call); ONNX models get theirs through their options."""

    def __init__(self, *, device: str = "cpu", min_batch_size: int = 1, max_batch_size: int = 16,
                 model_copies: Optional[int] = None, threads: int = 0):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         large_model=device.startswith("cuda"), model_copies=model_copies)
        self._device = device
        self._threads = threads

    def _build(self, builder, model: tuple):
        if self._threads:
            torch.set_num_threads(self._threads)
        name, weights, options = model
        return builder(name, weights, self._device, **options)

    def run_inference(self, batch, model, inference_args: Optional[dict[str, Any]] = None):
        """The batch through :meth:`_infer`, with :func:`infer_with_retry`."""
        return infer_with_retry(lambda elements: self._infer(elements, model), batch)

    def _infer(self, batch, model) -> list:
        """One PredictionResult per element of ``batch``, in order."""
        raise NotImplementedError

    def get_num_bytes(self, batch) -> int:
        return sum(nbytes(e) for e in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


def _split_backgrounds(batch):
    """Elements are frames, or (frame, background) pairs for the ``background`` detector."""
    if batch and isinstance(batch[0], tuple):
        return [frame for frame, _ in batch], [bg for _, bg in batch]
    return list(batch), None


class DetectEmbedModelHandler(_Handler):
    """Element: an HxWx3 uint8 RGB frame, or a (frame, camera background) pair for
    the ``background`` detector. Inference: a list of dicts (box_xyxy, score, label,
    embedding), from :class:`models.fused.DetectAndEmbed`."""

    def __init__(self, detector: str, embedder: str, *, detector_weights: Optional[str] = None,
                 embedder_weights: Optional[str] = None, detector_options: Optional[dict] = None,
                 embedder_options: Optional[dict] = None, **handler_options):
        super().__init__(**handler_options)
        self._detector = (detector, detector_weights, dict(detector_options or {}))
        self._embedder = (embedder, embedder_weights, dict(embedder_options or {}))

    def load_model(self) -> DetectAndEmbed:
        return DetectAndEmbed(self._build(build_detector, self._detector),
                              self._build(build_embedder, self._embedder))

    def _infer(self, batch, model):
        frames, backgrounds = _split_backgrounds(batch)
        return [PredictionResult(x, y) for x, y in zip(batch, model(frames, backgrounds))]


class DetectModelHandler(_Handler):
    """Element: an HxWx3 uint8 RGB frame (or a (frame, background) pair). Inference:
    dict(boxes, scores, labels)."""

    def __init__(self, detector: str, *, weights: Optional[str] = None, options: Optional[dict] = None,
                 **handler_options):
        super().__init__(**handler_options)
        self._model = (detector, weights, dict(options or {}))

    def load_model(self):
        return self._build(build_detector, self._model)

    def _infer(self, batch, model):
        return detect_results(model, batch)


def detect_results(detector, batch) -> list:
    """A :class:`DetectModelHandler` batch through ``detector``: one PredictionResult per element."""
    frames, backgrounds = _split_backgrounds(batch)
    found = detector.detect(frames) if backgrounds is None else detector.detect(frames, backgrounds)
    return [PredictionResult(x, y) for x, y in zip(batch, found)]


class EmbedModelHandler(_Handler):
    """Element: an (image, boxes) tuple.

    With boxes an (N, 4) xyxy array the inference is the (N, dim) float32
    embeddings. With boxes a :class:`DetectModelHandler` inference (``{boxes,
    scores, labels}``) it is what :class:`DetectEmbedModelHandler` gives, a
    list of (box_xyxy, score, label, embedding) dicts, so that two stages and
    the fused one feed the same downstream code.
    """

    def __init__(self, embedder: str, *, weights: Optional[str] = None, options: Optional[dict] = None,
                 **handler_options):
        super().__init__(**handler_options)
        self._model = (embedder, weights, dict(options or {}))

    def load_model(self):
        return self._build(build_embedder, self._model)

    def _infer(self, batch, model):
        return embed_results(model, batch)


def embed_results(embedder, batch) -> list:
    """An :class:`EmbedModelHandler` batch through ``embedder``: one PredictionResult per element."""
    images = [image for image, _ in batch]
    boxes = [b["boxes"] if isinstance(b, dict) else b for _, b in batch]
    embeddings = embedder.embed_crops(images, boxes)
    return [PredictionResult(x, with_embeddings(x[1], e) if isinstance(x[1], dict) else e)
            for x, e in zip(batch, embeddings)]
