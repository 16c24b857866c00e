"""A small learned score for candidate match pairs (torch + numpy, no apache_beam).

Why a learned score: on real footage the re-identification embeddings separate
vehicles weakly, so no single distance threshold tells a true cross-camera pair from
a look-alike. What does tell them apart is a *combination* of weak cues (distance,
how much better than the next candidate it is, box sizes and image zones, the
transit time). The data itself supplies the training signal: candidate pairs of the
real alignment are a mixture of true and false pairs (label 1), candidate pairs of a
time-shifted alignment are false by construction (label 0). A classifier that
separates the two learns, up to a monotone transform, the likelihood ratio of
"true pair" against "chance pair", which is exactly what a match score must rank by
(see :mod:`transforms.learned_matching`).

Why this shape: a standardiser (features have wildly different scales: pixels,
seconds, distances) plus a 2-hidden-layer ReLU MLP. That is enough to model
interactions such as "small distance *and* an unusually close look-alike *and* both
boxes in the lanes that connect *and* a typical transit time", small enough to train
in seconds on one CPU thread and to have little capacity for memorising individual
detections (which would inflate estimates made with held-out data).

Why these defaults (measured on the reference footage, excess of real over a frozen
time-shift control at precision ~0.7, see transforms/learned_matching.py): the
training set size mattered most -- 60k rows per class gave an excess of ~210 pairs,
250k (all there is for a half-hour camera pair and fold) ~550; 64 hidden units
~560-630 vs ~470 for 32; batches of 4096 at a higher rate were worse (~455). A
fit of 250k + 250k rows takes ~5 s.

Training is deterministic: a fixed seed, a private RNG for subsampling and
shuffling, the network initialised under a forked torch RNG, and one torch thread
during ``fit``/``score``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np

__all__ = ["PairScorer"]


@contextlib.contextmanager
def _torch_threads(n: int):
    """Runs the block with ``n`` intra-op torch threads, restoring the previous count.

    One thread makes float reductions run in a fixed order (bitwise reproducible
    results) and keeps the scorer from competing with the pipeline's other work.
    """
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield torch
    finally:
        torch.set_num_threads(prev)


class PairScorer:
    """Standardisation + MLP, trained with logistic loss; higher score = more likely real.

    Args:
      hidden: units per hidden layer (2 layers).
      epochs: passes over the (subsampled) training set.
      max_per_class: the training set is a class-balanced random subsample of at most
        this many rows per class. Balancing keeps the decision scale comparable
        between groups of different sizes; the cap bounds the training time (~5 s per
        fit at the default, one thread) whatever the size of the input.
      lr, weight_decay, batch_size: Adam settings.
      threads: torch threads used by fit/score (1 = reproducible and polite).
    """

    def __init__(self, hidden: int = 64, epochs: int = 6, max_per_class: int = 250_000,
                 lr: float = 5e-3, weight_decay: float = 1e-5, batch_size: int = 2048,
                 threads: int = 1):
        self.hidden = int(hidden)
        self.epochs = int(epochs)
        self.max_per_class = int(max_per_class)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.threads = int(threads)
        self.mean_: Optional[np.ndarray] = None
        self.scale_: Optional[np.ndarray] = None
        self.net_ = None
        self.n_train_: tuple = (0, 0)

    # ------------------------------------------------------------------ training
    def fit(self, X: np.ndarray, y: np.ndarray, seed: int = 0) -> "PairScorer":
        """Fits on features ``X`` (n, f) and labels ``y`` (n,) in {0, 1}.

        Deterministic for a given ``seed`` and input. Non-finite feature values are
        replaced by 0 after standardisation (i.e. by the mean). Raises ValueError if a
        class is missing.
        """
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y).reshape(-1).astype(bool)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError("X must be (n, f) and y (n,)")
        pos, neg = np.nonzero(y)[0], np.nonzero(~y)[0]
        if len(pos) == 0 or len(neg) == 0:
            raise ValueError("both classes are needed to fit (got %d positive, %d negative)"
                             % (len(pos), len(neg)))
        rng = np.random.default_rng(seed)
        m = min(len(pos), len(neg), self.max_per_class)
        pos = np.sort(rng.choice(pos, m, replace=False)) if len(pos) > m else pos
        neg = np.sort(rng.choice(neg, m, replace=False)) if len(neg) > m else neg
        idx = np.concatenate([pos, neg])
        Xs, ys = X[idx], y[idx].astype(np.float32)
        # Weights so that each class counts equally even when one is smaller than m.
        w = np.where(ys > 0, 0.5 * len(idx) / len(pos), 0.5 * len(idx) / len(neg))
        w = w.astype(np.float32)
        finite = np.isfinite(Xs)
        cnt = np.maximum(finite.sum(0), 1)
        mean = np.where(finite, Xs, 0).sum(0) / cnt
        var = np.where(finite, (Xs - mean) ** 2, 0).sum(0) / cnt
        scale = np.sqrt(var)
        scale[~(scale > 1e-12)] = 1.0
        self.mean_, self.scale_ = mean.astype(np.float32), scale.astype(np.float32)
        Z = self._standardise(Xs)
        self.n_train_ = (int(len(pos)), int(len(neg)))
        with _torch_threads(self.threads) as torch:
            gen = torch.Generator().manual_seed(int(seed))
            net = self._build(torch, Z.shape[1], gen)
            opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            Zt, yt, wt = torch.from_numpy(Z), torch.from_numpy(ys), torch.from_numpy(w)
            n = len(Zt)
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen)
                for k in range(0, n, self.batch_size):
                    b = perm[k:k + self.batch_size]
                    logit = net(Zt[b]).squeeze(1)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(
                        logit, yt[b], weight=wt[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            net.eval()
        self.net_ = net
        return self

    def _build(self, torch, n_in: int, gen):
        """The MLP, initialised from a seed drawn from ``gen``; the global torch RNG
        state is left as it was (fork_rng), so callers' randomness is not disturbed."""
        nn = torch.nn
        init_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            h = self.hidden
            return nn.Sequential(nn.Linear(n_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                 nn.Linear(h, 1))

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, np.float32) - self.mean_) / self.scale_
        Z[~np.isfinite(Z)] = 0.0
        return np.ascontiguousarray(Z, dtype=np.float32)

    # ------------------------------------------------------------------- scoring
    def score(self, X: np.ndarray, batch: int = 262_144) -> np.ndarray:
        """(n,) float32 logits: higher = more like the real-alignment class."""
        if self.net_ is None:
            raise RuntimeError("PairScorer.score called before fit")
        X = np.asarray(X, dtype=np.float32)
        out = np.empty(len(X), dtype=np.float32)
        with _torch_threads(self.threads) as torch, torch.no_grad():
            for k in range(0, len(X), batch):
                Z = torch.from_numpy(self._standardise(X[k:k + batch]))
                out[k:k + batch] = self.net_(Z).squeeze(1).numpy()
        return out
