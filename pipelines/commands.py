"""The sub-commands: validate flags, assemble a pipeline, run it, report its counters.

While a job runs, a progress line goes to stderr about every 10 s
(:mod:`pipelines.progress`; ``--quiet`` silences it): its reporter is opened before the
pipeline is built, so that the DoFns' counters tick to it."""
import functools
import json
import logging
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.io.filesystems import FileSystems

from pipelines import outputs
from pipelines import progress
from pipelines import report_estimate
from pipelines.command import Command
from pipelines.options import (
    CalibrateOptions,
    CandidateOptions,
    DetectionInputOptions,
    EvaluateOptions,
    FrameInputOptions,
    MatchOptions,
    ModelOptions,
    OutputOptions,
    ProgressOptions,
    TimeZoneOptions,
)
from runners.errors import UsageError
from transforms import parquet_io
from transforms.cctview_import import ImportCCTView
from transforms.detections_io import (DetectionsSchemaError, FileSpan, ReadDetections, inspect_files,
                                      parquet_files)
from transforms.frames import DEAD_LETTER, ReadFrames
from transforms.layout import FrameLayout, optional_range

__all__ = ["CALIBRATE", "ChunkPlan", "EVALUATE", "EXTRACT", "IMPORT_CCTVIEW", "MATCH",
           "RUN", "SUMMARY_COUNTERS", "SUMMARY_FILE", "calibrate", "evaluate", "extract",
           "format_match_summary", "format_precision_table", "import_cctview", "match",
           "precision_notes", "run"]

