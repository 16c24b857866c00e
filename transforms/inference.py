"""DetectFrames: frames -> detections with embeddings, through Beam's RunInference.

The models come in as ModelHandlers (built from flags in ``pipelines``); this module
only keys frames, calls ``RunInference`` (which batches through the handlers'
``batch_elements_kwargs``), turns predictions into detection records with
deterministic ids, and sends frames whose inference failed to the dead-letter output
(the handlers retry a failed batch frame by frame, so a bad frame costs only itself).
Counters: frames_inferred, frames_with_detections, frames_without_detections,
detections, frames_detection_limit_hit, frames_inference_failed,
inference_batches_retried_one_by_one.
"""
import io
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.transforms.window import TimestampedValue

from models.handlers import FailedInference, WithBackgrounds
from transforms import progress
from transforms.backgrounds import EstimateBackgrounds
from transforms.records import dead_letter, detection_id

__all__ = ["CROPS", "DEAD_LETTER", "DetectFrames", "detect_read_frames"]

DEAD_LETTER = "dead_letter"
CROPS = "crops"
NAMESPACE = "cctview"


def _frame_key(frame: dict):
    return frame["uri"], frame["camera_id"], frame["frame_ts_ms"]


def _jpeg_crop(image, box) -> bytes:
    from PIL import Image

    x1, y1, x2, y2 = [int(round(v)) for v in box]
    crop = image[max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)]
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class _ToDetectionsFn(beam.DoFn):
    """(frame key, PredictionResult) -> detection records of that frame (and crops).

    A frame that reaches ``max_detections`` is counted in ``frames_detection_limit_hit``:
    the detector kept its best boxes and dropped the rest, which a user must see.
    """

    def __init__(self, detector: str, embedder: str, max_detections: int, write_crops: bool):
        self._detector = detector
        self._embedder = embedder
        self._max_detections = max_detections
        self._write_crops = write_crops
        self.inferred = progress.counter(NAMESPACE, "frames_inferred")
        self.with_dets = Metrics.counter(NAMESPACE, "frames_with_detections")
        self.without_dets = Metrics.counter(NAMESPACE, "frames_without_detections")
        self.detections = Metrics.counter(NAMESPACE, "detections")
        self.limit_hit = Metrics.counter(NAMESPACE, "frames_detection_limit_hit")

    def process(self, element):
        (uri, camera_id, ts_ms), result = element
        found = result.inference
        self.inferred.inc()
        (self.with_dets if found else self.without_dets).inc()
        self.detections.inc(len(found))
        if len(found) >= self._max_detections:
            self.limit_hit.inc()
        for det in found:
            box = [float(v) for v in det["box_xyxy"]]
            record = {
                "camera_id": camera_id,
                "frame_ts_ms": ts_ms,
                "frame_uri": uri,
                "detection_id": detection_id(uri, box, det["label"]),
                "label": det["label"],
                "score": float(det["score"]),
                "box_xyxy": box,
                "embedding": det["embedding"],
                "detector": self._detector,
                "embedder": self._embedder,
            }
            yield TimestampedValue(record, ts_ms / 1000.0)
            if self._write_crops:
                yield beam.pvalue.TaggedOutput(CROPS, (
                    record, _jpeg_crop(result.example, box)))


class _FailedBatchFn(beam.DoFn):
    """A batch that RunInference itself could not run (the handler retries the model's
    own failures frame by frame) -> one dead letter per frame in it."""

    def __init__(self):
        self.failed = progress.counter(NAMESPACE, "frames_inference_failed")

    def process(self, element):
        batch, error = element
        for key, _ in batch:
            self.failed.inc()
            yield dead_letter(key[0], "inference", "inference_failed",
                              "%s: %s" % (type(error).__name__, error))


class _SplitFailedFn(beam.DoFn):
    """(key, PredictionResult) -> itself, or a dead letter when its frame failed on its
    own (:class:`models.handlers.FailedInference`)."""

    def __init__(self):
        self.failed = progress.counter(NAMESPACE, "frames_inference_failed")

    def process(self, element):
        key, result = element
        if isinstance(result.inference, FailedInference):
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                key[0], "inference", "inference_failed", result.inference.error))
        else:
            yield element


def _infer(keyed, handler, name: str):
    """RunInference over (key, example) -> (predictions, dead letters of its frames)."""
    predictions, failed = keyed | name >> RunInference(
        KeyedModelHandler(handler)).with_exception_handling()
    split = predictions | name + "SplitFailed" >> beam.ParDo(_SplitFailedFn()).with_outputs(
        DEAD_LETTER, main="ok")
    dead = failed.failed_inferences | name + "FailedBatch" >> beam.ParDo(_FailedBatchFn())
    return split.ok, (split[DEAD_LETTER], dead) | name + "DeadLetters" >> beam.Flatten()


