"""The progress line: counters that tick from the workers to the driver, the line's
format, the end-of-run accounting of frames, and real commands on real frames printing
lines with done/total, rate and ETA on stderr (and none with --quiet)."""


from pipelines import progress


def test_line_shows_done_of_total_rate_and_eta_of_the_phase_under_way():
    counts = {"objects_listed": 1100, "files_outside_range": 100, "frames_inferred": 400,
              "frames_dead_lettered": 2, "detections_batched": 0}
    line = progress.format_line("run", progress.RUN, counts, {}, {"frames": 8.0})
    assert line == "run: frames 402/1,000 (40%), 8.0/s, ETA 1m15s | matching not started"
    # once matching moves, frames are complete whatever their counters say
    counts.update(detections_batched=3000, detections_computed=30)
    line = progress.format_line("run", progress.RUN, counts, {}, {"matching": 10.0})
    assert "frames 402/402 (100%)" in line and "matching 30/3,000 detections (1%), 10.0/s, ETA 4m57s" in line
    # a total known from file metadata, before anything is counted
    line = progress.format_line("match", progress.MATCH, {}, {"reading": 5000}, {})
    assert line == "match: reading 0/5,000 detections (0%), starting | matching not started"
    # no total known ahead (evaluate reads without listing): the count alone
    line = progress.format_line("evaluate", (progress.READING,), {"detections_read": 40}, {},
                                {"reading": 4.0})
    assert line == "evaluate: reading 40 detections, 4.0/s"
    done = {"detections_read": 10, "detections_batched": 10, "detections_computed": 10}
    assert progress.format_line("match", progress.MATCH, done, {}, {}).endswith(
        "writing outputs")


def test_end_counters_account_for_every_listed_file():
    totals = {"objects_listed": 12, "frames_listed": 10, "frames_inferred": 8,
              "frames_with_detections": 7, "frames_without_detections": 1,
              "frames_dead_lettered": 1, "frames_inference_failed": 1,
              "files_outside_range": 2}
    text = progress.frame_accounting(totals)
    assert text.startswith("frames: 10 listed = 8 inferred (7 with detections, 1 without) "
                           "+ 1 dead-lettered before inference + 1 dead-lettered by a failed")
    assert "2 files in the listed hour folders lie outside --start/--end" in text
    assert "unaccounted" not in text
    in_backfill = progress.frame_accounting(totals, backfill=True)
    assert "another partition reads" in in_backfill and "none" not in in_backfill[:20]
    assert "unaccounted" in progress.frame_accounting(dict(totals, frames_listed=11))
    assert progress.frame_accounting({"detections_read": 3}) is None


def _polled(states):
    """A Progress on a fake clock whose counts are ``states[t]`` at time t."""
    clock = {"t": 0.0}
    watch = progress.Progress(label="match", phases=progress.MATCH, clock=lambda: clock["t"])
    watch.start_job("match", progress.MATCH, known={"reading": 1000})

    def line_at(t):
        clock["t"] = t
        watch.counts = lambda: states[t]
        return watch.line()
    return line_at


def test_a_phase_behind_a_barrier_counts_its_rate_from_when_it_began():
    """Matching's counter moves a block at a time: its rate counts from when it was
    seen waiting for the reading to end, so the wait before the first block is part of
    it (counting from the first step read 3.75/s here and an ETA 60% too long)."""
    read = {"detections_read": 1000, "detections_batched": 1000}
    line_at = _polled({10.0: {"detections_read": 500}, 30.0: dict(read, detections_computed=0),
                       80.0: dict(read, detections_computed=300),
                       90.0: dict(read, detections_computed=300)})
    assert "reading 500/1,000 detections (50%), 50.0/s, ETA 10s" in line_at(10.0)
    assert line_at(30.0).endswith("matching 0/1,000 detections (0%), starting")
    assert line_at(80.0).endswith("matching 300/1,000 detections (30%), 6.0/s, ETA 1m57s")
    assert line_at(90.0).endswith("matching 300/1,000 detections (30%), 5.0/s, ETA 2m20s")


def test_a_phase_first_seen_moving_counts_from_then():
    read = {"detections_read": 1000, "detections_batched": 1000}
    line_at = _polled({20.0: dict(read, detections_computed=100),
                       30.0: dict(read, detections_computed=300)})
    assert "matching 100/1,000 detections (10%), 5.0/s" in line_at(20.0)  # since the job began
    assert "matching 300/1,000 detections (30%), 20.0/s, ETA 35s" in line_at(30.0)


def test_a_job_ends_on_its_final_counters_whatever_the_ticks_said():
    """A job shorter than a tick (or whose last ticks are in flight) still prints its
    real end: the last line comes from the job's final counters; --quiet prints none."""
    import io

    stream = io.StringIO()
    watch = progress.Progress(None, "match", progress.MATCH, stream=stream, clock=lambda: 5.0)
    watch.finish({"detections_read": 2102, "detections_batched": 2102,
                  "detections_computed": 2102})
    assert stream.getvalue().strip() == ("match: reading 2,102/2,102 detections (100%) | "
                                         "matching 2,102/2,102 detections (100%), writing outputs")
    quiet = progress.Progress(None, "match", progress.MATCH, quiet=True, stream=io.StringIO())
    quiet.finish({"detections_read": 1})
    assert quiet.stream.getvalue() == "" and quiet.lines == []
