"""cctview backfill: partition plan, context margins, commit markers, resume after kill -9,
pairs across partition boundaries.

The end-to-end tests share one uninterrupted backfill of a small synthetic world
(2 cameras, 3 minutes, one frame every 2 s) in 1-minute partitions, with the classical
backends (no weights). What is exact and checked here:

- the backfill's matches equal, row for row, ``cctview match`` over the backfill's own
  detections (any detector: matching reads stored detections only);
- a backfill killed with SIGKILL and run again ends with the same files and rows as the
  uninterrupted one;
- the margin rule (how far around a partition its matching must look) reproduces a
  single matching over the whole range for every policy, with and without links
  (in memory, on random detections), and the smaller margin the brief suggested
  (``max_gap``) does not for ``mutual``.

Detections of the ``background`` detector depend on the frames of the job that
estimated the background, so they are not compared with one whole-range ``run``.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import FRAMES, MODELS, require_shared
from pipelines import backfill, cli
from runners.errors import UsageError
from transforms.match_blocks import match_arrays

START, END = "2024-05-01T12:00:00", "2024-05-01T12:03:00"
RUN_FLAGS = ["--detector", "background", "--embedder", "color_histogram", "--max-gap", "25"]
PARTITIONS = ["20240501T120000Z-20240501T120100Z", "20240501T120100Z-20240501T120200Z",
              "20240501T120200Z-20240501T120300Z"]


def _args(world: Path, out: Path, *extra):
    return (["--input", str(world / "frames"), "--start", START, "--end", END,
             "--output", str(out), "--chunk", "1m"] + RUN_FLAGS + list(extra))


def _tables(out: Path, tables=("detections", "matches", "dead_letter")) -> dict:
    """Every row of the tables, sorted (dead letters without their failure time)."""
    rows = {}
    for table in tables:
        data = ds.dataset(out / table, partitioning="hive").to_table()
        if "ts" in data.column_names:
            data = data.drop(["ts"])
        rows[table] = sorted(repr(tuple(r.values())) for r in data.to_pylist())
    return rows


def _files(out: Path) -> list:
    return sorted(str(p.relative_to(out)) for t in ("detections", "matches", "dead_letter")
                  for p in (out / t).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    assert cli.main(["synth", "--output", str(root), "--cameras", "2", "--minutes", "3",
                     "--fps", "0.5"]) == 0
    # Two unusable inputs: a stray file that every partition of the hour lists (it must
    # be dead-lettered once), and a truncated frame of the second minute.
    stray = root / "frames" / "cam-01" / "2024" / "05" / "01" / "12" / "01" / "30" / "notes.txt"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text("not a frame")
    frame = sorted((root / "frames" / "cam-02" / "2024" / "05" / "01" / "12" / "01").rglob(
        "*.jpeg"))[0]
    frame.write_bytes(frame.read_bytes()[:200])
    return root


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One uninterrupted backfill; -> (output folder, its stdout)."""
    out = tmp_path_factory.mktemp("backfill") / "out"
    lines = []
    config, options = backfill.parse_args(_args(world, out))
    assert backfill.Backfill.from_options(config, options, say=lines.append).run() == 0
    return out, lines


# ------------------------------------------------------------------ plan and margins
def test_chunks_and_partitions_are_aligned_to_the_epoch():
    assert [backfill.parse_chunk(c) for c in ("15m", "1h", "6h", "1d", "2d")] == [
        900000, 3600000, 21600000, 86400000, 172800000]
    for bad in ("7m", "1w", "0h", "h", "-1h"):
        with pytest.raises(UsageError):
            backfill.parse_chunk(bad)
    hour = 3600000
    t0 = 1714564800000  # 2024-05-01T12:00Z
    plan = backfill.plan_partitions(t0 + 30 * 60000, t0 + 3 * hour + 60000, hour)
    assert [(p.start_ms - t0, p.end_ms - t0) for p in plan] == [
        (30 * 60000, hour), (hour, 2 * hour), (2 * hour, 3 * hour), (3 * hour, 3 * hour + 60000)]
    assert backfill.Partition.from_name(plan[0].name) == plan[0]
    assert plan[1].name == "20240501T130000Z-20240501T140000Z"


