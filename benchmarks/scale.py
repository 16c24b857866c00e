"""`cctview match` and `calibrate` over long periods: memory, time and the floor, at scale.

Inputs come from `cctview scale-world` (stored detections of N cameras x H hours built
from the shared reference files, 1920-d float16 embeddings, planted links; see
pipelines/scale_world.py), made once per size under ``--work``. For each size and
command the benchmark runs the command as a user does (the installed console script,
default DirectRunner) and measures its whole process tree (benchmarks/proctree.py):
wall, CPU (user + system) and peak RSS. In the same run it measures

  floor   : seconds per distance cell of one dense float32 distance product (1024 x
            4096 real embeddings, the faster of numpy and torch; benchmarks/match.py);
            the floor of a command = its candidate_pairs counter x that;
  cctview : CCTView's per-pair way (a torch tensor from each embedding's Python list,
            then torch.norm), seconds per pair on a sample of candidate pairs;
  baseline: with ``--baseline REF``, the same commands of that commit (a `git archive`
            copy), killed when its tree holds more than ``--rss-limit`` GB.

Sizes: 5x1h, 10x2h and 10x4h (no links, mutual, +-300 s; calibrate +-300 s), 50x1h
(match with the planted links; calibrate of the planted links' camera pairs, ``--pairs``,
+-300 s: all 1,225 pairs of 50 cameras is a city's N^2, not the cost of one link). Prints a Markdown table; ``--record`` replaces the
"## Scale" section of BENCHMARKS.md.

  .venv/bin/python benchmarks/scale.py --baseline 2e26099 --record
"""
import argparse
import glob
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REFERENCE = REPO.parent / "shared" / "data" / "nyc-fdr" / "reference"

from benchmarks.match import cctview_calc_med, floor_way, git_copy  # noqa: E402
from benchmarks.proctree import run as run_tree  # noqa: E402
from benchmarks.record import machine, record_section  # noqa: E402

SIZES = {"5x1h": (5, 1.0), "10x2h": (10, 2.0), "10x4h": (10, 4.0), "50x1h": (50, 1.0)}
MATCH_FLAGS = ["--policy", "mutual", "--max-gap", "300"]


def world(work: Path, name: str) -> Path:
    """The scale world ``name``, made once (its files are reused by later runs)."""
    cameras, hours = SIZES[name]
    folder = work / name
    if not (folder / "links_truth.json").exists():
        subprocess.run([str(REPO / ".venv/bin/cctview"), "scale-world", "--reference",
                        *map(str, sorted(REFERENCE.glob("*.parquet"))), "--cameras",
                        str(cameras), "--hours", str(hours), "--output", str(folder)],
                       check=True)
    return folder


def command_argv(command: str, folder: Path, out: Path, tree: Path) -> list:
    files = sorted(glob.glob(str(folder / "*" / "*.parquet")))
    if tree == REPO:
        head = [str(REPO / ".venv/bin/cctview")]
    else:
        head = [str(REPO / ".venv/bin/python"), "-c",
                "import sys; from pipelines.cli import main; sys.exit(main())"]
    if command in ("calibrate", "calibrate_pairs"):
        pairs = ["--pairs", str(folder / "links_truth.json")] if command != "calibrate" else []
        return head + ["calibrate", "--detections", *files, "--output", str(out) + ".json",
                       "--max-gap", "300"] + pairs
    flags = MATCH_FLAGS if command == "match" else [
        "--policy", "mutual", "--links", str(folder / "links_truth.json")]
    return head + ["match", "--detections", *files, "--output", str(out)] + flags


def measure(command: str, folder: Path, out: Path, tree: Path, rss_limit: float) -> dict:
    env = dict(os.environ)
    if tree != REPO:
        env["PYTHONPATH"] = str(tree)
    m = run_tree(command_argv(command, folder, out, tree), cwd=str(tree), env=env,
                 rss_limit=int(rss_limit * 2 ** 30))
    if m.killed_over_limit:
        return {"wall": m.wall_s, "cpu": m.cpu_s, "rss": m.peak_rss_bytes, "killed": True}
    if m.returncode != 0:
        raise RuntimeError("%s failed (%s):\n%s" % (command, tree, m.stderr[-3000:]))
    counters = {}
    for line in m.stdout.splitlines():
        if line.startswith("done:"):
            counters = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    return {"wall": m.wall_s, "cpu": m.cpu_s, "rss": m.peak_rss_bytes, "killed": False,
            "counters": counters, "stderr": m.stderr}


def sample_embeddings(folder: Path, count: int = 8192) -> np.ndarray:
    """Real embeddings of the world (two files), for the floor and CCTView's way."""
    rows = []
    for path in sorted(glob.glob(str(folder / "*" / "*.parquet")))[:2]:
        column = pq.read_table(path, columns=["embedding"])["embedding"].combine_chunks()
        rows.append(column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1))
    return np.concatenate(rows)[:count].astype(np.float32)


