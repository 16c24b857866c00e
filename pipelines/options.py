"""The commands' flags as Beam PipelineOptions subclasses.

Each group of flags is one subclass, so a flag is declared once, shows up in
``--help`` of every command that uses it, and is read with ``options.view_as(...)``
like any Beam option (also on Dataflow workers). Flags are spelled as in docs/spec.md
(``--max-gap``); their attribute names use underscores (``max_gap``).
"""
from apache_beam.options.pipeline_options import PipelineOptions

from transforms import calibration, learned_matching, matching
from transforms.match_blocks import METRICS, POLICIES

__all__ = ["CalibrateOptions", "CandidateOptions", "DEFAULT_CHUNK_MB",
           "DetectionInputOptions", "EMBEDDING_NORMS", "EvaluateOptions",
           "FrameInputOptions", "MatchOptions", "ModelOptions", "OutputOptions",
           "POLICY_CHOICES", "ProgressOptions", "TimeZoneOptions", "VEHICLES"]

VEHICLES = "car,bus,truck,motorcycle"
# Measured in BENCHMARKS.md ("Scale"): the peak memory of a chunk is about twice this.
DEFAULT_CHUNK_MB = 768
# --policy: the fixed rules of transforms.matching and the learned one.
POLICY_CHOICES = POLICIES + (learned_matching.POLICY,)
# --embedding-norm: the learned matcher's normalisations, "" spelt "none".
EMBEDDING_NORMS = tuple(n or "none" for n in learned_matching.NORMALIZATIONS)


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _count(text):
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or a positive integer")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise ValueError("must be positive")
    return value


def _unit_float(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


_positive_int.__name__ = "positive integer"
_count.__name__ = "integer >= 0"
_positive_float.__name__ = "positive number"
_unit_float.__name__ = "number in [0, 1]"


class FrameInputOptions(PipelineOptions):
    """Where frames are and which ones to take."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input", dest="input", nargs="+", metavar="PATTERN",
            help="Frame files or folders: local paths or any Beam filesystem URI "
                 "(gs://bucket/frames, s3://bucket/frames/**). Folders are listed "
                 "recursively.")
        parser.add_argument(
            "--start", dest="start", metavar="ISO",
            help="First capture time to take (ISO-8601; naive = --timezone). With "
                 "--end and the cctview layout only the hour folders in range are listed.")
        parser.add_argument(
            "--end", dest="end", metavar="ISO",
            help="Capture time to stop before (exclusive; ISO-8601, naive = --timezone).")
        parser.add_argument(
            "--layout", dest="layout", default="cctview", metavar="cctview|REGEX",
            help="How camera id and capture time are read from the path: 'cctview' "
                 "(<camera>/YYYY/MM/DD/HH/MM/SS/<camera>--YYYY-MM-DD--HH.MM.SS--original.jpeg) "
                 "or a regex with named groups camera and date+time (or ts).")
        parser.add_argument(
            "--max-pixels", dest="max_pixels", type=_positive_int, default=4096 * 4096,
            help="Frames with more pixels are dead-lettered as too_large (default 16.7M).")


class TimeZoneOptions(PipelineOptions):
    """How camera-local times are read."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--timezone", dest="timezone", default="UTC", metavar="TZ",
            help="IANA time zone of camera-local times: capture times in paths and "
                 "naive frame_ts columns (default UTC; NYC DOT cameras: America/New_York).")


