"""``background``: the classical vehicle detector that needs no weights.

Why it exists: every learnt detector needs weights that may be unavailable (offline
machines, licence questions, no GPU), and a learnt detector's numbers mean little without a
baseline. CCTV cameras are fixed, so a camera's empty road can be estimated from its own
footage (the per-pixel median of many frames: a passing vehicle covers any one pixel in
only a few of them), and whatever differs from it is foreground. That is the oldest
detector in traffic surveillance; it is cheap (a few milliseconds per 352x240 frame on one
core, numpy + scipy only), deterministic, and it is what ``cctview demo`` uses on the
synthetic world.

What it does per frame (:meth:`BackgroundDetector.detect`):

1. Photometric normalisation, the detector's preprocessing (:class:`PhotometricMatch`, the
   ``transforms`` of its spec :data:`BACKGROUND`). Cameras change exposure and white balance
   all the time, so raw differences would flag the whole frame. Each channel of the frame is
   mapped to the background by a gain and an offset fitted robustly (trimmed least squares
   on a pixel subsample: vehicles are the outliers), see :func:`_photometric_fit`.
2. Foreground: the per-pixel colour distance (Euclidean over RGB) above a threshold that
   adapts to the frame: ``max(diff_threshold, median + 6 * robust sigma)`` of the
   distance image, so heavy sensor noise or JPEG loss raises it where it must. A weaker
   level (0.7 x the threshold) is kept where it touches strong pixels (hysteresis), so a
   grey car whose body barely differs from the asphalt gets more of its extent from its
   windows and wheels. (A lower level or a smoothed distance image grew boxes by 2-5 px per
   side from JPEG ringing and chroma smear, which costs IoU on 20-px vehicles.)
3. Morphology: a 3x3 opening drops speckle, a 3x5 closing bridges gaps (a thin pole in
   front of a vehicle, a window band), holes are filled.
4. Connected components (``scipy.ndimage.label``), one box each, kept if both sides are at
   least ``min_box`` px, not larger than half the frame, and reasonably filled.
5. Score in [0, 1]: ``fill * c / (c + threshold)``, with ``fill`` the share of the box that
   is foreground and ``c`` the mean colour distance inside the component, so solid,
   high-contrast blobs score high and ragged faint ones low (monotone in both).
6. Label by size and shape at the frame's scale (see :meth:`BackgroundDetector._label`):
   large and long = ``bus``, large and elongated either way = ``truck``, small and narrow
   = ``motorcycle``, else ``car``; only ``classes`` come back.

Measured (352x240): on the synthetic world at noise 1, recall 0.97-0.99 of clearly
visible vehicles (>= 70% visible) at IoU >= 0.5 and precision 0.98-0.99; on the real frames
of NYC DOT camera 733-681-N (background from 60 of its frames), recall 0.77 (848/1098) of
CCTView's reference boxes with score >= 0.5 over all 339 frames that have reference rows
(on 40 of them each: 0.78 there, 0.71 and 0.51 on the two neighbouring cameras). About
10-15 ms a frame on one core.

Known limits (it is a baseline): vehicles that touch in the image merge into one box (the
main cause of misses on real footage, with dense traffic); a vehicle that stops for long
becomes background; shadows and headlight glare count as foreground; labels from box shape
are crude (no appearance model); frame-wide changes (a camera that pans) produce garbage until a new background
is estimated. Frames whose size differs from their background get no boxes (see
:meth:`BackgroundDetector.detect`).

Imports numpy and scipy only (no torch, no apache_beam).
"""
from collections import Counter
from typing import List, Optional, Sequence

import numpy as np
from scipy import ndimage

from models.weights import WeightsError, WeightsSpec

__all__ = ["BACKGROUND", "VEHICLE_CLASSES", "BackgroundDetector", "PhotometricMatch", "background",
           "estimate_background"]

VEHICLE_CLASSES = ("car", "bus", "truck", "motorcycle")
_REFERENCE_AREA = 352 * 240  # sizes below are tuned in pixels of a 352x240 frame


