"""cctview report: a static HTML page of a run's outputs that a person can open.

It reads ``detections/``, ``matches/`` and ``dead_letter/`` under ``--input`` (and
``links.json`` there or beside, if any) and writes ``index.html`` with PNG charts and a
gallery into ``--output``: counts per camera, counts per camera pair, a dt histogram per
camera pair, and matched crops side by side (the best and the borderline matches by
distance). Crops are cut from the frames named in ``frame_uri``; a frame that cannot be
read shows as a grey tile, never as an error.

The report is the one place where crops are written, because a person asked for it;
keep report folders as private as the detections themselves.
"""
import argparse
import base64
import html
import io
import json
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import pyarrow.dataset as ds
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageDraw

from pipelines.errors import UsageError

GALLERY_SIZE = 12
CROP_SIZE = (96, 72)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="a run's output folder (holding detections/, matches/, ...)")
    parser.add_argument("--output", required=True, help="folder to write index.html into")
    parser.add_argument("--detections", default=None,
                        help="detections folder, when not INPUT/detections (e.g. matches "
                             "re-computed by 'cctview match' into their own folder)")
    parser.add_argument("--gallery", type=int, default=GALLERY_SIZE,
                        help="matches shown in each gallery (default %d)" % GALLERY_SIZE)


def _table(folder: str):
    if not FileSystems.exists(folder):
        return None
    try:
        return ds.dataset(folder, partitioning="hive", format="parquet").to_table()
    except (OSError, ValueError):
        return None


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def histogram_png(values: List[float], lo: float, hi: float, bins: int = 60,
                  marks: Optional[List[float]] = None) -> Image.Image:
    """A bar chart of ``values`` over [lo, hi], drawn with PIL (no plotting library)."""
    width, height, pad = 480, 160, 24
    counts = np.histogram(values, bins=bins, range=(lo, hi))[0]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    top = max(int(counts.max()) if len(counts) else 0, 1)
    bar = (width - 2 * pad) / bins
    for i, c in enumerate(counts):
        x0 = pad + i * bar
        y0 = height - pad - (height - 2 * pad) * c / top
        draw.rectangle([x0, y0, x0 + bar - 1, height - pad], fill=(52, 101, 164))
    zero = pad + (0 - lo) / (hi - lo) * (width - 2 * pad)
    draw.line([zero, pad, zero, height - pad], fill=(150, 150, 150))
    for mark in marks or []:
        x = pad + (mark - lo) / (hi - lo) * (width - 2 * pad)
        draw.line([x, pad, x, height - pad], fill=(204, 0, 0))
    draw.line([pad, height - pad, width - pad, height - pad], fill="black")
    draw.text((pad, height - pad + 4), "%+g s" % lo, fill="black")
    draw.text((width - pad - 40, height - pad + 4), "%+g s" % hi, fill="black")
    draw.text((pad, 4), "max %d per bin" % top, fill="black")
    return image


class _Crops:
    """Cuts detection crops out of their frames, reading each frame once."""

    def __init__(self):
        self._frames: Dict[str, Optional[Image.Image]] = {}

    def crop(self, uri: Optional[str], box) -> Image.Image:
        if uri not in self._frames:
            try:
                with FileSystems.open(uri) as handle:
                    self._frames[uri] = Image.open(io.BytesIO(handle.read())).convert("RGB")
            except Exception:  # a moved or unreadable frame: show a grey tile
                self._frames[uri] = None
        frame = self._frames[uri]
        if frame is None or box is None:
            return Image.new("RGB", CROP_SIZE, (200, 200, 200))
        x1, y1, x2, y2 = [float(v) for v in box]
        return frame.crop((int(x1), int(y1), max(int(x2), int(x1) + 1),
                           max(int(y2), int(y1) + 1))).resize(CROP_SIZE)


def _gallery(title: str, rows: List[dict], dets: Dict[str, dict], crops: _Crops) -> str:
    cells = []
    for m in rows:
        a, b = dets.get(m["detection_id_a"], {}), dets.get(m["detection_id_b"], {})
        pair = Image.new("RGB", (2 * CROP_SIZE[0] + 4, CROP_SIZE[1]), "white")
        pair.paste(crops.crop(a.get("frame_uri"), a.get("box_xyxy")), (0, 0))
        pair.paste(crops.crop(b.get("frame_uri"), b.get("box_xyxy")), (CROP_SIZE[0] + 4, 0))
        cells.append(
            '<figure><img src="%s" alt="match"><figcaption>%s &rarr; %s<br>dt %+.1f s, '
            'distance %.3f</figcaption></figure>' % (
                _png(pair), html.escape(m["camera_id_a"]), html.escape(m["camera_id_b"]),
                m["dt_seconds"], m["distance"]))
    return "<h3>%s</h3><div class=gallery>%s</div>" % (html.escape(title), "".join(cells))