class ModelOptions(PipelineOptions):
    """Which detector and embedder run, where, and what they keep."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--detector", dest="detector", default="retinanet_resnet50_fpn",
            help="Detector: retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2, "
                 "fasterrcnn_resnet50_fpn_v2, ssdlite320_mobilenet_v3_large, yolox (ONNX "
                 "file), background (classical, no weights), tf_savedmodel (a TF2 Object "
                 "Detection API SavedModel folder; extra [tf]), imageai_retinanet, "
                 "imageai_yolov3, imageai_tiny_yolov3 (ImageAI 3 weight files; extra "
                 "[imageai]). Default retinanet_resnet50_fpn, CCTView's family.")
        parser.add_argument(
            "--detector-weights", dest="detector_weights", metavar="URI",
            help="Detector weights: a local path or Beam filesystem URI (torch state "
                 "dict, the ONNX file for yolox, the SavedModel folder for tf_savedmodel, "
                 "ImageAI's .pt/.pth file for imageai_*). Without it torchvision's "
                 "published weights are used, which needs them cached or the internet.")
        parser.add_argument(
            "--detector-sha256", dest="detector_sha256", metavar="HEX",
            help="Refuse detector weights whose sha256 differs from this (a SavedModel "
                 "folder: the sha256 of its files' sha256sum lines, sorted by path; "
                 "models/weights.py, folder_sha256).")
        parser.add_argument(
            "--embedder", dest="embedder", default="resnet50",
            help="Embedder: densenet201_veri (CCTView's VeRI_densenet_ft50.pth loads as "
                 "is), resnet50, onnx (any fixed-size ONNX embedder), color_histogram "
                 "and color_bands (classical, no weights: a colour histogram of the crop, "
                 "or one per horizontal strip), tf_savedmodel (a SavedModel folder from crops "
                 "[N,H,W,3] to vectors [N,D]; extra [tf]). Default resnet50.")
        parser.add_argument(
            "--embedder-weights", dest="embedder_weights", metavar="URI",
            help="Embedder weights: a local path or Beam filesystem URI.")
        parser.add_argument(
            "--embedder-sha256", dest="embedder_sha256", metavar="HEX",
            help="Refuse embedder weights whose sha256 differs from this (a SavedModel "
                 "folder: as for --detector-sha256).")
        parser.add_argument(
            "--device", dest="device", choices=("cpu", "cuda"), default="cpu",
            help="Where the models run (default cpu).")
        parser.add_argument(
            "--batch-size", dest="batch_size", type=_positive_int, default=16,
            help="Most frames per model call; RunInference batches up to this (default 16).")
        parser.add_argument(
            "--model-threads", dest="model_threads", type=_count, default=0,
            help="CPU threads per model call. 0 (default): decided from the runner: 1 where "
                 "it runs one bundle per core (Dataflow's CPU workers, Dask workers, "
                 "DirectRunner with --direct_num_workers=0), cores/workers with --direct_num_workers > 1, "
                 "otherwise every core.")
        parser.add_argument(
            "--min-score", dest="min_score", type=_unit_float, default=0.25,
            help="Drop detections scored below this (default 0.25).")
        parser.add_argument(
            "--classes", dest="classes", default=VEHICLES,
            help="COCO class names to keep and embed, comma-separated (default %s). "
                 "People are never embedded unless named here." % VEHICLES)
        parser.add_argument(
            "--min-box", dest="min_box", type=float, default=None,
            help="Drop boxes whose shorter side is under this many pixels (default: the "
                 "detector's own, 6 for background, whose smaller blobs are sensor noise "
                 "and lighting flicker, 0 for the networks).")
        parser.add_argument(
            "--nms-iou", dest="nms_iou", type=_unit_float, default=0.45,
            help="IoU above which overlapping boxes of one class are merged (default 0.45).")
        parser.add_argument(
            "--max-detections", dest="max_detections", type=_positive_int, default=100,
            help="Keep at most this many detections per frame, best first (default 100).")
        parser.add_argument(
            "--write-crops", dest="write_crops", action="store_true",
            help="Also write each detection's crop as JPEG under OUTPUT/crops/ (personal "
                 "data: off by default).")
        parser.add_argument(
            "--no-embeddings-out", dest="no_embeddings_out", action="store_true",
            help="Leave embeddings out of the detections table (matching in the same run "
                 "still uses them); for runs that only need matches.")
        parser.add_argument(
            "--separate-stages", dest="separate_stages", action="store_true",
            help="Run detection and embedding as two RunInference steps instead of the "
                 "fused detect-and-embed step (always so with a tf_savedmodel model, "
                 "which runs through Beam's TensorFlow model handler).")


class CandidateOptions(PipelineOptions):
    """Which detections of two cameras are candidates, and how they are compared."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--max-gap", dest="max_gap", type=_positive_float,
            default=matching.DEFAULT_MAX_GAP_S,
            help="Largest |dt| in seconds between two detections that may match "
                 "(default %g). Ignored for camera pairs given in --links."
                 % matching.DEFAULT_MAX_GAP_S)
        parser.add_argument(
            "--window", dest="window", type=_positive_float,
            default=matching.DEFAULT_WINDOW_S,
            help="Event-time window in seconds that blocks the work (default %g). "
                 "Results of all/topk/mutual do not depend on it."
                 % matching.DEFAULT_WINDOW_S)
        parser.add_argument(
            "--metric", dest="metric", choices=METRICS, default=matching.DEFAULT_METRIC,
            help="Embedding distance (default %s, CCTView's)." % matching.DEFAULT_METRIC)


