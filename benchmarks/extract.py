"""Frames/s of `cctview extract` against CCTView's way, measured in the same run.

CCTView's way: one frame at a time through the detector, each box cut out with PIL,
resized, and embedded one crop at a time (models.embedders.Embedder.embed_pil), the
same models and weights as the command. The command's time is its whole wall time
(Beam start-up, listing, decoding, RunInference batching, Parquet) over the frames it
processed, under the DirectRunner's defaults and with two bundles at once (RUNNERS).
Prints a Markdown table and, with --record, replaces the "## Extraction"
section of BENCHMARKS.md.

  .venv/bin/python benchmarks/extract.py --record
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
FRAMES = SHARED / "data" / "nyc-fdr" / "frames"
MODELS = SHARED / "models"

from benchmarks.record import machine, record_section  # noqa: E402
from models.detectors import COCO_80  # noqa: E402
from models.registry import build_detector, build_embedder  # noqa: E402


def cctview_way(detector, embedder, paths):
    """CCTView's extraction loop: batch 1, PIL crops, one crop per embedder call."""
    crops = 0
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        found = detector.detect([image])[0]
        pil = Image.fromarray(image)
        for box in found["boxes"]:
            embedder.embed_pil(pil.crop(tuple(int(round(v)) for v in box)))
            crops += 1
    return crops


def command_way(frames_dir, flags, out):
    cmd = [str(REPO / ".venv/bin/cctview"), "extract", "--input", str(frames_dir),
           "--output", str(out), "--timezone", "America/New_York"] + flags
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return seconds, result.stdout.strip().splitlines()[-1]


def subset(count, tmp):
    """The first ``count`` frames of every camera, linked into a folder of their own."""
    root = Path(tmp) / ("frames-%d" % count)
    paths = []
    for camera in sorted(p.name for p in FRAMES.iterdir()):
        for path in sorted((FRAMES / camera).rglob("*.jpeg"))[:count]:
            target = root / path.relative_to(FRAMES)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.symlink(path, target)
            paths.append(target)
    return root, paths


# How `cctview extract` runs: the DirectRunner's defaults (one bundle at a time, each
# model call on every core), and one bundle per core in threads (each model call then
# gets one core, ``--model-threads`` auto).
RUNNERS = (("one bundle at a time", []),
           ("2 bundles at once", ["--direct_num_workers", "2", "--direct_running_mode",
                                  "multi_threading"]))


