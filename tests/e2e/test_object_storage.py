"""ReadFrames against real object-store servers on loopback: gs:// and s3://."""
import datetime as dt

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from conftest import FRAMES, collect, counters, require_shared, s3_flags, upload_tree
from transforms.frames import DEAD_LETTER, ReadFrames
from transforms.layout import FrameLayout

CAMERA = "733-681-N"
TZ = "America/New_York"


def _frames(patterns, options=None, **kwargs):
    options = options or PipelineOptions(["--project", "test"])
    p = beam.Pipeline(options=options)
    read = p | ReadFrames(patterns, FrameLayout(timezone=TZ), pipeline_options=options, **kwargs)
    got = collect(read.frames | beam.Map(
        lambda f: (f["uri"].split("/frames/", 1)[1], f["camera_id"], f["frame_ts_ms"],
                   int(f["image"].astype("int64").sum()))), "frames")
    dead = collect(read[DEAD_LETTER], "dead")
    result = p.run()
    result.wait_until_finish()
    return sorted(got), dead, counters(result)


def _local_subset(tmp_path):
    """Two cameras' worth of real frames in a local folder named frames/."""
    root = tmp_path / "frames"
    for cam in (CAMERA, "735-683-N"):
        src = require_shared(FRAMES / cam)
        for path in sorted(src.rglob("*.jpeg"))[:40]:
            target = root / path.relative_to(FRAMES)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return root


def _ms(hh, mm, ss):
    local = dt.datetime(2020, 5, 5, hh, mm, ss, tzinfo=dt.timezone(dt.timedelta(hours=-4)))
    return int(local.timestamp() * 1000)


def test_gcs_reads_exactly_the_local_frames(tmp_path, gcs_server):
    root = _local_subset(tmp_path)
    bucket_name = gcs_server()
    bucket = gcs_server.client.bucket(bucket_name)
    uploaded = upload_tree(root, lambda rel, data: bucket.blob("frames/" + rel)
                           .upload_from_string(data, content_type="image/jpeg"))
    local, local_dead, _ = _frames([str(root)])
    remote, remote_dead, count = _frames(["gs://%s/frames/**" % bucket_name])
    assert uploaded == 80 and len(local) == 80
    assert remote == local and remote_dead == local_dead == []
    assert count["frames_decoded"] == 80
    # A time range on gs:// lists camera folders with one delimiter call, then only the
    # hour folders; a 20-second range takes exactly the frames inside it.
    start, end = _ms(13, 10, 0), _ms(13, 10, 20)
    ranged, _, count = _frames(["gs://%s/frames" % bucket_name], start_ms=start, end_ms=end)
    expected = [f for f in local if start <= f[2] < end]
    assert ranged == expected and 0 < len(expected) < 80
    assert count["objects_listed"] == 80  # the one hour folder per camera holds them all


def test_s3_reads_exactly_the_local_frames(tmp_path, s3_server):
    endpoint, client = s3_server
    root = _local_subset(tmp_path)
    client.create_bucket(Bucket="frames-bucket")
    upload_tree(root, lambda rel, data: client.put_object(
        Bucket="frames-bucket", Key="frames/" + rel, Body=data))
    options = PipelineOptions(s3_flags(endpoint))
    local, _, _ = _frames([str(root)])
    remote, dead, _ = _frames(["s3://frames-bucket/frames/**"], options)
    assert remote == local and dead == []
    start, end = _ms(13, 10, 0), _ms(13, 10, 20)
    ranged, _, _ = _frames(["s3://frames-bucket/frames/"], options, start_ms=start, end_ms=end)
    assert ranged == [f for f in local if start <= f[2] < end]


def test_weights_from_gcs_with_sha256_pin(gcs_server):
    import hashlib

    import numpy as np
    import pytest

    from conftest import MODELS
    from models.registry import build_embedder
    from models.weights import WeightsError

    data = require_shared(MODELS / "osnet_x0_25.onnx").read_bytes()
    bucket_name = gcs_server()
    gcs_server.client.bucket(bucket_name).blob("models/osnet.onnx").upload_from_string(data)
    uri = "gs://%s/models/osnet.onnx" % bucket_name
    embedder = build_embedder("onnx", uri, sha256=hashlib.sha256(data).hexdigest())
    image = np.zeros((240, 352, 3), np.uint8)
    assert embedder.embed_crops([image], [np.array([[10, 10, 60, 40]], np.float32)])[0].shape \
        == (1, 512)
    with pytest.raises(WeightsError, match="weights not found: gs://"):
        build_embedder("onnx", "gs://%s/models/missing.onnx" % bucket_name)
    with pytest.raises(WeightsError, match="sha256"):
        build_embedder("onnx", uri, sha256="0" * 64)
