"""The wire format of detections between Beam stages: :class:`Batch` as plain bytes
(and the id encoding that the neighbour partials' format shares).

A Batch is detections of one camera in one block of event time. On the wire it is
plain bytes (Beam's coders copy them as they are: no pickled numpy arrays), ids as
UTF-8, embeddings float16 when the values allow it exactly (:func:`compact_embeddings`),
and arrays that decode as views of the received bytes (no copy on the receiving side).

Detections read from stored files need not carry their embeddings at all: a batch's
``emb`` may be :class:`StoredRows`, the place of its rows in a Parquet row group (a
path, a group, row numbers), which the block that computes them reads from storage.
A reference is about 8 bytes a detection instead of ``2 D`` (float16) or ``4 D``.
"""
from __future__ import annotations

import struct
from typing import Iterable, NamedTuple

import numpy as np

__all__ = ["Batch", "StoredRows", "encode_batch", "decode_batch", "encode_ids", "decode_ids", "pad8",
           "make_batches", "batches_from_arrays", "sorted_by_ts_id", "compact_embeddings"]


class StoredRows:
    """Rows of one Parquet row group, by reference: ``rows`` are row numbers within
    group ``row_group`` of the file ``path`` (any Beam filesystem URI). It stands for
    their (n, D) embeddings wherever a :class:`Batch` holds them, and is sliced like
    them (``[sel]``); ``transforms.detections_io.load_stored_rows`` reads them."""
    __slots__ = ("path", "row_group", "rows")

    def __init__(self, path: str, row_group: int, rows: np.ndarray):
        self.path = str(path)
        self.row_group = int(row_group)
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, sel) -> "StoredRows":
        return StoredRows(self.path, self.row_group, self.rows[sel])

    def __eq__(self, other):
        return (isinstance(other, StoredRows) and (self.path, self.row_group)
                == (other.path, other.row_group) and np.array_equal(self.rows, other.rows))

    def __repr__(self):
        return "StoredRows(%r, %d, %d rows)" % (self.path, self.row_group, len(self.rows))


class Batch(NamedTuple):
    """Detections of one camera in one block (what the Beam transform shuffles).

    ``emb`` is raw (float16 or float32, not normalised), or :class:`StoredRows` (where
    they are stored); ``ts`` and ``ids`` are sorted by (ts, id).
    """
    window_start_ms: int
    ids: np.ndarray
    ts: np.ndarray
    emb: np.ndarray
    camera_id: str = ""

    def __len__(self):
        return len(self.ids)

    def take(self, sel) -> "Batch":
        return Batch(self.window_start_ms, self.ids[sel], self.ts[sel], self.emb[sel],
                     self.camera_id)


_BATCH_HEADER = struct.Struct("<4sqqqqq")  # magic, block start, rows, dim, dtype, camera len
_BATCH_MAGIC = b"CVB2"
_BATCH_DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
_STORED = 3  # the dtype code of a batch whose embeddings are StoredRows


def pad8(n: int) -> int:
    return -n % 8


def encode_batch(batch: Batch) -> bytes:
    """A :class:`Batch` as bytes (float16/float32 embeddings kept as they are, any other
    dtype as float32; :class:`StoredRows` as their path, group and row numbers);
    :func:`decode_batch` inverts it."""
    n = len(batch.ids)
    if isinstance(batch.emb, StoredRows):
        code, dim, payload = _STORED, int(batch.emb.row_group), _stored_payload(batch.emb)
    else:
        emb = np.asarray(batch.emb)
        emb = emb.reshape(n, -1) if n else emb.reshape(0, emb.shape[-1] if emb.ndim == 2 else 0)
        code = 1 if emb.dtype == np.float16 else 2
        emb = np.ascontiguousarray(emb, dtype=_BATCH_DTYPES[code])
        dim, payload = emb.shape[1], emb.data
    lens, blob = encode_ids(batch.ids)
    ts = np.ascontiguousarray(batch.ts, dtype="<i8")
    camera = str(batch.camera_id).encode("utf-8")
    header = _BATCH_HEADER.pack(_BATCH_MAGIC, int(batch.window_start_ms), n, dim, code,
                                len(camera))
    return b"".join((header, camera, b"\0" * pad8(len(camera)), lens, ts.data, blob,
                     payload))


def _stored_payload(stored: StoredRows) -> bytes:
    """Row numbers (int64), then the path's UTF-8 length (int64) and the path."""
    path = str(stored.path).encode("utf-8")
    return b"".join((np.ascontiguousarray(stored.rows, dtype="<i8").tobytes(),
                     struct.pack("<q", len(path)), path))


