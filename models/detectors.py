"""Object detectors behind one interface, and the torchvision builders.

Every detector takes a list of frames and runs one batched forward for all of
them; it returns, per frame, ``boxes`` float32 (N, 4) xyxy in pixels of the
original frame, ``scores`` float32 (N,) and ``labels`` (N COCO names), sorted
by score. Only ``classes`` come back (vehicles unless asked otherwise: people
on the sidewalk are never matched across cameras), at ``min_score`` or above,
with both sides at least ``min_box`` pixels, at most ``max_detections``.

Each detector runs its frames through :attr:`Detector.preprocess`, built by the
``transforms`` of its :class:`models.weights.WeightsSpec`; for torchvision's
detectors that is torchvision's own preset (``Weights.transforms``): the network
resizes and normalises internally.
"""
from typing import Callable, Optional, Sequence

import torch
from torchvision.models import detection as tv_detection

from models.imaging import to_device
from models.weights import WeightsSpec, apply_state_dict, load_state_dict, torchvision_state_dict

__all__ = ["COCO_80", "COCO_91", "SPECS", "VEHICLE_CLASSES", "Detector", "TorchvisionDetector",
           "fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
           "ssdlite320_mobilenet_v3_large"]

VEHICLE_CLASSES = ("car", "bus", "truck", "motorcycle")

