"""The sub-commands: validate flags, assemble a pipeline, run it, report its counters."""
import json
import logging
import sys
from typing import Dict, List, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.runner import PipelineState

from pipelines import outputs
from pipelines.errors import UsageError
from pipelines.options import (
    CalibrateOptions,
    CandidateOptions,
    DetectionInputOptions,
    FrameInputOptions,
    MatchOptions,
    ModelOptions,
    OutputOptions,
    TimeZoneOptions,
)
from transforms.cctview_import import ImportCCTView
from transforms.detections_io import DetectionsSchemaError, ReadDetections, inspect_files, parquet_files
from transforms.frames import DEAD_LETTER, ReadFrames
from transforms.layout import FrameLayout, optional_range

_LOG = logging.getLogger(__name__)
SUMMARY_COUNTERS = (
    "frames_listed", "frames_decoded", "frames_dead_lettered", "frames_out_of_range",
    "frames_inferred", "frames_with_detections", "frames_without_detections",
    "frames_inference_failed", "inference_batches_retried_one_by_one",
    "frames_detection_limit_hit", "detections",
    "detections_read", "candidate_pairs", "distance_cells", "block_compute_ms", "blocks_split",
    "matches_emitted",
    "learned_matches", "learned_abstained", "cctview_rows", "cctview_files_dead_lettered",
)


def _require(value, flag: str):
    if not value:
        raise UsageError("%s is required" % flag)
    return value


def _frame_source(options: PipelineOptions):
    """ReadFrames configured from flags (validated here, on the driver)."""
    frames = options.view_as(FrameInputOptions)
    timezone = options.view_as(TimeZoneOptions).timezone
    _require(frames.input, "--input")
    try:
        layout = FrameLayout(frames.layout, timezone)
    except Exception as exc:  # re.error, ZoneInfoNotFoundError, ValueError
        raise UsageError("bad --layout/--timezone: %s" % exc)
    try:
        start_ms, end_ms = optional_range(frames.start, frames.end, timezone)
        return ReadFrames(frames.input, layout, start_ms, end_ms,
                          max_pixels=frames.max_pixels, pipeline_options=options)
    except ValueError as exc:
        raise UsageError(str(exc))


def _model_stage(options: PipelineOptions):
    """DetectFrames configured from flags; weights are checked before the job starts."""
    from pipelines.stages import detect_stage  # imports torch: only where models run

    return detect_stage(options.view_as(ModelOptions))


def _match_stage(options: PipelineOptions, cameras=None):
    from pipelines.stages import match_stage

    return match_stage(options, cameras)


def _run(pipeline: beam.Pipeline) -> Dict[str, int]:
    result = pipeline.run()
    state = result.wait_until_finish()
    if state not in (PipelineState.DONE, None) and state != "DONE":
        raise RuntimeError("pipeline ended in state %s" % state)
    try:
        counters = result.metrics().query()["counters"]
    except (NotImplementedError, AttributeError, KeyError):
        return {}
    totals: Dict[str, int] = {}
    for counter in counters:
        name = counter.key.metric.name
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[name] = totals.get(name, 0) + int(value or 0)
    return totals


def _is_dry_run(options: PipelineOptions) -> bool:
    return bool(options.get_all_options().get("dry_run"))


def _report(totals: Dict[str, int], output: str) -> None:
    shown = ["%s=%d" % (k, totals[k]) for k in SUMMARY_COUNTERS if k in totals]
    print("done: %s -> %s" % (", ".join(shown) or "no counters", output))
    sys.stdout.flush()


def _write_all(pcolls: Dict[str, object], output: str, shards: int) -> None:
    for table, pcoll in pcolls.items():
        outputs.write(pcoll, output, table, shards)


def _finish(options, pipeline, output: str, tables: List[str]) -> int:
    totals = _run(pipeline)
    if _is_dry_run(options):
        print("dry run: job built, nothing executed")
        return 0
    outputs.finish(output, tables)
    _report(totals, output)
    return 0


