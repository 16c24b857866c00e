"""Matching and calibration over long periods: the scale world, time chunks that change

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_scale.py.
"""
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import REFERENCE, counters, require_shared
from pipelines.cli import main
from pipelines.scale_world import offset_s, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3 cameras x 12 minutes of scale world."""
    require_shared(REFERENCE)
    root = tmp_path_factory.mktemp("scale-world")
    made = write_world(sorted(str(p) for p in REFERENCE.glob("*.parquet")), str(root), 3, 0.2)
    (root / "links_truth.json").write_text(json.dumps(made["links"]))
    return root, made


def _files(root):
    return sorted(str(p) for p in root.glob("cam-*/*.parquet"))


def _matches(out):
    table = ds.dataset(str(out / "matches"), partitioning="hive").to_table()
    rows = table.select(["detection_id_a", "detection_id_b", "distance", "rank_a", "rank_b",
                         "dt_seconds", "window_start"]).to_pylist()
    return sorted(rows, key=lambda r: (r["detection_id_a"], r["detection_id_b"]))


def test_scale_world_is_real_dense_and_planted(world):
    root, made = world
    files = _files(root)
    assert len(files) == 3 and made["rows"] > 0
    table = pq.read_table(files)
    assert table.schema.field("embedding").type.value_type == "halffloat"
    assert table.schema.field("embedding").type.list_size == 1920
    # real density: rows per camera and hour as in the reference (within 25 %)
    ref = pq.read_table(sorted(REFERENCE.glob("*.parquet")), columns=["camera_id", "frame_ts"])
    ts = ref["frame_ts"].cast("int64").to_numpy()
    ref_rate = len(ref) / 3 / ((ts.max() - ts.min()) / 3.6e6)
    assert abs(made["rows"] / 3 / 0.2 - ref_rate) < 0.25 * ref_rate
    assert len(set(table["detection_id"].to_pylist())) == len(table)
    # planted rows: a planted link's transit time, embeddings close to their original
    ids = table["detection_id"].to_pylist()
    planted = [i for i in ids if "-p-" in i]
    assert len(planted) > 0.1 * len(ids) / 3
    by_id = {i: k for k, i in enumerate(ids)}
    emb = table["embedding"].combine_chunks().values.to_numpy(zero_copy_only=False)
    emb = emb.reshape(len(ids), -1).astype(np.float32)
    stamps = table["frame_ts"].cast("int64").to_numpy()
    near, far, lags = [], [], []
    rng = np.random.default_rng(0)
    for pid in planted[:200]:
        k, j = by_id[pid], by_id[pid.split("-p-", 1)[1]]  # the row it was planted from
        camera = int(pid.split("-")[1])
        lags.append((stamps[k] - stamps[j]) / 1000 - offset_s(camera))
        near.append(np.linalg.norm(emb[k] - emb[j]))
        far.append(np.linalg.norm(emb[k] - emb[rng.integers(len(ids))]))
    assert max(abs(x) for x in lags) <= 3.001  # the link's offset +- its jitter
    assert np.median(near) < 0.7 * np.median(far)


def test_scale_world_is_deterministic(world, tmp_path):
    root, _ = world
    write_world(sorted(str(p) for p in REFERENCE.glob("*.parquet")), str(tmp_path), 3, 0.2)
    for a, b in zip(_files(root), sorted(str(p) for p in tmp_path.glob("cam-*/*.parquet"))):
        assert pq.read_table(a).equals(pq.read_table(b))


@pytest.mark.parametrize("policy, flags", [
    ("mutual", []), ("topk", ["--top-k", "2"]), ("all", ["--threshold", "23"]),
    ("assignment", ["--threshold", "40"])])
def test_time_chunks_give_the_matches_of_one_job(world, tmp_path, policy, flags):
    """--chunk-mb 1 (a chunk per block: many jobs, margins everywhere) == --chunk-mb 0."""
    root, _ = world
    common = ["match", "--detections", *_files(root), "--policy", policy, "--max-gap", "40",
              "--window", "60"] + flags
    assert main(common + ["--output", str(tmp_path / "one"), "--chunk-mb", "0"]) == 0
    assert main(common + ["--output", str(tmp_path / "chunks"), "--chunk-mb", "1"]) == 0
    one, chunks = _matches(tmp_path / "one"), _matches(tmp_path / "chunks")
    assert one and chunks == one
    files = list((tmp_path / "chunks" / "matches").rglob("*.parquet"))
    assert len({f.name.split("-")[1] for f in files}) > 3  # several chunks wrote


def test_shuffled_copies_do_not_grow_with_partner_cameras(world, tmp_path, capsys):
    """Each detection crosses the shuffle ~1 + band/S times, with 3 cameras as with 1
    (every camera sees all the others: partners share the copy sent to their block); read
    from files, as a reference to its stored row, never with its embedding."""
    root, _ = world
    ratios = {}
    for name, files in (("one", _files(root)[:1]), ("three", _files(root))):
        assert main(["match", "--detections", *files, "--output", str(tmp_path / name),
                     "--max-gap", "300", "--chunk-mb", "0"]) == 0
        done = [l for l in capsys.readouterr().out.splitlines() if l.startswith("done:")][-1]
        counts = dict(kv.split("=") for kv in done.split(": ", 1)[1].split(" -> ")[0].split(", "))
        assert "embedding_copies_shuffled" not in counts  # none was counted
        ratios[name] = int(counts["row_references_shuffled"]) / int(counts["detections_batched"])
    # band 600 s, blocks of 1200 s: 1.5 copies on average over a long period, a little
    # more over 12 minutes whose edges fall inside blocks
    assert ratios["three"] <= 2.0
    assert abs(ratios["three"] - ratios["one"]) < 0.15


def test_chunked_calibrate_finds_the_planted_links(world, tmp_path, capsys):
    root, made = world
    target = tmp_path / "links.json"
    assert main(["calibrate", "--detections", *_files(root), "--output", str(target),
                 "--max-gap", "120", "--window", "60", "--chunk-mb", "40"]) == 0
    assert "chunk 2/" in capsys.readouterr().err
    found = json.loads(target.read_text())
    for truth in made["links"]:
        near = [l for l in found if (l["camera_a"], l["camera_b"]) ==
                (truth["camera_a"], truth["camera_b"])
                and abs(l["offset_s"] - truth["offset_s"]) <= 2.0]
        assert near, (truth, found)
    assert not list(tmp_path.glob("links.json.parts/*"))  # parts pooled, then removed


def test_calibrate_searches_only_the_named_pairs(world, tmp_path, capsys):
    """--pairs: one planted pair named (the other way round, from a links.json whose
    offsets are ignored): its links are found, no other pair is histogrammed."""
    root, made = world
    truth = made["links"][0]
    named = tmp_path / "pairs.json"
    named.write_text(json.dumps([{"camera_a": truth["camera_b"], "camera_b": truth["camera_a"],
                                  "offset_s": 999.0, "spread_s": 1.0}]))
    target = tmp_path / "links.json"
    assert main(["calibrate", "--detections", *_files(root), "--output", str(target),
                 "--max-gap", "120", "--window", "60", "--pairs", str(named)]) == 0
    assert "1 camera pair(s) histogrammed" in capsys.readouterr().out
    found = json.loads(target.read_text())
    assert {(l["camera_a"], l["camera_b"]) for l in found} == {
        (truth["camera_a"], truth["camera_b"])}
    assert any(abs(l["offset_s"] - truth["offset_s"]) <= 2.0 for l in found), (truth, found)


@pytest.mark.parametrize("content, needle", [
    (None, "cannot read --pairs"),
    ("{}", "bad --pairs"),
    ('[{"camera_a": "x"}]', "bad --pairs"),
    ('[{"camera_a": "x", "camera_b": "y"}]', "no camera pair of --pairs"),
])
def test_bad_pairs_stop_calibrate_with_one_line(world, tmp_path, capsys, content, needle):
    named = tmp_path / "pairs.json"
    if content is not None:
        named.write_text(content)
    root, _ = world
    assert main(["calibrate", "--detections", *_files(root), "--output",
                 str(tmp_path / "links.json"), "--pairs", str(named)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def _match_counted(source, tmp_path, name):
    """Matches (sorted rows) and counters of ``source | MatchDetections(mutual, 300 s)``
    (blocks of 600 s: the 300-s row groups of the scale world travel as references)."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms.matching import MatchDetections

    p = beam.Pipeline(runner=FnApiRunner())
    _ = (p | source | MatchDetections(policy="mutual", max_gap_s=300, window_s=60)
         | beam.Map(lambda m: json.dumps(m, default=str, sort_keys=True))
         | beam.io.WriteToText(str(tmp_path / name)))
    result = p.run()
    result.wait_until_finish()
    rows = [line for f in sorted(tmp_path.glob(name + "*")) for line in f.read_text().splitlines()]
    return sorted(rows), counters(result)


