"""Time per candidate pair of `cctview match`, against CCTView's way and the matmul floor.

All three measured in the same run, round after round (the machine may be shared, so
every round measures all of them under the same load, and the table gives medians):

  command  : `cctview match` over CCTView's three reference files, whole wall time
             (Python and Beam start-up, Parquet in and out, the DirectRunner) divided
             by the `candidate_pairs` counter the command prints;
  cctview  : CCTView's way (its `calc_med`, code/cctview/match.py): per pair, a
             `torch.FloatTensor` from each embedding's Python list, then
             `torch.norm(p - q).item()`, on a random sample of the same candidate pairs
             (feature lists already in memory: JSON loading not counted);
  floor    : one dense float32 matrix-product distance computation (|q|^2 + |r|^2 -
             2 q.r, sqrt) over 4096 x 8192 of the same embeddings, numpy and torch, the
             faster per distance cell;
  bounds   : what no Beam job over these files avoids: the smallest Beam job (import,
             a one-element pipeline, its own process) and pyarrow decoding the columns
             matching needs; with the floor for every candidate pair, the least any
             Beam job over these files can take.

Optionally also the command of an older commit (``--baseline REF``, run from a
``git archive`` copy) and the command on 5 detections (``--fixed``: what start-up,
imports and the pipeline cost with no data). Prints a Markdown table and, with
``--record``, replaces the "## Matching" section of BENCHMARKS.md.

  .venv/bin/python benchmarks/match.py --runs 5 --baseline 1a9466c --fixed --record
"""
import argparse
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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REFERENCE = REPO.parent / "shared" / "data" / "nyc-fdr" / "reference"
FLAGS = ["--timezone", "America/New_York", "--max-gap", "300", "--policy", "mutual"]
MAX_GAP_MS = 300_000

from benchmarks.record import machine, record_section  # noqa: E402


# ----------------------------------------------------------------- the command
def command_line(files, out, cwd=REPO):
    """This tree: the installed console script, exactly as a user runs it; another tree
    (``--baseline``): the same entry point imported from that folder."""
    args = ["match", "--detections"] + [str(f) for f in files] + ["--output", str(out)] + FLAGS
    if cwd == REPO:
        return [str(REPO / ".venv/bin/cctview")] + args
    return [str(REPO / ".venv/bin/python"), "-c",
            "import sys; from pipelines.cli import main; sys.exit(main())"] + args


TIME = "/usr/bin/time"


