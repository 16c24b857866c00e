"""ImageAI 3 detectors (extra ``[imageai]``): its weight files, loaded by ImageAI itself, run batched.

CCTView detected with ImageAI's RetinaNet. ImageAI 3 builds its networks in PyTorch
and loads a ``.pt``/``.pth`` state dict into them (``ObjectDetection.loadModel``); this
module lets ImageAI do exactly that, then takes the loaded network and runs it on a
whole batch of frames per call instead of ImageAI's one image per call:

- ``imageai_retinanet``: ImageAI's RetinaNet is torchvision's RetinaNet-ResNet50-FPN
  with 91 classes, so it runs as :class:`models.detectors.TorchvisionDetector` and the
  same file gives the same boxes as ``retinanet_resnet50_fpn`` with that file.
- ``imageai_yolov3``, ``imageai_tiny_yolov3``: ImageAI's own YOLOv3 networks, with
  ImageAI's preprocessing (its letterbox to 416x416, per frame) and its decoding and
  per-class NMS done for the whole batch at once. As in ImageAI, a box needs an
  objectness above the threshold and a class probability at or above it, NMS ranks by
  objectness with ImageAI's IoU (box corners inclusive, +1 pixel), and the score is the
  class probability: with ``min_score=0.5, nms_iou=0.4`` the boxes are those of ImageAI's
  ``detectObjectsFromImage`` at its defaults.

ImageAI keeps the loaded network in a private attribute of ``ObjectDetection``, which is
why the ``[imageai]`` extra stays below ImageAI 4. Labels use the same COCO names as the
other detectors (ImageAI's lists hold the same classes in the same order, some under VOC
names such as ``motorbike``).
"""
import os
import threading
from typing import Optional
from urllib.parse import urlparse

import numpy as np
import torch
from torchvision.ops import batched_nms

from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

from models.detectors import _CANDIDATES_PER_IMAGE, COCO_80, COCO_91, Detector, TorchvisionDetector
from models.imaging import to_uint8
from models.weights import WeightsError, WeightsSpec, _first_line, local_file

__all__ = ["SPECS", "YOLO_INPUT", "ImageAILetterbox", "ImageAIYoloDetector", "imageai_retinanet",
           "imageai_tiny_yolov3", "imageai_yolov3", "load_imageai_network"]

_RELEASE = "https://github.com/OlafenwaMoses/ImageAI/releases/download/3.0.0-pretrained/"
YOLO_INPUT = 416


class ImageAILetterbox:
    """ImageAI's YOLOv3 preprocessing: each frame through ImageAI's own ``prepare_image``
    (letterbox to ``size`` x ``size``, cv2 bicubic, pad 128, RGB 0..1), stacked.
    ImageAI expects OpenCV's BGR order, so each frame is handed over as BGR pixels."""

    def __init__(self, size: int = YOLO_INPUT):
        from imageai.yolov3.utils import prepare_image

        self.size = int(size)
        self._prepare = prepare_image

    def __call__(self, frames) -> torch.Tensor:
        batch = []
        for frame in frames:
            bgr = np.ascontiguousarray(to_uint8(frame)[:, :, ::-1])
            batch.append(self._prepare(bgr, (self.size, self.size)))
        return torch.cat(batch)


SPECS = {
    "imageai_retinanet": WeightsSpec(
        name="imageai_retinanet", url=_RELEASE + "retinanet_resnet50_fpn_coco-eeacb38b.pth", sha256=None,
        transforms=RetinaNet_ResNet50_FPN_Weights.COCO_V1.transforms,  # torchvision's network, its preset
        categories=COCO_91, meta={"imageai_model_type": "RetinaNet"}),
    "imageai_yolov3": WeightsSpec(
        name="imageai_yolov3", url=_RELEASE + "yolov3.pt", sha256=None, transforms=ImageAILetterbox,
        categories=COCO_80, meta={"imageai_model_type": "YOLOv3"}),
    "imageai_tiny_yolov3": WeightsSpec(
        name="imageai_tiny_yolov3", url=_RELEASE + "tiny-yolov3.pt", sha256=None, transforms=ImageAILetterbox,
        categories=COCO_80, meta={"imageai_model_type": "TinyYOLOv3"}),
}


def _object_detection():
    try:
        from imageai.Detection import ObjectDetection
    except ImportError as e:
        raise WeightsError("imageai detectors need ImageAI: pip install 'cctview-beam[imageai]' (%s)" % e) from None
    return ObjectDetection


