"""A synthetic multi-camera road: the project's embedded default demo data, with ground truth.

Why it exists: real CCTV archives come without labels, so nothing in them says whether a
detector found every vehicle, whether a match pairs the same vehicle, or whether a
calibration found the true transit time between two cameras. This module builds a small
world where all of that is known, cheaply and offline, in the exact frame layout the
pipeline reads, so ``cctview demo`` runs end to end with no downloads and every stage can be
scored against the truth.

The world (all of it deterministic for a ``seed``):

* One straight road along ``x`` (metres) carrying both directions (``+1`` towards larger
  ``x``, ``-1`` back), two lanes each. Cameras stand ``spacing_m`` apart along it, each in
  the middle of its own *segment*; segments meet at ramps half-way between cameras.
* Vehicles (car / bus / truck / motorcycle, each with a solid body colour and a few
  distinguishing marks so that colour histograms carry identity) arrive at either end of
  the road as a Poisson process. A few enter at a ramp, and at every ramp they pass some
  leave, so not every vehicle reaches every camera. Each vehicle has its own speed, varied
  per segment (scaled by ``noise``), so the transit time of a link varies per vehicle.
* Every camera sees both carriageways, the traffic moving horizontally or diagonally across
  a 352x240 view (like the NYC DOT cameras), over its own static textured background
  (asphalt, lane markings, median barrier, roadside), with a pole and a sign in front of
  part of the view. Frames get a global brightness/contrast drift, a per-camera colour
  cast, sensor noise and JPEG compression, all scaled by ``noise``; tall vehicles in the
  near lanes hide vehicles behind them.
* Frames come about ``fps`` per second with a little per-camera jitter, at most one per
  camera per whole second (the layout has second resolution). The true capture instant
  lies somewhere inside that second, as with real cameras, so timestamps carry the same
  up-to-1-s quantisation error that real data does.

Outputs under ``output`` (a local folder or any Beam filesystem URI, e.g. ``gs://``):

* ``frames/<camera>/YYYY/MM/DD/HH/MM/SS/<camera>--YYYY-MM-DD--HH.MM.SS--original.jpeg``
  (CCTView's layout, UTC), written through :class:`FileSystems`.
* ``ground_truth/boxes.parquet``: one row per visible vehicle box per frame.
* ``ground_truth/links.json``: the true transit per camera pair and direction, in the
  ``links.json`` format of docs/spec.md, so a calibration can be checked.
* ``ground_truth/backgrounds/<camera>.png``: each camera's empty road (lossless, with the
  camera's colour cast at mean exposure, no noise), so background estimation can be checked.

Rendering is vectorised (numpy slices of pre-drawn sprites); 3 cameras x 5 minutes take a
few seconds on one core.
"""
import argparse
import datetime as dt
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from pipelines.command import Command

__all__ = ["COMMAND", "DEFAULT_START", "LABELS", "Vehicle", "add_arguments", "frame_path",
           "run_from_args", "synthesize"]

WIDTH, HEIGHT = 352, 240
DEFAULT_START = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
LABELS = ("car", "bus", "truck", "motorcycle")

# Class mix and pixel sizes (length x height of the side view at zoom 1, i.e. about
# 5.3 px per metre): a 4.5 m car is ~24 px long, like a mid-distance car in a 352x240
# NYC DOT frame (the reference detections there have a median box of 22x21 px).
_CLASS_P = (0.82, 0.05, 0.08, 0.05)
_SIZE_PX = {  # (length lo, hi), (height lo, hi)
    "car": ((20, 28), (11, 15)),
    "bus": ((56, 70), (20, 24)),
    "truck": ((40, 56), (22, 28)),
    "motorcycle": ((9, 12), (11, 14)),
}
# Common body colours (RGB) and how often they occur.
_PALETTE = np.array([
    (235, 235, 232), (25, 25, 28), (172, 174, 178), (118, 120, 124), (170, 25, 30),
    (30, 60, 140), (20, 30, 70), (30, 90, 50), (240, 190, 20), (200, 180, 140),
    (100, 60, 30), (230, 110, 20), (120, 20, 90), (60, 160, 200),
], dtype=np.float64)
_PALETTE_P = np.array([.19, .17, .14, .10, .08, .08, .04, .03, .05, .03, .02, .03, .02, .02])
_PALETTE_P = _PALETTE_P / _PALETTE_P.sum()

_LANES = 2          # per direction
_P_RAMP_ENTRY = 0.15  # a vehicle enters at a ramp instead of a road end
_P_EXIT = 0.15        # a vehicle leaves at each ramp it passes


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent, reproducible stream per (seed, purpose, index): the output does not
    depend on the order in which cameras or frames are rendered."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *keys]))


