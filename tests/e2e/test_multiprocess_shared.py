"""The full ``cctview run`` on the shared NYC DOT frames gives the same outputs under the
single-process DirectRunner and under its multi-process mode with 2 SDK workers.

Real frames (the first 120 of each camera of ``../shared/data/nyc-fdr/frames``: two
runs of all 1,058 took five minutes of a CI machine), the real YOLOX-Nano and OSNet
ONNX models. Detections are compared row by row by their deterministic ids (camera,
time, label, box, score, embedding within float noise), matches as sets of pairs, dead
letters as sets. Both runs give each model call one thread (``--model-threads 1``):
left to itself, the multi-process run would pick one thread per worker and the
single-process run every core, and a different thread count rounds onnxruntime's sums
differently (test_extract.py pairs such runs by box instead). Each run is a subprocess in its own session under a time limit: a
multi-process DirectRunner whose worker dies waits forever (see test_faults.py).
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conftest import (FRAMES, MODELS, REPO, assert_same_detections, copy_frames, done_counters,
                      require_shared)

CLI = Path(sys.executable).with_name("cctview")
TIME_LIMIT_S = 600
FRAMES_PER_CAMERA = 120


def _run(frames: Path, out: Path, *extra) -> str:
    require_shared(MODELS / "yolox_nano.onnx")
    command = [str(CLI), "run", "--input", str(frames), "--timezone", "America/New_York",
               "--detector", "yolox", "--detector-weights", str(MODELS / "yolox_nano.onnx"),
               "--embedder", "onnx", "--embedder-weights", str(MODELS / "osnet_x0_25.onnx"),
               "--output", str(out), *extra]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the command's own session only
        process.communicate()
        pytest.fail("cctview run %s did not finish in %d s" % (" ".join(extra), TIME_LIMIT_S))
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def _table(folder: Path):
    return ds.dataset(folder, partitioning="hive", format="parquet").to_table().to_pylist()


def _outputs(out: Path):
    detections = {r["detection_id"]: r for r in _table(out / "detections")}
    matches = {(m["detection_id_a"], m["detection_id_b"]): m for m in _table(out / "matches")}
    dead = {(d["uri"], d["stage"], d["reason"]) for d in _table(out / "dead_letter")}
    return detections, matches, dead


def test_run_on_shared_frames_same_outputs_single_and_multi_process(tmp_path):
    frames = tmp_path / "frames"
    for camera in sorted(p.name for p in require_shared(FRAMES).iterdir()):
        copy_frames(frames, camera, FRAMES_PER_CAMERA)
    single_out = _run(frames, tmp_path / "single", "--model-threads", "1")
    multi_out = _run(frames, tmp_path / "multi", "--model-threads", "1", "--direct_running_mode",
                     "multi_processing", "--direct_num_workers", "2")
    single, multi = _outputs(tmp_path / "single"), _outputs(tmp_path / "multi")
    (dets_1, matches_1, dead_1), (dets_2, matches_2, dead_2) = single, multi

    frames_on_disk = sum(1 for p in frames.rglob("*") if p.is_file())
    for stdout in (single_out, multi_out):
        counts = done_counters(stdout)
        assert counts["frames_listed"] == frames_on_disk
        assert counts["frames_listed"] == counts["frames_inferred"] + counts.get(
            "frames_dead_lettered", 0) + counts.get("frames_inference_failed", 0)
        assert counts["detections"] == len(dets_1)
        assert counts["matches_emitted"] == len(matches_1)
    counted = ("frames_listed", "frames_decoded", "frames_dead_lettered", "frames_inferred",
               "frames_with_detections", "frames_without_detections", "detections",
               "candidate_pairs", "matches_emitted")  # not timings such as block_compute_ms
    assert ({k: done_counters(single_out).get(k, 0) for k in counted}
            == {k: done_counters(multi_out).get(k, 0) for k in counted})

    assert len(dets_1) > 300 and len(matches_1) > 30
    assert_same_detections(dets_1, dets_2)
    assert sorted(matches_1) == sorted(matches_2)
    for pair, a in matches_1.items():
        b = matches_2[pair]
        assert (a["frame_ts_a"], a["frame_ts_b"], a["policy"]) == (
            b["frame_ts_a"], b["frame_ts_b"], b["policy"])
        assert a["distance"] == pytest.approx(b["distance"], abs=1e-3)
    assert dead_1 == dead_2
