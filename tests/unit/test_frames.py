"""ReadFrames: listing, path parsing, decoding and dead letters, on real frames."""
import datetime as dt
import io
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from PIL import Image

from transforms.frames import decode_image
from transforms.layout import FrameLayout, PathParseError, hour_prefixes

NY = ZoneInfo("America/New_York")


def test_decode_odd_modes():
    for mode, shape in (("CMYK", (30, 40, 4)), ("L", (30, 40)), ("I;16", (30, 40)),
                        ("P", (30, 40)), ("LA", (30, 40, 2))):
        image = Image.new(mode, (40, 30))
        buf = io.BytesIO()
        image.save(buf, "JPEG" if mode == "CMYK" else "PNG")
        rgb = decode_image(buf.getvalue())
        assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8, mode


def test_layout_parsing_and_regex():
    layout = FrameLayout(timezone="America/New_York")
    parsed = layout.parse("gs://b/x/735-683-N/2020/05/05/13/10/01/"
                          "735-683-N--2020-05-05--13.10.01--original.jpeg")
    assert parsed.camera_id == "735-683-N"
    assert parsed.frame_ts_ms == int(dt.datetime(2020, 5, 5, 17, 10, 1,
                                                 tzinfo=dt.timezone.utc).timestamp() * 1000)
    for bad in ("a/735/2020/05/05/13/10/01/736--2020-05-05--13.10.01--original.jpeg",
                "a/../2020/05/05/13/10/01/..--2020-05-05--13.10.01--original.jpeg",
                "a/c/2020/13/05/13/10/01/c--2020-13-05--13.10.01--original.jpeg"):
        with pytest.raises(PathParseError):
            layout.parse(bad)
    custom = FrameLayout(r"(?P<camera>cam\d+)_(?P<date>\d{8})T(?P<time>\d{6})\.png$", "UTC")
    assert custom.parse("s3://b/cam7_20200505T131001.png").frame_ts_ms == int(
        dt.datetime(2020, 5, 5, 13, 10, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)
    with pytest.raises(ValueError):
        FrameLayout(r"(?P<camera>\w+)")


def test_hour_prefixes_follow_local_time_and_dst():
    start = int(dt.datetime(2021, 3, 14, 1, 30, tzinfo=NY).timestamp() * 1000)
    end = int(dt.datetime(2021, 3, 14, 4, 0, tzinfo=NY).timestamp() * 1000)
    # 2 a.m. does not exist that night in New York.
    assert hour_prefixes(["r/c"], start, end, "America/New_York") == [
        "r/c/2021/03/14/01/", "r/c/2021/03/14/03/"]
