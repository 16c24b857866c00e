"""The ``cctview`` command line: one sub-command per pipeline.

Each sub-command declares which PipelineOptions groups it takes; everything after its
own flags must be a standard Beam pipeline option (``--runner``, ``--project``, ...).
Unknown flags, bad values, missing weights and unwritable outputs stop the command at
once with one line on stderr and a non-zero exit status.
"""
import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from pipelines import commands, demo, report, scale_world, synth
from pipelines.errors import JobFailed, UsageError
from runners.presets import all_option_classes, expand_preset
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

_OWN_OPTIONS = (CalibrateOptions, CandidateOptions, DetectionInputOptions, EvaluateOptions,
                FrameInputOptions, MatchOptions, ModelOptions, OutputOptions, ProgressOptions,
                TimeZoneOptions)


@dataclass(frozen=True)
class Command:
    """A sub-command: its flag groups (Beam PipelineOptions) and what runs it.

    A command with ``add_arguments`` runs no Beam pipeline: it takes exactly the flags
    that function declares and gets an argparse namespace instead of PipelineOptions.
    """
    summary: str
    option_groups: Sequence[type]
    run: Callable[[object], int]
    add_arguments: Optional[Callable[[argparse.ArgumentParser], object]] = None


COMMANDS = {
    "extract": Command(
        "frames -> detections with embeddings (and dead letters)",
        (FrameInputOptions, TimeZoneOptions, ModelOptions, OutputOptions, ProgressOptions),
        commands.extract),
    "match": Command(
        "stored detections -> cross-camera match pairs; no model runs",
        (DetectionInputOptions, TimeZoneOptions, CandidateOptions, MatchOptions, OutputOptions,
         ProgressOptions),
        commands.match),
    "run": Command(
        "extract and match in one pipeline: frames -> detections and matches",
        (FrameInputOptions, TimeZoneOptions, ModelOptions, CandidateOptions, MatchOptions,
         OutputOptions, ProgressOptions),
        commands.run),
    "calibrate": Command(
        "stored detections -> links.json: camera links (transit-time offsets) found in "
        "the data",
        (DetectionInputOptions, TimeZoneOptions, CandidateOptions, CalibrateOptions,
         OutputOptions, ProgressOptions),
        commands.calibrate),
    "evaluate": Command(
        "a matching configuration's estimated precision per camera pair, without labels "
        "(target-decoy competition, or --control shift)",
        (DetectionInputOptions, TimeZoneOptions, CandidateOptions, MatchOptions,
         EvaluateOptions, OutputOptions, ProgressOptions),
        commands.evaluate),
    "import-cctview": Command(
        "CCTView output trees (--features.json + --detections.json) -> detections Parquet",
        (FrameInputOptions, TimeZoneOptions, OutputOptions),
        commands.import_cctview),
    "demo": Command(
        "the embedded default: synth, run, calibrate, match --links, report; offline, "
        "scored against the ground truth",
        (), demo.run_from_args, add_arguments=demo.add_arguments),
    "report": Command(
        "one HTML page plus images of a run: estimated precision per camera pair "
        "(target-decoy), dt histograms against the control with link bands, links, "
        "scores, match gallery, dead letters",
        (), report.run_from_args, add_arguments=report.add_arguments),
    "synth": Command(
        "synthetic multi-camera footage with ground truth (frames in the CCTView layout)",
        (), synth.run_from_args, add_arguments=synth.add_arguments),
    "scale-world": Command(
        "stored detections of N cameras x H hours built from real ones, with planted "
        "links: inputs for scale tests and benchmarks",
        (), scale_world.run_from_args, add_arguments=scale_world.add_arguments),
}


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, not a usage dump."""

    def error(self, message):
        raise UsageError(message)


def _beam_parser() -> argparse.ArgumentParser:
    """A parser of every standard Beam option (ours excluded), to spot unknown flags."""
    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    for cls in all_option_classes():
        if cls not in _OWN_OPTIONS:
            try:
                cls._add_argparse_args(parser)
            except argparse.ArgumentError:
                pass  # an option two Beam classes both declare
    return parser


def _command_parser(name: str, command: Command) -> _OneLineParser:
    parser = _OneLineParser(
        prog="cctview %s" % name,
        description=command.summary,
        epilog="Standard Beam pipeline options (--runner, --direct_num_workers, "
               "--direct_running_mode, --project, --region, --temp_location, --dry_run, "
               "--dataflow_service_options, --sdk_container_image, ...) may follow, and "
               "--runner_preset direct|dataflow|dask; --runner DaskRunner "
               "--dask_client_address tcp://HOST:PORT runs on a Dask cluster "
               "(runners/README.md).",
    )
    for group in command.option_groups:
        group._add_argparse_args(parser)
    if command.add_arguments:
        command.add_arguments(parser)
        parser.epilog = None
    return parser


def _top_parser() -> argparse.ArgumentParser:
    lines = ["  %-15s %s" % (name, c.summary) for name, c in COMMANDS.items()]
    lines.append("  %-15s %s" % ("backfill", "resumable, partition-by-partition run over a "
                                             "time range (--chunk 1h)"))
    return argparse.ArgumentParser(
        prog="cctview",
        usage="cctview COMMAND [flags] [Beam pipeline options]",
        description="CCTV frames in object storage -> cross-camera vehicle matches.",
        epilog="commands:\n" + "\n".join(lines)
               + "\n\n'cctview COMMAND --help' explains every flag of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse(argv: List[str]):
    """-> (command name, PipelineOptions or namespace); UsageError for unusable arguments."""
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        raise SystemExit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        raise UsageError("unknown command %r (one of: %s)" % (name, ", ".join(COMMANDS)))
    if not COMMANDS[name].add_arguments:
        argv = expand_preset(argv)  # --runner_preset NAME -> that preset's Beam flags
    rest = argv[1:]
    parser = _command_parser(name, COMMANDS[name])
    if COMMANDS[name].add_arguments:
        return name, parser.parse_args(rest)
    _, beam_args = parser.parse_known_args(rest)
    _, unknown = _beam_parser().parse_known_args(beam_args)
    if unknown:
        raise UsageError("unknown flag %s" % unknown[0])
    return name, PipelineOptions(rest)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name = argv[0] if argv else "cctview"
    if name == "backfill":  # its own flags, then run's; it runs one job per partition
        from pipelines import backfill

        return backfill.main(argv[1:])
    try:
        name, options = parse(argv)
        return COMMANDS[name].run(options)
    except UsageError as exc:
        print("cctview %s: error: %s" % (name, exc), file=sys.stderr)
        return 2
    except JobFailed as exc:  # the engine's traceback is remote; its cause is chained
        print("cctview %s: error: %s" % (name, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
