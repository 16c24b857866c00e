"""cctview run and cctview match: frames -> detections -> matches, and re-matching
from stored embeddings (ours and CCTView's reference Parquet) with no model."""
import datetime as dt

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from conftest import CLASSICAL, REFERENCE, collect, require_shared
from pipelines.cli import main
from transforms.match_blocks import match_arrays

def _table(folder):
    return ds.dataset(folder, partitioning="hive", format="parquet").to_table()


def _pairs(table):
    return sorted(zip(table["detection_id_a"].to_pylist(), table["detection_id_b"].to_pylist()))


def test_run_writes_all_tables_and_match_replays_them(small_world, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--input", str(small_world / "frames"), "--output", str(out), "--max-gap", "60"]
    assert main(argv + CLASSICAL) == 0
    detections, matches = _table(out / "detections"), _table(out / "matches")
    assert detections.num_rows > 100 and matches.num_rows > 10
    assert ds.dataset(out / "dead_letter").count_rows() == 0
    rows = matches.to_pylist()
    for m in rows:
        assert m["camera_id_a"] < m["camera_id_b"]
        assert m["dt_seconds"] == pytest.approx(
            (m["frame_ts_b"] - m["frame_ts_a"]).total_seconds())
        assert 0 < abs(m["dt_seconds"]) <= 60 and m["policy"] == "mutual"
        assert m["date"] == m["frame_ts_a"].strftime("%Y-%m-%d")
    assert all(p.parent.name.startswith("hour=") and p.parent.parent.name.startswith("date=")
               for p in (out / "matches").rglob("*.parquet"))
    assert str(matches.schema.field("distance").type) == "float"
    assert str(matches.schema.field("dt_seconds").type) == "double"
    # Models ran once; matching replays from the stored embeddings and agrees exactly.
    again = tmp_path / "rematch"
    assert main(["match", "--detections", str(out / "detections"), "--output", str(again),
                 "--max-gap", "60"]) == 0
    assert _pairs(_table(again / "matches")) == _pairs(matches)
    # A re-run into the same folder replaces its tables: same rows, no stale files.
    files = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    assert main(argv + CLASSICAL) == 0
    assert sorted(p.relative_to(out) for p in out.rglob("*.parquet")) == files
    assert _pairs(_table(out / "matches")) == _pairs(matches)
    assert _table(out / "detections").num_rows == detections.num_rows


def test_privacy_flags_crops_and_no_embeddings(small_world, tmp_path):
    out = tmp_path / "private"
    plain = ["run", "--input", str(small_world / "frames"), "--max-gap", "60"] + CLASSICAL
    assert main(plain + ["--output", str(out)]) == 0
    assert not (out / "crops").exists()
    assert _table(out / "detections")["embedding"].null_count == 0
    assert main(plain + ["--output", str(out), "--write-crops", "--no-embeddings-out"]) == 0
    detections = _table(out / "detections")
    assert detections["embedding"].null_count == detections.num_rows
    crops = sorted(p.stem for p in (out / "crops").rglob("*.jpg"))
    assert crops == sorted(detections["detection_id"].to_pylist())
    assert _table(out / "matches").num_rows > 0  # matching still had the embeddings


def _reference_subset(tmp_path):
    """Five minutes of CCTView's reference detections of two cameras, as stored:
    float16 fixed-size embeddings, naive camera-local timestamps."""
    tables = []
    for camera in ("733-681-N", "735-683-N"):
        table = pq.read_table(require_shared(REFERENCE / ("%s.parquet" % camera)))
        keep = pc.and_(pc.greater_equal(table["frame_ts"], pa.scalar(
            dt.datetime(2020, 5, 5, 13, 10), pa.timestamp("ms"))), pc.less(
            table["frame_ts"], pa.scalar(dt.datetime(2020, 5, 5, 13, 15), pa.timestamp("ms"))))
        table = table.filter(keep)
        pq.write_table(table, tmp_path / ("%s.parquet" % camera))
        tables.append(table)
    return pa.concat_tables(tables)


def test_match_reads_cctview_reference_parquet(tmp_path):
    ref = _reference_subset(tmp_path)
    assert ref.schema.field("embedding").type == pa.list_(pa.float16(), 1920)
    out = tmp_path / "out"
    assert main(["match", "--detections", str(tmp_path / "733-681-N.parquet"),
                 str(tmp_path / "735-683-N.parquet"), "--timezone", "America/New_York",
                 "--output", str(out), "--policy", "mutual", "--max-gap", "120"]) == 0
    got = _table(out / "matches")
    local = ref["frame_ts"].cast(pa.int64()).to_numpy()
    utc_ms = local + 4 * 3600 * 1000  # New York is UTC-4 in May
    emb = np.stack(ref["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    expected = match_arrays(ref["camera_id"].to_pylist(), utc_ms, emb,
                            ref["detection_id"].to_pylist(), policy="mutual", max_gap_s=120)
    assert got.num_rows == len(expected) > 50
    assert _pairs(got) == sorted((m["detection_id_a"], m["detection_id_b"]) for m in expected)
    assert min(got["frame_ts_a"].to_pylist()).hour == 17  # 13:10 New York = 17:10 UTC


def test_stored_detections_as_columns_and_as_dicts_agree():
    """table_to_columns (what `match` reads) holds what table_to_detections holds: rows
    without an embedding dropped, list or fixed-size list columns, naive times in the
    given zone; ragged embeddings are refused with the reason."""
    from transforms.detections_io import DetectionsSchemaError, table_to_columns, table_to_detections

    table = pa.table({
        "camera_id": ["a", "b", "a"],
        "frame_ts": pa.array([0, 1000, 2000], pa.timestamp("ms")),
        "detection_id": ["x", "y", "z"],
        "embedding": pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32())),
        "score": [0.9, 0.8, 0.7],
    })
    cols = table_to_columns(table, "America/New_York")
    rows = table_to_detections(table, "America/New_York")
    assert len(cols) == len(rows) == 2
    assert cols.camera_id.tolist() == [r["camera_id"] for r in rows] == ["a", "a"]
    assert cols.frame_ts_ms.tolist() == [r["frame_ts_ms"] for r in rows] == [5 * 3600 * 1000, 5 * 3600 * 1000 + 2000]
    assert cols.detection_id.tolist() == ["x", "z"]
    np.testing.assert_array_equal(cols.embedding, np.stack([r["embedding"] for r in rows]))
    fixed = table.set_column(3, "embedding", pa.array([[1, 2], [5, 6], [3, 4]],
                                                      pa.list_(pa.float16(), 2)))
    assert table_to_columns(fixed).embedding.dtype == np.float16
    ragged = table.set_column(3, "embedding", pa.array([[1.0], [1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(DetectionsSchemaError, match="different lengths"):
        table_to_columns(ragged)


def test_stored_rows_are_read_only_where_the_metadata_proves_them_whole(tmp_path):
    """ReadDetections' column chunks point to their stored rows when a row group's
    metadata shows no missing embedding; vectors of unequal sizes that add up to rows x
    size pass that check and are refused where they are read, naming the file."""
    from transforms.detections_io import (DetectionsSchemaError, ReadDetections,
                                          load_stored_rows)
    from transforms.match_blocks import StoredRows

    def write(name, embeddings):
        table = pa.table({"camera_id": ["a", "a", "b"],
                          "frame_ts": pa.array([0, 1000, 2000], pa.timestamp("ms", tz="UTC")),
                          "detection_id": ["x", "y", "z"],
                          "embedding": pa.array(embeddings, pa.list_(pa.float32()))})
        pq.write_table(table, tmp_path / name, row_group_size=2)
        return str(tmp_path / name)

    whole = write("whole.parquet", [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    holed = write("holed.parquet", [[1.0, 2.0], None, [5.0, 6.0]])
    ragged = write("ragged.parquet", [[1.0], [3.0, 4.0, 5.0], [5.0, 6.0]])
    pipeline = beam.Pipeline(runner=FnApiRunner())
    read = {f: collect(pipeline | "Read%d" % i >> ReadDetections([f], as_columns=True,
                                                                cameras=["a", "b"]), str(i))
            for i, f in enumerate((whole, holed))}
    pipeline.run().wait_until_finish()
    kinds = {f: sorted(type(c.embedding).__name__ for c in chunks) for f, chunks in read.items()}
    assert kinds == {whole: ["StoredRows", "StoredRows"], holed: ["StoredRows", "ndarray"]}
    embs, decoded = load_stored_rows([c.embedding for c in read[whole]])
    assert decoded == 3 and sorted(e.tolist() for e in embs) == [[[1, 2], [3, 4]], [[5, 6]]]
    assert sum(len(c) for c in read[holed]) == 2  # the row without one is dropped
    with pytest.raises(DetectionsSchemaError, match="ragged.parquet.*different lengths"):
        load_stored_rows([StoredRows(ragged, 0, np.asarray([0, 1]))])


def test_separate_stages_with_the_background_detector_give_the_fused_detections(small_world, tmp_path):
    """Two RunInference steps (the embedder takes each frame from the detector's result,
    here a (frame, background) pair) write the detections of the fused step."""
    base = ["extract", "--input", str(small_world / "frames")] + CLASSICAL
    assert main(base + ["--output", str(tmp_path / "fused")]) == 0
    assert main(base + ["--output", str(tmp_path / "staged"), "--separate-stages"]) == 0
    fused, staged = [{r["detection_id"]: r for r in _table(tmp_path / name / "detections").to_pylist()}
                     for name in ("fused", "staged")]
    assert fused and sorted(fused) == sorted(staged)
    for key, row in fused.items():
        assert row["box_xyxy"] == staged[key]["box_xyxy"]
        np.testing.assert_allclose(row["embedding"], staged[key]["embedding"], atol=1e-6)
