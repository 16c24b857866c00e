"""Do two trees give the same outputs on the shared data? (refactors must not change them)

Runs, with this tree and with ``--baseline REF`` (a ``git archive`` copy):
  run       : the first ``--frames`` frames of each shared camera, YOLOX-Nano + OSNet
              (ONNX), mutual nearest neighbours;
  calibrate : the three shared reference files (CCTView's detections and embeddings);
  match     : the same files with those links, the learned default.
and compares every table (detections, matches, dead letters; rows as sets, every common
column) and links.json. Exits 1 when anything differs.

  .venv/bin/python benchmarks/same_outputs.py --baseline 2bd2267
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
FRAMES = SHARED / "data" / "nyc-fdr" / "frames"
REFERENCE = SHARED / "data" / "nyc-fdr" / "reference"
MODELS = SHARED / "models"
TABLES = ("run/detections", "run/matches", "run/dead_letter", "learned/matches")

from benchmarks.match import git_copy  # noqa: E402


def frame_subset(dest: Path, per_camera: int) -> Path:
    """The first ``per_camera`` frames of every shared camera, linked in their layout."""
    for camera in sorted(p.name for p in FRAMES.iterdir()):
        for path in sorted(glob.glob(str(FRAMES / camera / "**" / "*.jpeg"),
                                     recursive=True))[:per_camera]:
            link = dest / os.path.relpath(path, FRAMES)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return dest


def commands(frames: Path, out: Path) -> list:
    references = sorted(map(str, REFERENCE.glob("*.parquet")))
    return [
        ["run", "--input", str(frames), "--timezone", "America/New_York",
         "--detector", "yolox", "--detector-weights", str(MODELS / "yolox_nano.onnx"),
         "--embedder", "onnx", "--embedder-weights", str(MODELS / "osnet_x0_25.onnx"),
         "--output", str(out / "run")],
        ["calibrate", "--detections", *references, "--output", str(out / "links.json")],
        ["match", "--detections", *references, "--links", str(out / "links.json"),
         "--output", str(out / "learned")],
    ]


def run_tree(tree: Path, frames: Path, out: Path) -> None:
    """Every command with the CLI of ``tree`` (its sources first on the path)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    entry = "import sys; from pipelines.cli import main; sys.exit(main())"
    for argv in commands(frames, out):
        done = subprocess.run([sys.executable, "-c", entry, *argv], cwd=str(tree), env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit("%s failed in %s:\n%s" % (argv[0], tree, done.stderr[-3000:]))
        print("%s (%s): %s" % (argv[0], tree.name, done.stdout.strip().splitlines()[-1]),
              flush=True)


def table(folder: Path):
    """Every Parquet file below ``folder`` as one table, or None if there is none."""
    files = sorted(glob.glob(str(folder / "**" / "*.parquet"), recursive=True))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def compare(new: Path, old: Path) -> list:
    """(line, equal?) per table and for links.json."""
    results = []
    for name in TABLES:
        a, b = table(new / name), table(old / name)
        if a is None or b is None:
            both = a is None and b is None
            results.append(("%s: %s" % (name, "absent in both" if both else "MISSING in one"),
                            both))
            continue
        columns = sorted(set(a.column_names) & set(b.column_names))
        dump = [sorted(json.dumps(r, sort_keys=True, default=str)
                       for r in t.select(columns).to_pylist()) for t in (a, b)]
        only = sorted(set(a.column_names) ^ set(b.column_names))
        results.append(("%s: %d rows vs %d, %s%s" % (
            name, len(dump[0]), len(dump[1]), "equal" if dump[0] == dump[1] else "DIFFER",
            "; columns in one only: %s" % only if only else ""), dump[0] == dump[1]))
    links = [json.loads((d / "links.json").read_text()) for d in (new, old)]
    results.append(("links.json: %s" % ("equal" if links[0] == links[1] else "DIFFER"),
                    links[0] == links[1]))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, metavar="GITREF")
    parser.add_argument("--frames", type=int, default=60, help="frames per camera")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="same-outputs-") as tmp:
        tmp = Path(tmp)
        frames = frame_subset(tmp / "frames", args.frames)
        (tmp / "baseline").mkdir()
        baseline = git_copy(args.baseline, tmp / "baseline")
        run_tree(REPO, frames, tmp / "new")
        run_tree(baseline, frames, tmp / "old")
        results = compare(tmp / "new", tmp / "old")
    print("\n".join(line for line, _ in results))
    return 0 if all(equal for _, equal in results) else 1


if __name__ == "__main__":
    sys.exit(main())
