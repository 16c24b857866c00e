"""Candidate rules: which dt make a candidate pair, per camera pair, and the reach of a
block of queries (see the package docstring for the semantics)."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np

__all__ = ["POLICIES", "METRICS", "DEFAULT_MAX_GAP_S", "DEFAULT_WINDOW_S",
           "DEFAULT_MAX_CANDIDATES_PER_BLOCK", "seconds_to_ms_floor", "seconds_to_ms_ceil",
           "window_ms_of", "window_start_ms", "check_params", "normalize_links",
           "link_bands", "bands_to_ms", "CandidateBands", "candidate_mask", "reach_window_starts", "in_reach",
           "dt_intervals"]


POLICIES = ("all", "topk", "mutual", "assignment")
METRICS = ("l2", "cosine")
DEFAULT_MAX_GAP_S = 300.0
DEFAULT_WINDOW_S = 600.0
DEFAULT_MAX_CANDIDATES_PER_BLOCK = 50_000_000

_EPS_MS = 1e-6  # 1 ns, in ms: absorbs 0.1 s -> 100.00000000000001 ms style errors


def seconds_to_ms_floor(seconds: float) -> int:
    return int(math.floor(float(seconds) * 1000.0 + _EPS_MS))


def seconds_to_ms_ceil(seconds: float) -> int:
    return int(math.ceil(float(seconds) * 1000.0 - _EPS_MS))


def window_ms_of(window_s: float) -> int:
    """The window size in whole ms (>= 1)."""
    w = int(round(float(window_s) * 1000.0))
    if not w >= 1:
        raise ValueError("window_s must be at least 0.001 s, got %r" % (window_s,))
    return w


def window_start_ms(ts_ms: int, window_ms: int) -> int:
    """Start of the fixed window ``[kW, (k+1)W)`` that contains ``ts_ms``."""
    return (int(ts_ms) // window_ms) * window_ms


def check_params(policy: str, metric: str, top_k: int, threshold) -> None:
    if policy not in POLICIES:
        raise ValueError("policy must be one of %s, got %r" % (POLICIES, policy))
    if metric not in METRICS:
        raise ValueError("metric must be one of %s, got %r" % (METRICS, metric))
    if int(top_k) != top_k or top_k < 1:
        raise ValueError("top_k must be an integer >= 1, got %r" % (top_k,))
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError("threshold must be a finite number or None, got %r" % (threshold,))


def normalize_links(links: Optional[Iterable[dict]]) -> Optional[list]:
    """Validates links.json objects; returns them with ``camera_a < camera_b``.

    Extra keys (``support``, ``significance``) are kept. A link given the other way
    round is flipped (cameras swapped, ``offset_s`` negated). ``None`` stays ``None``
    (no links = every camera pair within ``max_gap_s``); an empty list means no pair is
    linked, so nothing can match.
    """
    if links is None:
        return None
    out = []
    for link in links:
        try:
            a, b = str(link["camera_a"]), str(link["camera_b"])
            offset, spread = float(link["offset_s"]), float(link["spread_s"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError("bad link %r: needs camera_a, camera_b, offset_s, spread_s (%s)"
                             % (link, e)) from None
        if a == b:
            raise ValueError("bad link %r: camera_a == camera_b" % (link,))
        if not (math.isfinite(offset) and math.isfinite(spread)) or spread < 0:
            raise ValueError("bad link %r: offset_s/spread_s must be finite, spread_s >= 0"
                             % (link,))
        d = dict(link)
        if a > b:
            a, b, offset = b, a, -offset
        d.update(camera_a=a, camera_b=b, offset_s=offset, spread_s=spread)
        out.append(d)
    return out


def link_bands(links: Optional[Iterable[dict]]) -> dict:
    """links.json objects -> ``{(camera_a, camera_b): (k, 2) float64 [lo, hi] dt
    seconds}``, ``offset_s -+ spread_s`` of each link (``camera_a < camera_b``, links
    given the other way round flipped; several links of a pair = several bands)."""
    out: dict = {}
    for link in normalize_links(links) or []:
        out.setdefault((link["camera_a"], link["camera_b"]), set()).add(
            (link["offset_s"] - link["spread_s"], link["offset_s"] + link["spread_s"]))
    return {k: np.asarray(sorted(v), np.float64).reshape(-1, 2) for k, v in sorted(out.items())}


def bands_to_ms(bands) -> np.ndarray:
    """dt bands in seconds -> sorted inclusive whole-ms intervals ((k, 2) int64): ``ceil``
    of the lower, ``floor`` of the upper edge; empty bands dropped."""
    out = set()
    for lo, hi in np.asarray(bands, dtype=np.float64).reshape(-1, 2).tolist():
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("band edges must be finite, got %r" % ((lo, hi),))
        lo_ms, hi_ms = seconds_to_ms_ceil(lo), seconds_to_ms_floor(hi)
        if lo_ms <= hi_ms:
            out.add((lo_ms, hi_ms))
    return np.asarray(sorted(out), dtype=np.int64).reshape(-1, 2)


class CandidateBands:
    """Which ``dt`` make a candidate, per directed camera pair.

    ``intervals(q_cam, r_cam)`` gives the inclusive integer-ms intervals of
    ``t_r - t_q`` (note: relative to the *query* camera, so the links' bands are negated
    and swapped when ``q_cam > r_cam``); ``dt == 0`` is never a candidate. Picklable,
    comparable (the Beam WindowFn that holds it must be).
    """

    def __init__(self, max_gap_s: float = DEFAULT_MAX_GAP_S, links=None):
        links = normalize_links(links)
        self.links = links
        if links is None:
            if not float(max_gap_s) > 0:
                raise ValueError("max_gap_s must be > 0, got %r" % (max_gap_s,))
            self.max_gap_ms = seconds_to_ms_floor(max_gap_s)
            self._pairs = None
            self._default = np.array([[-self.max_gap_ms, self.max_gap_ms]], dtype=np.int64)
        else:
            self.max_gap_ms = None
            self._pairs = {pair: bands_to_ms(b) for pair, b in link_bands(links).items()}
            self._pairs = {pair: iv for pair, iv in self._pairs.items() if len(iv)}
            self._default = None
        self._empty = np.zeros((0, 2), dtype=np.int64)

    @property
    def linked(self) -> bool:
        return self._pairs is not None

    def _key(self):
        if self._pairs is None:
            return ("gap", self.max_gap_ms)
        return ("links", tuple(sorted((k, tuple(map(tuple, v.tolist())))
                                      for k, v in self._pairs.items())))

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return "CandidateBands%r" % (self._key(),)

    def intervals(self, q_cam: str, r_cam: str) -> np.ndarray:
        """(m, 2) int64 inclusive intervals of ``t_r - t_q`` in ms; (0, 2) if none."""
        if q_cam == r_cam:
            return self._empty
        if self._pairs is None:
            return self._default
        if q_cam < r_cam:
            return self._pairs.get((q_cam, r_cam), self._empty)
        iv = self._pairs.get((r_cam, q_cam))
        if iv is None:
            return self._empty
        return np.ascontiguousarray(-iv[::-1, ::-1])

    def max_width_ms(self) -> int:
        """The widest span ``hi - lo`` of the candidate ``dt`` of any camera pair (ms):
        how far past a window of queries its references can reach in all."""
        if self._pairs is None:
            return 2 * self.max_gap_ms
        return max((int(iv[:, 1].max() - iv[:, 0].min()) for iv in self._pairs.values()),
                   default=0)

    def has_later_partner(self, cam: str) -> bool:
        """Whether ``cam`` can be the camera-A (query) side of a pair: without links any
        camera can (the partners are whatever cameras the data has); with links, when a
        link names a camera that sorts after it."""
        return self._pairs is None or any(a == cam for a, _ in self._pairs)

    def reference_intervals(self, cam: str) -> np.ndarray:
        """The candidate intervals of ``t_cam - t_q`` over every camera ``q < cam`` that
        ``cam`` can be the reference (camera-B) side for, as one (m, 2) array (their
        union is where ``cam``'s detections are needed as references)."""
        if self._pairs is None:
            return self._default
        parts = [iv for (a, b), iv in self._pairs.items() if b == cam]
        return np.concatenate(parts) if parts else self._empty

    def reach_ms(self) -> int:
        """The largest ``|dt|`` any candidate can have (ms)."""
        if self._pairs is None:
            return self.max_gap_ms
        return max((int(np.abs(iv).max()) for iv in self._pairs.values()), default=0)

    def partners(self, cam: str, cameras: Iterable[str] = ()) -> list:
        """The cameras ``cam`` can have candidates in (sorted)."""
        if self._pairs is None:
            return sorted({c for c in cameras if c != cam})
        out = set()
        for a, b in self._pairs:
            if a == cam:
                out.add(b)
            elif b == cam:
                out.add(a)
        return sorted(out)


def candidate_mask(q_ts: np.ndarray, r_ts: np.ndarray, intervals: np.ndarray) -> np.ndarray:
    """(n, m) bool: ``r_ts[j] - q_ts[i]`` is non-zero and inside one of the intervals."""
    dt = np.subtract.outer(np.asarray(r_ts, np.int64), np.asarray(q_ts, np.int64)).T
    mask = np.zeros(dt.shape, dtype=bool)
    for lo, hi in intervals:
        mask |= (dt >= lo) & (dt <= hi)
    mask &= dt != 0
    return mask


def reach_window_starts(t_ms: int, window_ms: int, intervals: np.ndarray,
                        t_max_ms: Optional[int] = None) -> list:
    """Starts of every fixed window ``[kW, (k+1)W)`` whose reach contains ``t_ms``.

    The reach of a window for a reference detection is the set of times a candidate of
    one of the window's queries can have: ``[kW + lo, (k+1)W + hi)`` for each interval
    ``[lo, hi]`` of ``t_ref - t_query`` (open at the end because query times are
    ``< (k+1)W``). Equivalently ``k`` in ``[floor((t-hi)/W), floor((t-lo)/W)]``.
    With ``t_max_ms``: the windows whose reach contains some time in
    ``[t_ms, t_max_ms]`` (for a batch of references spanning at most one window this is
    exactly the union of its detections' windows: the ranges of consecutive times
    overlap or touch, so there is no gap).
    """
    t0 = int(t_ms)
    t1 = t0 if t_max_ms is None else int(t_max_ms)
    ks = set()
    for lo, hi in intervals:
        k0 = (t0 - int(hi)) // window_ms
        k1 = (t1 - int(lo)) // window_ms
        ks.update(range(k0, k1 + 1))
    return [k * window_ms for k in sorted(ks)]


def in_reach(r_ts: np.ndarray, start_ms: int, window_ms: int, intervals: np.ndarray) -> np.ndarray:
    """Bool per reference time: inside the reach of window ``[start, start+W)``."""
    r_ts = np.asarray(r_ts, np.int64)
    out = np.zeros(r_ts.shape, dtype=bool)
    for lo, hi in intervals:
        out |= (r_ts >= start_ms + lo) & (r_ts < start_ms + window_ms + hi)
    return out


def dt_intervals(intervals: np.ndarray) -> np.ndarray:
    """The candidate ``dt`` set of ``intervals`` (inclusive, ms) without ``dt == 0``, as
    sorted, disjoint, non-adjacent inclusive intervals ((m, 2) int64)."""
    parts = []
    for lo, hi in np.asarray(intervals, dtype=np.int64).reshape(-1, 2).tolist():
        if lo <= -1:
            parts.append((lo, min(hi, -1)))
        if hi >= 1:
            parts.append((max(lo, 1), hi))
    merged: list = []
    for lo, hi in sorted(parts):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return np.asarray(merged, dtype=np.int64).reshape(-1, 2)
