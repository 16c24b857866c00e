"""TensorFlow SavedModels as a :class:`Detector` and as an :class:`Embedder` (extra ``[tf]``).

A detector SavedModel has the TF2 Object Detection API serving signature
(``serving_default``: input ``input_tensor`` uint8 [N, H, W, 3]; outputs
``detection_boxes`` normalised ymin, xmin, ymax, xmax, ``detection_scores``,
``detection_classes`` as COCO-91 ids, ``num_detections``), so models exported with
that API load as they are. Its class ids are the numbering torchvision's COCO
detectors use, so the labels come out the same. An embedder SavedModel has one image
input [N, H, W, 3] with a fixed H, W (uint8 pixels, or float32 normalised as
``(pixel / 255 - mean) / std``) and one output [N, D].

Frames of one size go to the model as one batch (one call per frame size in a batch).
The folder is read from any Beam filesystem URI (:func:`models.weights.local_folder`)
and pinned by :func:`models.weights.folder_sha256`. tensorflow is imported only when a
model is built, after torchvision (see :mod:`models`).
"""
import functools
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import torch

from models.detectors import COCO_91, Detector
from models.embedders import IMAGENET_MEAN, IMAGENET_STD, Embedder
from models.imaging import CropTransform, to_uint8
from models.weights import WeightsError, WeightsSpec, _first_line, local_folder

__all__ = ["DETECTION_INPUT", "DETECTION_OUTPUTS", "SAVEDMODEL_DETECTOR", "SAVEDMODEL_EMBEDDER", "Pixels",
           "TFSavedModelDetector", "TFSavedModelEmbedder", "detector", "embedder", "load_signature", "tensorflow"]

DETECTION_INPUT = "input_tensor"
DETECTION_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


class Pixels:
    """A detector SavedModel's preprocessing: device frames -> the HxWx3 uint8 RGB arrays it takes
    (exact: :func:`models.imaging.to_uint8`); resizing and normalising happen inside the model."""

    def __call__(self, frames) -> list:
        return [to_uint8(frame) for frame in frames]


# No published files: any SavedModel with these signatures (the module docstring), given as weights.
SAVEDMODEL_DETECTOR = WeightsSpec(
    name="tf_savedmodel", url="", sha256=None, transforms=Pixels, categories=COCO_91,
    meta={"signature": "input_tensor uint8 [N,H,W,3] -> the Object Detection API outputs"},
    file_format="savedmodel")
