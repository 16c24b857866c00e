"""ReadFrames: frame files on any Beam filesystem -> decoded, timestamped frames.

Listing, path parsing and decoding happen here; every file that is listed ends either
as a frame or as a dead letter with its reason, and the counters ``frames_listed``,
``frames_decoded`` and ``frames_dead_lettered`` reconcile exactly
(listed = decoded + dead-lettered). Files outside ``--start/--end`` are not frames of
the run: the CCTView layout lists whole hour folders, and the files of those folders
outside the range are counted in ``files_outside_range`` and skipped (in a backfill,
those of a neighbouring partition, which reads them itself). ``objects_listed`` counts
every listed object; these counters also tick to the driver's progress line
(:mod:`transforms.progress`).
"""
import io
import logging
import os
import re
import warnings
from typing import List, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from PIL import Image, UnidentifiedImageError

from transforms import progress
from transforms.layout import (
    FrameLayout,
    PathParseError,
    hour_prefixes,
    split_camera_patterns,
)
from transforms.records import dead_letter
from transforms.storage import list_child_folders

__all__ = ["DEAD_LETTER", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "DEFAULT_MIN_SIDE",
           "DecodeFrameFn", "FrameDecodeError", "NAMESPACE", "ReadFrames",
           "ReadFramesOutput", "decode_image", "listing_patterns"]

DEAD_LETTER = "dead_letter"
NAMESPACE = "cctview"

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MIN_SIDE = 16
_IMAGE_SUFFIX = re.compile(r"\.(jpe?g|png)$", re.IGNORECASE)
_SUPPORTED_FORMATS = ("JPEG", "PNG", "MPO")  # MPO: JPEG with extra frames (phones)

_LOG = logging.getLogger(__name__)


def _lists_hour_folders(layout: FrameLayout, start_ms: Optional[int],
                        end_ms: Optional[int]) -> bool:
    """Whether the inputs are listed by hour folder: the CCTView layout and a time range."""
    return layout.is_cctview and start_ms is not None and end_ms is not None


def listing_patterns(patterns: Sequence[str], layout: FrameLayout,
                     start_ms: Optional[int], end_ms: Optional[int],
                     pipeline_options=None) -> List[str]:
    """The file patterns to list for the inputs and the time range.

    With the CCTView layout and a time range, only the per-hour folders that can hold
    the range are listed (``<camera>/YYYY/MM/DD/HH/**``), so a backfill over one hour
    of a year-long archive lists one hour of objects. A root may be a folder of camera
    folders or a single camera folder. Otherwise a folder is listed recursively.
    """
    if _lists_hour_folders(layout, start_ms, end_ms):
        out = []
        for root in split_camera_patterns(patterns):
            children = list_child_folders(root, pipeline_options)
            if any(re.fullmatch(r"\d{4}", os.path.basename(c)) for c in children):
                camera_roots = [root]  # the root is itself a camera folder
            else:
                camera_roots = children
            out.extend(p + "**" for p in hour_prefixes(camera_roots, start_ms, end_ms,
                                                      layout.timezone))
        return out
    out = []
    for pattern in patterns:
        has_wildcard = any(c in pattern for c in "*?[")
        if has_wildcard or _IMAGE_SUFFIX.search(pattern):
            out.append(pattern)
        else:
            out.append(pattern.rstrip("/") + "/**")
    return out


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any decoded PIL image -> HxWx3 uint8 RGB (16-bit and integer modes rescaled)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image).astype(np.int64)
        peak = max(int(arr.max()), 1)
        shift = max(peak.bit_length() - 8, 0)
        gray = (np.clip(arr, 0, None) >> shift).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


