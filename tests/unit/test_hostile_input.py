"""Hostile inputs: fuzzed frame bytes and frame paths must never crash or hang ReadFrames.

What is checked (hypothesis, plus fixed cases for the known-dangerous shapes):

* ``decode_image`` on random bytes, bit-flipped and truncated real frames (read by path
  from ``../shared/data/nyc-fdr/frames``), structure-aware PNG/JPEG mutations (chunk data
  changed with a valid CRC, header segments rewritten), decompression bombs (huge sizes
  declared in PNG IHDR / JPEG SOF), 1x1 and 10000x10 images, odd colour modes and other
  formats: the only exception is ``FrameDecodeError`` with a reason from a fixed
  vocabulary, every example finishes inside a deadline, and a decoded frame is always
  HxWx3 uint8 of the declared size.
* ``FrameLayout.parse`` on mutated layout paths (unicode, spaces, ``..``, slashes,
  control characters, near misses) and on arbitrary text: a ``ParsedPath`` or a
  ``PathParseError``, nothing else; a parsed camera id has no path syntax, so it can
  never take an output path out of its folder.
* End to end (tests/e2e/test_hostile_input.py, with the slowest fuzzing): ``ReadFrames``
  over a folder of hostile files with unicode/space names on
  the DirectRunner: every file ends as a frame or as a dead letter with a known reason,
  and ``frames_listed == frames_decoded + frames_dead_lettered``.

The fixed cases after the fuzz tests are regression tests for the bugs this fuzzing
found (see RELIABILITY.md): a camera id or path ending in a newline, non-ASCII digits in
the layout, capture times outside UTC's datetime range, a file name that is not UTF-8,
a FIFO named like a frame.
"""
import datetime as dt
import io
import os
import struct
import time
import unicodedata
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import FRAMES, require_shared
from transforms.frames import DEFAULT_MAX_PIXELS, FrameDecodeError, decode_image
from transforms.layout import FrameLayout, ParsedPath, PathParseError

DECODE_REASONS = frozenset({"empty_file", "unsupported_format", "too_large", "too_small",
                            "not_an_image", "corrupt_image"})

# Damaged frames make PIL warn (e.g. "Corrupt EXIF data"); the contract is about errors.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

