"""Stored detections of N cameras x H hours, built from real ones: inputs for scale tests.

``cctview scale-world --reference DIR --cameras N --hours H --output DIR`` writes the
detections Parquet schema that ``match`` and ``calibrate`` read (``camera_id``,
``frame_ts`` timestamp[ms, UTC], ``frame_uri``, ``detection_id``, ``label``, ``score``,
``box_xyxy``, ``embedding`` fixed_size_list<float16>), one file per camera and hour
(``<camera>/<YYYY-MM-DD-HH>.parquet``), row groups of ``ROW_GROUP_S`` seconds,
embeddings PLAIN-encoded as the project's own writer stores them
(:func:`transforms.parquet_io.write_table_file`).

How it is made (every step seeded, vectorised; no real row is copied into the repo):

- The reference detections (any detections Parquet, e.g. CCTView's 30-minute files of
  three NYC DOT cameras) are cut into their cameras' *segments* of ``SEGMENT_S``
  seconds. Camera ``k`` of the world, hour ``h``, segment ``s`` takes the rows of one
  reference segment, chosen by a seeded hash of ``(k, h, s)``, moved in time to its
  place: real boxes, scores, labels, density and frame rhythm of a camera, and real
  embeddings with their dimensions permuted per use (so that re-used segments are not
  look-alikes of each other: see ``_camera_hour``).
- Planted links: camera ``k`` (k >= 1) is downstream of camera ``k - 1`` (a road):
  ``planted_share`` of camera ``k - 1``'s rows reappear at camera ``k`` after
  ``offset_s(k)`` seconds (+- ``jitter_s``), their embeddings perturbed by Gaussian
  noise of ``noise`` times the embeddings' per-dimension spread, replacing as many of
  camera ``k``'s own rows (density unchanged). ``links_truth(...)`` returns these
  links; ``calibrate`` should find them.
- Detection ids are ``<camera>-<hour>-<segment>-<row>``: unique and deterministic, so a
  re-run writes the same files.

Memory: one hour of one camera at a time (plus the reference in float16): flat in N
and H. Time: dominated by ZSTD writing (about 2 GB of float16 embeddings for 10 x 4 h).
"""
import argparse
import datetime as dt
import hashlib
import os
from typing import List, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.command import Command

__all__ = ["COMMAND", "DEFAULT_START", "HOUR_MS", "ROW_GROUP_S", "Reference", "SEGMENT_S",
           "add_arguments", "camera_name", "links_truth", "load_reference", "offset_s",
           "run_from_args", "write_world"]

SEGMENT_S = 300
ROW_GROUP_S = 300
DEFAULT_START = "2020-05-05T13:00:00+00:00"
HOUR_MS = 3_600_000


class Reference(NamedTuple):
    """The reference detections, cut into segments (row ranges sorted by time)."""
    ts_ms: np.ndarray  # int64, ms since each row's segment start
    emb: np.ndarray  # (n, D) float16
    box: np.ndarray  # (n, 4) float32
    score: np.ndarray  # float32
    label: np.ndarray  # object
    segments: list  # [(start row, end row)]
    spread: np.ndarray  # (D,) float32: per-dimension standard deviation
    mean: np.ndarray  # (D,) float32


def load_reference(paths: Sequence[str]) -> Reference:
    """Reads detections Parquet files; keeps every whole ``SEGMENT_S`` segment of each camera."""
    tables = [pq.read_table(p, columns=["camera_id", "frame_ts", "label", "score", "box_xyxy",
                                        "embedding"]) for p in paths]
    table = pa.concat_tables(tables).combine_chunks()
    ts = table["frame_ts"].cast(pa.timestamp("ms")).cast(pa.int64()).to_numpy()
    cams = np.asarray(table["camera_id"].to_pylist(), dtype=object)
    order = np.lexsort((ts, cams))
    column = table["embedding"].combine_chunks()
    emb = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1)
    emb = emb.astype(np.float16)[order]
    box = table["box_xyxy"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)[order]
    parts = dict(ts=ts[order], cams=cams[order], emb=emb, box=box.astype(np.float32),
                 score=table["score"].to_numpy().astype(np.float32)[order],
                 label=np.asarray(table["label"].to_pylist(), dtype=object)[order])
    rel = np.zeros(len(order), np.int64)
    segments = []
    for cam in sorted(set(parts["cams"].tolist())):
        rows = np.flatnonzero(parts["cams"] == cam)
        t = parts["ts"][rows]
        first = t[0] + (-t[0]) % (SEGMENT_S * 1000)  # the first whole segment
        for s0 in range(int(first), int(t[-1]) - SEGMENT_S * 1000 + 1, SEGMENT_S * 1000):
            lo, hi = np.searchsorted(t, [s0, s0 + SEGMENT_S * 1000])
            if hi > lo:
                rel[rows[lo:hi]] = t[lo:hi] - s0
                segments.append((int(rows[lo]), int(rows[0] + hi)))
    sample = emb[::7].astype(np.float32)
    return Reference(rel, emb, parts["box"], parts["score"], parts["label"], segments,
                     sample.std(axis=0), sample.mean(axis=0))


