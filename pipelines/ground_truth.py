"""Scoring a run against the synthetic world's ground truth.

Detections are tied to ground-truth vehicles by box overlap in the same frame (IoU at
least 0.5, best overlap wins); a match pair is true when both of its detections belong
to the same vehicle. Recall is counted per *transit*: a vehicle seen by two cameras
(within ``max_gap_s``) is one transit of that camera pair, found when at least one true
pair of it was emitted.
"""
import os
from collections import defaultdict
from typing import Dict, Iterable, Optional

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

__all__ = ["frame_key", "load_truth", "read_table", "score_matches", "true_transits",
           "vehicle_of_detections"]


def _iou(box, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def frame_key(uri: str) -> str:
    """A frame URI in one spelling: local paths absolute and normalised, so that the
    detections of a run given a relative ``--output`` (relative frame URIs) meet the
    ground truth (written with absolute ones); other filesystems' URIs unchanged."""
    return uri if "://" in uri else os.path.normpath(os.path.abspath(uri))


def load_truth(world: str):
    return pq.read_table(world.rstrip("/") + "/ground_truth/boxes.parquet").to_pylist()


def vehicle_of_detections(detections: Iterable[dict], truth: Iterable[dict],
                          min_iou: float = 0.5) -> Dict[str, int]:
    """detection_id -> vehicle_id, for detections that overlap a true box enough."""
    by_frame = defaultdict(list)
    for row in truth:
        by_frame[frame_key(row["frame_uri"])].append(row)
    out = {}
    for det in detections:
        rows = by_frame.get(frame_key(det["frame_uri"]))
        if not rows:
            continue
        ious = _iou(np.asarray(det["box_xyxy"], float),
                    np.asarray([r["box_xyxy"] for r in rows], float))
        best = int(np.argmax(ious))
        if ious[best] >= min_iou:
            out[det["detection_id"]] = rows[best]["vehicle_id"]
    return out


def true_transits(truth: Iterable[dict], max_gap_s: float) -> set:
    """(vehicle_id, camera_a, camera_b) for vehicles seen by two cameras within max_gap."""
    seen = defaultdict(lambda: defaultdict(list))
    for row in truth:
        seen[row["vehicle_id"]][row["camera_id"]].append(row["frame_ts"].timestamp())
    transits = set()
    for vehicle, cams in seen.items():
        names = sorted(cams)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                gap = min(abs(x - y) for x in cams[a] for y in cams[b])
                if gap <= max_gap_s:
                    transits.add((vehicle, a, b))
    return transits


def score_matches(matches: Iterable[dict], vehicles: Dict[str, int], transits: set,
                  pairs: Optional[set] = None) -> dict:
    """Pair precision and transit recall of ``matches`` (dicts with detection/camera ids)."""
    matches = list(matches)
    if pairs is not None:
        matches = [m for m in matches if (m["camera_id_a"], m["camera_id_b"]) in pairs]
        transits = {t for t in transits if (t[1], t[2]) in pairs}
    correct, found = 0, set()
    for m in matches:
        va, vb = vehicles.get(m["detection_id_a"]), vehicles.get(m["detection_id_b"])
        if va is not None and va == vb:
            correct += 1
            found.add((va, m["camera_id_a"], m["camera_id_b"]))
    return {
        "matches": len(matches),
        "correct": correct,
        "precision": correct / len(matches) if matches else 0.0,
        "transits": len(transits),
        "transits_found": len(found & transits),
        "recall": len(found & transits) / len(transits) if transits else 0.0,
    }


def read_table(folder: str) -> list:
    return ds.dataset(folder, partitioning="hive", format="parquet").to_table().to_pylist()