FUZZ = settings(deadline=dt.timedelta(seconds=2), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def fuzz(examples: int) -> settings:
    """Hypothesis settings of these tests: a 2 s deadline per example, no example
    database written into the repository, ``examples`` examples."""
    return settings(FUZZ, max_examples=examples)


# ----------------------------------------------------------------------------- seeds

def _real_frame_paths(count=8):
    root = require_shared(FRAMES)
    paths = sorted(root.rglob("*.jpeg"))
    step = max(1, len(paths) // count)
    return paths[::step][:count]


@pytest.fixture(scope="module")
def real_jpegs():
    """A few real NYC DOT frames, read by path (352x240 baseline JPEG)."""
    return [p.read_bytes() for p in _real_frame_paths()]


@pytest.fixture(scope="module")
def real_pngs(real_jpegs):
    """The same frames as PNG (one full size, one small and interlaced)."""
    out = []
    for i, data in enumerate(real_jpegs[:2]):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if i == 1:
            image = image.resize((64, 44))
        buf = io.BytesIO()
        image.save(buf, "PNG", optimize=False)
        out.append(buf.getvalue())
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png_from_chunks(chunks) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(_png_chunk(k, d) for k, d in chunks)


def _png_raw(width, height, depth, color_type, rows: bytes, interlace=0) -> bytes:
    """A PNG from raw filtered scanlines (for modes PIL does not write, e.g. 16-bit RGB)."""
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, interlace)
    return _png_from_chunks([(b"IHDR", header), (b"IDAT", zlib.compress(rows)),
                             (b"IEND", b"")])


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(width, height, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------- decode contract

def check_decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, budget_s: float = 2.0):
    """decode_image's contract; returns the reason ("ok" for a frame)."""
    start = time.perf_counter()
    try:
        rgb = decode_image(data, max_pixels=max_pixels)
    except FrameDecodeError as exc:
        assert exc.reason in DECODE_REASONS, exc.reason
        assert str(exc), "a dead letter needs an error message"
        reason = exc.reason
    else:
        assert isinstance(rgb, np.ndarray)
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8, (
            rgb.shape, rgb.dtype)
        assert rgb.flags.c_contiguous and rgb.flags.writeable
        width, height = Image.open(io.BytesIO(data)).size
        assert rgb.shape[:2] == (height, width)
        assert min(width, height) >= 16 and width * height <= max_pixels
        reason = "ok"
    elapsed = time.perf_counter() - start
    assert elapsed < budget_s, "decode took %.2f s" % elapsed
    return reason


MAGIC = st.sampled_from([b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
                         b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
                         b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP"])


@fuzz(600)
@given(prefix=MAGIC, body=st.binary(max_size=3000))
@example(prefix=b"", body=b"")
@example(prefix=b"\xff\xd8\xff", body=b"")
def test_decode_random_bytes(prefix, body):
    reason = check_decode(prefix + body)
    if not prefix + body:
        assert reason == "empty_file"


@fuzz(250)
@given(which=st.integers(0, 7), cut=st.floats(0.0, 1.0, exclude_max=True),
       png=st.booleans())
def test_decode_truncated_frames(real_jpegs, real_pngs, which, cut, png):
    seeds = real_pngs if png else real_jpegs
    data = seeds[which % len(seeds)]
    check_decode(data[:int(len(data) * cut)])


@pytest.mark.parametrize("width,height", [(1, 1), (10000, 10), (10, 10000), (15, 4000),
                                          (16, 16), (17, 5000)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_tiny_and_thin_images(width, height, fmt):
    data = _encode(Image.fromarray(_noise(width, height)), fmt)
    reason = check_decode(data)
    assert reason == ("too_small" if min(width, height) < 16 else "ok")


def test_decode_max_pixels_boundary():
    data = _encode(Image.fromarray(_noise(64, 48)), "PNG")
    assert check_decode(data, max_pixels=64 * 48) == "ok"
    assert check_decode(data, max_pixels=64 * 48 - 1) == "too_large"


def _adam7_size(width, height, bytes_per_pixel):
    """Bytes of filtered scanlines of an Adam7-interlaced 8-bit PNG."""
    size = 0
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                           (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        columns = max(0, -(-(width - x0) // dx))
        rows = max(0, -(-(height - y0) // dy))
        if columns and rows:
            size += rows * (1 + columns * bytes_per_pixel)
    return size


def _modes():
    """(name, bytes, expected RGB of pixel (0, 0) or None) for every odd mode PIL writes."""
    w, h = 40, 30
    gray = np.tile(np.arange(w, dtype=np.uint8) * 6, (h, 1))
    g16 = (gray.astype(np.uint16) * 257)
    cases = [
        ("1/PNG", _encode(Image.new("1", (w, h), 1), "PNG"), (255, 255, 255)),
        ("L/PNG", _encode(Image.new("L", (w, h), 77), "PNG"), (77, 77, 77)),
        ("L/JPEG", _encode(Image.new("L", (w, h), 77), "JPEG", quality=100), None),
        ("P/PNG", _encode(Image.new("RGB", (w, h), (10, 200, 30)).convert(
            "P", palette=Image.Palette.ADAPTIVE), "PNG"), (10, 200, 30)),
        ("P+tRNS/PNG", _encode(Image.new("P", (w, h), 0), "PNG", transparency=0), None),
        ("RGBA/PNG", _encode(Image.new("RGBA", (w, h), (1, 2, 3, 0)), "PNG"), (1, 2, 3)),
        ("LA/PNG", _encode(Image.new("LA", (w, h), (99, 10)), "PNG"), (99, 99, 99)),
        ("I;16/PNG", _encode(Image.fromarray(g16), "PNG"), None),
        ("I;16B/PNG", _encode(Image.new("I;16B", (w, h), 300), "PNG"), None),
        ("CMYK/JPEG", _encode(Image.new("CMYK", (w, h), (0, 255, 255, 0)), "JPEG",
                              quality=100), None),
        ("YCbCr/JPEG", _encode(Image.new("YCbCr", (w, h), (128, 128, 128)), "JPEG"), None),
        ("RGBX/JPEG", _encode(Image.new("RGBX", (w, h), (5, 6, 7, 0)), "JPEG"), None),
        ("RGB/progressive JPEG", _encode(Image.fromarray(_noise(w, h)), "JPEG",
                                         progressive=True), None),
        ("RGB/interlaced PNG", _png_raw(w, h, 8, 2, b"\x00" * _adam7_size(w, h, 3),
                                        interlace=1), (0, 0, 0)),
        # 16-bit colour PNGs (PIL reads but does not write them): built from raw rows.
        ("RGB48/PNG", _png_raw(w, h, 16, 2, (b"\x00" + b"\xff\xff\x00\x00\x80\x00" * w) * h),
         (255, 0, 128)),
        ("RGBA64/PNG", _png_raw(w, h, 16, 6, b"".join(
            b"\x00" + b"\x10\x00\x20\x00\x30\x00\xff\xff" * w for _ in range(h))),
         (16, 32, 48)),
        ("LA16/PNG", _png_raw(w, h, 16, 4, b"".join(b"\x00" + b"\x40\x00\xff\xff" * w
                                                    for _ in range(h))), None),
        ("gray2/PNG", _png_raw(w, h, 2, 0, b"".join(b"\x00" + b"\xff" * (w // 4)
                                                    for _ in range(h))), (255, 255, 255)),
    ]
    try:  # PIL >= 11 deprecates saving mode "I" as PNG; it still writes 16-bit grayscale.
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases.append(("I/PNG", _encode(Image.new("I", (w, h), 1000), "PNG"), None))
    except (OSError, ValueError):
        pass
    return cases


@pytest.mark.parametrize("name,data,pixel", _modes(), ids=[c[0] for c in _modes()])
def test_decode_odd_modes(name, data, pixel):
    rgb = decode_image(data)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8, name
    if pixel is not None:
        assert tuple(int(v) for v in rgb[0, 0]) == pixel, name
    if name.startswith("I;16/"):  # a gradient stays a monotone gradient
        assert np.all(np.diff(rgb[0, :, 0].astype(int)) >= 0)
        assert rgb[0, -1, 0] > rgb[0, 0, 0]


def _other_formats():
    image = Image.fromarray(_noise(40, 30))
    out = [("GIF", _encode(image, "GIF")), ("BMP", _encode(image, "BMP")),
           ("TIFF", _encode(image, "TIFF")), ("PPM", _encode(image, "PPM")),
           ("ICO", _encode(image, "ICO")),
           # Mode F (32-bit float) exists only in formats like TIFF: never a frame.
           ("F/TIFF", _encode(Image.new("F", (40, 30), 0.5), "TIFF"))]
    try:
        out.append(("WEBP", _encode(image, "WEBP")))
    except (OSError, KeyError):
        pass
    return out


@pytest.mark.parametrize("name,data", _other_formats(),
                         ids=[c[0] for c in _other_formats()])
def test_decode_other_formats_are_dead_lettered(name, data):
    assert check_decode(data) == "unsupported_format", name


# -------------------------------------------------------------------- path parsing

SAFE_CAMERA = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z").filter(
    lambda c: ".." not in c)
HOSTILE_CHARS = ["/", "\\", "..", "../", "/..", ".", " ", "\t", "\n", "\r", "\x00", "\x1b",
                 "\x7f", "é", "Ⅻ", "٢", "０", "\u200b", "\u202e", "／", "．", "%2F",
                 "%00", "-", "--", "*", "?", "[", "~", ":", "C:", "😀", "\ud800"]
HOSTILE = st.sampled_from(HOSTILE_CHARS) | st.text(min_size=1, max_size=3)
TIMES = st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30))
ROOTS = st.sampled_from(["", "/data", "gs://bucket/frames", "s3://b/x y", "/tmp/é ü",
                         "C:\\frames", "../..", "a/..", "."])
TIMEZONES = st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata"])


def _valid_path(root: str, camera: str, when: dt.datetime, suffix: str) -> str:
    f = "%04d/%02d/%02d/%02d/%02d/%02d" % (when.year, when.month, when.day, when.hour,
                                           when.minute, when.second)
    return "%s/%s/%s/%s--%s-%s-%s--%s.%s.%s--original.%s" % (
        root, camera, f, camera, *f.split("/"), suffix)


def _is_control(char: str) -> bool:
    return unicodedata.category(char).startswith("C")


def check_parse(layout: FrameLayout, path: str, out_root="/srv/out"):
    """parse's contract; returns the ParsedPath or None for a PathParseError."""
    try:
        parsed = layout.parse(path)
    except PathParseError as exc:
        assert str(exc)
        return None
    assert isinstance(parsed, ParsedPath)
    camera = parsed.camera_id
    assert isinstance(camera, str) and camera
    assert "/" not in camera and "\\" not in camera and ".." not in camera, repr(camera)
    assert camera not in (".", "..")
    assert not any(_is_control(c) for c in camera), repr(camera)
    assert camera == camera.strip(" ")
    # The id can never take an output path out of its folder.
    joined = os.path.normpath(os.path.join(out_root, "camera=%s" % camera, "x"))
    assert joined.startswith(out_root + os.sep), joined
    assert camera in path.replace("\\", "/")
    assert isinstance(parsed.frame_ts_ms, int)
    return parsed


@fuzz(300)
@given(camera=SAFE_CAMERA, when=TIMES, root=ROOTS, timezone=TIMEZONES)
def test_parse_valid_paths_round_trip(camera, when, root, timezone):
    parsed = check_parse(FrameLayout(timezone=timezone),
                         _valid_path(root, camera, when, "jpeg"))
    assert parsed is not None and parsed.camera_id == camera


@fuzz(400)
@given(text=st.text(max_size=200))
def test_parse_arbitrary_text(text):
    check_parse(FrameLayout(), text)


CUSTOM_LAYOUTS = [
    r"(?P<camera>[^/]+)_(?P<ts>[^/_]+)\.(?:jpe?g|png)$",
    r"(?P<camera>.+)/(?P<date>[^/]+)/(?P<time>[^/]+)\.jpg$",
    r"(?P<camera>[^/]*)--(?P<date>\d{4}-\d{2}-\d{2})T(?P<time>\d{2}:\d{2}(?::\d{2})?)",
]


@fuzz(600)
@given(which=st.integers(0, len(CUSTOM_LAYOUTS) - 1),
       camera=HOSTILE | SAFE_CAMERA | st.text(max_size=12),
       stamp=st.sampled_from(["1700000000", "1700000000.5", "1700000000123", "20240101120000",
                              "2024-01-01T12:00:00+05:00", "0001-01-01T00:00:00",
                              "99999999999999999999", "nan", "1e308", "-1", ""])
       | st.text(max_size=25),
       date=st.sampled_from(["2024-01-01", "20240101", "0000-00-00", "2024/13/40"])
       | st.text(max_size=12),
       time_=st.sampled_from(["12:00", "12:00:00", "1200", "25:61:61"]) | st.text(max_size=9))
def test_parse_custom_regex_layouts(which, camera, stamp, date, time_):
    """User layouts capture anything; parse must still return or raise PathParseError."""
    layout = FrameLayout(CUSTOM_LAYOUTS[which], "America/New_York")
    if which == 0:
        path = "gs://b/%s_%s.jpg" % (camera, stamp)
    elif which == 1:
        path = "/r/%s/%s/%s.jpg" % (camera, date, time_)
    else:
        path = "/r/%s--%sT%s" % (camera, date, time_)
    check_parse(layout, path)


# Regression tests for bugs found by the fuzzing above (each was reproduced first, then
# fixed in transforms/layout.py and transforms/frames.py).

@pytest.mark.parametrize("layout,path", [
    (FrameLayout(), "r/cam\n/2024/01/01/00/00/00/cam\n--2024-01-01--00.00.00--original.jpeg"),
    (FrameLayout(r"(?P<camera>[^/]+)_(?P<ts>\d{10})\.jpg$"), "x/cam\n_1700000000.jpg"),
])
def test_camera_id_never_ends_with_a_newline(layout, path):
    try:
        parsed = layout.parse(path)
    except PathParseError:
        return
    assert not any(_is_control(c) for c in parsed.camera_id), repr(parsed.camera_id)


def test_layout_path_with_trailing_newline_is_rejected():
    with pytest.raises(PathParseError):
        FrameLayout().parse("r/cam/2024/01/01/00/00/00/cam--2024-01-01--00.00.00--"
                            "original.jpeg\n")


def test_layout_digits_are_ascii_only():
    with pytest.raises(PathParseError):
        FrameLayout().parse("r/cam/٢٠٢٤/01/01/00/00/00/cam--٢٠٢٤-01-01--00.00.00--"
                            "original.jpeg")


@pytest.mark.parametrize("timezone,when", [("America/New_York", "9999-12-31--23.00.00"),
                                           ("Asia/Tokyo", "0001-01-01--00.00.00")])
def test_parsed_capture_time_is_representable_in_outputs(timezone, when):
    from transforms.parquet_io import hour_partition

    date, clock = when.split("--")
    path = "r/cam/%s/%s/cam--%s--original.jpeg" % (
        date.replace("-", "/"), clock.replace(".", "/"), when)
    try:
        parsed = FrameLayout(timezone=timezone).parse(path)
    except PathParseError:
        return
    hour_partition(parsed.frame_ts_ms)  # what the detections writer does with it