def _detect_and_write(pipeline, options: PipelineOptions, source, detect):
    """Frames -> detections, with detections, crops (if asked) and dead letters written.

    Returns the detections with their embeddings, for matching in the same pipeline;
    ``--no-embeddings-out`` drops them only from what is written.
    """
    out = options.view_as(OutputOptions)
    models = options.view_as(ModelOptions)
    read = pipeline | "ReadFrames" >> source
    from transforms.inference import detect_read_frames  # with the models' imports

    found = detect_read_frames(read, detect)
    dead = (read[DEAD_LETTER], found[DEAD_LETTER]) | "AllDeadLetters" >> beam.Flatten()
    written = found["detections"]
    if models.no_embeddings_out:
        written = written | "DropEmbeddings" >> beam.Map(lambda d: dict(d, embedding=None))
    _write_all({"detections": written, "dead_letter": dead}, out.output, out.shards)
    if models.write_crops:
        outputs.write_crops(found["crops"], out.output)
    return found["detections"]


def _detection_tables(options: PipelineOptions) -> List[str]:
    tables = ["detections", "dead_letter"]
    return tables + ["crops"] if options.view_as(ModelOptions).write_crops else tables


def extract(options: PipelineOptions) -> int:
    """Frames -> detections with embeddings."""
    out = options.view_as(OutputOptions)
    source = _frame_source(options)
    detect = _model_stage(options)
    tables = _detection_tables(options)
    outputs.prepare(_require(out.output, "--output"), tables)
    pipeline = beam.Pipeline(options=options)
    _detect_and_write(pipeline, options, source, detect)
    return _finish(options, pipeline, out.output, tables)


def _detection_files(options: PipelineOptions, cameras: bool = False) -> Tuple[List[str], List[str]]:
    """The --detections Parquet files, checked, and (with ``cameras``) their camera ids."""
    paths = _require(options.view_as(DetectionInputOptions).detections, "--detections")
    files = parquet_files(paths)
    if not files:
        raise UsageError("no Parquet files in --detections %s" % " ".join(paths))
    try:
        return files, inspect_files(files, cameras)
    except DetectionsSchemaError as exc:
        raise UsageError(str(exc))


def _detection_source(options: PipelineOptions, files, as_columns: bool = False) -> ReadDetections:
    return ReadDetections(files, options.view_as(TimeZoneOptions).timezone, as_columns=as_columns)


def match(options: PipelineOptions) -> int:
    """Stored detections -> cross-camera match pairs; no model runs."""
    out = options.view_as(OutputOptions)
    # Camera ids matter only without links (every camera is then a partner); with links
    # the partners come from the links, so the files' camera column is not read.
    linked = bool(options.view_as(MatchOptions).links)
    files, cameras = _detection_files(options, cameras=not linked)
    matcher = _match_stage(options, None if linked else cameras)
    # Matchers that take column chunks skip a Python object per detection; the learned
    # one reads each detection's box and score.
    source = _detection_source(options, files, getattr(matcher, "accepts_columns", False))
    tables = ["matches"]
    outputs.prepare(_require(out.output, "--output"), tables)
    pipeline = beam.Pipeline(options=options)
    matches = pipeline | "ReadDetections" >> source | "Match" >> matcher
    _write_all({"matches": matches}, out.output, out.shards)
    summary = _summary_of(matcher, out.output)
    code = _finish(options, pipeline, out.output, tables)
    if summary and not _is_dry_run(options):
        print(format_match_summary(_read_json(summary)))
    return code


def run(options: PipelineOptions) -> int:
    """Frames -> detections and matches in one pipeline."""
    out = options.view_as(OutputOptions)
    source = _frame_source(options)
    detect = _model_stage(options)
    matcher = _match_stage(options)
    tables = _detection_tables(options) + ["matches"]
    outputs.prepare(_require(out.output, "--output"), tables)
    pipeline = beam.Pipeline(options=options)
    detections = _detect_and_write(pipeline, options, source, detect)
    _write_all({"matches": detections | "Match" >> matcher}, out.output, out.shards)
    return _finish(options, pipeline, out.output, tables)


def import_cctview(options: PipelineOptions) -> int:
    """CCTView output trees -> detections Parquet."""
    out = options.view_as(OutputOptions)
    roots = _require(options.view_as(FrameInputOptions).input, "--input")
    tables = ["detections", "dead_letter"]
    outputs.prepare(_require(out.output, "--output"), tables)
    pipeline = beam.Pipeline(options=options)
    imported = pipeline | "ImportCCTView" >> ImportCCTView(
        roots, options.view_as(TimeZoneOptions).timezone)
    _write_all({"detections": imported.detections, "dead_letter": imported[DEAD_LETTER]},
               out.output, out.shards)
    return _finish(options, pipeline, out.output, tables)


