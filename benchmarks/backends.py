"""Detection frames/s of the TensorFlow and ImageAI backends against the same network in torchvision.

  tf_savedmodel          : a RetinaNet-ResNet50-FPN exported as a TF2 Object Detection API
                           SavedModel (benchmarks/tf_retinanet.py), loaded as users load theirs
  imageai_retinanet      : a RetinaNet weight file in ImageAI's format, loaded by ImageAI
  retinanet_resnet50_fpn : the same weight file through torchvision (the baseline of both)

Random weights (nothing can be downloaded here); every detector gets the same frames in the
same batches, rounds interleaved, medians reported. Needs the [tf] and [imageai] extras,
not apache_beam. Prints JSON lines and, with --record, replaces the "## TensorFlow and
ImageAI backends" section of BENCHMARKS.md:

  .venv/bin/python benchmarks/backends.py --record
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402,F401  (torchvision before tensorflow: models/__init__.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import tf_retinanet  # noqa: E402
from benchmarks.record import machine, record_section  # noqa: E402
from models.registry import build_detector  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
BASELINE = "retinanet_resnet50_fpn"


def _detectors(workdir: Path) -> dict:
    """name -> detector, all three on one RetinaNet-ResNet50-FPN architecture."""
    torch.manual_seed(0)
    from torchvision.models.detection import retinanet_resnet50_fpn

    weights = workdir / "retinanet_resnet50_fpn_coco.pth"  # ImageAI's file is a plain state dict
    torch.save(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict(), weights)
    savedmodel = tf_retinanet.export(str(workdir / "tf_retinanet"))
    return {
        "tf_savedmodel": build_detector("tf_savedmodel", savedmodel),
        "imageai_retinanet": build_detector("imageai_retinanet", str(weights)),
        BASELINE: build_detector(BASELINE, str(weights)),
    }


def _frames_per_s(detector, images, batch_size: int):
    """(frames/s, boxes found) of one pass over ``images``."""
    start = time.perf_counter()
    boxes = 0
    for i in range(0, len(images), batch_size):
        boxes += sum(len(d["boxes"]) for d in detector.detect(images[i:i + batch_size]))
    return len(images) / (time.perf_counter() - start), boxes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default=str(SHARED / "data/nyc-fdr/frames/733-681-N"))
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args(argv)

    paths = sorted(Path(args.frames).rglob("*.jp*g"))[: args.count]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    with tempfile.TemporaryDirectory() as workdir:
        detectors = _detectors(Path(workdir))
    for detector in detectors.values():  # warm-up: graph tracing, allocator, oneDNN kernels
        detector.detect(images[: args.batch_size])
    runs = {name: [] for name in detectors}
    found = {}
    load_before = os.getloadavg()[0]
    names = list(detectors)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            rate, boxes = _frames_per_s(detectors[name], images, args.batch_size)
            runs[name].append(rate)
            found[name] = boxes
            print(json.dumps({"round": round_, "detector": name, "frames": len(images), "boxes": boxes,
                              "batch_size": args.batch_size, "frames_per_s": round(rate, 3)}), flush=True)
    load_after = os.getloadavg()[0]
    medians = {name: statistics.median(rates) for name, rates in runs.items()}
    rows = ["| detector | network | frames/s (median) | vs torchvision |", "| --- | --- | ---: | ---: |"]
    for name in names:
        rows.append("| `%s` | RetinaNet-ResNet50-FPN, 91 classes | %.3f | %.2fx |"
                    % (name, medians[name], medians[name] / medians[BASELINE]))
    table = "\n".join(rows)
    print(table)
    if args.record:
        record_section("TensorFlow and ImageAI backends", "\n".join([
            "Machine: %s, tensorflow %s." % (machine(), __import__("tensorflow").__version__),
            "Command: `.venv/bin/python benchmarks/backends.py --count %d --batch-size %d --rounds %d --record` "
            "(%d real 352x240 frames of `%s`, batches of %d, %d interleaved rounds, medians; each "
            "detector warmed up on one batch first). One architecture three ways, random weights: "
            "`tf_savedmodel` runs a RetinaNet-ResNet50-FPN written in TensorFlow layer for layer as "
            "torchvision's (benchmarks/tf_retinanet.py; 34.04 M parameters against torchvision's 34.07 M, "
            "its batch norms there as scale and shift) and exported with the Object Detection API "
            "signature; `imageai_retinanet` and `retinanet_resnet50_fpn` load the same state-dict file. "
            "Both resize to 800 px on the shorter side. Boxes found at the default --min-score 0.25: %s "
            "(random weights score near the 0.01 prior, so the time is the network's, not the "
            "post-processing's). Threads: torch %d, TensorFlow its default (one pool per core). "
            "Load average (1 min) %.1f before the rounds and %.1f after, on a machine shared with "
            "other jobs: absolute rates are lower than on a quiet machine, and busy cores may cost "
            "torch's OpenMP threads, which spin while they wait, more than TensorFlow's pool (not "
            "measured)."
            % (args.count, args.batch_size, args.rounds, len(images), Path(args.frames).name, args.batch_size,
               args.rounds, ", ".join("%s %d" % item for item in found.items()), torch.get_num_threads(),
               load_before, load_after),
            "",
            table,
            "",
            "Runs, frames/s: " + "; ".join("%s %s" % (name, ", ".join("%.3f" % r for r in runs[name]))
                                           for name in names) + ".",
        ]))


if __name__ == "__main__":
    main()
