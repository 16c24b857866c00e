"""Weak camera links: estimated precision and excess by the target-decoy competition.

The test bed (docs/spec.md's estimate, no labels needed; the synthetic world also has truth):
- synthetic worlds (`cctview synth`, 3 cameras, 16 minutes, background detector +
  ``--embedder`` colour strips (default) or whole-crop colour histograms, links from `cctview calibrate`) at noise 1 and 2: seed 0 was used
  for tuning, seed 1 is held out;
- the reference pair 733-681-N / 735-683-N (CCTView's detections, DenseNet201-VeRi) made
  weak: only its small boxes (shorter side under 20 px, held out), or Gaussian noise of
  twice the embeddings' mean per-dimension standard deviation added (held out).

Per part and configuration: the decoy run's target hits, decoy hits, estimated excess and
precision (at `--min-precision` 0.7 for the learned policy), and on the synthetic world
the true precision of the target hits.

  .venv/bin/python benchmarks/weak_links.py --record
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import machine, record_section  # noqa: E402
from pipelines import ground_truth  # noqa: E402
from pipelines.cli import main as cctview  # noqa: E402
from transforms import decoy  # noqa: E402
from transforms import learned_matching as lm  # noqa: E402
from transforms import match_blocks as mb  # noqa: E402

REFERENCE = REPO.parent / "shared" / "data" / "nyc-fdr" / "reference"
PAIR = ("733-681-N", "735-683-N")
VEHICLES = ("car", "bus", "truck", "motorcycle")
MIN_PRECISION = 0.7
TRIED = (
    "Tried on the tuning parts (synthetic seed 0 at noise 1, the full reference pair) and "
    "not kept: a pooled PCA whitening after the camera mean removal (the true match ranked "
    "first among a detection's band candidates for 76-80% of detections instead of 84%); "
    "per-camera PCA whitening (separate bases per camera: 9-11%); a fixed appearance score "
    "instead of the learned one (the cosine distance of the two tracklets' mean "
    "embeddings, or of the two detections, with the same one-to-one selection and "
    "threshold: estimated excess 21-66 instead of 826); L2-normalised norms as features "
    "(the raw norms carry how much a crop shows: on the reference pair 0.72 at excess 377 "
    "with normalised norms, 0.73 at 441 with raw ones). Tried on the held-out parts "
    "once and not kept (so the kept default was not chosen on them): the selection "
    "widened from mutual pairs to every candidate of a tracklet pair that holds one "
    "(noise 1: 844 excess at >= 0.8 against 912; the small boxes 0 against 37). Tried on "
    "the tuning parts (its estimates unchecked against the truth): mutual nearest "
    "neighbours repeated on the detections left free by 1, 2, 3, 4 rounds (or until "
    "none are left: greedy by distance) before the selection by score; seed 0 at noise 1, excess at >= 0.8 / 0.9: 800 / 625, "
    "1376 / 932, 1705 / 1336, 1821 / 1154, 1676 / 114; the full reference pair: 343, "
    "403, 407, 410, 408 at >= 0.8. Three rounds (selection mutual-3, its row above) "
    "were then measured once on the held-out parts: twice the excess at >= 0.8 on "
    "synthetic noise 1, less on synthetic noise 2 and on the reference pair's noisy "
    "embeddings; over three matcher seeds and with the decoy estimate checked against "
    "the truth it became the default on 2026-12-04. Tried on the tuning parts on 2026-12-03 and not "
    "kept (excess at >= 0.8, synthetic seed 0 at noise 2 / noise 1 / the full reference "
    "pair): tracklet gates loosened to the synthetic world's motion (motion gate 12 box "
    "sizes/s, velocity gate 6, embedding weight 4: links found 0.82-0.91 of a vehicle's "
    "consecutive detections instead of 0.04, tracklets 3-4 long instead of 1.2-1.4) "
    "51 / 765 / 295 against 86 / 735 / 296, with mean pooling 34 and with the tracklet "
    "features 64 at noise 2; scorer features without the norms and local scales "
    "(appearance, dt, box centres and sizes) 156, 117, 23 / 948, 804, 789 / 276, 227, 164 over "
    "matcher seeds 0, 1, 2 against the default's 86, 129, 100 / 735, 756, 853 / 296, "
    "182, 308; an average of three scorers per fold 77, 140, 106 / 817, 786, 807 / "
    "238, 238, 272. The matcher's seed alone moves these numbers by up to 2x on the weak "
    "parts, so single-seed differences smaller than that are not evidence. Built on "
    "2026-12-03: a zone gate (where in the two views a link's pairs lie, and so their "
    "direction, learned from the data: zone_gate=True, its row above, not the default). "
    "Measured with the truth of the synthetic world at noise 2 on 2026-12-04 and not "
    "built (docs/design.md, \"Why weak links stay weak\"): k-reciprocal re-ranking, "
    "first-in-first-out order, Sinkhorn assignment with a dustbin, a scorer trained only "
    "on the pairs the selection visits.")
CONFIGS = (  # (name, embedding normalisation or None for mutual NN, selection, zone gate)
    ("mutual NN in the links' bands", None, None, False),
    ("learned, raw embeddings, greedy selection", "", "greedy", False),
    ("learned, --embedding-norm power+center, greedy selection", "power+center", "greedy",
     False),
    ("learned, --embedding-norm power+center, selection mutual (one round)",
     "power+center", "mutual", False),
    ("learned, --embedding-norm power+center (default selection: mutual-3)",
     "power+center", "mutual-3", False),
    ("learned, --embedding-norm power+center, selection mutual (one round), zone gate",
     "power+center", "mutual", True),
)


def _run(argv):
    if cctview(argv) != 0:
        raise RuntimeError("cctview %s failed" % argv[0])


def synthetic_part(noise, seed, tmp, embedder, gap=120.0):
    """(detections, links, vehicle of each detection) of one synthetic world."""
    world, run = "%s/world-%g-%d" % (tmp, noise, seed), "%s/run-%g-%d" % (tmp, noise, seed)
    _run(["synth", "--output", world, "--cameras", "3", "--minutes", "16", "--noise",
          str(noise), "--seed", str(seed)])
    _run(["extract", "--input", world + "/frames", "--output", run, "--detector", "background",
          "--embedder", embedder])
    _run(["calibrate", "--detections", run + "/detections", "--output", run + "/links.json",
          "--max-gap", str(gap)])
    dets = ground_truth.read_table(run + "/detections")
    vehicles = ground_truth.vehicle_of_detections(dets, ground_truth.load_truth(world))
    for d in dets:
        d["frame_ts_ms"] = int(d["frame_ts"].timestamp() * 1000)
    return dets, json.loads(Path(run + "/links.json").read_text()), vehicles


def reference_part(tmp, small_boxes=False, noise=0.0, seed=0):
    """(detections, links) of the reference pair, weakened."""
    import pyarrow.parquet as pq

    from transforms.detections_io import table_to_detections

    dets = []
    for cam in PAIR:
        dets += [d for d in table_to_detections(pq.read_table(str(REFERENCE / (cam + ".parquet"))),
                                                "America/New_York")
                 if d.get("label") in VEHICLES]
    links_path = tmp + "/reference-links.json"
    if not Path(links_path).exists():
        _run(["calibrate", "--detections"] + [str(REFERENCE / (c + ".parquet")) for c in PAIR]
             + ["--output", links_path, "--timezone", "America/New_York"])
    if small_boxes:
        dets = [d for d in dets if min(d["box_xyxy"][2] - d["box_xyxy"][0],
                                       d["box_xyxy"][3] - d["box_xyxy"][1]) < 20]
    if noise:
        emb = np.stack([np.asarray(d["embedding"], np.float32) for d in dets])
        rng = np.random.default_rng(seed)
        emb += rng.normal(0, noise * emb.std(0).mean(), emb.shape).astype(np.float32)
        for d, e in zip(dets, emb):
            d["embedding"] = e
    return dets, json.loads(Path(links_path).read_text())


def _matcher(norm, selection, gap, seed=0, zone_gate=False):
    if norm is None:
        def mutual(dets, links):
            return mb.match_arrays(
                [d["camera_id"] for d in dets], [d["frame_ts_ms"] for d in dets],
                np.stack([np.asarray(d["embedding"], np.float32) for d in dets]),
                [d["detection_id"] for d in dets], policy="mutual", links=links, max_gap_s=gap)
        return mutual, None

    def learned(dets, links):
        keep = ("camera_id", "frame_ts_ms", "detection_id", "embedding", "box_xyxy")
        return lm.match_linked_periods([{k: d[k] for k in keep} for d in dets], links,
                                       min_precision=0.0, tracklets=True, normalize=norm,
                                       selection=selection, seed=seed,
                                       zone_gate=zone_gate)[0]
    return learned, MIN_PRECISION


def _measure_one(dets, links, vehicles, gap, fn, min_precision):
    """One decoy run of one matcher -> the row's numbers."""
    started = time.time()
    pairs, targets = decoy.evaluate_in_memory(dets, fn, links, gap, min_precision=min_precision)
    true = None
    if vehicles is not None and targets:
        true = float(np.mean([vehicles.get(m["detection_id_a"], -1) ==
                              vehicles.get(m["detection_id_b"], -2) for m in targets]))
    return {"target_hits": sum(r["target_hits"] for r in pairs),
            "decoy_hits": sum(r["decoy_hits"] for r in pairs),
            "excess": sum(r["excess"] for r in pairs), "precision": decoy.pooled_precision(pairs),
            "true": true, "seconds": time.time() - started,
            "at": {k: sum(r["excess_at_precision"][k] for r in pairs) for k in ("0.8", "0.9")}}