def calibrate(options: PipelineOptions) -> int:
    """Stored detections -> links.json (camera links with transit-time offsets)."""
    from transforms.calibration import CalibrateLinks
    from transforms.links import write_links

    files, cameras = _detection_files(options, cameras=True)
    source = _detection_source(options, files)
    target = _require(options.view_as(OutputOptions).output, "--output")
    outputs.check_writable(target.rsplit("/", 1)[0] if "/" in target else ".")
    candidates = options.view_as(CandidateOptions)
    settings = options.view_as(CalibrateOptions)
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "ReadDetections" >> source
         | "Calibrate" >> CalibrateLinks(
             cameras, max_gap_s=candidates.max_gap, window_s=candidates.window,
             metric=candidates.metric, min_support=settings.min_support,
             min_significance=settings.min_significance)
         | "AllLinks" >> beam.combiners.ToList()
         | "WriteLinks" >> beam.Map(write_links, target))
    totals = _run(pipeline)
    if _is_dry_run(options):
        print("dry run: job built, nothing executed")
        return 0
    with FileSystems.open(target) as handle:
        links = json.loads(handle.read().decode("utf-8"))
    for link in links:
        print("link %s -> %s: offset %+.1f s, spread %.1f s, support %d, significance %.1f"
              % (link["camera_a"], link["camera_b"], link["offset_s"], link["spread_s"],
                 link["support"], link["significance"]))
    print("done: %d link(s), %d camera pair(s) histogrammed -> %s" % (
        len(links), totals.get("calibration_pairs_histogrammed", 0), target))
    return 0


def evaluate(options: PipelineOptions) -> int:
    """Estimated precision of a matching configuration per camera pair, without labels:
    target-decoy competition (default) or the time-shift control (``--control shift``)."""
    from pipelines.options import EvaluateOptions
    from pipelines.stages import matcher_factory, read_links

    files, cameras = _detection_files(options, cameras=True)
    source = _detection_source(options, files)
    make_matcher = matcher_factory(options)
    links = read_links(options.view_as(MatchOptions).links)
    max_gap = options.view_as(CandidateOptions).max_gap
    target = _require(options.view_as(OutputOptions).output, "--output")
    outputs.check_writable(target.rsplit("/", 1)[0] if "/" in target else ".")
    min_precision = options.view_as(MatchOptions).min_precision
    if options.view_as(EvaluateOptions).control == "shift":
        from transforms.evaluation import EvaluateWithControl
        evaluation = EvaluateWithControl(make_matcher, cameras, links, max_gap)
    else:
        from transforms.decoy import EvaluateWithDecoys
        evaluation = EvaluateWithDecoys(make_matcher, cameras, links, max_gap, min_precision)
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "ReadDetections" >> source
         | "Evaluate" >> evaluation
         | "AllRows" >> beam.combiners.ToList()
         | "WriteTable" >> beam.Map(_write_json, target))
    _run(pipeline)
    if _is_dry_run(options):
        print("dry run: job built, nothing executed")
        return 0
    with FileSystems.open(target) as handle:
        rows = json.loads(handle.read().decode("utf-8"))
    print(format_precision_table(rows))
    notes = precision_notes(rows, min_precision)
    if notes:
        print(notes)
    return 0


def _write_json(rows, target: str) -> None:
    rows = sorted(rows, key=lambda r: (r["camera_a"], r["camera_b"]))
    with FileSystems.create(target) as handle:
        handle.write(json.dumps(rows, indent=2).encode("utf-8"))


