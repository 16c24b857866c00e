"""How much batching alone can speed up each embedder on this machine.

Milliseconds per crop at batch sizes 1, 4 and 16 through ``Embedder._embed`` (the
network only: no cropping, no Beam), median of ``--runs`` runs, for OSNet x0.25 (the
shared ONNX file) and DenseNet201-VeRi (randomly initialised: the same compute as
CCTView's checkpoint). CCTView's way embeds at batch 1, so the best batched cost over
the batch-1 cost bounds what any schedule of the same network gains on the embedding
share of the work. Prints a Markdown table and, with --record, replaces the
"## Embedder batching" section of BENCHMARKS.md.

  .venv/bin/python benchmarks/embed_batching.py --record
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = REPO.parent / "shared" / "models"

from benchmarks.record import machine, record_section  # noqa: E402
from models.registry import build_embedder  # noqa: E402

BATCHES = (1, 4, 16)


def per_crop_ms(embedder, runs: int, crops: int = 16) -> dict:
    """Median ms per crop for each batch size, on ``crops`` random crops (normalised as the
    embedder's preprocessing does)."""
    torch.manual_seed(0)
    x = embedder.preprocess.normalise(torch.rand((crops, 3) + embedder.input_size))
    out = {}
    with torch.inference_mode():
        for size in BATCHES:
            embedder._embed(x[:size])  # warm-up: allocations, kernel choice
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                for i in range(0, crops, size):
                    embedder._embed(x[i:i + size])
                times.append((time.perf_counter() - started) * 1000 / crops)
            out[size] = statistics.median(times)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args(argv)
    embedders = [("OSNet x0.25 (ONNX)", build_embedder("onnx", str(MODELS / "osnet_x0_25.onnx"))),
                 ("DenseNet201-VeRi (torch)", build_embedder("densenet201_veri", pretrained=False))]
    lines = ["| embedder | input | " + " | ".join("batch %d ms/crop" % b for b in BATCHES)
             + " | batch 1 / best batched |",
             "| --- | --- | " + " | ".join("---:" for _ in BATCHES) + " | ---: |"]
    for name, embedder in embedders:
        ms = per_crop_ms(embedder, args.runs)
        best = min(ms[b] for b in BATCHES[1:])
        lines.append("| %s | %dx%d | %s | %.2fx |" % (
            name, embedder.input_size[0], embedder.input_size[1],
            " | ".join("%.1f" % ms[b] for b in BATCHES), ms[1] / best))
    table = "\n".join(lines)
    print(table)
    if args.record:
        record_section("Embedder batching", "\n".join([
            "Machine: %s; torch threads %d." % (machine(), torch.get_num_threads()),
            "Command: `.venv/bin/python %s` (median of %d runs; the network only, "
            "random crops)." % (" ".join(["benchmarks/embed_batching.py"] + list(
                sys.argv[1:] if argv is None else argv)), args.runs),
            "", table]))


if __name__ == "__main__":
    main()
