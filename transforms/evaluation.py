"""Match precision without labels: a matcher run on real and time-shifted data at once.

:class:`EvaluateWithControl` wraps any matching PTransform (built by a factory that
takes the links to use, so the control gets the same links as the real run) and
returns one row per camera pair: ``real`` pairs, ``control`` pairs (the mean of the
two controls of :mod:`transforms.control`), ``excess = real - control`` (estimated
true matches) and ``precision = excess / real``.
"""
from typing import Callable, List, Optional

import apache_beam as beam

from transforms.control import (CONTROL, CONTROLS_PER_PAIR, REAL, ClassifyControl,
                                WithShiftedControl, control_links)

__all__ = ["EvaluateWithControl", "precision_row"]


def precision_row(pair, real: int, control_total: int) -> dict:
    control = control_total / CONTROLS_PER_PAIR
    excess = real - control
    return {
        "camera_a": pair[0],
        "camera_b": pair[1],
        "real": int(real),
        "control": round(control, 1),
        "excess": round(excess, 1),
        "precision": round(excess / real, 3) if real else 0.0,
    }


def _count(element):
    pair, kinds = element
    kinds = list(kinds)
    return precision_row(pair, kinds.count(REAL), kinds.count(CONTROL))


class EvaluateWithControl(beam.PTransform):
    """Detections -> per camera pair {camera_a, camera_b, real, control, excess, precision}.

    ``make_matcher(links)`` returns the matching PTransform to evaluate, given the
    links extended to the virtual (shifted) cameras (:func:`control_links`; for an
    unlinked configuration, every pair of ``cameras`` within ``max_gap_s``).
    """

    def __init__(self, make_matcher: Callable[[Optional[List[dict]]], beam.PTransform],
                 cameras, links: Optional[List[dict]] = None, max_gap_s: float = 300.0):
        super().__init__()
        self._make_matcher = make_matcher
        self._links = control_links(links, cameras, max_gap_s)

    def expand(self, detections):
        return (
            detections
            | "WithControl" >> WithShiftedControl()
            | "Match" >> self._make_matcher(self._links)
            | "Classify" >> ClassifyControl()
            | "PairAndKind" >> beam.Map(lambda c: (c[0], c[1]))
            | "ByPair" >> beam.GroupByKey()
            | "Count" >> beam.Map(_count)
        )
