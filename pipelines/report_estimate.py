"""The report's estimate of a run's precision per camera pair, without labels.

The target-decoy competition of :mod:`transforms.decoy` (the estimate this project
trusts for every matcher, adaptive ones included), run in memory on the run's own
detections with the run's own matching configuration (``OUTPUT/match_settings.json``,
written by ``cctview match`` and ``cctview run``): camera b's detections of the other
half of the period compete with its real ones as decoys, the matcher runs once, and
its hits on decoys count its false matches. Besides one row per camera pair (target
and decoy hits, estimated false matches, excess, precision), it keeps the decoy hits
themselves: their dt histogram is the control's, drawn under the matches' in the
report.

In memory means every embedding at once: above ``max_detections`` the report does not
estimate and says to run ``cctview evaluate`` (a Beam job) and pass its table with
``--evaluation``. A table given that way is used as it is.
"""
import json
from typing import List, Optional, Tuple

import numpy as np

__all__ = ["DEFAULT_MAX_DETECTIONS", "estimate", "read_settings", "shortfall", "significant"]

DEFAULT_MAX_DETECTIONS = 60000


def read_settings(path: str) -> Optional[dict]:
    """``match_settings.json`` -> dict, or None where it is missing or unreadable."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as handle:
            return json.loads(handle.read().decode("utf-8"))
    except Exception:  # pylint: disable=broad-except  # no settings: no estimate
        return None


def _matcher(settings: dict):
    """-> make_matches(detections, links) for :func:`transforms.decoy.evaluate_in_memory`
    and the ``min_precision`` its rows are read at (None for unscored policies). A
    setting missing from an older match_settings.json takes the matchers' default."""
    from transforms import matching
    from transforms.learned_matching import (DEFAULT_MIN_PRECISION, DEFAULT_SELECTION,
                                             POLICY as LEARNED)

    policy = settings.get("policy") or matching.DEFAULT_POLICY
    if policy == LEARNED:
        from transforms.learned_matching import match_linked_periods

        norm = settings.get("embedding_norm") or "none"
        kwargs = {"tracklets": settings.get("tracklets", "on") != "off",
                  "normalize": "" if norm == "none" else norm,
                  "selection": settings.get("selection") or DEFAULT_SELECTION}

        def learned(detections, links):  # at every threshold: summarize reads them all
            return match_linked_periods(detections, links, min_precision=0.0, **kwargs)[0]

        return learned, float(settings.get("min_precision", DEFAULT_MIN_PRECISION))
    from transforms.match_blocks import match_arrays

    def arrays(detections, links):
        if not detections:
            return []
        return match_arrays(
            [d["camera_id"] for d in detections], [d["frame_ts_ms"] for d in detections],
            np.stack([np.asarray(d["embedding"], dtype=np.float32) for d in detections]),
            [d["detection_id"] for d in detections], policy=policy,
            metric=settings.get("metric", matching.DEFAULT_METRIC),
            max_gap_s=settings.get("max_gap_s", matching.DEFAULT_MAX_GAP_S),
            window_s=settings.get("window_s", matching.DEFAULT_WINDOW_S),
            threshold=settings.get("threshold"),
            top_k=int(settings.get("top_k") or matching.DEFAULT_TOP_K), links=links)

    return arrays, None


def estimate(detections: List[dict], settings: dict) -> Tuple[List[dict], List[dict]]:
    """-> (one target-decoy row per camera pair, the decoy hits with their ``weight``).

    ``detections``: dicts with ``camera_id``, ``frame_ts_ms``, ``detection_id``,
    ``embedding`` (and ``box_xyxy``, ``score`` for the learned policy)."""
    from transforms.decoy import evaluate_in_memory

    make, min_precision = _matcher(settings)
    decoys: list = []
    rows, _ = evaluate_in_memory(detections, make, settings.get("links"),
                                 float(settings.get("max_gap_s", 300.0)),
                                 min_precision=min_precision, decoys=decoys)
    return rows, decoys


def significant(row: dict, z: float = 3.0) -> bool:
    """Whether a row's excess stands ``z`` standard errors above zero (the errors of the
    counts: ``sqrt(target hits + estimated false)``); below, its precision is noise."""
    hits, false = float(row.get("target_hits", 0)), float(row.get("false", 0.0))
    excess = float(row.get("excess", hits - false))
    return excess > 0 and excess >= z * (hits + false) ** 0.5


def shortfall(row: dict, min_precision: float) -> Optional[str]:
    """Why a camera pair's row is not usable at ``min_precision``: "no matches" or its
    estimated precision below it, and, where the row has a score curve, the best
    estimated precision and the ``--min-precision`` that would return it. None where the
    pair has matches at or above ``min_precision``."""
    hits = row.get("target_hits", row.get("real", 0))
    if hits and row["precision"] >= min_precision:
        return None
    text = ("no matches" if not hits else "estimated precision %.2f is below "
            "--min-precision %.2f" % (row["precision"], min_precision))
    if "best_min_precision" in row:
        text += ("; the best estimated precision is %.2f (excess %.0f): --min-precision "
                 "%.2f would return it" % (row["best_precision"], row["best_excess"],
                                           row["best_min_precision"]))
    elif "best_precision" in row:
        text += "; the best estimated precision is %.2f (excess %.0f)" % (
            row["best_precision"], row["best_excess"])
    return text