def load_imageai_network(spec: WeightsSpec, weights: Optional[str], sha256: Optional[str],
                         device: str) -> torch.nn.Module:
    """The network of the ImageAI model of ``spec`` with the weight file at ``weights`` (local or
    any Beam URI), loaded by ImageAI's ``ObjectDetection.loadModel``, in eval mode on ``device``."""
    name = spec.name
    if not weights:
        raise WeightsError("%s needs an ImageAI weight file: pass --detector-weights URI (ImageAI's: %s)"
                           % (name, spec.url))
    detection = _object_detection()()
    if not device.startswith("cuda"):
        detection.useCPU()
    getattr(detection, "setModelTypeAs" + spec.meta["imageai_model_type"])()
    suffix = os.path.splitext(urlparse(weights).path)[1]
    with local_file(weights, sha256, suffix=suffix) as path:
        try:
            detection.setModelPath(path)  # ImageAI accepts only files named .pt or .pth
            detection.loadModel()
        except Exception as e:  # ImageAI raises ValueError, RuntimeError, and torch's unpickling errors
            raise WeightsError("ImageAI cannot load %s as %s: %s" % (weights, name, _first_line(e))) from None
    return detection._ObjectDetection__model.eval().to(device)


def imageai_retinanet(*, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu",
                      min_score: float = 0.25, nms_iou: float = 0.45, spec: WeightsSpec = SPECS["imageai_retinanet"],
                      **options) -> TorchvisionDetector:
    """ImageAI's RetinaNet (``retinanet_resnet50_fpn_coco-eeacb38b.pth``), batched as torchvision runs it,
    with the box thresholds of ``retinanet_resnet50_fpn``."""
    model = load_imageai_network(spec, weights, sha256, device)
    model.score_thresh, model.nms_thresh = min_score, nms_iou
    model.detections_per_img = max(_CANDIDATES_PER_IMAGE, options.get("max_detections", 100))
    return TorchvisionDetector("imageai_retinanet", model, spec, min_score=min_score,
                               nms_iou=nms_iou, device=device, **options)


class ImageAIYoloDetector(Detector):
    """An ImageAI YOLOv3 network: ``preprocess`` (ImageAI's, :class:`ImageAILetterbox`) per
    frame, one forward and one vectorised decoding + NMS for the batch (ImageAI's
    semantics, module docstring).

    ImageAI's detection layers keep each forward's output in a module attribute before
    returning it, so one network must not run two forwards at once: RunInference shares
    the model between the threads of a worker, and a lock keeps their forwards apart.
    """

    def __init__(self, name: str, model: torch.nn.Module, preprocess: ImageAILetterbox, **options):
        self.name = name
        super().__init__(COCO_80, preprocess, **options)
        self.model = model
        self._forward_lock = threading.Lock()

    def _predict(self, frames) -> list:
        batch = self.preprocess(frames).to(self.device)
        size = self.preprocess.size
        with self._forward_lock:
            pred = self.model(batch)  # (B, anchors, 5 + 80): cx, cy, w, h (416 px), objectness, classes
        image, anchor = (pred[..., 4] > self.min_score).nonzero(as_tuple=True)
        rows = pred[image, anchor]
        half = rows[:, 2:4] / 2
        boxes = torch.cat([rows[:, :2] - half, rows[:, :2] + half], dim=1)
        objectness = rows[:, 4]
        scores, labels = rows[:, 5:].max(dim=1)
        inclusive = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)  # ImageAI's IoU counts both edges
        kept = batched_nms(inclusive, objectness, image * len(COCO_80) + labels, self.nms_iou)
        image, boxes, scores, labels = image[kept], boxes[kept], scores[kept], labels[kept]
        sizes = torch.tensor([[f.shape[-1], f.shape[-2]] for f in frames], dtype=boxes.dtype, device=boxes.device)
        wh = sizes[image]
        scale = torch.min(size / wh, dim=1, keepdim=True).values
        offset = (size - scale * wh) / 2
        boxes = (boxes - offset.repeat(1, 2)) / scale
        return [(boxes[image == i], scores[image == i], labels[image == i]) for i in range(len(frames))]


def _yolo(spec: WeightsSpec, weights, sha256, device, **options) -> ImageAIYoloDetector:
    model = load_imageai_network(spec, weights, sha256, device)
    return ImageAIYoloDetector(spec.name, model, spec.transforms(), device=device, **options)


def imageai_yolov3(*, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu",
                   spec: WeightsSpec = SPECS["imageai_yolov3"], **options) -> ImageAIYoloDetector:
    """ImageAI's YOLOv3 (``yolov3.pt``)."""
    return _yolo(spec, weights, sha256, device, **options)


def imageai_tiny_yolov3(*, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu",
                        spec: WeightsSpec = SPECS["imageai_tiny_yolov3"], **options) -> ImageAIYoloDetector:
    """ImageAI's TinyYOLOv3 (``tiny-yolov3.pt``)."""
    return _yolo(spec, weights, sha256, device, **options)
