"""Frames on the device, and crops cut from them there.

A frame is uploaded once, as uint8 (a quarter of the bytes of float32), and
turned into a float ``(3, H, W)`` tensor in 0..1 on the device. Detectors read
that tensor, and embedders cut their crops from the same tensor with
``roi_align``: no PIL crop, no per-crop resize on the CPU, no second upload.
:class:`CropTransform` is the preprocessing of every embedder: the crops, then
the normalisation its network was trained with.
"""
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision.ops import roi_align

# ImageNet evaluation convention (Resize(256) then CenterCrop(224)): the crop
# keeps 224/256 of the shorter side of the box around its centre.
CENTER_CROP_FRACTION = 224 / 256

__all__ = ["CENTER_CROP_FRACTION", "CropTransform", "crop_boxes", "crop_rois", "to_device", "to_uint8"]


def to_device(images, device) -> list:
    """HxWx3 uint8 RGB arrays -> float32 (3, H, W) tensors in 0..1 on ``device``."""
    frames = []
    for image in images:
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8
                and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError("expected an HxWx3 uint8 RGB array, got %s %s" % (
                getattr(image, "dtype", type(image).__name__), getattr(image, "shape", "")))
        # torch wants a writable array (np.asarray(PIL image) is read-only).
        t = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device)
        frames.append(t.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format).div_(255))
    return frames


def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """A float (3, H, W) RGB 0..1 tensor from :func:`to_device` -> the HxWx3 uint8 array it
    came from, for models fed with pixels (exact: v / 255 * 255 rounds back to v)."""
    return frame.mul(255).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def crop_rois(boxes: torch.Tensor, size, mode: str) -> torch.Tensor:
    """The regions to sample for ``boxes`` (N, 4) xyxy, for an input of ``size`` (H, W).

    ``stretch`` warps the whole box to the input size (usual for re-id nets).
    ``center`` reproduces Resize + CenterCrop as CCTView applied them to its
    crop files: a region ``size`` shaped, centred on the box, whose shorter
    side is 224/256 of the box's shorter side.
    """
    if mode == "stretch":
        return boxes
    if mode != "center":
        raise ValueError("crop mode must be 'stretch' or 'center', got %r" % mode)
    h, w = size
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    short = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    unit = short * CENTER_CROP_FRACTION / min(h, w)  # box pixels per input pixel
    half = torch.stack([unit * w, unit * h], dim=1) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def crop_boxes(frames, boxes, size, mode: str = "stretch") -> torch.Tensor:
    """All boxes of all frames as one (sum Ni, 3, H, W) batch, in frame order.

    ``frames``: (3, H, W) tensors as from :func:`to_device` (sizes may differ);
    ``boxes``: one (Ni, 4) xyxy array or tensor per frame, in pixels. Frames of
    the same size are stacked so each size costs one ``roi_align`` call.
    ``aligned=True`` treats a box's integer edges as pixel edges (a box
    [x1, x2) covers pixels x1..x2-1, as a PIL crop does); an adaptive sampling
    ratio averages several samples per output pixel when a box is shrunk.
    """
    device = frames[0].device
    rois = [crop_rois(torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4), device=device), size, mode)
            for b in boxes]
    counts = [len(r) for r in rois]
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = torch.empty((int(starts[-1]), 3) + tuple(size), dtype=torch.float32, device=device)
    by_shape = defaultdict(list)
    for i, frame in enumerate(frames):
        if counts[i]:
            by_shape[tuple(frame.shape)].append(i)
    for group in by_shape.values():
        batch = torch.stack([frames[i] for i in group]) if len(group) > 1 else frames[group[0]][None]
        crops = roi_align(batch, [rois[i] for i in group], output_size=tuple(size),
                          spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        where = torch.cat([torch.arange(starts[i], starts[i + 1], device=device) for i in group])
        out[where] = crops
    return out


class CropTransform:
    """An embedder's preprocessing: the boxes of device frames -> its input batch.

    Each box is cut with :func:`crop_boxes` to ``input_size`` (``crop``: ``stretch`` or
    ``center``), then :meth:`normalise` prepares the pixels as the network expects
    them: ``(pixel * scale - mean) / std`` of 0..1 pixels in RGB order (BGR with
    ``bgr``; no ``mean``: left in 0..1), or, with ``pixels``, uint8 0..255 values.
    The ``transforms`` of an embedder's :class:`models.weights.WeightsSpec` builds it.
    """

    def __init__(self, input_size: Sequence[int], *, crop: str = "stretch", mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, bgr: bool = False, scale: float = 1.0,
                 pixels: bool = False, device: str = "cpu"):
        if crop not in ("stretch", "center"):
            raise ValueError("crop must be 'stretch' or 'center', got %r" % crop)
        self.input_size = tuple(int(v) for v in input_size)
        self.crop = crop
        self.device = torch.device(device)
        self.bgr, self.scale, self.pixels = bool(bgr), float(scale), bool(pixels)
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __call__(self, frames, boxes) -> torch.Tensor:
        """``frames`` as from :func:`to_device` (any device) and one (Ni, 4) xyxy array per
        frame -> the (sum Ni, 3, H, W) input batch on :attr:`device`, in frame order."""
        return self.normalise(crop_boxes([f.to(self.device) for f in frames], boxes, self.input_size, self.crop))

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) RGB 0..1 crops -> the network's input values."""
        if self.pixels:
            return crops.mul(255).round_().to(torch.uint8)
        if self.bgr:
            crops = crops[:, [2, 1, 0]]
        if self.scale != 1.0:
            crops = crops * self.scale
        return crops if self._mean is None else (crops - self._mean) / self._std
