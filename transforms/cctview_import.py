"""ImportCCTView: CCTView's per-frame JSON output -> detection dicts.

CCTView writes, beside each ``--original.jpeg``, a ``--detections.json`` (label,
probability in percent, box) and a ``--features.json`` (the embedding of each
detection, keyed by the same detection name). Every entry of every features file
becomes one detection with its vector unchanged (as float32); an entry without its
detection keeps null label/score/box and is counted. Unreadable files are
dead-lettered.
"""
import json

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.layout import FrameLayout, PathParseError
from transforms.records import dead_letter, detection_id

__all__ = ["DEAD_LETTER", "ImportCCTView", "NAMESPACE"]

DEAD_LETTER = "dead_letter"
NAMESPACE = "cctview"
_FEATURES = "--features.json"
_DETECTIONS = "--detections.json"
_ORIGINAL = "--original.jpeg"
_META_KEYS = ("id", "model", "summary")


def _read_json(uri: str):
    with FileSystems.open(uri) as handle:
        return json.loads(handle.read().decode("utf-8"))


def _entries(document: dict) -> dict:
    return {k: v for k, v in document.items() if k not in _META_KEYS and isinstance(v, dict)}


class _ImportFrameFn(beam.DoFn):
    def __init__(self, layout: FrameLayout):
        self._layout = layout
        self.files = Metrics.counter(NAMESPACE, "cctview_feature_files")
        self.rows = Metrics.counter(NAMESPACE, "cctview_rows")
        self.orphans = Metrics.counter(NAMESPACE, "cctview_features_without_detection")
        self.dead = Metrics.counter(NAMESPACE, "cctview_files_dead_lettered")

    def process(self, features_uri):
        self.files.inc()
        frame_uri = features_uri[: -len(_FEATURES)] + _ORIGINAL
        try:
            parsed = self._layout.parse(frame_uri)
        except PathParseError as exc:
            self.dead.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER, dead_letter(features_uri, "import", "unparseable_path", str(exc)))
            return
        try:
            document = _read_json(features_uri)
            features = _entries(document)
            embedder = str(document.get("model", "cctview"))
            detections_uri = features_uri[: -len(_FEATURES)] + _DETECTIONS
            detections = _entries(_read_json(detections_uri)) if FileSystems.exists(
                detections_uri) else {}
            rows = []
            for name, feature in sorted(features.items()):
                vector = np.asarray(feature["data"], dtype=np.float32)
                found = detections.get(name)
                box = [float(v) for v in found["box_points"]] if found else None
                label = found.get("type") if found else None
                rows.append({
                    "camera_id": parsed.camera_id,
                    "frame_ts_ms": parsed.frame_ts_ms,
                    "frame_uri": frame_uri,
                    "detection_id": detection_id(frame_uri, box or [0, 0, 0, 0], name),
                    "label": label,
                    "score": float(found["percentage_probability"]) / 100.0 if found else None,
                    "box_xyxy": box,
                    "embedding": vector,
                    "detector": "cctview",
                    "embedder": embedder,
                })
        except (ValueError, KeyError, TypeError, OSError) as exc:
            self.dead.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                features_uri, "import", "unreadable_cctview_json",
                "%s: %s" % (type(exc).__name__, exc)))
            return
        for row in rows:
            if row["label"] is None:
                self.orphans.inc()
            self.rows.inc()
            yield row


class ImportCCTView(beam.PTransform):
    """CCTView output folders -> detection dicts (main) and dead letters (tagged)."""

    def __init__(self, roots, timezone: str = "UTC"):
        super().__init__()
        self._patterns = ["%s/**%s" % (r.rstrip("/"), _FEATURES) for r in roots]
        self._layout = FrameLayout(timezone=timezone)

    def expand(self, pbegin):
        return (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "List" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
            | "Paths" >> beam.Map(lambda m: m.path)
            | "Spread" >> beam.Reshuffle()
            | "Convert" >> beam.ParDo(_ImportFrameFn(self._layout)).with_outputs(
                DEAD_LETTER, main="detections")
        )
