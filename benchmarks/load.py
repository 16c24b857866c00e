"""Load test: many synthetic frames through `cctview run` with the multi-process DirectRunner.

1. ``cctview synth`` renders a world (``--cameras`` x ``--minutes`` at one frame a
   second, with ground truth), unless ``--world`` names one already rendered;
2. ``cctview run`` with the classical backends (``background`` + ``color_histogram``,
   as ``cctview demo``) under ``--direct_running_mode multi_processing
   --direct_num_workers N``, in its own session under a time limit, while /proc is
   sampled for the RSS of the whole process tree (driver, SDK workers, the rest);
3. exact reconciliation of counts: frames on disk = ``frames_listed`` = frames with
   detections + frames without + dead letters; no duplicate ``detection_id``; every
   frame that has detections was inferred; detections against ground-truth boxes;
   no duplicate match pairs; every match refers to a written detection.

Prints a table and, with ``--record``, replaces the "## Load" section of BENCHMARKS.md.

  nice -n 19 .venv/bin/python benchmarks/load.py --cameras 28 --minutes 61 --record
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.proctree import tree_pids  # noqa: E402

CLI = REPO / ".venv" / "bin" / "cctview"
CLASSICAL = ["--detector", "background", "--embedder", "color_histogram"]
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# ----------------------------------------------------------------------------- memory
def _tree(root: int) -> dict:
    """{pid: command line} of root and its live descendants (from /proc)."""
    out = {}
    for pid in tree_pids(root):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                out[pid] = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
    return out


def _memory_kb(pid: int):
    """(current RSS, peak RSS = VmHWM) of one process in KiB, or None if it is gone."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _cpu_s(pid: int):
    """User + system CPU seconds of one process so far, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _role(pid: int, root: int, command: str) -> str:
    if pid == root:
        return "driver"
    if "sdk_worker_main" in command and not command.startswith("/bin/sh"):
        return "worker"
    return "other"


class TreeSampler:
    """Samples the RSS of a process tree; keeps the peak total and each process's peak."""

    def __init__(self, root: int):
        self.root = root
        self.peak_total_kb = 0
        self.peak_by_pid = {}  # pid -> (role, peak KiB)
        self.cpu_by_pid = {}  # pid -> last seen user + system CPU seconds
        self.samples = 0

    def sample(self) -> None:
        total = 0
        for pid, command in _tree(self.root).items():
            memory = _memory_kb(pid)
            if memory is None:
                continue
            rss, hwm = memory
            total += rss
            cpu = _cpu_s(pid)
            if cpu is not None:
                self.cpu_by_pid[pid] = cpu
            role = _role(pid, self.root, command)
            previous = self.peak_by_pid.get(pid, (role, 0))[1]
            self.peak_by_pid[pid] = (role, max(previous, rss, hwm))
        self.peak_total_kb = max(self.peak_total_kb, total)
        self.samples += 1

    def peaks(self, role: str) -> list:
        return sorted((kb for r, kb in self.peak_by_pid.values() if r == role), reverse=True)


