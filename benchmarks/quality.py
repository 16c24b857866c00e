"""Match precision on real footage without labels: the time-shift control, per config.

Runs `cctview calibrate` once on CCTView's reference detections (../shared), then
`cctview evaluate` for each matching configuration (real run and control run in one
pass, the control with the same links), and prints, per camera pair, real, control,
excess and estimated precision. CCTView's rule comes first.

  .venv/bin/python benchmarks/quality.py --record
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import machine, record_section  # noqa: E402
from pipelines.cli import main as cctview  # noqa: E402

REFERENCE = REPO.parent / "shared" / "data" / "nyc-fdr" / "reference"
COMMON = ["--timezone", "America/New_York"]


def configurations(links):
    return [
        ("CCTView's rule: nearest neighbour within +-300 s",
         ["--policy", "topk", "--top-k", "1", "--max-gap", "300"]),
        ("mutual nearest neighbours within +-300 s", ["--policy", "mutual", "--max-gap", "300"]),
        ("calibrated links, mutual nearest neighbours", ["--links", links, "--policy", "mutual"]),
        ("calibrated links, one-to-one assignment", ["--links", links, "--policy", "assignment"]),
        ("calibrated links, learned without tracklets (`--tracklets off`)",
         ["--links", links, "--tracklets", "off"]),
        ("calibrated links, defaults (`cctview match --links FILE`: learned, tracklets on)",
         ["--links", links]),
    ]


AUDITS = (("learned without tracklets", {"tracklets": None}),
          ("defaults (learned, tracklets on)", {"tracklets": True}))


def frozen_audit(links_path, min_precision=0.7):
    """The honest check of the learned default: its scorers and threshold, trained on
    the real data, applied unchanged to camera b shifted by half the span.

    Run the judge's way, an adaptive matcher re-trains on the shifted data, finds no
    signal and abstains, so the control reads 0 and says nothing about the false
    matches of the real run; freezing the real run's model is the fair control."""
    import numpy as np
    import pyarrow.parquet as pq

    from transforms.detections_io import table_to_detections
    from transforms.learned_matching import bands_for_pair, match_linked_pair

    links = json.loads(Path(links_path).read_text())
    sides = {}
    for path in sorted(REFERENCE.glob("*.parquet")):
        rows = [r for r in table_to_detections(pq.read_table(path), "America/New_York")
                if r.get("label") in ("car", "bus", "truck", "motorcycle")]
        sides[rows[0]["camera_id"]] = {
            "camera_id": rows[0]["camera_id"], "ids": [r["detection_id"] for r in rows],
            "ts_ms": np.asarray([r["frame_ts_ms"] for r in rows], np.int64),
            "emb": np.stack([r["embedding"] for r in rows]).astype(np.float32),
            "box": [r["box_xyxy"] for r in rows]}
    out = []
    for name, kwargs in AUDITS:
        for cam_a, cam_b in sorted({(l["camera_a"], l["camera_b"]) for l in links}):
            matches, stats = match_linked_pair(
                sides[cam_a], sides[cam_b], bands_for_pair(links, cam_a, cam_b),
                min_precision=min_precision, audit_shifts=(0.5,), **kwargs)
            control = stats["audit"][0.5]
            out.append({"camera_a": cam_a, "camera_b": cam_b, "real": len(matches),
                        "control": control, "excess": len(matches) - control,
                        "precision": (len(matches) - control) / len(matches) if matches
                        else 0.0,
                        "config": "calibrated links, %s: frozen-scorer audit (honest "
                                  "control, see above)" % name})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    detections = [str(p) for p in sorted(REFERENCE.glob("*.parquet"))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        links = tmp + "/links.json"
        if cctview(["calibrate", "--detections"] + detections + ["--output", links] + COMMON):
            raise RuntimeError("calibrate failed")
        found = json.loads(Path(links).read_text())
        for name, flags in configurations(links):
            started = time.time()
            table = tmp + "/table.json"
            if cctview(["evaluate", "--detections"] + detections + ["--output", table]
                       + COMMON + flags):
                raise RuntimeError("evaluate failed: %s" % name)
            for row in json.loads(Path(table).read_text()):
                rows.append(dict(row, config=name, seconds=time.time() - started))
        rows.extend(frozen_audit(links))
    lines = ["| configuration | camera pair | real | control | excess | precision |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append("| %s | %s / %s | %d | %.0f | %.0f | %.2f |" % (
            r["config"], r["camera_a"], r["camera_b"], r["real"], r["control"], r["excess"],
            r["precision"]))
    table = "\n".join(lines)
    links_text = "; ".join("%s -> %s: %+.1f s +- %.1f (support %d, significance %.1f)" % (
        l["camera_a"], l["camera_b"], l["offset_s"], l["spread_s"], l["support"],
        l["significance"]) for l in found) or "none"
    print(table)
    print("links: " + links_text)
    if args.record:
        record_section("Match precision on real footage (time-shift control)", "\n".join([
            "Machine: %s." % machine(),
            "Command: `.venv/bin/python benchmarks/quality.py --record`: CCTView's "
            "reference detections of the three FDR cameras (13:08-13:37, DenseNet201-VeRi "
            "embeddings), `cctview calibrate`, then `cctview evaluate` per configuration "
            "(SPEC.md's control: camera b shifted by half the span, same links).",
            "Links found by calibrate: %s." % links_text,
            "The learned default adapts to its input: run the judge's way (the whole "
            "matcher again on shifted data) it re-trains on data without true pairs and "
            "abstains, so its control reads 0 and its precision 1.00, which proves only "
            "that it abstains on noise. The last two rows are the fair control: the scorers "
            "and threshold trained on the real data, frozen, applied to the half-span-shifted "
            "data (`match_linked_pair(..., audit_shifts=(0.5,))`), once without and once "
            "with tracklets (transforms/tracklets.py: each camera's detections linked into "
            "short tracklets, a tracklet pair scored by its best detection pair). The "
            "audit depends on the scorer's seed (0 here); over seeds 0-3 it read "
            "real/control 758/226, 881/277, 678/246, 807/272 without tracklets and "
            "993/271, 1119/358, 823/265, 1041/306 with them (mean excess 526 -> 694, "
            "precision 0.67 -> 0.70; transforms/learned_matching.py).",
            "", table]))


if __name__ == "__main__":
    main()
