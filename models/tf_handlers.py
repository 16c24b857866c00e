"""Beam's TensorFlow ModelHandler for the TensorFlow models (``tf_savedmodel``).

The TensorFlow counterpart of :mod:`models.handlers`, and like it a module that imports
apache_beam; it also imports tensorflow (through Beam's ``tensorflow_inference``), so
the pipeline imports it only when a TensorFlow model runs. The :mod:`models` package
has imported torchvision by then, which keeps the import order that does not crash.

The handlers are Beam's ``TFModelHandlerTensor``: Beam batches the elements (up to
``max_batch_size``) and its ``run_inference`` hands each batch to the ``inference_fn``,
which runs the whole batch through the model in one call per frame size. Two things
are this project's: ``load_model`` builds the model through the registry, which reads
the folder from any Beam filesystem URI and checks its pin (Beam's own calls
``tf.keras.models.load_model``, which under Keras 3 refuses a SavedModel folder: "the
legacy SavedModel format is not supported by load_model() in Keras 3"), and the elements
and results are those of :class:`models.handlers.DetectModelHandler` and
:class:`models.handlers.EmbedModelHandler`, so that the rest of the pipeline cannot tell
the frameworks apart.
"""
from typing import Optional

import torch
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor

from models.handlers import NAMESPACE, detect_results, embed_results, infer_with_retry, nbytes
from models.registry import build_detector, build_embedder

__all__ = ["TFDetectModelHandler", "TFEmbedModelHandler", "detect_batch", "embed_batch"]


def detect_batch(model, batch, inference_args=None, model_id=None) -> list:
    """``inference_fn`` of :class:`TFDetectModelHandler`: frames -> dict(boxes, scores, labels)."""
    return infer_with_retry(lambda elements: detect_results(model, elements), batch)


def embed_batch(model, batch, inference_args=None, model_id=None) -> list:
    """``inference_fn`` of :class:`TFEmbedModelHandler`: (image, boxes) -> embeddings."""
    return infer_with_retry(lambda elements: embed_results(model, elements), batch)


class _TFHandler(TFModelHandlerTensor):
    """``threads`` (0: default) is the torch thread count of the worker, for the crops and
    box arithmetic around the TensorFlow call, as :class:`models.handlers._Handler` sets it."""

    def __init__(self, build, inference_fn, name: str, *, weights: Optional[str] = None,
                 options: Optional[dict] = None, device: str = "cpu", min_batch_size: int = 1,
                 max_batch_size: int = 16, model_copies: Optional[int] = None, threads: int = 0):
        super().__init__(model_uri=weights, inference_fn=inference_fn,
                         min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         large_model=device.startswith("cuda"), model_copies=model_copies)
        self._build = build
        self._model = (name, weights, dict(options or {}))
        self._device = device
        self._threads = threads

    def load_model(self):
        if self._threads:
            torch.set_num_threads(self._threads)
        name, weights, options = self._model
        return self._build(name, weights, self._device, **options)

    def get_num_bytes(self, batch) -> int:
        return sum(nbytes(e) for e in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class TFDetectModelHandler(_TFHandler):
    """Element: an HxWx3 uint8 RGB frame. Inference: dict(boxes, scores, labels)."""

    def __init__(self, detector: str, **options):
        super().__init__(build_detector, detect_batch, detector, **options)


class TFEmbedModelHandler(_TFHandler):
    """Element: (image, boxes or a detector's inference). Inference: as
    :class:`models.handlers.EmbedModelHandler`'s."""

    def __init__(self, embedder: str, **options):
        super().__init__(build_embedder, embed_batch, embedder, **options)