class FrameDecodeError(ValueError):
    """Bytes that are not a usable frame; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = DEFAULT_MIN_SIDE) -> np.ndarray:
    """Decodes JPEG or PNG bytes into RGB uint8, or raises FrameDecodeError.

    The declared size is checked before any pixel is decoded, so a decompression bomb
    costs a header read, not gigabytes.
    """
    if not data:
        raise FrameDecodeError("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in _SUPPORTED_FORMATS:
                raise FrameDecodeError(
                    "unsupported_format", "%s is not JPEG or PNG" % image.format)
            width, height = image.size
            if width * height > max_pixels:
                raise FrameDecodeError(
                    "too_large", "%dx%d exceeds %d pixels" % (width, height, max_pixels))
            if min(width, height) < min_side:
                raise FrameDecodeError(
                    "too_small", "%dx%d is under %d px on a side" % (width, height, min_side))
            image.load()
            return _to_rgb(image)
    except FrameDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise FrameDecodeError("not_an_image", str(exc)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FrameDecodeError("too_large", str(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise FrameDecodeError("corrupt_image", "%s: %s" % (type(exc).__name__, exc)) from exc


class DecodeFrameFn(beam.DoFn):
    """(path, size) -> frame dict as a TimestampedValue, or a tagged dead letter."""

    def __init__(self, layout: FrameLayout, start_ms: Optional[int], end_ms: Optional[int],
                 max_pixels: int, max_bytes: int, min_side: int):
        self._layout = layout
        self._start_ms = start_ms
        self._end_ms = end_ms
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._min_side = min_side
        self.listed = Metrics.counter(NAMESPACE, "frames_listed")
        self.decoded = Metrics.counter(NAMESPACE, "frames_decoded")
        self.dead = progress.counter(NAMESPACE, "frames_dead_lettered")
        self.out_of_range = progress.counter(NAMESPACE, "files_outside_range")

    def _dead(self, uri, stage, reason, error):
        self.dead.inc()
        return beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(uri, stage, reason, error))

    def process(self, element):
        uri, size = element
        try:
            parsed = self._layout.parse(uri)
        except PathParseError as exc:
            self.listed.inc()
            yield self._dead(uri, "parse", "unparseable_path", str(exc))
            return
        ts = parsed.frame_ts_ms
        if (self._start_ms is not None and ts < self._start_ms) or (
                self._end_ms is not None and ts >= self._end_ms):
            self.out_of_range.inc()
            return
        self.listed.inc()
        if "://" not in uri and not os.path.isfile(uri):
            # A FIFO or device named like a frame would block the read forever.
            yield self._dead(uri, "read", "not_a_regular_file", "")
            return
        if size is not None and size > self._max_bytes:
            yield self._dead(uri, "read", "too_large", "%d bytes > %d" % (size, self._max_bytes))
            return
        try:
            with FileSystems.open(uri) as handle:
                data = handle.read(self._max_bytes + 1)
        except (BeamIOError, OSError) as exc:
            yield self._dead(uri, "read", "read_error", "%s: %s" % (type(exc).__name__, exc))
            return
        try:
            image = decode_image(data, self._max_pixels, self._min_side)
        except FrameDecodeError as exc:
            yield self._dead(uri, "decode", exc.reason, str(exc))
            return
        self.decoded.inc()
        frame = {"uri": uri, "camera_id": parsed.camera_id, "frame_ts_ms": ts, "image": image}
        yield TimestampedValue(frame, ts / 1000.0)


class _CountListed(beam.DoFn):
    """Counts listed objects; a name that is not valid UTF-8 (which no output can hold)
    becomes a dead letter here, with its bytes escaped."""

    def __init__(self):
        self.objects = progress.counter(NAMESPACE, "objects_listed")
        self.listed = Metrics.counter(NAMESPACE, "frames_listed")
        self.dead = progress.counter(NAMESPACE, "frames_dead_lettered")

    def process(self, metadata):
        self.objects.inc()
        path = metadata.path
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            self.listed.inc()
            self.dead.inc()
            escaped = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                escaped, "parse", "unparseable_path", "file name is not valid UTF-8"))
            return
        yield path, metadata.size_in_bytes


class _IndexFn(beam.DoFn):
    """(path, size) -> (camera_id, uri) for a parseable path inside the time range.

    No file is read: this is the frame index from the listing alone (what the
    ``background`` detector samples its backgrounds from)."""

    def __init__(self, layout: FrameLayout, start_ms: Optional[int], end_ms: Optional[int]):
        self._layout = layout
        self._start_ms, self._end_ms = start_ms, end_ms

    def process(self, element):
        uri = element[0]
        try:
            parsed = self._layout.parse(uri)
        except PathParseError:
            return
        ts = parsed.frame_ts_ms
        if (self._start_ms is not None and ts < self._start_ms) or (
                self._end_ms is not None and ts >= self._end_ms):
            return
        yield parsed.camera_id, uri


class ReadFramesOutput(dict):
    """``{"frames": ..., "dead_letter": ..., "index": ...}``, with ``.frames`` for the
    main output and ``.index`` for the ``(camera_id, uri)`` frame index (from the
    listing alone, so it does not wait for decoding; a file listed twice appears twice)."""

    @property
    def frames(self):
        return self["frames"]

    @property
    def index(self):
        return self["index"]


class ReadFrames(beam.PTransform):
    """Lists, parses and decodes frame files into timestamped frame dicts.

    Returns a :class:`ReadFramesOutput`: ``.frames`` and ``["dead_letter"]``. Each frame is
    ``{"uri", "camera_id", "frame_ts_ms", "image"}`` with the capture time as its Beam
    event timestamp. Listing is planned when the transform is applied, as the pipeline
    is built (see :func:`listing_patterns`: it may list folders, so the constructor
    only checks the patterns); the same file matched by two patterns is read once.
    """

    def __init__(self, patterns: Sequence[str], layout: Optional[FrameLayout] = None,
                 start_ms: Optional[int] = None, end_ms: Optional[int] = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                 min_side: int = DEFAULT_MIN_SIDE, pipeline_options=None):
        super().__init__()
        if isinstance(patterns, str):
            patterns = [patterns]
        self._layout = layout or FrameLayout()
        self._start_ms, self._end_ms = start_ms, end_ms
        self._limits = (max_pixels, max_bytes, min_side)
        self._patterns, self._pipeline_options = list(patterns), pipeline_options
        if _lists_hour_folders(self._layout, start_ms, end_ms):
            split_camera_patterns(self._patterns)  # ValueError for a pattern it cannot use

    def expand(self, pbegin):
        max_pixels, max_bytes, min_side = self._limits
        patterns = listing_patterns(self._patterns, self._layout, self._start_ms,
                                    self._end_ms, self._pipeline_options)
        _LOG.info("listing %d pattern(s): %s", len(patterns), patterns[:5])
        listed = (
            pbegin
            | "Patterns" >> beam.Create(patterns)
            | "List" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
            | "CountListed" >> beam.ParDo(_CountListed()).with_outputs(
                DEAD_LETTER, main="paths"))
        decoded = (
            listed.paths
            | "ReadEachOnce" >> beam.Distinct()
            | "ParseAndDecode" >> beam.ParDo(
                DecodeFrameFn(self._layout, self._start_ms, self._end_ms,
                              max_pixels, max_bytes, min_side)
            ).with_outputs(DEAD_LETTER, main="frames"))
        dead = ((listed[DEAD_LETTER], decoded[DEAD_LETTER])
                | "AllFrameDeadLetters" >> beam.Flatten())
        index = listed.paths | "Index" >> beam.ParDo(
            _IndexFn(self._layout, self._start_ms, self._end_ms))
        return ReadFramesOutput(frames=decoded.frames, dead_letter=dead, index=index)
