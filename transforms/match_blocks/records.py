"""Match records: the dicts every policy emits, and their keys and orders."""
from __future__ import annotations

from transforms.match_blocks.bands import window_start_ms

__all__ = ["make_match", "assignment_key", "assignment_order",
           "match_sort_key"]


def make_match(id_a, id_b, cam_a, cam_b, ts_a, ts_b, distance, policy, rank_a, rank_b,
               window_ms: int) -> dict:
    """A Match dict (see transforms/records.py); the window is the one of ``ts_a``."""
    ts_a, ts_b = int(ts_a), int(ts_b)
    ws = window_start_ms(ts_a, window_ms)
    return {
        "detection_id_a": str(id_a),
        "detection_id_b": str(id_b),
        "camera_id_a": str(cam_a),
        "camera_id_b": str(cam_b),
        "frame_ts_a_ms": ts_a,
        "frame_ts_b_ms": ts_b,
        "dt_seconds": (ts_b - ts_a) / 1000.0,
        "distance": float(distance),
        "policy": policy,
        "rank_a": None if rank_a is None else int(rank_a),
        "rank_b": None if rank_b is None else int(rank_b),
        "window_start_ms": ws,
        "window_end_ms": ws + window_ms,
    }



def assignment_key(m: dict) -> tuple:
    """Deduplication key of an assignment: per camera pair, per B detection."""
    return (m["camera_id_a"], m["camera_id_b"], m["detection_id_b"])


def assignment_order(m: dict) -> tuple:
    """Lower is better: (distance, detection_id_a)."""
    return (m["distance"], m["detection_id_a"])


def match_sort_key(m: dict) -> tuple:
    return (m["camera_id_a"], m["camera_id_b"], m["detection_id_a"], m["detection_id_b"])
