"""The report's charts, drawn with PIL (no plotting library, nothing fetched).

Each function returns a PIL image: a histogram of values with an optional weighted
control drawn over it as a line and shaded bands (the camera links' dt bands), and
the side-by-side crop pair of one match.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CROP_SIZE", "band_list", "crop_pair", "grey_tile", "histogram"]

CROP_SIZE = (96, 72)
WIDTH, HEIGHT, PAD = 560, 200, 30
BAR = (52, 101, 164)
CONTROL = (204, 0, 0)
BAND = (214, 238, 206)


def histogram(values: Sequence[float], lo: float, hi: float, bins: int = 60,
              control: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
              bands: Sequence[Tuple[float, float]] = (), unit: str = "s",
              zero_line: bool = True) -> Image.Image:
    """Bars of ``values`` over ``[lo, hi]``; ``control`` = (values, weights) drawn as a
    red step line on the same bins; ``bands`` = (from, to) ranges shaded green."""
    hi = hi if hi > lo else lo + 1.0
    counts = np.histogram(values, bins=bins, range=(lo, hi))[0].astype(float)
    ctrl = None
    if control is not None and len(control[0]):
        ctrl = np.histogram(control[0], bins=bins, range=(lo, hi), weights=control[1])[0]
    top = max(float(counts.max()) if len(counts) else 0.0,
              float(ctrl.max()) if ctrl is not None else 0.0, 1.0)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def x_of(v: float) -> float:
        return PAD + (v - lo) / (hi - lo) * plot_w

    for a, b in bands:
        a, b = max(a, lo), min(b, hi)
        if b > a:
            draw.rectangle([x_of(a), PAD, x_of(b), HEIGHT - PAD], fill=BAND)
    step = plot_w / bins
    for i, c in enumerate(counts):
        if c:
            y = HEIGHT - PAD - plot_h * c / top
            draw.rectangle([PAD + i * step, y, PAD + (i + 1) * step - 1, HEIGHT - PAD], fill=BAR)
    if ctrl is not None:
        points = []
        for i, c in enumerate(ctrl):
            y = HEIGHT - PAD - plot_h * c / top
            points += [(PAD + i * step, y), (PAD + (i + 1) * step, y)]
        draw.line(points, fill=CONTROL, width=2)
    if zero_line and lo < 0 < hi:
        draw.line([x_of(0), PAD, x_of(0), HEIGHT - PAD], fill=(150, 150, 150))
    draw.line([PAD, HEIGHT - PAD, WIDTH - PAD, HEIGHT - PAD], fill="black")
    draw.text((PAD, HEIGHT - PAD + 6), "%+g %s" % (lo, unit) if unit == "s" else "%g" % lo,
              fill="black")
    draw.text((WIDTH - PAD - 48, HEIGHT - PAD + 6),
              "%+g %s" % (hi, unit) if unit == "s" else "%g" % hi, fill="black")
    draw.text((PAD, 8), "max %.0f per bin" % top, fill="black")
    return image


def crop_pair(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two crops side by side, a white gap between them."""
    pair = Image.new("RGB", (2 * CROP_SIZE[0] + 6, CROP_SIZE[1]), "white")
    pair.paste(left.resize(CROP_SIZE), (0, 0))
    pair.paste(right.resize(CROP_SIZE), (CROP_SIZE[0] + 6, 0))
    return pair


def grey_tile() -> Image.Image:
    """What a crop whose frame cannot be read shows."""
    return Image.new("RGB", CROP_SIZE, (200, 200, 200))


def band_list(links: List[dict], camera_a: str, camera_b: str) -> List[Tuple[float, float]]:
    """The dt bands ``offset +- spread`` of the links of one camera pair."""
    return [(l["offset_s"] - l["spread_s"], l["offset_s"] + l["spread_s"]) for l in links
            if l["camera_a"] == camera_a and l["camera_b"] == camera_b]