# ----------------------------------------------------------------------------- vehicles
@dataclass
class Vehicle:
    """One simulated vehicle: identity, appearance, and when/how fast it passes each camera."""

    vid: int
    label: str
    direction: int                      # +1 towards larger x, -1 back
    length_px: float                    # side-view size at zoom 1
    height_px: float
    body: Tuple[int, int, int]
    second: Tuple[int, int, int]        # colour of stripes / cab / marks
    window: Tuple[int, int, int]
    stripe: Optional[Tuple[float, float]]     # (top, thickness) as fractions of height
    roof: Optional[Tuple[float, float]]       # (x0, x1) fractions: a roof box / taxi sign
    two_tone: bool
    # per camera index: (crossing time s, speed m/s, lane)
    passes: Dict[int, Tuple[float, float, int]] = field(default_factory=dict)


def _appearance(rng: np.random.Generator, label: str) -> dict:
    """Body colour plus a few marks, so that two vehicles of one colour still differ."""
    def colour(exclude=None):
        while True:
            k = rng.choice(len(_PALETTE), p=_PALETTE_P)
            if k != exclude:
                c = np.clip(_PALETTE[k] + rng.normal(0, 10, 3), 0, 255)
                return k, tuple(int(v) for v in c)

    k, body = colour()
    _, second = colour(exclude=k)
    tint = rng.normal(0, 8, 3)
    window = tuple(int(v) for v in np.clip(rng.uniform(25, 60) + tint, 0, 255))
    stripe = (float(rng.uniform(0.5, 0.7)), float(rng.uniform(0.08, 0.18))) \
        if rng.random() < (0.7 if label == "bus" else 0.45) else None
    roof = None
    if rng.random() < 0.3:
        x0 = float(rng.uniform(0.2, 0.5))
        roof = (x0, x0 + float(rng.uniform(0.15, 0.35)))
    return dict(body=body, second=second, window=window, stripe=stripe, roof=roof,
                two_tone=bool(rng.random() < 0.2))


def _sprite(v: Vehicle, zoom: float, facing_right: bool) -> np.ndarray:
    """The vehicle's side view as an (h, l, 3) uint8 rectangle, front towards its motion.

    Marks are placed by fractions of the size, so a vehicle looks the same (scaled) in
    every camera."""
    length = max(4, int(round(v.length_px * zoom)))
    height = max(4, int(round(v.height_px * zoom)))
    img = np.empty((height, length, 3), np.uint8)
    img[:] = v.body

    def rows(a, b):
        return slice(int(a * height), max(int(a * height) + 1, int(round(b * height))))

    def cols(a, b):
        return slice(int(a * length), max(int(a * length) + 1, int(round(b * length))))

    if v.two_tone:
        img[rows(0.6, 0.8), :] = v.second
    if v.stripe is not None:
        top, thick = v.stripe
        img[rows(top, top + thick), :] = v.second
    dark = (22, 22, 24)
    if v.label == "car":
        img[rows(0.12, 0.45), cols(0.18, 0.82)] = v.window
        img[rows(0.12, 0.45), cols(0.47, 0.53)] = v.body           # door pillar
        img[rows(0.78, 1.0), cols(0.12, 0.3)] = dark              # wheels
        img[rows(0.78, 1.0), cols(0.7, 0.88)] = dark
    elif v.label == "bus":
        img[rows(0.15, 0.5), cols(0.04, 0.96)] = v.window
        for x in np.arange(0.16, 0.96, 0.12):                   # window pillars
            img[rows(0.15, 0.5), cols(x, x + 0.02)] = v.body
        img[rows(0.04, 0.12), cols(0.84, 0.97)] = (250, 170, 30)   # destination sign
        img[rows(0.84, 1.0), cols(0.1, 0.2)] = dark
        img[rows(0.84, 1.0), cols(0.75, 0.85)] = dark
    elif v.label == "truck":
        img[:, cols(0.7, 1.0)] = v.second                          # cab
        img[rows(0.15, 0.45), cols(0.78, 0.96)] = v.window
        img[rows(0.3, 0.6), cols(0.2, 0.5)] = v.window if v.roof is None else v.second  # logo
        img[rows(0.84, 1.0), cols(0.08, 0.2)] = dark
        img[rows(0.84, 1.0), cols(0.78, 0.9)] = dark
    else:  # motorcycle: rider on top, wheels below
        img[rows(0.0, 0.5), cols(0.25, 0.75)] = v.second
        img[rows(0.0, 0.18), cols(0.3, 0.7)] = v.window            # helmet
        img[rows(0.75, 1.0), cols(0.0, 0.3)] = dark
        img[rows(0.75, 1.0), cols(0.7, 1.0)] = dark
    if v.roof is not None and v.label in ("car", "bus"):
        img[rows(0.0, 0.1), cols(*v.roof)] = v.second
    return img if facing_right else img[:, ::-1]


