"""cctview extract end to end: real frames, real ONNX models, bad inputs, re-runs."""

import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import MODELS, copy_frames, require_shared
from pipelines.cli import main

CAMERA = "735-683-N"


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    """Twelve real frames of one camera plus one of each kind of bad file."""
    root = tmp_path_factory.mktemp("frames")
    src = copy_frames(root, CAMERA, 12)
    empty = root / CAMERA / "2020/05/05/13/59/58" / (
        "%s--2020-05-05--13.59.58--original.jpeg" % CAMERA)
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    (root / CAMERA / "2020" / "05" / "05" / "README.txt").write_text("not a frame")
    truncated = root / CAMERA / "2020/05/05/13/59/59" / (
        "%s--2020-05-05--13.59.59--original.jpeg" % CAMERA)
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(src[1].read_bytes()[:2000])
    return root


def _models():
    require_shared(MODELS)
    return ["--detector", "yolox", "--detector-weights", str(MODELS / "yolox_nano.onnx"),
            "--embedder", "onnx", "--embedder-weights", str(MODELS / "osnet_x0_25.onnx")]


def _extract(frames_dir, out, *extra):
    return main(["extract", "--input", str(frames_dir), "--output", str(out),
                 "--timezone", "America/New_York", "--batch-size", "4"] + _models()
                + list(extra))


def test_extract_writes_detections_and_dead_letters(frames_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _extract(frames_dir, out) == 0
    summary = capsys.readouterr().out
    assert "frames_listed=15" in summary and "frames_dead_lettered=3" in summary
    dets = ds.dataset(out / "detections", partitioning="hive").to_table()
    dead = ds.dataset(out / "dead_letter").to_table().to_pylist()
    assert sorted(d["reason"] for d in dead) == ["corrupt_image", "empty_file",
                                                 "unparseable_path"]
    assert dets.num_rows > 12  # busy highway: several vehicles per frame
    rows = dets.to_pylist()
    assert {r["camera_id"] for r in rows} == {CAMERA}
    assert {r["label"] for r in rows} <= {"car", "bus", "truck", "motorcycle"}
    assert {r["detector"] for r in rows} == {"yolox"} and {r["embedder"] for r in rows} == {"onnx"}
    assert all(len(r["embedding"]) == 512 and r["score"] >= 0.25 for r in rows)
    assert len({r["detection_id"] for r in rows}) == len(rows)
    assert len({r["frame_uri"] for r in rows}) <= 12
    assert str(dets.schema.field("frame_ts").type) == "timestamp[ms, tz=UTC]"
    # Deterministic ids and rows: the separate-stages run gives the same detections.
    out2 = tmp_path / "out2"
    assert _extract(frames_dir, out2, "--separate-stages") == 0
    rows2 = ds.dataset(out2 / "detections", partitioning="hive").to_table().to_pylist()
    by_id = {r["detection_id"]: r for r in rows}
    assert sorted(by_id) == sorted(r["detection_id"] for r in rows2)
    for r in rows2:
        assert np.allclose(r["embedding"], by_id[r["detection_id"]]["embedding"], atol=1e-4)
    # Re-running into the same folder replaces the table: no duplicate rows.
    assert _extract(frames_dir, out) == 0
    assert ds.dataset(out / "detections", partitioning="hive").count_rows() == len(rows)


def test_bundles_in_threads_give_the_same_detections(frames_dir, tmp_path):
    """Two bundles at once, each model call on one core (--model-threads auto), write the
    same detections as one bundle at a time on every core, up to float rounding: a
    different thread count splits onnxruntime's sums differently (boxes move by ~1e-5 px,
    which can move a box across the 0.1 px rounding of its id; so rows are paired by
    frame, label and box, not by id)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert _extract(frames_dir, one) == 0
    assert _extract(frames_dir, two, "--direct_num_workers", "2",
                    "--direct_running_mode", "multi_threading") == 0
    rows, rows2 = [sorted(ds.dataset(out / "detections", partitioning="hive").to_table().to_pylist(),
                          key=lambda r: (r["frame_uri"], r["label"], r["box_xyxy"]))
                   for out in (one, two)]
    assert rows and len(rows) == len(rows2)
    for a, b in zip(rows, rows2):
        assert (a["frame_uri"], a["label"]) == (b["frame_uri"], b["label"])
        assert np.allclose(a["box_xyxy"], b["box_xyxy"], atol=1e-3)
        assert np.abs(np.subtract(a["embedding"], b["embedding"])).max() < 1e-3


@pytest.mark.parametrize("flags, expected", [
    ([], 0),
    (["--model-threads", "3"], 3),
    (["--direct_num_workers", "0"], 1),
    (["--direct_num_workers", "2"], "half"),
    (["--runner", "DataflowRunner"], 1),
    (["--device", "cuda"], 0),
    (["--device", "cuda", "--model-threads", "2"], 2),
])
def test_model_threads_follow_the_runner(flags, expected):
    import os

    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import ModelOptions
    from pipelines.stages import model_threads

    if expected == "half":
        expected = max(1, (os.cpu_count() or 1) // 2)
    assert model_threads(PipelineOptions(flags).view_as(ModelOptions)) == expected


def test_people_only_when_asked(frames_dir, tmp_path):
    out = tmp_path / "people"
    assert _extract(frames_dir, out, "--classes", "person,car", "--min-score", "0.1") == 0
    labels = set(ds.dataset(out / "detections", partitioning="hive").to_table()["label"]
                 .to_pylist())
    assert labels <= {"person", "car"}


def test_missing_and_mismatched_weights_fail_at_once(frames_dir, tmp_path, capsys):
    code = main(["extract", "--input", str(frames_dir), "--output", str(tmp_path / "o"),
                 "--detector", "yolox", "--detector-weights", str(tmp_path / "nope.onnx"),
                 "--embedder", "color_histogram"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "weights not found" in err and "nope.onnx" in err and "\n" not in err
    code = main(["extract", "--input", str(frames_dir), "--output", str(tmp_path / "o"),
                 "--embedder", "color_histogram"] + _models()[:4]
                + ["--detector-sha256", "0" * 64])
    assert code == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "0" * 64 in err
