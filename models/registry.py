"""Models as data: one :class:`ModelEntry` per model name (as the command line spells it).

An entry holds the model's builder, its :class:`models.weights.WeightsSpec` (url, sha256,
categories, meta and the callable ``transforms`` that builds the model's preprocessing)
and what the pipeline must know to run it: which runtime executes it and whether it
compares each frame with its camera's background. The builder is called with the entry's
own spec, so the preprocessing in the registry is the preprocessing that runs. Adding a
model is adding an entry here.

A builder is a function taking ``spec``, ``weights`` (a URI or None), ``device`` and its
own keyword options, returning a :class:`models.detectors.Detector` (or the
``background`` detector) or a :class:`models.embedders.Embedder`.
"""
import dataclasses
from typing import Callable

from models import background, detectors, embedders, imageai_detectors, tf_savedmodel, yolox
from models.weights import WeightsSpec

__all__ = ["DETECTORS", "EMBEDDERS", "RUNTIMES", "ModelEntry", "build_detector", "build_embedder", "detector",
           "embedder"]

# torch: the process's torch threads; onnxruntime: a session of its own, with its own
# intra-op threads; tensorflow: Beam's TensorFlow handler; numpy: plain CPU code.
RUNTIMES = ("torch", "onnxruntime", "tensorflow", "numpy")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model: ``builder`` called with ``weights`` (its spec) and the user's options.

    ``runtime`` is one of :data:`RUNTIMES`. ``per_camera_background``: the model detects
    by comparing each frame with its camera's background, which a handler wrapper
    supplies (:class:`models.handlers.WithBackgrounds`).
    """

    builder: Callable
    weights: WeightsSpec
    runtime: str = "torch"
    per_camera_background: bool = False

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError("runtime must be one of %s, got %r" % (", ".join(RUNTIMES), self.runtime))

    @property
    def takes_threads(self) -> bool:
        """Whether the builder takes ``threads`` (the intra-op threads of its own session);
        torch models use the process's ``torch.set_num_threads`` instead."""
        return self.runtime == "onnxruntime"

    @property
    def runs_alone(self) -> bool:
        """Whether it runs in a RunInference step of its own, through Beam's TensorFlow
        ModelHandler (models/tf_handlers.py), never fused with another model."""
        return self.runtime == "tensorflow"

    def build(self, weights=None, device: str = "cpu", **options):
        """The model with ``weights`` (URI) on ``device``, prepared by this entry's spec."""
        return self.builder(spec=self.weights, weights=weights, device=device, **options)


def _torchvision(builder) -> ModelEntry:
    return ModelEntry(builder, detectors.SPECS[builder.__name__])


def _imageai(builder) -> ModelEntry:
    return ModelEntry(builder, imageai_detectors.SPECS[builder.__name__])


DETECTORS = {
    "retinanet_resnet50_fpn": _torchvision(detectors.retinanet_resnet50_fpn),
    "retinanet_resnet50_fpn_v2": _torchvision(detectors.retinanet_resnet50_fpn_v2),
    "fasterrcnn_resnet50_fpn_v2": _torchvision(detectors.fasterrcnn_resnet50_fpn_v2),
    "ssdlite320_mobilenet_v3_large": _torchvision(detectors.ssdlite320_mobilenet_v3_large),
    "yolox": ModelEntry(yolox.yolox, yolox.YOLOX_NANO, runtime="onnxruntime"),
    "background": ModelEntry(background.background, background.BACKGROUND, runtime="numpy",
                             per_camera_background=True),
    "tf_savedmodel": ModelEntry(tf_savedmodel.detector, tf_savedmodel.SAVEDMODEL_DETECTOR, runtime="tensorflow"),
    "imageai_retinanet": _imageai(imageai_detectors.imageai_retinanet),
    "imageai_yolov3": _imageai(imageai_detectors.imageai_yolov3),
    "imageai_tiny_yolov3": _imageai(imageai_detectors.imageai_tiny_yolov3),
}

EMBEDDERS = {
    "densenet201_veri": ModelEntry(embedders.densenet201_veri, embedders.VERI_DENSENET),
    "resnet50": ModelEntry(embedders.resnet50, embedders.RESNET50),
    "onnx": ModelEntry(embedders.onnx, embedders.OSNET_X0_25, runtime="onnxruntime"),
    "color_histogram": ModelEntry(embedders.color_histogram, embedders.COLOR_HISTOGRAM),
    "color_bands": ModelEntry(embedders.color_bands, embedders.COLOR_BANDS),
    "tf_savedmodel": ModelEntry(tf_savedmodel.embedder, tf_savedmodel.SAVEDMODEL_EMBEDDER, runtime="tensorflow"),
}


def _entry(table: dict, kind: str, name: str) -> ModelEntry:
    try:
        return table[name]
    except KeyError:
        raise ValueError("unknown %s %r; known: %s" % (kind, name, ", ".join(sorted(table)))) from None


def detector(name: str) -> ModelEntry:
    """The registry entry of detector ``name``; an unknown name lists the known ones."""
    return _entry(DETECTORS, "detector", name)


def embedder(name: str) -> ModelEntry:
    """The registry entry of embedder ``name``; an unknown name lists the known ones."""
    return _entry(EMBEDDERS, "embedder", name)


def build_detector(name: str, weights=None, device: str = "cpu", **options):
    """The detector ``name`` with ``weights`` (URI) on ``device``; options go to its builder."""
    return detector(name).build(weights, device, **options)


def build_embedder(name: str, weights=None, device: str = "cpu", **options) -> embedders.Embedder:
    """The embedder ``name`` with ``weights`` (URI) on ``device``; options go to its builder."""
    return embedder(name).build(weights, device, **options)
