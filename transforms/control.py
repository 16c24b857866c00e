"""The time-shift control (docs/spec.md): the same matching on data that has no true pairs.

Every detection gets a copy on a virtual camera (``camera_id + "~"``) whose timestamps
are circularly shifted by half the span of the data. Matching real and shifted
detections together in one pass, restricted by links to the pairs that matter, yields
per camera pair (a, b), a < b:

- ``(a, b)``: the real pairs;
- ``(a, b~)``: the control pairs (camera b shifted by half the span), false by
  construction, with the same traffic density.

Matching is per camera pair for every policy, so the virtual cameras change nothing
in the real pairs. The control pairs get copies of the real pairs' links, so the
control uses the same links as the real run; without links, every pair of cameras is
linked with the band ``[-max_gap, +max_gap]``, which is exactly the unlinked rule.
"""
from typing import List, Optional, Tuple

import apache_beam as beam

__all__ = ["CONTROLS_PER_PAIR", "ClassifyControl", "DataSpan", "SHIFTED",
           "WithShiftedControl", "base_camera", "classify_pair", "control_links",
           "shift_for_control"]

SHIFTED = "~"
REAL, CONTROL = "real", "control"
CONTROLS_PER_PAIR = 1  # (a, b~): counts are divided by this


def base_camera(camera: str) -> str:
    return camera[:-len(SHIFTED)] if camera.endswith(SHIFTED) else camera


def shift_for_control(det: dict, start_ms: int, span_ms: int) -> dict:
    """A copy of ``det`` on its virtual camera, circularly shifted by half the span."""
    shifted = dict(det)
    shifted["camera_id"] = det["camera_id"] + SHIFTED
    shifted["detection_id"] = det["detection_id"] + SHIFTED
    shifted["frame_ts_ms"] = start_ms + (det["frame_ts_ms"] - start_ms + span_ms // 2) % span_ms
    return shifted


def control_links(links: Optional[List[dict]], cameras, max_gap_s: float) -> List[dict]:
    """The real links plus a copy of each for (a, b~).

    Without links (None), every pair of ``cameras`` gets the band ``[-max_gap_s,
    +max_gap_s]``, the unlinked candidate rule, so that only real and control pairs are
    matched, never (a~, b~) or (c, c~).
    """
    if links is None:
        cameras = sorted(set(cameras))
        links = [{"camera_a": a, "camera_b": b, "offset_s": 0.0, "spread_s": float(max_gap_s)}
                 for i, a in enumerate(cameras) for b in cameras[i + 1:]]
    out = []
    for link in links:
        out.append(dict(link))
        out.append(dict(link, camera_b=link["camera_b"] + SHIFTED))
    return out


def classify_pair(match: dict) -> Optional[Tuple[Tuple[str, str], str, dict]]:
    """-> ((camera_a, camera_b), REAL|CONTROL, match in real orientation), or None.

    The returned match has the real camera ids, ``camera_id_a < camera_id_b`` and
    ``dt_seconds = t_b - t_a``.
    """
    cam_a, cam_b = match["camera_id_a"], match["camera_id_b"]
    shifted_a, shifted_b = cam_a.endswith(SHIFTED), cam_b.endswith(SHIFTED)
    base_a, base_b = base_camera(cam_a), base_camera(cam_b)
    if base_a == base_b or (shifted_a and shifted_b):
        return None
    kind = CONTROL if (shifted_a or shifted_b) else REAL
    oriented = dict(match, camera_id_a=base_a, camera_id_b=base_b)
    if base_a > base_b:
        oriented = dict(
            match, camera_id_a=base_b, camera_id_b=base_a,
            detection_id_a=match["detection_id_b"], detection_id_b=match["detection_id_a"],
            frame_ts_a_ms=match["frame_ts_b_ms"], frame_ts_b_ms=match["frame_ts_a_ms"],
            dt_seconds=-match["dt_seconds"], rank_a=match.get("rank_b"),
            rank_b=match.get("rank_a"))
    return (oriented["camera_id_a"], oriented["camera_id_b"]), kind, oriented


def _classified(match):
    result = classify_pair(match)
    if result is not None:
        yield result


class DataSpan(beam.PTransform):
    """Detection dicts -> one ``(first ms, span ms)`` element: the period they cover
    (span = last - first + 1 s), for use as a singleton side input."""

    def expand(self, detections):
        times = detections | "Times" >> beam.Map(lambda d: d["frame_ts_ms"])
        return ((times | "Earliest" >> beam.CombineGlobally(min).without_defaults(),
                 times | "Latest" >> beam.CombineGlobally(max).without_defaults())
                | "Bounds" >> beam.Flatten()
                | "ToList" >> beam.combiners.ToList()
                | "Span" >> beam.Map(lambda ts: (min(ts), max(ts) - min(ts) + 1000)))


class WithShiftedControl(beam.PTransform):
    """Detections -> the detections plus their half-span-shifted virtual copies."""

    def expand(self, detections):
        bounds = beam.pvalue.AsSingleton(detections | "DataSpan" >> DataSpan())
        shifted = detections | "ShiftedCopies" >> beam.Map(
            lambda d, b: shift_for_control(d, b[0], b[1]), bounds)
        return (detections, shifted) | "RealAndShifted" >> beam.Flatten()


class ClassifyControl(beam.PTransform):
    """Matches of real + shifted data -> ((camera_a, camera_b), kind, match) tuples."""

    def expand(self, matches):
        return matches | "Classify" >> beam.FlatMap(_classified).with_output_types(
            Tuple[Tuple[str, str], str, dict])
