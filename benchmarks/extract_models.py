"""Throughput of frame -> detections + embeddings, three ways, on one device.

  cctview  : one frame per forward, then per box a PIL crop, Resize/CenterCrop
             and one embedder forward per crop (how CCTView extracted features)
  staged   : batched detection, then batched embedding that uploads the frames
             again (what two separate RunInference stages do)
  fused    : models.fused.DetectAndEmbed: one upload, crops cut on the device

Needs torch, torchvision, onnxruntime and the frames; not apache_beam, so it
runs on a GPU machine with nothing but this repository, e.g.

  python benchmarks/extract_models.py --device cuda --embedder densenet201_veri --random-embedder
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.fused import DetectAndEmbed  # noqa: E402
from models.registry import build_detector, build_embedder  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def cctview_way(detector, embedder, images):
    for image in images:
        det = detector.detect([image])[0]
        pil = Image.fromarray(image)
        for box in det["boxes"]:
            embedder.embed_pil(pil.crop(tuple(int(round(v)) for v in box)))


def staged_way(detector, embedder, images, batch_size):
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        embedder.embed_crops(batch, [d["boxes"] for d in detector.detect(batch)])


def fused_way(fused, images, batch_size):
    for start in range(0, len(images), batch_size):
        fused(images[start:start + batch_size])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default=str(SHARED / "data/nyc-fdr/frames/733-681-N"))
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--detector", default="yolox")
    parser.add_argument("--detector-weights", default=str(SHARED / "models/yolox_nano.onnx"))
    parser.add_argument("--embedder", default="onnx")
    parser.add_argument("--embedder-weights", default=str(SHARED / "models/osnet_x0_25.onnx"))
    parser.add_argument("--random-embedder", action="store_true",
                        help="random initialisation (timing only) for torch embedders without weights at hand")
    parser.add_argument("--ways", default="cctview,staged,fused")
    args = parser.parse_args(argv)

    paths = sorted(Path(args.frames).rglob("*.jp*g"))[: args.count]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    detector = build_detector(args.detector, args.detector_weights or None, args.device)
    options = {"pretrained": False} if args.random_embedder else {}
    weights = None if args.random_embedder or args.embedder == "color_histogram" else args.embedder_weights
    embedder = build_embedder(args.embedder, weights, args.device, **options)
    fused = DetectAndEmbed(detector, embedder)
    fused(images[: args.batch_size])  # warm-up: lazy initialisation, cuDNN autotuning
    crops = sum(len(d["boxes"]) for d in detector.detect(images))
    runs = {
        "cctview": lambda: cctview_way(detector, embedder, images),
        "staged": lambda: staged_way(detector, embedder, images, args.batch_size),
        "fused": lambda: fused_way(fused, images, args.batch_size),
    }
    for way in args.ways.split(","):
        _, seconds = _timed(runs[way], args.device)
        print(json.dumps({"way": way, "device": args.device, "detector": args.detector, "embedder": args.embedder,
                          "frames": len(images), "crops": crops, "batch_size": args.batch_size,
                          "seconds": round(seconds, 3), "frames_per_s": round(len(images) / seconds, 1)}))


if __name__ == "__main__":
    main()
