"""cctview report: one HTML page, plus its images, that answers what a user must judge.

It reads ``detections/``, ``matches/`` and ``dead_letter/`` under ``--input`` (the
detections may live elsewhere: ``--detections``), the run's ``match_settings.json``
(written by ``match`` and ``run``: its policy, bands, links) and ``links.json`` (from
the settings, ``--links``, or beside the tables), and writes ``index.html`` and
``images/*.png`` into ``--output``. The page uses no script, font or style sheet from
anywhere else, so it reads offline. In order:

1. the counts: detections per camera, matches per camera pair;
2. per camera pair, the **estimated precision and excess** of the run's configuration
   by target-decoy competition (:mod:`pipelines.report_estimate`; or the rows of a
   ``cctview evaluate`` table given with ``--evaluation``), and whether the excess is
   significant, i.e. whether the estimate can be trusted;
3. per camera pair, the **dt histogram of the matches against the control's** (the
   decoy hits, weighted as in the estimate: what the matcher finds where no true pair
   exists), with the links' bands shaded;
4. the **links table** (offset, spread, band, support, significance);
5. the **score and q-value distributions** of a scored policy (``learned``);
6. the **match gallery**: per pair, the best and the borderline matches with the two
   crops side by side;
7. the **dead letters by stage and reason**, with an example file of each.

Crops are cut from the frames named in ``frame_uri`` when the report is built; a frame
that cannot be read shows as a grey tile. The pipeline itself never writes crops unless
``--write-crops`` asks: the gallery images are the only crops the report writes, and
``--gallery 0`` writes none. Keep report folders as private as the detections.
"""
import argparse
import html
import io
import json
from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipelines import report_charts as charts
from pipelines.command import Command
from pipelines import report_estimate
from runners.errors import UsageError

__all__ = ["GALLERY_SIZE", "add_arguments", "build_report", "run_from_args"]

GALLERY_SIZE = 8
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
         "padding:2px 8px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}"
         ".gallery{display:flex;flex-wrap:wrap}figure{margin:4px;font-size:11px}"
         ".pair{border-top:1px solid #ddd;margin-top:1.5em}.warn{color:#a40}"
         ".ok{color:#060}.key span{display:inline-block;width:1em;height:.8em;"
         "margin:0 .3em 0 1em}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="a run's output folder (holding detections/, matches/, ...)")
    parser.add_argument("--output", required=True,
                        help="folder to write index.html and images/ into")
    parser.add_argument("--detections", default=None,
                        help="detections folder, when not INPUT/detections (e.g. matches "
                             "re-computed by 'cctview match' into their own folder)")
    parser.add_argument("--links", default=None,
                        help="links.json to draw and list (default: the run's own, from "
                             "INPUT/match_settings.json, else INPUT/links.json)")
    parser.add_argument("--evaluation", default=None,
                        help="a 'cctview evaluate' table (JSON) to show instead of the "
                             "report's own target-decoy estimate")
    parser.add_argument("--max-estimate-detections", type=int,
                        default=report_estimate.DEFAULT_MAX_DETECTIONS,
                        help="estimate precision in memory only up to this many "
                             "detections (default %d); above, pass --evaluation"
                             % report_estimate.DEFAULT_MAX_DETECTIONS)
    parser.add_argument("--gallery", type=int, default=GALLERY_SIZE,
                        help="matches in each gallery (default %d; 0: no crops are "
                             "written at all)" % GALLERY_SIZE)


# ------------------------------------------------------------------ reading
def _table(folder: str) -> Optional[pa.Table]:
    if not FileSystems.exists(folder):
        return None
    try:
        return ds.dataset(folder, partitioning="hive", format="parquet").to_table()
    except (OSError, ValueError):
        return None


