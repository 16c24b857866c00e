"""Target-decoy competition (docs/spec.md): match precision without labels, for any matcher.

For a camera pair (a, b) over the data's period P: camera b's detections of each half
of P get a *decoy* copy moved by half of P into the other half (a circular shift by
``P / 2``), on the same camera, with the detection id marked (``DECOY``). Decoys are real
vehicles of camera b (its lanes, boxes, lighting, density), but none of them can be a
true match of a detection of camera a. The matcher runs ONCE on a against b's targets
and decoys together: it cannot tell them apart, so a matcher that adapts to its input
(trains a scorer, picks a threshold) adapts to both, and every match on a decoy is false
by construction. Per half h of P (the half the b-detection sits in)::

    false_h = decoy_hits_h * targets_b_h / decoys_b_h

(decoys of half h are b's targets of the other half), ``false = sum_h false_h`` and
``excess = target_hits - false`` (the true matches among the target hits).

The precision reported is that of a run *without* decoys, the run ``cctview match``
makes (:func:`estimated_precision`)::

    precision = excess / (target_hits + decoy_hits)

A decoy hit is an a-detection that a run without decoys could have matched to a target
of b instead, a false one at worst: it adds a hit and a false match, besides the false
target hits ``false`` estimates. The plain competition ratio ``excess / target_hits``
describes the decoy run's own target hits, which are purer than a real run's, because
decoys take half of the false choices away from the targets. On the synthetic world
(BENCHMARKS.md, "Decoy estimate against the truth") that ratio read up to 0.12 above
the real run's true precision for the learned matcher. This one reads below it, and
furthest below for mutual nearest neighbours: there, most decoy hits are a-detections
that a real run leaves unmatched.

Every camera pair to evaluate is matched in its own namespace: its two cameras become
virtual cameras ``"<a>|<b>#a"`` and ``"<a>|<b>#b"`` (same prefix, so their order is a's
and b's), linked only with each other. So b's decoys compete with b's targets for a's
detections, and never meet a's decoys or another pair's (decoys of both cameras of a
pair, shifted alike, would hold true pairs). A camera in k evaluated pairs is copied k
times (b-side copies twice): evaluation costs more than matching, which is its price.

With scored matches (``score``), :func:`precision_curve` also gives, per pair, the
precision of every score threshold from the same hits, and the best of them.
"""
import math
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["DECOY", "EvaluateWithDecoys", "FRONTIER", "b_side_counts", "best_point",
           "classify_hit", "decoy_links", "decoy_ts", "evaluate_in_memory",
           "estimated_precision", "evaluated_pairs", "half_of", "namespaces", "original_id",
           "pair_camera", "pooled_precision", "precision_curve", "precision_row", "returned_at",
           "roles_of", "summarize", "with_decoys"]

DECOY = "~decoy"
FRONTIER = (0.8, 0.9)  # rows give the most excess at an estimated precision of at least these
TARGET, DECOY_KIND = "target", "decoy"


def pair_camera(camera_a: str, camera_b: str, role: str) -> str:
    """The virtual camera of ``role`` ("a" or "b") in the namespace of pair (a, b)."""
    return "%s|%s#%s" % (camera_a, camera_b, role)


def evaluated_pairs(links: Optional[List[dict]], cameras: Sequence[str]) -> List[Tuple[str, str]]:
    """The camera pairs to evaluate: the linked ones, or every pair of ``cameras``."""
    if links is not None:
        return sorted({(l["camera_a"], l["camera_b"]) for l in _normalized(links)})
    cams = sorted(set(cameras))
    return [(a, b) for i, a in enumerate(cams) for b in cams[i + 1:]]


def _normalized(links):
    from transforms.match_blocks import normalize_links

    return normalize_links(links)


def decoy_links(links: Optional[List[dict]], pairs: Sequence[Tuple[str, str]],
                max_gap_s: float) -> List[dict]:
    """Links between the virtual cameras of each pair: copies of the pair's links, or
    for an unlinked configuration the band ``[-max_gap_s, +max_gap_s]`` (the unlinked
    candidate rule)."""
    out = []
    if links is None:
        for a, b in pairs:
            out.append({"camera_a": pair_camera(a, b, "a"), "camera_b": pair_camera(a, b, "b"),
                        "offset_s": 0.0, "spread_s": float(max_gap_s)})
        return out
    for link in _normalized(links):
        a, b = link["camera_a"], link["camera_b"]
        out.append(dict(link, camera_a=pair_camera(a, b, "a"), camera_b=pair_camera(a, b, "b")))
    return out


def half_of(ts_ms: int, start_ms: int, span_ms: int) -> int:
    """0 for the first half of the period, 1 for the second."""
    return 0 if (int(ts_ms) - start_ms) * 2 < span_ms else 1


