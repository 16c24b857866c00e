"""The target-decoy estimate against the truth of the run it stands for.

`cctview evaluate --control decoy` runs a matcher once on camera a against camera b's
detections plus decoys; `cctview match` runs it without decoys. This benchmark scores
both runs on the synthetic world (`cctview synth`, 3 cameras, 16 minutes, background
detector + colour strips, links from `cctview calibrate`; seed 0 at noise 0.5, 1 and 2,
seed 1 at noise 1 held out) against its ground truth, per configuration:

- the real run (no decoys): its matches and their true precision, all pairs and among
  pairs whose two detections overlap a true box ("mapped");
- the decoy run: target hits, decoy hits, the true precision of its target hits, where
  each decoy hit's a-detection went in the real run (a true match, a false one, none);
- the estimates: the plain competition ratio ``excess / target_hits`` and the reported
  one, ``excess / (target_hits + decoy_hits)`` (transforms/decoy.py).

The learned matcher runs at every threshold once and is read at `--min-precision` 0.7
and 0.8 (its matches with q_value <= 0.3 and 0.2), in both runs.

  .venv/bin/python benchmarks/decoy_truth.py --work /tmp/decoy-truth [--configs 0,3,4]
"""
import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import weak_links  # noqa: E402
from benchmarks.record import machine  # noqa: E402
from transforms import decoy  # noqa: E402

GAP = 120.0
LEVELS = ((0.5, 0), (1.0, 0), (2.0, 0), (1.0, 1))
READ_AT = (0.7, 0.8)


def part(work: Path, noise: float, seed: int):
    """(detections, links, vehicle of each detection) of one world, made once in ``work``."""
    cache = work / ("part-%g-%d.pkl" % (noise, seed))
    if not cache.exists():
        cache.write_bytes(pickle.dumps(weak_links.synthetic_part(noise, seed, str(work), "color_bands")))
    return pickle.loads(cache.read_bytes())


def precisions(matches, vehicles):
    """(true precision, mapped true precision) of match dicts with real detection ids."""
    pairs = [(vehicles.get(decoy.original_id(m["detection_id_a"])),
              vehicles.get(decoy.original_id(m["detection_id_b"]))) for m in matches]
    right = [a is not None and a == b for a, b in pairs]
    mapped = [a == b for a, b in pairs if a is not None and b is not None]
    return (float(np.mean(right)) if right else 0.0), (float(np.mean(mapped)) if mapped else 0.0)


def fates(decoy_hits, real, vehicles):
    """Where each decoy hit's a-detection went in the real run: true / false / none."""
    went = {}
    for m in real:
        a = m["detection_id_a"]
        went[a] = went.get(a, False) or vehicles.get(a, -1) == vehicles.get(m["detection_id_b"], -2)
    out = {"true": 0, "false": 0, "none": 0}
    for m in decoy_hits:
        a = decoy.original_id(m["detection_id_a"])
        out["none" if a not in went else ("true" if went[a] else "false")] += 1
    return out


def measure(noise, seed, dets, links, vehicles, configs=weak_links.CONFIGS):
    rows = []
    for config, norm, selection, zone_gate in configs:
        fn, scored = weak_links._matcher(norm, selection, GAP, zone_gate=zone_gate)
        real_all = fn(dets, links)
        for at in ([None] if scored is None else READ_AT):
            real = real_all if at is None else [
                m for m in real_all if decoy.returned_at(m["q_value"], at)]
            decoy_hits = []
            pairs, targets = decoy.evaluate_in_memory(dets, fn, links, GAP, min_precision=at,
                                                      decoys=decoy_hits)
            t = sum(r["target_hits"] for r in pairs)
            d = sum(r["decoy_hits"] for r in pairs)
            false = sum(r["false"] for r in pairs)
            rows.append({"noise": noise, "seed": seed, "config": config, "at": at,
                         "real": len(real), "real_true": precisions(real, vehicles),
                         "t": t, "d": d, "comp_true": precisions(targets, vehicles)[0],
                         "fates": fates(decoy_hits, real, vehicles),
                         "ratio": (t - false) / t if t else 0.0,
                         "estimate": decoy.estimated_precision(t, false, d)})
            print(rows[-1], flush=True)
    return rows


def table(rows) -> str:
    lines = ["| noise (seed) | matching | real run: matches | true (mapped) | decoy run: "
             "target / decoy hits | true of target hits | decoy hits' a in the real run: "
             "true / false / unmatched | plain ratio | **estimate** | estimate - true |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = r["config"] + ("" if r["at"] is None else ", --min-precision %g" % r["at"])
        f = r["fates"]
        lines.append("| %g (%d) | %s | %d | %.2f (%.2f) | %d / %d | %.2f | %d / %d / %d | %.2f "
                     "| **%.2f** | %+.2f |" % (
                         r["noise"], r["seed"], name, r["real"], r["real_true"][0],
                         r["real_true"][1], r["t"], r["d"], r["comp_true"], f["true"],
                         f["false"], f["none"], r["ratio"], r["estimate"],
                         r["estimate"] - r["real_true"][0]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the worlds (kept, reused)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated positions in weak_links.CONFIGS (default: all)")
    args = parser.parse_args(argv)
    configs = weak_links.CONFIGS if args.configs is None else tuple(
        weak_links.CONFIGS[int(k)] for k in args.configs.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started, rows = time.time(), []
    for noise, seed in LEVELS:
        rows += measure(noise, seed, *part(work, noise, seed), configs=configs)
    print("Machine: %s; %.0f s." % (machine(), time.time() - started))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