def _read_json(path: Optional[str]):
    if not path or not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def _ms(table: pa.Table, column: str) -> List[int]:
    values = table[column]
    if pa.types.is_timestamp(values.type):
        values = values.cast(pa.timestamp("ms", values.type.tz)).cast(pa.int64())
    return [int(v) for v in values.to_pylist()]


def _detection_dicts(table: Optional[pa.Table]) -> List[dict]:
    """Detections as dicts with ``frame_ts_ms`` (embeddings included when present)."""
    if table is None or not table.num_rows:
        return []
    ts = _ms(table, "frame_ts")
    rows = table.drop_columns([c for c in ("date", "hour") if c in table.column_names])
    out = rows.to_pylist()
    for row, t in zip(out, ts):
        row["frame_ts_ms"] = t
    return out


# ------------------------------------------------------------------ writing
class _Images:
    """PNG files under OUTPUT/images/, referenced by relative paths."""

    def __init__(self, output_dir: str):
        self.folder = output_dir.rstrip("/") + "/images"
        self.count = 0

    def save(self, image: Image.Image, name: str) -> str:
        self.count += 1
        relative = "images/%02d-%s.png" % (self.count, name)
        buffer = io.BytesIO()
        image.save(buffer, "PNG", optimize=True)
        with FileSystems.create(self.folder.rsplit("/", 1)[0] + "/" + relative) as handle:
            handle.write(buffer.getvalue())
        return relative


class _Crops:
    """Cuts detection crops out of their frames, reading each frame once."""

    def __init__(self):
        self._frames: Dict[str, Optional[Image.Image]] = {}

    def crop(self, uri: Optional[str], box) -> Image.Image:
        if uri not in self._frames:
            try:
                with FileSystems.open(uri) as handle:
                    self._frames[uri] = Image.open(io.BytesIO(handle.read())).convert("RGB")
            except Exception:  # pylint: disable=broad-except  # moved or unreadable frame
                self._frames[uri] = None
        frame = self._frames[uri]
        if frame is None or box is None:
            return charts.grey_tile()
        x1, y1, x2, y2 = [float(v) for v in box]
        return frame.crop((int(x1), int(y1), max(int(x2), int(x1) + 1),
                           max(int(y2), int(y1) + 1)))


def _e(value) -> str:
    return html.escape(str(value))


def _table_html(header: List[str], rows: List[List[str]], left: int = 2) -> str:
    head = "".join('<th%s>%s</th>' % (' class=l' if i < left else "", _e(h))
                   for i, h in enumerate(header))
    body = "".join("<tr>%s</tr>" % "".join(
        '<td%s>%s</td>' % (' class=l' if i < left else "", cell) for i, cell in enumerate(r))
        for r in rows)
    return "<table><tr>%s</tr>%s</table>" % (head, body)


# ------------------------------------------------------------------ sections
def _counts(dets: List[dict], by_pair: Dict[tuple, List[dict]]) -> str:
    per_camera = Counter(d["camera_id"] for d in dets)
    frames = Counter(c for c, _ in {(d["camera_id"], d.get("frame_uri")) for d in dets})
    parts = []
    if dets:
        parts.append("<h2>Detections</h2>" + _table_html(
            ["camera", "frames with detections", "detections"],
            [[_e(c), "%d" % frames[c], "%d" % n] for c, n in sorted(per_camera.items())], 1))
    if by_pair:
        parts.append("<h2>Matches</h2>" + _table_html(
            ["camera a", "camera b", "matches", "median dt (s)"],
            [[_e(a), _e(b), "%d" % len(ms), "%+.1f" % float(np.median(
                [m["dt_seconds"] for m in ms]))] for (a, b), ms in sorted(by_pair.items())]))
    return "".join(parts)


def _verdict(row: dict, min_precision: Optional[float]) -> str:
    """Whether to trust a row; for a pair the matcher left without matches at the run's
    ``--min-precision``, what it reached and the flag value that returns matches."""
    if report_estimate.significant(row):
        return '<span class=ok>significant</span>'
    why = None
    if min_precision is not None and not row.get("target_hits"):
        why = report_estimate.shortfall(row, min_precision)
    return '<span class=warn>not significant: %s</span>' % _e(
        why or "too few matches to judge")


