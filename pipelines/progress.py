"""The progress line a command prints on stderr while its jobs run, and the end counts.

About every ``--progress-every``/``CCTVIEW_PROGRESS_INTERVAL`` seconds (10 by default)
``extract``, ``run``, ``match``, ``calibrate``, ``evaluate`` and ``backfill`` print one
line: for each phase of the job, items done of the listed total, and for the phase
under way its rate and ETA::

    run: frames 412/1,058 (39%), 8.1/s, ETA 1m20s | matching not started

``--quiet`` silences these lines (the final counters are still printed).

Where the counts come from: the workers' counters tick to a UDP receiver this module
opens before the pipeline is built (:mod:`transforms.progress`), on 127.0.0.1 for the
DirectRunner (all its modes run on this machine) and, for the Dask runner, on this
machine's address on the route to the scheduler (the workers must be able to send UDP
datagrams to it, as to any client of theirs; without that the line shows no counts).
For other runners (Dataflow, portable runners) no receiver is opened: their
``run()`` returns while the job runs and ``PipelineResult.metrics()`` is polled
instead. Each phase is a pair of counter formulas (:class:`Phase`), evaluated the same
way on ticks and on polled metrics.

A phase's total is what was listed or read so far: frames are decoded only after the
whole listing (``ReadFrames``' de-duplication is a GroupByKey, a barrier in batch), and
matching starts after every detection is batched (its blocks are a GroupByKey), so a
phase's total is final once its first items are done. The rate is measured from the
first poll that saw the phase moving.

:func:`frame_accounting` turns the end counters into a sentence that says what
happened to every listed file.
"""
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from transforms import progress as ticks

__all__ = ["DEFAULT_INTERVAL_S", "EXTRACT", "MATCH", "Phase", "Progress", "RUN",
           "add_counts", "counter_totals", "format_line", "frame_accounting", "interval_s", "run_job"]

DEFAULT_INTERVAL_S = 10.0
INTERVAL_ENV = "CCTVIEW_PROGRESS_INTERVAL"


@dataclass(frozen=True)
class Phase:
    """One phase of a job: ``done`` and ``total`` are sums of counters (or ``total`` is
    given by the driver, from file metadata, through ``Progress.start_job(known=...)``);
    ``skipped`` counters are taken off the total (items listed that are no work, such as
    files outside the time range, so that they do not inflate the rate)."""
    name: str
    unit: str
    done: Tuple[str, ...]
    total: Tuple[str, ...] = ()
    skipped: Tuple[str, ...] = ()


# Every listed file ends as one of these: outside the range (skipped), dead-lettered
# (listing, decoding), inferred or failed in inference (then dead-lettered too).
FRAMES = Phase("frames", "frames",
               done=("frames_dead_lettered", "frames_inferred", "frames_inference_failed"),
               total=("objects_listed",), skipped=("files_outside_range",))
# transforms.matching: every batched detection is counted once when its own block is
# computed (or at once, when no block needs it as a query or reference there).
MATCHING = Phase("matching", "detections", done=("detections_computed",),
                 total=("detections_batched",))
READING = Phase("reading", "detections", done=("detections_read",))

EXTRACT = (FRAMES,)
RUN = (FRAMES, MATCHING)
MATCH = (READING, MATCHING)


def interval_s(configured: Optional[float] = None) -> float:
    """Seconds between progress lines: ``CCTVIEW_PROGRESS_INTERVAL`` if set (tests),
    else ``configured``, else 10."""
    text = os.environ.get(INTERVAL_ENV)
    if text:
        try:
            return max(float(text), 0.05)
        except ValueError:
            pass
    return float(configured) if configured else DEFAULT_INTERVAL_S


