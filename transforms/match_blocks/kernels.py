"""The distance kernel: float32 matrix products tile by tile, in reused buffers.

Memory: one ``q_tile x r_tile`` tile (plus its work buffer) per call, whatever the
sizes of the two sides."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

# Distance tiles: 1024 x 4096 cells = 16 MiB of float32 per buffer.
__all__ = ["DEFAULT_Q_TILE", "DEFAULT_R_TILE", "prepare_embeddings", "row_norms",
           "Prepared", "prepare_side", "finite_block", "tile_buffer", "Workspace",
           "raw_distances", "finish_distances", "exact_distances", "pair_distances"]


DEFAULT_Q_TILE = 1024
DEFAULT_R_TILE = 4096

def prepare_embeddings(emb, metric: str) -> np.ndarray:
    """(n, D) float32, C-contiguous; rows L2-normalised for ``cosine`` (zero rows stay 0)."""
    e = np.asarray(emb, dtype=np.float32)
    if e.ndim == 1:
        e = e.reshape(1, -1) if e.size else e.reshape(0, 0)
    e = np.ascontiguousarray(e)
    if metric == "cosine" and e.size:
        norms = np.sqrt(np.einsum("ij,ij->i", e, e, dtype=np.float32))
        safe = np.where(norms > 0, norms, np.float32(1.0)).astype(np.float32)
        e = np.ascontiguousarray(e / safe[:, None])
    return e


def row_norms(e: np.ndarray) -> np.ndarray:
    """Squared L2 norm of each row, float32 (the ``|q|^2`` of the l2 distance)."""
    return np.einsum("ij,ij->i", e, e, dtype=np.float32)


class Prepared(NamedTuple):
    """A block side ready for :func:`raw_distances`: the embeddings (for the query side
    of l2, times 2: exact in float32, so ``(2q) @ r.T == 2 (q @ r.T)`` bit for bit) and,
    for l2, the rows' :func:`row_norms` of the unscaled embeddings."""
    emb: np.ndarray
    norms: Optional[np.ndarray]

    def rows(self, i0: int, i1: int) -> "Prepared":
        return Prepared(self.emb[i0:i1], None if self.norms is None else self.norms[i0:i1])


def prepare_side(emb: np.ndarray, metric: str, role: str,
                 workspace: Optional["Workspace"] = None) -> Prepared:
    """``role`` ``"q"`` (query) or ``"r"`` (reference) rows for :func:`raw_distances`."""
    if metric != "l2":
        return Prepared(emb, None)
    norms = row_norms(emb)
    if role == "q":
        out = None if workspace is None else workspace.get("q2", emb.shape)
        emb = np.multiply(emb, np.float32(2.0), out=out, dtype=np.float32)
    return Prepared(emb, norms)


def finite_block(q: Prepared, r: Prepared, metric: str) -> bool:
    """True when every :func:`raw_distances` value of the two sides is finite (finite
    embeddings and norms small enough that no sum or product can overflow), so tiles
    need no NaN/inf check."""
    if metric == "l2":
        if not (len(q.norms) and len(r.norms)):
            return True
        bound = float(q.norms.max()) + float(r.norms.max())
        return bool(np.isfinite(q.norms).all() and np.isfinite(r.norms).all()
                    and bound < 1e37)
    return bool(np.isfinite(q.emb).all() and np.isfinite(r.emb).all())


def tile_buffer(buf: Optional[np.ndarray], n: int, m: int, dtype=np.float32) -> np.ndarray:
    """An (n, m) C-contiguous view of the flat ``buf`` when it is large enough, else new."""
    if buf is None or buf.size < n * m:
        return np.empty((n, m), dtype=dtype)
    return buf[:n * m].reshape(n, m)


