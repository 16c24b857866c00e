"""Reliability at scale: hostile inputs and injected faults, counted; writes RELIABILITY.md.

Runs, with a fixed seed:

* ``decode_image`` on thousands of hostile byte strings (random bytes, bit-flipped and
  truncated real frames, PNG chunks changed with a valid CRC, PNG/JPEG headers declaring
  huge sizes, tiny/thin images, odd colour modes, other formats);
* ``FrameLayout.parse`` on thousands of mutated layout paths;
* ``ReadFrames`` (DirectRunner) over a folder of all the fuzzed files written under
  layout paths, plus hostile names: every file must end as a frame or a dead letter;
* the filesystem oddities that stop the job instead of being dead-lettered (known
  bugs, each in a subprocess with a time limit): a non-UTF-8 file name, a capture time
  outside datetime's UTC range, a FIFO named like a frame;
* transient faults in decode, matching and Parquet writing on the DirectRunner (the
  command is re-run until it succeeds) and on the BundleBasedDirectRunner (bundle
  retries), transient inference failures (retried frame by frame by the handlers),
  SDK worker processes SIGKILLed mid-run under ``multi_processing`` (then a re-run),
  and Dask worker processes SIGKILLed mid-job on a ``dask scheduler`` + two ``dask
  worker`` cluster (``--runner DaskRunner``); every final output is compared with a
  clean run's.

  .venv/bin/python benchmarks/reliability.py            # ~4 minutes on 2 cores

prints the table and rewrites RELIABILITY.md (``--no-record`` to only print).
"""
import argparse
import collections
import contextlib
import datetime as dt
import io
import os
import platform
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
import warnings
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from e2e import test_faults as faults  # noqa: E402  (its fault-injecting classes and helpers)
from conftest import collect, counters  # noqa: E402
from transforms.frames import DEAD_LETTER, FrameDecodeError, ReadFrames, decode_image  # noqa
from transforms.layout import FrameLayout, PathParseError  # noqa: E402

FRAMES = REPO.parent / "shared" / "data" / "nyc-fdr" / "frames"
CLI = str(faults.CLI)
MODELS = faults.MODELS
DECODE_REASONS = {"empty_file", "unsupported_format", "too_large", "too_small",
                  "not_an_image", "corrupt_image"}
SLOW_S = 2.0


# ------------------------------------------------------------------ hostile bytes

def _chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png_chunks(data):
    pos, out = 8, []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def _png(chunks):
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(k, d) for k, d in chunks)


def _png_bomb(width, height):
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _png([(b"IHDR", header), (b"IDAT", zlib.compress(b"\x00" * 64)), (b"IEND", b"")])


