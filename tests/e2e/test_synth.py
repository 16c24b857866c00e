"""The synthetic world (pipelines.synth): layout, ground truth, transit truth, determinism.

The demo and the scoring of every stage lean on this data, so its promises are checked
here: frames the pipeline's own path parser accepts, boxes that lie inside frames, vehicles
that really travel between cameras with the transit times links.json claims, and the same
bytes for the same seed.
"""
import argparse
import datetime as dt
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import synth
from transforms.layout import FrameLayout

START = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "world"
    summary = synth.synthesize(str(out), cameras=3, minutes=2, seed=1)
    return out, summary


def _files(root: Path) -> dict:
    """relative path -> sha256 of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _truth(root: Path):
    return pq.read_table(root / "ground_truth" / "boxes.parquet")


def test_frames_follow_the_cctview_layout(world):
    out, summary = world
    layout = FrameLayout()  # the default: cctview, UTC
    frames = sorted((out / "frames").rglob("*.jpeg"))
    assert len(frames) == summary["frames"] > 0
    per_camera = defaultdict(set)
    start_ms = int(START.timestamp() * 1000)
    for path in frames:
        parsed = layout.parse(str(path))
        assert parsed.camera_id in summary["cameras"]
        assert start_ms <= parsed.frame_ts_ms < start_ms + 120_000
        assert parsed.frame_ts_ms % 1000 == 0
        per_camera[parsed.camera_id].add(parsed.frame_ts_ms)
    assert sorted(per_camera) == ["cam-01", "cam-02", "cam-03"]
    # about one frame a second per camera (a few dropped), never two in one second
    for stamps in per_camera.values():
        assert 100 <= len(stamps) <= 120
    assert sum(len(s) for s in per_camera.values()) == len(frames)
    for path in frames[::37]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (352, 240) and im.mode == "RGB"


def test_ground_truth_boxes(world):
    out, summary = world
    table = _truth(out)
    schema = table.schema
    assert schema.field("frame_ts").type == pa.timestamp("ms", tz="UTC")
    assert schema.field("box_xyxy").type == pa.list_(pa.float32(), 4)
    assert schema.field("vehicle_id").type == pa.int64()
    assert schema.field("visible_fraction").type == pa.float32()
    assert table.num_rows == summary["boxes"] > 100
    boxes = np.asarray(table.column("box_xyxy").combine_chunks().flatten()).reshape(-1, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 352).all() and (boxes[:, 3] <= 240).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    vis = table.column("visible_fraction").to_numpy()
    assert ((vis > 0) & (vis <= 1)).all()
    assert (vis < 0.7).any()  # occlusion and frame edges do happen
    assert set(table.column("label").to_pylist()) <= {"car", "bus", "truck", "motorcycle"}
    # every box points at a written frame of its camera and time
    layout = FrameLayout()
    written = {str(p) for p in (out / "frames").rglob("*.jpeg")}
    for row in table.slice(0, 200).to_pylist():
        assert row["frame_uri"] in written
        parsed = layout.parse(row["frame_uri"])
        assert parsed.camera_id == row["camera_id"]
        assert parsed.frame_ts_ms == int(row["frame_ts"].timestamp() * 1000)
    # the saved empty roads are the cameras' views
    for cam in summary["cameras"]:
        with Image.open(out / "ground_truth" / "backgrounds" / (cam + ".png")) as im:
            assert im.size == (352, 240)


def test_vehicles_travel_between_cameras_as_links_json_says(world):
    out, summary = world
    links = json.loads((out / "ground_truth" / "links.json").read_text())
    assert links and all(l["camera_a"] < l["camera_b"] for l in links)
    for link in links:
        assert {"camera_a", "camera_b", "offset_s", "spread_s", "support", "significance"} <= set(link)
        assert link["spread_s"] > 0 and link["support"] >= 2
        # cam-01 is at the smallest x: traffic towards +x reaches camera_a first
        assert (link["offset_s"] > 0) == (link["direction"] == "+x")
    # neighbours 400 m apart at ~15 m/s: ~27 s; two links per neighbouring pair
    near = [l for l in links if (l["camera_a"], l["camera_b"]) == ("cam-01", "cam-02")]
    assert sorted(l["direction"] for l in near) == ["+x", "-x"]
    assert all(15 < abs(l["offset_s"]) < 45 for l in near)

    rows = _truth(out).to_pylist()
    seen = defaultdict(list)          # (vehicle, camera) -> frame seconds
    direction = {}
    for r in rows:
        if r["visible_fraction"] >= 0.5:
            seen[(r["vehicle_id"], r["camera_id"])].append(r["frame_ts"].timestamp())
            direction[r["vehicle_id"]] = r["direction"]
    cameras_of = defaultdict(set)
    for vid, cam in seen:
        cameras_of[vid].add(cam)
    multi = [vid for vid, cams in cameras_of.items() if len(cams) > 1]
    assert len(multi) >= 10
    # not every vehicle reaches every camera (exits, ramps)
    assert any(len(cameras_of[v]) < 3 for v in cameras_of)
    inside = total = 0
    for link in links:
        want = +1 if link["direction"] == "+x" else -1
        for vid in multi:
            a, b = seen.get((vid, link["camera_a"])), seen.get((vid, link["camera_b"]))
            if not a or not b or direction[vid] != want:
                continue
            dt_s = np.mean(b) - np.mean(a)
            total += 1
            inside += abs(dt_s - link["offset_s"]) <= link["spread_s"]
    assert total >= 10
    assert inside / total >= 0.9


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth.synthesize(str(a), cameras=2, minutes=0.5, seed=7)
    synth.synthesize(str(b), cameras=2, minutes=0.5, seed=7)
    synth.synthesize(str(c), cameras=2, minutes=0.5, seed=8)
    fa, fb, fc = _files(a), _files(b), _files(c)
    # boxes.parquet holds absolute frame URIs (to join with detections), so compare it as
    # a table with the roots stripped
    for files in (fa, fb, fc):
        files.pop("ground_truth/boxes.parquet")
    assert fa == fb
    ta, tb = _truth(a).to_pylist(), _truth(b).to_pylist()
    for rows, root in ((ta, a), (tb, b)):
        for r in rows:
            r["frame_uri"] = r["frame_uri"][len(str(root)):]
    assert ta == tb
    frames_a = {k: v for k, v in fa.items() if k.startswith("frames/")}
    frames_c = {k: v for k, v in fc.items() if k.startswith("frames/")}
    assert frames_a != frames_c
    common = set(frames_a) & set(frames_c)
    assert sum(frames_a[k] != frames_c[k] for k in common) > 0.9 * len(common)
    # a re-run into the same folder replaces, never mixes
    synth.synthesize(str(a), cameras=1, minutes=0.25, seed=7)
    cams = {p.name for p in (a / "frames").iterdir() if any(p.rglob("*.jpeg"))}
    assert cams == {"cam-01"}


def _road_error(root: Path) -> float:
    """Mean abs difference between the first frame and the camera's saved empty road,
    outside the vehicles' boxes."""
    bg = np.asarray(Image.open(root / "ground_truth" / "backgrounds" / "cam-01.png"), np.float32)
    frame = sorted((root / "frames").rglob("*.jpeg"))[0]
    boxes = [r["box_xyxy"] for r in _truth(root).to_pylist() if r["frame_uri"] == str(frame)]
    img = np.asarray(Image.open(frame), np.float32)
    road = np.ones(img.shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        road[int(y0):int(y1), int(x0):int(x1)] = False
    return float(np.abs(img - bg)[road].mean())


def test_noise_zero_is_clean_and_noise_scales(tmp_path):
    clean = synth.synthesize(str(tmp_path / "clean"), cameras=1, minutes=0.5, seed=2, noise=0)
    synth.synthesize(str(tmp_path / "noisy"), cameras=1, minutes=0.5, seed=2, noise=1.5)
    # no jitter or drops without noise: one frame every second
    assert clean["frames"] == 30
    clean_error = _road_error(tmp_path / "clean")
    assert clean_error < 4.0  # JPEG loss only
    assert _road_error(tmp_path / "noisy") > clean_error + 2.0


def test_cli_glue(tmp_path, capsys):
    parser = synth.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--output", str(tmp_path / "o"), "--cameras", "2",
                              "--minutes", "0.2", "--seed", "4", "--noise", "0.5", "--fps", "0.5"])
    assert synth.run_from_args(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cameras"] == ["cam-01", "cam-02"] and summary["seed"] == 4
    assert 8 <= summary["frames"] <= 14   # 2 cameras x 12 s at 0.5 fps
    from runners.errors import UsageError
    for bad in (["--fps", "2"], ["--cameras", "0"], ["--minutes", "-1"]):
        with pytest.raises(UsageError):
            synth.run_from_args(parser.parse_args(["--output", str(tmp_path / "x")] + bad))


def test_default_world_renders_fast(tmp_path):
    """The embedded default (3 cameras x 5 minutes) must stay cheap: the demo runs it."""
    began = time.perf_counter()
    summary = synth.synthesize(str(tmp_path / "default"))
    took = time.perf_counter() - began
    assert summary["frames"] >= 800 and summary["links"] >= 4
    assert took < 25, "3 cameras x 5 minutes took %.1f s" % took