def _photometric_fit(img: np.ndarray, bg: np.ndarray, step: int = 4):
    """Per-channel gain and offset with ``img ~= gain * bg + offset``, robust to vehicles.

    A least-squares line on a regular pixel subsample, refitted twice on the pixels whose
    residual is within 2.5 robust sigmas (vehicles, glare, a walker are outliers, the road
    and its surroundings the inliers). Exposure, contrast and white balance changes of a
    camera are close to such an affine map per channel. Quantile matching (median and IQR)
    was tried first and failed: a road scene's histogram is multimodal (asphalt, grass,
    sky), so its quartiles jump between modes from one frame to the next.
    """
    x = bg[::step, ::step].reshape(-1, 3).astype(np.float64)
    y = img[::step, ::step].reshape(-1, 3).astype(np.float64)
    gains, offsets = np.ones(3), np.zeros(3)
    for c in range(3):
        xc, yc = x[:, c], y[:, c]
        keep = np.ones(xc.size, bool)
        gain, offset = 1.0, float(np.median(yc - xc))
        for _ in range(3):
            xs, ys = xc[keep], yc[keep]
            var = xs.var()
            if xs.size < 50 or var < 1.0:
                break
            gain = float(((xs - xs.mean()) * (ys - ys.mean())).mean() / var)
            gain = min(max(gain, 0.5), 2.0)
            offset = float(ys.mean() - gain * xs.mean())
            resid = yc - (gain * xc + offset)
            sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid)))) + 1e-3
            keep = np.abs(resid) <= 2.5 * max(sigma, 1.0)
        gains[c], offsets[c] = gain, offset
    return gains, offsets


class PhotometricMatch:
    """The ``background`` detector's preprocessing: ``(frame, its camera's background)`` ->
    the frame's first three channels as float32, mapped by :func:`_photometric_fit`'s
    per-channel gain and offset onto the background's exposure and white balance."""

    def __call__(self, image: np.ndarray, background: np.ndarray) -> np.ndarray:
        img = image[..., :3].astype(np.float32)
        gain, offset = _photometric_fit(img, background[..., :3].astype(np.float32))
        img -= offset.astype(np.float32)
        img /= gain.astype(np.float32)
        return img


BACKGROUND = WeightsSpec(
    name="background", url="", sha256=None, transforms=PhotometricMatch, categories=VEHICLE_CLASSES,
    meta={"input": "HxWx3 uint8 RGB frames and their camera's background (estimate_background)"},
    file_format=None)


