"""Where frames live: parsing camera id and capture time out of object paths.

The default layout is CCTView's own:
``<root>/<camera>/YYYY/MM/DD/HH/MM/SS/<camera>--YYYY-MM-DD--HH.MM.SS--original.jpeg``.
The parser is strict (the directory parts and the file name must agree), so that a
file that merely resembles a frame is dead-lettered instead of being given a wrong
time. A user regex with named groups ``camera`` and ``date`` + ``time`` (or ``ts``)
replaces it for other archives.

Times in paths are camera-local; they are converted to UTC with an IANA time zone.
"""
import datetime as dt
import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence
from zoneinfo import ZoneInfo

__all__ = ["CCTVIEW_LAYOUT", "FrameLayout", "ParsedPath", "PathParseError", "glob_prefix",
           "hour_prefixes", "optional_range", "parse_time", "split_camera_patterns"]

CCTVIEW_LAYOUT = "cctview"

_CCTVIEW_RE = re.compile(
    r"(?:^|/)(?P<camera>[^/]+)/(?P<Y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/"
    r"(?P<H>\d{2})/(?P<M>\d{2})/(?P<S>\d{2})/"
    r"(?P=camera)--(?P=Y)-(?P=m)-(?P=d)--(?P=H)\.(?P=M)\.(?P=S)--original\.(?:jpe?g|png)\Z",
    re.IGNORECASE | re.ASCII,  # \Z: no trailing newline; ASCII: no other scripts' digits
)

# A camera id becomes part of row values and may be shown in reports; it must never
# be able to smuggle path syntax or control characters anywhere.
_CAMERA_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Capture times that every output can hold: a UTC datetime (years 1-9999).
_EARLIEST_MS = int(dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)
_LATEST_MS = int(dt.datetime(9999, 12, 31, 23, 59, 59, 999000,
                             tzinfo=dt.timezone.utc).timestamp() * 1000)


class PathParseError(ValueError):
    """The path does not follow the frame layout; the reason says how."""


@dataclass(frozen=True)
class ParsedPath:
    camera_id: str
    frame_ts_ms: int  # UTC epoch milliseconds


def _to_utc_ms(local: dt.datetime, tz: ZoneInfo) -> int:
    if local.tzinfo is None:
        local = local.replace(tzinfo=tz)
    return int(round(local.timestamp() * 1000))


def parse_time(value: str, tz: ZoneInfo) -> int:
    """Parses an ISO-8601 date-time (naive = ``tz``) into UTC epoch milliseconds."""
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ValueError("not an ISO-8601 date-time: %r" % value) from exc
    return _to_utc_ms(parsed, tz)


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _datetime_from_groups(groups: dict) -> dt.datetime:
    if groups.get("ts"):
        ts = groups["ts"].strip()
        if re.fullmatch(r"\d{10}(\.\d+)?", ts):
            return dt.datetime.fromtimestamp(float(ts), tz=dt.timezone.utc)
        if re.fullmatch(r"\d{13}", ts):
            return dt.datetime.fromtimestamp(int(ts) / 1000.0, tz=dt.timezone.utc)
        if re.fullmatch(r"\d{14}", ts):
            return dt.datetime.strptime(ts, "%Y%m%d%H%M%S")
        return dt.datetime.fromisoformat(ts)
    date, time = _digits(groups.get("date") or ""), _digits(groups.get("time") or "")
    if len(date) != 8 or len(time) not in (4, 6):
        raise ValueError("date/time groups must hold YYYYMMDD and HHMM[SS] digits")
    return dt.datetime.strptime(date + time.ljust(6, "0"), "%Y%m%d%H%M%S")


