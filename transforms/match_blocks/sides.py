"""Block sides: the detections of one camera in a block, sorted by (ts, id), embeddings
prepared for the metric."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from transforms.match_blocks.kernels import prepare_embeddings
from transforms.match_blocks.wire import Batch, sorted_by_ts_id

__all__ = ["Side", "make_side", "side_from_batches", "id_ranks"]


class Side(NamedTuple):
    """One side of a block: detections of one camera sorted by (ts, id).

    ``emb`` is already prepared for the metric (see prepare_embeddings).
    """
    camera_id: str
    ids: np.ndarray  # str (unicode) array
    ts: np.ndarray  # int64 ms
    emb: np.ndarray  # (n, D) float32

    def __len__(self):
        return len(self.ids)

    def take(self, sl) -> "Side":
        return Side(self.camera_id, self.ids[sl], self.ts[sl], self.emb[sl])


def make_side(camera_id: str, ids: Sequence[str], ts: Sequence[int], emb, metric: str) -> Side:
    """Builds a Side sorted by (ts, id) with prepared float32 embeddings."""
    ids = np.asarray([str(i) for i in ids], dtype=str)
    ts = np.asarray(ts, dtype=np.int64).reshape(-1)
    e = prepare_embeddings(emb, metric)
    if len(ids) == 0:
        e = e.reshape(0, e.shape[-1] if e.ndim == 2 else 0)
    if not len(ids) == len(ts) == e.shape[0]:
        raise ValueError("ids, ts and embeddings disagree in length")
    order = np.lexsort((ids, ts))
    return Side(str(camera_id), ids[order], ts[order], e[order])


def side_from_batches(camera_id: str, batches: Sequence[Batch], metric: str,
                      keep: Optional[Sequence[np.ndarray]] = None,
                      out: Optional[np.ndarray] = None) -> Side:
    """Concatenates batches (optionally only the ``keep`` masks' rows) into a Side.

    The embeddings are converted to float32 once, straight into the Side's array (a
    float16 batch is never copied as float32 first; with ``out``, a float32 array of
    exactly the rows' shape, into it), and reordered only when the batches are not
    already in (ts, id) order.
    """
    if keep is not None:
        batches = [b.take(k) for b, k in zip(batches, keep)]
    batches = [b for b in batches if len(b)]
    if not batches:
        return make_side(camera_id, [], [], np.zeros((0, 0), np.float32), metric)
    if len(batches) > 1:
        batches = sorted(batches, key=lambda b: (int(b.ts[0]), str(b.ids[0])))
    ids = np.concatenate([np.asarray(b.ids, dtype=str) for b in batches])
    ts = np.concatenate([np.asarray(b.ts, dtype=np.int64) for b in batches])
    embs = [np.asarray(b.emb).reshape(len(b), -1) for b in batches]
    if len({e.shape[1] for e in embs}) > 1:
        raise ValueError("embedding dimensions differ within camera %s" % (camera_id,))
    shape = (len(ids), embs[0].shape[1])
    emb = np.empty(shape, np.float32) if out is None else out
    np.concatenate(embs, out=emb, casting="same_kind")
    if len(ids) > 1 and not sorted_by_ts_id(ts, ids):
        order = np.lexsort((ids, ts))
        ids, ts, emb = ids[order], ts[order], emb[order]
    return Side(str(camera_id), ids, ts, prepare_embeddings(emb, metric))


def id_ranks(ids: np.ndarray) -> np.ndarray:
    """rank[i] = position of ids[i] in string order (ids unique)."""
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[np.argsort(ids, kind="stable")] = np.arange(len(ids), dtype=np.int64)
    return ranks
