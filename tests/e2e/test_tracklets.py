"""Within-camera tracklets (transforms/tracklets.py) on synthetic tracks with known truth.

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_tracklets.py.
"""
import numpy as np


from unit.test_tracklets import two_cameras
LINKS = [{"camera_a": "cam-a", "camera_b": "cam-b", "offset_s": 12.0, "spread_s": 6.0}]


def test_beam_with_tracklets_equals_pure():
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from conftest import collect
    from transforms import learned_matching as lm
    from transforms import match_blocks as mb

    dets = [{k: v for k, v in d.items() if k != "vid"} for d in two_cameras(seed=1)]
    want, stats = lm.match_linked_periods(dets, LINKS, min_precision=0.8, tracklets=True)
    assert want and all(m["tracklet_id_a"] and m["tracklet_id_b"] for m in want)
    p = beam.Pipeline(runner=FnApiRunner())
    out = collect(p | beam.Create(dets, reshuffle=False)
                  | lm.LearnedLinkMatch(LINKS, min_precision=0.8, tracklets=True), "trk")
    p.run().wait_until_finish()
    assert sorted(out, key=mb.match_sort_key) == want


def write_two_cameras(folder, seed=1) -> list:
    """``two_cameras(seed)`` written as ``folder/dets.parquet`` (the detections columns
    ``cctview match`` reads) with ``LINKS`` as ``folder/links.json``; -> the detections."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    dets = two_cameras(seed=seed)
    pq.write_table(pa.table({
        "camera_id": [d["camera_id"] for d in dets],
        "frame_ts": pa.array([d["frame_ts_ms"] for d in dets], pa.timestamp("ms")),
        "detection_id": [d["detection_id"] for d in dets],
        "embedding": pa.array([d["embedding"].tolist() for d in dets], pa.list_(pa.float32())),
        "box_xyxy": pa.array([[float(v) for v in d["box_xyxy"]] for d in dets],
                             pa.list_(pa.float32(), 4))}), folder / "dets.parquet")
    (folder / "links.json").write_text(json.dumps(LINKS))
    return dets


def test_cli_match_links_writes_tracklet_ids(tmp_path):
    """`cctview match --links` uses tracklets by default (tracklet ids in the Parquet
    matches); `--tracklets off` leaves the columns empty."""
    import pyarrow.dataset as ds

    from pipelines.cli import main

    dets = write_two_cameras(tmp_path)
    got = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        flags = [] if mode == "on" else ["--tracklets", "off"]
        assert main(["match", "--detections", str(tmp_path / "dets.parquet"), "--output",
                     str(out), "--links", str(tmp_path / "links.json"),
                     "--min-precision", "0.8"] + flags) == 0
        got[mode] = ds.dataset(out / "matches", partitioning="hive").to_table().to_pylist()
    assert got["on"] and all(r["tracklet_id_a"] and r["tracklet_id_b"] for r in got["on"])
    assert got["off"] and all(r["tracklet_id_a"] is None for r in got["off"])
    vid = {d["detection_id"]: d["vid"] for d in dets}
    for mode in ("on", "off"):
        rows = got[mode]
        print(mode, len(rows), np.mean([vid[r["detection_id_a"]] == vid[r["detection_id_b"]]
                                        for r in rows]))