class MatchOptions(PipelineOptions):
    """How candidates become match pairs."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--policy", dest="policy",
            choices=POLICY_CHOICES, default=None,
            help="all: every candidate under --threshold; topk: --top-k nearest per "
                 "detection and camera; mutual: mutual nearest neighbours; assignment: "
                 "one-to-one per camera pair and window; learned: a match score learned "
                 "per linked camera pair from the data and its time-shifted control, "
                 "one-to-one, thresholded for --min-precision (needs --links). Default: "
                 "learned with --links, mutual without.")
        parser.add_argument(
            "--min-precision", dest="min_precision", type=_unit_float,
            default=learned_matching.DEFAULT_MIN_PRECISION,
            help="For --policy learned: the precision, estimated with time-shifted "
                 "controls, that the chosen score threshold must reach; a camera pair "
                 "where no threshold does gets no matches (default %g)."
                 % learned_matching.DEFAULT_MIN_PRECISION)
        parser.add_argument(
            "--tracklets", dest="tracklets", choices=("on", "off"),
            default="on" if learned_matching.DEFAULT_TRACKLETS else "off",
            help="For --policy learned: link each camera's detections into short "
                 "tracklets (consecutive frames, by box motion, size and appearance) and "
                 "judge a pair of tracklets as a whole by its best-scoring detection pair; "
                 "adds tracklet_id_a/tracklet_id_b to the matches (default on).")
        parser.add_argument(
            "--embedding-norm", dest="embedding_norm", choices=EMBEDDING_NORMS,
            default="none",
            help="For --policy learned: per camera, 'center' subtracts the camera's mean "
                 "embedding (its colour cast and background) before distances; "
                 "'power+center' first takes signed square roots (for histogram-like "
                 "embeddings such as color_histogram); none keeps them (default none).")
        parser.add_argument(
            "--selection", dest="selection", choices=learned_matching.SELECTIONS,
            default=learned_matching.DEFAULT_SELECTION,
            help="For --policy learned: which candidates the one-to-one selection by score "
                 "visits: mutual nearest neighbours by distance, one round (mutual) or "
                 "found again among the detections earlier rounds left free (mutual-2, "
                 "mutual-3), "
                 "or every candidate (greedy) (default %s)."
                 % learned_matching.DEFAULT_SELECTION)
        parser.add_argument(
            "--threshold", dest="threshold", type=float, default=None,
            help="Largest distance that may match (default: none).")
        parser.add_argument(
            "--top-k", dest="top_k", type=_positive_int, default=matching.DEFAULT_TOP_K,
            help="Neighbours per detection and other camera for --policy topk (default %d)."
                 % matching.DEFAULT_TOP_K)
        parser.add_argument(
            "--links", dest="links", metavar="FILE",
            help="links.json from 'cctview calibrate': only linked camera pairs match, "
                 "and only inside each link's dt band.")


class EvaluateOptions(PipelineOptions):
    """Which label-free control estimates the false matches (docs/spec.md)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--control", dest="control", choices=("decoy", "shift"), default="decoy",
            help="decoy (default): target-decoy competition, one run on camera a against "
                 "camera b's detections plus b's detections of the other half of the "
                 "period (decoys, never a true match): valid for matchers that adapt to "
                 "their input (the learned policy); shift: the time-shift control, the "
                 "whole configuration again with b shifted by half the span.")


class CalibrateOptions(PipelineOptions):
    """When a dt peak counts as a camera link."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--min-support", dest="min_support", type=_positive_int,
            default=calibration.DEFAULT_MIN_SUPPORT,
            help="Least excess of real over control pairs in a peak (default %d); camera "
                 "pairs with fewer mutual pairs than this are not histogrammed."
                 % calibration.DEFAULT_MIN_SUPPORT)
        parser.add_argument(
            "--min-significance", dest="min_significance", type=_positive_float,
            default=calibration.DEFAULT_MIN_SIGNIFICANCE,
            help="Least z-score of a peak over the time-shifted control (default %g)."
                 % calibration.DEFAULT_MIN_SIGNIFICANCE)
        parser.add_argument(
            "--pairs", dest="pairs", metavar="FILE",
            help="JSON list of camera pairs to search (objects with camera_a and camera_b, "
                 "a links.json among them: its offsets are ignored, each pair is searched "
                 "within +-max-gap). Default: every pair of cameras in the data, N(N-1)/2 "
                 "of them; for many cameras name the neighbours on the road.")


class OutputOptions(PipelineOptions):
    """Where results go."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--output", dest="output", metavar="DIR",
            help="Output folder (local or Beam filesystem URI); its detections/, "
                 "matches/ and dead_letter/ tables are replaced by this run.")
        parser.add_argument(
            "--shards", dest="shards", type=_positive_int, default=1,
            help="Parquet files per hour partition (default 1); raise it for many cameras.")


class ProgressOptions(PipelineOptions):
    """Whether the command says how far it is while it works (pipelines/progress.py)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--quiet", dest="quiet", action="store_true",
            help="No progress lines on stderr while the job runs (by default one about "
                 "every 10 s: items done of the listed total, rate, ETA); the counters "
                 "at the end are still printed.")


class DetectionInputOptions(PipelineOptions):
    """Stored detections to match."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--detections", dest="detections", nargs="+", metavar="PATH",
            help="Detections Parquet files or folders (this tool's detections/ or any "
                 "Parquet with camera_id, frame_ts, detection_id, embedding).")
        parser.add_argument(
            "--chunk-mb", dest="chunk_mb", type=_count, default=None, metavar="MB",
            help="match/calibrate over stored detections: run the period as consecutive "
                 "time chunks, each reading at most about this many MB of float32 "
                 "embeddings (its owned time range plus the margins that keep its matches "
                 "exact), so memory does not grow with the period on runners that hold "
                 "shuffles in memory. 0: one job for the whole period. Default: %d on "
                 "local runners and Dask, 0 on Dataflow." % DEFAULT_CHUNK_MB)