def _simulate(rng: np.random.Generator, cameras: int, spacing: float, t0: float, t1: float,
              rate_per_min: float, noise: float) -> List[Vehicle]:
    """Vehicles on the road during [t0, t1] (seconds from the start) and their camera passes.

    Camera ``k`` stands at ``x = margin + k * spacing``; segment ``k`` spans the half-way
    ramps on either side (the road ends for the first and last), so a vehicle keeps one
    speed while any one camera sees it. Arrivals start early enough that the road is
    already in steady state at t=0.
    """
    margin = spacing * 0.75
    cam_x = margin + spacing * np.arange(cameras)
    bounds = np.concatenate([[0.0], (cam_x[:-1] + cam_x[1:]) / 2, [cam_x[-1] + margin]])
    length = bounds[-1]
    warmup = length / 6.0 + 5
    vehicles: List[Vehicle] = []
    vid = 0
    for direction in (+1, -1):
        t = t0 - warmup
        while True:
            t += rng.exponential(60.0 / rate_per_min)
            if t > t1:
                break
            label = LABELS[rng.choice(4, p=_CLASS_P)]
            (l0, l1), (h0, h1) = _SIZE_PX[label]
            base = float(np.clip(rng.normal(15.0, 2.5), 9.0, 24.0))
            base += {"car": 0.0, "bus": -2.0, "truck": -1.5, "motorcycle": 1.5}[label]
            # segment indices in travel order
            order = list(range(cameras)) if direction > 0 else list(range(cameras))[::-1]
            start = 0
            if cameras > 1 and rng.random() < _P_RAMP_ENTRY:
                start = int(rng.integers(1, cameras))
            path = [order[start]]
            for seg in order[start + 1:]:
                if rng.random() < _P_EXIT:
                    break
                path.append(seg)
            lane = int(rng.integers(0, _LANES)) if label in ("car", "motorcycle") else 1
            app = _appearance(rng, label)
            v = Vehicle(vid=vid, label=label, direction=direction,
                        length_px=float(rng.uniform(l0, l1)), height_px=float(rng.uniform(h0, h1)),
                        **app)
            clock = t
            for seg in path:
                speed = base * float(np.clip(1 + 0.07 * noise * rng.normal(), 0.6, 1.4))
                lo, hi = bounds[seg], bounds[seg + 1]
                entry_x = lo if direction > 0 else hi
                cross = clock + abs(cam_x[seg] - entry_x) / speed
                if rng.random() < 0.2:
                    lane = int(rng.integers(0, _LANES)) if label in ("car", "motorcycle") else lane
                v.passes[seg] = (cross, speed, lane)
                clock += (hi - lo) / speed
            vehicles.append(v)
            vid += 1
    _keep_headway(vehicles, cameras)
    return vehicles


def _keep_headway(vehicles: List[Vehicle], cameras: int, gap_s: float = 1.0) -> None:
    """Keeps vehicles from driving through one another: lane changes, else slowing down.

    Vehicles do not interact in the arrival process, so two in one lane could overlap (a
    faster one driving through a slower one), which no camera ever shows. Per direction,
    camera by camera in travel order and in crossing order, a vehicle whose lane is taken
    (the previous vehicle in it crossed less than ``gap_s`` plus the time for both half
    lengths ago) moves to the other lane if that is free; if neither is, it slows down
    behind the lane that frees first, and the delay carries on to its later cameras (so
    congestion shows up in the transit times, as it does on a real road).
    """
    for direction in (+1, -1):
        order = list(range(cameras)) if direction > 0 else list(range(cameras))[::-1]
        for pos, cam in enumerate(order):
            here = sorted((v.passes[cam][0], v.vid, v) for v in vehicles
                          if v.direction == direction and cam in v.passes)
            last = [None] * _LANES     # (cross time, half length m, speed) of the last in lane
            for _, _, v in here:
                cross, speed, lane = v.passes[cam]
                half = v.length_px / 5.3 / 2

                def free_at(k):
                    if last[k] is None:
                        return -math.inf
                    t, h, s = last[k]
                    return t + gap_s + (h + half) / min(speed, s)
                if free_at(lane) > cross:
                    best = min(range(_LANES), key=lambda k: (max(free_at(k), cross), k != lane))
                    lane = best
                    delay = max(free_at(lane) - cross, 0.0)
                    if delay > 0:
                        for later in order[pos:]:
                            if later in v.passes:
                                t, s_, l_ = v.passes[later]
                                v.passes[later] = (t + delay, s_, l_)
                        cross += delay
                    v.passes[cam] = (cross, speed, lane)
                last[lane] = (cross, half, speed)


