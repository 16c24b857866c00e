"""The progress line: counters that tick from the workers to the driver, the line's

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_progress.py.
"""
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import FRAMES, REPO, reference_minutes_of, require_shared
from pipelines import progress
from transforms import progress as ticks

CLI = Path(sys.executable).parent / "cctview"
LINE = re.compile(r"^(extract|match|run|calibrate)[^:]*: \w+ [\d,]+/[\d,]+")


def _progress_lines(stderr: str, command: str):
    return [l for l in stderr.splitlines() if l.startswith(command) and LINE.match(l)]


def test_a_pickled_counter_ticks_to_the_open_receiver(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "60")
    assert ticks.counter("ns", "plain").__class__.__name__ != "ProgressCounter"
    with progress.Progress(None, "test", (progress.READING,)) as watch:
        made = ticks.counter("ns", "detections_read")
        assert isinstance(made, ticks.ProgressCounter)
        copy = pickle.loads(pickle.dumps(made))  # as a worker unpickles a DoFn
        for _ in range(5):
            copy.inc(3)
        deadline = time.time() + 5
        while watch.counts().get("detections_read") != 15 and time.time() < deadline:
            time.sleep(0.05)
        assert watch.counts() == {"detections_read": 15}
        watch.start_job("next", (progress.READING,))  # a new job counts from zero
        assert watch.counts() == {"detections_read": 0}
    assert ticks._CHANNEL is None  # closed with the reporter


def test_an_asynchronous_runner_is_polled_for_its_metrics(monkeypatch, capsys):
    """Dataflow: no receiver (its workers cannot reach this machine), run() returns at
    once, and the line reads the running job's attempted counters."""
    from apache_beam.options.pipeline_options import PipelineOptions

    monkeypatch.setenv(progress.INTERVAL_ENV, "0.05")

    class Result:
        def metrics(self):
            counter = SimpleNamespace(key=SimpleNamespace(metric=SimpleNamespace(
                name="detections_read")), committed=None, attempted=40)
            return SimpleNamespace(query=lambda: {"counters": [counter]})

    options = PipelineOptions(["--runner", "DataflowRunner"])
    assert progress.receiver_host(options) is None
    assert progress.receiver_host(PipelineOptions([])) == "127.0.0.1"
    assert progress.receiver_host(PipelineOptions(["--runner", "direct"])) == "127.0.0.1"
    dask = ["--runner", "runners.dask_runner.DaskRunner", "--dask_client_address"]
    assert progress.receiver_host(PipelineOptions(dask + ["tcp://127.0.0.1:8786"])) == \
        "127.0.0.1"
    # a remote scheduler: this machine's address on the route to it, where workers send
    assert progress.receiver_host(PipelineOptions(dask + ["tcp://10.255.255.1:8786"])) \
        not in (None, "127.0.0.1")
    with progress.Progress(options, "match", (progress.READING,)) as watch:
        watch.start_job("match", (progress.READING,), {"reading": 100})
        watch.attach(Result())
        time.sleep(0.4)
    err = capsys.readouterr().err
    assert "match: reading 40/100 detections (40%)" in err and "ETA" in err


def _cctview(*args, env=None, timeout=300):
    run = subprocess.run([str(CLI), *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, **(env or {})))
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_extract_on_the_multi_process_direct_runner_prints_progress(tmp_path):
    require_shared(FRAMES)
    run = _cctview("extract", "--input", str(FRAMES), "--timezone", "America/New_York",
                   "--start", "2020-05-05T13:10", "--end", "2020-05-05T13:11",
                   "--detector", "background", "--embedder", "color_histogram",
                   "--output", str(tmp_path / "out"),
                   "--direct_running_mode", "multi_processing", "--direct_num_workers", "2",
                   env={progress.INTERVAL_ENV: "0.3"})
    lines = _progress_lines(run.stderr, "extract")
    assert lines, run.stderr[-2000:]
    listed = int(re.search(r"frames_listed=(\d+)", run.stdout).group(1))
    assert 90 < listed < 120  # one minute of three cameras
    # the total excludes the skipped files of the hour folder outside the minute
    assert any("/%d (" % listed in l for l in lines), lines
    moving = [l for l in lines if re.search(r"frames [1-9][\d,]*/[\d,]+ \(\d+%\), [\d.,]+/s, "
                                            r"ETA \d", l)]
    assert moving, lines
    assert "frames: %d listed = %d inferred" % (listed, listed) in run.stdout


@pytest.fixture(scope="module")
def reference_minutes(tmp_path_factory):
    """Three minutes of each camera's reference detections."""
    return reference_minutes_of(tmp_path_factory.mktemp("reference-3min"), 10, 13)


def test_match_prints_progress_in_process_and_quiet_silences_it(reference_minutes, tmp_path,
                                                                monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.setenv(progress.INTERVAL_ENV, "0.1")
    args = ["match", "--detections", str(reference_minutes), "--timezone", "America/New_York",
            "--direct_running_mode", "multi_threading", "--direct_num_workers", "2"]
    assert main(args + ["--output", str(tmp_path / "loud")]) == 0
    err = capsys.readouterr().err
    lines = _progress_lines(err, "match")
    assert lines and all(" detections" in l for l in lines), err[-2000:]
    assert any(re.search(r"reading [1-9][\d,]*/", l) or re.search(r"matching [1-9]", l)
               for l in lines), lines
    assert main(args + ["--output", str(tmp_path / "quiet"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert not _progress_lines(captured.err, "match") and "done: " in captured.out


def test_a_worker_process_that_ends_sends_its_last_counts():
    """The multi-process DirectRunner ends a stage's worker processes: what they counted
    since their last datagram is sent at exit, not lost with the daemon thread."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(10)
    port = receiver.getsockname()[1]
    code = ("from transforms import progress as ticks\n"
            "c = ticks.ProgressCounter(ticks.Metrics.counter('ns', 'frames'), 'frames', "
            "('127.0.0.1', %d, 'tok'))\n"
            "c.inc(7)\n" % port)  # exits at once, well inside SEND_EVERY_S
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, timeout=60)
    message = json.loads(receiver.recv(65536).decode("utf-8"))
    receiver.close()
    assert message["t"] == "tok" and message["c"] == {"frames": 7}
