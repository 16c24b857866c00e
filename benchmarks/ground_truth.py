"""Match quality against the synthetic world's ground truth, next to the label-free estimates.

For each noise level: `cctview synth`, then one `cctview extract` (background detector,
``--embedder``: colour strips by default, the demo's), then from the same stored detections
- CCTView's rule: every detection's nearest neighbour in each other camera within
  --max-gap (`match --policy topk --top-k 1`),
- `cctview calibrate`, then `cctview match --links links.json --policy mutual`,
- our defaults: `cctview calibrate`, then `cctview match --links links.json` (the
  learned matcher, which abstains where it cannot reach its precision target), and
  the same as the demo runs it (``--embedding-norm power+center``),
each scored against the truth (pair precision, transit recall, their F1) and by both
label-free estimates of `cctview evaluate` (docs/spec.md): the target-decoy competition
(`--control decoy`, the default) and the time-shift control (`--control shift`).

  .venv/bin/python benchmarks/ground_truth.py --record
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
from pipelines import ground_truth  # noqa: E402
from pipelines.cli import main as cctview  # noqa: E402
from transforms import decoy  # noqa: E402

GAP = "120"
NOTE = ("How to read it: the decoy estimate is the one to trust for every configuration: "
        "the matcher runs once on camera a against camera b's detections plus decoys (b's "
        "detections of the other half of the period), so an adaptive matcher adapts to both. "
        "The time-shift estimate of the learned default reads 1.00 (or 0 matches) because, "
        "run again on shifted data, it trains on noise and abstains: it proves nothing. "
        "Precision (true) counts a pair as false when either detection overlaps no true box "
        "(IoU < 0.5: boxes the background detector split or merged, many at noise 2); "
        "'mapped' is the true precision among pairs whose two detections both overlap a "
        "true box. The decoy estimate's target hits come from a run with twice b's density "
        "(targets and decoys compete), so it describes a slightly harder problem than the "
        "real run. For the learned default the decoy run is a different run from the real "
        "one (it trains with b's decoys and picks its own threshold), so the truth beside it "
        "is not the truth of what the estimate describes; benchmarks/weak_links.py compares "
        "the estimate with the decoy run's own target hits.")


def _run(argv):
    code = cctview(argv)
    if code != 0:
        raise RuntimeError("cctview %s failed (%d)" % (argv[0], code))


def _estimate(detections, out, extra, control):
    """(estimated precision, estimated excess) of a configuration over all camera pairs."""
    table = out + "-%s.json" % control
    _run(["evaluate", "--detections", detections, "--output", table, "--max-gap", GAP,
          "--control", control] + extra)
    rows = json.loads(Path(table).read_text())
    excess = sum(r["excess"] for r in rows)
    if control == "decoy":
        return decoy.pooled_precision(rows), excess
    hits = sum(r["real"] for r in rows)
    return (excess / hits if hits else 0.0), excess


def _mapped_precision(matches, vehicles):
    """True precision among the pairs whose two detections overlap a true box."""
    mapped = [m for m in matches
              if m["detection_id_a"] in vehicles and m["detection_id_b"] in vehicles]
    right = sum(vehicles[m["detection_id_a"]] == vehicles[m["detection_id_b"]] for m in mapped)
    return right / len(mapped) if mapped else 0.0


def one_level(noise, minutes, seed, tmp, embedder):
    world, run = tmp + "/world-%g-%d" % (noise, seed), tmp + "/run-%g-%d" % (noise, seed)
    _run(["synth", "--output", world, "--cameras", "3", "--minutes", str(minutes),
          "--noise", str(noise), "--seed", str(seed)])
    _run(["extract", "--input", world + "/frames", "--output", run,
          "--detector", "background", "--embedder", embedder])
    detections = run + "/detections"
    truth = ground_truth.load_truth(world)
    vehicles = ground_truth.vehicle_of_detections(ground_truth.read_table(detections), truth)
    transits = ground_truth.true_transits(truth, float(GAP))
    rows = []
    links = run + "/links.json"
    _run(["calibrate", "--detections", detections, "--output", links, "--max-gap", GAP])
    configs = [
        ("cctview", "CCTView's rule (nearest neighbour, +-%s s)" % GAP,
         ["--policy", "topk", "--top-k", "1", "--max-gap", GAP]),
        ("mutual", "calibrate, then match --links --policy mutual",
         ["--links", links, "--policy", "mutual"]),
        ("default", "ours: calibrate, then match --links (learned default)",
         ["--links", links]),
        ("demo", "ours as the demo runs it: --links, --embedding-norm power+center",
         ["--links", links, "--embedding-norm", "power+center"]),
    ]
    for folder, name, flags in configs:
        out = run + "/" + folder
        _run(["match", "--detections", detections, "--output", out] + flags)
        matches = ground_truth.read_table(out + "/matches")
        scores = ground_truth.score_matches(matches, vehicles, transits)
        p, r = scores["precision"], scores["recall"]
        decoy, decoy_excess = _estimate(detections, out + "-evaluate", flags, "decoy")
        shift, _ = _estimate(detections, out + "-evaluate", flags, "shift")
        scores.update(name=name, noise=noise, seed=seed, f1=2 * p * r / (p + r) if p + r else 0.0,
                      mapped=_mapped_precision(matches, vehicles), decoy=decoy,
                      decoy_excess=decoy_excess, shift=shift)
        rows.append(scores)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", default="0.5,1,2")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--minutes", type=float, default=16.0,
                        help="minutes of footage per noise level (default 16)")
    parser.add_argument("--embedder", default="color_bands",
                        choices=("color_bands", "color_histogram"),
                        help="embedder of the extraction (default color_bands, the demo's)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for noise in [float(n) for n in args.noise.split(",")]:
            rows.extend(one_level(noise, args.minutes, args.seed, tmp, args.embedder))
    lines = ["| noise | matching | matches | precision (true) | precision (true, mapped) | "
             "decoy estimate (excess) | time-shift estimate | transit recall | F1 |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append("| %g | %s | %d | %.2f | %.2f | %.2f (%.0f) | %.2f | %.2f (%d/%d) | %.2f |" % (
            r["noise"], r["name"], r["matches"], r["precision"], r["mapped"], r["decoy"],
            r["decoy_excess"], r["shift"], r["recall"], r["transits_found"], r["transits"],
            r["f1"]))
    table = "\n".join(lines)
    print(table)
    print("%.0f s" % (time.time() - started))
    if args.record:
        record_section("Ground truth (synthetic world)", "\n".join([
            "Machine: %s." % machine(),
            "Command: `.venv/bin/python %s` (3 cameras, "
            "%g minutes per noise level, seed %d, background detector + `--embedder %s`; one "
            "extraction, every matching from the same stored detections)." % (
                " ".join(["benchmarks/ground_truth.py"] + list(
                    sys.argv[1:] if argv is None else argv)), args.minutes, args.seed,
                args.embedder),
            "Precision (true): share of match pairs whose two detections are the same "
            "vehicle. Transit recall: share of (vehicle, camera pair) sightings within "
            "%s s with at least one true pair. F1 of the two. The estimates are "
            "`cctview evaluate`'s (docs/spec.md), computed without labels: target-decoy "
            "(`--control decoy`) and time-shift (`--control shift`)." % GAP,
            "", table, "", NOTE]))


if __name__ == "__main__":
    main()