_LOG = logging.getLogger(__name__)
SUMMARY_COUNTERS = (
    "frames_listed", "frames_decoded", "frames_dead_lettered", "files_outside_range",
    "frames_inferred", "frames_with_detections", "frames_without_detections",
    "frames_inference_failed", "inference_batches_retried_one_by_one",
    "frames_detection_limit_hit", "detections",
    "detections_read", "candidate_pairs", "distance_cells", "block_compute_ms", "blocks_split",
    "detections_batched", "embedding_copies_shuffled", "row_references_shuffled",
    "stored_rows_read", "shuffled_bytes", "matches_emitted",
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


def _match_stage(options: PipelineOptions, owned_ms=None):
    from pipelines.stages import match_stage

    return match_stage(options, owned_ms)


def _progress(options: PipelineOptions, label: str, phases) -> progress.Progress:
    """The command's progress reporter (a context manager: open it before building)."""
    return progress.Progress(options, label, phases,
                             quiet=options.view_as(ProgressOptions).quiet)


def _quiet(options: PipelineOptions) -> bool:
    return bool(options.view_as(ProgressOptions).quiet)


def _is_dry_run(options: PipelineOptions) -> bool:
    return bool(options.get_all_options().get("dry_run"))


def _prepare_output(options: PipelineOptions, output: str, tables: List[str]) -> None:
    """outputs.prepare, except under ``--dry_run``: nothing is cleared (a dry run leaves
    earlier outputs alone), and an output in object storage is not probed either,
    with one line saying so (a dry run builds the job offline)."""
    _require(output, "--output")
    if not _is_dry_run(options):
        outputs.prepare(output, tables)
        return
    from models.weights import is_local  # imports torch: dry runs only

    if is_local(output):
        outputs.check_writable(output)
    else:
        print("dry run: output %s not checked (probing it needs the network)" % output)


def _report(totals: Dict[str, int], output: str) -> None:
    shown = ["%s=%d" % (k, totals[k]) for k in SUMMARY_COUNTERS if k in totals]
    print("done: %s -> %s" % (", ".join(shown) or "no counters", output))
    accounting = progress.frame_accounting(totals)
    if accounting:
        print(accounting)
    sys.stdout.flush()


def _write_all(pcolls: Dict[str, object], output: str, shards: int) -> None:
    for table, pcoll in pcolls.items():
        outputs.write(pcoll, output, table, shards)


def _finish(options, pipeline, output: str, tables: List[str],
            watch: Optional[progress.Progress] = None) -> int:
    totals = progress.run_job(pipeline, watch)
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
    _prepare_output(options, out.output, tables)
    with _progress(options, "extract", progress.EXTRACT) as watch:
        pipeline = beam.Pipeline(options=options)
        _detect_and_write(pipeline, options, source, detect)
        return _finish(options, pipeline, out.output, tables, watch)


def _detection_spans(options: PipelineOptions, cameras: bool = False) -> List[FileSpan]:
    """The --detections Parquet files, checked, with what their metadata says (row
    groups, times, embedding size; with ``cameras``, their camera ids)."""
    paths = _require(options.view_as(DetectionInputOptions).detections, "--detections")
    files = parquet_files(paths)
    if not files:
        raise UsageError("no Parquet files in --detections %s" % " ".join(paths))
    try:
        return inspect_files(files, options.view_as(TimeZoneOptions).timezone, cameras)
    except DetectionsSchemaError as exc:
        raise UsageError(str(exc))


def _detection_files(options: PipelineOptions, cameras: bool = False) -> Tuple[List[str], List[str]]:
    """The --detections Parquet files, checked, and (with ``cameras``) their camera ids."""
    spans = _detection_spans(options, cameras)
    return [s.path for s in spans], sorted({c for s in spans for c in s.cameras})


def _detection_source(options: PipelineOptions, files, as_columns: bool = False,
                      time_range=None, cameras=None) -> ReadDetections:
    return ReadDetections(files, options.view_as(TimeZoneOptions).timezone,
                          as_columns=as_columns, time_range=time_range, cameras=cameras)


class ChunkPlan(NamedTuple):
    """The time chunks of a match or calibrate run and the --chunk-mb they were cut by
    (resolved: 0, one job, on Dataflow or when asked)."""
    chunk_mb: int
    chunks: list


def _chunk_mb(options: PipelineOptions) -> int:
    """--chunk-mb, resolved: 0 (one job) on Dataflow, else its default."""
    from apache_beam.options.pipeline_options import StandardOptions

    from pipelines.options import DEFAULT_CHUNK_MB

    chunk_mb = options.view_as(DetectionInputOptions).chunk_mb
    if chunk_mb is None:
        runner = str(options.view_as(StandardOptions).runner or "")
        chunk_mb = 0 if "Dataflow" in runner else DEFAULT_CHUNK_MB
    return chunk_mb


def _chunk_rows(options: PipelineOptions, spans) -> int:
    """Detections per chunk that --chunk-mb allows (0: one job)."""
    from pipelines.chunks import rows_budget

    chunk_mb = _chunk_mb(options)
    dim = max((s.dim for s in spans), default=0) or 2048  # variable lists: assume large
    return rows_budget(chunk_mb * 2 ** 20, dim) if chunk_mb else 0


def _chunk_plan(options: PipelineOptions, spans, margin_ms: int, align_ms: int) -> ChunkPlan:
    """The time chunks of a match or calibrate run (pipelines/chunks.py): one chunk on
    Dataflow or with --chunk-mb 0, else chunks of --chunk-mb of embeddings."""
    from pipelines.chunks import plan_chunks

    rows = _chunk_rows(options, spans)
    return ChunkPlan(_chunk_mb(options), plan_chunks(spans, margin_ms, align_ms, rows))


def _run_chunks(options: PipelineOptions, chunks, build, what: str,
                phases=progress.MATCH) -> Dict[str, int]:
    """Runs ``build(pipeline, chunk)`` for every chunk, one job each; summed counters.
    The progress line while each runs (its reading total from the files' metadata) and
    a line on stderr per finished chunk when there are several."""
    totals: Dict[str, int] = {}
    started = time.time()
    with _progress(options, what, phases) as watch:
        for chunk in chunks:
            label = what if len(chunks) == 1 else "%s, chunk %d/%d" % (
                what, chunk.index + 1, len(chunks))
            watch.start_job(label, phases, {"reading": chunk.rows})
            pipeline = beam.Pipeline(options=options)
            build(pipeline, chunk)
            progress.add_counts(totals, progress.run_job(pipeline, watch))
            _chunk_done(options, chunks, chunk, started, what)
    return totals


def _chunk_done(options, chunks, chunk, started: float, what: str) -> None:
    """A line on stderr per finished chunk when there are several (not with --quiet)."""
    if len(chunks) > 1 and not _quiet(options):
        done = chunk.index + 1
        elapsed = time.time() - started
        print("%s: chunk %d/%d done (%d detections read), %.0f s, ETA %.0f s"
              % (what, done, len(chunks), chunk.rows, elapsed,
                 elapsed / done * (len(chunks) - done)), file=sys.stderr)


def match(options: PipelineOptions) -> int:
    """Stored detections -> cross-camera match pairs; no model runs."""
    from pipelines.chunks import plan_chunks
    from transforms.matching import MatchDetections, context_margin_ms

    out = options.view_as(OutputOptions)
    spans = _detection_spans(options)
    matcher = _match_stage(options)
    if isinstance(matcher, MatchDetections):
        chunks = _chunk_plan(options, spans, context_margin_ms(
            matcher.policy, matcher.bands, matcher.window_ms), matcher.block_ms).chunks
    else:  # the learned matcher trains on the whole period: one job
        chunks = plan_chunks(spans, 0, 1, 0)
    tables = ["matches"]
    _prepare_output(options, out.output, tables)
    files = [s.path for s in spans]

    def build(pipeline, chunk):
        # Matchers that take column chunks skip a Python object per detection; the
        # learned one reads each detection's box and score.
        columns = getattr(matcher, "accepts_columns", False)
        if chunk.owned_ms is None:
            source, stage, prefix = _detection_source(options, files, columns), matcher, "part-"
        else:
            source = _detection_source(options, chunk.files, columns, chunk.read_ms)
            stage, prefix = _match_stage(options, chunk.owned_ms), "part-c%04d-" % chunk.index
        matches = pipeline | "ReadDetections" >> source | "Match" >> stage
        outputs.write(matches, out.output, "matches", out.shards, file_prefix=prefix)
        summaries.append(_summary_of(stage, out.output))

    summaries: list = []
    # The learned matcher's groups tick no counter: its line shows the reading.
    phases = progress.MATCH if isinstance(matcher, MatchDetections) else (progress.READING,)
    totals = _run_chunks(options, chunks, build, "match", phases)
    if _is_dry_run(options):
        print("dry run: job built, nothing executed")
        return 0
    outputs.finish(out.output, tables)
    _write_match_settings(options, out.output)
    _report(totals, out.output)
    for summary in filter(None, summaries):  # scored matchers: one job, one summary
        print(format_match_summary(_read_json(summary)))
    return 0


def run(options: PipelineOptions) -> int:
    """Frames -> detections and matches in one pipeline."""
    out = options.view_as(OutputOptions)
    source = _frame_source(options)
    detect = _model_stage(options)
    matcher = _match_stage(options)
    tables = _detection_tables(options) + ["matches"]
    _prepare_output(options, out.output, tables)
    phases = progress.RUN if getattr(matcher, "accepts_columns", False) else progress.EXTRACT
    with _progress(options, "run", phases) as watch:
        pipeline = beam.Pipeline(options=options)
        detections = _detect_and_write(pipeline, options, source, detect)
        _write_all({"matches": detections | "Match" >> matcher}, out.output, out.shards)
        code = _finish(options, pipeline, out.output, tables, watch)
    if not _is_dry_run(options):
        _write_match_settings(options, out.output)
    return code


def _write_match_settings(options: PipelineOptions, output: str) -> None:
    """OUTPUT/match_settings.json: the matching configuration, for ``cctview report``."""
    from pipelines.stages import MATCH_SETTINGS_FILE, match_settings

    with FileSystems.create(output.rstrip("/") + "/" + MATCH_SETTINGS_FILE) as handle:
        handle.write(json.dumps(match_settings(options), indent=1).encode("utf-8"))


def import_cctview(options: PipelineOptions) -> int:
    """CCTView output trees -> detections Parquet."""
    out = options.view_as(OutputOptions)
    roots = _require(options.view_as(FrameInputOptions).input, "--input")
    tables = ["detections", "dead_letter"]
    _prepare_output(options, out.output, tables)
    pipeline = beam.Pipeline(options=options)
    imported = pipeline | "ImportCCTView" >> ImportCCTView(
        roots, options.view_as(TimeZoneOptions).timezone)
    _write_all({"detections": imported.detections, "dead_letter": imported[DEAD_LETTER]},
               out.output, out.shards)
    return _finish(options, pipeline, out.output, tables)


def calibrate(options: PipelineOptions) -> int:
    """Stored detections -> links.json (camera links with transit-time offsets).

    Each time chunk's job writes its camera pairs' dt lists (real and control, computed
    from the same shuffled copies) to a part file beside the target; the driver pools
    them and finds the links. With many cameras the pairs run in camera groups, each
    cut into its own time chunks (:func:`pipelines.chunks.camera_groups`)."""
    from transforms.calibration import (CalibrationPairs, links_of_pairs, merge_pair_dts,
                                        searched_pairs)
    from pipelines.chunks import camera_groups
    from pipelines.stages import read_camera_pairs
    from transforms.links import write_links
    from transforms.match_blocks import CandidateBands
    from transforms.matching import context_margin_ms

    settings = options.view_as(CalibrateOptions)
    named_pairs = read_camera_pairs(settings.pairs)
    spans = _detection_spans(options, cameras=True)
    cameras = sorted({c for s in spans for c in s.cameras})
    pairs = searched_pairs(cameras, named_pairs)
    if named_pairs is not None and not pairs:
        raise UsageError("no camera pair of --pairs %s has both cameras in the detections"
                         % settings.pairs)
    target = _require(options.view_as(OutputOptions).output, "--output")
    outputs.check_writable(target.rsplit("/", 1)[0] if "/" in target else ".")
    candidates = options.view_as(CandidateOptions)
    window_ms = int(round(candidates.window * 1000))
    # real pairs are exact with the margin; each chunk's control shifts within the data
    # it reads (the same traffic, no true pairs), not within the whole period
    margin = context_margin_ms("mutual", CandidateBands(candidates.max_gap), window_ms)
    groups = camera_groups(pairs, spans, margin, window_ms, _chunk_rows(options, spans))
    period = (min(g[1] for s in spans for g in s.groups if g[0]),
              max(g[2] for s in spans for g in s.groups if g[0]) + 1000)

    def span_of(chunk):
        if chunk.read_ms is None:
            return period
        return max(chunk.read_ms[0], period[0]), min(chunk.read_ms[1], period[1])
    parts = target + ".parts"
    parquet_io.clear_table(parts)  # a crashed run's parts must not be pooled

    def build(pipeline, chunk, group, group_spans, group_pairs):
        files = [s.path for s in group_spans] if chunk.read_ms is None else chunk.files
        cams = sorted({c for p in group_pairs for c in p})
        _ = (pipeline
             | "ReadDetections" >> _detection_source(
                 options, files, True, chunk.read_ms, cams if len(groups) > 1 else None)
             | "Calibrate" >> CalibrationPairs(
                 cams, span_of(chunk), max_gap_s=candidates.max_gap,
                 window_s=candidates.window, metric=candidates.metric,
                 owned_ms=chunk.owned_ms, pairs=group_pairs)
             | "AllPairs" >> beam.combiners.ToList()
             | "WritePart" >> beam.Map(_write_json_lines, "%s/group-%03d-chunk-%04d.json"
                                       % (parts, group, chunk.index)))

    # Camera groups where many cameras make even one step of time too much for a chunk
    # (pipelines/chunks.py)
    for group, (group_pairs, group_spans) in enumerate(groups):
        plan = _chunk_plan(options, group_spans, margin, window_ms)
        label = "" if len(groups) == 1 else " (camera group %d/%d)" % (group + 1, len(groups))
        _run_chunks(options, plan.chunks, functools.partial(
            build, group=group, group_spans=group_spans, group_pairs=group_pairs),
            "calibrate%s" % label)
    if _is_dry_run(options):
        print("dry run: job built, nothing executed")
        return 0
    pair_dts = merge_pair_dts(_read_parts(parts))
    links, histogrammed = links_of_pairs(pair_dts, candidates.max_gap, settings.min_support,
                                         settings.min_significance)
    write_links(links, target)
    for link in links:
        print("link %s -> %s: offset %+.1f s, spread %.1f s, support %d, significance %.1f"
              % (link["camera_a"], link["camera_b"], link["offset_s"], link["spread_s"],
                 link["support"], link["significance"]))
    print("done: %d link(s), %d camera pair(s) histogrammed -> %s" % (
        len(links), histogrammed, target))
    return 0


def _write_json_lines(pairs, path: str) -> None:
    """((camera_a, camera_b), {"real": [...], "control": [...]}) tuples -> one JSON line each."""
    with FileSystems.create(path) as handle:
        for pair, dts in sorted(pairs):
            handle.write((json.dumps([list(pair), dts]) + "\n").encode("utf-8"))


def _read_parts(folder: str):
    """Every line of every part file under ``folder``, which is then deleted."""
    found = FileSystems.match([folder + "/*.json"])[0].metadata_list
    for metadata in sorted(found, key=lambda m: m.path):
        with FileSystems.open(metadata.path) as handle:
            for line in handle.read().decode("utf-8").splitlines():
                pair, dts = json.loads(line)
                yield tuple(pair), dts
    if found:
        FileSystems.delete([m.path for m in found])


def evaluate(options: PipelineOptions) -> int:
    """Estimated precision of a matching configuration per camera pair, without labels:
    target-decoy competition (default) or the time-shift control (``--control shift``)."""
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
    phases = (progress.READING,) if getattr(make_matcher, "scored", False) else progress.MATCH
    with _progress(options, "evaluate", phases) as watch:
        pipeline = beam.Pipeline(options=options)
        _ = (pipeline
             | "ReadDetections" >> source
             | "Evaluate" >> evaluation
             | "AllRows" >> beam.combiners.ToList()
             | "WriteTable" >> beam.Map(_write_json, target))
        progress.run_job(pipeline, watch)
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
    or that got no matches (:func:`pipelines.report_estimate.shortfall`), so no pair
    fails silently."""
    lines = []
    for r in rows:
        text = report_estimate.shortfall(r, min_precision)
        if text is not None:
            lines.append("%s / %s: %s" % (r["camera_a"], r["camera_b"], text))
    return "\n".join(lines)


SUMMARY_FILE = "match_summary.json"
_REASONS = {
    "too_little_data": "too few candidate pairs to train a score on",
    "too_many_candidates": "more candidate pairs than one group may hold; use a shorter "
                           "period",
    "no_candidates": "no candidate pairs inside the links' bands",
    "span_too_short": "the period is too short for time-shifted controls that share no "
                      "pair with the real alignment or each other (links' bands too wide "
                      "for it); match a longer period",
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


EXTRACT = Command(
    "frames -> detections with embeddings (and dead letters)",
    (FrameInputOptions, TimeZoneOptions, ModelOptions, OutputOptions, ProgressOptions),
    extract)
MATCH = Command(
    "stored detections -> cross-camera match pairs; no model runs",
    (DetectionInputOptions, TimeZoneOptions, CandidateOptions, MatchOptions, OutputOptions,
     ProgressOptions),
    match)
RUN = Command(
    "extract and match in one pipeline: frames -> detections and matches",
    (FrameInputOptions, TimeZoneOptions, ModelOptions, CandidateOptions, MatchOptions,
     OutputOptions, ProgressOptions),
    run)
CALIBRATE = Command(
    "stored detections -> links.json: camera links (transit-time offsets) found in "
    "the data",
    (DetectionInputOptions, TimeZoneOptions, CandidateOptions, CalibrateOptions,
     OutputOptions, ProgressOptions),
    calibrate)
EVALUATE = Command(
    "a matching configuration's estimated precision per camera pair, without labels "
    "(target-decoy competition, or --control shift)",
    (DetectionInputOptions, TimeZoneOptions, CandidateOptions, MatchOptions,
     EvaluateOptions, OutputOptions, ProgressOptions),
    evaluate)
IMPORT_CCTVIEW = Command(
    "CCTView output trees (--features.json + --detections.json) -> detections Parquet",
    (FrameInputOptions, TimeZoneOptions, OutputOptions),
    import_cctview)
