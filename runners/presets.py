"""Runner presets: named bundles of standard Beam flags, expanded before parsing.

``cctview run ... --runner_preset dataflow --sdk_container_image IMAGE ...`` is
shorthand for the dozen Beam flags a GPU job on Dataflow needs. A preset is data
(:data:`PRESETS`) and :func:`expand_preset` only rewrites ``argv``: it removes
``--runner_preset NAME`` and appends the preset's flags, so everything downstream
(the CLI's flag checks, ``PipelineOptions``, the runner) sees ordinary Beam flags and
no code path depends on presets.

Rules, so that a preset never surprises whoever overrides part of it:

- A flag the user gave wins. Flags are compared by their Beam *destination*, so an
  alias counts (``--worker_machine_type`` overrides the preset's ``--machine_type``,
  ``--experiment`` its ``--experiments``).
- List-valued flags (``--experiments``, ``--dataflow_service_options``) are merged
  item by item, keyed by the part before ``=``: the user's
  ``--dataflow_service_options worker_accelerator=type:nvidia-l4;...`` replaces the
  preset's accelerator but keeps its other items, and ``--experiments foo`` does not
  drop the preset's ``use_runner_v2``.
- Model flags of the project (``--device cuda``) are added only to commands that run
  models (``extract``, ``run``, ``backfill``): ``cctview match`` has no ``--device``
  and would reject it.
- Flags a preset cannot guess (the container image, project, region, a ``gs://``
  temp location) are required: a preset used without them stops with one line
  naming what is missing, before anything is built.

``--runner DaskRunner`` (or ``dask``, any case, ``--runner=...`` too) names the project's
Dask runner, :class:`runners.dask_runner.DaskRunner`: Beam knows no short name for a
Dask runner, and its own (``apache_beam.runners.dask.dask_runner.DaskRunner``) is
refused with one line, because Beam 2.77's translation loses outputs of these
pipelines (see ``runners/dask_runner.py``).

Beam declares ``--dry_run`` as taking a value (a bare ``--dry_run`` is an argparse
error that prints Beam's whole usage); :func:`expand_preset` turns a bare
``--dry_run`` into ``--dry_run=True`` so that the spelling everybody types works.
"""
import argparse
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from apache_beam.options.pipeline_options import PipelineOptions

from runners.errors import UsageError

__all__ = ["BEAM_DASK_RUNNER", "DASK_RUNNER", "MODEL_COMMANDS", "PRESETS", "PRESET_FLAG",
           "Preset", "T4_ACCELERATOR", "add_option_args", "describe", "expand_preset",
           "option_classes", "uses_dask"]

PRESET_FLAG = "--runner_preset"

# Commands that build models, and so take --device (kept in step with pipelines.cli).
MODEL_COMMANDS = ("extract", "run", "backfill")

# --runner DaskRunner means this class; Beam's own is refused (runners/dask_runner.py).
DASK_RUNNER = "runners.dask_runner.DaskRunner"
BEAM_DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"

# Dataflow GPU: one NVIDIA T4 per worker VM, driver installed by Dataflow. Syntax from
# https://cloud.google.com/dataflow/docs/gpu/use-gpus (type:...;count:...;install-nvidia-driver).
T4_ACCELERATOR = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"


@dataclass(frozen=True)
class Preset:
    """A named set of Beam flags.

    ``beam_flags`` and ``model_flags`` are ``(flag, value)`` pairs in argv spelling;
    ``required`` are flags the user must give (with a hint shown when missing).
    """
    name: str
    summary: str
    beam_flags: Tuple[Tuple[str, str], ...]
    model_flags: Tuple[Tuple[str, str], ...] = ()
    required: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)

    def argv(self, with_model_flags: bool = True) -> List[str]:
        """The preset's flags as argv, ``--flag=value`` each (values may start with -)."""
        pairs = self.beam_flags + (self.model_flags if with_model_flags else ())
        return ["%s=%s" % (flag, value) for flag, value in pairs]


