"""The cctview command line: flags, one-line errors, import-cctview, outputs replaced."""
import json
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import SEED, require_shared
from pipelines.cli import main

CCTVIEW = [sys.executable, "-m", "pipelines.cli"]


def _cli(*args):
    return subprocess.run(CCTVIEW + list(args), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["extract", "--output", "x"], "--input is required"),
    (["extract", "--input", "a", "--output", "x", "--batch-size", "zero"], "--batch-size"),
    (["match", "--detections", "d", "--output", "o", "--policy", "best"], "--policy"),
    (["match", "--detections", "d", "--bogus-flag", "1"], "unknown flag --bogus-flag"),
    (["frobnicate"], "unknown command"),
])
def test_bad_arguments_fail_with_one_line(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_help_explains_every_flag():
    result = _cli("extract", "--help")
    assert result.returncode == 0
    for flag in ("--input", "--start", "--end", "--layout", "--timezone", "--detector",
                 "--detector-weights", "--embedder", "--embedder-weights", "--device",
                 "--batch-size", "--min-score", "--classes", "--output"):
        assert flag in result.stdout
    assert "Beam pipeline options" in result.stdout


def test_unwritable_output_stops_at_once(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["import-cctview", "--input", str(tmp_path), "--output", str(blocker / "out")])
    assert code == 2
    assert "cannot write to output" in capsys.readouterr().err


def test_import_cctview_keeps_every_vector(tmp_path):
    root = require_shared(SEED)
    out = tmp_path / "out"
    assert main(["import-cctview", "--input", str(root), "--output", str(out),
                 "--timezone", "America/New_York"]) == 0
    table = ds.dataset(out / "detections", partitioning="hive").to_table()
    expected = {}
    for features in root.rglob("*--features.json"):
        doc = json.loads(features.read_text())
        for key, value in doc.items():
            if isinstance(value, dict):
                expected[(features.name.split("--")[0], key)] = np.float32(value["data"])
    assert table.num_rows == len(expected) > 0
    rows = table.to_pylist()
    by_vector = {}
    for row in rows:
        by_vector.setdefault(row["camera_id"], []).append(np.float32(row["embedding"]))
    for (camera, _), vector in expected.items():
        assert any(np.array_equal(vector, got) for got in by_vector[camera])
    assert {r["label"] for r in rows} <= {"car", "bus", "truck", "motorcycle", "person"}
    assert all(0 < r["score"] <= 1 and len(r["box_xyxy"]) == 4 for r in rows)
    assert len({r["detection_id"] for r in rows}) == len(rows)
    assert str(table.schema.field("frame_ts").type) == "timestamp[ms, tz=UTC]"
    # The capture time in the path is New York local time (UTC-4 in May).
    assert min(r["frame_ts"] for r in rows).hour == 17
    # A re-run replaces the output: same rows, no duplicates, no stale files.
    files_before = sorted(p.name for p in (out / "detections").rglob("*.parquet"))
    assert main(["import-cctview", "--input", str(root), "--output", str(out),
                 "--timezone", "America/New_York"]) == 0
    again = ds.dataset(out / "detections", partitioning="hive").to_table()
    assert again.num_rows == table.num_rows
    assert sorted(p.name for p in (out / "detections").rglob("*.parquet")) == files_before
    dead = ds.dataset(out / "dead_letter").to_table()
    assert dead.num_rows == 0