# ----------------------------------------------------------------------------- cameras
def _coarse_noise(rng, shape, cell, amp):
    """Smooth blotches: random values on a coarse grid, upsampled by repetition + blur."""
    h, w = shape
    small = rng.normal(0, amp, (h // cell + 2, w // cell + 2))
    big = np.kron(small, np.ones((cell, cell)))[:h, :w]
    # cheap separable box blur to soften the blocks
    k = cell
    c = np.cumsum(np.pad(big, ((k, k), (0, 0)), mode="edge"), axis=0)
    big = (c[2 * k:2 * k + h] - c[:h]) / (2 * k)
    c = np.cumsum(np.pad(big, ((0, 0), (k, k)), mode="edge"), axis=1)
    return (c[:, 2 * k:2 * k + w] - c[:, :w]) / (2 * k)


class _Camera:
    """One camera's fixed geometry, background, occluders and imaging chain."""

    def __init__(self, index: int, seed: int, noise: float):
        rng = _rng(seed, 1, index)
        self.index = index
        self.id = "cam-%02d" % (index + 1)
        self.noise = noise
        self.angle = float(rng.uniform(-0.22, 0.22))       # road direction in the image
        self.tan, self.cos, self.sin = math.tan(self.angle), math.cos(self.angle), math.sin(self.angle)
        self.flip = 1 if rng.random() < 0.5 else -1         # does +x traffic move right?
        self.zoom = float(rng.uniform(0.9, 1.15))
        self.px_per_m = 5.3 * self.zoom
        self.lane_px = int(round(rng.uniform(21, 24) * self.zoom))
        self.median_px = int(rng.integers(10, 15))
        span = 4 * self.lane_px + self.median_px
        self.road_top = int(rng.integers(55, max(56, 236 - span - 45)))
        self.background = self._draw_background(rng)
        self.occluders = self._draw_occluders(rng)          # list of (slice, slice, pixels)
        for rs, cs, pix, mask in self.occluders:
            region = self.background[rs, cs]
            region[mask] = pix[mask]
        # imaging: a colour cast per camera, a slow lighting drift, per-frame flicker
        self.cast = 1 + 0.04 * noise * rng.normal(size=3)
        self.drift_period = float(rng.uniform(120, 400))
        self.drift_phase = float(rng.uniform(0, 2 * math.pi))
        self.phase = float(rng.uniform(0, 1))
        # a bank of sensor noise, cropped at a random offset per frame (cheaper than drawing
        # a fresh field per frame, and just as uncorrelated between neighbouring frames)
        self.noise_bank = rng.normal(0, 1, (HEIGHT * 2, WIDTH * 2, 3)).astype(np.float32)

    def lane_row(self, direction: int, lane: int) -> float:
        """Row (at the centre column) of the bottom edge of a lane."""
        moves_right = direction * self.flip > 0
        median_top = self.road_top + 2 * self.lane_px
        if moves_right:   # near carriageway; lane 0 next to the median
            return median_top + self.median_px + (lane + 1) * self.lane_px
        return median_top - lane * self.lane_px

    def _draw_background(self, rng) -> np.ndarray:
        h, w = HEIGHT, WIDTH
        vv, uu = np.mgrid[0:h, 0:w].astype(np.float64)
        lateral = vv - (uu - w / 2) * self.tan
        along = (uu - w / 2) / self.cos
        img = np.zeros((h, w, 3))
        lp, top = self.lane_px, self.road_top
        median0 = top + 2 * lp
        median1 = median0 + self.median_px
        bottom = median1 + 2 * lp
        # roadside above: trees, buildings or water
        style = int(rng.integers(0, 3))
        upper = lateral < top - 4
        if style == 0:
            base = np.array([60, 95, 50]) + rng.normal(0, 10, 3)
            tex = _coarse_noise(rng, (h, w), 6, 20)[..., None] * np.array([0.6, 1.0, 0.5])
        elif style == 1:
            base = np.array([150, 140, 130]) + rng.normal(0, 15, 3)
            tex = _coarse_noise(rng, (h, w), 4, 8)[..., None] * np.ones(3)
            for _ in range(8):          # building fronts
                x0 = int(rng.integers(0, w)); bw = int(rng.integers(20, 80))
                c = rng.uniform(70, 200, 3)
                tex[:, x0:x0 + bw] += (c - base)
        else:
            base = np.array([70, 110, 150]) + rng.normal(0, 10, 3)
            tex = _coarse_noise(rng, (h, w), 8, 8)[..., None] * np.array([0.5, 0.8, 1.0])
        img[upper] = (base + tex)[upper]
        img[(lateral >= top - 4) & (lateral < top)] = (130, 130, 128)          # kerb
        # asphalt with blotches (patches, stains)
        road = (lateral >= top) & (lateral < bottom)
        grey = float(rng.uniform(72, 100))
        blot = _coarse_noise(rng, (h, w), 10, 7)
        img[road] = (grey + blot[road])[:, None] * np.array([1.0, 1.0, 1.03])
        # median barrier
        med = (lateral >= median0 + 2) & (lateral < median1 - 2)
        img[med] = float(rng.uniform(140, 170))
        img[med & (lateral < median0 + 4)] = 110
        # markings: yellow at the median, white edges, dashed lane lines
        def line(center, colour, dashed=False, width=1.0):
            m = np.abs(lateral - center) <= width
            if dashed:
                m &= ((along + rng.uniform(0, 30)) % 30) < 12
            img[m] = colour
        line(median0 + 1, (200, 170, 40)); line(median1 - 1, (200, 170, 40))
        line(top + 1, (215, 215, 210)); line(bottom - 1, (215, 215, 210))
        line(top + lp, (215, 215, 210), dashed=True)
        line(median1 + lp, (215, 215, 210), dashed=True)
        # below: sidewalk / grass
        lower = lateral >= bottom
        low = np.array([120, 125, 110]) + rng.normal(0, 12, 3)
        img[lower] = (low + _coarse_noise(rng, (h, w), 5, 10)[..., None])[lower]
        img += rng.normal(0, 3, (h, w, 1))                  # fine grain, fixed per camera
        return np.clip(img, 0, 255).astype(np.uint8)

    def _draw_occluders(self, rng) -> list:
        """A pole (and a sign on it) in front of the road; more and bigger with ``noise``."""
        out = []
        n_poles = int(round(self.noise))
        for _ in range(n_poles):
            pw = max(2, int(round(3 * self.noise)))
            x = int(rng.integers(40, WIDTH - 40 - pw))
            top = int(rng.integers(0, 30))
            pix = np.empty((HEIGHT - top, pw, 3), np.uint8)
            pix[:] = (70, 72, 75)
            pix[:, :1] = (120, 122, 125)
            out.append((slice(top, HEIGHT), slice(x, x + pw), pix, np.ones(pix.shape[:2], bool)))
            if self.noise >= 0.5:
                sw = int(round(rng.uniform(26, 40) * min(self.noise, 1.5)))
                sh = int(round(rng.uniform(16, 24) * min(self.noise, 1.5)))
                sx = int(np.clip(x + pw // 2 - sw // 2, 0, WIDTH - sw))
                sy = int(np.clip(self.road_top - sh // 2 + rng.integers(-6, 8), 0, HEIGHT - sh))
                sign = np.empty((sh, sw, 3), np.uint8)
                sign[:] = (10, 110, 60) if rng.random() < 0.6 else (20, 60, 150)
                sign[[0, -1], :] = 230
                sign[:, [0, -1]] = 230
                for r in range(4, sh - 4, 5):                # "text"
                    sign[r:r + 2, 4:sw - 4 - int(rng.integers(0, 8))] = 230
                out.append((slice(sy, sy + sh), slice(sx, sx + sw), sign,
                            np.ones((sh, sw), bool)))
        return out

    # -------------------------------------------------------------------- one frame
    def frame_times(self, duration_s: float, fps: float, seed: int) -> List[int]:
        """Whole seconds (from the start) with a frame: about ``fps`` a second, jittered,
        a few dropped (2% at noise 1), never two in one second.

        The jitter is at most ``(1/fps - 1) / 2`` seconds, so consecutive frames always land
        in different seconds and none is lost to the second resolution of the names; at
        ``fps=1`` only drops and the random capture instant inside each second remain.
        """
        rng = _rng(seed, 2, self.index)
        step = 1.0 / fps
        nominal = (self.phase + np.arange(int(math.ceil(duration_s * fps)) + 1)) * step
        amp = min(0.15 * self.noise * step, (step - 1.0) / 2)
        jitter = rng.uniform(-1.0, 1.0, nominal.size) * amp
        secs = np.floor(nominal + jitter).astype(np.int64)
        keep = rng.random(secs.size) >= 0.02 * min(self.noise, 2.0)
        secs = secs[keep & (secs >= 0) & (secs < duration_s)]
        return sorted(set(int(s) for s in secs))

    def render(self, t: float, passing: list, sprites: dict, rng) -> Tuple[np.ndarray, list]:
        """The frame at true time ``t`` (before lighting/noise/JPEG) and its truth boxes.

        ``passing`` holds (vehicle, crossing time, speed, lane) for vehicles that pass this
        camera. Vehicles are drawn far to near (the nearer one hides the farther), then the
        occluders; a per-pixel id buffer gives each vehicle's visible part.
        """
        img = self.background.copy()
        ids = np.full((HEIGHT, WIDTH), -1, np.int32)
        placed = []
        for v, cross, speed, lane in passing:
            along = self.flip * v.direction * speed * (t - cross) * self.px_per_m
            cx = WIDTH / 2 + along * self.cos
            length = max(4, int(round(v.length_px * self.zoom)))
            if abs(cx - WIDTH / 2) > WIDTH / 2 + length / 2 + 1:
                continue
            height = max(4, int(round(v.height_px * self.zoom)))
            bottom = self.lane_row(v.direction, lane) - 3 + along * self.sin
            x0 = int(round(cx - length / 2))
            y1 = int(round(bottom))
            placed.append((y1, v.vid, v, x0, y1 - height, length, height))
        placed.sort(key=lambda p: (p[0], p[1]))
        for _, vid, v, x0, y0, length, height in placed:
            key = (vid, v.direction * self.flip > 0)
            sprite = sprites.get(key)
            if sprite is None:
                sprite = sprites[key] = _sprite(v, self.zoom, key[1])
            ax0, ay0 = max(x0, 0), max(y0, 0)
            ax1, ay1 = min(x0 + length, WIDTH), min(y0 + height, HEIGHT)
            if ax1 <= ax0 or ay1 <= ay0:
                continue
            img[ay0:ay1, ax0:ax1] = sprite[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
            ids[ay0:ay1, ax0:ax1] = vid
        for rs, cs, pix, mask in self.occluders:
            img[rs, cs][mask] = pix[mask]
            ids[rs, cs][mask] = -1
        boxes = []
        for _, vid, v, x0, y0, length, height in placed:
            ax0, ay0 = max(x0, 0), max(y0, 0)
            ax1, ay1 = min(x0 + length, WIDTH), min(y0 + height, HEIGHT)
            if ax1 <= ax0 or ay1 <= ay0:
                continue
            vis = ids[ay0:ay1, ax0:ax1] == vid
            count = int(vis.sum())
            if count == 0:
                continue
            rows = np.flatnonzero(vis.any(axis=1))
            cols = np.flatnonzero(vis.any(axis=0))
            boxes.append((v, (ax0 + cols[0], ay0 + rows[0], ax0 + cols[-1] + 1, ay0 + rows[-1] + 1),
                          count / float(length * height)))
        return img, boxes

    def neutral_view(self) -> np.ndarray:
        """The empty road as this camera shows it on average: the background with the
        camera's colour cast, at mean exposure, without noise (the truth for background
        estimation)."""
        return np.clip(np.round(self.background.astype(np.float64) * self.cast), 0, 255).astype(np.uint8)

    def expose(self, img: np.ndarray, t: float, rng) -> np.ndarray:
        """Lighting drift, colour cast, sensor noise; returns uint8 RGB."""
        n = self.noise
        slow = math.sin(2 * math.pi * t / self.drift_period + self.drift_phase)
        gain = 1 + n * (0.12 * slow + 0.03 * rng.normal())
        contrast = 1 + n * (0.08 * math.cos(2 * math.pi * t / self.drift_period * 1.7)
                            + 0.02 * rng.normal())
        f = img.astype(np.float32)
        f -= 128.0
        f *= np.float32(contrast)
        f += 128.0
        f *= (gain * self.cast).astype(np.float32)
        if n > 0:
            oy, ox = int(rng.integers(0, HEIGHT)), int(rng.integers(0, WIDTH))
            f += self.noise_bank[oy:oy + HEIGHT, ox:ox + WIDTH] * np.float32(4.0 * n)
        np.clip(f, 0, 255, out=f)
        return f.astype(np.uint8)


# ----------------------------------------------------------------------------- output
def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts])


def _write(path: str, data: bytes) -> None:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as handle:
        handle.write(data)


def frame_path(output: str, camera: str, when: dt.datetime) -> str:
    """Where a frame goes in CCTView's layout (UTC)."""
    return _join(output, "frames", camera, when.strftime("%Y/%m/%d/%H/%M/%S"),
                 "%s--%s--original.jpeg" % (camera, when.strftime("%Y-%m-%d--%H.%M.%S")))


def _check_writable(output: str) -> None:
    """Fails in a second, as an OSError, where ``output`` cannot be written (whatever the
    filesystem's own exception type), instead of after rendering."""
    import uuid

    from apache_beam.io.filesystems import FileSystems

    probe = _join(output, ".synth-write-check-%s" % uuid.uuid4().hex)
    try:
        _write(probe, b"ok")
        FileSystems.delete([probe])
    except Exception as exc:
        raise OSError("%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else ""))


def _clear_previous(output: str) -> None:
    """Removes what an earlier synthesis wrote here, so a re-run replaces instead of mixing
    two worlds. Only our own files go: frames of ``cam-NN`` cameras in the CCTView layout
    and the ground-truth files."""
    from apache_beam.io.filesystems import FileSystems

    from transforms.layout import FrameLayout, PathParseError

    layout = FrameLayout()
    doomed = []
    for pattern in (_join(output, "frames", "cam-*", "**"), _join(output, "ground_truth", "**")):
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception:  # nothing there yet (some filesystems raise on no match)
            continue
        for meta in found:
            path = meta.path
            if "/ground_truth/" in path.replace("\\", "/"):
                doomed.append(path)
                continue
            try:
                if layout.parse(path).camera_id.startswith("cam-"):
                    doomed.append(path)
            except PathParseError:
                pass
    for i in range(0, len(doomed), 500):
        FileSystems.delete(doomed[i:i + 500])


def _truth_table(rows: dict):
    import pyarrow as pa

    ts = pa.array(rows["frame_ts"], pa.timestamp("ms", tz="UTC"))
    boxes = pa.FixedSizeListArray.from_arrays(
        pa.array(np.asarray(rows["box_xyxy"], np.float32).reshape(-1), pa.float32()), 4)
    return pa.table({
        "camera_id": pa.array(rows["camera_id"], pa.string()),
        "frame_ts": ts,
        "frame_uri": pa.array(rows["frame_uri"], pa.string()),
        "vehicle_id": pa.array(rows["vehicle_id"], pa.int64()),
        "label": pa.array(rows["label"], pa.string()),
        "box_xyxy": boxes,
        "visible_fraction": pa.array(rows["visible_fraction"], pa.float32()),
        "direction": pa.array(rows["direction"], pa.int8()),
    })


def _links(cam_ids: List[str], seen: dict, vehicles: List[Vehicle]) -> list:
    """The true links: per camera pair and direction, the typical ``t_b - t_a``.

    ``offset_s`` is the median over vehicles seen at both cameras of the difference of
    their true crossing times (the middle of each view). ``spread_s`` is the half-width
    that holds 95% of the frame-level differences ``frame_ts_b - frame_ts_a`` between boxes
    of the same vehicle (visible_fraction >= 0.5) around that offset, i.e. the band a
    matcher has to search: transit variation + time in view + 1-s timestamps.
    ``support`` counts those vehicles; ``significance`` is null (truth is not a test).
    """
    links = []
    by_id = {v.vid: v for v in vehicles}
    for a in range(len(cam_ids)):
        for b in range(a + 1, len(cam_ids)):
            for direction in (+1, -1):
                transits, frame_dts = [], []
                for vid, v in by_id.items():
                    if v.direction != direction or a not in v.passes or b not in v.passes:
                        continue
                    ta = seen.get((a, vid))
                    tb = seen.get((b, vid))
                    if not ta or not tb:
                        continue
                    transits.append(v.passes[b][0] - v.passes[a][0])
                    frame_dts.extend((np.asarray(tb)[:, None] - np.asarray(ta)[None, :]).ravel())
                if len(transits) < 2:
                    continue
                offset = float(np.median(transits))
                spread = float(np.percentile(np.abs(np.asarray(frame_dts) - offset), 95))
                links.append({
                    "camera_a": cam_ids[a], "camera_b": cam_ids[b],
                    "offset_s": round(offset, 2), "spread_s": round(max(spread, 1.0), 2),
                    "support": len(transits), "significance": None,
                    "direction": "+x" if direction > 0 else "-x",
                    "transit_min_s": round(float(np.min(transits)), 2),
                    "transit_max_s": round(float(np.max(transits)), 2),
                })
    return links


def synthesize(output: str, cameras: int = 3, minutes: float = 5, seed: int = 0,
               noise: float = 1.0, fps: float = 1.0, start: dt.datetime = DEFAULT_START, *,
               spacing_m: float = 400.0, rate_per_min: float = 20.0, jpeg_quality: Optional[int] = None,
               ) -> dict:
    """Renders the synthetic world into ``output`` and returns a summary.

    ``cameras`` (1..99) along the road ``spacing_m`` apart, ``minutes`` of footage from
    ``start`` (UTC; a naive datetime is taken as UTC), ``rate_per_min`` arrivals per
    minute per direction, ``noise`` scales every nuisance (speed variation, lighting,
    sensor noise, JPEG loss, occluders, frame jitter; 0 = clean), ``fps`` frames per second
    per camera (at most 1, since the layout has second resolution). Same arguments, same
    bytes. An earlier synthesis in ``output`` is replaced.
    """
    began = time.perf_counter()
    cameras, seed = int(cameras), int(seed)
    minutes, noise, fps = float(minutes), float(noise), float(fps)
    _check_arguments(cameras, minutes, fps, noise, rate_per_min, spacing_m)
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.timezone.utc)
    start = start.astimezone(dt.timezone.utc).replace(microsecond=0)
    output = output.rstrip("/") or "/"
    if "://" not in output:
        output = os.path.abspath(output)
    quality = int(jpeg_quality) if jpeg_quality else int(np.clip(round(90 - 25 * noise), 30, 95))
    duration = minutes * 60.0

    _check_writable(output)
    _clear_previous(output)
    vehicles = _simulate(_rng(seed, 0), cameras, float(spacing_m), 0.0, duration,
                         float(rate_per_min), noise)
    cams = [_Camera(k, seed, noise) for k in range(cameras)]
    cam_ids = [c.id for c in cams]
    rows = {k: [] for k in TRUTH_COLUMNS}
    seen: Dict[Tuple[int, int], List[float]] = {}
    frames = sum(_render_camera(cam, vehicles, output, start, duration, fps, seed, quality,
                                rows, seen) for cam in cams)
    links = _write_truth(output, rows, cam_ids, seen, vehicles)
    end = start + dt.timedelta(seconds=duration)
    return {
        "output": output,
        "cameras": cam_ids,
        "frames": frames,
        "vehicles": len(set(rows["vehicle_id"])),
        "vehicles_simulated": len(vehicles),
        "boxes": len(rows["camera_id"]),
        "links": len(links),
        "start": start.isoformat(),
        "end": end.isoformat(),
        "span_s": duration,
        "seed": seed,
        "noise": noise,
        "fps": fps,
        "seconds": round(time.perf_counter() - began, 2),
    }


# The columns of ground_truth/boxes.parquet, as :func:`_render_camera` gathers them.
TRUTH_COLUMNS = ("camera_id", "frame_ts", "frame_uri", "vehicle_id", "label", "box_xyxy",
                 "visible_fraction", "direction")


def _check_arguments(cameras: int, minutes: float, fps: float, noise: float,
                     rate_per_min: float, spacing_m: float) -> None:
    """ValueError for arguments no world can be rendered from (the CLI's one line)."""
    if not 1 <= cameras <= 99:
        raise ValueError("--cameras must be between 1 and 99, got %d" % cameras)
    if not (minutes > 0 and math.isfinite(minutes)) or minutes > 24 * 60:
        raise ValueError("--minutes must be > 0 and at most a day, got %s" % minutes)
    if not (0 < fps <= 1):
        raise ValueError("--fps must be in (0, 1] (frame names have second resolution), got %s" % fps)
    if not (0 <= noise <= 3):
        raise ValueError("--noise must be between 0 and 3, got %s" % noise)
    if not (rate_per_min > 0 and spacing_m >= 100):
        raise ValueError("rate_per_min must be > 0 and spacing_m >= 100")


def _render_camera(cam: "_Camera", vehicles, output: str, start: dt.datetime, duration: float,
                   fps: float, seed: int, quality: int, rows: dict, seen: dict) -> int:
    """Writes one camera's frames (JPEG) and its neutral background (PNG); adds its boxes
    to ``rows`` and its well-visible sightings (half the vehicle or more) to ``seen``;
    -> the frames written."""
    passing = [(v, *v.passes[cam.index]) for v in vehicles if cam.index in v.passes]
    crossings = np.array([p[1] for p in passing]) if passing else np.zeros(0)
    # a vehicle is in view for well under a minute: pre-select by crossing time
    window = (WIDTH + 80) / (cam.px_per_m * cam.cos * 7.0) + 2
    sprites: dict = {}
    frames = 0
    for sec in cam.frame_times(duration, fps, seed):
        rng = _rng(seed, 3, cam.index, sec)
        t = sec + float(rng.random())            # true instant inside the named second
        near = [passing[i] for i in np.flatnonzero(np.abs(crossings - t) < window)]
        img, boxes = cam.render(t, near, sprites, rng)
        img = cam.expose(img, t, rng)
        when = start + dt.timedelta(seconds=sec)
        uri = frame_path(output, cam.id, when)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        _write(uri, buf.getvalue())
        frames += 1
        ts_ms = int(when.timestamp() * 1000)
        for v, box, frac in boxes:
            for column, value in zip(TRUTH_COLUMNS, (cam.id, ts_ms, uri, v.vid, v.label, box,
                                                     frac, v.direction)):
                rows[column].append(value)
            if frac >= 0.5:
                seen.setdefault((cam.index, v.vid), []).append(float(sec))
    _write(_join(output, "ground_truth", "backgrounds", cam.id + ".png"), _png(cam.neutral_view()))
    return frames


def _write_truth(output: str, rows: dict, cam_ids: List[str], seen: dict, vehicles) -> list:
    """Writes ground_truth/boxes.parquet and ground_truth/links.json; -> the links."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(_truth_table(rows), sink)
    _write(_join(output, "ground_truth", "boxes.parquet"), sink.getvalue())
    links = _links(cam_ids, seen, vehicles)
    _write(_join(output, "ground_truth", "links.json"), json.dumps(links, indent=2).encode())
    return links


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- CLI glue
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the synthesis flags (``--cameras --minutes --output --seed --noise --fps``)."""
    parser.add_argument("--output", required=True,
                        help="folder or Beam filesystem URI (gs://...) to write frames/ and "
                             "ground_truth/ into")
    parser.add_argument("--cameras", type=int, default=3, help="cameras along the road (1-99)")
    parser.add_argument("--minutes", type=float, default=5.0, help="minutes of footage")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    parser.add_argument("--noise", type=float, default=1.0,
                        help="scales lighting drift, sensor noise, JPEG loss, occluders and "
                             "speed variation (0 = clean, 1 = default, up to 3)")
    parser.add_argument("--fps", type=float, default=1.0,
                        help="frames per second per camera, at most 1")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Runs :func:`synthesize` from parsed flags; prints the summary as one JSON line.

    Bad values and unwritable outputs raise :class:`runners.errors.UsageError` (the CLI
    prints it as one line and exits non-zero)."""
    from runners.errors import UsageError

    try:
        summary = synthesize(args.output, cameras=args.cameras, minutes=args.minutes,
                             seed=args.seed, noise=args.noise, fps=args.fps)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except (OSError, IOError) as exc:
        raise UsageError("cannot write to output %s (%s)" % (args.output, exc)) from None
    print(json.dumps(summary))
    return 0


COMMAND = Command(
    "synthetic multi-camera footage with ground truth (frames in the CCTView layout)",
    (), run_from_args, add_arguments=add_arguments)
