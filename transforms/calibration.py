"""Camera links from the data: where mutual nearest neighbours pile up in dt.

For each camera pair, the dt of its mutual-nearest-neighbour pairs within
``+-max_gap`` is histogrammed twice: on the real data and on a time-shifted control
(camera b's timestamps circularly shifted by half the period: the same traffic
density, no true pairs). A peak that stands significantly above the control becomes a
link (docs/spec.md, links.json). Both directions of traffic may give a link each.

:func:`find_links` is the pure statistics; :class:`CalibrationPairs` is the Beam
pipeline that feeds it: the scalable matcher's real pairs and control pairs of every
camera pair, in one pass (and its time chunks, ``owned_ms``: ``cctview
calibrate`` runs a job per chunk, pools their dt lists with
:func:`merge_pair_dts` and finds the links on the driver, :func:`links_of_pairs`).
"""
from typing import Dict, List, Sequence, Tuple

import apache_beam as beam
import numpy as np

from transforms.control import CONTROL, CONTROLS_PER_PAIR, REAL, ClassifyControl
from transforms.match_blocks import CandidateBands, window_ms_of
from transforms.matching import (DEFAULT_MAX_GAP_S, DEFAULT_METRIC, DEFAULT_WINDOW_S,
                                 MatchDetections, ShiftedControl, block_ms_of)

__all__ = ["CalibrationPairs", "DEFAULT_MIN_SIGNIFICANCE", "DEFAULT_MIN_SUPPORT",
           "find_links", "links_of_pairs", "merge_pair_dts",
           "searched_pairs"]

# When a dt peak counts as a link (the defaults of `cctview calibrate` too).
DEFAULT_MIN_SUPPORT = 10
DEFAULT_MIN_SIGNIFICANCE = 5.0
_HALF_WIDTHS_S = (2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 14.0, 20.0, 30.0)


def _window_sums(hist: np.ndarray, half_bins: int) -> np.ndarray:
    """Sum of hist over [i - half_bins, i + half_bins] for every bin i (zero padded)."""
    padded = np.concatenate([np.zeros(half_bins), hist, np.zeros(half_bins)])
    csum = np.concatenate([[0.0], np.cumsum(padded)])
    width = 2 * half_bins + 1
    return csum[width:] - csum[:-width]


def _bulk_half_width(excess: np.ndarray, available: np.ndarray, centre: int, half: int,
                     reach: int, bulk: float = 0.9) -> int:
    """The smallest half-width around ``centre`` that holds ``bulk`` of the peak's excess.

    The z-score picks the band where the peak is most significant, which is its core;
    vehicles of one link spread wider (lanes, speeds, the frame clock), so the band to
    match in grows until it holds most of the excess within ``reach`` bins.
    """
    gained = []
    for h in range(0, reach + 1):
        lo, hi = max(0, centre - h), min(len(excess), centre + h + 1)
        window = np.where(available[lo:hi], excess[lo:hi], 0.0)
        gained.append(float(window.sum()))
    target = bulk * max(gained)
    return max(half, next(h for h, g in enumerate(gained) if g >= target))