def estimate_background(frames: Sequence[np.ndarray], max_frames: int = 60,
                        normalise: bool = True) -> np.ndarray:
    """A camera's empty scene: the per-pixel median of (a sample of) its frames.

    The median is robust to passing vehicles as long as any one pixel is covered in less
    than half the frames, which holds for moving traffic. Up to ``max_frames`` frames are
    used, evenly spaced over ``frames`` (60 is plenty and keeps it well under a second).
    With ``normalise`` each frame's channels are first scaled so that their medians match
    the sample's typical median, so a brightness drift during the sample does not blur the
    result. Frames whose size differs from the most common one are ignored (a camera that
    changed resolution is a different view). Returns HxWx3 uint8.
    """
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError("estimate_background needs at least one frame")
    shape = Counter(f.shape for f in frames).most_common(1)[0][0]
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError("frames must be HxWx3, got %s" % (shape,))
    same = [f for f in frames if f.shape == shape]
    if len(same) > max_frames:
        pick = np.linspace(0, len(same) - 1, max_frames).round().astype(int)
        same = [same[i] for i in pick]
    stack = np.stack(same).astype(np.float32)
    if normalise and len(same) > 1:
        medians = np.median(stack[:, ::4, ::4].reshape(len(same), -1, 3), axis=1)  # (n, 3)
        target = np.median(medians, axis=0)
        stack *= (target / np.maximum(medians, 1.0))[:, None, None, :]
    return np.clip(np.round(np.median(stack, axis=0)), 0, 255).astype(np.uint8)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions not connected to the frame border become foreground (one label
    pass instead of binary_fill_holes' iterated dilations)."""
    lab, n = ndimage.label(~mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    hole = np.ones(n + 1, bool)
    hole[border] = False
    hole[0] = False
    return mask | hole[lab]


class BackgroundDetector:
    """Background subtraction + connected components, behind the detectors' interface.

    ``detect(images, backgrounds)`` returns, per frame, ``boxes`` float32 (N, 4) xyxy,
    ``scores`` float32 (N,) and ``labels`` (N names), sorted by score, like every other
    detector of the project; the extra argument is the camera's background
    (:func:`estimate_background`), one per image or one for all.

    Options: ``min_score`` (drop weaker boxes), ``classes`` (labels to keep), ``min_box``
    (both sides at least this many px), ``max_detections`` (per frame, best first),
    ``diff_threshold`` (lowest colour distance, 0..441, that counts as foreground; the
    frame's own noise can raise it), ``ignore_regions`` (xyxy boxes never to look at, e.g.
    a burnt-in timestamp, whose digits change every frame). ``preprocess``: the
    photometric normalisation of a frame to its background (:class:`PhotometricMatch`).
    """

    name = "background"

    def __init__(self, preprocess=None, *, min_score: float = 0.25, classes: Optional[Sequence[str]] = VEHICLE_CLASSES,
                 min_box: float = 6.0, max_detections: int = 100, diff_threshold: float = 40.0,
                 ignore_regions: Sequence[Sequence[float]] = (), device: str = "cpu"):
        self.preprocess = PhotometricMatch() if preprocess is None else preprocess
        self.classes = tuple(VEHICLE_CLASSES if classes is None else classes)
        unknown = sorted(set(self.classes) - set(VEHICLE_CLASSES))
        if unknown:
            raise ValueError("unknown classes %s for background; known: %s"
                             % (unknown, ", ".join(VEHICLE_CLASSES)))
        self.min_score = float(min_score)
        self.min_box = float(min_box)
        self.max_detections = int(max_detections)
        self.diff_threshold = float(diff_threshold)
        if not self.diff_threshold > 0:
            raise ValueError("diff_threshold must be > 0")
        self.ignore_regions = [tuple(float(v) for v in r) for r in ignore_regions]
        self.weak_ratio = 0.7
        self.device = device  # accepted for interface parity; everything runs on the CPU

    # ------------------------------------------------------------------ public
    def detect(self, images: List[np.ndarray], backgrounds) -> List[dict]:
        """Detections for HxWx3 uint8 RGB frames against their cameras' backgrounds.

        ``backgrounds`` is one HxWx3 array for all images or a list with one per image.
        A frame whose size differs from its background gets no boxes, and its result
        carries ``skipped`` with the reason: a camera whose resolution changed has almost
        surely changed its view too, so a resized background would flag the whole frame
        as vehicles; re-estimating the background is the fix, not resizing it.
        """
        if isinstance(backgrounds, np.ndarray) and backgrounds.ndim == 3:
            backgrounds = [backgrounds] * len(images)
        if len(backgrounds) != len(images):
            raise ValueError("need one background per image (%d images, %d backgrounds)"
                             % (len(images), len(backgrounds)))
        return [self._detect_one(np.asarray(img), np.asarray(bg))
                for img, bg in zip(images, backgrounds)]

    # ------------------------------------------------------------------ internals
    def foreground(self, image: np.ndarray, background: np.ndarray):
        """The colour-distance image, the adaptive threshold and the cleaned foreground mask.

        No smoothing of the distance image and a hysteresis level of 0.7 x threshold: both
        a 3x3 box filter and a 0.5 level grew boxes by 2-5 px per side on JPEG frames
        (ringing and 4:2:0 chroma smear around high-contrast vehicles), which costs IoU on
        the 20 px vehicles of 352x240 footage, on synthetic and real frames alike.
        """
        img = self.preprocess(image, background)
        img -= background[..., :3].astype(np.float32)
        diff = np.sqrt(np.einsum("ijk,ijk->ij", img, img))
        for x0, y0, x1, y1 in self.ignore_regions:
            diff[max(int(y0), 0):max(int(np.ceil(y1)), 0), max(int(x0), 0):max(int(np.ceil(x1)), 0)] = 0
        sub = diff[::2, ::2]
        med = float(np.median(sub))
        sigma = 1.4826 * float(np.median(np.abs(sub - med)))
        thr = max(self.diff_threshold, med + 6.0 * sigma)
        strong = diff > thr
        weak = diff > self.weak_ratio * thr
        # hysteresis: weak pixels count where their component holds a strong one
        weak_lab, n = ndimage.label(weak)
        keep = np.zeros(n + 1, bool)
        keep[weak_lab[strong]] = True
        keep[0] = False
        mask = keep[weak_lab].view(np.uint8)
        # opening drops speckle, closing bridges thin gaps (a pole, a window band); rectangular
        # min/max filters are separable, several times faster than binary_opening/closing
        mask = ndimage.maximum_filter(ndimage.minimum_filter(mask, (3, 3), mode="nearest"), (3, 3), mode="nearest")
        mask = ndimage.minimum_filter(ndimage.maximum_filter(mask, (3, 5), mode="nearest"), (3, 5), mode="nearest")
        mask = mask.astype(bool)
        return diff, thr, _fill_holes(mask)

    def _detect_one(self, image: np.ndarray, background: np.ndarray) -> dict:
        empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros((0,), np.float32),
                 "labels": []}
        if image.ndim != 3 or image.shape[2] < 3:
            empty["skipped"] = "not an HxWx3 image: %s" % (image.shape,)
            return empty
        if image.shape[:2] != background.shape[:2]:
            empty["skipped"] = ("frame %dx%d differs from its background %dx%d; estimate a new "
                                "background for this view" % (image.shape[1], image.shape[0],
                                                              background.shape[1], background.shape[0]))
            return empty
        height, width = image.shape[:2]
        diff, thr, mask = self.foreground(image, background)
        labels, n = ndimage.label(mask)
        if n == 0:
            return empty
        index = np.arange(1, n + 1)
        counts = ndimage.sum_labels(mask, labels, index)
        contrast = ndimage.mean(diff, labels, index)
        scale = np.sqrt(height * width / _REFERENCE_AREA)
        boxes, scores, names = [], [], []
        for k, sl in enumerate(ndimage.find_objects(labels)):
            if sl is None:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            w, h = x1 - x0, y1 - y0
            if w < self.min_box or h < self.min_box or w > width / 2 or h > height / 2:
                continue
            fill = counts[k] / float(w * h)
            if fill < 0.35:
                continue
            score = float(fill * contrast[k] / (contrast[k] + thr))
            truncated = x0 == 0 or y0 == 0 or x1 == width or y1 == height
            label = self._label(w / scale, h / scale, truncated)
            if score < self.min_score or label not in self.classes:
                continue
            boxes.append((x0, y0, x1, y1))
            scores.append(score)
            names.append(label)
        if not boxes:
            return empty
        order = np.argsort(-np.asarray(scores), kind="stable")[: self.max_detections]
        return {"boxes": np.asarray(boxes, np.float32)[order],
                "scores": np.asarray(scores, np.float32)[order],
                "labels": [names[i] for i in order]}

    @staticmethod
    def _label(w: float, h: float, truncated: bool = False) -> str:
        """A guess from the box alone (in 352x240 pixels): the baseline has no appearance
        model, so only size and shape separate classes. A box cut by the frame edge says
        nothing about its shape, so it is never called a motorcycle for being narrow."""
        if w * h >= 800 and max(w, h) >= 36:
            if w / h >= 2.3:
                return "bus"            # long and low: a bus from the side
            if w / h >= 1.3 or h / w >= 1.3:
                return "truck"          # long, or tall (a box truck from behind)
            return "car"                # big and squarish: a near car seen head-on
        if not truncated and w <= 13 and h <= 18 and w / h < 0.9:
            return "motorcycle"
        return "car"


def background(*, weights: Optional[str] = None, sha256: Optional[str] = None,
               nms_iou: Optional[float] = None, device: str = "cpu", spec: WeightsSpec = BACKGROUND,
               **options) -> BackgroundDetector:
    """Builder for the model registry: the ``background`` detector takes no weights.

    Passing weights (or a sha256 pin) is the same mistake as for ``color_histogram`` and
    raises the same :class:`models.weights.WeightsError`. ``nms_iou`` is accepted for the
    shared detector flags and unused: connected components never overlap."""
    weights = weights or sha256
    if weights:
        raise WeightsError("background takes no weights, got %s" % weights)
    return BackgroundDetector(spec.transforms(), device=device, **options)