def run_child(argv, cwd, env):
    """(wall seconds, peak RSS bytes or None, exit status, stdout, stderr) of a command.

    The peak RSS comes from GNU time wrapped around the command when it is installed: a
    child's own rusage would start from this process's resident size (Linux keeps the
    pre-exec high-water mark), and this process holds the benchmark's data."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        wrapped = os.access(TIME, os.X_OK)
        full = [TIME, "-f", "%M", "-o", rss_file.name] + argv if wrapped else argv
        started = time.perf_counter()
        proc = subprocess.run(full, cwd=str(cwd), env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        rss = None
        if wrapped:
            lines = [l for l in rss_file.read().split() if l.isdigit()]
            rss = int(lines[-1]) * 1024 if lines else None
    return seconds, rss, proc.returncode, proc.stdout, proc.stderr


def command(files, out, cwd=REPO):
    """(wall seconds, peak RSS bytes, counters) of one `cctview match` run from ``cwd``."""
    env = dict(os.environ)
    if cwd != REPO:
        env["PYTHONPATH"] = str(cwd)
    seconds, rss, rc, stdout, stderr = run_child(command_line(files, out, cwd), cwd, env)
    if rc != 0:
        raise RuntimeError("cctview match failed (%s):\n%s" % (cwd, stderr[-3000:]))
    done = [l for l in stdout.splitlines() if l.startswith("done:")]
    counters = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", done[-1] if done else "")}
    return seconds, rss, counters


# ------------------------------------------------------------------------ data
def load(files):
    """camera ids, UTC ms, float32 (n, 1920) embeddings of the reference files."""
    tables = [pq.read_table(f, columns=["camera_id", "frame_ts", "embedding"]) for f in files]
    t = pa.concat_tables(tables)
    ts = (pc.assume_timezone(t["frame_ts"], "America/New_York")
          .cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy())
    column = t["embedding"].combine_chunks()
    emb = (column.flatten().to_numpy(zero_copy_only=False)
           .reshape(len(t), column.type.list_size).astype(np.float32))
    return np.asarray(t["camera_id"].to_pylist()), ts, emb


def sample_pairs(cams, ts, count, seed=0):
    """``count`` random candidate pairs (different cameras, 0 < |dt| <= 300 s)."""
    rng = random.Random(seed)
    order = np.argsort(ts, kind="stable")
    sts = ts[order]
    pairs = []
    while len(pairs) < count:
        i = int(order[rng.randrange(len(order))])
        lo = np.searchsorted(sts, ts[i] - MAX_GAP_MS, "left")
        hi = np.searchsorted(sts, ts[i] + MAX_GAP_MS, "right")
        j = int(order[rng.randrange(lo, hi)])
        if cams[i] != cams[j] and ts[i] != ts[j]:
            pairs.append((i, j))
    return pairs


# ------------------------------------------------------------- CCTView's way
def cctview_calc_med(p_data, q_data):
    """CCTView's per-pair distance (code/cctview/match.py, calc_med): tensors built
    from the two Python lists, then the norm of their difference."""
    return torch.norm(torch.FloatTensor(p_data) - torch.FloatTensor(q_data)).item()


def cctview_way(features, pairs):
    """Seconds per pair over ``pairs`` of feature lists."""
    started = time.perf_counter()
    for i, j in pairs:
        cctview_calc_med(features[i], features[j])
    return (time.perf_counter() - started) / len(pairs)


# ---------------------------------------------------------------------- floor
def floor_numpy(q, r):
    qn = np.einsum("ij,ij->i", q, q)
    rn = np.einsum("ij,ij->i", r, r)
    d = q @ r.T
    d *= -2.0
    d += qn[:, None]
    d += rn[None, :]
    np.maximum(d, 0.0, out=d)
    return np.sqrt(d, out=d)


def floor_torch(q, r):
    qn = (q * q).sum(1, keepdim=True)
    rn = (r * r).sum(1)
    d = torch.addmm(qn + rn, q, r.T, beta=1.0, alpha=-2.0)
    return d.clamp_(min=0.0).sqrt_()


def floor_way(q, r, repeats=3):
    """Seconds per distance cell: the faster of numpy and torch, best of ``repeats``."""
    tq, tr = torch.from_numpy(q), torch.from_numpy(r)
    best = float("inf")
    for fn, args in ((floor_numpy, (q, r)), (floor_torch, (tq, tr))):
        fn(*args)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - started)
    return best / (q.shape[0] * r.shape[0])


# ------------------------------------------------------------- lower bounds
BEAM_MINIMUM = ("import apache_beam as beam\n"
                "with beam.Pipeline() as p:\n"
                "    p | beam.Create([0]) | beam.Map(abs)\n")


def beam_minimum():
    """Wall seconds of the smallest Beam job (import, one-element DirectRunner pipeline):
    what any Beam command pays before it reads a byte."""
    seconds, _, rc, _, stderr = run_child([sys.executable, "-c", BEAM_MINIMUM], REPO,
                                          dict(os.environ))
    if rc != 0:
        raise RuntimeError("the minimal Beam job failed:\n" + stderr[-2000:])
    return seconds


def read_files(files):
    """Wall seconds for pyarrow alone to decode the columns matching needs from ``files``
    (in record batches of 4096 rows, as the command reads them)."""
    started = time.perf_counter()
    for path in files:
        for _ in pq.ParquetFile(path).iter_batches(
                batch_size=4096, columns=["camera_id", "frame_ts", "detection_id", "embedding"]):
            pass
    return time.perf_counter() - started


# ----------------------------------------------------------------------- main
def git_copy(ref, dest):
    """``ref`` of this repository as a plain folder (git archive; the repo is untouched)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def measure_rounds(args, files, pairs, features, q, r) -> tuple:
    """Every step of every round, in a shuffled order per round -> (results: lists of
    seconds and RSS per step, the counters of the command's runs)."""
    results = {"command": [], "rss": [], "cctview": [], "floor": [], "baseline": [],
               "baseline_rss": [], "fixed": [], "fixed_rss": [], "beam": [], "read": []}
    all_counters = []
    with tempfile.TemporaryDirectory(prefix="bench-match-") as tmp:
        tmp = Path(tmp)
        base_dir = None
        if args.baseline:
            (tmp / "baseline").mkdir()
            base_dir = git_copy(args.baseline, tmp / "baseline")
        tiny = tmp / "five.parquet"
        pq.write_table(pq.read_table(files[0]).slice(0, 5), tiny)
        for i in range(args.runs):
            steps = ["command", "cctview", "floor", "beam", "read"] + (
                ["baseline"] if base_dir else []) + (["fixed"] if args.fixed else [])
            random.Random(i).shuffle(steps)
            for step in steps:
                run_step(step, results, all_counters, files, tmp, base_dir, tiny,
                         pairs, features, q, r)
            print("round %d: command %.2f s, CCTView %.1f us/pair, floor %.4f us/cell%s%s" % (
                i + 1, results["command"][-1], results["cctview"][-1] * 1e6,
                results["floor"][-1] * 1e6,
                ", baseline %.2f s" % results["baseline"][-1] if base_dir else "",
                ", 5 detections %.2f s" % results["fixed"][-1] if args.fixed else ""),
                flush=True)
    return results, all_counters


