"""Shared fixtures: the ../shared material, real object-store servers on loopback, and
helpers that run a Beam pipeline and hand back what it produced and counted.

Tests live in ``unit/`` (the fast loop: pure, no Beam pipeline, no subprocess, no
server, the whole folder under a minute) or ``e2e/`` (the rest); each gets the marker of
its folder (``-m unit``, ``-m e2e``; pytest.ini), and :func:`_unit_tests_stay_pure`
makes a unit test that runs a pipeline, starts a subprocess or opens a socket fail."""
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SETS = ("unit", "e2e")
SHARED = REPO.parent / "shared"
FRAMES = SHARED / "data" / "nyc-fdr" / "frames"
REFERENCE = SHARED / "data" / "nyc-fdr" / "reference"
SEED = SHARED / "data" / "nyc-fdr" / "seed-format"
MODELS = SHARED / "models"


CLASSICAL = ["--detector", "background", "--embedder", "color_histogram"]


def pytest_collection_modifyitems(config, items):
    """Marks each test with its folder's set; a test outside ``unit/`` and ``e2e/`` is a
    collection error (it would be in neither loop)."""
    for item in items:
        folder = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        if folder not in SETS:
            raise pytest.UsageError("%s: tests belong in tests/unit or tests/e2e" % item.nodeid)
        item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(autouse=True)
def _unit_tests_stay_pure(request, monkeypatch):
    """In a ``unit`` test, running a Beam pipeline, starting a subprocess or opening a
    socket raises: such a test belongs in ``e2e/``."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    import apache_beam as beam

    import models  # noqa: F401  (its first import, torchvision's, runs ldconfig: not the test's)

    def refuse(what):
        def refused(*args, **kwargs):
            raise RuntimeError("a unit test may not %s: move it to tests/e2e" % what)
        return refused

    monkeypatch.setattr(beam.Pipeline, "run", refuse("run a Beam pipeline"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("start a subprocess"))
    for method in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, method, refuse("open a socket"))
    yield


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 3-camera, 1.5-minute synthetic world (``cctview synth``), rendered once for every
    test that only reads it."""
    from pipelines.cli import main

    root = tmp_path_factory.mktemp("small-world")
    assert main(["synth", "--output", str(root), "--cameras", "3", "--minutes", "1.5"]) == 0
    return root


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip("shared material not found: %s" % path)
    return path


def reference_minutes_of(root: Path, first_minute: int, end_minute: int) -> Path:
    """Writes each camera's shared reference detections of 13:MM local time, minutes
    ``[first_minute, end_minute)``, to ``root`` (same file names); -> ``root``."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    require_shared(REFERENCE)
    start, end = (pa.scalar(dt.datetime(2020, 5, 5, 13, m), pa.timestamp("ms"))
                  for m in (first_minute, end_minute))
    for path in sorted(REFERENCE.glob("*.parquet")):
        whole = pq.read_table(path)
        keep = pc.and_(pc.greater_equal(whole["frame_ts"], start),
                       pc.less(whole["frame_ts"], end))
        pq.write_table(whole.filter(keep), root / path.name)
    return root


def copy_frames(root: Path, camera: str, count: int) -> list:
    """Copies the first ``count`` real frames of ``camera`` under ``root`` in the frames'
    own layout; -> the source paths."""
    import shutil

    src = sorted(require_shared(FRAMES / camera).rglob("*.jpeg"))[:count]
    for path in src:
        target = root / path.relative_to(FRAMES)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return src


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (``pytestmark``): on a small, shared CI
    machine OpenMP threads that spin while waiting for a busy core make model tests many
    times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited with %s" % process.returncode)
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("server on port %d did not start" % port)


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS JSON-API server (gcp-storage-emulator) on loopback.

    Beam's gs:// filesystem and google-cloud-storage both follow STORAGE_EMULATOR_HOST.
    Yields a function that creates a fresh bucket and returns its name.
    """
    port = free_port()
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    process = subprocess.Popen(
        [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from apache_beam.internal.gcp import auth

    # Beam looks for Google credentials with retries (~20 s) before it connects
    # anonymously, which is what the emulator wants: skip the lookup.
    lookup = auth._Credentials._get_service_credentials
    auth._Credentials._get_service_credentials = staticmethod(lambda options: None)
    try:
        _wait_for_port(port, process)
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = "http://127.0.0.1:%d" % port
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="test", credentials=AnonymousCredentials())

        def new_bucket():
            name = "b-%s" % uuid.uuid4().hex[:12]
            client.create_bucket(name)
            return name

        new_bucket.client = client
        yield new_bucket
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
    finally:
        auth._Credentials._get_service_credentials = lookup
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-API server (moto) on loopback; yields its endpoint and a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = "http://127.0.0.1:%d" % port
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x",
                          aws_secret_access_key="y", region_name="us-east-1")
    yield endpoint, client
    server.stop()


def s3_flags(endpoint: str):
    return ["--s3_endpoint_url", endpoint, "--s3_access_key_id", "x",
            "--s3_secret_access_key", "y", "--s3_region_name", "us-east-1"]


_COLLECTED = {}


def _append(element, key):
    _COLLECTED[key].append(element)


def collect(pcoll, label: str):
    """Gathers a PCollection into a list readable after the run (in-process runners)."""
    import apache_beam as beam

    key = uuid.uuid4().hex
    _COLLECTED[key] = []
    pcoll | "Collect_%s" % label >> beam.Map(_append, key)
    return _COLLECTED[key]


def counters(result) -> dict:
    """A finished job's counters, summed by name (what the commands report)."""
    from pipelines.progress import counter_totals

    return counter_totals(result)


def done_counters(stdout: str) -> dict:
    """The counters of a command's last ``done: name=value, ... -> OUTPUT`` line."""
    line = [l for l in stdout.splitlines() if l.startswith("done: ")][-1]
    body = line[len("done: "):].rsplit(" -> ", 1)[0]
    return {k: int(v) for k, v in (kv.split("=") for kv in body.split(", "))}


def assert_same_detections(a: dict, b: dict) -> None:
    """Two runs' detections (detection_id -> row) are the same rows, boxes, scores and
    embeddings up to float noise (other engines, other processes)."""
    import numpy as np

    assert sorted(a) == sorted(b)
    for detection_id, row in a.items():
        other = b[detection_id]
        for column in ("camera_id", "frame_ts", "frame_uri", "label", "detector", "embedder"):
            assert row[column] == other[column], (detection_id, column)
        assert np.allclose(row["box_xyxy"], other["box_xyxy"], atol=1e-3)
        assert row["score"] == pytest.approx(other["score"], abs=1e-4)
        assert np.allclose(row["embedding"], other["embedding"], atol=1e-4)


def upload_tree(local_root: Path, upload) -> int:
    """Calls upload(relative_posix_path, bytes) for every file under local_root."""
    count = 0
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            upload(path.relative_to(local_root).as_posix(), path.read_bytes())
            count += 1
    return count