def _random_detections(seed: int, n: int = 500, span_ms: int = 600000):
    rng = np.random.default_rng(seed)
    return (rng.choice(["a", "b", "c"], n), np.sort(rng.integers(0, span_ms, n)),
            rng.normal(size=(n, 3)).astype(np.float32), ["d%04d" % i for i in range(n)])


def _as_set(matches):
    return {tuple(sorted(m.items())) for m in matches}


def _partitioned(cam, ts, emb, ids, margin_ms, span_ms, chunk_ms, **kw):
    """What a backfill computes: each partition matches its context, keeps what it owns."""
    out = []
    for p in backfill.plan_partitions(0, span_ms, chunk_ms):
        lo, hi = backfill.context_of(p, margin_ms, 0, span_ms)
        sel = (ts >= lo) & (ts < hi)
        got = match_arrays(cam[sel], ts[sel], emb[sel], [i for i, s in zip(ids, sel) if s], **kw)
        out += [m for m in got if p.start_ms <= m["frame_ts_a_ms"] < p.end_ms]
    return out


LINKS = [{"camera_a": "a", "camera_b": "b", "offset_s": 20.0, "spread_s": 10.0},
         {"camera_a": "b", "camera_b": "c", "offset_s": -15.0, "spread_s": 5.0}]


@pytest.mark.parametrize("policy, extra", [
    ("all", {"threshold": 1.0}), ("topk", {"top_k": 2}), ("mutual", {}),
    ("assignment", {"window_s": 30.0})])