def run_step(step, results, all_counters, files, tmp, base_dir, tiny, pairs, features, q, r):
    """One timed step of a round, appended to ``results``."""
    if step == "command":
        seconds, rss, counters = command(files, tmp / "out")
        all_counters.append(counters)
        results["command"].append(seconds)
        results["rss"].append(rss)
    elif step == "baseline":
        seconds, rss, base_counters = command(files, tmp / "out-base", base_dir)
        if all_counters and base_counters.get("candidate_pairs") != all_counters[-1].get(
                "candidate_pairs"):
            raise RuntimeError("baseline counted other candidate pairs")
        results["baseline"].append(seconds)
        results["baseline_rss"].append(rss)
    elif step == "fixed":
        seconds, rss, _ = command([tiny], tmp / "out-five")
        results["fixed"].append(seconds)
        results["fixed_rss"].append(rss)
    elif step == "beam":
        results["beam"].append(beam_minimum())
    elif step == "read":
        results["read"].append(read_files(files))
    elif step == "cctview":
        results["cctview"].append(cctview_way(features, pairs))
    else:
        results["floor"].append(floor_way(q, r))


def _gb(v):
    return "n/a" if v is None else "%.1f GB" % (v / 2 ** 30)


def _rss_median(results, key):
    values = [v for v in results[key] if v is not None]
    return statistics.median(values) if values else None