def bench(name, frames_dir, paths, detector, embedder, flags, repeats, tmp):
    """Rows (one per RUNNERS entry) of frames/s, each against CCTView's way measured in the
    same rounds; the ways alternate within a round so that drift hits all alike."""
    ours = {label: [] for label, _ in RUNNERS}
    theirs, summaries = [], {}
    for i in range(repeats):
        for j, (label, runner) in enumerate(RUNNERS):
            seconds, summaries[label] = command_way(
                frames_dir, flags + runner, Path(tmp) / ("out-%s-%d-%d" % (name, i, j)))
            ours[label].append(len(paths) / seconds)
        started = time.perf_counter()
        crops = cctview_way(detector, embedder, paths)
        theirs.append(len(paths) / (time.perf_counter() - started))
    theirs_fps = statistics.median(theirs)
    return [{"name": "%s, %s" % (name, label), "frames": len(paths), "crops": crops,
             "ours": statistics.median(runs), "cctview": theirs_fps,
             "ratio": statistics.median(runs) / theirs_fps, "summary": summaries[label],
             "runs_ours": runs, "runs_cctview": theirs} for label, runs in ours.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-frames", type=int, default=12,
                        help="frames per camera for the torchvision + DenseNet201 pair")
    parser.add_argument("--frames", type=int, default=0,
                        help="frames per camera for the YOLOX + OSNet pair (0: all)")
    parser.add_argument("--record", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        yolox, osnet = MODELS / "yolox_nano.onnx", MODELS / "osnet_x0_25.onnx"
        frames_dir, paths = ((FRAMES, sorted(FRAMES.rglob("*.jpeg"))) if not args.frames
                             else subset(args.frames, tmp))
        rows.extend(bench(
            "YOLOX-Nano + OSNet x0.25 (ONNX)", frames_dir, paths,
            build_detector("yolox", str(yolox)), build_embedder("onnx", str(osnet)),
            ["--detector", "yolox", "--detector-weights", str(yolox), "--embedder", "onnx",
             "--embedder-weights", str(osnet), "--batch-size", "16"], args.repeats, tmp))
        # No published weights reach this machine: randomly initialised networks of the
        # same architecture cost the same compute. Their boxes are arbitrary and labelled
        # with whatever class the random head favours, so every COCO class is kept and
        # boxes are capped at 8 a frame (a busy highway frame): both ways then embed the
        # same 8 crops a frame.
        detector_pt = Path(tmp) / "ssdlite.pt"
        embedder_pt = Path(tmp) / "densenet201_veri.pt"
        torch.manual_seed(0)
        torch.save(build_detector("ssdlite320_mobilenet_v3_large", pretrained=False,
                                  min_score=0.0).model.state_dict(), detector_pt)
        torch.save(build_embedder("densenet201_veri", pretrained=False).model.state_dict(),
                   embedder_pt)
        options = {"min_score": 0.0, "max_detections": 8, "classes": COCO_80}
        frames_dir, paths = subset(args.torch_frames, tmp)
        rows.extend(bench(
            "SSDlite320-MobileNetV3 + DenseNet201-VeRi (torch)", frames_dir, paths,
            build_detector("ssdlite320_mobilenet_v3_large", str(detector_pt), **options),
            build_embedder("densenet201_veri", str(embedder_pt)),
            ["--detector", "ssdlite320_mobilenet_v3_large", "--detector-weights",
             str(detector_pt), "--embedder", "densenet201_veri", "--embedder-weights",
             str(embedder_pt), "--min-score", "0", "--max-detections", "8",
             "--classes", ",".join(COCO_80),
             "--batch-size", "8"], args.repeats, tmp))
    lines = ["| models | frames | crops | `cctview extract` frames/s | CCTView's way frames/s "
             "| ratio |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append("| %s | %d | %d | %.2f | %.2f | %.2fx |" % (
            r["name"], r["frames"], r["crops"], r["ours"], r["cctview"], r["ratio"]))
    table = "\n".join(lines)
    print(table)
    for r in rows:
        print("%s: ours %s, CCTView's way %s; %s" % (
            r["name"], ["%.2f" % v for v in r["runs_ours"]],
            ["%.2f" % v for v in r["runs_cctview"]], r["summary"]))
    runs = " ".join("Runs, frames/s (%s): ours %s; CCTView's way %s." % (
        r["name"], ", ".join("%.2f" % v for v in r["runs_ours"]),
        ", ".join("%.2f" % v for v in r["runs_cctview"])) for r in rows)
    if args.record:
        record_section("Extraction", "\n".join([
            "Machine: %s." % machine(),
            "Command: `.venv/bin/python %s` (median of %d runs each; both ways on the "
            "same frames, models and weights, in the same run, alternating)." % (
                " ".join(["benchmarks/extract.py"] + list(
                    sys.argv[1:] if argv is None else argv)), args.repeats),
            "`cctview extract` time is the whole command's wall time (Beam start-up, "
            "listing, decoding, batched RunInference with roi_align crops, Parquet); "
            "CCTView's way is one frame per detector call, PIL crops, one crop per "
            "embedder call. The torch pair uses randomly initialised weights of the same "
            "architectures (no published weights reach this machine), every COCO class "
            "and at most 8 boxes per frame. \"2 bundles at once\" adds "
            "`--direct_num_workers 2 --direct_running_mode multi_threading`: each model "
            "call then gets one core (`--model-threads` decided from the runner); "
            "CCTView's way runs the same sessions with their default threads (every core).",
            "", table, "", runs]))


if __name__ == "__main__":
    main()