class FrameLayout:
    """Parses frame paths of one layout; picklable, so it travels inside DoFns."""

    def __init__(self, layout: str = CCTVIEW_LAYOUT, timezone: str = "UTC"):
        self.layout = layout
        self.timezone = timezone
        self._tz = ZoneInfo(timezone)
        if layout == CCTVIEW_LAYOUT:
            self._regex = _CCTVIEW_RE
        else:
            self._regex = re.compile(layout)
            names = set(self._regex.groupindex)
            if "camera" not in names or not ({"ts"} <= names or {"date", "time"} <= names):
                raise ValueError(
                    "--layout regex needs named groups 'camera' and 'date'+'time' or 'ts'"
                )

    @property
    def is_cctview(self) -> bool:
        return self.layout == CCTVIEW_LAYOUT

    def parse(self, path: str) -> ParsedPath:
        """Returns camera id and UTC capture time; raises PathParseError otherwise."""
        normalised = path.replace("\\", "/")
        match = self._regex.search(normalised)
        if not match:
            raise PathParseError("path does not match the %s layout" % self._describe())
        groups = match.groupdict()
        camera = groups["camera"]
        if not _CAMERA_ID_RE.fullmatch(camera) or ".." in camera:
            raise PathParseError("unsafe camera id %r" % camera[:80])
        try:
            if self.is_cctview:
                local = dt.datetime(
                    int(groups["Y"]), int(groups["m"]), int(groups["d"]),
                    int(groups["H"]), int(groups["M"]), int(groups["S"]),
                )
            else:
                local = _datetime_from_groups(groups)
            ts_ms = _to_utc_ms(local, self._tz)
        except (ValueError, OverflowError) as exc:
            raise PathParseError("invalid capture time: %s" % exc) from exc
        if not _EARLIEST_MS <= ts_ms <= _LATEST_MS:
            raise PathParseError("capture time %s is outside years 1-9999 in UTC"
                                 % local.isoformat())
        return ParsedPath(camera, ts_ms)

    def _describe(self) -> str:
        return "CCTView" if self.is_cctview else "--layout regex"

    def __getstate__(self):
        return {"layout": self.layout, "timezone": self.timezone}

    def __setstate__(self, state):
        self.__init__(**state)


def hour_prefixes(camera_roots: Iterable[str], start_ms: int, end_ms: int,
                  timezone: str) -> List[str]:
    """The per-hour folders of the CCTView layout that can hold frames of [start, end).

    ``camera_roots`` are the ``<root>/<camera>`` folders. Hours are walked in UTC and
    converted to the camera's local time, so days with a DST change list exactly the
    local hours that exist.
    """
    tz = ZoneInfo(timezone)
    hours = []
    hour_ms = 3600 * 1000
    t = (start_ms // hour_ms) * hour_ms
    while t < end_ms:
        local = dt.datetime.fromtimestamp(t / 1000.0, tz=dt.timezone.utc).astimezone(tz)
        key = local.strftime("%Y/%m/%d/%H")
        if not hours or hours[-1] != key:
            hours.append(key)
        t += hour_ms
    return [
        "%s/%s/" % (root.rstrip("/"), key) for root in camera_roots for key in hours
    ]


def glob_prefix(pattern: str) -> str:
    """The part of a file pattern before its first wildcard."""
    cut = len(pattern)
    for char in "*?[{":
        position = pattern.find(char)
        if position != -1:
            cut = min(cut, position)
    return pattern[:cut]


def split_camera_patterns(patterns: Sequence[str]) -> List[str]:
    """Turns input patterns into the roots that hold camera folders or frames.

    ``ROOT``, ``ROOT/`` and ``ROOT/**`` all name ``ROOT``.
    """
    roots = []
    for pattern in patterns:
        root = glob_prefix(pattern)
        if root != pattern and not pattern[len(root):].strip("*/") == "":
            raise ValueError(
                "with --start/--end and the cctview layout, --input must name folders "
                "(ROOT or ROOT/**), not %r" % pattern
            )
        roots.append(root.rstrip("/"))
    return roots


def optional_range(start: Optional[str], end: Optional[str], timezone: str):
    """Parses --start/--end into UTC ms bounds (None where not given)."""
    tz = ZoneInfo(timezone)
    start_ms = parse_time(start, tz) if start else None
    end_ms = parse_time(end, tz) if end else None
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise ValueError("--end must be after --start")
    return start_ms, end_ms
