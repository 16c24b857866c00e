"""Short within-camera tracklets: the same vehicle in consecutive frames of one camera.

Pure numpy, no model and no Beam: :func:`link_tracklets` takes one camera's detections
(ids, times, boxes, embeddings) and links them, frame by frame, into short tracklets;
:func:`aggregate_embeddings` gives one embedding per tracklet.

How detections are linked
=========================
Detections are sorted by (time, detection id) and grouped into frames (equal times).
Frame by frame, every *open* tracklet whose last detection is at most ``max_gap_s``
earlier (and that is below ``max_len`` members and ``max_duration_s``) may be extended
by one detection of the new frame. The cost of extending tracklet k (last detection i,
at time t_i) with detection j (time t_j, dt = t_j - t_i) is

    motion / motion_gate + emb_weight * cos_dist / emb_gate

- ``motion``: the box-centre displacement in units of the boxes' size (geometric mean
  of the two ``sqrt(w * h)``). Without a velocity (the tracklet has one member) it is
  ``|c_j - c_i| / size`` per second of dt, gated at ``motion_gate`` box sizes per
  second; once the tracklet has a velocity it is the residual to the constant-velocity
  prediction ``|c_j - (c_i + v dt)| / size``, gated at ``velocity_gate`` box sizes (a
  vehicle does not jump or turn around between two frames).
- ``size``: ``|log(size_j / size_i)|`` must be at most ``size_gate`` (no link from a
  small car to a bus box); not part of the cost.
- ``cos_dist``: cosine distance of the two embeddings, gated at ``emb_gate``. By default
  the gate is data-adaptive: the ``emb_gate_quantile`` quantile of the camera's *chance*
  distances (detections 30-120 s apart, which are almost never the same vehicle), so
  that a link must look more alike than all but a few unrelated pairs do, whatever the
  embedder's scale. With too few chance pairs (< 50, short inputs) the embedding gate
  is off (``inf``) and only the cost term remains.

Pairs that pass every gate are taken greedily by ascending cost (ties by the
tracklet's and the detection's id order), one-to-one: a tracklet gets at most one
detection per frame and a detection joins at most one tracklet. A detection not taken
starts a new tracklet. The velocity of a tracklet is the displacement of its first link
per second, then the running mean ``(v + v_new) / 2`` of later links.

Missing boxes: a detection without a (finite) box is its own tracklet and is never
linked -- an embedding alone separates vehicles too weakly on real footage (docs/design.md)
to link several cars of a frame by appearance and time only.

Determinism: everything depends on the sorted (time, id) order only, so the result is
the same for any input order; a tracklet's id is the detection id of its first
(earliest) detection.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["CHANCE_LAG_MS", "DEFAULT_EMB_GATE_QUANTILE", "DEFAULT_MAX_DURATION_S",
           "DEFAULT_MAX_GAP_S", "DEFAULT_MAX_LEN", "DEFAULT_MOTION_GATE",
           "DEFAULT_SIZE_GATE", "DEFAULT_VELOCITY_GATE", "MIN_CHANCE_PAIRS", "Tracklets",
           "aggregate_embeddings", "chance_gate", "link_tracklets"]

DEFAULT_MAX_GAP_S = 4.0
DEFAULT_MAX_LEN = 8
DEFAULT_MAX_DURATION_S = 16.0
DEFAULT_MOTION_GATE = 1.0      # box sizes per second, tracklet without a velocity
DEFAULT_VELOCITY_GATE = 1.0    # box sizes, residual to the constant-velocity prediction
DEFAULT_SIZE_GATE = 0.7        # |log size ratio|
DEFAULT_EMB_GATE_QUANTILE = 0.15
CHANCE_LAG_MS = (30_000, 120_000)
MIN_CHANCE_PAIRS = 50


class Tracklets:
    """Result of :func:`link_tracklets`; arrays are in the caller's input order.

    Attributes:
      index: (n,) int64, tracklet number of each detection (0..m-1, numbered by the
        sorted (time, id) order of their first detections).
      ids: (m,) str, tracklet ids (detection id of the first member).
      length: (m,) int64 members.
      start_ms, end_ms: (m,) int64 first and last member times.
      velocity: (m, 2) float32 px/s (NaN for tracklets of one member).
      speed: (m, 2) float32 velocity in box sizes per second (NaN likewise).
      emb_gate: the embedding gate used (float; inf = off).
    """

    def __init__(self, index, ids, length, start_ms, end_ms, velocity, speed, emb_gate,
                 order=None):
        self.index, self.ids, self.length = index, ids, length
        self._order = np.arange(len(index)) if order is None else order
        self.start_ms, self.end_ms = start_ms, end_ms
        self.velocity, self.speed, self.emb_gate = velocity, speed, emb_gate

    def __len__(self):
        return len(self.ids)

    @property
    def detection_tracklet_ids(self) -> np.ndarray:
        """(n,) str: the tracklet id of every detection (input order)."""
        return self.ids[self.index] if len(self.index) else np.zeros(0, dtype=str)

    def members(self) -> list:
        """Per tracklet, the input positions of its members in time order."""
        out = [[] for _ in range(len(self))]
        for pos in self._order.tolist():  # (time, id) order
            out[int(self.index[pos])].append(pos)
        return out


def _normalise(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def chance_gate(ts_ms: np.ndarray, unit: np.ndarray, quantile: float,
                lag_ms: Sequence[int] = CHANCE_LAG_MS) -> float:
    """The ``quantile`` of cosine distances between detections lag_ms[0]..lag_ms[1]
    apart (each frame against the first frame at least lag_ms[0] later); inf when
    fewer than MIN_CHANCE_PAIRS such pairs exist. ``ts_ms`` sorted, ``unit`` rows
    L2-normalised."""
    frames, starts = np.unique(ts_ms, return_index=True)
    ends = np.r_[starts[1:], len(ts_ms)]
    dists = []
    for f, t in enumerate(frames.tolist()):
        g = int(np.searchsorted(frames, t + lag_ms[0], "left"))
        if g >= len(frames) or frames[g] > t + lag_ms[1]:
            continue
        d = 1.0 - unit[starts[f]:ends[f]] @ unit[starts[g]:ends[g]].T
        dists.append(d.ravel())
    if not dists:
        return float("inf")
    d = np.concatenate(dists)
    if len(d) < MIN_CHANCE_PAIRS:
        return float("inf")
    return float(np.quantile(d, quantile))


def link_tracklets(ids: Sequence[str], ts_ms, boxes=None, emb=None,
                   max_gap_s: float = DEFAULT_MAX_GAP_S, max_len: int = DEFAULT_MAX_LEN,
                   max_duration_s: float = DEFAULT_MAX_DURATION_S,
                   motion_gate: float = DEFAULT_MOTION_GATE,
                   velocity_gate: float = DEFAULT_VELOCITY_GATE,
                   size_gate: float = DEFAULT_SIZE_GATE, emb_gate: Optional[float] = None,
                   emb_gate_quantile: float = DEFAULT_EMB_GATE_QUANTILE,
                   emb_weight: float = 1.0) -> Tracklets:
    """Links one camera's detections into short tracklets (see the module docstring).

    Args:
      ids: unique detection ids (str).
      ts_ms: (n,) int epoch ms.
      boxes: (n, 4) xyxy pixels, rows may be None/NaN (-> singletons); None = no boxes
        (every detection its own tracklet).
      emb: (n, d) embeddings or None (then the embedding term and gate are off).
      emb_gate: cosine-distance gate; None -> :func:`chance_gate` at
        ``emb_gate_quantile``.
    """
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    d = _sorted_detections(ids, ts_ms, boxes, emb)
    if d.unit is not None:
        gate_e = (chance_gate(d.ts, d.unit, emb_gate_quantile) if emb_gate is None
                  else float(emb_gate))
    else:
        gate_e = float("inf")
    gates = _Gates(motion_gate, velocity_gate, size_gate, gate_e, emb_weight)
    max_gap_ms = int(round(max_gap_s * 1000))
    max_dur_ms = int(round(max_duration_s * 1000))
    chains = _Chains(len(d.ts))
    frames, starts = np.unique(d.ts, return_index=True)
    ends = np.r_[starts[1:], len(d.ts)]
    open_ = []  # tracklet numbers that may still be extended
    for f in range(len(frames)):
        t = int(frames[f])
        js = np.arange(starts[f], ends[f])
        # close tracklets that can no longer grow
        open_ = [k for k in open_ if t - d.ts[chains.last[k]] <= max_gap_ms
                 and chains.count[k] < max_len and t - d.ts[chains.first[k]] <= max_dur_ms]
        pairs = _frame_links(d, chains, open_, js[d.ok[js]], t, gates)
        for k, j, dts in pairs:
            chains.extend(k, j, (d.centre[j] - d.centre[chains.last[k]]) / dts)
        taken = {j for _, j, _ in pairs}
        for j in js.tolist():
            if j not in taken:
                k = chains.start(j)
                if d.ok[j]:
                    open_.append(k)
    return _tracklets(d, chains, gate_e)


class _Detected(NamedTuple):
    """One camera's detections sorted by (time, id): ``ok`` where the box is usable,
    box ``centre`` and ``size`` (sqrt of its area), unit embeddings (or None)."""
    order: np.ndarray
    ids: np.ndarray
    ts: np.ndarray
    ok: np.ndarray
    centre: np.ndarray
    size: np.ndarray
    unit: Optional[np.ndarray]


class _Gates(NamedTuple):
    """What a link may cost: the motion, velocity, size and embedding gates."""
    motion: float
    velocity: float
    size: float
    emb: float
    emb_weight: float


def _sorted_detections(ids, ts_ms, boxes, emb) -> _Detected:
    """:func:`link_tracklets`' inputs, checked and sorted by (time, id)."""
    ids = np.asarray([str(i) for i in ids], dtype=str)
    ts = np.asarray(ts_ms, dtype=np.int64).reshape(-1)
    n = len(ids)
    if len(ts) != n:
        raise ValueError("ids and ts_ms disagree in length")
    if len(set(ids.tolist())) != n:
        raise ValueError("detection ids must be unique within a camera")
    order = np.lexsort((ids, ts))
    if boxes is None:
        box = np.full((n, 4), np.nan, np.float64)
    else:
        box = np.asarray([[np.nan] * 4 if b is None else list(b) for b in boxes],
                         dtype=np.float64).reshape(n, 4)[order]
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    ok = np.isfinite(box).all(1) & (w > 0) & (h > 0)
    centre = np.column_stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2])
    with np.errstate(invalid="ignore"):
        size = np.sqrt(np.where(ok, w * h, np.nan))
    unit = None
    if emb is not None:
        e = np.asarray(emb, dtype=np.float32)
        e = e.reshape(n, e.shape[-1] if e.ndim == 2 else (e.size // n if n else 0))[order]
        unit = _normalise(e.astype(np.float32))
    return _Detected(order, ids[order], ts[order], ok, centre, size, unit)


class _Chains:
    """The tracklets being built: per tracklet its first and last detection (sorted
    positions), length and velocity (px/s, NaN until two members); per detection its
    tracklet."""

    def __init__(self, n: int):
        self.trk = np.full(n, -1, np.int64)
        self.first, self.last, self.count, self.vel = [], [], [], []

    def start(self, j: int) -> int:
        """A new tracklet of detection ``j``; -> its number."""
        k = len(self.first)
        self.first.append(j)
        self.last.append(j)
        self.count.append(1)
        self.vel.append(np.array([np.nan, np.nan]))
        self.trk[j] = k
        return k

    def extend(self, k: int, j: int, v_new: np.ndarray) -> None:
        """Detection ``j`` joins tracklet ``k``, moving at ``v_new`` since its last one."""
        self.vel[k] = v_new if not np.isfinite(self.vel[k]).all() else (self.vel[k] + v_new) / 2.0
        self.trk[j] = k
        self.last[k] = j
        self.count[k] += 1


def _frame_links(d: _Detected, chains: _Chains, open_: list, jv: np.ndarray, t: int,
                 gates: _Gates) -> list:
    """The links of one frame's usable detections ``jv`` (at time ``t``) to the open
    tracklets: ``(tracklet, detection, dt_s)``, each side at most once, chosen greedily
    by cost inside the gates."""
    if not open_ or not len(jv):
        return []
    ks = np.asarray(open_, np.int64)
    tails = np.asarray([chains.last[k] for k in open_], np.int64)
    dt = (t - d.ts[tails]).astype(np.float64) / 1000.0  # > 0: earlier frames
    v = np.asarray([chains.vel[k] for k in open_], np.float64).reshape(-1, 2)
    has_v = np.isfinite(v).all(1)
    pred = d.centre[tails] + np.where(has_v[:, None], v * dt[:, None], 0.0)
    disp = np.linalg.norm(d.centre[jv][None, :, :] - pred[:, None, :], axis=2)
    s = np.sqrt(d.size[tails][:, None] * d.size[jv][None, :])
    rel = disp / s
    motion = np.where(has_v[:, None], rel / gates.velocity,
                      rel / (dt[:, None] * gates.motion))
    size_ok = np.abs(np.log(d.size[jv][None, :] / d.size[tails][:, None])) <= gates.size
    cost = motion.copy()
    gate = (motion <= 1.0) & size_ok
    if d.unit is not None:
        cd = 1.0 - d.unit[tails] @ d.unit[jv].T
        if np.isfinite(gates.emb):
            gate &= cd <= gates.emb
            cost = cost + gates.emb_weight * cd / max(gates.emb, 1e-12)
        else:
            cost = cost + gates.emb_weight * cd
    gate &= d.ok[tails][:, None]
    qi, rj = np.nonzero(gate)
    pairs = []
    if len(qi):
        # deterministic greedy: cost, then tracklet (first id order), then detection
        tk_rank = np.asarray([chains.first[k] for k in open_], np.int64)[qi]
        sel = np.lexsort((jv[rj], tk_rank, cost[qi, rj]))
        used_k, used_j = set(), set()
        for q in sel.tolist():
            k, j = int(ks[qi[q]]), int(jv[rj[q]])
            if k in used_k or j in used_j:
                continue
            used_k.add(k)
            used_j.add(j)
            pairs.append((k, j, float(dt[qi[q]])))
    return pairs


def _tracklets(d: _Detected, chains: _Chains, gate_e: float) -> Tracklets:
    """The finished chains as :class:`Tracklets` (in the input's order)."""
    n, m = len(d.ts), len(chains.first)
    first_a = np.asarray(chains.first, np.int64)
    index = np.empty(n, np.int64)
    index[d.order] = chains.trk
    velocity = np.asarray(chains.vel, np.float64).reshape(m, 2)
    # a typical size per tracklet (median member size) for the speed in box sizes
    sizes = np.full(m, np.nan)
    if m:
        for k, pos in enumerate(_members_sorted(chains.trk, m)):
            sizes[k] = np.nanmedian(d.size[pos]) if d.ok[pos].any() else np.nan
    with np.errstate(invalid="ignore"):
        speed = velocity / sizes[:, None]
    return Tracklets(index=index, ids=d.ids[first_a] if m else np.zeros(0, dtype=str),
                     length=np.asarray(chains.count, np.int64),
                     start_ms=d.ts[first_a] if m else np.zeros(0, np.int64),
                     end_ms=d.ts[np.asarray(chains.last, np.int64)] if m else np.zeros(0, np.int64),
                     velocity=velocity.astype(np.float32), speed=speed.astype(np.float32),
                     emb_gate=gate_e, order=d.order)


def _members_sorted(trk: np.ndarray, m: int) -> list:
    order = np.argsort(trk, kind="stable")
    bounds = np.searchsorted(trk[order], np.arange(m + 1))
    return [order[bounds[k]:bounds[k + 1]] for k in range(m)]


def aggregate_embeddings(emb, index, m: Optional[int] = None, normalize: bool = True
                         ) -> np.ndarray:
    """(m, d) float32 mean embedding per tracklet: the mean of the members' L2-normalised
    embeddings (``normalize=True``; the direction, for cosine comparisons) or of the raw
    embeddings (``normalize=False``; keeps the embedder's L2 scale)."""
    e = np.asarray(emb, np.float32)
    index = np.asarray(index, np.int64)
    m = int(index.max()) + 1 if m is None and len(index) else int(m or 0)
    if normalize:
        e = _normalise(e)
    out = np.zeros((m, e.shape[1]), np.float32)
    np.add.at(out, index, e)
    counts = np.bincount(index, minlength=m).astype(np.float32)
    return out / np.maximum(counts, 1)[:, None]