def camera_name(k: int) -> str:
    return "cam-%03d" % k


def offset_s(k: int) -> float:
    """Transit time from camera ``k - 1`` to camera ``k`` of the planted road (s)."""
    return 15.0 + 7.0 * (k % 5)


def links_truth(cameras: int, jitter_s: float = 3.0) -> List[dict]:
    """The planted links (links.json objects) of a world of ``cameras`` cameras."""
    return [{"camera_a": camera_name(k - 1), "camera_b": camera_name(k),
             "offset_s": offset_s(k), "spread_s": jitter_s} for k in range(1, cameras)]


def _pick(k: int, hour: int, segment: int, count: int, seed: int) -> int:
    digest = hashlib.blake2b(b"%d/%d/%d/%d" % (seed, k, hour, segment), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def _camera_hour(ref: Reference, k: int, hour: int, seed: int) -> dict:
    """Rows of camera ``k`` in hour ``hour`` before planting: reference segments in place.

    A segment is used many times over the world, so each use gets its own random
    permutation of the embeddings' dimensions (about the mean): copies of one real
    vehicle are then as unlike each other as two vehicles, and the only look-alikes
    across cameras are the planted ones."""
    parts = []
    for s in range(HOUR_MS // (SEGMENT_S * 1000)):
        lo, hi = ref.segments[_pick(k, hour, s, len(ref.segments), seed)]
        rows = np.arange(lo, hi)
        perm = np.random.default_rng([seed, k, hour, s, 1]).permutation(ref.emb.shape[1])
        emb = (ref.emb[rows].astype(np.float32) - ref.mean)[:, perm] + ref.mean
        parts.append((rows, hour * HOUR_MS + s * SEGMENT_S * 1000 + ref.ts_ms[rows], s,
                      emb.astype(np.float16)))
    rows = np.concatenate([p[0] for p in parts])
    return {"rows": rows, "ts": np.concatenate([p[1] for p in parts]),
            "emb": np.concatenate([p[3] for p in parts]), "box": ref.box[rows],
            "score": ref.score[rows], "label": ref.label[rows],
            "id": np.asarray(["%s-%d-%d-%d" % (camera_name(k), hour, p[2], i)
                              for p in parts for i in range(len(p[0]))], dtype=object)}


def _plant(own: dict, upstream: dict, k: int, hour: int, share: float, jitter_s: float,
           noise: float, spread: np.ndarray, rng: np.random.Generator) -> dict:
    """Replaces ``share`` of ``own``'s rows with ``upstream`` rows seen again after the
    link's transit time, with perturbed embeddings."""
    n_up = len(upstream["ts"])
    take = np.sort(rng.choice(n_up, size=int(share * n_up), replace=False))
    delay = np.rint((offset_s(k) + rng.uniform(-jitter_s, jitter_s, len(take))) * 1000)
    ts = upstream["ts"][take] + delay.astype(np.int64)
    inside = (ts >= hour * HOUR_MS) & (ts < (hour + 1) * HOUR_MS)
    take, ts = take[inside], ts[inside]
    emb = upstream["emb"][take].astype(np.float32)
    emb += rng.standard_normal(emb.shape, dtype=np.float32) * (noise * spread)
    keep = np.sort(rng.choice(len(own["ts"]), size=max(0, len(own["ts"]) - len(take)),
                              replace=False))
    ids = np.asarray(["%s-%d-p-%s" % (camera_name(k), hour, i) for i in upstream["id"][take]],
                     dtype=object)
    out = {name: np.concatenate([own[name][keep], values]) for name, values in (
        ("ts", ts), ("emb", emb.astype(np.float16)), ("box", upstream["box"][take]),
        ("score", upstream["score"][take]), ("label", upstream["label"][take]), ("id", ids))}
    order = np.argsort(out["ts"], kind="stable")
    return {name: values[order] for name, values in out.items()}


def _table(camera: str, rows: dict, start_ms: int) -> pa.Table:
    emb = rows["emb"]
    ts = pa.array(start_ms + rows["ts"], pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    return pa.table({
        "camera_id": pa.array([camera] * len(emb), pa.string()),
        "frame_ts": ts,
        "frame_uri": pa.array(["scale-world://%s/%d" % (camera, t) for t in rows["ts"]],
                              pa.string()),
        "detection_id": pa.array(rows["id"].tolist(), pa.string()),
        "label": pa.array(rows["label"].tolist(), pa.string()),
        "score": pa.array(rows["score"], pa.float32()),
        "box_xyxy": pa.FixedSizeListArray.from_arrays(
            pa.array(rows["box"].reshape(-1), pa.float32()), 4),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(emb.reshape(-1), pa.float16()), emb.shape[1]),
    })


def write_world(reference: Sequence[str], output: str, cameras: int, hours: float,
                start: str = DEFAULT_START, planted_share: float = 0.3, jitter_s: float = 3.0,
                noise: float = 0.5, seed: int = 0) -> dict:
    """Writes the world; returns ``{"files", "rows", "links"}`` (``links``: the planted ones).

    ``hours`` may be fractional (the last hour is cut short)."""
    ref = load_reference(reference)
    start_ms = int(dt.datetime.fromisoformat(start).timestamp() * 1000)
    end_ms = int(round(hours * HOUR_MS))
    files, total = [], 0
    for hour in range(int(np.ceil(hours))):
        previous = None
        for k in range(cameras):
            rows = _camera_hour(ref, k, hour, seed)
            if previous is not None:
                rng = np.random.default_rng([seed, k, hour])
                rows = _plant(rows, previous, k, hour, planted_share, jitter_s, noise,
                              ref.spread, rng)
            previous = rows
            inside = rows["ts"] < end_ms
            kept = {name: values[inside] for name, values in rows.items() if name != "rows"}
            if not len(kept["ts"]):
                continue
            stamp = dt.datetime.fromtimestamp((start_ms + hour * HOUR_MS) / 1000, dt.timezone.utc)
            path = os.path.join(output, camera_name(k), stamp.strftime("%Y-%m-%d-%H") + ".parquet")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            table = _table(camera_name(k), kept, start_ms)
            per_group = max(1, int(len(table) * ROW_GROUP_S * 1000 / HOUR_MS))
            pq.write_table(table, path, compression="zstd", row_group_size=per_group,
                           use_dictionary=[f.name for f in table.schema if f.name != "embedding"])
            files.append(path)
            total += len(table)
    return {"files": files, "rows": total, "links": links_truth(cameras, jitter_s)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", nargs="+", required=True, metavar="PARQUET",
                        help="Detections Parquet files to build from (real embeddings).")
    parser.add_argument("--output", required=True, help="Folder to write the world into.")
    parser.add_argument("--cameras", type=int, default=5)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--start", default=DEFAULT_START, help="ISO time of the first hour.")
    parser.add_argument("--planted-share", type=float, default=0.3,
                        help="Share of a camera's rows seen again downstream (default 0.3).")
    parser.add_argument("--noise", type=float, default=0.5,
                        help="Embedding noise of re-seen rows, in per-dimension spreads.")
    parser.add_argument("--seed", type=int, default=0)


def run_from_args(args) -> int:
    import json

    world = write_world(args.reference, args.output, args.cameras, args.hours, args.start,
                        args.planted_share, noise=args.noise, seed=args.seed)
    with open(os.path.join(args.output, "links_truth.json"), "w") as handle:
        json.dump(world["links"], handle, indent=2)
    print("done: %d rows in %d files, %d planted links -> %s"
          % (world["rows"], len(world["files"]), len(world["links"]), args.output))
    return 0


COMMAND = Command(
    "stored detections of N cameras x H hours built from real ones, with planted "
    "links: inputs for scale tests and benchmarks",
    (), run_from_args, add_arguments=add_arguments)