PRESETS: Dict[str, Preset] = {
    "direct": Preset(
        name="direct",
        summary="DirectRunner on every core of this machine: one worker thread per core "
                "(multi_threading), each model call on one core; decoding and the models "
                "release the GIL, and one process holds one model copy (multi_processing "
                "was slower in every measured command here, runners/README.md).",
        beam_flags=(
            ("--runner", "DirectRunner"),
            ("--direct_running_mode", "multi_threading"),
            # 0 = multiprocessing.cpu_count() (FnApiRunner.run_pipeline in Beam 2.77).
            ("--direct_num_workers", "0"),
        ),
    ),
    "dataflow": Preset(
        name="dataflow",
        summary="Dataflow, Runner v2, one NVIDIA T4 per n1-standard-8 worker, models on "
                "cuda, the project's custom SDK container (runners/Dockerfile).",
        beam_flags=(
            ("--runner", "DataflowRunner"),
            # Custom containers and GPUs need Runner v2 (the Python default since 2.45;
            # stated so that an older default or a user's --experiments cannot lose it).
            ("--experiments", "use_runner_v2"),
            ("--dataflow_service_options", T4_ACCELERATOR),
            # T4s attach to N1 machines only; 8 vCPUs keep one GPU fed with decoded
            # frames (JPEG decoding, crops and matching run on the CPUs).
            ("--machine_type", "n1-standard-8"),
            # The CUDA torch image is ~10 GB unpacked; Dataflow's default boot disk
            # for batch Runner v2 jobs is too small to pull it.
            ("--disk_size_gb", "100"),
            ("--max_num_workers", "20"),
        ),
        # One model copy per GPU: on cuda the project's ModelHandlers set
        # large_model=True, so RunInference shares one copy across all SDK processes of
        # a VM (apache/beam#22895, #31052). --experiments=no_use_multiple_sdk_containers
        # would also get one copy, but by putting decoding and matching behind one GIL.
        model_flags=(("--device", "cuda"),),
        required=(
            ("--sdk_container_image", "IMAGE built from runners/Dockerfile"),
            ("--project", "PROJECT"),
            ("--region", "REGION"),
            ("--temp_location", "gs://BUCKET/tmp"),
        ),
    ),
    "dask": Preset(
        name="dask",
        summary="a dask.distributed cluster (dask scheduler + dask worker, "
                "dask-kubernetes, dask-jobqueue) at --dask_client_address; one model "
                "thread per task (give workers one thread per core).",
        beam_flags=(("--runner", "DaskRunner"),),
        required=(("--dask_client_address", "tcp://HOST:PORT of the dask scheduler"),),
    ),
}


def option_classes():
    """Every PipelineOptions subclass imported so far, Beam's and the project's, each once.

    The project's flags (``--device``, ...) are known once ``pipelines.options`` is
    imported, as the CLI does: this layer imports nothing above it."""
    seen, stack = [], list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


def add_option_args(parser: argparse.ArgumentParser, classes) -> argparse.ArgumentParser:
    """Declares the flags of PipelineOptions ``classes`` on ``parser``; -> ``parser``.

    A flag that two classes both declare is kept from the first: Beam's own classes
    repeat a few (its parser tolerates that, argparse does not)."""
    for cls in classes:
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            pass
    return parser


def _option_actions() -> Dict[str, argparse.Action]:
    """Every Beam and project option string (aliases included) -> its argparse action.

    Built from the same PipelineOptions subclasses that Beam parses with, so a flag
    added by Beam or by the project is known without a list kept here.
    """
    parser = add_option_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False),
                             option_classes())
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            actions[option] = action
    return actions


def _flag_name(token: str) -> Optional[str]:
    if not token.startswith("--"):
        return None
    return token.split("=", 1)[0]


def _is_list_option(action: argparse.Action) -> bool:
    return type(action).__name__ == "_CommaSeparatedListAction" or action.nargs in ("+", "*")


def _given(argv: Sequence[str], actions) -> Dict[str, List[str]]:
    """dest -> the values the user gave for it (all occurrences, comma lists split)."""
    given: Dict[str, List[str]] = {}
    for i, token in enumerate(argv):
        name = _flag_name(token)
        if name is None or name not in actions:
            continue
        dest = actions[name].dest
        if "=" in token:
            value = token.split("=", 1)[1]
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        else:
            value = ""
        given.setdefault(dest, []).extend(v for v in value.split(",") if v)
    return given


def _item_key(item: str) -> str:
    return item.split("=", 1)[0]


def _normalise_dry_run(argv: List[str]) -> List[str]:
    out = []
    for i, token in enumerate(argv):
        bare = token == "--dry_run" and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
        out.append("--dry_run=True" if bare else token)
    return out