@pytest.mark.parametrize("links", [None, LINKS], ids=["max_gap", "links"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_context_margin_reproduces_one_matching_over_the_range(policy, extra, links, seed):
    cam, ts, emb, ids = _random_detections(seed)
    kw = dict(policy=policy, max_gap_s=60.0, links=links, window_s=600.0)
    kw.update(extra)
    whole = match_arrays(cam, ts, emb, ids, **kw)
    margin = backfill.margin_ms(policy, 60.0, links, int(kw["window_s"] * 1000))
    parts = _partitioned(cam, ts, emb, ids, margin, 600000, 120000, **kw)
    assert len(parts) == len(whole) and _as_set(parts) == _as_set(whole)


def test_a_margin_of_max_gap_loses_or_invents_mutual_pairs():
    """Mutual neighbours need 2 x max_gap: b's own candidates decide whether it picks a."""
    cam, ts, emb, ids = _random_detections(0)
    kw = dict(policy="mutual", max_gap_s=60.0, window_s=600.0)
    whole = _as_set(match_arrays(cam, ts, emb, ids, **kw))
    assert _as_set(_partitioned(cam, ts, emb, ids, 60000, 600000, 120000, **kw)) != whole
    assert _as_set(_partitioned(cam, ts, emb, ids, 120000, 600000, 120000, **kw)) == whole


def test_reach_follows_links_and_unknown_policies_are_refused():
    from transforms.match_blocks import CandidateBands

    assert CandidateBands(300.0, None).reach_ms() == 300000
    assert CandidateBands(300.0, LINKS).reach_ms() == 30000  # 20 + 10 s; the gap is ignored
    assert backfill.margin_ms("mutual", 300.0, LINKS, 1000) == 60000
    with pytest.raises(UsageError):
        backfill.margin_ms("learned", 1.0, None, 1000)


# ------------------------------------------------------------------ end to end
def test_partitions_are_committed_with_markers_into_hive_tables(reference):
    out, lines = reference
    for name in PARTITIONS:
        assert (out / "_backfill" / name / "_EXTRACTED").is_file()
        assert (out / "_backfill" / name / "_SUCCESS").is_file()
    assert not (out / "_tmp").exists()
    files = _files(out)
    assert files and all(Path(f).name.split("-part-")[0] in PARTITIONS or
                         Path(f).name == "part-empty.parquet" for f in files)
    detections = ds.dataset(out / "detections", partitioning="hive").to_table()
    minutes = {ts.minute for ts in detections.column("frame_ts").to_pylist()}
    assert minutes == {0, 1, 2} and detections.num_rows > 100
    assert set(detections.column("hour").to_pylist()) == {12}
    dead = ds.dataset(out / "dead_letter").to_table().to_pylist()
    assert sorted(d["reason"] for d in dead) == ["corrupt_image", "unparseable_path"]
    assert (out / "dead_letter" / ("%s-part-00000.parquet" % PARTITIONS[0])).is_file()
    # One line per job (3 partitions: 3 jobs, the last one matching the last two),
    # then the summed counters.
    jobs = [l for l in lines if l.startswith("[")]
    assert len(jobs) == 3 and all("ETA" in l for l in jobs)
    assert "frames=" in jobs[0] and "detections=" in jobs[0]
    assert sum(l.count("done: matches=") for l in jobs) == 3
    assert lines[-1].startswith("counters (summed over this run's jobs): frames_listed=")


def test_rerun_skips_committed_partitions(reference, world, capsys):
    out, _ = reference
    before = {f: (out / f).stat().st_mtime_ns for f in _files(out)}
    assert cli.main(["backfill"] + _args(world, out)) == 0
    printed = capsys.readouterr().out
    assert "3 complete, 0 extracted, 0 job(s) to run" in printed
    assert {f: (out / f).stat().st_mtime_ns for f in _files(out)} == before


def test_matches_equal_one_matching_over_the_stored_detections(reference, tmp_path):
    """Boundary pairs are neither lost nor doubled: one 'cctview match' over all the
    detections gives exactly the backfill's matches."""
    out, _ = reference
    assert cli.main(["match", "--detections", str(out / "detections"), "--max-gap", "25",
                     "--output", str(tmp_path / "m")]) == 0
    ours = ds.dataset(out / "matches", partitioning="hive").to_table()
    theirs = ds.dataset(tmp_path / "m" / "matches", partitioning="hive").to_table()
    assert _tables(out, ["matches"]) == _tables(tmp_path / "m", ["matches"])
    pairs = list(zip(ours.column("detection_id_a").to_pylist(),
                     ours.column("detection_id_b").to_pylist()))
    assert len(pairs) == len(set(pairs)) == theirs.num_rows > 20
    across = [(a, b) for a, b in zip(ours.column("frame_ts_a").to_pylist(),
                                     ours.column("frame_ts_b").to_pylist())
              if a.minute != b.minute]
    assert across, "the world should have pairs whose detections lie in two partitions"


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_outputs(reference, world, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "backfill"]
                               + _args(world, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    first = out / "_backfill" / PARTITIONS[0] / "_SUCCESS"
    deadline = time.time() + 120
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert first.exists()
    assert not (out / "_backfill" / PARTITIONS[-1] / "_SUCCESS").exists(), "killed too late"
    lines = []
    config, options = backfill.parse_args(_args(world, out))
    assert backfill.Backfill.from_options(config, options, say=lines.append).run() == 0
    assert "1 complete" in lines[0]
    assert _files(out) == _files(ref_out)
    assert _tables(out) == _tables(ref_out)


def test_other_settings_or_foreign_outputs_are_refused_in_one_line(reference, world, tmp_path,
                                                                   capsys):
    out, _ = reference
    assert cli.main(["backfill"] + _args(world, out, "--min-score", "0.5")) == 2
    assert cli.main(["backfill"] + _args(world, out, "--chunk", "1h")) == 2  # the last --chunk wins
    foreign = tmp_path / "foreign"
    (foreign / "detections").mkdir(parents=True)
    (foreign / "detections" / "part-00000.parquet").write_bytes(b"x")
    assert cli.main(["backfill"] + _args(world, foreign)) == 2
    assert cli.main(["backfill"] + _args(world, tmp_path / "x", "--chunk", "7m")) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("cctview backfill: error: ") for e in errors)
    assert "min_score" in errors[0] and "chunk_ms" in errors[1]
    assert "no backfill made" in errors[2] and "--chunk" in errors[3]


def test_backfill_equals_one_run_for_a_detector_that_sees_one_frame_at_a_time(tmp_path):
    """YOLOX (ONNX) on real frames: detections are a function of the frame alone, so a
    backfill in two partitions gives exactly the detections and matches of one run."""
    frames = require_shared(FRAMES)
    weights = require_shared(MODELS / "yolox_nano.onnx")
    common = ["--input", str(frames / "733-681-N"), str(frames / "735-683-N"),
              "--start", "2020-05-05T13:10:00", "--end", "2020-05-05T13:10:30",
              "--timezone", "America/New_York", "--detector", "yolox",
              "--detector-weights", str(weights), "--embedder", "color_histogram",
              "--max-gap", "10"]
    assert cli.main(["backfill"] + common + ["--output", str(tmp_path / "bf"), "--chunk", "15s"]) == 0
    assert cli.main(["run"] + common + ["--output", str(tmp_path / "run")]) == 0
    ours, theirs = _tables(tmp_path / "bf"), _tables(tmp_path / "run")
    assert ours == theirs
    assert len(ours["detections"]) > 50 and len(ours["matches"]) >= 3
    assert len(list((tmp_path / "bf" / "_backfill").glob("*/_SUCCESS"))) == 2


def test_asynchronous_jobs_report_progress_while_they_run(monkeypatch):
    """Dataflow's run() returns at once; the backfill's line polls the job's metrics."""
    from types import SimpleNamespace

    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.runner import PipelineState

    from pipelines import progress

    monkeypatch.setenv(progress.INTERVAL_ENV, "0.05")

    class Result:
        def __init__(self):
            self.state, self.polls = PipelineState.RUNNING, 0

        def wait_until_finish(self, duration=None):
            import time

            time.sleep(0.3)  # the job runs: the line is printed meanwhile
            self.state = PipelineState.DONE
            return self.state

        def metrics(self):
            self.polls += 1
            counter = SimpleNamespace(key=SimpleNamespace(metric=SimpleNamespace(
                name="frames_inferred")), committed=None, attempted=10 * self.polls)
            return SimpleNamespace(query=lambda: {"counters": [counter]})

    lines = []
    options = PipelineOptions(["--runner", "DataflowRunner"])
    with progress.Progress(options, "backfill", (progress.FRAMES,), stream=SimpleNamespace(
            write=lines.append, flush=lambda: None)) as watch:
        totals = progress.run_job(SimpleNamespace(run=Result), watch)
    shown = [l for l in lines if l.strip()]
    assert totals["frames_inferred"] >= 10  # read after the final wait_until_finish()
    assert shown and all(l.startswith("backfill: frames ") for l in shown)
    assert any("/s" in l for l in shown)


def test_a_file_without_capture_time_is_dead_lettered_by_one_partition():
    t0 = 1714564800000  # 2024-05-01T12:00Z
    plan = backfill.plan_partitions(t0 + 30 * 60000, t0 + 2 * 3600000, 900000)
    owner = backfill._parse_failure_owner
    assert owner("gs://b/f/cam/2024/05/01/13/07/00/x.txt", "UTC", plan).start_ms == t0 + 3600000
    assert owner("gs://b/f/cam/2024/05/01/12/07/00/x.txt", "UTC", plan) == plan[0]
    assert owner("gs://b/f/cam/2024/05/01/09/07/00/x.txt", "America/New_York",
                 plan).start_ms == t0 + 3600000  # 09:00 EDT = 13:00Z
    assert owner("gs://b/f/odd/x.txt", "UTC", plan) == plan[0]