def run_measured(command, log_path: Path, limit_s: float, interval_s: float = 0.5):
    """Runs ``command`` in its own session, sampling its tree's memory; -> dict."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        sampler = TreeSampler(process.pid)
        timed_out, usage = False, None
        while True:
            sampler.sample()
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() - started > limit_s:
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)  # its own session only
                process.wait()
                break
            time.sleep(interval_s)
        seconds = time.perf_counter() - started
    # CPU: the kernel's count for the command and the children it reaped, or (if the
    # workers were not reaped) the sum of the last samples of every process of the tree.
    sampled_cpu = sum(sampler.cpu_by_pid.values())
    cpu = max(usage.ru_utime + usage.ru_stime, sampled_cpu) if usage else sampled_cpu
    return {"returncode": process.returncode, "seconds": seconds, "timed_out": timed_out,
            "sampler": sampler, "cpu_seconds": cpu, "log": log_path.read_text(errors="replace")}


# ----------------------------------------------------------------------------- counts
def counters_from_stdout(text: str) -> dict:
    """The ``done: k=v, ... -> OUTPUT`` line every command prints -> {k: v}."""
    lines = [l for l in text.splitlines() if l.startswith("done: ")]
    if not lines:
        return {}
    body = lines[-1][len("done: "):].rsplit(" -> ", 1)[0]
    return {k: int(v) for k, v in (p.split("=", 1) for p in body.split(", ") if "=" in p)}


def frames_on_disk(frames_dir: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(frames_dir))


def reconcile(frames_dir: Path, out: Path, counters: dict, truth_path=None) -> dict:
    """Exact count reconciliation of one run's outputs; -> {"checks": [...], "numbers": {...}}.

    Reads only the id columns, so it is cheap on 100,000 frames.
    """
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    def table(name, columns):
        return ds.dataset(out / name, partitioning="hive", format="parquet").to_table(
            columns=columns)

    detections = table("detections", ["detection_id", "frame_uri", "camera_id"])
    matches = table("matches", ["detection_id_a", "detection_id_b", "camera_id_a",
                                "camera_id_b"])
    dead = table("dead_letter", ["uri", "stage", "reason"])
    ids = detections["detection_id"].to_pylist()
    uris = set(detections["frame_uri"].to_pylist())
    pairs = list(zip(matches["detection_id_a"].to_pylist(),
                     matches["detection_id_b"].to_pylist()))
    id_set, pair_set = set(ids), set(pairs)
    dead_uris = set(dead["uri"].to_pylist())
    on_disk = frames_on_disk(frames_dir)
    numbers = {
        "frames_on_disk": on_disk,
        "frames_listed": counters.get("frames_listed"),
        "frames_inferred": counters.get("frames_inferred"),
        "frames_with_detections": len(uris),
        "frames_without_detections": counters.get("frames_without_detections", 0),
        "dead_letters": dead.num_rows,
        "dead_letter_reasons": dict(Counter(dead["reason"].to_pylist())),
        "detections": len(ids),
        "distinct_detection_ids": len(id_set),
        "matches": len(pairs),
        "distinct_match_pairs": len(pair_set),
    }
    checks = [
        ("frames on disk == frames_listed", on_disk == counters.get("frames_listed")),
        ("frames_listed == with detections + without + dead letters",
         counters.get("frames_listed") == len(uris) + numbers["frames_without_detections"]
         + dead.num_rows),
        ("frames_with_detections counter == distinct frames in detections",
         counters.get("frames_with_detections", 0) == len(uris)),
        ("no frame both detected and dead-lettered", not (uris & dead_uris)),
        ("no duplicate dead letters", len(dead_uris) == dead.num_rows),
        ("detections counter == rows written", counters.get("detections") == len(ids)),
        ("no duplicate detection_id", len(id_set) == len(ids)),
        ("matches counter == rows written", counters.get("matches_emitted") == len(pairs)),
        ("no duplicate match pair", len(pair_set) == len(pairs)),
        ("no pair with itself reversed", not any((b, a) in pair_set for a, b in pairs)),
        ("every match refers to written detections",
         all(a in id_set and b in id_set for a, b in pairs)),
        ("camera_id_a < camera_id_b",
         all(a < b for a, b in zip(matches["camera_id_a"].to_pylist(),
                                    matches["camera_id_b"].to_pylist()))),
    ]
    if truth_path is not None and Path(truth_path).exists():
        truth = pq.read_table(truth_path, columns=["frame_uri", "visible_fraction"])
        visible = [f >= 0.5 for f in truth["visible_fraction"].to_pylist()]
        numbers["truth_boxes"] = truth.num_rows
        numbers["truth_boxes_half_visible"] = sum(visible)
        numbers["truth_frames_with_boxes"] = len(set(truth["frame_uri"].to_pylist()))
        numbers["detections_per_truth_box"] = round(len(ids) / max(truth.num_rows, 1), 3)
    return {"checks": checks, "numbers": numbers}


# ----------------------------------------------------------------------------- report
def _mib(kb: float) -> str:
    return "%.0f MiB" % (kb / 1024.0)


def report(result: dict) -> str:
    sampler, numbers = result["sampler"], result["reconciliation"]["numbers"]
    workers = sampler.peaks("worker")
    rows = [
        ("frames", "%d" % numbers["frames_on_disk"]),
        ("synth (s)", "%.0f" % result["synth_seconds"] if result.get("synth_seconds")
         else "(world given)"),
        ("run wall time (s)", "%.0f" % result["seconds"]),
        ("frames/s (whole run, incl. start-up and writes)",
         "%.1f" % (numbers["frames_on_disk"] / result["seconds"])),
        ("frames/s per worker", "%.1f" % (
            numbers["frames_on_disk"] / result["seconds"] / result["workers"])),
        ("CPU time of the process tree (s, user + system)", "%.0f" % result["cpu_seconds"]),
        ("frames per CPU-second (per core, independent of other load)",
         "%.1f" % (numbers["frames_on_disk"] / max(result["cpu_seconds"], 1e-9))),
        ("peak RSS, whole process tree", _mib(sampler.peak_total_kb)),
        ("peak RSS, driver (runner + buffers)", _mib(max(sampler.peaks("driver") or [0]))),
        ("peak RSS per SDK worker", ", ".join(_mib(kb) for kb in workers) or "none seen"),
        ("memory samples", "%d (every %.1f s)" % (sampler.samples, result["interval"])),
    ]
    for key in ("frames_listed", "frames_inferred", "frames_with_detections",
                "frames_without_detections", "dead_letters", "detections",
                "distinct_detection_ids", "truth_boxes", "truth_boxes_half_visible",
                "detections_per_truth_box", "matches", "distinct_match_pairs"):
        if key in numbers:
            rows.append((key, str(numbers[key])))
    if numbers.get("dead_letter_reasons"):
        rows.append(("dead letters by reason", json.dumps(numbers["dead_letter_reasons"])))
    table = ["| measure | value |", "| --- | --- |"] + ["| %s | %s |" % r for r in rows]
    checks = ["| check | result |", "| --- | --- |"] + [
        "| %s | %s |" % (name, "ok" if ok else "**FAILED**")
        for name, ok in result["reconciliation"]["checks"]]
    return "\n".join(table) + "\n\nReconciliation:\n\n" + "\n".join(checks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cameras", type=int, default=28)
    parser.add_argument("--minutes", type=float, default=61.0)
    parser.add_argument("--world", help="an already rendered `cctview synth` folder")
    parser.add_argument("--synth-seconds", type=float, dest="synth_seconds",
                        help="with --world: how long its synthesis took, for the table")
    parser.add_argument("--workdir", default="/tmp/cctview-load",
                        help="where the world (if rendered) and the run's output go")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=float, default=3 * 3600,
                        help="seconds before the run is killed (default 3 h)")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling period")
    parser.add_argument("--record", action="store_true",
                        help="replace the '## Load' section of BENCHMARKS.md")
    parser.add_argument("extra", nargs="*", help="more flags for `cctview run` (after --)")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    synth_seconds = args.synth_seconds
    if args.world:
        world = Path(args.world)
    else:
        world = workdir / "world"
        started = time.perf_counter()
        subprocess.run([str(CLI), "synth", "--output", str(world), "--cameras",
                        str(args.cameras), "--minutes", str(args.minutes)], check=True)
        synth_seconds = time.perf_counter() - started
    out = workdir / "run"
    command = [str(CLI), "run", "--input", str(world / "frames"), "--output", str(out),
               *CLASSICAL, "--direct_running_mode", "multi_processing",
               "--direct_num_workers", str(args.workers), *args.extra]
    print("running: %s" % " ".join(command), flush=True)
    result = run_measured(command, workdir / "run.log", args.limit, args.interval)
    if result["returncode"] != 0:
        print(result["log"][-3000:])
        print("run failed (rc=%s, timed out: %s) after %.0f s; peak tree RSS %s" % (
            result["returncode"], result["timed_out"], result["seconds"],
            _mib(result["sampler"].peak_total_kb)))
        return 1
    counters = counters_from_stdout(result["log"])
    result.update(workers=args.workers, interval=args.interval, synth_seconds=synth_seconds,
                  reconciliation=reconcile(world / "frames", out, counters,
                                           world / "ground_truth" / "boxes.parquet"))
    text = report(result)
    print(text)
    ok = all(passed for _, passed in result["reconciliation"]["checks"])
    if args.record:
        from benchmarks.record import machine, record_section

        shown = " ".join(c.replace(str(REPO) + "/", "") for c in command)
        body = (
            "Written by `benchmarks/load.py`. %d synthetic frames (`cctview synth "
            "--cameras %d --minutes %g`, 352x240 JPEG, one frame a second per camera) "
            "through one `cctview run` with the classical backends and the multi-process "
            "DirectRunner, its process tree's memory sampled from /proc every %.1f s "
            "(peak per process is the larger of the sampled RSS and the kernel's VmHWM).\n\n"
            "Machine: %s. Run under `nice -n 19` while other jobs shared the machine, so "
            "times are upper bounds.\n\nCommand:\n\n```\n%s\n```\n\n%s\n"
            % (result["reconciliation"]["numbers"]["frames_on_disk"], args.cameras,
               args.minutes, args.interval, machine(), shown, text))
        record_section("Load", body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