def _precision(rows: List[dict], source: str, min_precision: Optional[float]) -> str:
    if not rows:
        return "<h2>Estimated precision</h2><p class=warn>%s</p>" % _e(source)
    out = []
    for r in rows:
        verdict = _verdict(r, min_precision)
        hits, false = r.get("target_hits", 0), r.get("false", 0.0)
        error = "%.2f" % ((hits + false) ** 0.5 / hits) if hits else "-"
        out.append([_e(r["camera_a"]), _e(r["camera_b"]), "%d" % hits,
                    "%d" % r.get("decoy_hits", 0), "%.1f" % false,
                    "%.1f" % r.get("excess", 0.0), "%.2f" % r.get("precision", 0.0), error,
                    verdict])
    return ("<h2>Estimated precision (target-decoy)</h2><p>%s Camera b's detections of the "
            "other half of the period compete as decoys; matches on them are false by "
            "construction and estimate the false matches among the real ones. "
            "<b>excess</b> = target hits - estimated false: the estimated true matches; "
            "<b>precision</b> = excess / (target hits + decoy hits): that of a run "
            "without decoys, where each detection that hit a decoy could have matched a "
            "false target instead. Trust a row when its excess is "
            "significant (at least 3 standard errors, sqrt(hits + false), above zero); "
            "+- is the precision's standard error from those counts alone.</p>"
            % _e(source)) + _table_html(
        ["camera a", "camera b", "target hits", "decoy hits", "est. false", "excess",
         "precision", "+- (1 s.e.)", "judgement"], out)


def _pair_section(a: str, b: str, ms: List[dict], decoys: List[dict], links: List[dict],
                  images: _Images, settings: Optional[dict]) -> str:
    bands = charts.band_list(links, a, b)
    ctrl = [d for d in decoys if d["camera_id_a"] == a and d["camera_id_b"] == b]
    dts = [m["dt_seconds"] for m in ms]
    reach = max([abs(v) for v in dts + [d["dt_seconds"] for d in ctrl]]
                + [abs(x) for band in bands for x in band] + [1.0])
    if settings and not bands:
        reach = max(reach, float(settings.get("max_gap_s") or reach))
    image = charts.histogram(dts, -reach, reach, control=(
        [d["dt_seconds"] for d in ctrl], [d["weight"] for d in ctrl]), bands=bands)
    src = images.save(image, "dt-%s-%s" % (a, b))
    return ('<div class=pair><h2>%s &rarr; %s</h2><p class=key>dt = t(%s) - t(%s), %d '
            'matches<span style="background:#3465a4"></span>matches'
            '<span style="background:#cc0000"></span>control (decoy hits, weighted)'
            '<span style="background:#d6eece"></span>link bands</p>'
            '<img src="%s" alt="dt histogram %s / %s" width=%d height=%d></div>' % (
                _e(a), _e(b), _e(b), _e(a), len(ms), src, _e(a), _e(b),
                image.width, image.height))


def _links(links: List[dict]) -> str:
    if not links:
        return "<h2>Links</h2><p>No links: every camera pair was matched within --max-gap.</p>"
    return "<h2>Links</h2>" + _table_html(
        ["camera a", "camera b", "offset (s)", "spread (s)", "band (s)", "support",
         "significance"],
        [[_e(l["camera_a"]), _e(l["camera_b"]), "%+.1f" % l["offset_s"],
          "%.1f" % l["spread_s"], "[%+.1f, %+.1f]" % (l["offset_s"] - l["spread_s"],
                                                      l["offset_s"] + l["spread_s"]),
          "%s" % l.get("support", "-"), "%.1f" % l["significance"]
          if "significance" in l else "-"] for l in links])


