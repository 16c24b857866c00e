"""Hostile inputs: fuzzed frame bytes and frame paths must never crash or hang ReadFrames.

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_hostile_input.py.
"""
import datetime as dt
import os
import random
import resource
import struct
from pathlib import Path

import apache_beam as beam
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from conftest import collect, counters
from transforms.frames import DEAD_LETTER, DEFAULT_MAX_PIXELS, ReadFrames
from transforms.layout import FrameLayout

from unit.test_hostile_input import (DECODE_REASONS, HOSTILE, ROOTS, SAFE_CAMERA, TIMES,
                                     TIMEZONES, _encode, _noise, _png_from_chunks, _png_raw,
                                     _valid_path, check_decode, check_parse, fuzz)
from unit.test_hostile_input import real_jpegs, real_pngs  # noqa: F401,F811  (fixtures)

# Reasons DecodeFrameFn adds around decode_image (parse and read stages).
READ_REASONS = DECODE_REASONS | {"unparseable_path", "read_error", "not_a_regular_file"}

# Damaged frames make PIL warn (e.g. "Corrupt EXIF data"); the contract is about errors.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")


def _png_chunks(data: bytes):
    """PNG bytes -> [(kind, data)] (signature dropped)."""
    pos, chunks = 8, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_bomb(width: int, height: int) -> bytes:
    """A few hundred bytes that declare width x height RGB pixels."""
    return _png_raw(width, height, 8, 2, b"\x00" * 64)