SAVEDMODEL_EMBEDDER = WeightsSpec(
    name="tf_savedmodel", url="", sha256=None,
    # The crop size is the signature's; a uint8 input gets pixels, a float32 one these mean/std.
    transforms=functools.partial(CropTransform, crop="stretch", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    meta={"signature": "crops [N,H,W,3] uint8 or float32 -> vectors [N,D]"}, file_format="savedmodel")


def tensorflow():
    """The tensorflow module, or a one-line WeightsError saying which extra installs it."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise WeightsError("tf_savedmodel needs TensorFlow: pip install 'cctview-beam[tf]' (%s)" % e) from None
    return tf


def load_signature(uri: str, sha256: Optional[str] = None):
    """(loaded SavedModel, its ``serving_default`` signature) from the folder at ``uri``.

    The loaded object is returned too: a signature only works while it is alive.
    """
    if not uri:
        raise WeightsError("tf_savedmodel needs a SavedModel folder: pass its URI as weights")
    tf = tensorflow()
    with local_folder(uri, sha256) as path:
        try:
            loaded = tf.saved_model.load(path)
        except Exception as e:  # TensorFlow raises several types for a folder that is no SavedModel
            raise WeightsError("not a loadable TensorFlow SavedModel: %s (%s)" % (uri, _first_line(e))) from None
    signature = getattr(loaded, "signatures", {}).get("serving_default")
    if signature is None:
        raise WeightsError("SavedModel %s has no serving_default signature" % uri)
    return loaded, signature


def _input_specs(signature) -> dict:
    return dict(signature.structured_input_signature[1])


def _tf_device(device: str) -> str:
    return "/GPU:0" if device.startswith("cuda") else "/CPU:0"


def _by_shape(arrays) -> dict:
    groups = defaultdict(list)
    for i, array in enumerate(arrays):
        groups[array.shape].append(i)
    return groups


class TFSavedModelDetector(Detector):
    """A SavedModel with the Object Detection API signature. Its own post-processing
    (NMS, its threshold and most detections) runs inside the SavedModel, so ``nms_iou``
    does not reach it; ``min_score``, ``classes``, ``min_box`` and ``max_detections``
    filter what it returns, as for every detector."""

    name = "tf_savedmodel"

    def __init__(self, loaded, signature, uri: str, preprocess: Pixels, **options):
        specs, outputs = _input_specs(signature), signature.structured_outputs
        spec = specs.get(DETECTION_INPUT)
        missing = [k for k in DETECTION_OUTPUTS if k not in outputs]
        if (spec is None or len(specs) != 1 or spec.dtype.name != "uint8" or spec.shape.rank != 4
                or spec.shape[-1] != 3 or missing):
            raise WeightsError("not an Object Detection API SavedModel: %s needs input %s uint8 [N,H,W,3] and "
                               "outputs %s; got inputs %s and outputs %s"
                               % (uri, DETECTION_INPUT, ", ".join(DETECTION_OUTPUTS),
                                  {k: (v.dtype.name, v.shape.as_list()) for k, v in specs.items()}, sorted(outputs)))
        super().__init__(COCO_91, preprocess, **options)
        self._loaded, self._signature = loaded, signature
        self._tf_device = _tf_device(str(self.device))

    def _predict(self, frames) -> list:
        """One signature call per frame size; boxes to pixels xyxy, class ids to labels."""
        images = self.preprocess(frames)
        tf = tensorflow()
        results = [None] * len(images)
        for (height, width, _), index in _by_shape(images).items():
            with tf.device(self._tf_device):
                out = self._signature(**{DETECTION_INPUT: tf.constant(np.stack([images[i] for i in index]))})
            boxes, scores, classes, counts = (out[k].numpy() for k in DETECTION_OUTPUTS)
            scale = np.array([height, width, height, width], np.float32)
            for row, i in enumerate(index):
                n = int(counts[row])
                yxyx = boxes[row, :n].astype(np.float32) * scale
                ids = np.rint(classes[row, :n]).astype(np.int64)
                valid = (ids >= 0) & (ids < len(COCO_91))
                results[i] = (torch.from_numpy(yxyx[valid][:, [1, 0, 3, 2]]).to(self.device),
                              torch.from_numpy(scores[row, :n][valid].astype(np.float32)).to(self.device),
                              torch.from_numpy(ids[valid]).to(self.device))
        return results


class TFSavedModelEmbedder(Embedder):
    """A SavedModel from image crops [N, H, W, 3] to vectors [N, D]; the crop size is
    read from its signature."""

    name = "tf_savedmodel"

    def __init__(self, loaded, signature, uri: str, transforms):
        specs, outputs = _input_specs(signature), signature.structured_outputs
        input_name, spec = next(iter(specs.items())) if len(specs) == 1 else (None, None)
        shape = spec.shape.as_list() if spec is not None and spec.shape.rank is not None else []
        if not (len(shape) == 4 and shape[3] == 3 and all(isinstance(d, int) for d in shape[1:3])
                and spec.dtype.name in ("uint8", "float32") and len(outputs) == 1):
            raise WeightsError("not a SavedModel embedder: %s needs one input [N,H,W,3] uint8 or float32 with "
                               "fixed H, W and one output [N,D]; got inputs %s and outputs %s"
                               % (uri, {k: (v.dtype.name, v.shape.as_list()) for k, v in specs.items()},
                                  sorted(outputs)))
        super().__init__(transforms(input_size=shape[1:3], pixels=spec.dtype.name == "uint8"))
        self._loaded, self._signature = loaded, signature
        self._input, self._output = input_name, next(iter(outputs))
        self._tf_device = _tf_device(str(self.device))
        blank = torch.zeros((1, 3) + self.input_size, device=self.device)
        self.dim = self._embed(self.preprocess.normalise(blank)).shape[1]

    def _embed(self, inputs: torch.Tensor) -> np.ndarray:
        tf = tensorflow()
        with tf.device(self._tf_device):
            out = self._signature(**{self._input: tf.constant(inputs.permute(0, 2, 3, 1).contiguous().cpu().numpy())})
        vectors = out[self._output].numpy()
        if vectors.ndim != 2 or len(vectors) != len(inputs):
            raise ValueError("SavedModel embedder returned shape %s for %d crops" % (vectors.shape, len(inputs)))
        return vectors.astype(np.float32, copy=False)


def detector(*, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu",
             spec: WeightsSpec = SAVEDMODEL_DETECTOR, **options) -> TFSavedModelDetector:
    """A TF2 Object Detection API SavedModel folder at ``weights`` (local or any Beam URI)."""
    loaded, signature = load_signature(weights, sha256)
    return TFSavedModelDetector(loaded, signature, weights, spec.transforms(), device=device, **options)


def embedder(*, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu",
             crop: str = "stretch", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
             spec: WeightsSpec = SAVEDMODEL_EMBEDDER) -> TFSavedModelEmbedder:
    """A SavedModel embedder folder at ``weights``; a float32 input gets ``(pixel - mean) / std``
    of 0..1 RGB pixels, a uint8 input the raw 0..255 pixels (``spec.transforms``)."""
    loaded, signature = load_signature(weights, sha256)
    transforms = functools.partial(spec.transforms, crop=crop, mean=mean, std=std, device=device)
    return TFSavedModelEmbedder(loaded, signature, weights, transforms)