def test_stored_rows_give_the_matches_of_shuffled_embeddings(world, tmp_path):
    """Column chunks from files leave the embeddings in storage (the blocks read their
    row groups) and match exactly as the same detections whose embeddings travel. One
    file keeps its 300-s row groups (read by the blocks), one is a single 12-minute row
    group (wider than half a block: read before the shuffle), one has a detection without
    an embedding in its first row group (variable lists; that group read as before, the row
    dropped)."""
    from transforms.detections_io import ReadDetections

    root, _ = world
    narrow, wide, holed = _files(root)
    table = pq.read_table(wide)
    pq.write_table(table, tmp_path / "wide.parquet", row_group_size=len(table))
    table = pq.read_table(holed)
    emb = table["embedding"].combine_chunks()
    mask = np.zeros(len(emb), dtype=bool)
    mask[3] = True
    emb = _with_null_rows(emb, mask)
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding", emb)
    pq.write_table(table, tmp_path / "holed.parquet", row_group_size=500)
    files = [narrow, str(tmp_path / "wide.parquet"), str(tmp_path / "holed.parquet")]

    stored, by_reference = _match_counted(ReadDetections(files, as_columns=True), tmp_path, "s")
    shuffled, by_copy = _match_counted(ReadDetections(files), tmp_path, "c")
    assert len(stored) > 100 and stored == shuffled
    batched = by_reference["detections_batched"]
    assert batched == by_copy["detections_batched"] == sum(
        pq.ParquetFile(f).metadata.num_rows for f in files) - 1
    assert by_copy["embedding_copies_shuffled"] > batched and not by_copy.get("stored_rows_read")
    # The wide file (read once, before the shuffle) and the holed file's first group travel
    # as embeddings; the rest as references, each of their groups read by a few blocks.
    with_embeddings = pq.ParquetFile(files[1]).metadata.num_rows + 500 - 1
    assert with_embeddings <= by_reference["embedding_copies_shuffled"] <= 3 * with_embeddings
    assert by_reference["row_references_shuffled"] >= batched - with_embeddings
    assert batched - with_embeddings < by_reference["stored_rows_read"] < 3 * batched
    # (here about 40% of the rows still travel as embeddings: the wide file)
    assert by_reference["shuffled_bytes"] < 0.6 * by_copy["shuffled_bytes"]


def _with_null_rows(emb, mask):
    """``emb`` (a fixed_size_list array) as a variable list column (as the project's own
    files store them) with the rows of ``mask`` null."""
    size = emb.type.list_size
    offsets = pa.array(np.arange(len(emb) + 1, dtype=np.int32) * size)
    return pa.ListArray.from_arrays(offsets, emb.values, mask=pa.array(mask))
