"""Appearance embedders behind one interface, and their builders.

:meth:`Embedder.embed_crops` takes whole frames and the boxes found in them and
runs one forward for all crops of all frames. Its input batch comes from the
embedder's :attr:`Embedder.preprocess`, a :class:`models.imaging.CropTransform`
built by the ``transforms`` of its :class:`models.weights.WeightsSpec`: every
crop cut from the frame's device tensor with ``roi_align``, then normalised as
the network was trained. :meth:`Embedder.embed_pil` is CCTView's way for one
crop (PIL crop, Resize, CenterCrop, ToTensor, Normalize), kept as the baseline
for benchmarks.
"""
import functools
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

from models.imaging import CENTER_CROP_FRACTION, CropTransform, to_device
from models.weights import (WeightsError, WeightsSpec, apply_state_dict, load_state_dict, onnx_session,
                            torchvision_state_dict)

__all__ = ["COLOR_BANDS", "COLOR_HISTOGRAM", "IMAGENET_MEAN", "IMAGENET_STD", "OSNET_X0_25", "RESNET50", "VERI_DENSENET",
           "ColorBandsEmbedder", "ColorHistogramEmbedder", "DenseNetVeRI", "Embedder", "OnnxEmbedder", "TorchEmbedder",
           "color_bands", "color_histogram", "densenet201_veri", "onnx", "resnet50"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Resize(256), CenterCrop(224), ImageNet mean/std: how the ImageNet trunks were trained and
# how CCTView prepared its crops (``crop='center'`` reproduces that geometry on the device).
_IMAGENET_CROPS = functools.partial(CropTransform, input_size=(224, 224), crop="center",
                                    mean=IMAGENET_MEAN, std=IMAGENET_STD)

VERI_DENSENET = WeightsSpec(
    name="VeRI_densenet_ft50",
    # CCTView's checkpoint (Git LFS); the sha256 is the LFS object id of that file.
    url="https://media.githubusercontent.com/media/samdbrice/cctview/"
        "332841f61cd7f618a5d87a4cb33869202593e787/models/VeRI_densenet_ft50.pth",
    sha256="bd82ed9950dfb18876b908bdc6b02eae8f9896e6f2f17e66f75f76c8ea123030",
    transforms=_IMAGENET_CROPS,
    meta={"classes": 576, "embedding": "1920-d average-pooled DenseNet201 features, before the classifier",
          "source": "CCTView, after GeoTrouvetout/Vehicle_ReID (DenseNet201 fine-tuned on VeRi-776)"},
)
RESNET50 = WeightsSpec(
    name="resnet50", url=torchvision.models.ResNet50_Weights.DEFAULT.url, sha256=None,
    transforms=_IMAGENET_CROPS,
    meta={"torchvision_weights": str(torchvision.models.ResNet50_Weights.DEFAULT), "embedding": "2048-d"},
)
OSNET_X0_25 = WeightsSpec(
    name="osnet_x0_25",
    url="https://github.com/KaiyangZhou/deep-person-reid",
    # Digest of the copy this project is tested with (OSNet x0.25, osnet_x0_25.onnx, as the tests read it).
    sha256="df72548a7133d2896a9faeac417019c62eaa5ec1a713182f7fb6762b99f4411d",
    # The input size is the ONNX file's (256x128 for OSNet): the builder passes it.
    transforms=functools.partial(CropTransform, crop="stretch", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # onnx_optimization: without onnxruntime's NCHWc layout rewrite its narrow and
    # depthwise convolutions run ~1.3x faster per crop on CPU (BENCHMARKS.md).
    meta={"embedding": "512-d", "trained_on": "people (generic appearance)", "onnx_optimization": "extended"},
    file_format="onnx",
)
COLOR_HISTOGRAM = WeightsSpec(
    name="color_histogram", url="", sha256=None,
    transforms=functools.partial(CropTransform, crop="stretch"),  # 0..1 RGB crops, not normalised
    meta={"embedding": "bins**3-d joint RGB histogram, L2-normalised"}, file_format=None,
)
COLOR_BANDS = WeightsSpec(
    name="color_bands", url="", sha256=None,
    transforms=functools.partial(CropTransform, crop="stretch"),  # 0..1 RGB crops, not normalised
    meta={"embedding": "bands * bins**3-d: a joint RGB histogram per horizontal strip, "
                       "square roots (Hellinger), L2-normalised"}, file_format=None,
)


class Embedder:
    """Crops -> fixed-size float32 vectors; subclasses implement :meth:`_embed`.

    ``preprocess`` (a :class:`models.imaging.CropTransform`) turns frames and boxes
    into the network's input batch; its ``crop`` is how a box becomes the input:
    ``stretch`` (the whole box warped to ``input_size``) or ``center`` (CCTView's
    Resize + CenterCrop geometry).
    """

    name = "embedder"
    dim = 0

    def __init__(self, preprocess: CropTransform):
        self.preprocess = preprocess
        self.input_size = preprocess.input_size
        self.crop = preprocess.crop
        self.device = preprocess.device

    def embed_crops(self, images, boxes) -> list:
        """One (Ni, dim) float32 array per HxWx3 uint8 RGB image, for its (Ni, 4) xyxy boxes."""
        return self.embed_tensors(to_device(images, self.device), boxes)

    @torch.inference_mode()
    def embed_tensors(self, frames, boxes) -> list:
        """As :meth:`embed_crops`, for float (3, H, W) 0..1 frames already on a device."""
        counts = [len(b) for b in boxes]
        if not sum(counts):
            return [np.zeros((0, self.dim), np.float32) for _ in counts]
        return np.split(self._embed(self.preprocess(frames, boxes)), np.cumsum(counts)[:-1])

    @torch.inference_mode()
    def embed_pil(self, crop) -> np.ndarray:
        """CCTView's way, for one PIL crop: resize and crop in PIL, then one forward."""
        if self.crop == "center":
            resize = [T.Resize(round(min(self.input_size) / CENTER_CROP_FRACTION)), T.CenterCrop(self.input_size)]
        else:
            resize = [T.Resize(self.input_size)]
        tensor = T.Compose(resize + [T.ToTensor()])(crop.convert("RGB"))
        return self._embed(self.preprocess.normalise(tensor[None].to(self.device)))[0]

    def _embed(self, inputs: torch.Tensor) -> np.ndarray:
        """The network on a batch :attr:`preprocess` prepared -> (M, dim) float32."""
        raise NotImplementedError


class TorchEmbedder(Embedder):
    """A torch module whose ``forward`` (or the given method) returns embeddings."""

    def __init__(self, name: str, model: torch.nn.Module, dim: int, spec: WeightsSpec, preprocess: CropTransform,
                 method: Optional[str] = None):
        super().__init__(preprocess)
        self.name, self.dim, self.spec = name, dim, spec
        self.model = model.eval().to(self.device)
        self._forward = getattr(self.model, method) if method else self.model

    def _embed(self, inputs):
        return self._forward(inputs).float().cpu().numpy()


class DenseNetVeRI(torch.nn.Module):
    """CCTView's vehicle re-id network, module for module, so that its
    ``VeRI_densenet_ft50.pth`` loads unchanged (keys ``features.*``,
    ``classifier.*``; the pooling has no weights). Unlike torchvision's
    DenseNet there is no ReLU between the features and the pooling, and the
    pooling is a fixed 7x7 average: the input must be 224x224."""

    def __init__(self, num_classes: int = 576):
        super().__init__()
        self.features = torchvision.models.densenet201(weights=None).features
        self.mixer = torch.nn.AvgPool2d(kernel_size=7, stride=1)
        self.classifier = torch.nn.Linear(1920, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 1920-d vector CCTView stored as a detection's features."""
        return self.mixer(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor):
        f = self.embed(x)
        return f, self.classifier(f)


def densenet201_veri(*, weights: Optional[str] = None, sha256: Optional[str] = None, pretrained: bool = True,
                     device: str = "cpu", crop: str = "center", spec: WeightsSpec = VERI_DENSENET) -> TorchEmbedder:
    """CCTView's DenseNet201-VeRi; ``crop='center'`` matches the embeddings CCTView stored."""
    model = DenseNetVeRI()
    if weights:
        apply_state_dict(model, load_state_dict(weights, sha256), weights, "densenet201_veri")
    elif pretrained:
        raise WeightsError("densenet201_veri needs CCTView's VeRI_densenet_ft50.pth: pass --embedder-weights URI "
                           "(url: %s, sha256 %s)" % (spec.url, spec.sha256))
    return TorchEmbedder("densenet201_veri", model, 1920, spec, spec.transforms(crop=crop, device=device),
                         method="embed")


def resnet50(*, weights: Optional[str] = None, sha256: Optional[str] = None, pretrained: bool = True,
             device: str = "cpu", crop: str = "center", spec: WeightsSpec = RESNET50) -> TorchEmbedder:
    """torchvision's ResNet-50 trunk: the 2048-d pooled features (the classifier removed).

    ``weights`` may hold a full ResNet-50 state dict (as torchvision publishes
    it) or one saved without ``fc``.
    """
    published = torchvision.models.ResNet50_Weights.DEFAULT
    model = torchvision.models.resnet50(weights=None)
    if weights:
        state = load_state_dict(weights, sha256)
        if not any(k.startswith("fc.") for k in state):
            model.fc = torch.nn.Identity()
        apply_state_dict(model, state, weights, "resnet50")
    elif pretrained:
        apply_state_dict(model, torchvision_state_dict(published, "resnet50", "--embedder-weights"),
                         published.url, "resnet50")
    model.fc = torch.nn.Identity()
    return TorchEmbedder("resnet50", model, 2048, spec, spec.transforms(crop=crop, device=device))


class OnnxEmbedder(Embedder):
    """Any ONNX embedder with one fixed-size image input [N or 1, 3, H, W] and
    an output [N, D]; run once per crop when its batch is fixed to 1.
    ``transforms`` builds its preprocessing from the input size (H, W)."""

    name = "onnx"

    def __init__(self, session, transforms):
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        out_shape = outputs[0].shape if outputs else []
        if not (len(shape) == 4 and shape[1] == 3 and all(isinstance(d, int) for d in shape[2:])
                and (shape[0] == 1 or not isinstance(shape[0], int)) and len(out_shape) == 2):
            raise WeightsError("not an ONNX embedder: expected one input [N,3,H,W] with fixed H, W (N dynamic or 1) "
                               "and an output [N,D], got inputs %s and outputs %s"
                               % ([i.shape for i in inputs], [o.shape for o in outputs]))
        super().__init__(transforms(input_size=shape[2:]))
        self.session = session
        self._input_name = inputs[0].name
        self._one_per_run = shape[0] == 1
        self.dim = out_shape[1] if isinstance(out_shape[1], int) else self._run(
            np.zeros((1, 3) + self.input_size, np.float32)).shape[1]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._one_per_run:
            return np.concatenate([self.session.run(None, {self._input_name: batch[i:i + 1]})[0]
                                   for i in range(len(batch))])
        return self.session.run(None, {self._input_name: batch})[0]

    def _embed(self, inputs):
        return self._run(inputs.cpu().numpy()).astype(np.float32, copy=False)


def onnx(*, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu",
         crop: str = "stretch", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
         bgr: bool = False, scale: float = 1.0, threads: int = 0,
         optimization: Optional[str] = None, spec: WeightsSpec = OSNET_X0_25) -> OnnxEmbedder:
    """An ONNX embedder from ``weights`` (e.g. OSNet x0.25, ``osnet_x0_25.onnx``).

    Its input is prepared by ``spec.transforms`` as ``(pixel * scale - mean) / std``
    with pixels in 0..1, RGB unless ``bgr``: the default suits ImageNet-normalised
    networks. ``threads`` and ``optimization`` go to :func:`models.weights.onnx_session`
    (a file with ``spec``'s sha256 gets its measured optimisation level).
    """
    if not weights:
        raise WeightsError("onnx embedder needs an ONNX file: pass --embedder-weights URI")
    session = onnx_session(weights, sha256, device, threads=threads, optimization=optimization, known=(spec,))
    return OnnxEmbedder(session, functools.partial(spec.transforms, crop=crop, mean=mean, std=std, bgr=bgr,
                                                   scale=scale, device=device))


class ColorHistogramEmbedder(Embedder):
    """A joint RGB histogram (``bins`` per channel) of the crop, L2-normalised.

    No weights, nothing to download: the baseline any learnt embedder must
    beat, and a usable embedder where no GPU or weights are at hand.
    """

    name = "color_histogram"

    def __init__(self, preprocess: CropTransform, *, bins: int = 8):
        super().__init__(preprocess)
        self.bins = int(bins)
        self.dim = self.bins ** 3

    def _joint_bins(self, crops):
        """(n, h, w) index of each pixel's joint RGB bin, ``0 .. bins**3 - 1``."""
        q = (crops * self.bins).long().clamp_(0, self.bins - 1)
        return (q[:, 0] * self.bins + q[:, 1]) * self.bins + q[:, 2]

    def _embed(self, crops):
        index = self._joint_bins(crops).flatten(1)
        hist = torch.zeros((len(crops), self.dim), device=crops.device)
        hist.scatter_add_(1, index, torch.ones_like(index, dtype=hist.dtype))
        return F.normalize(hist, dim=1).cpu().numpy()


class ColorBandsEmbedder(ColorHistogramEmbedder):
    """Joint RGB histograms (``bins`` per channel) of ``bands`` horizontal strips of the
    crop, each a distribution, square-rooted and then L2-normalised together.

    Where a vehicle's colours are, not only which: a stripe, windows, a two-tone body
    or a roof sign sit at their own height, which a whole-crop histogram mixes. Strips
    are horizontal so the descriptor is the same for a vehicle seen facing left or
    right. The square root (Hellinger's kernel) keeps the body's big bins from drowning
    the marks' small ones in the L2 distance.
    """

    name = "color_bands"

    def __init__(self, preprocess: CropTransform, *, bands: int = 4, bins: int = 4):
        super().__init__(preprocess, bins=bins)
        self.bands = int(bands)
        if self.bands < 1:
            raise ValueError("bands must be >= 1, got %d" % self.bands)
        self.dim = self.bands * self.bins ** 3

    def _embed(self, crops):
        height, cells = crops.shape[2], self.bins ** 3
        strip = torch.arange(height, device=crops.device) * self.bands // height
        index = (self._joint_bins(crops) + (strip * cells)[None, :, None]).flatten(1)
        hist = torch.zeros((len(crops), self.dim), device=crops.device)
        hist.scatter_add_(1, index, torch.ones_like(index, dtype=hist.dtype))
        per_strip = hist.view(len(crops), self.bands, cells)
        per_strip /= per_strip.sum(2, keepdim=True).clamp_(min=1.0)
        return F.normalize(hist.sqrt_(), dim=1).cpu().numpy()


def color_histogram(*, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu",
                    bins: int = 8, size: int = 64, crop: str = "stretch",
                    spec: WeightsSpec = COLOR_HISTOGRAM) -> ColorHistogramEmbedder:
    """The classical colour-histogram embedder (``bins``**3 dimensions) of ``size``x``size`` crops.

    Takes ``weights``/``sha256`` like every builder, only to refuse them.
    """
    if weights or sha256:
        raise WeightsError("color_histogram takes no weights, got %s" % (weights or "a sha256"))
    return ColorHistogramEmbedder(spec.transforms(input_size=(size, size), crop=crop, device=device), bins=bins)


def color_bands(*, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu",
                bands: int = 4, bins: int = 4, size: int = 64, crop: str = "stretch",
                spec: WeightsSpec = COLOR_BANDS) -> ColorBandsEmbedder:
    """The classical strip-histogram embedder (``bands * bins**3`` dimensions, 256 by
    default) of ``size``x``size`` crops. Takes ``weights``/``sha256`` only to refuse them."""
    if weights or sha256:
        raise WeightsError("color_bands takes no weights, got %s" % (weights or "a sha256"))
    return ColorBandsEmbedder(spec.transforms(input_size=(size, size), crop=crop, device=device),
                              bands=bands, bins=bins)
