"""ReadFrames: listing, path parsing, decoding and dead letters, on real frames.

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_frames.py.
"""
import datetime as dt
import io
import re
import struct
import zlib
from pathlib import Path

import apache_beam as beam
import numpy as np
from PIL import Image

from conftest import FRAMES, collect, counters, require_shared
from transforms.frames import DEAD_LETTER, ReadFrames, listing_patterns
from transforms.layout import FrameLayout

from unit.test_frames import NY
NAME_RE = re.compile(r"(?P<cam>[^/]+)--(?P<d>\d{4}-\d{2}-\d{2})--(?P<t>\d{2}\.\d{2}\.\d{2})--original")


def _expected_ms(path: str, tz=NY) -> int:
    m = NAME_RE.search(path)
    local = dt.datetime.strptime(m["d"] + " " + m["t"], "%Y-%m-%d %H.%M.%S").replace(tzinfo=tz)
    return int(local.timestamp() * 1000)


def _run(patterns, layout=None, **kwargs):
    p = beam.Pipeline()
    read = p | ReadFrames(patterns, layout or FrameLayout(timezone="America/New_York"), **kwargs)
    frames = collect(read.frames | beam.Map(lambda f: {k: f[k] for k in f if k != "image"}
                                            | {"shape": f["image"].shape,
                                               "dtype": str(f["image"].dtype)}), "frames")
    dead = collect(read[DEAD_LETTER], "dead")
    result = p.run()
    result.wait_until_finish()
    return frames, dead, counters(result)


def _jpeg(width=352, height=240, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bomb(width=100_000, height=100_000) -> bytes:
    """A PNG whose header declares 10 G pixels; its data is a few bytes."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def frame_path(root: Path, cam: str, when: dt.datetime, suffix="jpeg") -> Path:
    stamp = when.strftime("%Y-%m-%d--%H.%M.%S")
    path = root / cam / when.strftime("%Y/%m/%d/%H/%M/%S") / (
        "%s--%s--original.%s" % (cam, stamp, suffix))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_real_frames_all_parsed_and_decoded():
    root = require_shared(FRAMES)
    files = sorted(str(p) for p in root.rglob("*.jpeg"))
    frames, dead, count = _run([str(root)])
    assert dead == []
    assert len(frames) == len(files) > 1000
    by_uri = {f["uri"]: f for f in frames}
    assert sorted(by_uri) == files
    for uri, frame in by_uri.items():
        assert frame["camera_id"] == Path(uri).parts[-8]
        assert frame["frame_ts_ms"] == _expected_ms(uri)
        assert frame["shape"] == (240, 352, 3) and frame["dtype"] == "uint8"
    assert count["frames_listed"] == count["frames_decoded"] == len(files)
    assert count.get("frames_dead_lettered", 0) == 0


def test_mixed_folder_exact_counts(tmp_path):
    t0 = dt.datetime(2021, 3, 4, 10, 0, 0)
    good = [frame_path(tmp_path, "cam-1", t0 + dt.timedelta(seconds=i)) for i in range(5)]
    for i, path in enumerate(good):
        path.write_bytes(_jpeg(seed=i))
    png = frame_path(tmp_path, "cam-2", t0, "png")
    Image.fromarray(np.zeros((240, 352, 4), np.uint8), "RGBA").save(png)
    bad = {
        "empty_file": frame_path(tmp_path, "cam-3", t0 + dt.timedelta(seconds=1)),
        "corrupt_image": frame_path(tmp_path, "cam-3", t0 + dt.timedelta(seconds=2)),
        "not_an_image": frame_path(tmp_path, "cam-3", t0 + dt.timedelta(seconds=3)),
        "too_large": frame_path(tmp_path, "cam-3", t0 + dt.timedelta(seconds=4), "png"),
        "too_small": frame_path(tmp_path, "cam-3", t0 + dt.timedelta(seconds=5)),
    }
    bad["empty_file"].write_bytes(b"")
    bad["corrupt_image"].write_bytes(_jpeg(seed=9)[:3000])
    bad["not_an_image"].write_text("this is not a jpeg")
    bad["too_large"].write_bytes(_png_bomb())
    bad["too_small"].write_bytes(_jpeg(1, 1))
    near_miss = good[0].parent / "cam-1--2021-03-04--10.00.01--original.jpeg"  # wrong second
    near_miss.write_bytes(_jpeg())
    stray = tmp_path / "cam-1" / "notes.txt"
    stray.write_text("x")
    frames, dead, count = _run([str(tmp_path) + "/**"])
    reasons = {d["uri"]: d["reason"] for d in dead}
    for reason, path in bad.items():
        assert reasons[str(path)] == reason
    assert reasons[str(near_miss)] == "unparseable_path"
    assert reasons[str(stray)] == "unparseable_path"
    assert len(frames) == 6 and len(dead) == 7
    assert count["frames_listed"] == 13
    assert count["frames_decoded"] == 6 and count["frames_dead_lettered"] == 7
    assert all(set(d) == {"uri", "stage", "reason", "error", "ts_ms"} for d in dead)
    assert {f["shape"] for f in frames} == {(240, 352, 3)}


def test_time_range_lists_only_hours_in_range(tmp_path):
    """Several days of objects; a 90-minute range lists only its two hour folders."""
    cams = ["cam-a", "cam-b"]
    t0 = dt.datetime(2021, 6, 1, 0, 0, 0)
    data = _jpeg(64, 48)
    written = 0
    for cam in cams:
        for day in range(3):
            for hour in range(0, 24, 2):
                for minute in (0, 30):
                    when = t0 + dt.timedelta(days=day, hours=hour, minutes=minute)
                    frame_path(tmp_path, cam, when).write_bytes(data)
                    written += 1
    layout = FrameLayout(timezone="UTC")
    start = int(dt.datetime(2021, 6, 2, 10, 15, tzinfo=dt.timezone.utc).timestamp() * 1000)
    end = int(dt.datetime(2021, 6, 2, 11, 45, tzinfo=dt.timezone.utc).timestamp() * 1000)
    patterns = listing_patterns([str(tmp_path)], layout, start, end)
    assert patterns == ["%s/%s/2021/06/02/%s/**" % (tmp_path, c, h)
                        for c in cams for h in ("10", "11")]
    frames, dead, count = _run([str(tmp_path)], layout, start_ms=start, end_ms=end)
    # Only hour 10 holds frames (10:00 and 10:30); 11 has none; 10:00 is before start.
    assert count["objects_listed"] == 4  # 2 cameras x (10:00, 10:30): nothing else listed
    assert count["files_outside_range"] == 2
    assert sorted((f["camera_id"], f["frame_ts_ms"]) for f in frames) == [
        (c, int(dt.datetime(2021, 6, 2, 10, 30, tzinfo=dt.timezone.utc).timestamp() * 1000))
        for c in cams]
    assert dead == [] and written == 144
    # A root that is a single camera folder works the same way.
    assert listing_patterns([str(tmp_path / "cam-a")], layout, start, end) == [
        "%s/cam-a/2021/06/02/%s/**" % (tmp_path, h) for h in ("10", "11")]