def _jpeg_with_size(data, width, height):
    pos = 2
    while True:
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            break
        pos += 2 + length
    out = bytearray(data)
    out[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def _encode(image, fmt, **kwargs):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def seeds():
    paths = sorted(FRAMES.rglob("*.jpeg"))
    if not paths:
        raise SystemExit("real frames not found under %s" % FRAMES)
    jpegs = [p.read_bytes() for p in paths[::max(1, len(paths) // 16)][:16]]
    first = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    pngs = [_encode(first, "PNG"), _encode(first.resize((64, 44)), "PNG")]
    return jpegs, pngs


def hostile_bytes(rng, jpegs, pngs, count):
    """{kind: [bytes]}: count inputs in all, spread over the kinds."""
    kinds = collections.OrderedDict()
    per = max(1, (count - 27) // 6)  # 27: the fixed tiny/odd-mode/other-format inputs

    def flip(data, n, span=None):
        data = bytearray(data)
        span = span or len(data)
        for _ in range(n):
            data[rng.randrange(min(span, len(data)))] ^= 1 << rng.randrange(8)
        return bytes(data)

    magic = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00"]
    kinds["random bytes (some with JPEG/PNG magic)"] = [
        rng.choice(magic) + os.urandom(rng.randrange(0, 4000)) for _ in range(per)]
    kinds["bit-flipped real JPEG frames"] = [
        flip(rng.choice(jpegs), rng.randint(1, 60), 700 if rng.random() < 0.5 else None)
        for _ in range(per)]
    kinds["truncated real JPEG/PNG frames"] = [
        (lambda d: d[:rng.randrange(len(d))])(rng.choice(jpegs + pngs)) for _ in range(per)]
    mutated = []
    for _ in range(per):
        chunks = _png_chunks(rng.choice(pngs))
        i = rng.randrange(len(chunks))
        kind, data = chunks[i]
        action = rng.choice(["flip", "drop", "duplicate", "swap", "resize"])
        if action == "flip" and data:
            chunks[i] = (kind, flip(data, rng.randint(1, 30)))
        elif action == "drop":
            del chunks[i]
        elif action == "duplicate":
            chunks.insert(i, (kind, data))
        elif action == "swap":
            j = (i + 1) % len(chunks)
            chunks[i], chunks[j] = chunks[j], chunks[i]
        else:
            n = rng.randrange(4096)
            chunks[i] = (kind, (data * (n // max(len(data), 1) + 1))[:n])
        mutated.append(_png(chunks))
    kinds["PNG chunks mutated, valid CRC"] = mutated
    sides = [1, 15, 16, 4097, 10000, 65535, 100000, 2 ** 31 - 1]
    kinds["PNG IHDR declaring huge/odd sizes (bombs)"] = [
        _png_bomb(rng.choice(sides + [rng.randrange(1, 2 ** 31)]),
                  rng.choice(sides + [rng.randrange(1, 2 ** 31)])) for _ in range(per)]
    jsides = [1, 15, 16, 4097, 10000, 65535]
    kinds["JPEG SOF declaring huge/odd sizes (bombs)"] = [
        _jpeg_with_size(rng.choice(jpegs), rng.choice(jsides + [rng.randrange(1, 65536)]),
                        rng.choice(jsides + [rng.randrange(1, 65536)])) for _ in range(per)]
    odd = []
    noise = lambda w, h: Image.fromarray(  # noqa: E731
        np.random.default_rng(rng.randrange(10 ** 6)).integers(0, 256, (h, w, 3), np.uint8))
    for w, h in [(1, 1), (10000, 10), (10, 10000), (15, 3000), (16, 16)]:
        odd += [_encode(noise(w, h), "JPEG"), _encode(noise(w, h), "PNG")]
    for mode, fmt in [("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
                      ("I", "PNG"), ("I;16", "PNG"), ("I;16B", "PNG"), ("CMYK", "JPEG"),
                      ("YCbCr", "JPEG"), ("L", "JPEG"), ("F", "TIFF"), ("RGB", "GIF"),
                      ("RGB", "BMP"), ("RGB", "WEBP"), ("RGB", "TIFF"), ("RGB", "ICO")]:
        try:
            odd.append(_encode(Image.new(mode, (40, 30)), fmt))
        except (OSError, KeyError, ValueError):
            pass
    kinds["tiny/thin images, odd modes, other formats"] = odd
    return kinds


def run_decode(kinds):
    rows = []
    for kind, inputs in kinds.items():
        reasons, crashed, slow, worst, bad_shape = collections.Counter(), 0, 0, 0.0, 0
        for data in inputs:
            start = time.perf_counter()
            try:
                rgb = decode_image(data)
                reasons["ok"] += 1
                if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                    bad_shape += 1
            except FrameDecodeError as exc:
                reasons[exc.reason if exc.reason in DECODE_REASONS else "UNKNOWN:" + exc.reason] += 1
            except Exception as exc:  # noqa: BLE001 - that is what is being counted
                crashed += 1
                reasons["CRASH %s" % type(exc).__name__] += 1
            elapsed = time.perf_counter() - start
            worst = max(worst, elapsed)
            slow += elapsed > SLOW_S
        rows.append({
            "kind": "decode_image: " + kind, "tried": len(inputs),
            "crashed": crashed + bad_shape + slow,
            "dead": sum(v for k, v in reasons.items() if k != "ok" and not k.startswith("CRASH")),
            "reasons": _fmt(reasons) + "; slowest %.3f s" % worst,
        })
    return rows


# ------------------------------------------------------------------ hostile paths

HOSTILE = ["/", "\\", "..", "../", ".", " ", "\t", "\n", "\r", "\x00", "\x1b", "\x7f", "é",
           "Ⅻ", "٢", "０", "\u200b", "\u202e", "／", "．", "%2F", "-", "--", "*", "?", "[",
           "~", ":", "😀"]


def _layout_path(root, camera, when, suffix="jpeg"):
    f = "%04d/%02d/%02d/%02d/%02d/%02d" % (when.year, when.month, when.day, when.hour,
                                           when.minute, when.second)
    return "%s/%s/%s/%s--%s-%s-%s--%s.%s.%s--original.%s" % (
        root, camera, f, camera, *f.split("/"), suffix)


def mutated_path(rng):
    when = dt.datetime(rng.randint(1, 9999), rng.randint(1, 12), rng.randint(1, 28),
                       rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59))
    camera = rng.choice(["cam-1", "735-683-N", "a.b_c", "X"])
    if rng.random() < 0.5:
        camera = "".join(rng.choice(HOSTILE + ["cam", "7"]) for _ in range(rng.randint(1, 4)))
    path = _layout_path(rng.choice(["", "/data", "gs://b/f", "s3://b/x y", "../..", "C:\\f"]),
                        camera, when, rng.choice(["jpeg", "jpg", "png", "JPEG", "gif"]))
    for _ in range(rng.randint(0, 4)):
        pos = rng.randrange(len(path) + 1)
        text = rng.choice(HOSTILE)
        edit = rng.randrange(3)
        if edit == 0:
            path = path[:pos] + text + path[pos:]
        elif edit == 1:
            path = path[:pos] + path[pos + rng.randint(1, 5):]
        else:
            path = path[:pos] + text + path[pos + len(text):]
    return path


def run_paths(rng, count):
    from transforms.parquet_io import hour_partition

    reasons, crashed, unsafe = collections.Counter(), 0, collections.Counter()
    layouts = [FrameLayout(timezone=tz) for tz in ("UTC", "America/New_York", "Asia/Tokyo")]
    paths = [mutated_path(rng) for _ in range(count)]
    paths += ["r/cam\n/2024/01/01/00/00/00/cam\n--2024-01-01--00.00.00--original.jpeg",
              "r/cam/9999/12/31/23/00/00/cam--9999-12-31--23.00.00--original.jpeg",
              "r/cam/0001/01/01/00/00/00/cam--0001-01-01--00.00.00--original.jpeg"]
    for path in paths:
        for layout in layouts:
            try:
                parsed = layout.parse(path)
            except PathParseError:
                reasons["PathParseError"] += 1
                continue
            except Exception as exc:  # noqa: BLE001
                crashed += 1
                reasons["CRASH %s" % type(exc).__name__] += 1
                continue
            reasons["parsed"] += 1
            camera = parsed.camera_id
            if any(unicodedata.category(c).startswith("C") for c in camera):
                unsafe["control character in camera id"] += 1
            if "/" in camera or "\\" in camera or ".." in camera:
                unsafe["path syntax in camera id"] += 1
            try:
                hour_partition(parsed.frame_ts_ms)
            except (ValueError, OverflowError, OSError):
                unsafe["time not representable in outputs"] += 1
    detail = _fmt(reasons)
    if unsafe:
        detail += "; ACCEPTED UNSAFE: " + _fmt(unsafe)
    return [{"kind": "FrameLayout.parse: mutated layout paths x 3 time zones"
                     + (" (BUG)" if unsafe else ""),
             "tried": len(paths) * len(layouts), "crashed": crashed + sum(unsafe.values()),
             "dead": reasons["PathParseError"], "reasons": detail}]


# ------------------------------------------------------- ReadFrames over hostile files

def read_frames(root):
    """(frames, dead letters, counters, error) of ReadFrames over root, DirectRunner."""
    p = beam.Pipeline()
    read = p | ReadFrames([str(root)], FrameLayout())
    frames = collect(read.frames | beam.Map(lambda f: (f["uri"], f["image"].shape)), "frames")
    dead = collect(read[DEAD_LETTER], "dead")
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as exc:  # noqa: BLE001
        return [], [], {}, exc
    return frames, dead, counters(result), None


def run_read_frames(kinds, rng, tmp):
    root = Path(tmp) / "hostile frames é"
    t0 = dt.datetime(2021, 3, 4, 0, 0, 0)
    written = []
    blobs = [b for inputs in kinds.values() for b in inputs]
    for i, data in enumerate(blobs):
        when = t0 + dt.timedelta(seconds=i)
        camera = rng.choice(["cam-1", "cam-2", "cam.3"])
        path = Path(_layout_path(str(root), camera, when, rng.choice(["jpeg", "png"])))
        if i % 20 == 0:  # hostile names next to them: unicode, spaces, near misses
            path = path.with_name(rng.choice(["frame %d é ü 😀.jpeg", "x\t%d\n.jpeg",
                                              "cam-1--2021-13-01--00.00.%02d--original.jpeg",
                                              "glob[%d]*?.png"]) % (i % 100))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(str(path))
    started = time.time()
    frames, dead, count, error = read_frames(root)
    seen = sorted([f[0] for f in frames] + [d["uri"] for d in dead])
    reconciled = (count.get("frames_listed") == count.get("frames_decoded", 0)
                  + count.get("frames_dead_lettered", 0) == len(written))
    ok = error is None and seen == sorted(written) and reconciled
    reasons = collections.Counter(d["reason"] for d in dead)
    return [{"kind": "ReadFrames (DirectRunner) over all fuzzed files + hostile names",
             "tried": len(written), "crashed": 0 if ok else 1, "dead": len(dead),
             "reasons": "%d frames; %s; listed %s = decoded %s + dead-lettered %s%s; %.0f s" % (
                 len(frames), _fmt(reasons), count.get("frames_listed"),
                 count.get("frames_decoded", 0), count.get("frames_dead_lettered", 0),
                 "" if ok else " ERROR %r" % (error or "files unaccounted for"),
                 time.time() - started)}]


_ODDITY = r"""
import sys
sys.path.insert(0, %(repo)r)
import apache_beam as beam
from transforms.frames import ReadFrames, DEAD_LETTER
from transforms.layout import FrameLayout
p = beam.Pipeline()
read = p | ReadFrames([%(root)r], FrameLayout(timezone=%(tz)r))
_ = read[DEAD_LETTER] | beam.Map(lambda d: print("DEAD", d["reason"], flush=True))
p.run().wait_until_finish()
print("DONE", flush=True)
"""


def run_oddities(jpeg, tmp, world):
    """The inputs that stop the job (known bugs), each in a subprocess with a limit."""
    rows = []
    cases = []
    base = Path(tmp) / "odd"
    root = base / "non-utf8"
    good = Path(_layout_path(str(root), "cam-1", dt.datetime(2021, 3, 4), "jpeg"))
    good.parent.mkdir(parents=True)
    good.write_bytes(jpeg)
    with open(os.path.join(os.fsencode(good.parent), b"bad-\xff\xfe.jpeg"), "wb") as handle:
        handle.write(jpeg)
    cases.append(("ReadFrames: a file name that is not UTF-8", root, "UTC"))
    root = base / "fifo"
    fifo = Path(_layout_path(str(root), "cam-1", dt.datetime(2021, 3, 4), "jpeg"))
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    cases.append(("ReadFrames: a FIFO named like a frame (local disks only)", root, "UTC"))
    for title, root, tz in cases:
        code = _ODDITY % {"repo": str(REPO), "root": str(root), "tz": tz}
        started = time.time()
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  text=True, timeout=15)
            outcome = ("exit %d: %s" % (done.returncode, _last_error(done.stderr))
                       if done.returncode else "ok, dead letters: %s" % _fmt(collections.Counter(
                           l.split()[1] for l in done.stdout.splitlines()
                           if l.startswith("DEAD"))))
            crashed = int(done.returncode != 0)
        except subprocess.TimeoutExpired:
            outcome, crashed = "HUNG (killed after 15 s)", 1
        rows.append({"kind": title + (" (BUG)" if crashed else ""), "tried": 1,
                     "crashed": crashed, "dead": 1 - crashed,
                     "reasons": "%s; %.0f s" % (outcome, time.time() - started)})
    # A capture time valid in the path's time zone but outside datetime's range in UTC.
    root = base / "year9999"
    for i in range(12):  # the background detector wants a few frames per camera
        src = sorted(Path(world).rglob("*.jpeg"))[i]
        when = dt.datetime(9999, 12, 31, 23, 0, i)
        path = Path(_layout_path(str(root), "cam-99", when, "jpeg"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(src.read_bytes())
    started = time.time()
    done = subprocess.run([CLI, "extract", "--input", str(root), "--output",
                           str(base / "year9999-out"), "--timezone", "America/New_York",
                           *MODELS], capture_output=True, text=True, timeout=120)
    crashed = int(done.returncode != 0)
    dead = 0
    if not crashed:
        import pyarrow.dataset as ds

        dead = ds.dataset(str(base / "year9999-out" / "dead_letter"), format="parquet",
                          partitioning="hive").count_rows()
    rows.append({"kind": "cctview extract: 12 frames at 9999-12-31 23:00, --timezone "
                         "America/New_York" + (" (BUG)" if crashed else ""),
                 "tried": 12, "crashed": crashed, "dead": dead,
                 "reasons": "%s; %.0f s" % (
                     "exit %d: %s" % (done.returncode, _last_error(done.stderr)) if crashed
                     else "exit 0, %d of 12 frames dead-lettered" % dead,
                     time.time() - started)})
    return rows


def _last_error(stderr):
    lines = [l.strip() for l in stderr.splitlines()
             if l.strip() and not l.startswith((" ", "WARNING", "Traceback"))]
    return lines[-1][:110].replace("|", "/") if lines else ""


# ------------------------------------------------------------------ injected faults
# The fault-injecting subclasses of tests/e2e/test_faults.py, reused as they are: they live
# in an importable module, so Beam pickles them by reference (classes defined in a
# script's __main__ are pickled by value, and did not always take effect on a second
# pipeline in the same process).

class Injected:
    """Swaps the flaky classes in (like pytest's monkeypatch) for one command."""

    def __init__(self, folder, **times):
        import pipelines.stages

        faults.PLAN["dir"], faults.PLAN["times"] = folder, times
        self._saved = []
        for site, (module, name, flaky) in faults.SWAPS.items():
            if site not in times:
                continue
            for target in (module, pipelines.stages):
                if target is module or hasattr(target, name):
                    self._saved.append((target, name, getattr(target, name)))
                    setattr(target, name, flaky)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        faults.PLAN["dir"], faults.PLAN["times"] = None, {}


def cctview_run(frames, out, *extra):
    from pipelines import cli

    return cli.main(["run", "--input", frames, "--output", str(out), *MODELS, *extra])


def snapshot(out):
    shot = faults.snapshot(out)
    return {"ids": sorted(shot["detection_ids"]), "rows": shot["detections"],
            "pairs": sorted(shot["pairs"]), "matches": shot["matches"],
            "dead": shot["dead"], "files": shot["files"]}


def same(got, clean):
    return (got == clean and len(set(got["ids"])) == len(got["ids"])
            and len(set(got["pairs"])) == len(got["pairs"]))


def run_faults(world, tmp, rounds, kills, dask_kills):
    rows = []
    clean_out = Path(tmp) / "clean"
    if cctview_run(world, clean_out) != 0:
        raise RuntimeError("clean run failed")
    clean = snapshot(clean_out)
    print("clean run: %d detections, %d matches" % (len(clean["ids"]), len(clean["pairs"])))
    quiet = contextlib.redirect_stdout(io.StringIO())

    # DirectRunner (FnApiRunner, no retries): re-run the failed command until it succeeds.
    faults = {"decode": rounds, "match": rounds, "write": rounds}
    folder = tempfile.mkdtemp(dir=tmp)
    out, failures, started = Path(tmp) / "rerun", 0, time.time()
    with Injected(folder, **faults), quiet:
        for _ in range(sum(faults.values()) + 2):
            try:
                if cctview_run(world, out) == 0:
                    break
            except Exception:  # noqa: BLE001 - a failed job; the operator re-runs it
                failures += 1
    ok = same(snapshot(out), clean)
    rows.append({"kind": "transient faults in decode/match/write, DirectRunner, command "
                         "re-run until it succeeds", "tried": sum(faults.values()),
                 "crashed": 0 if ok else 1, "dead": len(snapshot(out)["dead"]),
                 "reasons": "%d failed runs (FnApiRunner does not retry), then success; "
                            "outputs %s clean; %.0f s" % (
                                failures, "==" if ok else "!=", time.time() - started)})

    # BundleBasedDirectRunner: bundle retries (4 attempts) absorb up to 3 faults a bundle.
    folder = tempfile.mkdtemp(dir=tmp)
    out, started = Path(tmp) / "retry", time.time()
    printed = io.StringIO()
    with Injected(folder, **faults), contextlib.redirect_stdout(printed):
        try:
            rc = cctview_run(world, out, "--runner", "BundleBasedDirectRunner")
        except Exception as exc:  # noqa: BLE001
            rc = repr(exc)[:80]
    ok = rc == 0 and same(snapshot(out), clean)
    listed = [w for w in printed.getvalue().replace(",", " ").split()
              if w.startswith(("frames_listed=", "frames_decoded="))]
    rows.append({"kind": "transient faults in decode/match/write, BundleBasedDirectRunner "
                         "(bundle retries)", "tried": sum(faults.values()),
                 "crashed": 0 if ok else 1, "dead": 0,
                 "reasons": "one command, exit %s; %d faults fired; outputs %s clean; "
                            "counters printed: %s (60 files: failed attempts counted); "
                            "%.0f s" % (rc, len(os.listdir(folder)), "==" if ok else "!=",
                                        " ".join(listed), time.time() - started)})

    # Inference: the handlers retry a failed batch frame by frame; nothing is lost.
    folder = tempfile.mkdtemp(dir=tmp)
    out, started = Path(tmp) / "inference", time.time()
    printed = io.StringIO()
    with Injected(folder, inference=rounds), quiet, contextlib.redirect_stdout(printed):
        rc = cctview_run(world, out)
    faulty = snapshot(out)
    lost = collections.Counter(r for _, _, r in faulty["dead"])
    retried = [w for w in printed.getvalue().replace(",", " ").split()
               if w.startswith("inference_batches_retried_one_by_one=")]
    first = "outputs == clean" if same(faulty, clean) else "%d of %d detections missing" % (
        len(clean["ids"]) - len(faulty["ids"]), len(clean["ids"]))
    with quiet:
        rc2 = cctview_run(world, out)
    ok = rc == 0 and rc2 == 0 and same(snapshot(out), clean)
    rows.append({"kind": "transient model failures (whole batches), retried frame by frame",
                 "tried": rounds, "crashed": 0 if ok else 1, "dead": sum(lost.values()),
                 "reasons": "exit %s, %s; %s; %s; re-run: outputs %s clean; %.0f s" % (
                     rc, _fmt(lost) if lost else "no dead letters", " ".join(retried), first,
                     "==" if ok else "!=", time.time() - started)})

    # SDK workers SIGKILLed mid-run under multi_processing, then the same command again.
    for trial in range(kills):
        rows.append(kill_trial(world, Path(tmp) / ("kill%d" % trial), clean,
                               delay=2.0 + 6.0 * trial))
    if dask_kills:
        rows += run_dask_kills(world, tmp, clean, dask_kills)
    return rows


def run_dask_kills(world, tmp, clean, trials):
    """Dask worker processes SIGKILLed at several points of a job; -> table rows.

    A clean run on the same cluster is the reference (its match distances may differ
    from the DirectRunner's in the last float bits: BLAS runs one thread per worker);
    it must hold the DirectRunner's detections, pairs, dead letters and files."""
    from e2e.test_dask import Cluster

    rows = []
    cluster = Cluster(Path(tempfile.mkdtemp(dir=tmp))).start()
    try:
        flags = ["--runner", "DaskRunner", "--dask_client_address", cluster.address]
        started = time.time()
        reference = Path(tmp) / "dask-clean"
        rc = subprocess.run([CLI, "run", "--input", world, "--output", str(reference),
                             *MODELS, *flags], capture_output=True, timeout=300).returncode
        dask_clean = snapshot(reference)
        ok = rc == 0 and all(dask_clean[k] == clean[k]
                             for k in ("ids", "rows", "pairs", "dead", "files"))
        rows.append({"kind": "Dask cluster (dask scheduler + 2 dask workers), clean run vs "
                             "DirectRunner", "tried": 1, "crashed": 0 if ok else 1, "dead": 0,
                     "reasons": "exit %d; detections, pairs, dead letters, files %s "
                                "DirectRunner's; %.0f s" % (rc, "==" if ok else "!=",
                                                            time.time() - started)})
        for trial in range(trials):
            victims = 2 if trial == trials - 1 else 1
            rows.append(dask_kill_trial(cluster, world, Path(tmp) / ("dask-kill%d" % trial),
                                        dask_clean, flags, done=1 + 7 * (trial % 2),
                                        victims=victims))
    finally:
        cluster.stop()
    return rows


def _bundles(client):
    """-> (bundles done, bundles running) on the cluster now."""
    def count(dask_scheduler):
        states = [t.state for t in dask_scheduler.tasks.values() if "run_bundle" in str(t.key)]
        return states.count("memory"), states.count("processing")
    return client.run_on_scheduler(count)


def dask_kill_trial(cluster, world, out, clean, flags, done, victims):
    """Starts `cctview run` on the cluster and SIGKILLs ``victims`` worker processes once
    ``done`` bundles have finished and some run; the same command again if it failed."""
    command = [CLI, "run", "--input", world, "--output", str(out), *MODELS, *flags]
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    killed, state = 0, (0, 0)
    with cluster.client() as client:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            state = _bundles(client)
            if state[0] >= done and state[1]:
                break
            time.sleep(0.05)
        pids = sorted(client.run(os.getpid).values())[:victims]
    if process.poll() is None:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            killed += 1
    try:
        stdout, stderr = process.communicate(timeout=300)
        outcome = "killed run exit %d" % process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        outcome = "killed run HUNG (stopped after 300 s)"
    line = stderr.strip().splitlines()[-1:] if process.returncode else []
    rerun = ""
    if process.returncode != 0:
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        rerun = "; re-run exit %d" % again.returncode
    cluster.wait_for_workers(2)  # the nannies restart the killed worker processes
    ok = killed == victims and same(snapshot(out), clean) and (not line or line[0].startswith(
        "cctview run: error: dask job failed: "))
    return {"kind": "Dask: %d of 2 worker processes SIGKILLed after %d bundles done "
                    "(%d running)" % (killed, state[0], state[1]),
            "tried": killed, "crashed": 0 if ok else 1, "dead": 0,
            "reasons": "%s%s%s; outputs %s clean Dask run (no duplicates); %.0f s" % (
                outcome, " (%s)" % line[0][:90] if line else "", rerun,
                "==" if ok else "!=", time.time() - started)}


def kill_trial(world, out, clean, delay):
    command = [CLI, "run", "--input", world, "--output", str(out), *MODELS,
               "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    killed, outcome = 0, "?"
    try:
        deadline, workers = time.time() + 60, {}
        while time.time() < deadline and process.poll() is None and not workers:
            time.sleep(0.25)
            workers = [pid for pid, cmd in faults._descendants(process.pid).items()
                       if "sdk_worker_main" in cmd and not cmd.startswith("/bin/sh")]
        time.sleep(delay)
        if process.poll() is None:
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        try:
            outcome = "killed run exit %d" % process.wait(timeout=8)
        except subprocess.TimeoutExpired:
            outcome = "killed run HUNG (driver waits forever; stopped after 8 s)"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    ok = rerun.returncode == 0 and same(snapshot(out), clean)
    return {"kind": "SDK workers SIGKILLed %.0f s into their work (multi_processing x2), "
                    "then re-run" % delay,
            "tried": killed, "crashed": 0 if ok else 1, "dead": 0,
            "reasons": "%s; re-run exit %d, outputs %s clean; %.0f s" % (
                outcome, rerun.returncode, "==" if ok else "!=", time.time() - started)}


# ------------------------------------------------------------------------ report

def _fmt(counter):
    return ", ".join("%s %d" % (k, v) for k, v in counter.most_common()) or "-"


def machine():
    try:
        with open("/proc/meminfo") as handle:
            ram = "%.0f GiB RAM" % (int(handle.readline().split()[1]) / 2 ** 20)
    except (OSError, ValueError, IndexError):
        ram = "RAM unknown"
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = [l.split(":", 1)[1].strip() for l in handle if l.startswith("model name")][0]
    except (OSError, IndexError):
        pass
    return "%s, nproc %d, %s, Python %s, Apache Beam %s, Pillow %s, numpy %s, %s" % (
        cpu, len(os.sched_getaffinity(0)), ram, platform.python_version(),
        beam.__version__, PIL.__version__, np.__version__, platform.platform())


def table(rows):
    lines = ["| fault or input kind | tried | crashed (must be 0) | dead-lettered | "
             "reasons / outcome |", "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append("| %s | %d | %d | %d | %s |" % (
            r["kind"], r["tried"], r["crashed"], r["dead"],
            r["reasons"].replace("|", "/").replace("\n", " ")))
    return "\n".join(lines)


NOTES = """\
## How to read this

*crashed* counts inputs or faults that did not end the way the contract says: for
`decode_image`, any exception other than `FrameDecodeError` with a reason from the fixed
vocabulary, a non-HxWx3-uint8 result, or an input slower than %(slow).0f s; for
`FrameLayout.parse`, any exception other than `PathParseError` or a parsed path whose
camera id holds control characters or path syntax, or whose time cannot be written;
for a pipeline, a job that fails or hangs, a listed file that is neither a frame nor a
dead letter, or counters that do not reconcile; for a fault, final outputs that differ
from a clean run's (detection rows, match pairs, dead letters, file names) or hold
duplicates. A row is marked BUG when it has crashes: a production bug.

## What the local runners do with a failure (Beam %(beam)s)

* `DirectRunner` runs batch jobs on the FnApiRunner, which does not retry a failed
  bundle (apache/beam#18640 is open): one transient exception fails the command. Re-running
  the same command is the recovery, and it is safe: `--output` tables are cleared first
  and files are named by partition and shard, so the re-run's outputs equal a clean run's.
* `BundleBasedDirectRunner` (`--runner BundleBasedDirectRunner`) retries a failed bundle,
  4 attempts in all (`TransformExecutor._MAX_RETRY_PER_BUNDLE`); a retried write rewrites
  the same Parquet file, so there are no duplicates. Its committed counters keep the
  increments of failed attempts (one metrics container per bundle across attempts), so
  under retries `frames_listed` etc. can exceed the number of files: trust the tables.
* A model call that raises (a CUDA OOM, a transient fault, a frame the model cannot take)
  is retried by the handlers frame by frame, once: a failure that does not repeat costs
  nothing, a frame that fails on its own is dead-lettered alone as `inference_failed`
  with the error (counter `inference_batches_retried_one_by_one`); a fault that strikes
  the same frame's retry too loses that frame until a re-run (the row above: faults fired
  back to back). Failures outside the model call are
  still caught by `RunInference(...).with_exception_handling()` and dead-letter their
  batch.
* `--direct_running_mode multi_processing`: a SIGKILLed SDK worker process (the OOM
  killer) is not replaced. Beam %(beam)s's local job service logs "Worker subprocess
  exited with return code 137"; then, depending on when the worker died, the command
  either fails (exit 1) or its driver waits forever, neither failing nor finishing
  (both seen in the table). Run local multi-process jobs under a wall-clock limit
  (e.g. `timeout`) and re-run on failure or expiry: the re-run's outputs equal a clean
  run's. Dataflow replaces dead workers and retries their bundles itself.
* `--runner DaskRunner` (runners/dask_runner.py) on a dask.distributed cluster: a
  SIGKILLed worker process loses its running tasks and the results it held; the
  scheduler re-runs them on the other worker and on the one its nanny restarts, and
  the job finishes (the rows above, one worker or both killed). Output files are named
  by partition and shard, so a re-run task rewrites the same file; counters travel
  with task results, so re-run tasks count once. A task whose workers die 3 times
  (`distributed.scheduler.allowed-failures`) fails the job with one line
  (`dask job failed: KilledWorker ...`); re-running the command gives clean outputs.
  An exception inside a DoFn is not retried by Dask: one line, then re-run.

## Bugs found by this script and its tests

All five were reproduced (the job failed or hung, or an unsafe camera id was accepted),
then fixed in the code measured above; regression tests in `tests/*/test_hostile_input.py`
guard each (`test_camera_id_never_ends_with_a_newline`,
`test_layout_path_with_trailing_newline_is_rejected`, `test_layout_digits_are_ascii_only`,
`test_parsed_capture_time_is_representable_in_outputs`,
`test_read_frames_with_non_utf8_file_name`, `test_read_frames_does_not_hang_on_a_fifo`).

1. `transforms/layout.py`: `_CAMERA_ID_RE` ended in `$`, which matches before a trailing
   newline: camera id `"cam\\n"` was accepted. Fix: `_CAMERA_ID_RE.fullmatch(camera)`.
2. `transforms/layout.py`: `_CCTVIEW_RE` ended in `$` (a path ending in `\\n` parsed) and
   its `\\d` matched non-ASCII digits (`٢٠٢٤` parsed as 2024). Fix: end with `\\Z`, compile
   with `re.IGNORECASE | re.ASCII`.
3. `transforms/layout.py` `FrameLayout.parse`: a capture time that exists locally but not
   in UTC's datetime range (9999-12-31 23:00 in America/New_York) parsed, and the
   detections writer then failed the whole job with "year 10000 is out of range". Fix:
   range-check the UTC time (years 1-9999) and raise `PathParseError`.
4. `transforms/frames.py` `_CountListed.process`: a file name that is not UTF-8 failed
   the whole job with `UnicodeEncodeError`. Fix: dead-letter it there, its name escaped
   (`surrogateescape` -> `backslashreplace`), as `unparseable_path`.
5. `transforms/frames.py` `DecodeFrameFn.process`: a FIFO named like a frame blocked
   `FileSystems.open` forever (local disks only), so the job hung. Fix: a local path
   that is not a regular file is dead-lettered as `not_a_regular_file` before opening.

Not covered: progressive JPEGs with thousands of scans (decode time grows with the scan
count; libjpeg-turbo's scan limit is only in its TurboJPEG API), and object-store
failures (throttling, 5xx) while listing or reading, which Beam's filesystems retry.
"""


def write_report(rows, command, seconds, path):
    body = "\n".join([
        "# Reliability",
        "",
        "Written by `benchmarks/reliability.py`; re-run it to refresh this file. Tests of the "
        "same properties, smaller: `tests/*/test_hostile_input.py`, `tests/e2e/test_faults.py`, "
        "`tests/e2e/test_dask.py`.",
        "",
        "- Command: `%s`" % command,
        "- Machine: %s" % machine(),
        "- Date: %s (took %.0f s)" % (dt.datetime.now(dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"), seconds),
        "",
        table(rows),
        "",
        NOTES % {"slow": SLOW_S, "beam": beam.__version__},
    ])
    Path(path).write_text(body, encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000,
                        help="fuzzed frame files (decode_image and ReadFrames; default 2000)")
    parser.add_argument("--paths", type=int, default=5000,
                        help="mutated layout paths (default 5000)")
    parser.add_argument("--fault-rounds", type=int, default=3,
                        help="faults per site in decode, match, write and inference "
                             "(default 3: the most a bundle survives on the "
                             "BundleBasedDirectRunner)")
    parser.add_argument("--kills", type=int, default=2, help="worker-kill trials (default 2)")
    parser.add_argument("--dask-kills", type=int, default=3,
                        help="Dask worker-kill trials (default 3; the last kills both "
                             "workers; 0 without the dask extra)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not write RELIABILITY.md")
    parser.add_argument("--output", default=str(REPO / "RELIABILITY.md"))
    args = parser.parse_args(argv)
    command = " ".join([".venv/bin/python benchmarks/reliability.py"]
                       + (sys.argv[1:] if argv is None else list(argv)))
    started = time.time()
    rng = random.Random(args.seed)
    jpegs, pngs = seeds()
    rows = []
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        kinds = hostile_bytes(rng, jpegs, pngs, args.files)
        rows += run_decode(kinds)
        print("decode done (%.0f s)" % (time.time() - started), flush=True)
        rows += run_paths(rng, args.paths)
        rows += run_read_frames(kinds, rng, tmp)
        print("ReadFrames done (%.0f s)" % (time.time() - started), flush=True)
        from pipelines import cli

        world = Path(tmp) / "world"
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["synth", "--output", str(world), "--cameras", "2", "--minutes", "1",
                      "--fps", "0.5"])
        rows += run_oddities(jpegs[0], tmp, str(world / "frames"))
        print("oddities done (%.0f s)" % (time.time() - started), flush=True)
        rows += run_faults(str(world / "frames"), tmp, args.fault_rounds, args.kills,
                           args.dask_kills)
    seconds = time.time() - started
    print(table(rows))
    print("took %.0f s" % seconds)
    if not args.no_record:
        write_report(rows, command, seconds, args.output)
        print("wrote %s" % args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
