"""``cctview backfill``: a resumable, partition-by-partition ``run`` over a time range.

::

    cctview backfill --input ROOT --start ISO --end ISO --output DIR [--chunk 1h]
                     [any other `cctview run` flag and Beam option]

The range is cut into partitions aligned to multiples of ``--chunk`` since the Unix
epoch in UTC (``15m``, ``1h``, ``6h``, ``1d``, ...; the first and last are clipped to
``--start/--end``), so the same instant always falls in the same partition whatever
range a later run asks for. Each partition is committed on its own and a re-run skips
what is committed: a backfill killed at any moment, even with ``kill -9``, resumes
where it stopped and ends with exactly the outputs of an uninterrupted run.

Two phases per partition
========================
A partition ``P = [s, e)`` is **extracted** (frames of ``[s, e)`` -> detections and
dead letters: the models run once per frame) and **matched**: the pairs whose
camera-A detection lies in ``[s, e)`` (``frame_ts_a``, the owner rule of the
``matches`` table's partitioning) are computed from the *stored* detections of
``[s - M, e + M)``, clipped to ``[--start, --end)``. ``M`` is how far matching looks
around a detection (:func:`margin_ms`): with ``R`` the largest ``|dt|`` a
candidate may have (``--max-gap`` or the ``--links`` bands), ``all`` needs ``R``,
``topk``/``mutual`` ``2R`` (``b``'s own candidates decide whether it picks ``a``) and
``assignment`` ``3R + 2W`` (``W`` = ``--window``: the window's Hungarian problem plus
the other windows ``b`` is assigned in). Every pair is therefore emitted once, by the
partition owning its ``a``, and decided on the same detections as a single job would
see: **the matches of a backfill equal, as a set, those of ``cctview match`` over the
backfill's detections restricted to ``[--start, --end)``, for every policy and
detector.** The detections equal those of one ``cctview extract`` over the range for
every detector that looks at one frame at a time (all neural ones); the ``background``
detector estimates each camera's background from the frames of its job, here of one
partition, so its boxes (not the matching) depend on ``--chunk``.

Why not one ``cctview run`` per partition over ``[s - M, e + M)``: inference would run
again on every margin frame (``2M/chunk`` extra: +33 % for 1 h chunks and the default
300 s gap, +133 % for 15 min), and a margin frame's detections would come from a
different job than the committed ones, so matches would agree with the stored
detections only for detectors that are deterministic per frame and batch. Here the
models run once per frame and matching only reads Parquet. A partition's matching
needs its successors' detections, so jobs are pipelined: Beam job ``i`` extracts
partition ``i`` and matches partition ``i - L`` (``L = ceil(M / chunk)``), from the
committed files of its neighbours plus the detections of the job's own extraction,
and the last job matches all the partitions left. A backfill of ``N`` partitions runs
``N`` jobs: one job startup per partition on Dataflow, as with one ``run`` each.

Layout of ``DIR``
=================
- ``detections/date=D/hour=H/<P>-part-NNNNN.parquet``, ``matches/date=D/hour=H/<P>-...``,
  ``dead_letter/<P>-part-NNNNN.parquet``: the usual tables (read them with
  ``pyarrow.dataset.dataset(DIR/detections, partitioning="hive")``); ``<P>`` names the
  partition (``20240501T120000Z-20240501T130000Z``), so several partitions share an
  hour folder without clashing and a partition's files are found by a prefix listing
  of its own hour folders (cheap on object stores).
- ``_backfill/BACKFILL``: chunk, input and model flags of the backfill; a re-run with
  other ones is refused (use another ``--output``), so partitions never mix settings.
- ``_backfill/<P>/_EXTRACTED`` and ``_backfill/<P>/_SUCCESS`` (JSON, written last,
  atomically): the commit points of the two phases. ``_SUCCESS`` records the match
  settings, the context range and which extraction of each neighbour it used; if any
  of them differs on a re-run (other ``--policy``, a wider ``--end``, a re-extracted
  neighbour) only the matching of that partition is redone, from stored detections.
- ``_tmp/<P>/``: a job's outputs before commit. A commit moves them into the tables
  (a rename; server-side on object stores) and then writes the marker. Anything a
  killed job left is removed before its partition is redone.

Progress: inside each job, a line on stderr every ``--progress-every`` seconds (10
by default): the job's partition, frames done of those listed and detections matched
of those batched, rate and ETA (:mod:`pipelines.progress`, on every runner); one line
per finished job (the partition it extracted: frames, detections, dead letters; the
partition it completed: matches; seconds, frames/s, the backfill's ETA); ``--quiet``
silences both. At the end, the Beam counters summed over all jobs, after a sentence
that accounts for every listed file: each partition lists the hour folders it
overlaps, so a file of another partition's time is listed and skipped here
(``files_outside_range``); it is read by its own partition, none is lost.
"""
import argparse
import concurrent.futures
import datetime as dt
import hashlib
import json
import os
import re
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam

from pipelines import commands, progress
from pipelines.command import Command, OneLineParser, parse
from runners.errors import JobFailed, UsageError
from runners.presets import add_option_args, expand_preset

__all__ = ["Backfill", "CHUNK_UNITS_S", "COMMAND", "Config", "DAY_MS", "EXTRACTED",
           "EXTRACT_TABLES", "MATCH_TABLES", "MAX_MATCHES_PER_JOB", "Partition",
           "STATE_DIR", "STATE_FILE", "SUCCESS", "Store", "TMP_DIR", "context_of",
           "margin_ms", "parse_args", "parse_chunk", "plan_partitions", "run"]


CHUNK_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DAY_MS = 86400 * 1000
STATE_DIR = "_backfill"
TMP_DIR = "_tmp"
STATE_FILE = "BACKFILL"
EXTRACTED = "_EXTRACTED"
SUCCESS = "_SUCCESS"
EXTRACT_TABLES = ("detections", "dead_letter")
# A job matches at most this many partitions (a re-match after new settings is cut
# into jobs of this size, so that it commits, and can resume, as it goes).
MAX_MATCHES_PER_JOB = 24
MATCH_TABLES = ("matches",)
# Flags that change where or how fast the models run, not what they find: a backfill
# may be resumed with other values (started on a laptop, finished on Dataflow).
_NOT_FINGERPRINTED = {"device", "batch_size", "input", "start", "end"}
# Counters shown first in the final summary, in this order; the others follow.
_SUMMARY_FIRST = ("frames_listed", "frames_decoded", "frames_dead_lettered",
                  "frames_inferred", "files_outside_range", "detections", "detections_read", "candidate_pairs",
                  "matches_emitted", "detections_rows_written", "matches_rows_written",
                  "dead_letter_rows_written")


# ------------------------------------------------------------------ partitions
def parse_chunk(text: str) -> int:
    """``15m``, ``1h``, ``6h``, ``1d`` (any ``<int><s|m|h|d>``) -> milliseconds.

    A chunk must divide a day or be whole days, so that partitions aligned to the
    epoch start at the same clock times every day.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text or "")
    if not match or int(match.group(1)) <= 0:
        raise UsageError("--chunk must look like 15m, 1h, 6h or 1d, not %r" % text)
    ms = int(match.group(1)) * CHUNK_UNITS_S[match.group(2)] * 1000
    if DAY_MS % ms and ms % DAY_MS:
        raise UsageError("--chunk %s neither divides a day nor is whole days" % text)
    return ms


def _iso(ms: int) -> str:
    when = dt.datetime.fromtimestamp(ms / 1000.0, tz=dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ" if when.second else "%Y-%m-%dT%H:%MZ")


@dataclass(frozen=True, order=True)
class Partition:
    """``[start_ms, end_ms)`` in UTC epoch milliseconds."""
    start_ms: int
    end_ms: int

    @property
    def name(self) -> str:
        """File-name-safe and sortable: ``20240501T120000Z-20240501T130000Z``."""
        fmt = lambda ms: dt.datetime.fromtimestamp(  # noqa: E731
            ms / 1000.0, tz=dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return "%s-%s" % (fmt(self.start_ms), fmt(self.end_ms))

    @property
    def label(self) -> str:
        start, end = _iso(self.start_ms), _iso(self.end_ms)
        if start[:11] == end[:11]:  # same day: 2024-05-01T12:00Z..13:00Z
            end = end[11:]
        return "%s..%s" % (start, end)

    def overlaps(self, lo: int, hi: int) -> bool:
        return self.start_ms < hi and lo < self.end_ms

    @staticmethod
    def from_name(name: str) -> Optional["Partition"]:
        match = re.fullmatch(r"(\d{8}T\d{6}Z)-(\d{8}T\d{6}Z)", name)
        if not match:
            return None
        parse = lambda s: int(dt.datetime.strptime(s, "%Y%m%dT%H%M%SZ").replace(  # noqa: E731
            tzinfo=dt.timezone.utc).timestamp() * 1000)
        return Partition(parse(match.group(1)), parse(match.group(2)))


def plan_partitions(start_ms: int, end_ms: int, chunk_ms: int) -> List[Partition]:
    """Epoch-aligned chunks covering ``[start_ms, end_ms)``, the edge ones clipped."""
    out, t = [], (start_ms // chunk_ms) * chunk_ms
    while t < end_ms:
        out.append(Partition(max(t, start_ms), min(t + chunk_ms, end_ms)))
        t += chunk_ms
    return out


def margin_ms(policy: str, max_gap_s: float, links: Optional[Sequence[dict]],
              window_ms: int) -> int:
    """How far from ``[s, e)`` a partition's matching must see detections
    (:func:`transforms.matching.context_margin_ms`, the rule every chunked matching
    shares)."""
    from transforms.match_blocks import POLICIES, CandidateBands
    from transforms.matching import context_margin_ms

    if policy not in POLICIES:
        # 'learned' fits its score to all the data of a job: per partition it would learn
        # another model, and no margin makes that equal to one job over the range.
        raise UsageError("backfill cannot split --policy %s by partition (only all, topk, "
                         "mutual and assignment have a bounded reach); pass one of those, "
                         "or match the backfill's detections with 'cctview match'" % policy)
    return context_margin_ms(policy, CandidateBands(max_gap_s, links), window_ms)


def context_of(partition: Partition, margin_ms: int, start_ms: int, end_ms: int):
    """The detections a partition's matching reads: ``[s - M, e + M)`` within the range."""
    return (max(start_ms, partition.start_ms - margin_ms),
            min(end_ms, partition.end_ms + margin_ms))


