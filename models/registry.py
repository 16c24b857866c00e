"""Model names (as the command line spells them) -> builders.

A builder is a function taking ``weights`` (a URI or None), ``device`` and its
own keyword options, returning a :class:`models.detectors.Detector` or a
:class:`models.embedders.Embedder`. Adding a model is adding an entry here.
"""
from models import background, detectors, embedders, imageai_detectors, tf_savedmodel, yolox

DETECTORS = {
    "retinanet_resnet50_fpn": detectors.retinanet_resnet50_fpn,
    "retinanet_resnet50_fpn_v2": detectors.retinanet_resnet50_fpn_v2,
    "fasterrcnn_resnet50_fpn_v2": detectors.fasterrcnn_resnet50_fpn_v2,
    "ssdlite320_mobilenet_v3_large": detectors.ssdlite320_mobilenet_v3_large,
    "yolox": yolox.yolox,
    "background": background.background,
    "tf_savedmodel": tf_savedmodel.detector,
    "imageai_retinanet": imageai_detectors.imageai_retinanet,
    "imageai_yolov3": imageai_detectors.imageai_yolov3,
    "imageai_tiny_yolov3": imageai_detectors.imageai_tiny_yolov3,
}

# Models that run in onnxruntime: their builders take ``threads`` (intra-op threads
# of one call). Torch models use the process's ``torch.set_num_threads``.
ONNX_MODELS = frozenset({"yolox", "onnx"})

# Models that run in TensorFlow: the pipeline runs them through Beam's TensorFlow
# ModelHandler (models/tf_handlers.py), in a RunInference step of their own.
TF_MODELS = frozenset({"tf_savedmodel"})

EMBEDDERS = {
    "densenet201_veri": embedders.densenet201_veri,
    "resnet50": embedders.resnet50,
    "onnx": embedders.onnx,
    "color_histogram": embedders.color_histogram,
    "tf_savedmodel": tf_savedmodel.embedder,
}


def _builder(table: dict, kind: str, name: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError("unknown %s %r; known: %s" % (kind, name, ", ".join(sorted(table)))) from None


def build_detector(name: str, weights=None, device: str = "cpu", **options) -> detectors.Detector:
    """The detector ``name`` with ``weights`` (URI) on ``device``; options go to its builder."""
    return _builder(DETECTORS, "detector", name)(weights=weights, device=device, **options)


def build_embedder(name: str, weights=None, device: str = "cpu", **options) -> embedders.Embedder:
    """The embedder ``name`` with ``weights`` (URI) on ``device``; options go to its builder."""
    return _builder(EMBEDDERS, "embedder", name)(weights=weights, device=device, **options)