def decoy_ts(ts_ms: int, start_ms: int, span_ms: int) -> int:
    """A b-detection's time moved by half the period, circularly (into the other half)."""
    return start_ms + (int(ts_ms) - start_ms + span_ms // 2) % span_ms


def roles_of(pairs: Sequence[Tuple[str, str]]) -> Dict[str, List[Tuple[str, str, str, int]]]:
    """camera -> [(camera_a, camera_b, role, pair number)] of the pairs it belongs to."""
    roles: Dict[str, list] = defaultdict(list)
    for k, (a, b) in enumerate(pairs):
        roles[a].append((a, b, "a", k))
        roles[b].append((a, b, "b", k))
    return dict(roles)


def original_id(copy_id: str) -> str:
    """The detection id of a copy made by :func:`with_decoys`."""
    if copy_id.endswith(DECOY):
        copy_id = copy_id[:-len(DECOY)]
    return copy_id.rsplit("@", 1)[0]


def with_decoys(det: dict, roles: Dict[str, list], start_ms: int, span_ms: int) -> List[dict]:
    """The copies of one detection in every pair namespace it belongs to (ids made unique
    per pair, ``<id>@<pair number>``): as a, the detection; as b, the detection (a
    target) and its decoy (shifted by half the period, id marked with ``DECOY``)."""
    out = []
    for a, b, role, k in roles.get(det["camera_id"], ()):
        virtual, copy_id = pair_camera(a, b, role), "%s@%d" % (det["detection_id"], k)
        out.append(dict(det, camera_id=virtual, detection_id=copy_id))
        if role == "b":
            out.append(dict(det, camera_id=virtual, detection_id=copy_id + DECOY,
                            frame_ts_ms=decoy_ts(det["frame_ts_ms"], start_ms, span_ms)))
    return out


def b_side_counts(det: dict, roles: Dict[str, list], start_ms: int, span_ms: int):
    """((camera_a, camera_b), kind, half) of each b-side copy of the detection: its target
    copy stays in its half, its decoy lands in the other."""
    for a, b, role, _ in roles.get(det["camera_id"], ()):
        if role == "b":
            h = half_of(det["frame_ts_ms"], start_ms, span_ms)
            yield (a, b), TARGET, h
            yield (a, b), DECOY_KIND, 1 - h


def namespaces(pairs: Sequence[Tuple[str, str]]) -> Dict[Tuple[str, str], Tuple[str, str]]:
    """(virtual camera a, virtual camera b) -> the pair's real camera ids."""
    return {(pair_camera(a, b, "a"), pair_camera(a, b, "b")): (a, b) for a, b in pairs}


def classify_hit(match: dict, spaces: dict, start_ms: int, span_ms: int):
    """A match between virtual cameras -> ((camera_a, camera_b), kind, half, score,
    q_value), with the pair's real camera ids; None for a match outside one pair's
    namespace."""
    pair = spaces.get((match["camera_id_a"], match["camera_id_b"]))
    if pair is None:
        return None
    kind = DECOY_KIND if match["detection_id_b"].endswith(DECOY) else TARGET
    return (pair, kind, half_of(match["frame_ts_b_ms"], start_ms, span_ms), match.get("score"),
            match.get("q_value"))


def estimated_precision(target_hits: float, false: float, decoy_hits: float) -> float:
    """The precision of a run without decoys: ``(target_hits - false) / (target_hits +
    decoy_hits)`` (each decoy hit stands for one more hit and one more false match of
    that run; module docstring); 0 without target hits."""
    return (target_hits - false) / (target_hits + decoy_hits) if target_hits else 0.0


def pooled_precision(rows: Iterable[dict]) -> float:
    """:func:`estimated_precision` of several pairs' rows, their counts summed."""
    rows = list(rows)
    return estimated_precision(sum(r["target_hits"] for r in rows), sum(r["false"] for r in rows),
                               sum(r["decoy_hits"] for r in rows))


def precision_row(pair, target_hits: Sequence[int], decoy_hits: Sequence[int],
                  targets_b: Sequence[int], decoys_b: Sequence[int]) -> dict:
    """One pair's estimate from per-half counts (index = half)."""
    false = sum(_false(decoy_hits[h], targets_b[h], decoys_b[h]) for h in (0, 1))
    hits = int(sum(target_hits))
    excess = hits - false
    return {"camera_a": pair[0], "camera_b": pair[1], "control": "decoy",
            "target_hits": hits, "decoy_hits": int(sum(decoy_hits)),
            "false": round(false, 1), "excess": round(excess, 1),
            "precision": round(estimated_precision(hits, false, sum(decoy_hits)), 3)}


def _false(decoy_hits: int, targets_b: int, decoys_b: int) -> float:
    return decoy_hits * targets_b / decoys_b if decoys_b else 0.0


def precision_curve(hits: Iterable[tuple], targets_b: Sequence[int],
                    decoys_b: Sequence[int]) -> List[dict]:
    """Scored hits ``(kind, half, score, ...)`` -> precision of every score threshold.

    For each distinct target score t (descending): target hits, decoy hits and estimated
    false hits with score >= t, excess and precision (:func:`estimated_precision`). Hits
    without a score make no curve."""
    hits = [h for h in hits if h[2] is not None]
    scale = [targets_b[h] / decoys_b[h] if decoys_b[h] else 0.0 for h in (0, 1)]
    events = sorted(((-float(h[2]), h[0], h[1]) for h in hits))
    out, t_hits, d_hits, false = [], 0, 0, 0.0
    for k, (neg, kind, half) in enumerate(events):
        if kind == TARGET:
            t_hits += 1
        else:
            d_hits += 1
            false += scale[half]
        last = k + 1 == len(events) or events[k + 1][0] != neg
        if last and t_hits:
            out.append({"threshold": -neg, "target_hits": t_hits, "decoy_hits": d_hits,
                        "false": false, "excess": t_hits - false,
                        "precision": estimated_precision(t_hits, false, d_hits)})
    return out


def best_point(curve: Sequence[dict], min_significance: float = 3.0) -> Optional[dict]:
    """The curve point of highest precision among those whose excess is at least
    ``min_significance`` standard errors (``sqrt(target hits + false)``) above zero
    (ties: more excess); None if there is none."""
    ok = [p for p in curve if p["excess"] > 0
          and p["excess"] >= min_significance * (p["target_hits"] + p["false"]) ** 0.5]
    return max(ok, key=lambda p: (p["precision"], p["excess"])) if ok else None


def returned_at(q_value: Optional[float], min_precision: float) -> bool:
    """Whether ``--min-precision`` returns a match of this q-value (``q_value <= 1 -
    min_precision``, with a float tolerance)."""
    return q_value is not None and q_value <= 1.0 - min_precision + 1e-6


def summarize(pair, hits: Sequence[tuple], counts: Sequence[tuple],
              min_precision: Optional[float] = None) -> dict:
    """``hits``: (kind, half, score, q_value) of the pair's matches; ``counts``: (kind,
    half) of its b-side copies. -> the pair's row, with ``best_*`` from the score curve
    and ``excess_at_precision`` (the most estimated excess of any score threshold whose
    estimated precision is at least each of ``FRONTIER``; 0 where none is).

    ``min_precision``: the hits come from a scored matcher run at every threshold
    (``min_precision`` 0); the row's counts are those it returns at this
    ``--min-precision`` (its matches with ``q_value <= 1 - min_precision``), and
    ``best_min_precision`` is the flag value that returns the best point."""
    scored = hits
    if min_precision is not None:
        hits = [h for h in hits if returned_at(h[3], min_precision)]
    target_hits, decoy_hits = [0, 0], [0, 0]
    for h in hits:
        (target_hits if h[0] == TARGET else decoy_hits)[h[1]] += 1
    targets_b, decoys_b = [0, 0], [0, 0]
    for kind, half in counts:
        (targets_b if kind == TARGET else decoys_b)[half] += 1
    row = precision_row(pair, target_hits, decoy_hits, targets_b, decoys_b)
    curve = precision_curve(scored, targets_b, decoys_b)
    points = curve or ([row] if row["target_hits"] else [])  # unscored: their one point
    row["excess_at_precision"] = {
        "%.1f" % level: round(max([p["excess"] for p in points if p["precision"] >= level],
                                  default=0.0), 1) for level in FRONTIER}
    best = best_point(curve)
    if best is not None:
        row.update(best_precision=round(best["precision"], 3),
                   best_excess=round(best["excess"], 1),
                   best_threshold=round(best["threshold"], 4))
        if min_precision is not None:
            q = max(h[3] for h in scored if h[2] is not None and h[2] >= best["threshold"])
            row["best_min_precision"] = max(0.0, math.floor((1.0 - q) * 100) / 100)
    return row


def evaluate_in_memory(detections: Sequence[dict], make_matches, links: Optional[List[dict]],
                       max_gap_s: float = 300.0, cameras: Optional[Sequence[str]] = None,
                       min_precision: Optional[float] = None,
                       decoys: Optional[list] = None) -> Tuple[List[dict], List[dict]]:
    """The Beam transform's twin for lists: ``make_matches(detections, links)`` runs the
    matcher (e.g. ``match_blocks.match_arrays`` or ``match_linked_periods``) and returns
    match dicts; ``min_precision``: see :func:`summarize` (then ``make_matches`` must run
    a scored matcher at ``min_precision`` 0). -> (one row per evaluated pair, the target
    hits with the real camera and detection ids, to score against a ground truth). With
    ``min_precision``, the target and decoy hits given back are those the rows count
    (``q_value <= 1 - min_precision``).

    ``decoys``: a list that receives the decoy hits (the matches on decoys, false by
    construction), with the real camera ids and ``weight`` = the false matches each
    stands for (``targets_b / decoys_b`` of its half): their ``dt_seconds`` histogram,
    weighted, is the control's (what the matcher finds where no true pair exists)."""
    detections = list(detections)
    cams = cameras if cameras is not None else sorted({d["camera_id"] for d in detections})
    pairs = evaluated_pairs(links, cams)
    roles = roles_of(pairs)
    times = [d["frame_ts_ms"] for d in detections]
    start, span = min(times), max(times) - min(times) + 1000
    expanded = [c for d in detections for c in with_decoys(d, roles, start, span)]
    counts: dict = defaultdict(list)
    for d in detections:
        for pair, kind, half in b_side_counts(d, roles, start, span):
            counts[pair].append((kind, half))
    hits: dict = defaultdict(list)
    spaces, targets, scale = namespaces(pairs), [], {}
    for m in make_matches(expanded, decoy_links(links, pairs, max_gap_s)):
        c = classify_hit(m, spaces, start, span)
        if c is None:
            continue
        hits[c[0]].append(c[1:])
        if min_precision is not None and not returned_at(m.get("q_value"), min_precision):
            continue
        if c[1] != TARGET and decoys is not None:
            if (c[0], c[2]) not in scale:
                kinds = counts[c[0]]
                scale[c[0], c[2]] = _false(
                    1, sum(1 for k, h in kinds if k == TARGET and h == c[2]),
                    sum(1 for k, h in kinds if k != TARGET and h == c[2]))
            decoys.append(dict(m, camera_id_a=c[0][0], camera_id_b=c[0][1],
                               weight=scale[c[0], c[2]]))
        if c[1] == TARGET:
            targets.append(dict(m, camera_id_a=c[0][0], camera_id_b=c[0][1],
                                detection_id_a=original_id(m["detection_id_a"]),
                                detection_id_b=original_id(m["detection_id_b"])))
    return [summarize(p, hits[p], counts[p], min_precision) for p in pairs if counts[p]], targets


try:
    import apache_beam as beam
except ImportError:  # pragma: no cover
    beam = None

if beam is not None:
    from transforms.control import DataSpan

    class EvaluateWithDecoys(beam.PTransform):
        """Detections -> one row per evaluated camera pair (see :func:`summarize`).

        ``make_matcher(links)`` returns the matching PTransform to evaluate, given links
        between the pairs' virtual cameras (:func:`decoy_links`); ``links``
        None evaluates every pair of ``cameras`` within ``max_gap_s``. A factory marked
        ``scored`` (the learned policy) is run once at ``min_precision=0``, and each row
        gives what ``min_precision`` returns and the best threshold (:func:`summarize`).
        """

        def __init__(self, make_matcher, cameras, links: Optional[List[dict]] = None,
                     max_gap_s: float = 300.0, min_precision: Optional[float] = None):
            super().__init__()
            self._pairs = evaluated_pairs(links, cameras)
            self._roles = roles_of(self._pairs)
            virtual = decoy_links(links, self._pairs, max_gap_s)
            self._min_precision = None
            if getattr(make_matcher, "scored", False):
                self._min_precision = 0.0 if min_precision is None else float(min_precision)
                self._matcher = make_matcher(virtual, min_precision=0.0)
            else:
                self._matcher = make_matcher(virtual)

        def expand(self, detections):
            roles, spaces = self._roles, namespaces(self._pairs)
            bounds = beam.pvalue.AsSingleton(detections | "DataSpan" >> DataSpan())
            counts = (detections
                      | "BSideCounts" >> beam.FlatMap(
                          lambda d, b: [(p, ("n", k, h)) for p, k, h in
                                        b_side_counts(d, roles, b[0], b[1])], bounds))
            hits = (detections
                    | "WithDecoys" >> beam.FlatMap(
                        lambda d, b: with_decoys(d, roles, b[0], b[1]), bounds)
                    | "Match" >> self._matcher
                    | "Classify" >> beam.FlatMap(_hit, spaces, bounds))
            return ((counts, hits) | "Both" >> beam.Flatten()
                    | "ByPair" >> beam.GroupByKey()
                    | "Summarize" >> beam.Map(_summarize_group, self._min_precision))

    def _hit(match, spaces, bounds):
        c = classify_hit(match, spaces, bounds[0], bounds[1])
        if c is not None:
            yield c[0], ("hit",) + c[1:]

    def _summarize_group(element, min_precision):
        pair, items = element
        hits, counts = [], []
        for item in items:
            (hits if item[0] == "hit" else counts).append(item[1:])
        return summarize(pair, hits, counts, min_precision)
