"""Flags -> configured pipeline stages (model handlers, matcher), checked on the driver.

The models are built once here, before the job starts, so that a missing or
mismatching weight file, an ONNX file of the wrong shape or an unknown model name
stops the command in seconds with one line, not on every worker an hour later.
"""
import os
from typing import List, Optional

from runners.errors import UsageError
from pipelines.options import CandidateOptions, MatchOptions, ModelOptions

__all__ = ["MATCH_SETTINGS_FILE", "check_models", "detect_stage", "detector_options",
           "embedder_options", "match_settings", "match_stage", "matcher_factory",
           "model_threads", "policy_of", "read_links"]


def _classes(text: str) -> tuple:
    classes = tuple(c.strip() for c in text.split(",") if c.strip())
    if not classes:
        raise UsageError("--classes names no class")
    return classes


def model_threads(opts: ModelOptions) -> int:
    """CPU threads for one model call (0: the runtime's default, every core).

    A runner that processes one bundle per core gives each model call one core;
    a model that also starts a thread per core in every bundle oversubscribes
    the CPU (measured in BENCHMARKS.md, Extraction). On a GPU the model's own
    threads only feed the device: left at the default.
    """
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    if opts.model_threads or opts.device != "cpu":
        return opts.model_threads
    runner = str(opts.view_as(StandardOptions).runner or "DirectRunner")
    if "Dataflow" in runner:
        return 1  # one SDK process per vCPU on Dataflow's CPU workers
    if "Dask" in runner:
        return 1  # one task per Dask worker thread (runners/README.md: a thread per core)
    workers = opts.view_as(DirectOptions).direct_num_workers
    if workers == 0:
        return 1  # the DirectRunner's "one worker per core"
    if workers > 1:
        return max(1, (os.cpu_count() or 1) // workers)
    return 0


def _threads(entry, threads: int) -> dict:
    return {"threads": threads} if threads and entry.takes_threads else {}


def detector_options(opts: ModelOptions, threads: int = 0) -> dict:
    from models import registry

    options = {
        **_threads(registry.detector(opts.detector), threads),
        "sha256": opts.detector_sha256,
        "min_score": opts.min_score,
        "nms_iou": opts.nms_iou,
        "classes": _classes(opts.classes),
        "max_detections": opts.max_detections,
    }
    if opts.min_box is not None:  # else the detector's own default
        options["min_box"] = opts.min_box
    return options


def embedder_options(opts: ModelOptions, threads: int = 0) -> dict:
    from models import registry

    return {"sha256": opts.embedder_sha256, **_threads(registry.embedder(opts.embedder), threads)}


def _remote_weights(opts: ModelOptions) -> List[str]:
    """The weight URIs that only the network can read (gs://, s3://, https://...)."""
    from models.weights import is_local

    return [uri for uri in (opts.detector_weights, opts.embedder_weights)
            if uri and not is_local(uri)]


def check_models(opts: ModelOptions) -> None:
    """Builds both models once on the driver; any problem becomes a UsageError.

    Under ``--dry_run`` with weights in object storage the check is skipped, with one
    line saying so: a dry run builds the job offline, and reading ``gs://`` weights
    without credentials or a network retried for two minutes before failing."""
    from models.registry import build_detector, build_embedder
    from models.weights import WeightsError

    remote = _remote_weights(opts)
    if remote and opts.get_all_options().get("dry_run"):
        print("dry run: model weights not checked (reading %s needs the network)"
              % ", ".join(remote))
        return
    try:
        detector = build_detector(opts.detector, opts.detector_weights, "cpu",
                                  **detector_options(opts))
        embedder = build_embedder(opts.embedder, opts.embedder_weights, "cpu",
                                  **embedder_options(opts))
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    del detector, embedder


def detect_stage(opts: ModelOptions):
    """DetectFrames with the handlers the flags ask for (fused unless --separate-stages or a
    model that runs alone: :func:`models.steps.detection_handlers` decides).

    Imported here, not at module level: Beam's RunInference package takes ~3 s to
    import, which `match` and `calibrate` (no models) should not pay."""
    from transforms.inference import DetectFrames

    from models.steps import detection_handlers

    check_models(opts)
    threads = model_threads(opts)
    handlers = detection_handlers(
        opts.detector, opts.embedder, separate=opts.separate_stages,
        detector_weights=opts.detector_weights, embedder_weights=opts.embedder_weights,
        detector_options=detector_options(opts, threads), embedder_options=embedder_options(opts, threads),
        device=opts.device, max_batch_size=opts.batch_size, min_batch_size=1, threads=threads)
    return DetectFrames(handlers.detect, opts.detector, opts.embedder, embed_handler=handlers.embed,
                        max_detections=opts.max_detections, write_crops=opts.write_crops)


def read_links(uri: Optional[str]) -> Optional[List[dict]]:
    """links.json -> validated links; None when no file is given."""
    from transforms.links import load_links

    return _read_flag_file(load_links, uri, "--links")


def read_camera_pairs(uri: Optional[str]) -> Optional[List[tuple]]:
    """calibrate's --pairs file -> sorted (camera_a, camera_b); None when none is given."""
    from transforms.links import load_camera_pairs

    return _read_flag_file(load_camera_pairs, uri, "--pairs")


def _read_flag_file(load, uri: Optional[str], flag: str):
    """``load(uri)``, any failure of it one line naming ``flag``; None without a uri."""
    if not uri:
        return None
    try:
        return load(uri)
    except ValueError as exc:
        raise UsageError("bad %s %s: %s" % (flag, uri, str(exc).splitlines()[0]))
    except Exception as exc:  # missing file, unreadable bucket: the same one-line answer
        raise UsageError("cannot read %s %s (%s)" % (flag, uri, type(exc).__name__))


def policy_of(options) -> str:
    """The --policy, or its default: learned with --links, mutual without."""
    from transforms.learned_matching import POLICY as LEARNED
    from transforms.matching import DEFAULT_POLICY

    policy = options.view_as(MatchOptions)
    if policy.policy:
        return policy.policy
    return LEARNED if policy.links else DEFAULT_POLICY


MATCH_SETTINGS_FILE = "match_settings.json"


def match_settings(options) -> dict:
    """The matching configuration a run used, with its links (not only their path):
    written as ``OUTPUT/match_settings.json`` by ``match`` and ``run`` so that
    ``cctview report`` can estimate the same configuration's precision (target-decoy)
    without being told the flags again."""
    candidates, policy = options.view_as(CandidateOptions), options.view_as(MatchOptions)
    return {"policy": policy_of(options), "metric": candidates.metric,
            "max_gap_s": candidates.max_gap, "window_s": candidates.window,
            "threshold": policy.threshold, "top_k": policy.top_k,
            "min_precision": policy.min_precision, "tracklets": policy.tracklets,
            "embedding_norm": policy.embedding_norm, "selection": policy.selection,
            "links_file": policy.links,
            "links": read_links(policy.links)}


def matcher_factory(options):
    """-> (links[, owned_ms] -> matching PTransform), configured from the flags.

    A factory, because the evaluation runs the same configuration with the links
    extended to its time-shifted control cameras. The learned policy's factory is
    marked ``scored`` and takes ``min_precision=`` (the evaluation runs it at 0 to see
    every threshold at once).
    """
    from transforms.matching import MatchDetections

    candidates, policy = options.view_as(CandidateOptions), options.view_as(MatchOptions)
    name = policy_of(options)
    if name == "learned":
        if not policy.links:
            raise UsageError("--policy learned needs --links (run 'cctview calibrate' first)")
        from transforms.learned_matching import LearnedLinkMatch

        tracklets = getattr(policy, "tracklets", "on") != "off"
        norm = getattr(policy, "embedding_norm", "none")
        norm = "" if norm == "none" else norm

        def learned(links, min_precision=policy.min_precision):
            return LearnedLinkMatch(links, min_precision=min_precision, tracklets=tracklets,
                                    normalize=norm, selection=policy.selection)

        learned.scored = True  # its matches carry score and q_value
        return learned

    def make(links, owned_ms=None):
        return MatchDetections(
            policy=name, metric=candidates.metric, max_gap_s=candidates.max_gap,
            window_s=candidates.window, threshold=policy.threshold, top_k=policy.top_k,
            links=links, owned_ms=owned_ms)

    return make


def match_stage(options, owned_ms=None):
    """The matching PTransform the flags ask for, with the --links file read;
    ``owned_ms``: the time chunk whose matches it emits (MatchDetections only: the
    learned matcher trains on a whole period)."""
    make = matcher_factory(options)
    links = read_links(options.view_as(MatchOptions).links)
    return make(links) if owned_ms is None else make(links, owned_ms)
