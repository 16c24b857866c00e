"""benchmarks/load.py's measuring and reconciliation, and the streaming background path
that lets 100,000 frames through the DirectRunner (backgrounds from the frame index).
"""
import shutil
import sys

import apache_beam as beam
import numpy as np
from PIL import Image

from conftest import CLASSICAL, REPO, collect
from pipelines.cli import main
from transforms.backgrounds import EstimateBackgrounds, _EstimateFromFilesFn
from transforms.frames import ReadFrames
from transforms.inference import _with_background
from transforms.layout import FrameLayout

sys.path.insert(0, str(REPO))
from benchmarks import load  # noqa: E402

def _checks(result):
    return {name: ok for name, ok in result["checks"]}


def test_reconciliation_of_a_small_run_and_what_it_catches(small_world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--input", str(small_world / "frames"), "--output", str(out),
                 "--max-gap", "60"] + CLASSICAL) == 0
    counters = load.counters_from_stdout(capsys.readouterr().out)
    truth = small_world / "ground_truth" / "boxes.parquet"
    result = load.reconcile(small_world / "frames", out, counters, truth)
    assert all(_checks(result).values()), result["checks"]
    numbers = result["numbers"]
    assert numbers["frames_on_disk"] == counters["frames_listed"] > 250
    assert numbers["detections"] > 300 and numbers["matches"] > 10
    assert 0.5 < numbers["detections_per_truth_box"] < 2

    # A detections file written twice (a retried bundle that added a file): caught.
    first = sorted((out / "detections").rglob("*.parquet"))[0]
    shutil.copy(first, first.with_name("copy-" + first.name))
    doubled = _checks(load.reconcile(small_world / "frames", out, counters, truth))
    assert not doubled["no duplicate detection_id"]
    assert not doubled["detections counter == rows written"]
    # A frame that was never listed: caught.
    frames = tmp_path / "frames"
    shutil.copytree(small_world / "frames", frames)
    extra = sorted(frames.rglob("*.jpeg"))[0]
    shutil.copy(extra, extra.with_name("cam-01--2024-05-01--12.30.00--original.jpeg"))
    first.with_name("copy-" + first.name).unlink()
    lost = _checks(load.reconcile(frames, out, counters, truth))
    assert not lost["frames on disk == frames_listed"] and lost["no duplicate detection_id"]


def test_memory_and_cpu_of_a_process_tree_are_measured(tmp_path):
    child = "import time; x = bytearray(300 * 2 ** 20); x[::4096] = b'1' * len(x[::4096]); " \
            "t = time.process_time() + 0.5\nwhile time.process_time() < t: pass\n" \
            "time.sleep(1.0)"
    result = load.run_measured([sys.executable, "-c",
                                "import subprocess, sys; subprocess.run([sys.executable, "
                                "'-c', %r])" % child], tmp_path / "log", 60, 0.1)
    assert result["returncode"] == 0 and not result["timed_out"]
    sampler = result["sampler"]
    assert sampler.peak_total_kb > 300 * 1024
    assert max(kb for _, kb in sampler.peak_by_pid.values()) > 300 * 1024
    assert len(sampler.peak_by_pid) >= 2  # the driver and its child
    assert result["cpu_seconds"] >= 0.5  # the grandchild's busy loop counts


def test_backgrounds_from_the_index_equal_those_from_decoded_frames(small_world):
    with beam.Pipeline() as p:
        read = p | ReadFrames([str(small_world / "frames")], FrameLayout())
        from_frames = collect(read.frames | "FromFrames" >> EstimateBackgrounds(), "frames")
        from_index = collect(read.index | "FromIndex" >> EstimateBackgrounds(
            from_index=True), "index")
    assert sorted(dict(from_frames)) == sorted(dict(from_index)) == [
        "cam-01", "cam-02", "cam-03"]
    for camera, background in from_frames:
        assert np.array_equal(background, dict(from_index)[camera])


def test_undecodable_samples_are_skipped_and_a_camera_without_any_uses_the_frame(small_world,
                                                                                   tmp_path):
    from models.background import estimate_background

    good = sorted(str(p) for p in (small_world / "frames" / "cam-01").rglob("*.jpeg"))[:3]
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    fn = _EstimateFromFilesFn(sample=2)
    ((camera, background),) = list(fn.process(("cam-01", [str(bad)] + good)))
    expected = estimate_background([np.asarray(Image.open(p).convert("RGB")) for p in good[:2]])
    assert camera == "cam-01" and np.array_equal(background, expected)
    assert list(fn.process(("cam-01", [str(bad), str(tmp_path / "missing.jpeg")]))) == []
    image = np.zeros((4, 4, 3), np.uint8)
    key = ("uri", "cam-01", 0)
    assert _with_background((key, image), {})[1][1] is image
    assert _with_background((key, image), {"cam-01": background})[1][1] is background
