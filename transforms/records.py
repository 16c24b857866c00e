"""The element shapes that flow between the pipeline's stages.

Elements are plain dicts (cheap to pickle, easy to turn into Parquet rows). Times
inside the pipeline are integers: UTC epoch milliseconds, so that arithmetic on
them is exact and Beam event timestamps are ``frame_ts_ms / 1000``.

Frame (ReadFrames -> detection):
    uri, camera_id, frame_ts_ms, image (np.ndarray HxWx3 uint8, RGB)
Detection (detection -> matching, detections Parquet):
    camera_id, frame_ts_ms, frame_uri, detection_id, label, score,
    box_xyxy (4 floats, pixels), embedding (np.ndarray float32), detector, embedder
Match (matching -> matches Parquet):
    detection_id_a, detection_id_b, camera_id_a, camera_id_b (camera_id_a < camera_id_b),
    frame_ts_a_ms, frame_ts_b_ms, dt_seconds (= b - a), distance, policy,
    rank_a, rank_b, window_start_ms, window_end_ms; policy ``learned`` adds score and,
    with tracklets, tracklet_id_a, tracklet_id_b (transforms/tracklets.py)
DeadLetter (any stage -> dead_letter Parquet):
    uri, stage, reason, error, ts_ms
"""
import hashlib
import time

__all__ = ["VEHICLE_CLASSES", "dead_letter", "detection_id"]

VEHICLE_CLASSES = ("car", "bus", "truck", "motorcycle")


def detection_id(frame_uri: str, box_xyxy, label: str) -> str:
    """A deterministic id: the same frame and box always give the same id.

    It is a hash of the frame's URI, the label and the box rounded to 0.1 px, so
    a retried bundle or a re-run yields identical ids, and the id reveals nothing
    beyond what the row already holds (camera, time, box).
    """
    key = "%s|%s|%s" % (frame_uri, label, ",".join("%.1f" % float(v) for v in box_xyxy))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def dead_letter(uri: str, stage: str, reason: str, error: str = "") -> dict:
    """A dead-letter record: why an input could not be used, and when."""
    return {
        "uri": uri,
        "stage": stage,
        "reason": reason,
        "error": error[:2000],
        "ts_ms": int(time.time() * 1000),
    }