# ------------------------------------------------------------------ the output folder
class Store:
    """Paths, markers and commits under ``DIR`` (any Beam filesystem)."""

    def __init__(self, output: str):
        from apache_beam.io.filesystems import FileSystems

        self.fs = FileSystems
        # Local paths are made absolute: listings return absolute paths, and a commit
        # cuts the temporary folder's prefix off them.
        self.root = output.rstrip("/") if "://" in output else os.path.abspath(output)

    def join(self, *parts: str) -> str:
        return "/".join([self.root] + [p.strip("/") for p in parts])

    def tmp(self, p: Partition) -> str:
        return self.join(TMP_DIR, p.name)

    def marker(self, p: Partition, kind: str) -> str:
        return self.join(STATE_DIR, p.name, kind)

    # -- small files
    def read_json(self, path: str) -> Optional[dict]:
        try:
            with self.fs.open(path) as handle:
                return json.loads(handle.read().decode("utf-8"))
        except Exception:  # missing, or cut short by a kill: the same as absent
            return None

    def write_json(self, path: str, value: dict) -> None:
        """Writes then renames, so a reader sees the whole file or none (local disks too)."""
        staging = "%s.%s.inprogress" % (path, uuid.uuid4().hex[:8])
        with self.fs.create(staging) as handle:
            handle.write(json.dumps(value, indent=1, sort_keys=True).encode("utf-8"))
        self.fs.rename([staging], [path])

    def delete(self, paths: Iterable[str]) -> None:
        for path in paths:
            try:
                self.fs.delete([path])
            except Exception:  # already gone
                pass

    def delete_tree(self, folder: str) -> None:
        """Deletes a folder and all under it (object stores want the trailing slash)."""
        self.delete([folder.rstrip("/") + ("/" if "://" in folder else "")])

    def list(self, pattern: str) -> List[str]:
        try:
            return sorted(m.path for m in self.fs.match([pattern])[0].metadata_list)
        except Exception:  # a missing folder lists nothing
            return []

    def _mkdirs(self, folder: str) -> None:
        try:
            self.fs.mkdirs(folder)
        except Exception:  # exists (local), or object stores, which need none
            pass

    # -- committed files of a partition
    def hour_folders(self, p: Partition) -> List[str]:
        hours, t = [], (p.start_ms // 3600000) * 3600000
        while t < p.end_ms:
            hours.append(dt.datetime.fromtimestamp(t / 1000.0, tz=dt.timezone.utc)
                         .strftime("date=%Y-%m-%d/hour=%H"))
            t += 3600000
        return hours

    def committed(self, p: Partition, tables: Sequence[str]) -> List[str]:
        """Every file of ``p`` in ``tables``: a prefix listing of its own hour folders."""
        found = []
        for table in tables:
            if table == "dead_letter":
                found += self.list(self.join(table, "%s-*" % p.name))
            else:
                for hour in self.hour_folders(p):
                    found += self.list(self.join(table, hour, "%s-*" % p.name))
        return found

    def clear(self, p: Partition, tables: Sequence[str], marker: str) -> None:
        """Removes ``p``'s marker, then its files: the order keeps a crash safe."""
        self.delete([self.marker(p, marker)])
        self.delete(self.committed(p, tables))
        self.delete(self.list(self.join(STATE_DIR, p.name, "*.inprogress")))

    def commit(self, p: Partition, tables: Sequence[str]) -> List[str]:
        """Moves ``p``'s files from ``_tmp/<P>/<table>/...`` into the tables; -> new paths."""
        sources, targets = [], []
        for table in tables:
            prefix = self.join(TMP_DIR, p.name, table) + "/"
            for path in self.list(prefix + "**"):
                relative = path[len(prefix):]
                folder, _, base = relative.rpartition("/")
                target = self.join(table, folder, "%s-%s" % (p.name, base)) if folder \
                    else self.join(table, "%s-%s" % (p.name, base))
                sources.append(path)
                targets.append(target)
        for folder in sorted({t.rsplit("/", 1)[0] for t in targets}):
            self._mkdirs(folder)
        if sources:
            self.fs.rename(sources, targets)
        return targets


# ------------------------------------------------------------------ flags
def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="cctview backfill",
        description="Resumable, partition-by-partition 'cctview run' over a time range: "
                    "each partition is committed on its own (DIR/_backfill/<P>/_SUCCESS) "
                    "and a re-run skips committed partitions. Matches across partition "
                    "boundaries are computed from the stored detections of the "
                    "neighbouring partitions, so none are lost or doubled.",
        epilog="Every other flag of 'cctview run' (--detector, --embedder, --max-gap, "
               "--policy, --links, --timezone, ...) and any standard Beam pipeline "
               "option (--runner, --runner_preset, --project, ...) is passed to each "
               "partition's job.")
    parser.add_argument("--input", nargs="+", required=True, metavar="ROOT",
                        help="Frame root(s) in the CCTView layout (local or Beam URI).")
    parser.add_argument("--start", required=True, metavar="ISO",
                        help="First capture time (ISO-8601; naive = --timezone).")
    parser.add_argument("--end", required=True, metavar="ISO",
                        help="Capture time to stop before (exclusive).")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="Output folder: detections/, matches/, dead_letter/ tables "
                             "plus the backfill's state in _backfill/.")
    parser.add_argument("--chunk", default="1h",
                        help="Partition length: 15m, 1h, 6h, 1d, ... (default 1h).")
    parser.add_argument("--progress-every", dest="progress_every", type=float, default=10.0,
                        metavar="S", help="Seconds between progress lines while a job "
                                          "runs (default 10; --quiet: none).")
    return parser


