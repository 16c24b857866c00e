"""`cctview run` and `cctview match` on a Dask cluster against the DirectRunner.

Same inputs, same model threads (one per model call): the shared NYC DOT frames through
YOLOX-Nano + OSNet (``run``), and CCTView's three reference files (``match``, no
models). Configurations:

  direct   : the ``direct`` preset (DirectRunner, one worker thread per core);
  dask     : ``--runner DaskRunner`` on a scheduler and two worker processes of one
             thread each (``dask scheduler``, ``dask worker --nthreads 1``, loopback),
             started once per command; the first job on fresh workers (imports, model
             loads) is reported apart as ``dask, cold``, then the repeats run warm.

Rounds alternate the configurations (the machine may be shared). Wall time is the
whole command (its own process). Peak memory is per process: the command's own
process (``ru_maxrss`` from ``wait4``), and each cluster process's VmHWM, reset
before each job (``/proc/PID/clear_refs``), so a number is one job's peak.

  .venv/bin/python benchmarks/dask_engine.py --repeats 3
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import FRAMES, MODELS, REFERENCE  # noqa: E402
from e2e.test_dask import Cluster, counters  # noqa: E402

CLI = str(Path(sys.executable).with_name("cctview"))
MODEL_FLAGS = ["--detector", "yolox", "--detector-weights", str(MODELS / "yolox_nano.onnx"),
               "--embedder", "onnx", "--embedder-weights", str(MODELS / "osnet_x0_25.onnx")]
COMMANDS = {
    "run": ["run", "--input", str(FRAMES), "--timezone", "America/New_York", *MODEL_FLAGS],
    "match": ["match", "--detections", str(REFERENCE)],
}
RUNNERS = {"direct": ["--runner_preset", "direct"], "dask": ["--runner", "DaskRunner"]}


def _status_kb(pid: int, field: str) -> int:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cluster_processes(cluster: Cluster) -> dict:
    """role -> pids: the scheduler, the nannies and the worker processes."""
    roles = {"scheduler": [], "nanny": [], "worker": []}
    for i, started in enumerate(cluster.processes):
        (dask,) = psutil.Process(started.pid).children()  # under `timeout`
        if i == 0:
            roles["scheduler"].append(dask.pid)
        else:
            roles["nanny"].append(dask.pid)
            roles["worker"].extend(p.pid for p in dask.children())
    return roles


def reset_peaks(roles: dict) -> None:
    for pids in roles.values():
        for pid in pids:
            with open("/proc/%d/clear_refs" % pid, "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS


def timed(argv, log: Path):
    """-> (wall s, peak RSS MiB of the command's process, its stdout)."""
    started = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen([CLI, *argv], cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - started
    text = log.read_text()
    if process.returncode != 0:
        raise SystemExit("cctview %s failed:\n%s" % (" ".join(argv), text[-3000:]))
    return wall, usage.ru_maxrss / 1024, text


def one(command: str, runner: str, cluster: Cluster, work: Path) -> dict:
    argv = COMMANDS[command] + ["--output", str(work / ("%s-%s" % (command, runner)))]
    argv += RUNNERS[runner]
    roles = {}
    if runner == "dask":
        argv += ["--dask_client_address", cluster.address]
        roles = cluster_processes(cluster)
        reset_peaks(roles)
    wall, driver_mib, stdout = timed(argv, work / "log.txt")
    row = {"wall": wall, "driver": driver_mib, **counters(stdout)}
    for role, pids in roles.items():
        row[role] = max(_status_kb(pid, "VmHWM") for pid in pids) / 1024
    return row


def median_row(rows) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def table(results: dict) -> str:
    lines = ["| command | configuration | runs | wall (median) | frames/s | peak MiB: "
             "command process | scheduler | each worker (max) | each nanny (max) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (command, name), rows in results.items():
        m = median_row(rows)
        fps = "%.1f" % (m["frames_inferred"] / m["wall"]) if m["frames_inferred"] else "-"
        cell = lambda k: "%.0f" % m[k] if k in m else "-"  # noqa: E731
        lines.append("| %s | %s | %d | %.1f s | %s | %s | %s | %s | %s |" % (
            command, name, len(rows), m["wall"], fps, cell("driver"), cell("scheduler"),
            cell("worker"), cell("nanny")))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="dask-bench-") as tmp:
        work = Path(tmp)
        for command in args.commands:
            cluster = Cluster(Path(tempfile.mkdtemp(dir=tmp)), limit_s=7200).start()
            try:
                results[(command, "dask, cold")] = [one(command, "dask", cluster, work)]
                for _ in range(args.repeats):
                    for runner in RUNNERS:
                        results.setdefault((command, runner), []).append(
                            one(command, runner, cluster, work))
                        print(command, runner, "%.1f s" % results[(command, runner)][-1]
                              ["wall"], flush=True)
            finally:
                cluster.stop()
    counted = {k: {c: r[0][c] for c in ("frames_inferred", "detections", "matches_emitted")}
               for k, r in results.items()}
    print("counters:", counted)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
