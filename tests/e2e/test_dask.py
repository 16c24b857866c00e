"""The pipelines on a real dask.distributed cluster give the DirectRunner's outputs.

A scheduler and two worker processes are started as an operator would start them
(``dask scheduler``, ``dask worker``; loopback only, each under a wall-clock limit and
torn down by the fixture), once for the module. ``extract`` and ``run`` take the
shared NYC DOT frames of one minute (about 35 per camera) plus a folder of broken
frames, through the real YOLOX-Nano and OSNet ONNX models; ``match`` and ``calibrate``
take five minutes of the reference detections. Every command runs through
``pipelines.cli.main`` (the job killed mid-run: as a subprocess), once with the
DirectRunner and once with ``--runner DaskRunner --dask_client_address``; the outputs are compared row by row: detections by id (box,
score, embedding within float noise), match pairs, dead letters, links. Both runs give
each model call one thread (``--model-threads 1``, the Dask default): a different
thread count rounds onnxruntime's sums differently (see test_multiprocess_shared.py).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conftest import (FRAMES, MODELS, REPO, assert_same_detections, done_counters,
                      free_port, reference_minutes_of, require_shared)

distributed = pytest.importorskip("distributed")

BIN = Path(sys.executable).parent
CLI = BIN / "cctview"
CLUSTER_LIMIT_S = 900  # every cluster process exits by then, whatever happens here
COMMAND_LIMIT_S = 300
CAMERAS = ("731-679-N", "733-681-N", "735-683-N")
MINUTE = ["--timezone", "America/New_York", "--start", "2020-05-05T13:10:00",
          "--end", "2020-05-05T13:11:00"]
MODEL_FLAGS = ["--detector", "yolox", "--detector-weights", str(MODELS / "yolox_nano.onnx"),
               "--embedder", "onnx", "--embedder-weights", str(MODELS / "osnet_x0_25.onnx"),
               "--model-threads", "1"]
COUNTED = ("frames_listed", "frames_decoded", "frames_dead_lettered", "files_outside_range",
           "frames_inferred", "frames_with_detections", "frames_without_detections",
           "detections", "detections_read", "candidate_pairs", "matches_emitted")


# ------------------------------------------------------------------ the cluster
class Cluster:
    """A scheduler and two ``dask worker`` processes (each with its nanny) on loopback."""

    def __init__(self, root: Path, limit_s: float = CLUSTER_LIMIT_S):
        self.limit_s = limit_s
        self.port = free_port()
        self.address = "tcp://127.0.0.1:%d" % self.port
        self.processes = []
        self._root = root

    def _start(self, name: str, *args) -> None:
        log = open(self._root / ("%s.log" % name), "w")
        self.processes.append(subprocess.Popen(
            ["timeout", str(self.limit_s), str(BIN / "dask"), *args], cwd=REPO,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> "Cluster":
        self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port",
                    str(self.port), "--no-dashboard")
        for i in (1, 2):
            self._start("worker-%d" % i, "worker", self.address, "--host", "127.0.0.1",
                        "--nthreads", "1", "--no-dashboard", "--name", "w%d" % i,
                        "--death-timeout", "60",
                        "--local-directory", str(self._root / ("w%d" % i)))
        self.wait_for_workers(2)
        return self

    def client(self):
        return distributed.Client(self.address, timeout=30)

    def wait_for_workers(self, count: int, timeout: float = 90) -> None:
        with self.client() as client:
            client.wait_for_workers(count, timeout=timeout)

    def worker_pids(self) -> dict:
        """Worker address -> pid of the worker process (the nanny's child)."""
        with self.client() as client:
            return client.run(os.getpid)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_shared(FRAMES)
    require_shared(MODELS / "yolox_nano.onnx")
    running = Cluster(tmp_path_factory.mktemp("dask-cluster"))
    try:
        yield running.start()
    finally:
        running.stop()


def dask_flags(cluster):
    return ["--runner", "DaskRunner", "--dask_client_address", cluster.address]


# ------------------------------------------------------------------ commands and outputs
def start_cctview(*args) -> subprocess.Popen:
    return subprocess.Popen([str(CLI), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, limit_s: float = COMMAND_LIMIT_S):
    """-> (exit status, stdout, stderr); the command's own session is killed at the limit."""
    try:
        stdout, stderr = process.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("cctview %s did not finish in %d s" % (process.args[1], limit_s))
    return process.returncode, stdout, stderr


def cctview(*args) -> str:
    code, stdout, stderr = finish(start_cctview(*args))
    assert code == 0, stderr[-3000:]
    return stdout


@pytest.fixture
def command(capsys):
    """Runs ``cctview ARGS`` in this process; -> what it printed (exit status must be 0)."""
    from pipelines.cli import main

    def run(*args) -> str:
        capsys.readouterr()
        assert main(list(args)) == 0, capsys.readouterr().err[-3000:]
        return capsys.readouterr().out

    return run


def counters(stdout: str) -> dict:
    """The COUNTED counters of a command's ``done:`` line (0 for those it lacks)."""
    found = done_counters(stdout)
    return {k: found.get(k, 0) for k in COUNTED}


def table(folder: Path) -> list:
    return ds.dataset(folder, partitioning="hive", format="parquet").to_table().to_pylist()


def detections(out: Path) -> dict:
    rows = table(out / "detections")
    by_id = {r["detection_id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate detection rows"
    return by_id


def matches(out: Path) -> dict:
    rows = table(out / "matches")
    by_pair = {(m["detection_id_a"], m["detection_id_b"]): m for m in rows}
    assert len(by_pair) == len(rows), "duplicate match rows"
    return by_pair


def dead_letters(out: Path) -> list:
    return sorted((d["uri"], d["stage"], d["reason"]) for d in table(out / "dead_letter"))


def parquet_files(out: Path) -> list:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))


def assert_same_matches(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for pair, row in a.items():
        other = b[pair]
        for column in row:
            if column == "distance":  # BLAS threads differ between the runners' processes
                assert row[column] == pytest.approx(other[column], rel=1e-4, abs=1e-4)
            else:
                assert row[column] == other[column], (pair, column)


# ------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def broken_frames(tmp_path_factory):
    """Files named like frames of the same minute that are not frames: dead letters."""
    root = tmp_path_factory.mktemp("broken-frames")
    real = sorted((FRAMES / CAMERAS[0]).rglob("*.jpeg"))[0].read_bytes()
    for second, data in (("10", real[: len(real) // 3]), ("20", b"not an image"),
                         ("30", b"")):
        folder = root / "cam-x" / "2020" / "05" / "05" / "13" / "10" / second
        folder.mkdir(parents=True)
        (folder / ("cam-x--2020-05-05--13.10.%s--original.jpeg" % second)).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def frame_inputs(broken_frames):
    return ["--input", str(FRAMES), str(broken_frames)] + MINUTE


@pytest.fixture(scope="module")
def reference_subset(tmp_path_factory):
    """Five minutes (13:10-13:15 local) of each camera's reference detections."""
    return reference_minutes_of(tmp_path_factory.mktemp("reference-5min"), 10, 15)


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory, frame_inputs):
    """``cctview run`` on the DirectRunner: the outputs every Dask run must equal."""
    out = tmp_path_factory.mktemp("direct-run")
    stdout = cctview("run", *frame_inputs, *MODEL_FLAGS, "--output", str(out))
    return out, stdout


# ------------------------------------------------------------------ the tests
def test_extract_on_dask_writes_what_the_direct_runner_writes(cluster, frame_inputs,
                                                             tmp_path, command):
    direct, dask = tmp_path / "direct", tmp_path / "dask"
    direct_out = command("extract", *frame_inputs, *MODEL_FLAGS, "--output", str(direct))
    with cluster.client() as client, distributed.get_task_stream(client=client) as stream:
        dask_out = command("extract", *frame_inputs, *MODEL_FLAGS, "--output", str(dask),
                           *dask_flags(cluster))
    # Both workers ran bundles, and no task ran for more than a third of the job's
    # compute (the frames are spread, not decoded and inferred in one task).
    busy = {}
    for task in stream.data:
        for part in task["startstops"]:
            if part["action"] == "compute":
                busy.setdefault(task["worker"], []).append(part["stop"] - part["start"])
    assert len(busy) == 2
    total = sum(map(sum, busy.values()))
    assert max(map(max, busy.values())) < total / 3
    rows = detections(direct)
    assert len(rows) > 300 and {r["camera_id"] for r in rows.values()} == set(CAMERAS)
    assert_same_detections(rows, detections(dask))
    dead = dead_letters(direct)
    assert len(dead) == 3 and dead == dead_letters(dask)
    assert counters(dask_out) == counters(direct_out)
    assert counters(dask_out)["frames_inferred"] > 90
    assert parquet_files(dask) == parquet_files(direct)


def test_run_on_dask_writes_what_the_direct_runner_writes(cluster, frame_inputs, direct_run,
                                                         tmp_path, command):
    direct, direct_out = direct_run
    dask_out = command("run", *frame_inputs, *MODEL_FLAGS, "--output", str(tmp_path),
                       *dask_flags(cluster))
    assert_same_detections(detections(direct), detections(tmp_path))
    pairs = matches(direct)
    assert len(pairs) > 10
    assert_same_matches(pairs, matches(tmp_path))
    assert dead_letters(tmp_path) == dead_letters(direct)
    assert counters(dask_out) == counters(direct_out)


def test_match_and_calibrate_on_dask_write_what_the_direct_runner_writes(
        cluster, reference_subset, tmp_path, command):
    on_dask = dask_flags(cluster)
    for name, extra in (("direct", []), ("dask", on_dask)):
        links = tmp_path / ("links-%s.json" % name)
        command("calibrate", "--detections", str(reference_subset), "--output", str(links),
                *extra)
        command("match", "--detections", str(reference_subset),
                "--output", str(tmp_path / ("mutual-" + name)), *extra)
        command("match", "--detections", str(reference_subset), "--links", str(links),
                "--policy", "mutual", "--output", str(tmp_path / ("linked-" + name)), *extra)
    links = json.loads((tmp_path / "links-direct.json").read_text())
    assert links and json.loads((tmp_path / "links-dask.json").read_text()) == links
    mutual = matches(tmp_path / "mutual-direct")
    assert len(mutual) > 100
    assert_same_matches(mutual, matches(tmp_path / "mutual-dask"))
    linked = matches(tmp_path / "linked-direct")
    assert linked and len(linked) < len(mutual)
    assert_same_matches(linked, matches(tmp_path / "linked-dask"))


def test_progress_lines_come_from_the_dask_workers(cluster, reference_subset, tmp_path,
                                                   monkeypatch, capsys):
    """The workers' counters tick to the driver over UDP: the line moves while the job
    runs on the cluster (Beam's metrics come back only with the job's results)."""
    import re

    from pipelines.cli import main

    monkeypatch.setenv("CCTVIEW_PROGRESS_INTERVAL", "0.2")
    assert main(["match", "--detections", str(reference_subset), "--output", str(tmp_path),
                 *dask_flags(cluster)]) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("match")]
    counted = [l for l in lines if re.search(r"(reading|matching) [1-9][\d,]*/[\d,]+", l)]
    assert counted, lines[-5:]


def _wait_for_running_bundles(cluster, process, limit_s: float = 120) -> None:
    """Returns once the cluster runs the job's ParDo bundles (some already done)."""
    deadline = time.time() + limit_s
    with cluster.client() as client:
        while time.time() < deadline:
            assert process.poll() is None, "the job ended before a worker could be killed"
            processing = [k for keys in client.processing().values() for k in keys]
            done = client.run_on_scheduler(
                lambda dask_scheduler: sum(1 for t in dask_scheduler.tasks.values()
                                           if t.state == "memory"
                                           and "run_bundle" in str(t.key)))
            if done >= 3 and any("run_bundle" in str(k) for k in processing):
                return
            time.sleep(0.2)
    pytest.fail("no bundle ran on the cluster within %d s" % limit_s)


def test_a_worker_killed_mid_job_changes_nothing(cluster, frame_inputs, direct_run,
                                                 tmp_path):
    """SIGKILL one worker process while the job runs (the OOM killer's way): the
    scheduler re-runs its lost tasks on the other worker (and on the one its nanny
    restarts), and the rewritten files are the clean run's files, no row twice."""
    direct, direct_out = direct_run
    process = start_cctview("run", *frame_inputs, *MODEL_FLAGS, "--output", str(tmp_path),
                            *dask_flags(cluster))
    _wait_for_running_bundles(cluster, process)
    _, pid = sorted(cluster.worker_pids().items())[0]
    os.kill(pid, signal.SIGKILL)
    code, stdout, stderr = finish(process)
    try:
        if code != 0:  # allowed: one line (no traceback), then a re-run gives clean outputs
            assert code == 1 and "Traceback" not in stderr, stderr[-2000:]
            assert stderr.strip().splitlines()[-1].startswith(
                "cctview run: error: dask job failed: ")
            stdout = cctview("run", *frame_inputs, *MODEL_FLAGS, "--output", str(tmp_path),
                             *dask_flags(cluster))
        # Counters travel with task results: a re-run task counts once.
        assert counters(stdout) == counters(direct_out)
        assert_same_detections(detections(direct), detections(tmp_path))
        assert_same_matches(matches(direct), matches(tmp_path))
        assert dead_letters(tmp_path) == dead_letters(direct)
        assert parquet_files(tmp_path) == parquet_files(direct)
    finally:
        cluster.wait_for_workers(2)  # the nanny restarts the worker for later tests
    assert pid not in cluster.worker_pids().values()


# ------------------------------------------------------------------ flags and refusals
def test_every_pipeline_command_takes_the_dask_runner(tmp_path):
    from pipelines import cli
    from runners.presets import DASK_RUNNER, expand_preset

    address = "tcp://127.0.0.1:8786"
    spellings = (["--runner", "DaskRunner"], ["--runner=dask"], ["--runner_preset", "dask"])
    for name, command in cli.COMMANDS.items():
        if command.add_arguments or command.parse:
            continue  # demo, report, synth run no Beam pipeline; backfill: below
        for spelling in spellings:
            _, options = cli.parse([name, *spelling, "--dask_client_address", address])
            everything = options.get_all_options()
            assert everything["runner"] == DASK_RUNNER and everything["address"] == address
    # backfill (flags only, no command name) expands the same way.
    assert expand_preset(["--runner_preset", "dask", "--dask_client_address", address]
                         ) == ["--dask_client_address", address, "--runner=" + DASK_RUNNER]


def test_dask_preset_without_an_address_stops_with_one_line():
    from runners.errors import UsageError
    from runners.presets import expand_preset

    with pytest.raises(UsageError, match="^--runner_preset dask needs --dask_client_address"):
        expand_preset(["match", "--detections", "d", "--output", "o",
                       "--runner_preset", "dask"])


def test_beams_own_dask_runner_is_refused_with_one_line(capsys, tmp_path):
    from pipelines.cli import main

    code = main(["match", "--detections", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--runner", "apache_beam.runners.dask.dask_runner.DaskRunner"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "loses tagged outputs" in err and "--runner DaskRunner" in err


def test_an_unreachable_scheduler_stops_the_command_with_one_line(
        capsys, reference_subset, tmp_path):
    from pipelines.cli import main

    address = "tcp://127.0.0.1:%d" % free_port()  # nothing listens there
    started = time.time()
    code = main(["match", "--detections", str(reference_subset), "--output", str(tmp_path),
                 "--runner", "DaskRunner", "--dask_client_address", address,
                 "--dask_connection_timeout", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and time.time() - started < 30
    assert err.startswith("cctview match: error: cannot reach the dask scheduler at " + address)


def test_what_the_dask_runner_cannot_run_is_refused_before_it_runs(cluster):
    """A stateful DoFn (no translation for state and timers) stops the job with one line
    naming the step, before anything is submitted."""
    import apache_beam as beam
    from apache_beam.coders import VarIntCoder
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

    from runners.errors import UsageError

    class Count(beam.DoFn):
        SEEN = ReadModifyWriteStateSpec("seen", VarIntCoder())

        def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
            seen.write((seen.read() or 0) + 1)
            yield element

    options = PipelineOptions(["--runner", "runners.dask_runner.DaskRunner",
                               "--dask_client_address", cluster.address])
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | beam.Create([("a", 1)]) | "Stateful" >> beam.ParDo(Count())
    with pytest.raises(UsageError, match="cannot run step 'Stateful': stateful DoFns"):
        pipeline.run()


def test_streaming_is_refused_with_one_line():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from runners.errors import UsageError

    pipeline = beam.Pipeline(options=PipelineOptions(
        ["--runner", "runners.dask_runner.DaskRunner", "--streaming"]))
    _ = pipeline | beam.Create([1])
    with pytest.raises(UsageError, match="batch pipelines only"):
        pipeline.run()