def _option_dests(cls) -> List[str]:
    return [a.dest for a in add_option_args(argparse.ArgumentParser(add_help=False),
                                            (cls,))._actions]


def _settings(options, classes, extra: Optional[dict] = None) -> dict:
    values = options.get_all_options()
    out = {}
    for cls in classes:
        for dest in _option_dests(cls):
            if dest not in _NOT_FINGERPRINTED:
                out[dest] = values.get(dest)
    out.update(extra or {})
    return json.loads(json.dumps(out, sort_keys=True, default=str))


@dataclass
class Config:
    roots: List[str]
    start_ms: int
    end_ms: int
    chunk_ms: int
    output: str
    passthrough: List[str]
    progress_every: float
    dry_run: bool


def parse_args(argv: Sequence[str]):
    """-> (Config, PipelineOptions of the per-partition jobs); UsageError if unusable."""
    from pipelines.options import TimeZoneOptions
    from transforms.layout import optional_range

    argv = expand_preset(list(argv))
    args, passthrough = _parser().parse_known_args(argv)
    chunk_ms = parse_chunk(args.chunk)
    # Validate every other flag exactly as 'cctview run' would (unknown flags, values).
    options = parse("run", commands.RUN, ["--input"] + args.input + ["--output", args.output]
                    + passthrough)
    timezone = options.view_as(TimeZoneOptions).timezone
    try:
        start_ms, end_ms = optional_range(args.start, args.end, timezone)
    except Exception as exc:  # bad ISO text or time zone
        raise UsageError(str(exc))
    config = Config(list(args.input), start_ms, end_ms, chunk_ms, args.output.rstrip("/"),
                    passthrough, args.progress_every,
                    bool(options.get_all_options().get("dry_run")))
    return config, options


# ------------------------------------------------------------------ one job
def _hour_of(path: str) -> Optional[Tuple[int, int]]:
    """``.../date=D/hour=H/...`` -> the hour's [start, end) in ms; None if not there."""
    match = re.search(r"date=(\d{4}-\d{2}-\d{2})/hour=(\d{2})", path)
    if not match:
        return None
    start = dt.datetime.strptime("%s %s" % match.groups(), "%Y-%m-%d %H").replace(
        tzinfo=dt.timezone.utc)
    ms = int(start.timestamp() * 1000)
    return ms, ms + 3600000


def _parse_failure_owner(uri: str, timezone: str, plan: List[Partition]) -> Partition:
    """The partition that keeps the dead letter of a file whose path has no capture time.

    With ``--start/--end`` every partition lists the hour folders it overlaps, so a
    stray file in an hour folder is seen by every partition of that hour (and, with a
    regex layout, by all of them). Only one keeps it: the partition holding the start
    of the folder's hour (read from ``<camera>/YYYY/MM/DD/HH/`` in camera-local time),
    else the first of the plan.
    """
    from zoneinfo import ZoneInfo

    match = re.search(r"/(\d{4})/(\d{2})/(\d{2})/(\d{2})/", uri.replace("\\", "/"))
    if match:
        try:
            local = dt.datetime(*map(int, match.groups()), tzinfo=ZoneInfo(timezone))
            ms = max(plan[0].start_ms, int(local.timestamp() * 1000))
            for p in plan:
                if p.start_ms <= ms < p.end_ms:
                    return p
        except ValueError:
            pass
    return plan[0]