def _duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    hours, rest = divmod(seconds, 3600)
    return "%dh%02dm" % (hours, rest // 60)


def _sum(counts: Dict[str, int], names: Sequence[str]) -> int:
    return sum(int(counts.get(n, 0)) for n in names)


def _total(phase: Phase, counts: Dict[str, int], known: Dict[str, int]) -> int:
    """A phase's items to do: its total counters or the driver's known total, less the
    skipped ones."""
    return max(_sum(counts, phase.total), known.get(phase.name, 0)) - _sum(counts, phase.skipped)


def format_line(label: str, phases: Sequence[Phase], counts: Dict[str, int],
                known: Dict[str, int], rates: Dict[str, Optional[float]]) -> str:
    """``label: phase done/total unit (pct), rate/s, ETA t | next phase ...``.

    The phase under way is the first one not complete; it gets the rate and ETA (when
    its rate is known), the phases after it only their counts."""
    parts, current = [], None
    done_of = [_sum(counts, p.done) for p in phases]
    for i, phase in enumerate(phases):
        done = done_of[i]
        total = _total(phase, counts, known)
        if any(done_of[i + 1:]):  # a later phase is under way: this one is complete
            total = done
        unit = "" if phase.unit == phase.name else " " + phase.unit
        if total < done:  # no total known (a command that lists nothing ahead)
            total = 0
            text = "%s %s%s" % (phase.name, "{:,}".format(done), unit)
        else:
            text = "%s %s/%s%s" % (phase.name, "{:,}".format(done), "{:,}".format(total), unit)
        if total:
            text += " (%d%%)" % min(100, 100 * done // total)
        elif not done and current is not None:  # a later phase with nothing yet
            text = "%s not started" % phase.name
        if current is None and (not total or done < total):
            current = phase
            rate = rates.get(phase.name)
            if rate:
                text += ", %s/s" % ("{:,.1f}".format(rate))
                if total:
                    text += ", ETA %s" % _duration((total - done) / rate)
            elif not done:
                text += ", starting" if total else ", listing"
        parts.append(text)
    if phases and current is None:
        parts[-1] += ", writing outputs"
    return "%s: %s" % (label, " | ".join(parts))


class _Receiver:
    """The UDP socket the workers' counters tick to; sums the latest counts per sender."""

    def __init__(self, host: str):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((host, 0))
        self.socket.settimeout(0.2)
        self.channel = ticks.open_channel(host, self.socket.getsockname()[1])
        self.latest: Dict[str, Dict[str, int]] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="cctview-progress-receiver",
                                       daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                data = self.socket.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                message = json.loads(data.decode("utf-8"))
            except ValueError:
                continue
            if message.get("t") != self.channel[2]:
                continue
            with self.lock:
                seen = self.latest.setdefault(str(message.get("s")), {})
                for name, value in (message.get("c") or {}).items():
                    seen[name] = max(seen.get(name, 0), int(value))  # reordered datagrams

    def totals(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        with self.lock:
            for counts in self.latest.values():
                for name, value in counts.items():
                    out[name] = out.get(name, 0) + value
        return out

    def close(self) -> None:
        ticks.close_channel()
        self.stopped.set()
        self.thread.join(timeout=1.0)
        self.socket.close()


def _local_runner(runner: str) -> bool:
    name = runner.rsplit(".", 1)[-1].lower()
    return name in ("", "direct", "directrunner", "switchingdirectrunner",
                    "bundlebaseddirectrunner", "fnapirunner", "inprocessrunner")


def receiver_host(options) -> Optional[str]:
    """Where the workers of ``options``' runner can send ticks: 127.0.0.1 for the
    DirectRunner, this machine's address towards the scheduler for Dask, None for other
    runners (they are polled for metrics instead)."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    runner = runner if isinstance(runner, str) else type(runner).__name__ if runner else ""
    if _local_runner(runner):
        return "127.0.0.1"
    if "Dask" not in runner:
        return None
    try:
        from apache_beam.runners.dask.dask_runner import DaskOptions

        address = str(options.view_as(DaskOptions).address or "")
    except ImportError:  # no dask extra: the runner itself will say so
        address = ""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host.strip("[]"), int(port or 8786)))  # no packet is sent
        return probe.getsockname()[0]
    except (OSError, ValueError):
        return "0.0.0.0"
    finally:
        probe.close()


class Progress:
    """A command's progress reporter: a context manager to open *before* the pipeline is
    built (its DoFns' counters then tick to it) and keep open while its jobs run.

    ``start_job(label, phases, known)`` begins the line of one job (a chunk, a
    partition); ``attach(result)`` lets it poll an asynchronous runner's metrics.
    Lines go to ``stream`` every ``interval`` seconds; ``quiet`` prints none (the
    counters still tick: nothing else changes).
    """

    def __init__(self, options=None, label: str = "", phases: Sequence[Phase] = (),
                 interval: Optional[float] = None, quiet: bool = False, stream=None,
                 clock: Callable[[], float] = time.monotonic):
        self.options = options
        self.interval = interval_s(interval)
        self.quiet = quiet
        self.stream = stream
        self.clock = clock
        self.receiver: Optional[_Receiver] = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.lines: List[str] = []
        self._job(label, phases, {})

    # -- life cycle
    def __enter__(self) -> "Progress":
        host = receiver_host(self.options) if self.options is not None else "127.0.0.1"
        if host is not None:
            try:
                self.receiver = _Receiver(host)
            except OSError:  # no socket here: the line will poll metrics only
                self.receiver = None
        if not self.quiet:
            self.thread = threading.Thread(target=self._loop, name="cctview-progress-line",
                                           daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=2.0)
        if self.receiver is not None:
            self.receiver.close()

    # -- jobs
    def _job(self, label: str, phases: Sequence[Phase], known: Dict[str, int]) -> None:
        self.label, self.phases, self.known = label, tuple(phases), dict(known)
        self.result = None
        self.started = self.clock()
        self.baseline = self.receiver.totals() if getattr(self, "receiver", None) else {}
        self.first_seen: Dict[str, Tuple[float, int]] = {}
        self.began: Dict[str, float] = {}

    def start_job(self, label: str, phases: Sequence[Phase],
                  known: Optional[Dict[str, int]] = None) -> None:
        """The line now shows this job: counts from here on, ``known`` phase totals."""
        with self.lock:
            self._job(label, phases, known or {})

    def attach(self, result) -> None:
        """The job's PipelineResult: polled for metrics where no receiver is open."""
        with self.lock:
            self.result = result

    # -- the line
    def counts(self) -> Dict[str, int]:
        """This job's counts so far: ticks since ``start_job`` (and polled metrics)."""
        out: Dict[str, int] = {}
        if self.receiver is not None:
            now = self.receiver.totals()
            out = {k: v - self.baseline.get(k, 0) for k, v in now.items()}
        elif self.result is not None:
            for name, value in counter_totals(self.result, running=True).items():
                out[name] = max(out.get(name, 0), value)
        return out

    def finish(self, totals: Dict[str, int]) -> None:
        """Prints the job's last line from its final counters (``totals``, Beam's own):
        a job shorter than a tick, or whose last ticks are still in flight, still ends
        on its real counts."""
        if not self.quiet:
            self._emit(self.line(totals))

    def _emit(self, text: str) -> None:
        self.lines.append(text)
        print(text, file=self.stream or sys.stderr, flush=True)

    def line(self, counts: Optional[Dict[str, int]] = None) -> str:
        """The line of the job so far, or of ``counts`` when given."""
        with self.lock:
            counts, now = (self.counts() if counts is None else counts), self.clock()
            rates: Dict[str, Optional[float]] = {}
            earlier_complete = True
            for i, phase in enumerate(self.phases):
                done, total = _sum(counts, phase.done), _total(phase, counts, self.known)
                if i and earlier_complete and done <= 0:
                    self.began.setdefault(phase.name, now)
                earlier_complete = earlier_complete and 0 < total <= done
                if done > 0:
                    rates[phase.name] = self._rate(phase.name, done, now)
            return format_line(self.label, self.phases, counts, self.known, rates)

    def _rate(self, name: str, done: int, now: float) -> Optional[float]:
        """Items per second of a phase. One that was seen waiting behind the phases
        before it (a barrier: matching starts when every detection is batched) counts
        from then: its counter moves in steps (a block of detections at a time), and the
        time between steps is part of its rate. Otherwise the rate counts from the first
        poll that saw it moving (model loading is not part of the frames' rate), or,
        with one sample, from the start of the job."""
        began = self.began.get(name)
        if began is not None and now > began:
            return done / (now - began)
        first = self.first_seen.setdefault(name, (now, done))
        if now - first[0] > 0 and done > first[1]:
            return (done - first[1]) / (now - first[0])
        if now > self.started:
            return done / (now - self.started)
        return None

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            self._emit(self.line())


def run_job(pipeline, watch: Optional["Progress"] = None) -> Dict[str, int]:
    """Runs ``pipeline`` to the end; -> its counters (:func:`counter_totals`).
    ``watch`` prints the job's line while it runs: from the workers' ticks, or (runners
    whose ``run()`` returns at once, e.g. Dataflow) from the job's metrics, polled.
    Raises when the job ends in any state but DONE."""
    from apache_beam.runners.runner import PipelineState

    result = pipeline.run()
    if watch is not None:
        watch.attach(result)
    state = result.wait_until_finish() or getattr(result, "state", PipelineState.DONE)
    if state not in (None, PipelineState.DONE, "DONE"):
        raise RuntimeError("pipeline ended in state %s" % state)
    totals = counter_totals(result)
    if watch is not None:
        watch.finish(totals)
    return totals


def add_counts(totals: Dict[str, int], counts: Dict[str, int]) -> Dict[str, int]:
    """Adds ``counts`` into ``totals`` name by name (the counters of a command's jobs,
    chunks or partitions, summed); -> ``totals``."""
    for name, value in counts.items():
        totals[name] = totals.get(name, 0) + value
    return totals


def counter_totals(result, running: bool = False) -> Dict[str, int]:
    """A job's counters summed by name over steps: committed values (attempted where a
    runner commits none); ``running``: attempted values of a job still running. {}
    where the runner has none (yet)."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # pylint: disable=broad-except  # not implemented, not started yet
        return {}
    totals: Dict[str, int] = {}
    for c in counters:
        first, second = (c.attempted, c.committed) if running else (c.committed, c.attempted)
        value = first if first is not None else second
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + int(value or 0)
    return totals


def _n(value: int) -> str:
    return "{:,}".format(int(value))


def frame_accounting(totals: Dict[str, int], backfill: bool = False) -> Optional[str]:
    """What happened to every listed file, as one sentence (None without frames).

    ``files_outside_range`` are files in the listed folders whose capture time lies
    outside ``--start/--end``: the CCTView layout lists whole hour folders. In a
    backfill every partition lists the hour folders it overlaps, so a file is listed
    by each partition of its hour and read only by the one that owns its time: the
    others count it here."""
    if "objects_listed" not in totals and "frames_listed" not in totals:
        return None
    listed = totals.get("frames_listed", 0)
    inferred = totals.get("frames_inferred", 0)
    failed = totals.get("frames_inference_failed", 0)
    dead = totals.get("frames_dead_lettered", 0)
    text = "frames: %s listed = %s inferred (%s with detections, %s without)" % (
        _n(listed), _n(inferred), _n(totals.get("frames_with_detections", 0)),
        _n(totals.get("frames_without_detections", 0)))
    text += " + %s dead-lettered before inference" % _n(dead)
    if failed:
        text += " + %s dead-lettered by a failed inference" % _n(failed)
    outside = totals.get("files_outside_range", 0)
    if outside:
        if backfill:
            text += ("; %s listings skipped a file that another partition reads (or that "
                     "lies outside --start/--end): partitions list whole hour folders, "
                     "each file is read by the one partition that owns its time"
                     % _n(outside))
        else:
            text += ("; %s files in the listed hour folders lie outside --start/--end "
                     "and were skipped" % _n(outside))
    unaccounted = listed - inferred - failed - dead
    if unaccounted:
        text += "; %s unaccounted for (a bug: please report it)" % _n(unaccounted)
    return text