def encode_ids(ids) -> tuple:
    """String ids -> (their UTF-8 lengths as int64 bytes, the joined UTF-8 padded to 8)."""
    encoded = [str(i).encode("utf-8") for i in np.asarray(ids).tolist()]
    lens = np.fromiter((len(i) for i in encoded), dtype="<i8", count=len(encoded))
    blob = b"".join(encoded)
    return lens.tobytes(), blob + b"\0" * pad8(len(blob))


def decode_ids(data, off: int, n: int, lens_off: int) -> tuple:
    """(ids as a str array, the offset after their blob) of :func:`encode_ids`'s output:
    lengths at ``lens_off``, blob at ``off``."""
    lens = np.frombuffer(data, dtype="<i8", count=n, offset=lens_off)
    ends = np.cumsum(lens).tolist()
    view = memoryview(data)
    ids, prev = [], off
    for end in ends:
        ids.append(str(view[prev:off + end], "utf-8"))
        prev = off + end
    blob_len = ends[-1] if ends else 0
    return np.asarray(ids, dtype=str), off + blob_len + pad8(blob_len)


def decode_batch(data: bytes) -> Batch:
    """:func:`encode_batch`'s bytes -> a :class:`Batch` whose ``ts`` and ``emb`` are
    read-only views of ``data``."""
    magic, start, n, dim, code, camera_len = _BATCH_HEADER.unpack_from(data, 0)
    if magic != _BATCH_MAGIC:
        raise ValueError("not an encoded Batch")
    off = _BATCH_HEADER.size
    camera = bytes(data[off:off + camera_len]).decode("utf-8")
    lens_off = off + camera_len + pad8(camera_len)
    ts = np.frombuffer(data, dtype="<i8", count=n, offset=lens_off + 8 * n)
    ids, off = decode_ids(data, lens_off + 16 * n, n, lens_off)
    if code == _STORED:  # ``dim`` holds the row group
        rows = np.frombuffer(data, dtype="<i8", count=n, offset=off)
        (path_len,) = struct.unpack_from("<q", data, off + 8 * n)
        path = bytes(data[off + 8 * n + 8:off + 8 * n + 8 + path_len]).decode("utf-8")
        emb = StoredRows(path, int(dim), rows.astype(np.int64, copy=False))
    else:
        emb = np.frombuffer(data, dtype=_BATCH_DTYPES[code], count=n * dim,
                            offset=off).reshape(n, dim)
    return Batch(int(start), ids, ts.astype(np.int64, copy=False), emb, camera)


def make_batches(window_start_ms: int, records: Iterable[tuple], max_size: int,
                 camera_id: str = "") -> list:
    """``(detection_id, ts_ms, embedding)`` tuples of one block -> Batches of at most
    ``max_size`` detections each, in (ts, id) order."""
    records = list(records)
    if not records:
        return []
    return batches_from_arrays(
        window_start_ms, np.asarray([str(r[0]) for r in records], dtype=str),
        np.asarray([r[1] for r in records], dtype=np.int64),
        np.stack([np.asarray(r[2]).reshape(-1) for r in records]), max_size, camera_id)


def batches_from_arrays(window_start_ms: int, ids: np.ndarray, ts: np.ndarray, emb: np.ndarray,
                        max_size: int, camera_id: str = "") -> list:
    """Detections of one block as arrays -> Batches of at most ``max_size`` detections
    each, in (ts, id) order; embeddings other than float16/float32 become float32
    (:class:`StoredRows` stay references)."""
    if not isinstance(emb, StoredRows) and emb.dtype not in (np.float16, np.float32):
        emb = emb.astype(np.float32)
    if len(ids) > 1 and not sorted_by_ts_id(ts, ids):
        order = np.lexsort((ids, ts))
        ids, ts, emb = ids[order], ts[order], emb[order]
    return [Batch(int(window_start_ms), ids[i:i + max_size], ts[i:i + max_size].astype(np.int64),
                  emb[i:i + max_size], str(camera_id)) for i in range(0, len(ids), max_size)]


def compact_embeddings(emb: np.ndarray) -> np.ndarray:
    """float32 embeddings as float16 when float16 holds every value exactly (a lossless
    halving of what is shuffled; the blocks compute in float32 either way).
    :class:`StoredRows` are returned as they are."""
    if isinstance(emb, StoredRows) or emb.dtype != np.float32 or not emb.size:
        return emb
    with np.errstate(over="ignore", invalid="ignore"):  # out of range: not exact anyway
        half = emb.astype(np.float16)
    return half if np.array_equal(half, emb) else emb


def sorted_by_ts_id(ts: np.ndarray, ids: np.ndarray) -> bool:
    """Whether rows are in (ts, id) order (ids unique)."""
    dts = np.diff(ts)
    if np.any(dts < 0):
        return False
    same = np.nonzero(dts == 0)[0]
    return not len(same) or bool(np.all(ids[same] < ids[same + 1]))