# The three predicates below carry no type hints on purpose: Beam checks hints against
# the inferred element types, and a Flatten of ReadFrames' tagged outputs infers a Union.
def _keep_dead_letter(record, partition, timezone, plan):
    if record.get("stage") != "parse":
        return True
    return _parse_failure_owner(record["uri"], timezone, plan) == partition


def _in_range(det, lo, hi):
    return lo <= int(det["frame_ts_ms"]) < hi


def _owned(match, lo, hi):
    return lo <= int(match["frame_ts_a_ms"]) < hi


class _WriteTable(beam.PTransform):
    """``outputs.write`` as a composite, so that one job can write a table several times."""

    def __init__(self, output: str, table: str, shards: int):
        super().__init__()
        self._args = (output, table, shards)

    def expand(self, pcoll):
        from pipelines import outputs

        output, table, shards = self._args
        return outputs.write(pcoll, output, table, shards)


class Backfill:
    """Plans, runs and commits the jobs of one ``cctview backfill`` invocation.

    ``links`` and ``links_sha256``: the ``--links`` file's links and digest (None
    without one), read by :meth:`from_options`; the constructor reads nothing."""

    @classmethod
    def from_options(cls, config: Config, options, say=print) -> "Backfill":
        """The backfill of ``config`` and ``options``, with the ``--links`` file read."""
        from apache_beam.io.filesystems import FileSystems

        from pipelines.options import MatchOptions
        from pipelines.stages import read_links

        uri = options.view_as(MatchOptions).links
        links, digest = read_links(uri), None  # read_links: a UsageError if unreadable
        if uri:
            with FileSystems.open(uri) as handle:
                digest = hashlib.sha256(handle.read()).hexdigest()
        return cls(config, options, links, digest, say)

    def __init__(self, config: Config, options, links: Optional[List[dict]] = None,
                 links_sha256: Optional[str] = None, say=print):
        from pipelines.options import (CandidateOptions, FrameInputOptions, MatchOptions,
                                       ModelOptions, OutputOptions, TimeZoneOptions)
        from pipelines.stages import policy_of
        from transforms.match_blocks import window_ms_of

        self.config = config
        self.options = options
        self.say = say
        self.store = Store(config.output)
        self.plan = plan_partitions(config.start_ms, config.end_ms, config.chunk_ms)
        self.timezone = options.view_as(TimeZoneOptions).timezone
        self.layout = options.view_as(FrameInputOptions).layout
        self.max_pixels = options.view_as(FrameInputOptions).max_pixels
        self.shards = options.view_as(OutputOptions).shards
        candidates = options.view_as(CandidateOptions)
        self.links = links
        policy = policy_of(options)
        self.margin_ms = margin_ms(policy, candidates.max_gap, self.links,
                                   window_ms_of(candidates.window))
        self.extract_settings = _settings(
            options, (FrameInputOptions, TimeZoneOptions, ModelOptions),
            {"input": [r.rstrip("/") for r in config.roots], "chunk_ms": config.chunk_ms})
        self.match_settings = _settings(options, (CandidateOptions, MatchOptions),
                                        {"links_sha256": links_sha256, "policy": policy})
        self.model_options = options.view_as(ModelOptions)
        self.quiet = bool(options.get_all_options().get("quiet"))
        self.watch = None  # the progress line, while run() runs
        self._detect = None
        self._match = None
        self.extracted: Dict[str, str] = {}   # partition name -> commit id
        self.extract_markers: Dict[str, dict] = {}  # partition name -> _EXTRACTED marker
        self.done: Dict[str, dict] = {}       # partition name -> _SUCCESS marker
        self.totals: Dict[str, int] = {}
        self.job_seconds: List[float] = []

    # -- state
    def context(self, p: Partition):
        return context_of(p, self.margin_ms, self.config.start_ms, self.config.end_ms)

    def deps(self, p: Partition) -> List[Partition]:
        lo, hi = self.context(p)
        return [q for q in self.plan if q.overlaps(lo, hi)]

    def _match_marker_valid(self, p: Partition, marker: Optional[dict]) -> bool:
        if not marker:
            return False
        lo, hi = self.context(p)
        wanted = {q.name: self.extracted.get(q.name) for q in self.deps(p)}
        return (marker.get("context_ms") == [lo, hi]
                and marker.get("match_settings") == self.match_settings
                and marker.get("extracts") == wanted)

    def check_output(self) -> None:
        """Refuses an output that holds other outputs or another backfill's settings."""
        from pipelines import outputs

        state_path = self.store.join(STATE_DIR, STATE_FILE)
        state = self.store.read_json(state_path)
        if state is None:
            outputs.check_writable(self.config.output)
            if any(self.store.list(self.store.join(t, "**")) for t in
                   EXTRACT_TABLES + MATCH_TABLES):
                raise UsageError("--output %s already holds tables that no backfill made; "
                                 "use an empty folder" % self.config.output)
            if not self.config.dry_run:
                self.store.write_json(state_path, {"version": 1,
                                                   "extract_settings": self.extract_settings})
            return
        if state.get("extract_settings") != self.extract_settings:
            old, new = state.get("extract_settings") or {}, self.extract_settings
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UsageError("--output %s was backfilled with other %s; use another --output"
                             % (self.config.output, ", ".join(diff)))
        planned = {p.name for p in self.plan}
        for folder in self.store.list(self.store.join(STATE_DIR, "*", "*")):
            other = Partition.from_name(folder.rstrip("/").split("/")[-2])
            if other and other.name not in planned and any(
                    p.overlaps(other.start_ms, other.end_ms) for p in self.plan):
                raise UsageError("--output %s holds partition %s, which overlaps this plan "
                                 "with other bounds; use the same --start alignment or "
                                 "another --output" % (self.config.output, other.label))

    def load_state(self) -> None:
        """Reads the markers of the plan's partitions (in parallel: object stores)."""
        paths = [(p, kind, self.store.marker(p, kind))
                 for p in self.plan for kind in (EXTRACTED, SUCCESS)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            markers = list(pool.map(lambda item: self.store.read_json(item[2]), paths))
        success = {}
        for (p, kind, _), marker in zip(paths, markers):
            if marker is None:
                continue
            if kind == EXTRACTED:
                self.extracted[p.name] = marker["commit_id"]
                self.extract_markers[p.name] = marker
            else:
                success[p.name] = marker
        for p in self.plan:
            if self._match_marker_valid(p, success.get(p.name)):
                self.done[p.name] = success[p.name]

    def next_job(self, extracted=None, done=None):
        """-> (partition to extract or None, partitions to match: a list, maybe empty).

        A job extracts the first partition not yet extracted and matches every
        incomplete partition whose context is then extracted (at most
        ``MAX_MATCHES_PER_JOB``): one in the steady state, the trailing ones together
        at the end, all of them after new match settings.
        """
        extracted = self.extracted if extracted is None else extracted
        done = self.done if done is None else done
        extract = next((p for p in self.plan if p.name not in extracted), None)
        ready = set(extracted) | ({extract.name} if extract else set())
        match = [p for p in self.plan if p.name not in done
                 and all(q.name in ready for q in self.deps(p))]
        return extract, match[:MAX_MATCHES_PER_JOB]

    def jobs_left(self) -> int:
        extracted, done, jobs = dict(self.extracted), dict(self.done), 0
        while True:
            extract, match = self.next_job(extracted, done)
            if extract is None and not match:
                return jobs
            jobs += 1
            if extract:
                extracted[extract.name] = "planned"
            done.update((p.name, {}) for p in match)

    # -- the job
    def _stages(self):
        from pipelines.stages import detect_stage, match_stage

        if self._detect is None:
            self._detect = detect_stage(self.model_options)
            self._match = match_stage(self.options)
        return self._detect, self._match

    def _job_options(self, index: int):
        from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

        options = PipelineOptions(list(self.config.passthrough))
        name = options.view_as(GoogleCloudOptions).job_name
        if name:  # Dataflow job names must differ between the backfill's jobs
            options.view_as(GoogleCloudOptions).job_name = "%s-%04d" % (name, index)
        return options

    def _stored_detections(self, partitions: Sequence[Partition], lo: int, hi: int):
        """Committed detection files of ``partitions`` whose hour overlaps ``[lo, hi)``.

        Taken from the partitions' ``_EXTRACTED`` markers, which list exactly what was
        committed: no listing of the (possibly huge) detections table.
        """
        files = []
        for q in partitions:
            for path in self.extract_markers[q.name]["files"]:
                if "/detections/" not in path:
                    continue
                hour = _hour_of(path)
                if hour is None or (hour[0] < hi and lo < hour[1]):
                    files.append(path)
        return files

    def build(self, extract: Optional[Partition], match: Sequence[Partition], index: int):
        """The Beam job: extract ``extract``, match the partitions in ``match``.

        Matching runs once over the union of the targets' contexts (more detections
        than a target needs change none of its pairs: see the margin rule) and each
        target keeps the pairs it owns. None when there is nothing to run.
        """
        from pipelines import outputs
        from transforms.detections_io import ReadDetections
        from transforms.frames import DEAD_LETTER, ReadFrames
        from transforms.inference import detect_read_frames
        from transforms.layout import FrameLayout

        detect, matcher = self._stages()
        pipeline = beam.Pipeline(options=self._job_options(index))
        found, work = None, False
        if extract is not None:
            tmp = self.store.tmp(extract)
            outputs.prepare(tmp, EXTRACT_TABLES)
            read = pipeline | "ReadFrames" >> ReadFrames(
                self.config.roots, FrameLayout(self.layout, self.timezone),
                extract.start_ms, extract.end_ms, max_pixels=self.max_pixels,
                pipeline_options=self.options)
            found = detect_read_frames(read, detect)
            dead = ((read[DEAD_LETTER], found[DEAD_LETTER]) | "AllDeadLetters" >> beam.Flatten()
                    | "OneDeadLetterPerFile" >> beam.Filter(
                        _keep_dead_letter, extract, self.timezone, self.plan))
            outputs.write(found["detections"], tmp, "detections", self.shards)
            outputs.write(dead, tmp, "dead_letter", self.shards)
            work = True
        if match:
            contexts = [self.context(p) for p in match]
            lo, hi = min(c[0] for c in contexts), max(c[1] for c in contexts)
            stored = {q for p in match for q in self.deps(p) if q != extract}
            files = self._stored_detections(sorted(stored), lo, hi)
            sources = []
            if files:
                sources.append(pipeline | "ReadStoredDetections" >> ReadDetections(
                    files, self.timezone))
            if found is not None and extract.overlaps(lo, hi):
                sources.append(found["detections"])
            if sources:
                matches = (tuple(sources) | "Context" >> beam.Flatten()
                           | "InContext" >> beam.Filter(_in_range, lo, hi)
                           | "Match" >> matcher)
                for i, target in enumerate(match):
                    tmp = self.store.tmp(target)
                    outputs.prepare(tmp, MATCH_TABLES)
                    owned = matches | "Owned_%d" % i >> beam.Filter(
                        _owned, target.start_ms, target.end_ms)
                    # One composite per target keeps the table writers' labels unique.
                    owned | "Matches_%s" % target.name >> _WriteTable(tmp, "matches",
                                                                       self.shards)
                work = True
        return pipeline if work else None

    def _commit_extract(self, extract: Partition, counters: dict, seconds: float) -> str:
        files = self.store.commit(extract, EXTRACT_TABLES)
        commit_id = uuid.uuid4().hex
        marker = {"partition": extract.label, "commit_id": commit_id, "files": files,
                  "counters": counters, "seconds": round(seconds, 3)}
        self.store.write_json(self.store.marker(extract, EXTRACTED), marker)
        self.extracted[extract.name] = commit_id
        self.extract_markers[extract.name] = marker
        return "%s: frames=%d detections=%d dead_letters=%d" % (
            extract.label, counters.get("frames_listed", 0),
            counters.get("detections_rows_written", 0),
            counters.get("dead_letter_rows_written", 0))

    def _commit_match(self, target: Partition, seconds: float) -> str:
        import pyarrow.parquet as pq

        files = self.store.commit(target, MATCH_TABLES)
        rows = 0
        for path in files:  # counted per target (one job may match several)
            with self.store.fs.open(path) as handle:
                rows += pq.ParquetFile(handle).metadata.num_rows
        lo, hi = self.context(target)
        marker = {"partition": target.label, "context_ms": [lo, hi],
                  "match_settings": self.match_settings,
                  "extracts": {q.name: self.extracted[q.name] for q in self.deps(target)},
                  "files": files, "matches": rows, "seconds": round(seconds, 3)}
        self.store.write_json(self.store.marker(target, SUCCESS), marker)
        self.done[target.name] = marker
        return "%s done: matches=%d" % (target.label, rows)

    def run_job(self, extract, match, index: int, total: int) -> None:
        if extract is not None:
            self.store.clear(extract, EXTRACT_TABLES, EXTRACTED)
            self.store.delete([self.store.marker(extract, SUCCESS)])
        for target in match:
            self.store.clear(target, MATCH_TABLES, SUCCESS)
        started = time.time()
        if self.watch is not None:
            self.watch.start_job(self._job_label(extract, match, index, total),
                                 self._phases(extract, match))
        pipeline = self.build(extract, match, index)
        # No pipeline: partitions to match whose contexts hold no detections at all.
        counters = progress.run_job(pipeline, self.watch) if pipeline is not None else {}
        seconds = time.time() - started
        progress.add_counts(self.totals, counters)
        parts = []
        if extract is not None:
            parts.append(self._commit_extract(extract, counters, seconds))
        parts += [self._commit_match(target, seconds) for target in match]
        for p in {p for p in [extract] + list(match) if p is not None}:
            self.store.delete_tree(self.store.tmp(p))
        self.job_seconds.append(seconds)
        eta = sum(self.job_seconds) / len(self.job_seconds) * self.jobs_left()
        speed = ""
        if extract is not None:
            speed = ", %.1f frames/s" % (counters.get("frames_listed", 0) / max(seconds, 1e-9))
        if not self.quiet:
            self.say("[%d/%d] %s | %.1f s%s, ETA %s" % (
                index, total, " | ".join(parts), seconds, speed,
                dt.timedelta(seconds=round(eta))))

    @staticmethod
    def _job_label(extract, match, index: int, total: int) -> str:
        what = [("extract %s" % extract.label) if extract else ""]
        if match:
            what.append("match %s" % (match[0].label if len(match) == 1 else
                                      "%d partitions" % len(match)))
        return "backfill [%d/%d] %s" % (index, total, ", ".join(w for w in what if w))

    @staticmethod
    def _phases(extract, match):
        phases = (progress.FRAMES,) if extract is not None else ()
        return phases + ((progress.MATCHING,) if match else ())

    def run(self) -> int:
        with progress.Progress(self.options, "backfill", (), self.config.progress_every,
                               quiet=self.quiet) as self.watch:
            return self._run()

    def _run(self) -> int:
        self.check_output()
        self.load_state()
        total = self.jobs_left()
        complete = sum(1 for p in self.plan if p.name in self.done)
        self.say("backfill %s..%s in %d partition(s) of %s: %d complete, %d extracted, "
                 "%d job(s) to run; matching context +-%.0f s" % (
                     _iso(self.config.start_ms), _iso(self.config.end_ms), len(self.plan),
                     dt.timedelta(milliseconds=self.config.chunk_ms), complete,
                     sum(1 for p in self.plan if p.name in self.extracted) - complete,
                     total, self.margin_ms / 1000.0))
        if self.config.dry_run:
            # Build the first job; only runners that honour --dry_run (Dataflow) get it,
            # the DirectRunner would execute it.
            from apache_beam.options.pipeline_options import StandardOptions

            extract, match = self.next_job()
            pipeline = self.build(extract, match, 1) if (extract or match) else None
            if pipeline is not None:
                pipeline.to_runner_api()
                if "Dataflow" in str(self.options.view_as(StandardOptions).runner or ""):
                    pipeline.run().wait_until_finish()
            self.say("dry run: job 1 of %d built, nothing executed or committed" % total)
            return 0
        started, index = time.time(), 0
        while True:
            extract, match = self.next_job()
            if extract is None and not match:
                break
            index += 1
            try:
                self.run_job(extract, match, index, total)
            except UsageError:
                raise
            except Exception as exc:
                traceback.print_exc()
                what = ", ".join(p.label for p in [extract] + list(match) if p)
                raise JobFailed("job for %s failed (%s: %s); run the same command again "
                                "to resume" % (what, type(exc).__name__,
                                               str(exc).splitlines()[0] if str(exc) else ""))
        self._ensure_tables()
        if not self.store.list(self.store.join(TMP_DIR, "**")):
            self.store.delete_tree(self.store.join(TMP_DIR))
        self._summary(time.time() - started, index)
        return 0

    def _ensure_tables(self) -> None:
        from pipelines import outputs
        from transforms import parquet_io

        for table in EXTRACT_TABLES + MATCH_TABLES:
            markers = self.extract_markers if table in EXTRACT_TABLES else self.done
            if not any("/%s/" % table in path for marker in markers.values()
                       for path in marker.get("files", ())):
                parquet_io.ensure_table(outputs.table_dir(self.config.output, table),
                                        outputs.TABLES[table][0])

    def _summary(self, seconds: float, jobs: int) -> None:
        matches = sum(m.get("matches", 0) for m in self.done.values())
        self.say("backfill done: %d partition(s), %d job(s) in %.1f s; %d matches in the "
                 "range -> %s" % (len(self.plan), jobs, seconds, matches, self.config.output))
        accounting = progress.frame_accounting(self.totals, backfill=True)
        if accounting:
            self.say(accounting)
        names = [n for n in _SUMMARY_FIRST if n in self.totals]
        names += sorted(n for n in self.totals if n not in names)
        self.say("counters (summed over this run's jobs): %s" % (
            ", ".join("%s=%d" % (n, self.totals[n]) for n in names) or "none (no job ran)"))


def run(parsed) -> int:
    """``cctview backfill``: runs the (Config, PipelineOptions) of :func:`parse_args`."""
    config, options = parsed
    return Backfill.from_options(config, options,
                                 say=lambda line: print(line, flush=True)).run()


COMMAND = Command(
    "resumable, partition-by-partition run over a time range (--chunk 1h)",
    (), run, parse=parse_args)