def _scores(matches: List[dict], images: _Images) -> str:
    parts = []
    for column, title in (("score", "score"), ("q_value", "q-value (estimated share of false "
                                                "matches at this score or higher)")):
        values = [m[column] for m in matches if m.get(column) is not None]
        if not values:
            continue
        lo, hi = (0.0, 1.0) if column == "q_value" else (min(values), max(values))
        image = charts.histogram(values, lo, hi if hi > lo else lo + 1.0, bins=40, unit="",
                                 zero_line=False)
        parts.append('<h3>%s</h3><img src="%s" alt="%s distribution" width=%d height=%d>'
                     % (_e(title), images.save(image, column), column, image.width,
                        image.height))
    if not parts:
        return ""
    return "<h2>Score and q-value</h2>" + "".join(parts)


def _gallery(a: str, b: str, ms: List[dict], dets: Dict[str, dict], crops: _Crops,
             images: _Images, size: int) -> str:
    scored = any(m.get("score") is not None for m in ms)
    key = (lambda m: (-m["score"], m["detection_id_a"])) if scored else \
        (lambda m: (m["distance"], m["detection_id_a"]))
    ordered = sorted(ms, key=key)
    what = "score" if scored else "distance"
    parts = []
    for title, rows in (("best matches (%s)" % what, ordered[:size]),
                        ("borderline matches (%s)" % what, ordered[size:][-size:][::-1])):
        cells = []
        for m in rows:
            da, db = dets.get(m["detection_id_a"], {}), dets.get(m["detection_id_b"], {})
            pair = charts.crop_pair(crops.crop(da.get("frame_uri"), da.get("box_xyxy")),
                                    crops.crop(db.get("frame_uri"), db.get("box_xyxy")))
            extra = ", score %.2f" % m["score"] if scored else ""
            cells.append('<figure><img src="%s" alt="match" width=%d height=%d><figcaption>'
                         'dt %+.1f s, distance %.3f%s</figcaption></figure>' % (
                             images.save(pair, "crops"), pair.width, pair.height,
                             m["dt_seconds"], m["distance"], extra))
        if cells:
            parts.append("<h3>%s &rarr; %s: %s</h3><div class=gallery>%s</div>" % (
                _e(a), _e(b), _e(title), "".join(cells)))
    return "".join(parts)


def _dead_letters(dead: Optional[pa.Table]) -> str:
    if dead is None or not dead.num_rows:
        return "<h2>Dead letters</h2><p>None: every listed frame was used.</p>"
    rows = dead.select([c for c in ("stage", "reason", "uri") if c in dead.column_names])
    groups: Dict[tuple, List[str]] = {}
    for r in rows.to_pylist():
        groups.setdefault((r.get("stage"), r.get("reason")), []).append(r.get("uri"))
    return "<h2>Dead letters by reason</h2>" + _table_html(
        ["stage", "reason", "files", "example"],
        [[_e(s), _e(reason), "%d" % len(uris), '<span class=l>%s</span>' % _e(sorted(uris)[0])]
         for (s, reason), uris in sorted(groups.items(), key=lambda kv: -len(kv[1]))])


# ------------------------------------------------------------------ the page
def _estimate(dets, settings, evaluation_path, max_detections):
    """-> (rows, decoy hits, a sentence saying where the rows come from)."""
    if evaluation_path:
        rows = _read_json(evaluation_path) or []
        rows = [r for r in rows if "target_hits" in r] or rows
        return rows, [], "From %s (cctview evaluate)." % evaluation_path
    if settings is None:
        return [], [], ("No estimate: the run has no match_settings.json (written by "
                        "'cctview match' and 'cctview run'); run 'cctview evaluate' and pass "
                        "its table with --evaluation.")
    if not dets or dets[0].get("embedding") is None:
        return [], [], "No estimate: the detections carry no embeddings."
    if len(dets) > max_detections:
        return [], [], ("No estimate: %d detections are more than the report estimates in "
                        "memory (--max-estimate-detections %d); run 'cctview evaluate' with "
                        "the run's flags and pass its table with --evaluation."
                        % (len(dets), max_detections))
    rows, decoys = report_estimate.estimate(dets, settings)
    return rows, decoys, ("Estimated here for the run's configuration (policy %s), on its "
                          "%d detections." % (settings.get("policy"), len(dets)))


