"""The ``cctview`` command line: one sub-command per pipeline.

The table below names each command; what a command takes and runs is declared beside
its code (:class:`pipelines.command.Command`). Unknown flags, bad values, missing
weights and unwritable outputs stop the command at once with one line on stderr and a
non-zero exit status.
"""
import argparse
import logging
import sys
from typing import List, Optional

from pipelines import backfill, commands, demo, report, scale_world, synth
from pipelines.command import parse as parse_command
from runners.errors import JobFailed, UsageError

__all__ = ["COMMANDS", "main", "parse"]

COMMANDS = {
    "extract": commands.EXTRACT,
    "match": commands.MATCH,
    "run": commands.RUN,
    "calibrate": commands.CALIBRATE,
    "evaluate": commands.EVALUATE,
    "import-cctview": commands.IMPORT_CCTVIEW,
    "demo": demo.COMMAND,
    "report": report.COMMAND,
    "synth": synth.COMMAND,
    "scale-world": scale_world.COMMAND,
    "backfill": backfill.COMMAND,
}


def _top_parser() -> argparse.ArgumentParser:
    lines = ["  %-15s %s" % (name, c.summary) for name, c in COMMANDS.items()]
    return argparse.ArgumentParser(
        prog="cctview",
        usage="cctview COMMAND [flags] [Beam pipeline options]",
        description="CCTV frames in object storage -> cross-camera vehicle matches.",
        epilog="commands:\n" + "\n".join(lines)
               + "\n\n'cctview COMMAND --help' explains every flag of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse(argv: List[str]):
    """-> (command name, what its ``run`` takes); UsageError for unusable arguments."""
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        raise SystemExit(0 if argv else 2)
    name = argv[0]
    if name not in COMMANDS:
        raise UsageError("unknown command %r (one of: %s)" % (name, ", ".join(COMMANDS)))
    return name, parse_command(name, COMMANDS[name], argv[1:])


def main(argv: Optional[List[str]] = None) -> int:
    """``cctview COMMAND ...``; -> exit status (2: unusable arguments, 1: a job failed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name = argv[0] if argv else "cctview"
    try:
        name, parsed = parse(argv)
        return COMMANDS[name].run(parsed)
    except UsageError as exc:
        print("cctview %s: error: %s" % (name, exc), file=sys.stderr)
        return 2
    except JobFailed as exc:  # the engine's traceback is remote; its cause is chained
        print("cctview %s: error: %s" % (name, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
