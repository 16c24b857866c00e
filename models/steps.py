"""The handlers of one detection step, chosen in one place from the registry's entries.

Fused (detect and embed in one ``RunInference``) or two steps, and which handler serves
each model: the PyTorch/ONNX handlers of :mod:`models.handlers`, or the TensorFlow ones
of :mod:`models.tf_handlers` (imported only when a TensorFlow model runs). Like those two
modules it imports apache_beam; it sits above both, so neither imports the other's
chooser (no import cycle).
"""
from typing import NamedTuple, Optional

from apache_beam.ml.inference.base import ModelHandler

from models import registry
from models.handlers import (DetectEmbedModelHandler, DetectModelHandler, EmbedModelHandler,
                             WithBackgrounds)

__all__ = ["DetectionHandlers", "detection_handlers"]


class DetectionHandlers(NamedTuple):
    """The ModelHandlers of one detection step: ``detect`` is fused (detect and embed) when
    ``embed`` is None, else it detects and ``embed`` embeds its ``(image, detections)``."""
    detect: ModelHandler
    embed: Optional[ModelHandler]


def detection_handlers(detector: str, embedder: str, *, separate: bool = False,
                       detector_weights: Optional[str] = None, embedder_weights: Optional[str] = None,
                       detector_options: Optional[dict] = None, embedder_options: Optional[dict] = None,
                       **handler_options) -> DetectionHandlers:
    """The handlers for ``detector`` and ``embedder`` (registry names), chosen in this one place.

    Fused (:class:`DetectEmbedModelHandler`) unless ``separate`` or a model that runs alone
    (TensorFlow: Beam's TensorFlow handler, models/tf_handlers.py, imported only then); a
    detector with ``per_camera_background`` is wrapped in :class:`WithBackgrounds`.
    ``handler_options`` (device, batch sizes, threads) go to every handler.
    """
    detect_entry, embed_entry = registry.detector(detector), registry.embedder(embedder)
    if separate or detect_entry.runs_alone or embed_entry.runs_alone:
        detect_class, embed_class = DetectModelHandler, EmbedModelHandler
        if detect_entry.runs_alone or embed_entry.runs_alone:
            from models import tf_handlers

            detect_class = tf_handlers.TFDetectModelHandler if detect_entry.runs_alone else detect_class
            embed_class = tf_handlers.TFEmbedModelHandler if embed_entry.runs_alone else embed_class
        detect = detect_class(detector, weights=detector_weights, options=detector_options, **handler_options)
        embed = embed_class(embedder, weights=embedder_weights, options=embedder_options, **handler_options)
    else:
        detect = DetectEmbedModelHandler(detector, embedder, detector_weights=detector_weights,
                                         embedder_weights=embedder_weights, detector_options=detector_options,
                                         embedder_options=embedder_options, **handler_options)
        embed = None
    return DetectionHandlers(WithBackgrounds(detect) if detect_entry.per_camera_background else detect, embed)