def table_rows(args, results, all_counters, med, n_pairs, n_cctview, dim) -> list:
    """(what, seconds per candidate pair, compared with CCTView and the floor?, note)."""
    per_pair = med["command"] / n_pairs
    rows = [("`cctview match`, end to end (this tree)", per_pair, True,
             "%.2f s wall, peak RSS %s" % (med["command"], _gb(_rss_median(results, "rss"))))]
    if args.baseline:
        rows.append(("`cctview match`, end to end (commit %s)" % args.baseline,
                     med["baseline"] / n_pairs, True, "%.2f s wall, peak RSS %s" % (
                         med["baseline"], _gb(_rss_median(results, "baseline_rss")))))
    if args.fixed:
        rows.append(("start-up alone: the same command on 5 detections (its time / the "
                     "full run's pairs)", med["fixed"] / n_pairs, False,
                     "%.2f s wall, peak RSS %s" % (med["fixed"],
                                                   _gb(_rss_median(results, "fixed_rss")))))
        rows.append(("end to end minus start-up (this tree, derived)",
                     (med["command"] - med["fixed"]) / n_pairs, True,
                     "%.2f s" % (med["command"] - med["fixed"])))
    compute_ms = [c["block_compute_ms"] for c in all_counters if "block_compute_ms" in c]
    if compute_ms:
        rows.append(("inside the command: its block computation alone (`block_compute_ms` "
                     "counter)", statistics.median(compute_ms) / 1000 / n_pairs, True,
                     "%.2f s; %d distance cells computed for the %d candidates" % (
                         statistics.median(compute_ms) / 1000,
                         all_counters[-1].get("distance_cells", 0), n_pairs)))
    rows.append(("lower bound: the smallest Beam job (import, a one-element pipeline)",
                 med["beam"] / n_pairs, False, "%.2f s wall" % med["beam"]))
    rows.append(("lower bound: pyarrow alone decoding the files' columns that matching needs",
                 med["read"] / n_pairs, False, "%.2f s wall" % med["read"]))
    bound = med["beam"] + med["read"] + med["floor"] * n_pairs
    rows.append(("lower bound of any Beam job over these files: the two above + the floor "
                 "for every candidate pair", bound / n_pairs, True, "%.2f s" % bound))
    rows.append(("CCTView's way (`calc_med` per pair, sample of %d pairs)" % n_cctview,
                 med["cctview"], True, "torch %s" % torch.__version__))
    rows.append(("floor: one float32 matmul distance computation, per cell", med["floor"],
                 True, "4096 x 8192 x %d" % dim))
    return rows


def markdown_table(rows, cct, floor) -> str:
    lines = ["| what | us per candidate pair | speedup vs CCTView's way | ratio to floor "
             "| notes |", "| --- | ---: | ---: | ---: | --- |"]
    for name, value, compare, note in rows:
        if compare:
            lines.append("| %s | %.4f | %.0fx | %.1fx | %s |" % (
                name, value * 1e6, cct / value, value / floor, note))
        else:
            lines.append("| %s | %.4f | - | - | %s |" % (name, value * 1e6, note))
    return "\n".join(lines)


def verdict_text(med, all_counters, n_pairs) -> str:
    cct, floor, per_pair = med["cctview"], med["floor"], med["command"] / n_pairs
    speedup, ratio = cct / per_pair, per_pair / floor
    bound = med["beam"] + med["read"] + floor * n_pairs
    verdict = ("Targets: at least 1000x CCTView's way per candidate pair end to end: %s "
               "(%.0fx); within 3x of the floor: %s (%.1fx)." % (
                   "met" if speedup >= 1000 else "NOT met", speedup,
                   "met" if ratio <= 3 else "NOT met", ratio))
    verdict += (" No Beam job over these files gets closer than %.1fx the floor: Beam's "
                "smallest job and decoding the files' embeddings already take %.2f s, 3x "
                "the floor is %.2f s." % (bound / n_pairs / floor, med["beam"] + med["read"],
                                          3 * floor * n_pairs))
    compute_ms = [c["block_compute_ms"] for c in all_counters if "block_compute_ms" in c]
    if compute_ms:
        verdict += (" The block computation inside the command alone: %.1fx the floor per "
                    "candidate pair; the rest of the wall time is start-up, Parquet and "
                    "the runner moving the embeddings between stages." % (
                        statistics.median(compute_ms) / 1000 / n_pairs / floor))
    return verdict