def format_precision_table(rows) -> str:
    """The evaluate table: target-decoy rows (``target_hits``) or time-shift rows."""
    if rows and "target_hits" in rows[0]:
        lines = ["| camera_a | camera_b | target hits | decoy hits | est. false | excess "
                 "| precision | best precision (excess) | excess at precision >= 0.8 / 0.9 |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            best = ("%.2f (%.0f)" % (r["best_precision"], r["best_excess"])
                    if "best_precision" in r else "-")
            at = r.get("excess_at_precision", {})
            lines.append("| %s | %s | %d | %d | %.1f | %.1f | %.2f | %s | %.0f / %.0f |" % (
                r["camera_a"], r["camera_b"], r["target_hits"], r["decoy_hits"], r["false"],
                r["excess"], r["precision"], best, at.get("0.8", 0), at.get("0.9", 0)))
        return "\n".join(lines)
    lines = ["| camera_a | camera_b | real | control | excess | precision |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append("| %s | %s | %d | %.1f | %.1f | %.2f |" % (
            r["camera_a"], r["camera_b"], r["real"], r["control"], r["excess"],
            r["precision"]))
    return "\n".join(lines)


def precision_notes(rows, min_precision: float) -> str:
    """One line per camera pair whose estimated precision is below ``min_precision``
    or that got no matches: what the configuration reached and, for a scored policy,
    the ``--min-precision`` of its best estimated precision, so no pair fails silently."""
    lines = []
    for r in rows:
        pair = "%s / %s" % (r["camera_a"], r["camera_b"])
        hits = r.get("target_hits", r.get("real", 0))
        if hits and r["precision"] >= min_precision:
            continue
        text = ("no matches" if not hits else "estimated precision %.2f is below "
                "--min-precision %.2f" % (r["precision"], min_precision))
        if "best_min_precision" in r:
            text += ("; the best estimated precision is %.2f (excess %.0f): --min-precision "
                     "%.2f would return it" % (r["best_precision"], r["best_excess"],
                                               r["best_min_precision"]))
        elif "best_precision" in r:
            text += "; the best estimated precision is %.2f (excess %.0f)" % (
                r["best_precision"], r["best_excess"])
        lines.append("%s: %s" % (pair, text))
    return "\n".join(lines)


SUMMARY_FILE = "match_summary.json"
_REASONS = {
    "too_little_data": "too few candidate pairs to train a score on",
    "too_many_candidates": "more candidate pairs than one group may hold; use a shorter "
                           "period",
    "no_candidates": "no candidate pairs inside the links' bands",
}


def _summary_of(matcher, output: str):
    """Writes a scored matcher's per-group summary (``group_stats``) to
    ``OUTPUT/match_summary.json``; returns its path, or None for other matchers."""
    stats = getattr(matcher, "group_stats", None)
    if stats is None:
        return None
    target = output.rstrip("/") + "/" + SUMMARY_FILE
    _ = (stats | "AllGroupStats" >> beam.combiners.ToList()
         | "WriteSummary" >> beam.Map(_write_summary, target))
    return target


def _write_summary(records, target: str) -> None:
    records = sorted(records, key=lambda r: (r["camera_a"], r["camera_b"], r["period"] or 0))
    with FileSystems.create(target) as handle:
        handle.write(json.dumps(records, indent=2).encode("utf-8"))


def _read_json(path: str):
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def format_match_summary(records) -> str:
    """One line per camera pair and period of a scored matching: its matches and their
    estimated precision, or why it has none and what ``--min-precision`` would give some."""
    periods = {}
    for r in records:
        periods.setdefault((r["camera_a"], r["camera_b"]), []).append(r)
    lines = []
    for (a, b), recs in sorted(periods.items()):
        for r in recs:
            name = "%s / %s%s" % (a, b, "" if len(recs) == 1 else " (period %s)" % r["period"])
            lines.append("%s: %s" % (name, _summary_text(r)))
    return "\n".join(lines)


def _summary_text(r: dict) -> str:
    best = ("the best estimated precision is %.2f (excess %.0f, %d matches)" % (
        r["best_precision"], r["best_excess"], r["best_matches"])
        if "best_precision" in r else "no score threshold has a significant excess")
    if not r["abstained"]:
        return "%d matches, estimated precision %.2f (excess %.0f); %s" % (
            r["matches"], r["est_precision"], r["est_excess"], best)
    if r["reason"] != "precision_not_reached":
        return "no matches: %s" % _REASONS.get(r["reason"], r["reason"])
    if "best_precision" not in r:
        return "no matches: %s" % best
    return ("no matches: --min-precision %.2f is not reached; %s: --min-precision %.2f "
            "would return matches" % (r["min_precision"], best,
                                      r["min_precision_for_matches"]))