def _median_row(runs):
    """Median of every number over the matcher seeds' runs (one run: itself), with the
    seeds' range of the excess at >= 0.8 (``at_range``)."""
    med = lambda vals: float(np.median(vals))  # noqa: E731
    trues = [r["true"] for r in runs if r["true"] is not None]
    row = {k: med([r[k] for r in runs]) for k in ("target_hits", "decoy_hits", "excess",
                                                  "precision", "seconds")}
    row["true"] = med(trues) if trues else None
    row["at"] = {k: med([r["at"][k] for r in runs]) for k in ("0.8", "0.9")}
    row["at_range"] = (min(r["at"]["0.8"] for r in runs), max(r["at"]["0.8"] for r in runs))
    return row


def measure(name, part, dets, links, vehicles, gap, seeds=(0,), configs=CONFIGS):
    """One row per configuration: the medians over ``seeds`` (the learned matcher's
    seed; mutual NN has none and runs once)."""
    rows = []
    for config, norm, selection, zone_gate in configs:
        runs = []
        for seed in (seeds if norm is not None else seeds[:1]):
            fn, min_precision = _matcher(norm, selection, gap, seed, zone_gate)
            runs.append(_measure_one(dets, links, vehicles, gap, fn, min_precision))
            print(name, config, seed, runs[-1], flush=True)
        rows.append(dict(_median_row(runs), data=name, part=part, config=config,
                         seeds=len(runs)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="synthetic,reference",
                        help="comma-separated: synthetic, reference")
    parser.add_argument("--embedder", default="color_bands",
                        choices=("color_bands", "color_histogram"),
                        help="the synthetic worlds' embedder (default color_bands, the demo's)")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated matcher seeds; rows are their medians")
    parser.add_argument("--configs", default=None,
                        help="comma-separated positions in CONFIGS (default: all)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    seeds = tuple(int(x) for x in args.seeds.split(","))
    configs = CONFIGS if args.configs is None else tuple(
        CONFIGS[int(k)] for k in args.configs.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "synthetic" in parts:
            for noise, seed in ((1, 1), (2, 1)):
                dets, links, vehicles = synthetic_part(noise, seed, tmp, args.embedder)
                rows += measure("synthetic noise %g, seed %d" % (noise, seed), "held out",
                                dets, links, vehicles, 120.0, seeds, configs)
        if "reference" in parts:
            for label, kw in (("reference pair, boxes under 20 px", {"small_boxes": True}),
                              ("reference pair, embedding noise x2", {"noise": 2.0})):
                dets, links = reference_part(tmp, **kw)
                rows += measure(label, "held out", dets, links, None, 300.0, seeds, configs)
    lines = ["| data | part | configuration | target hits | decoy hits | est. excess | "
             "est. precision | true precision of target hits | est. excess at est. precision "
             ">= 0.8 / 0.9 | the same at >= 0.8, seeds' range | seconds |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append("| %s | %s | %s | %.0f | %.0f | %.0f | %.2f | %s | %.0f / %.0f | "
                     "%.0f-%.0f | %.0f |" % (
            r["data"], r["part"], r["config"], r["target_hits"], r["decoy_hits"], r["excess"],
            r["precision"], "-" if r["true"] is None else "%.2f" % r["true"], r["at"]["0.8"],
            r["at"]["0.9"], r["at_range"][0], r["at_range"][1], r["seconds"]))
    table = "\n".join(lines)
    print(table)
    if args.record:
        title = "Weak links (target-decoy estimate)" if len(seeds) == 1 else (
            "Weak links over matcher seeds (target-decoy estimate)")
        record_section(title, "\n".join([
            "Machine: %s." % machine(),
            "Command: `.venv/bin/python %s`." % " ".join(
                ["benchmarks/weak_links.py"] + list(sys.argv[1:] if argv is None else argv)),
            "Synthetic worlds: background detector, `--embedder %s`. " % args.embedder +
            "Every row is held-out data: the choices made while building this (the "
            "per-camera embedding normalisation, its raw-norm features) were tuned on the "
            "synthetic world's seed 0 (noise 1) and the full reference pair; the rows use "
            "seed 1 and the reference pair's small boxes or its embeddings with added noise. "
            "Estimates are docs/spec.md's target-decoy competition (one run on camera a against "
            "b's targets and decoys); the learned rows are what `--min-precision` %.1f "
            "returns (matches with q_value <= %.1f); the excess at an estimated precision "
            ">= 0.8 / 0.9 is the most that any score threshold per camera pair reaches "
            "(the learned policy run once at every threshold; mutual NN has no score, so "
            "its only point counts if it reaches the level). Target of issue 14: estimated "
            "precision 0.8 or more at more excess than mutual NN in the band. Every number "
            "of a learned row is the median over the matcher's seeds %s (scorer "
            "initialisation, subsampling, dt jitter), and the seeds' range of the excess "
            "at >= 0.8 beside it." % (MIN_PRECISION, 1 - MIN_PRECISION,
                                       ", ".join(map(str, seeds))),
            "", table, "", TRIED]))


if __name__ == "__main__":
    main()