def runs_text(results) -> str:
    return "Runs (s): command %s%s; CCTView's way (us/pair) %s; floor (us/cell) %s." % (
        ", ".join("%.2f" % v for v in results["command"]),
        ("; baseline " + ", ".join("%.2f" % v for v in results["baseline"]))
        if results["baseline"] else "",
        ", ".join("%.1f" % (v * 1e6) for v in results["cctview"]),
        ", ".join("%.4f" % (v * 1e6) for v in results["floor"]))


def record(argv_shown, args, files, n_pairs, counters, n_cctview, table, verdict, runs):
    record_section("Matching", "\n".join([
        "Machine: %s (nproc %d)." % (machine(), os.cpu_count() or 0),
        "Command: `.venv/bin/python %s`: %d rounds, each timing every row below in "
        "random order under the same load; medians." % (argv_shown, args.runs),
        "Timed command: `.venv/bin/cctview match --detections %s --output OUT %s`, "
        "the whole wall time "
        "(Python and Beam start-up, Parquet in and out, DirectRunner) divided by the "
        "`candidate_pairs` counter it prints (%d; %s matches)." % (
            " ".join("DATA/nyc-fdr/reference/%s" % f.name for f in files),
            " ".join(FLAGS), n_pairs, counters.get("matches_emitted")),
        "CCTView's way: its `calc_med` (a `torch.FloatTensor` from each embedding's "
        "Python list, then `torch.norm(p - q).item()`) on %d random candidate pairs "
        "of the same files, feature lists already in memory. Floor: the faster of "
        "numpy and torch computing `sqrt(|q|^2 + |r|^2 - 2 q.r)` for 4096 x 8192 of "
        "the same embeddings in float32, per distance cell." % n_cctview,
        "", table, "", verdict, "", runs]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (medians are reported)")
    parser.add_argument("--sample-pairs", type=int, default=2000,
                        help="candidate pairs timed CCTView's way per round")
    parser.add_argument("--baseline", metavar="GITREF",
                        help="also time the command of this commit, in the same rounds")
    parser.add_argument("--fixed", action="store_true",
                        help="also time the command on 5 detections (start-up cost)")
    parser.add_argument("--record", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args(argv)

    files = sorted(REFERENCE.glob("*.parquet"))
    if len(files) != 3:
        sys.exit("expected the three reference files in %s" % REFERENCE)
    cams, ts, emb = load(files)
    pairs = sample_pairs(cams, ts, args.sample_pairs)
    # CCTView keeps each embedding as a Python list (its features JSON)
    features = {i: emb[i].tolist() for pair in pairs for i in pair}
    a, b = sorted(set(cams.tolist()))[0], sorted(set(cams.tolist()))[-1]
    q = np.ascontiguousarray(emb[cams == a][:4096])
    r = np.ascontiguousarray(emb[cams == b][:8192])
    if len(r) < 8192:
        r = np.ascontiguousarray(np.concatenate([r, emb[cams != b]])[:8192])
    dim = emb.shape[1]
    del emb

    results, all_counters = measure_rounds(args, files, pairs, features, q, r)
    counters = all_counters[-1]
    n_pairs = counters["candidate_pairs"]
    med = {k: statistics.median(v) for k, v in results.items() if v and "rss" not in k}
    rows = table_rows(args, results, all_counters, med, n_pairs, len(pairs), dim)
    table = markdown_table(rows, med["cctview"], med["floor"])
    verdict, runs = verdict_text(med, all_counters, n_pairs), runs_text(results)
    print(table)
    print("candidate_pairs=%d, matches_emitted=%s" % (n_pairs, counters.get("matches_emitted")))
    print(verdict)
    print(runs)
    if args.record:
        argv_shown = " ".join(["benchmarks/match.py"] + (argv if argv is not None
                                                         else sys.argv[1:]))
        record(argv_shown, args, files, n_pairs, counters, len(pairs), table, verdict, runs)


if __name__ == "__main__":
    main()
