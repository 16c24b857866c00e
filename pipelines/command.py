"""What a ``cctview`` sub-command is, and how its argv becomes what it runs on.

Each command module declares its :class:`Command` (``commands.RUN``, ``synth.COMMAND``,
...); ``pipelines.cli`` only lists them by name. So ``demo`` runs the other commands'
functions and ``backfill`` checks its flags as ``run`` would, both without importing
the CLI (which imports them): the imports have no cycle.

A command's flags are Beam PipelineOptions groups; everything after them must be a
standard Beam pipeline option (``--runner``, ``--project``, ...). Unknown flags and bad
values are a :class:`runners.errors.UsageError`: one line, not a usage dump.
"""
import argparse
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

import pipelines.options  # noqa: F401  (registers the project's flags before introspection)
from runners.errors import UsageError
from runners.presets import add_option_args, expand_preset, option_classes

__all__ = ["BEAM_OPTIONS_EPILOG", "Command", "OneLineParser", "parse", "unknown_flags"]

BEAM_OPTIONS_EPILOG = (
    "Standard Beam pipeline options (--runner, --direct_num_workers, "
    "--direct_running_mode, --project, --region, --temp_location, --dry_run, "
    "--dataflow_service_options, --sdk_container_image, ...) may follow, and "
    "--runner_preset direct|dataflow|dask; --runner DaskRunner "
    "--dask_client_address tcp://HOST:PORT runs on a Dask cluster (runners/README.md).")


@dataclass(frozen=True)
class Command:
    """A sub-command: its flag groups (Beam PipelineOptions) and what runs it.

    ``run`` gets PipelineOptions of ``option_groups`` plus any Beam option. A command
    with ``add_arguments`` runs no Beam pipeline: it takes exactly the flags that
    function declares and ``run`` gets an argparse namespace. A command with ``parse``
    reads its argv (without the command name) itself and ``run`` gets what it returns.
    """
    summary: str
    option_groups: Sequence[type]
    run: Callable[[object], int]
    add_arguments: Optional[Callable[[argparse.ArgumentParser], object]] = None
    parse: Optional[Callable[[List[str]], object]] = None


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (UsageError), not a usage dump."""

    def error(self, message):
        raise UsageError(message)


def _project_groups() -> List[type]:
    """The project's own PipelineOptions groups (those of ``pipelines.options``)."""
    return [cls for cls in option_classes() if cls.__module__ == pipelines.options.__name__]


def unknown_flags(beam_args: Sequence[str]) -> List[str]:
    """The tokens of ``beam_args`` that no standard Beam option (ours excluded) takes."""
    own = set(_project_groups())
    parser = add_option_args(_BeamArgumentParser(allow_abbrev=False, add_help=False),
                             [cls for cls in option_classes() if cls not in own])
    return parser.parse_known_args(list(beam_args))[1]


def _parser(name: str, command: Command) -> OneLineParser:
    parser = OneLineParser(prog="cctview %s" % name, description=command.summary,
                           epilog=BEAM_OPTIONS_EPILOG)
    add_option_args(parser, command.option_groups)
    if command.add_arguments:
        command.add_arguments(parser)
        parser.epilog = None
    return parser


def parse(name: str, command: Command, argv: Sequence[str]):
    """``argv`` (flags only) -> what ``command.run`` takes; UsageError if unusable.

    ``--runner_preset NAME`` is expanded first (runners/presets.py) for commands that
    run Beam pipelines; their own flags are checked here and every other flag must be a
    standard Beam option."""
    if command.parse:
        return command.parse(list(argv))
    parser = _parser(name, command)
    if command.add_arguments:
        return parser.parse_args(list(argv))
    rest = expand_preset([name] + list(argv))[1:]
    _, beam_args = parser.parse_known_args(rest)
    unknown = unknown_flags(beam_args)
    if unknown:
        raise UsageError("unknown flag %s" % unknown[0])
    return PipelineOptions(rest)