def _normalise_runner(argv: List[str]) -> List[str]:
    """``--runner DaskRunner`` -> the project's Dask runner; Beam's own -> UsageError.

    Every other token is kept as given, spelling included."""
    out = []
    for i, token in enumerate(argv):
        if token.startswith("--runner="):
            value = token.split("=", 1)[1]
        elif i > 0 and argv[i - 1] == "--runner":
            value = token
        else:
            out.append(token)
            continue
        if value == BEAM_DASK_RUNNER:
            raise UsageError("--runner %s: Beam 2.77's Dask translation loses tagged outputs, "
                             "timestamps and all sinks but the last; use --runner DaskRunner "
                             "(runners/README.md)" % value)
        if value.lower() in ("dask", "daskrunner"):
            value = DASK_RUNNER
        out.append("--runner=" + value if token.startswith("--runner=") else value)
    return out


def _register_dask_options() -> None:
    """Imports Beam's DaskOptions (--dask_client_address, ...) so that they parse."""
    try:
        import apache_beam.runners.dask.dask_runner  # noqa: F401
        import dask.distributed  # noqa: F401
    except ImportError:
        raise UsageError("the Dask runner needs the dask extra: pip install "
                         "'cctview-beam[dask]'") from None


def uses_dask(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (after :func:`expand_preset`) runs on Dask or gives Dask flags."""
    return DASK_RUNNER in argv or any(t.startswith("--dask_") for t in argv)


def _pop_preset(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    name, rest, i = None, [], 0
    while i < len(argv):
        token = argv[i]
        if token == PRESET_FLAG:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UsageError("%s needs a name (one of: %s)"
                                 % (PRESET_FLAG, ", ".join(PRESETS)))
            name, i = argv[i + 1], i + 2
            continue
        if token.startswith(PRESET_FLAG + "="):
            name, i = token.split("=", 1)[1], i + 1
            continue
        rest.append(token)
        i += 1
    return name, rest


def _command_of(argv: Sequence[str]) -> Optional[str]:
    return argv[0] if argv and not argv[0].startswith("-") else None


def expand_preset(argv: List[str]) -> List[str]:
    """``argv`` with ``--runner_preset NAME`` replaced by the preset's flags.

    ``argv`` may start with the command name (``["run", "--input", ...]``, as
    ``pipelines.cli.main`` receives it) or hold flags only (then model flags are
    added). Flags the user gave are kept as given and win over the preset's (see the
    module docstring for list-valued flags). Without ``--runner_preset`` the only
    changes are a bare ``--dry_run`` becoming ``--dry_run=True`` and ``--runner
    DaskRunner`` naming the project's Dask runner. Raises UsageError for an unknown
    preset, a required flag that is missing, Beam's own DaskRunner, or Dask flags
    without the dask extra installed. A preset's project flags (``--device``) must be
    registered first (:func:`option_classes`).
    """
    argv = _normalise_dry_run(list(argv))
    name, rest = _pop_preset(argv)
    if name == "dask" or uses_dask(_normalise_runner(rest)):
        _register_dask_options()
    if name is None:
        return _normalise_runner(rest)
    if name not in PRESETS:
        raise UsageError("unknown %s %r (one of: %s)" % (PRESET_FLAG, name, ", ".join(PRESETS)))
    preset = PRESETS[name]
    actions = _option_actions()
    given = _given(rest, actions)
    missing = [(flag, hint) for flag, hint in preset.required
               if actions[flag].dest not in given or not given[actions[flag].dest]]
    if missing:
        raise UsageError("%s %s needs %s" % (
            PRESET_FLAG, name, ", ".join("%s %s" % pair for pair in missing)))
    command = _command_of(rest)
    pairs = list(preset.beam_flags)
    if command is None or command in MODEL_COMMANDS:
        pairs += list(preset.model_flags)
    added = []
    for flag, value in pairs:
        action = actions[flag]
        if _is_list_option(action):
            taken = {_item_key(v) for v in given.get(action.dest, [])}
            items = [v for v in value.split(",") if _item_key(v) not in taken]
            if items:
                added.append("%s=%s" % (flag, ",".join(items)))
        elif action.dest not in given:
            added.append("%s=%s" % (flag, value))
    return _normalise_runner(rest + added)


def describe() -> str:
    """The presets as text for ``--help`` and the README: name, summary, flags."""
    lines = []
    for preset in PRESETS.values():
        lines.append("%s: %s" % (preset.name, preset.summary))
        lines.append("    " + " ".join(preset.argv()))
        if preset.required:
            lines.append("    requires: " + ", ".join("%s %s" % r for r in preset.required))
    return "\n".join(lines)