def build_report(input_dir: str, output_dir: str, gallery: int = GALLERY_SIZE,
                 detections_dir: Optional[str] = None) -> str:
    """Writes ``output_dir/index.html``; returns its path."""
    input_dir = input_dir.rstrip("/")
    detections = _table(detections_dir or input_dir + "/detections")
    matches = _table(input_dir + "/matches")
    dead = _table(input_dir + "/dead_letter")
    if detections is None and matches is None:
        raise UsageError("no detections/ or matches/ under %s" % input_dir)
    links = []
    if FileSystems.exists(input_dir + "/links.json"):
        with FileSystems.open(input_dir + "/links.json") as handle:
            links = json.loads(handle.read().decode("utf-8"))
    parts = ["<h1>cctview report</h1><p>%s</p>" % html.escape(input_dir)]
    det_rows = detections.drop_columns(
        [c for c in ("embedding",) if c in detections.column_names]).to_pylist() \
        if detections is not None else []
    dets = {d["detection_id"]: d for d in det_rows}
    if det_rows:
        per_camera = Counter(d["camera_id"] for d in det_rows)
        frames = Counter(camera for camera, _ in {(d["camera_id"], d["frame_uri"])
                                                  for d in det_rows})
        parts.append("<h2>Detections</h2><table><tr><th>camera</th><th>frames with "
                     "detections</th><th>detections</th></tr>%s</table>" % "".join(
                         "<tr><td>%s</td><td>%d</td><td>%d</td></tr>" % (
                             html.escape(c), frames[c], n) for c, n in sorted(per_camera.items())))
    if dead is not None and dead.num_rows:
        reasons = Counter(dead["reason"].to_pylist())
        parts.append("<h2>Dead letters</h2><p>%s</p>" % ", ".join(
            "%s: %d" % (html.escape(r), n) for r, n in reasons.most_common()))
    match_rows = matches.to_pylist() if matches is not None else []
    if match_rows:
        crops = _Crops()
        by_pair: Dict[tuple, List[dict]] = {}
        for m in match_rows:
            by_pair.setdefault((m["camera_id_a"], m["camera_id_b"]), []).append(m)
        parts.append("<h2>Matches per camera pair</h2><table><tr><th>camera a</th><th>camera b"
                     "</th><th>matches</th><th>median dt (s)</th></tr>%s</table>" % "".join(
                         "<tr><td>%s</td><td>%s</td><td>%d</td><td>%+.1f</td></tr>" % (
                             html.escape(a), html.escape(b), len(ms),
                             float(np.median([m["dt_seconds"] for m in ms])))
                         for (a, b), ms in sorted(by_pair.items())))
        for (a, b), ms in sorted(by_pair.items()):
            dts = [m["dt_seconds"] for m in ms]
            reach = max(abs(min(dts)), abs(max(dts)), 1.0)
            marks = [l["offset_s"] for l in links if l["camera_a"] == a and l["camera_b"] == b]
            ordered = sorted(ms, key=lambda m: (m["distance"], m["detection_id_a"]))
            parts.append("<h2>%s &rarr; %s</h2><p>dt = t(%s) - t(%s); red: linked offsets</p>"
                         "<img src=\"%s\" alt=\"dt histogram\">" % (
                             html.escape(a), html.escape(b), html.escape(b), html.escape(a),
                             _png(histogram_png(dts, -reach, reach, marks=marks))))
            parts.append(_gallery("best matches (smallest distance)", ordered[:gallery],
                                  dets, crops))
            parts.append(_gallery("borderline matches (largest distance)",
                                  ordered[-gallery:][::-1], dets, crops))
    page = ("<!doctype html><html><head><meta charset=utf-8><title>cctview report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px}.gallery{display:flex;flex-wrap:wrap}"
            "figure{margin:4px;font-size:11px}</style></head><body>%s</body></html>"
            % "".join(parts))
    target = output_dir.rstrip("/") + "/index.html"
    with FileSystems.create(target) as handle:
        handle.write(page.encode("utf-8"))
    return target


def run_from_args(args: argparse.Namespace) -> int:
    path = build_report(args.input, args.output, args.gallery, args.detections)
    print("report: %s" % path)
    return 0