class DetectFrames(beam.PTransform):
    """Runs detection and embedding on frame dicts.

    ``handler`` is a fused detect-and-embed ModelHandler whose inference for one image
    is a list of ``{box_xyxy, score, label, embedding}``. With ``embed_handler`` the
    two stages run as two RunInference steps: ``handler`` then detects (its result
    for an image is ``{boxes, scores, labels}``) and ``embed_handler`` embeds the
    ``(image, boxes)`` pairs. With ``handler`` a
    :class:`models.handlers.WithBackgrounds` (a detector that compares each frame with
    its camera's background) each frame goes to it with its camera's background,
    estimated from the camera's own frames (:class:`EstimateBackgrounds`, a side input);
    pass ``{"frames": read.frames, "index": read.index}`` of :class:`ReadFrames` so that
    the sample comes from the listing and decoded frames are not held in memory. With
    ``write_crops`` each detection also comes out as ``(record, JPEG bytes)`` on the
    ``crops`` output (crops are personal data: only when the user asks). Returns
    ``{"detections": ..., "crops": ..., "dead_letter": ...}``.
    """

    def __init__(self, handler, detector_name: str, embedder_name: str,
                 embed_handler: Optional[object] = None, max_detections: int = 100, write_crops: bool = False):
        super().__init__()
        self._handler = handler
        self._embed_handler = embed_handler
        self._names = (detector_name, embedder_name)
        self._max_detections = max_detections
        self._write_crops = write_crops

    def expand(self, frames):
        index = None
        if isinstance(frames, dict):  # {"frames": ..., "index": ...} from ReadFrames
            frames, index = frames["frames"], frames.get("index")
        keyed = frames | "KeyByFrame" >> beam.Map(lambda f: (_frame_key(f), f["image"]))
        to_detect = keyed
        if isinstance(self._handler, WithBackgrounds):
            # From the frame index when there is one: the backgrounds then depend on the
            # listing only, and decoded frames stream through detection instead of all
            # being held until every camera's background is known.
            source = frames if index is None else index
            backgrounds = beam.pvalue.AsDict(
                source | "Backgrounds" >> EstimateBackgrounds(from_index=index is not None))
            to_detect = keyed | "WithBackground" >> beam.Map(_with_background, backgrounds)
        predictions, dead = _infer(to_detect, self._handler, "Detect")
        dead = [dead]
        if self._embed_handler is not None:
            # The detector's PredictionResult carries its input image: no join with the
            # frames (a join would hold every decoded frame until all were detected).
            to_embed = predictions | "ImageAndBoxes" >> beam.Map(_image_and_boxes)
            predictions, dead_embed = _infer(to_embed, self._embed_handler, "Embed")
            predictions = predictions | "FrameExamples" >> beam.Map(_frame_example)
            dead.append(dead_embed)
        converted = predictions | "ToDetections" >> beam.ParDo(
            _ToDetectionsFn(*self._names, self._max_detections, self._write_crops)
        ).with_outputs(CROPS, main="detections")
        return {
            "detections": converted.detections,
            CROPS: converted[CROPS],
            DEAD_LETTER: tuple(dead) | "FlattenDead" >> beam.Flatten(),
        }


def detect_read_frames(read, detect: "DetectFrames", label: str = "DetectFrames"):
    """Applies ``detect`` to what :class:`transforms.frames.ReadFrames` returned: its
    frames, with its frame index for the backgrounds. Through ``Pipeline.apply``, because
    ``dict | transform`` ties a transform object to the first pipeline it was applied to,
    and backfill applies the same DetectFrames to one pipeline per partition."""
    inputs = {"frames": read.frames, "index": read.index}
    return read.frames.pipeline.apply(detect, inputs, label)


def _with_background(element, backgrounds):
    """(key, image) -> (key, (image, its camera's background)); a camera none of whose
    sampled files decoded has none, and its frame is its own one-frame background."""
    key, image = element
    background = backgrounds.get(key[1])
    return key, (image, image if background is None else background)


def _image_and_boxes(element):
    """(key, detector PredictionResult) -> (key, (image, its detections)) for the embedder."""
    key, result = element
    return key, (result.example, result.inference)


def _frame_example(element):
    """(key, embedder PredictionResult of (image, detections)) -> the same with the image as
    its example, as the fused step gives it."""
    key, result = element
    return key, result._replace(example=result.example[0])
