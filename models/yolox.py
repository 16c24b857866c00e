"""YOLOX (ONNX) as a :class:`models.detectors.Detector`.

The exported YOLOX graph stops before decoding: per anchor it gives grid
offsets, log sizes, objectness and 80 class scores (sigmoids applied). The
letterbox, the decoding and class-aware NMS run here in torch, vectorised over
the batch, on the detector's device; only the network itself runs in
onnxruntime. The letterbox is YOLOX-Nano's spec's ``transforms`` (:class:`Letterbox`).
"""
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from models.detectors import COCO_80, Detector
from models.weights import WeightsError, WeightsSpec, onnx_session

__all__ = ["PAD_VALUE", "STRIDES", "YOLOX_NANO", "Letterbox", "YoloxDetector", "letterbox", "yolox"]

STRIDES = (8, 16, 32)
PAD_VALUE = 114.0


class Letterbox:
    """YOLOX's preprocessing for an input of ``size`` (H, W): frames -> :func:`letterbox`."""

    def __init__(self, size):
        self.size = tuple(int(v) for v in size)

    def __call__(self, frames):
        return letterbox(frames, self.size)


YOLOX_NANO = WeightsSpec(
    name="yolox_nano",
    url="https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx",
    # Digest of the copy this project is tested with (YOLOX-Nano, yolox_nano.onnx, as the tests read it).
    sha256="e8af074932d4ed7e232278e3055cefcdea3edf178874a3694ae292649fb464dd",
    transforms=Letterbox,  # to the ONNX file's input size (416x416 for YOLOX-Nano)
    categories=COCO_80,
    meta={"params": 910_000, "input": "images [1,3,416,416]", "output": "output [1,3549,85]",
          "onnx_optimization": "all"},
    file_format="onnx",
)


def letterbox(frames, size):
    """Frames (float (3, h, w) RGB 0..1) -> a (B, 3, H, W) BGR 0..255 batch and the scale of each.

    As YOLOX's own preprocessing: scale to fit keeping the aspect ratio
    (bilinear, like cv2.INTER_LINEAR), top-left aligned, pad with 114, no
    normalisation.
    """
    height, width = size
    device = frames[0].device
    batch = torch.full((len(frames), 3, height, width), PAD_VALUE, device=device)
    scales = torch.empty(len(frames), device=device)
    groups = {}
    for i, frame in enumerate(frames):
        groups.setdefault(tuple(frame.shape[-2:]), []).append(i)
    for (h, w), idx in groups.items():
        r = min(height / h, width / w)
        nh, nw = int(h * r), int(w * r)
        resized = F.interpolate(torch.stack([frames[i] for i in idx]) * 255, size=(nh, nw),
                                mode="bilinear", align_corners=False)
        index = torch.tensor(idx, device=device)
        batch[index, :, :nh, :nw] = resized[:, [2, 1, 0]]
        scales[index] = r
    return batch, scales


def _grid(size, device):
    """Cell offsets (A, 2) and strides (A, 1) in the order YOLOX lays out its anchors."""
    cells, strides = [], []
    for stride in STRIDES:
        ny, nx = size[0] // stride, size[1] // stride
        yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
        cells.append(torch.stack((xv, yv), dim=-1).reshape(-1, 2))
        strides.append(torch.full((ny * nx, 1), stride))
    return torch.cat(cells).float().to(device), torch.cat(strides).float().to(device)


class YoloxDetector(Detector):
    """A YOLOX ONNX session; one session run per frame when its batch is fixed to 1.
    ``transforms`` builds its preprocessing from the session's input size (H, W)."""

    name = "yolox"

    def __init__(self, session, transforms=Letterbox, **options):
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        out_shape = outputs[0].shape if len(outputs) == 1 else []
        if not (len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]) and shape[1] == 3
                and len(out_shape) == 3 and out_shape[-1] == 5 + len(COCO_80)):
            raise WeightsError("not a YOLOX model: expected one input [N,3,H,W] and one output [N,A,%d], "
                               "got inputs %s and outputs %s" % (5 + len(COCO_80),
                                                                 [i.shape for i in inputs], [o.shape for o in outputs]))
        self.input_size = (shape[2], shape[3])
        super().__init__(COCO_80, transforms(self.input_size), **options)
        self.session = session
        self._input_name = inputs[0].name
        self._one_per_run = shape[0] == 1
        self._cells, self._strides = _grid(self.input_size, self.device)
        if isinstance(out_shape[1], int) and out_shape[1] != len(self._cells):
            raise WeightsError("not a YOLOX model: %d anchors for a %dx%d input, expected %d (strides %s)"
                               % (out_shape[1], shape[2], shape[3], len(self._cells), STRIDES))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._one_per_run:
            return np.concatenate([self.session.run(None, {self._input_name: batch[i:i + 1]})[0]
                                   for i in range(len(batch))])
        return self.session.run(None, {self._input_name: batch})[0]

    def _predict(self, frames) -> list:
        batch, scales = self.preprocess(frames)
        out = torch.from_numpy(self._run(batch.cpu().numpy())).to(self.device)
        centre = (out[..., :2] + self._cells) * self._strides
        half = out[..., 2:4].exp() * self._strides / 2
        boxes = torch.cat([centre - half, centre + half], dim=-1) / scales[:, None, None]
        class_scores, labels = out[..., 5:].max(dim=-1)
        scores = out[..., 4] * class_scores
        image, anchor = ((scores >= self.min_score) & self._keep_label[labels]).nonzero(as_tuple=True)
        boxes, scores, labels = boxes[image, anchor], scores[image, anchor], labels[image, anchor]
        kept = batched_nms(boxes, scores, image * len(COCO_80) + labels, self.nms_iou)
        image, boxes, scores, labels = image[kept], boxes[kept], scores[kept], labels[kept]
        return [(boxes[image == i], scores[image == i], labels[image == i]) for i in range(len(frames))]


def yolox(*, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu",
          threads: int = 0, optimization: Optional[str] = None, spec: WeightsSpec = YOLOX_NANO,
          **options) -> YoloxDetector:
    """YOLOX from an ONNX file at ``weights`` (e.g. YOLOX-Nano, ``yolox_nano.onnx``), prepared by
    ``spec.transforms``. ``threads`` and ``optimization`` go to :func:`models.weights.onnx_session`
    (a file with ``spec``'s sha256 gets its measured optimisation level)."""
    if not weights:
        raise WeightsError("yolox needs an ONNX file: pass --detector-weights URI (YOLOX-Nano: %s)" % spec.url)
    session = onnx_session(weights, sha256, device, threads=threads, optimization=optimization, known=(spec,))
    return YoloxDetector(session, spec.transforms, device=device, **options)