class Workspace:
    """Scratch arrays reused from block to block (by name), so that every block after the
    first writes into memory already mapped instead of faulting in fresh pages (blocks
    are tens of MB). An array from :meth:`get` is valid until the next :meth:`get` of
    the same name; nothing that outlives a block may point into one."""

    def __init__(self):
        self._buffers: dict = {}

    def get(self, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
        n = 1
        for s in shape:
            n *= int(s)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != np.dtype(dtype) or buf.size < n:
            grown = n if buf is None or buf.dtype != np.dtype(dtype) else max(n, buf.size * 5 // 4)
            buf = self._buffers[name] = np.empty(grown, dtype=dtype)
        return buf[:n].reshape(shape)


def raw_distances(q: Prepared, r: Prepared, metric: str, out: Optional[np.ndarray] = None,
                  work: Optional[np.ndarray] = None) -> np.ndarray:
    """(n, m) float32 between :func:`prepare_side` rows: l2: ``(|q|^2 + |r|^2) - 2 q.r``,
    the squared distance before the clamp at 0 (finish with :func:`finish_distances`);
    cosine: the distance ``1 - q.r`` clipped to [0, 2]. ``out``/``work``: flat float32
    buffers to reuse from tile to tile (the result is a view of ``out``)."""
    if q.emb.shape[1] != r.emb.shape[1]:
        raise ValueError("embedding dimensions differ: %d vs %d"
                         % (q.emb.shape[1], r.emb.shape[1]))
    n, m = q.emb.shape[0], r.emb.shape[0]
    x = tile_buffer(out, n, m)
    if metric == "cosine":
        np.matmul(q.emb, r.emb.T, out=x)
        np.subtract(np.float32(1.0), x, out=x)
        np.clip(x, np.float32(0.0), np.float32(2.0), out=x)
        return x
    prod2 = tile_buffer(work, n, m)
    np.matmul(q.emb, r.emb.T, out=prod2)
    np.add(q.norms[:, None], r.norms[None, :], out=x)
    x -= prod2
    return x


def finish_distances(x: np.ndarray, metric: str) -> np.ndarray:
    """:func:`raw_distances` values -> distances, in place (l2: ``sqrt(max(x, 0))``)."""
    if metric == "l2":
        np.maximum(x, np.float32(0.0), out=x)
        np.sqrt(x, out=x)
    return x


def exact_distances(q: np.ndarray, r: np.ndarray, metric: str, qi: np.ndarray,
                    rj: np.ndarray, rows: int = 64) -> np.ndarray:
    """Distances of the cells ``(q[qi[n]], r[rj[n]])`` of two prepared float32 arrays,
    computed in float64 and returned as float32 (non-finite -> +inf).

    The same two embeddings give the same value wherever they are compared: a cell of a
    matrix product can differ in its last bit with the shape of the tile it is computed
    in, which depends on which other detections a job holds (a time chunk of a period,
    a backfill partition). ``rows`` cells at a time: their float64 temporaries stay in
    cache (64 rows of 1920-d: 1 MB; 4096 rows ran 2x slower)."""
    out = np.empty(len(qi), np.float32)
    for i in range(0, len(qi), rows):
        # Gathered rows converted to float64 first: numpy's float32 -> float64 casting
        # inside a ufunc or einsum runs buffered and is ~2x slower than astype.
        a = q[qi[i:i + rows]].astype(np.float64)
        b = r[rj[i:i + rows]].astype(np.float64)
        if metric == "cosine":
            d = np.clip(1.0 - np.einsum("ij,ij->i", a, b), 0.0, 2.0)
        else:
            a -= b  # exact: float32 - float32
            d = np.sqrt(np.einsum("ij,ij->i", a, a))
        out[i:i + rows] = d
    out[~np.isfinite(out)] = np.inf
    return out


def pair_distances(q: np.ndarray, r: np.ndarray, metric: str) -> np.ndarray:
    """(n, m) float32 distances between prepared embeddings (see prepare_embeddings)."""
    if q.shape[1] != r.shape[1]:
        raise ValueError("embedding dimensions differ: %d vs %d" % (q.shape[1], r.shape[1]))
    return finish_distances(raw_distances(prepare_side(q, metric, "q"),
                                          prepare_side(r, metric, "r"), metric), metric)