def find_links(dt_real: Sequence[float], dt_control: Sequence[float], max_gap_s: float,
               controls: float = 1.0, bin_s: float = 1.0,
               min_support: int = DEFAULT_MIN_SUPPORT,
               min_significance: float = DEFAULT_MIN_SIGNIFICANCE, max_links: int = 2,
               mirror_significance: float = 3.0) -> List[dict]:
    """Peaks of the real dt histogram that stand above the control's.

    ``dt_control`` may pool ``controls`` independent control runs; its counts are
    divided by that number. The control is smoothed over +-30 s to estimate the
    background rate per bin (the control has no peaks by construction; smoothing
    lowers its noise) and scaled to the real histogram's median level. For every
    centre and half-width (2 to 30 s), the real count R in the band is compared with
    the background B by ``z = (R - B) / sqrt(B + 1)``; the best (centre, half-width) is a
    link when ``z >= min_significance`` and the excess ``R - B >= min_support``. Windows
    that lie on one side of dt = 0 are searched first (with traffic both ways, one wide
    window over the peaks near -T and +T outscores either, and its link would hold
    both directions), any window only when none of them qualifies. Its band
    is masked (plus a margin of the narrowest half-width, so that a second link is a
    peak of its own, not this one's shoulder) and the next peak searched, up to
    ``max_links``. Then, for a pair with links of one sign of dt only, the *mirror* of
    the strongest one (the other direction of traffic on the same road: dt near
    ``-offset``) is tested alone, at ``mirror_significance``: one pre-specified window
    needs no correction for searching the whole histogram, so a weaker opposite
    carriageway is still found. Finally each band is widened to hold 90% of its peak's
    excess (:func:`_bulk_half_width`), never past half the way to the pair's other
    link; bands that touch are joined (a peak at dt ~ 0 searched from both sides is one
    link). Returns links without camera ids, by offset: ``offset_s, spread_s, support
    (R), excess (R - B), significance (z)``.
    """
    dt_real = np.asarray(dt_real, dtype=np.float64)
    n_bins = int(np.ceil(2 * max_gap_s / bin_s))
    edges = -max_gap_s + bin_s * np.arange(n_bins + 1)
    real = np.histogram(dt_real, bins=edges)[0].astype(np.float64)
    background = _background(real, np.histogram(np.asarray(dt_control, np.float64),
                                                 bins=edges)[0] / max(controls, 1e-9), bin_s)
    available = np.ones(n_bins, dtype=bool)
    margin = max(1, int(round(_HALF_WIDTHS_S[0] / bin_s)))
    peaks = []  # (centre bin, core half-width in bins, z)
    for _ in range(max_links):
        # windows on one side of dt = 0 first (a window over both directions' peaks
        # outscores either), then any window (cameras side by side: a peak at dt ~ 0)
        for zero_edge in (max_gap_s / bin_s, None):
            z, i, half, r, b = _best_window(real, background, available, bin_s,
                                            zero_edge=zero_edge)
            if z >= min_significance and r - b >= min_support:
                break
        else:
            break
        peaks.append((i, half, z))
        available[max(0, i - half - margin):min(n_bins, i + half + margin + 1)] = False
    if peaks and len(peaks) < max_links and len({np.sign(edges[i] + bin_s / 2)
                                                  for i, _, _ in peaks}) == 1:
        mirror = _mirror_peak(real, background, available, peaks[0], edges, bin_s,
                              mirror_significance, min_support)
        if mirror is not None:
            peaks.append(mirror)
    smooth_bins = max(1, int(round(30.0 / bin_s)))
    bands = []  # (lo, hi) bins of each peak's widened band
    centres = sorted(i for i, _, _ in peaks)
    for i, half, _ in peaks:
        gaps = [abs(i - j) for j in centres if j != i]
        reach = min([smooth_bins] + [g // 2 for g in gaps])
        half = min(max(half, _bulk_half_width(real - background, np.ones(n_bins, bool), i,
                                              min(half, reach), reach)), max(reach, 1))
        bands.append((i - half, i + half))
    links = [_link(dt_real, real, background, edges, (lo + hi) // 2, (hi - lo + 1) // 2, bin_s)
             for lo, hi in _merge_touching(bands, margin)]
    return sorted(links, key=lambda l: l["offset_s"])


def _merge_touching(bands, margin: int) -> list:
    """Bands (lo, hi bins) less than ``margin`` bins apart, joined: the two one-sided
    halves of a peak at dt ~ 0 (cameras side by side) are one link."""
    out: list = []
    for lo, hi in sorted(bands):
        if out and lo - out[-1][1] <= margin:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _background(real: np.ndarray, control: np.ndarray, bin_s: float) -> np.ndarray:
    """The control smoothed over +-30 s, scaled to the real histogram's typical level."""
    n_bins = len(real)
    smooth_bins = max(1, int(round(30.0 / bin_s)))
    counts = _window_sums(control, smooth_bins)
    support_bins = _window_sums(np.ones_like(control), smooth_bins)
    background = counts / support_bins
    # The control has the real data's traffic, not its exact count of false pairs: scale
    # it to the real histogram's typical level (the median bin, which a peak of a few
    # bins cannot move), so a uniformly busier real side is never taken for a link.
    typical_real = np.median(_window_sums(real, smooth_bins) / support_bins)
    typical_control = np.median(background)
    if typical_control > 0 and typical_real > 0:
        background = background * (typical_real / typical_control)
    floor = max(background.mean(), 0.5 / n_bins)  # never a zero background
    return np.maximum(background, 0.25 * floor)


def _best_window(real, background, available, bin_s, half_widths_s=_HALF_WIDTHS_S,
                 allowed=None, min_excess=-np.inf, zero_edge=None):
    """-> (z, centre bin, half-width bins, R, B) of the most significant window that
    touches no masked bin (and, with ``allowed``, whose centre is allowed, and whose
    excess is at least ``min_excess``; with ``zero_edge``, the position of dt = 0 in
    bins: that does not hold dt = 0 inside it, so that one window cannot hold both
    directions of traffic)."""
    best = (-np.inf, 0, 1, 0.0, 0.0)
    for half_width in half_widths_s:
        half = max(1, int(round(half_width / bin_s)))
        r = _window_sums(np.where(available, real, 0.0), half)
        b = _window_sums(np.where(available, background, 0.0), half)
        blocked = _window_sums((~available).astype(np.float64), half) > 0
        if allowed is not None:
            blocked |= ~allowed
        if zero_edge is not None:
            centre = np.arange(len(real))
            blocked |= (centre - half < zero_edge) & (centre + half + 1 > zero_edge)
        blocked |= r - b < min_excess
        z = np.where(blocked, -np.inf, (r - b) / np.sqrt(b + 1.0))
        i = int(np.argmax(z))
        if z[i] > best[0]:
            best = (float(z[i]), i, half, float(r[i]), float(b[i]))
    return best


def _mirror_peak(real, background, available, peak, edges, bin_s, min_z, min_support):
    """The other direction of a link's road: the most significant window with an excess
    of at least ``min_support``, centred within the peak's core half-width of
    ``-offset`` and no wider than the peak's core; None if its significance is under
    ``min_z``."""
    i, half, _ = peak
    centre_s = -(edges[i] + bin_s / 2)
    centres = (edges[:-1] + edges[1:]) / 2
    allowed = np.abs(centres - centre_s) <= half * bin_s
    if not allowed.any():
        return None
    widths = [w for w in _HALF_WIDTHS_S if w <= half * bin_s] or [_HALF_WIDTHS_S[0]]
    z, j, h, r, b = _best_window(real, background, available, bin_s, widths, allowed,
                                 min_support)
    if not (z >= min_z and r - b >= min_support):
        return None
    return j, h, z


def _link(dt_real, real, background, edges, i, half, bin_s) -> dict:
    n_bins = len(real)
    lo, hi = max(0, i - half), min(n_bins, i + half + 1)
    r = float(real[lo:hi].sum())
    b = float(background[lo:hi].sum())
    in_band = (dt_real >= edges[lo]) & (dt_real < edges[hi])
    centre = (edges[i] + edges[i + 1]) / 2
    offset = float(np.median(dt_real[in_band])) if in_band.any() else float(centre)
    return {
        "offset_s": round(offset, 3),
        "spread_s": round((half + 0.5) * bin_s, 3),
        "support": int(r),
        "excess": round(r - b, 1),
        "significance": round(float((r - b) / np.sqrt(b + 1.0)), 2),
    }


def links_of_pairs(pair_dts: Dict[Tuple[str, str], dict], max_gap_s: float,
                   min_support: int = DEFAULT_MIN_SUPPORT,
                   min_significance: float = DEFAULT_MIN_SIGNIFICANCE) -> Tuple[list, int]:
    """``{(camera_a, camera_b): {"real": dts, "control": dts}}`` -> (links.json objects,
    camera pairs histogrammed). A pair with fewer than ``min_support`` real pairs says
    nothing and is not histogrammed."""
    links, histogrammed = [], 0
    for (cam_a, cam_b), dts in sorted(pair_dts.items()):
        if len(dts["real"]) < min_support:
            continue
        histogrammed += 1
        for link in find_links(dts["real"], dts["control"], max_gap_s,
                               controls=CONTROLS_PER_PAIR, min_support=min_support,
                               min_significance=min_significance):
            links.append(dict(camera_a=cam_a, camera_b=cam_b, **link))
    return links, histogrammed


def merge_pair_dts(parts) -> Dict[Tuple[str, str], dict]:
    """Pools the per-pair dt lists of several :class:`CalibrationPairs` outputs (time
    chunks of one period)."""
    merged: dict = {}
    for pair, dts in parts:
        into = merged.setdefault(tuple(pair), {REAL: [], CONTROL: []})
        into[REAL].extend(dts[REAL])
        into[CONTROL].extend(dts[CONTROL])
    return merged


def _dts_by_kind(element):
    pair, values = element
    dts = {REAL: [], CONTROL: []}
    for kind, dt in values:
        dts[kind].append(dt)
    return pair, dts


def searched_pairs(cameras, pairs=None) -> List[Tuple[str, str]]:
    """The camera pairs calibration histograms: every pair of ``cameras``, or those of
    ``pairs`` (any order within a pair) whose two cameras are both in ``cameras``."""
    cameras = sorted(set(cameras))
    if pairs is None:
        return [(a, b) for i, a in enumerate(cameras) for b in cameras[i + 1:]]
    present = set(cameras)
    return sorted({(min(a, b), max(a, b)) for a, b in pairs
                   if a != b and a in present and b in present})


class CalibrationPairs(beam.PTransform):
    """Detections (dicts or column chunks) -> ``((camera_a, camera_b), {"real": [dt],
    "control": [dt]})``: the dt of every mutual-nearest-neighbour pair of each camera
    pair within ``+-max_gap_s``, for real and against camera b shifted by half of
    ``span_ms=(lo, hi)`` (the period of the data, read on the driver; rounded up to
    whole blocks: :class:`transforms.matching.ShiftedControl`), circularly. Both are
    computed in the same blocks from the same shuffled copies: the job shuffles what
    one matching does (a chance peak on noise that a shift of only ``2 * max_gap`` read
    in ``tests/e2e/test_calibration.py`` is why the shift is half the period).
    ``cameras`` are the camera ids in the data (read on the driver);
    ``pairs``: only these ``(camera_a, camera_b)`` pairs are searched (default every pair
    of ``cameras``: N(N-1)/2 of them, which for a city's cameras is most of the cost);
    ``owned_ms``: only the pairs whose camera-A detection lies in that range (one time
    chunk of a longer period, see :class:`transforms.matching.MatchDetections`).
    """

    def __init__(self, cameras, span_ms, max_gap_s: float = DEFAULT_MAX_GAP_S,
                 window_s: float = DEFAULT_WINDOW_S, metric: str = DEFAULT_METRIC,
                 owned_ms=None, pairs=None):
        super().__init__()
        links = [{"camera_a": a, "camera_b": b, "offset_s": 0.0, "spread_s": float(max_gap_s)}
                 for a, b in searched_pairs(cameras, pairs)]
        lo, hi = int(span_ms[0]), int(span_ms[1])
        min_block_ms = block_ms_of("mutual", window_ms_of(window_s),
                                   CandidateBands(max_gap_s, links))
        control = ShiftedControl(lo, hi - lo, min_block_ms)
        self._match = dict(policy="mutual", metric=metric, window_s=window_s, links=links,
                           owned_ms=owned_ms, control=control)

    def expand(self, detections):
        return (
            detections
            | "MutualNN" >> MatchDetections(**self._match)
            | "Classify" >> ClassifyControl()
            | "KindAndDt" >> beam.Map(lambda c: (c[0], (c[1], c[2]["dt_seconds"])))
            | "ByCameraPair" >> beam.GroupByKey()
            | "ByKind" >> beam.Map(_dts_by_kind)
        )