def build_report(input_dir: str, output_dir: str, gallery: int = GALLERY_SIZE,
                 detections_dir: Optional[str] = None, links_path: Optional[str] = None,
                 evaluation_path: Optional[str] = None,
                 max_estimate_detections: int = report_estimate.DEFAULT_MAX_DETECTIONS) -> str:
    """Writes ``output_dir/index.html`` and ``output_dir/images/``; returns the page's path."""
    from pipelines.stages import MATCH_SETTINGS_FILE

    input_dir = input_dir.rstrip("/")
    detections = _table(detections_dir or input_dir + "/detections")
    matches = _table(input_dir + "/matches")
    dead = _table(input_dir + "/dead_letter")
    if detections is None and matches is None:
        raise UsageError("no detections/ or matches/ under %s" % input_dir)
    settings = report_estimate.read_settings(input_dir + "/" + MATCH_SETTINGS_FILE)
    links = (_read_json(links_path) if links_path else None)
    if links is None:
        links = (settings or {}).get("links") or _read_json(input_dir + "/links.json") or []
    dets = _detection_dicts(detections)
    rows, decoys, source = _estimate(dets, settings, evaluation_path, max_estimate_detections)
    by_id = {d["detection_id"]: d for d in dets}
    match_rows = []
    if matches is not None and matches.num_rows:
        match_rows = matches.drop_columns(
            [c for c in ("date", "hour") if c in matches.column_names]).to_pylist()
    by_pair: Dict[tuple, List[dict]] = {}
    for m in match_rows:
        by_pair.setdefault((m["camera_id_a"], m["camera_id_b"]), []).append(m)
    images, crops = _Images(output_dir), _Crops()
    parts = ["<h1>cctview report</h1><p>%s%s</p>" % (
        _e(input_dir), "" if not settings else " &middot; policy %s" % _e(settings["policy"]))]
    parts.append(_counts(dets, by_pair))
    min_precision = (settings or {}).get("min_precision")
    parts.append(_precision(rows, source, None if min_precision is None else float(min_precision)))
    pairs = sorted(set(by_pair) | {(r["camera_a"], r["camera_b"]) for r in rows})
    for a, b in pairs:
        parts.append(_pair_section(a, b, by_pair.get((a, b), []), decoys, links, images,
                                   settings))
    parts.append(_links(links))
    parts.append(_scores(match_rows, images))
    if gallery > 0 and by_pair:
        parts.append("<h2>Match gallery</h2><p>Crops cut from the frames now; camera a "
                     "left, camera b right.</p>")
        for (a, b), ms in sorted(by_pair.items()):
            parts.append(_gallery(a, b, ms, by_id, crops, images, gallery))
    parts.append(_dead_letters(dead))
    page = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>cctview report"
            "</title><style>%s</style></head><body>%s</body></html>" % (STYLE, "".join(parts)))
    target = output_dir.rstrip("/") + "/index.html"
    with FileSystems.create(target) as handle:
        handle.write(page.encode("utf-8"))
    return target


def run_from_args(args: argparse.Namespace) -> int:
    path = build_report(args.input, args.output, args.gallery, args.detections, args.links,
                        args.evaluation, args.max_estimate_detections)
    print("report: %s" % path)
    return 0


COMMAND = Command(
    "one HTML page plus images of a run: estimated precision per camera pair "
    "(target-decoy), dt histograms against the control with link bands, links, "
    "scores, match gallery, dead letters",
    (), run_from_args, add_arguments=add_arguments)