def cctview_per_pair(emb: np.ndarray, pairs: int = 2000) -> float:
    rng = random.Random(0)
    lists = [emb[i].tolist() for i in range(min(len(emb), 4000))]
    chosen = [(rng.randrange(len(lists)), rng.randrange(len(lists))) for _ in range(pairs)]
    started = time.perf_counter()
    for i, j in chosen:
        cctview_calc_med(lists[i], lists[j])
    return (time.perf_counter() - started) / pairs


def table(rows: list) -> str:
    lines = ["| input | command | tree | wall s | CPU s | peak RSS GB | candidate pairs | "
             "wall / floor | CCTView's way / wall | copies per embedding shuffled | "
             "row references shuffled per detection | stored rows read per detection | "
             "shuffled GB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for r in rows:
        if r["killed"]:
            lines.append("| %s | %s | %s | >%.0f (killed) | %.0f | >%.1f (killed) | | | | | | | |" % (
                r["input"], r["command"], r["tree"], r["wall"], r["cpu"], r["rss"] / 2 ** 30))
            continue
        c = r["counters"]
        pairs = c.get("candidate_pairs", 0)
        floor = pairs * r["floor_per_cell"]
        per_detection = [
            "%.2f" % (c[name] / c["detections_batched"])
            if c.get("detections_batched") and name in c else ""
            for name in ("embedding_copies_shuffled", "row_references_shuffled",
                         "stored_rows_read")]
        if per_detection[0] == "" and per_detection[1] != "":  # counted, none shuffled
            per_detection[0] = "0.00"
        lines.append("| %s | %s | %s | %.1f | %.1f | %.2f | %s | %s | %s | %s | %s | %s | %s |" % (
            r["input"], r["command"], r["tree"], r["wall"], r["cpu"], r["rss"] / 2 ** 30,
            "{:,}".format(pairs) if pairs else "", "%.1fx" % (r["wall"] / floor) if pairs else "",
            "%.0fx" % (pairs * r["cctview_per_pair"] / r["wall"]) if pairs else "",
            *per_detection,
            "%.2f" % (c["shuffled_bytes"] / 2 ** 30) if "shuffled_bytes" in c else ""))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cctview-scale"),
                        help="where the scale worlds are made and kept")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--runs", type=int, default=1, help="rounds per size (medians)")
    parser.add_argument("--baseline", metavar="GITREF",
                        help="also run the commands of this commit, in the same rounds")
    parser.add_argument("--rss-limit", type=float, default=16.0,
                        help="GB at which a run's process tree is killed (default 16)")
    parser.add_argument("--commands", nargs="+",
                        choices=("match", "calibrate", "match_links", "calibrate_pairs"),
                        help="only these commands (default: match and calibrate, and for "
                             "50x1h match --links and calibrate --pairs)")
    parser.add_argument("--record", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    plan = []
    for name in args.sizes:
        commands = (["match_links", "calibrate_pairs"] if name == "50x1h"
                    else ["match", "calibrate"])
        plan += [(name, c) for c in commands if not args.commands or c in args.commands]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        trees = [("this", REPO)]
        if args.baseline:
            (tmp / "baseline").mkdir()
            trees.append((args.baseline, git_copy(args.baseline, tmp / "baseline")))
        emb = sample_embeddings(world(work, args.sizes[0]))
        for name, command in plan:
            folder = world(work, name)
            results = {label: [] for label, _ in trees}
            floors, cctview = [], []
            for i in range(args.runs):
                steps = [("floor", None)] + [("tree", t) for t in trees]
                random.Random(i).shuffle(steps)
                for kind, tree in steps:
                    if kind == "floor":
                        floors.append(floor_way(emb[:1024], emb[1024:5120]))
                        cctview.append(cctview_per_pair(emb))
                        continue
                    label, path = tree
                    out = tmp / ("out-%s-%s-%s" % (label, name, command))
                    results[label].append(measure(command, folder, out, path, args.rss_limit))
            for label, _ in trees:
                runs = results[label]
                best = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]
                rows.append(dict(best, input=name, command=command.replace("_", " --"),
                                 tree=label, floor_per_cell=statistics.median(floors),
                                 cctview_per_pair=statistics.median(cctview)))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    body = table(rows)
    print(body)
    if args.record:
        record_section("Scale", "\n\n".join([
            "Written by `benchmarks/scale.py` (command: `%s`). Machine: %s." % (
                " ".join(["benchmarks/scale.py"] + (argv if argv is not None else sys.argv[1:])),
                machine()),
            "Inputs: `cctview scale-world` from the three shared reference files (real "
            "1920-d float16 embeddings at their real density, about 15,800 detections per "
            "camera-hour, planted links between consecutive cameras). `match`: `--policy "
            "mutual --max-gap 300`, no links; `calibrate`: `--max-gap 300`; `match --links`: "
            "the planted links; `calibrate --pairs`: the planted links' camera pairs, "
            "`--max-gap 300`. Default DirectRunner; peak RSS of the whole process tree. "
            "The floor is the command's candidate pairs times the per-cell time of a dense "
            "float32 distance product measured in the same run; CCTView's way is its "
            "per-pair torch distance, measured in the same run.",
            body]))


if __name__ == "__main__":
    main()
