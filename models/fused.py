"""Detection and embedding as one step over a batch of frames.

The frames go to the device once: the detector reads the device tensors and
the embedder cuts its crops from those same tensors with ``roi_align``. As two
Beam stages, each frame is pickled between them and uploaded a second time;
CCTView's way also cut and resized every box on the CPU with PIL.
"""
from models.detectors import Detector
from models.embedders import Embedder
from models.imaging import to_device

__all__ = ["DetectAndEmbed", "with_embeddings"]


def with_embeddings(detections: dict, embeddings) -> list:
    """One frame's ``{boxes, scores, labels}`` and (N, dim) embeddings -> one dict per detection."""
    return [{"box_xyxy": [float(v) for v in box], "score": float(score), "label": label, "embedding": vector}
            for box, score, label, vector in zip(detections["boxes"], detections["scores"],
                                                 detections["labels"], embeddings)]


class DetectAndEmbed:
    """``(images) -> per image, a list of dicts: box_xyxy, score, label, embedding``.

    Images are HxWx3 uint8 RGB arrays and may differ in size. The embedder may
    sit on another device than the detector (frames are then moved once more,
    device to device).
    """

    def __init__(self, detector: Detector, embedder: Embedder):
        self.detector = detector
        self.embedder = embedder

    def __call__(self, images, backgrounds=None) -> list:
        """``backgrounds`` (one per image, from :class:`models.handlers.WithBackgrounds`) is
        for a detector that compares each frame with its camera's background (the
        ``background`` detector, which reads the arrays); learnt detectors take none and
        read the device frames that the embedder then crops."""
        if backgrounds is not None:
            detections = self.detector.detect(list(images), list(backgrounds))
            frames = to_device(images, self.embedder.device)
        else:
            frames = to_device(images, self.detector.device)
            detections = self.detector.detect_tensors(frames)
        embeddings = self.embedder.embed_tensors(frames, [d["boxes"] for d in detections])
        return [with_embeddings(d, e) for d, e in zip(detections, embeddings)]