def _sof_offset(data: bytes) -> int:
    """Offset of the first JPEG SOFn marker (FFC0..FFCF except C4, C8, CC)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError("not at a marker")
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return pos
        pos += 2 + length
    raise ValueError("no SOF marker")


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with the frame size in its SOF header rewritten (pixels unchanged)."""
    pos = _sof_offset(data)
    patched = bytearray(data)
    patched[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    return bytes(patched)


FLIPS = st.lists(st.tuples(st.integers(0, 2 ** 31), st.integers(0, 7)), min_size=1,
                 max_size=40)


@fuzz(600)
@given(which=st.integers(0, 7), flips=FLIPS, in_header=st.booleans())
def test_decode_bit_flipped_real_frames(real_jpegs, which, flips, in_header):
    data = bytearray(real_jpegs[which % len(real_jpegs)])
    span = min(len(data), 700) if in_header else len(data)  # headers: DQT, SOF, DHT
    for position, bit in flips:
        data[position % span] ^= 1 << bit
    check_decode(bytes(data))


@fuzz(400)
@given(which=st.integers(0, 1), chunk=st.integers(0, 10 ** 6),
       flips=FLIPS, action=st.sampled_from(["flip", "drop", "duplicate", "swap", "resize"]),
       new_len=st.integers(0, 4096))
def test_decode_png_structure_mutations(real_pngs, which, chunk, flips, action, new_len):
    """PNG chunks changed with a valid CRC, so the damage reaches the decoder."""
    chunks = _png_chunks(real_pngs[which])
    i = chunk % len(chunks)
    kind, data = chunks[i]
    if action == "flip" and data:
        data = bytearray(data)
        for position, bit in flips:
            data[position % len(data)] ^= 1 << bit
        chunks[i] = (kind, bytes(data))
    elif action == "drop":
        del chunks[i]
    elif action == "duplicate":
        chunks.insert(i, (kind, data))
    elif action == "swap" and len(chunks) > 1:
        j = (i + 1) % len(chunks)
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif action == "resize":
        chunks[i] = (kind, (data * (new_len // max(len(data), 1) + 1))[:new_len])
    check_decode(_png_from_chunks(chunks))


PNG_SIDE = st.integers(1, 2 ** 31 - 1) | st.sampled_from([1, 15, 16, 10000, 65535, 2 ** 31 - 1])
JPEG_SIDE = st.integers(1, 65535) | st.sampled_from([1, 15, 16, 4096, 4097, 65535])


@fuzz(300)
@given(width=PNG_SIDE, height=PNG_SIDE)
@example(width=100_000, height=100_000)
@example(width=2 ** 31 - 1, height=2 ** 31 - 1)
@example(width=4097, height=4096)
def test_decode_png_declared_size_bombs(width, height):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reason = check_decode(_png_bomb(width, height), budget_s=1.0)
    if width * height > DEFAULT_MAX_PIXELS:
        assert reason == "too_large"  # decided on the header, before any pixel
    elif min(width, height) < 16:
        assert reason == "too_small"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 512, "a %dx%d header cost %d MB" % (width, height, grown_mb)


@fuzz(300)
@given(which=st.integers(0, 7), width=JPEG_SIDE, height=JPEG_SIDE)
@example(which=0, width=65535, height=65535)
@example(which=0, width=4097, height=4096)
@example(which=0, width=10000, height=10)
def test_decode_jpeg_declared_size_bombs(real_jpegs, which, width, height):
    """Real frames whose SOF header declares another size (up to 65535 x 65535)."""
    data = _jpeg_with_size(real_jpegs[which % len(real_jpegs)], width, height)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reason = check_decode(data, budget_s=1.5)
    if width * height > DEFAULT_MAX_PIXELS:
        assert reason == "too_large"
    elif min(width, height) < 16:
        assert reason == "too_small"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 512


@st.composite
def mutated_paths(draw):
    """A valid layout path, then a few edits: inserts, deletions and replacements with
    hostile text, or the camera id replaced in both places (so it still 'agrees')."""
    when = draw(TIMES)
    suffix = draw(st.sampled_from(["jpeg", "jpg", "png", "JPEG", "gif", "jpeg.txt"]))
    camera = draw(SAFE_CAMERA)
    if draw(st.booleans()):  # a hostile camera id, consistent in folder and name
        camera = "".join(draw(st.lists(HOSTILE | SAFE_CAMERA, min_size=1, max_size=4)))
    path = _valid_path(draw(ROOTS), camera, when, suffix)
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(path)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        text = draw(HOSTILE)
        if edit == "insert":
            path = path[:position] + text + path[position:]
        elif edit == "delete":
            path = path[:position] + path[position + draw(st.integers(1, 5)):]
        else:
            path = path[:position] + text + path[position + len(text):]
    return path


@fuzz(1000)
@given(path=mutated_paths(), timezone=TIMEZONES)
def test_parse_mutated_layout_paths(path, timezone):
    check_parse(FrameLayout(timezone=timezone), path)


# ------------------------------------------------------------- ReadFrames end to end

def _hostile_files(real_jpegs, real_pngs):
    """{relative path: bytes} for a frames folder with unicode/space names."""
    t0 = dt.datetime(2021, 3, 4, 10, 0, 0)
    rng = random.Random(7)
    files = {}

    def at(camera, seconds, suffix="jpeg"):
        when = t0 + dt.timedelta(seconds=seconds)
        return _valid_path(camera, camera, when, suffix)

    flipped = bytearray(real_jpegs[1])
    for _ in range(30):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    header_flipped = bytearray(real_jpegs[2])
    for _ in range(8):
        header_flipped[rng.randrange(2, 600)] = rng.randrange(256)
    files.update({
        at("cam-1", 0): real_jpegs[0],
        at("cam-1", 1): bytes(flipped),
        at("cam-1", 2): bytes(header_flipped),
        at("cam-1", 3): real_jpegs[3][:len(real_jpegs[3]) // 2],
        at("cam-1", 4): b"",
        at("cam-1", 5): os.urandom(5000),
        at("cam-1", 6, "png"): _png_bomb(100_000, 100_000),
        at("cam-1", 7): _jpeg_with_size(real_jpegs[4], 65535, 65535),
        at("cam-1", 8): _encode(Image.fromarray(_noise(1, 1)), "JPEG"),
        at("cam-1", 9, "png"): _encode(Image.fromarray(_noise(10000, 10)), "PNG"),
        at("cam-1", 10): _encode(Image.new("CMYK", (64, 48)), "JPEG"),
        at("cam-1", 11, "png"): _encode(Image.new("I;16", (64, 48), 4000), "PNG"),
        at("cam-1", 12, "png"): real_pngs[0],
        at("cam-1", 13, "png"): real_pngs[0][:-200],
        at("cam-1", 14): _encode(Image.fromarray(_noise(64, 48)), "GIF"),
        at("cam-1", 15): b"<html>not a frame</html>",
        at("cam.v2", 0): real_jpegs[5],  # dots are allowed in camera ids
        at("cam-é", 0): real_jpegs[6],  # non-ASCII camera id: unsafe -> dead letter
        at("cam 2", 0): real_jpegs[6],  # space in camera id: dead letter
        at("a..b", 0): real_jpegs[6],  # '..' in camera id: dead letter
        "cam-1/2021/03/04/10/00/20/cam-1--2021-03-04--10.00.21--original.jpeg":
            real_jpegs[7],  # folder and name disagree
        "cam-1/2021/03/04/10/00/22/cam-2--2021-03-04--10.00.22--original.jpeg":
            real_jpegs[7],  # another camera's name in cam-1's folder
        "cam-1/2021/02/30/10/00/00/cam-1--2021-02-30--10.00.00--original.jpeg":
            real_jpegs[7],  # 30 February
        "cam-1/frame with spaces é ü 😀.jpeg": real_jpegs[0],
        "cam-1/tab\tand\nnewline.jpeg": real_jpegs[0],
        "cam-1/glob[1]*?.jpeg": real_jpegs[0],
        "cam-1/../cam-1/notes.txt": b"x",
        "ünïcödé/2021/03/04/10/00/00/ünïcödé--2021-03-04--10.00.00--original.jpeg":
            real_jpegs[0],
    })
    return files


def test_read_frames_over_hostile_folder(tmp_path, real_jpegs, real_pngs):
    root = tmp_path / "frames root é ü"
    written = []
    for rel, data in _hostile_files(real_jpegs, real_pngs).items():
        path = Path(os.path.normpath(root / rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(str(path))
    written = sorted(set(written))

    p = beam.Pipeline()
    read = p | ReadFrames([str(root)], FrameLayout())
    frames = collect(read.frames | beam.Map(lambda f: (f["uri"], f["camera_id"],
                                                       f["image"].shape,
                                                       str(f["image"].dtype))), "frames")
    dead = collect(read[DEAD_LETTER], "dead")
    result = p.run()
    result.wait_until_finish()
    count = counters(result)

    frame_uris = [f[0] for f in frames]
    dead_uris = [d["uri"] for d in dead]
    assert sorted(frame_uris + dead_uris) == written  # every file exactly once
    assert not set(frame_uris) & set(dead_uris)
    for uri, camera, shape, dtype in frames:
        assert len(shape) == 3 and shape[2] == 3 and dtype == "uint8", uri
        assert camera in ("cam-1", "cam.v2"), camera
    for d in dead:
        assert d["reason"] in READ_REASONS, d
        assert d["stage"] in ("parse", "read", "decode") and d["error"], d
    reasons = {Path(d["uri"]).name: d["reason"] for d in dead}
    assert reasons["cam-1--2021-03-04--10.00.06--original.png"] == "too_large"
    assert reasons["cam-1--2021-03-04--10.00.07--original.jpeg"] == "too_large"
    assert reasons["cam-1--2021-03-04--10.00.08--original.jpeg"] == "too_small"
    assert reasons["cam-1--2021-03-04--10.00.09--original.png"] == "too_small"
    assert reasons["cam-1--2021-03-04--10.00.04--original.jpeg"] == "empty_file"
    assert reasons["cam-1--2021-03-04--10.00.14--original.jpeg"] == "unsupported_format"
    assert reasons["frame with spaces é ü 😀.jpeg"] == "unparseable_path"
    assert reasons["ünïcödé--2021-03-04--10.00.00--original.jpeg"] == "unparseable_path"
    assert count["frames_listed"] == len(written)
    assert count["frames_listed"] == (count.get("frames_decoded", 0)
                                      + count.get("frames_dead_lettered", 0))
    assert count.get("frames_decoded", 0) == len(frames) >= 4
    assert count.get("frames_dead_lettered", 0) == len(dead)


def test_read_frames_with_non_utf8_file_name(tmp_path, real_jpegs):
    root = tmp_path / "frames"
    good = Path(_valid_path(str(root), "cam-1", dt.datetime(2021, 3, 4, 10), "jpeg"))
    good.parent.mkdir(parents=True)
    good.write_bytes(real_jpegs[0])
    with open(os.path.join(os.fsencode(good.parent), b"bad-\xff\xfe.jpeg"), "wb") as handle:
        handle.write(real_jpegs[0])
    p = beam.Pipeline()
    read = p | ReadFrames([str(root)], FrameLayout())
    frames = collect(read.frames | beam.Map(lambda f: f["uri"]), "frames")
    dead = collect(read[DEAD_LETTER], "dead")
    result = p.run()
    result.wait_until_finish()
    assert frames == [str(good)] and len(dead) == 1
    assert counters(result)["frames_listed"] == 2


def test_read_frames_does_not_hang_on_a_fifo(tmp_path, real_jpegs):
    import threading

    root = tmp_path / "frames"
    good = Path(_valid_path(str(root), "cam-1", dt.datetime(2021, 3, 4, 10), "jpeg"))
    fifo = Path(_valid_path(str(root), "cam-1", dt.datetime(2021, 3, 4, 11), "jpeg"))
    good.parent.mkdir(parents=True)
    fifo.parent.mkdir(parents=True)
    good.write_bytes(real_jpegs[0])
    os.mkfifo(fifo)
    box = {}

    def run():
        p = beam.Pipeline()
        read = p | ReadFrames([str(root)], FrameLayout())
        box["frames"] = collect(read.frames | beam.Map(lambda f: f["uri"]), "frames")
        box["dead"] = collect(read[DEAD_LETTER], "dead")
        p.run().wait_until_finish()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=10)
    hung = worker.is_alive()
    if hung:  # unblock the reader: open and close the write end, so it reads EOF
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=30)
    assert not hung, "ReadFrames blocked on a FIFO named like a frame"
    assert box["frames"] == [str(good)]
    assert [d["reason"] for d in box["dead"]] == ["not_a_regular_file"]