# torchvision's detection labels use the 91-id COCO numbering, with 'N/A' for
# the ids COCO left unused; the 80 real classes in that order are the labels of
# detectors trained on the 80-class numbering (YOLOX, ImageAI).
COCO_91 = tuple(tv_detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
COCO_80 = tuple(c for c in COCO_91 if c not in ("__background__", "N/A"))

# Boxes a torchvision model keeps before the class filter, so that other
# classes cannot crowd vehicles out of the final ``max_detections``.
_CANDIDATES_PER_IMAGE = 300


class Detector:
    """Batched detection with the filters every detector shares.

    Subclasses implement :meth:`_predict`, which runs the frames through
    ``preprocess`` (the callable their spec's ``transforms`` built) and the network;
    :meth:`detect_tensors` takes frames already on the device (as
    :func:`models.imaging.to_device` makes them) so that
    :class:`models.fused.DetectAndEmbed` can crop the same tensors.
    """

    name = "detector"

    def __init__(self, categories: Sequence[str], preprocess: Callable, *, min_score: float = 0.25, nms_iou: float = 0.45,
                 classes: Optional[Sequence[str]] = VEHICLE_CLASSES, min_box: float = 0.0,
                 max_detections: int = 100, device: str = "cpu"):
        self.categories = tuple(categories)
        self.preprocess = preprocess
        real = [c for c in self.categories if c not in ("__background__", "N/A")]
        self.classes = tuple(real if classes is None else classes)
        unknown = sorted(set(self.classes) - set(real))
        if unknown:
            raise ValueError("unknown classes %s for %s; known: %s" % (unknown, self.name, ", ".join(real)))
        self.min_score = float(min_score)
        self.nms_iou = float(nms_iou)
        self.min_box = float(min_box)
        self.max_detections = int(max_detections)
        self.device = torch.device(device)
        self._keep_label = torch.tensor([c in self.classes for c in self.categories], device=self.device)

    def detect(self, images) -> list:
        """Detections for HxWx3 uint8 RGB arrays (one forward for the whole list)."""
        return self.detect_tensors(to_device(images, self.device))

    @torch.inference_mode()
    def detect_tensors(self, frames) -> list:
        """Detections for float (3, H, W) 0..1 RGB tensors on :attr:`device`."""
        if not frames:
            return []
        return [self._finish(*raw, frame.shape[-2:]) for raw, frame in zip(self._predict(frames), frames)]

    def _predict(self, frames) -> list:
        """Per frame: (boxes (N, 4) xyxy in frame pixels, scores (N,), label ids (N,)) tensors."""
        raise NotImplementedError

    def _finish(self, boxes, scores, labels, size) -> dict:
        boxes = boxes.clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
        keep = self._keep_label[labels] & (scores >= self.min_score)
        if self.min_box > 0:
            keep &= ((boxes[:, 2:] - boxes[:, :2]) >= self.min_box).all(dim=1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        order = torch.argsort(scores, descending=True)[: self.max_detections]
        return {
            "boxes": boxes[order].float().cpu().numpy().reshape(-1, 4),
            "scores": scores[order].float().cpu().numpy(),
            "labels": [self.categories[i] for i in labels[order].tolist()],
        }


class TorchvisionDetector(Detector):
    """A torchvision detection model: it resizes and normalises internally and
    returns boxes in the pixels of each input, whatever its size. Its preprocessing,
    ``spec.transforms()`` (torchvision's ``ObjectDetection`` preset: float 0..1
    images), runs on each frame."""

    def __init__(self, name: str, model: torch.nn.Module, spec: WeightsSpec, **options):
        self.name = name
        self.spec = spec
        super().__init__(spec.categories, spec.transforms(), **options)
        self.model = model.eval().to(self.device)

    def _predict(self, frames) -> list:
        return [(o["boxes"], o["scores"], o["labels"]) for o in self.model([self.preprocess(f) for f in frames])]


def _spec(name: str, weights_enum) -> WeightsSpec:
    return WeightsSpec(name=name, url=weights_enum.url, sha256=None, transforms=weights_enum.transforms,
                       categories=tuple(weights_enum.meta["categories"]),
                       meta={"torchvision_weights": str(weights_enum)}, file_format="torch")


# name -> (torchvision builder, published weights, prefix of its box thresholds)
_TORCHVISION = {
    "retinanet_resnet50_fpn": (tv_detection.retinanet_resnet50_fpn,
                               tv_detection.RetinaNet_ResNet50_FPN_Weights.DEFAULT, ""),
    "retinanet_resnet50_fpn_v2": (tv_detection.retinanet_resnet50_fpn_v2,
                                  tv_detection.RetinaNet_ResNet50_FPN_V2_Weights.DEFAULT, ""),
    "fasterrcnn_resnet50_fpn_v2": (tv_detection.fasterrcnn_resnet50_fpn_v2,
                                   tv_detection.FasterRCNN_ResNet50_FPN_V2_Weights.DEFAULT, "box_"),
    "ssdlite320_mobilenet_v3_large": (tv_detection.ssdlite320_mobilenet_v3_large,
                                      tv_detection.SSDLite320_MobileNet_V3_Large_Weights.DEFAULT, ""),
}
SPECS = {name: _spec(name, published) for name, (_, published, _) in _TORCHVISION.items()}


def _torchvision_detector(name: str, *, weights: Optional[str] = None, sha256: Optional[str] = None,
                          pretrained: bool = True, device: str = "cpu", min_score: float = 0.25,
                          nms_iou: float = 0.45, spec: Optional[WeightsSpec] = None,
                          **options) -> TorchvisionDetector:
    """Builds ``name`` untrained, then loads a state dict from ``weights`` or,
    without a URI, torchvision's published COCO weights; ``pretrained=False``
    keeps the random initialisation (for tests). ``spec``: its entry in
    :data:`SPECS` unless given (the registry passes its own)."""
    build, published, prefix = _TORCHVISION[name]
    thresholds = {prefix + "score_thresh": min_score, prefix + "nms_thresh": nms_iou,
                  prefix + "detections_per_img": max(_CANDIDATES_PER_IMAGE, options.get("max_detections", 100))}
    model = build(weights=None, weights_backbone=None, **thresholds)
    if weights:
        apply_state_dict(model, load_state_dict(weights, sha256), weights, name)
    elif pretrained:
        apply_state_dict(model, torchvision_state_dict(published, name, "--detector-weights"), published.url, name)
    return TorchvisionDetector(name, model, spec or SPECS[name], min_score=min_score, nms_iou=nms_iou,
                               device=device, **options)


def retinanet_resnet50_fpn(**kwargs) -> TorchvisionDetector:
    """RetinaNet ResNet-50 FPN (COCO): the architecture CCTView ran through ImageAI."""
    return _torchvision_detector("retinanet_resnet50_fpn", **kwargs)


def retinanet_resnet50_fpn_v2(**kwargs) -> TorchvisionDetector:
    """RetinaNet ResNet-50 FPN v2 (COCO): torchvision's improved recipe."""
    return _torchvision_detector("retinanet_resnet50_fpn_v2", **kwargs)


def fasterrcnn_resnet50_fpn_v2(**kwargs) -> TorchvisionDetector:
    """Faster R-CNN ResNet-50 FPN v2 (COCO): the most accurate, the slowest."""
    return _torchvision_detector("fasterrcnn_resnet50_fpn_v2", **kwargs)


def ssdlite320_mobilenet_v3_large(**kwargs) -> TorchvisionDetector:
    """SSDlite 320 MobileNetV3-Large (COCO): fast, weak on small vehicles."""
    return _torchvision_detector("ssdlite320_mobilenet_v3_large", **kwargs)
