"""A proven bound on the error of a float32 distance tile, per line (row or column).

Nearest neighbours (:func:`~transforms.match_blocks.neighbours.neighbour_block`) use a
tile's values only to choose the cells they recompute exactly (in float64): a cell is
recomputed when its tile value is within its line's k-th smallest value plus a margin.
A relative margin on the squared distance is not enough when two embeddings are nearly
equal: ``|q|^2 + |r|^2 - 2 q.r`` then cancels, and its float32 rounding, about 2^-24
of ``|q|^2 + |r|^2``, can exceed the squared distance itself (rows a millionth apart
came out in the wrong order). The *slack* of a line bounds the error of each of its
cells against the exact value:

    product     |fl(q.r) - q.r| <= gamma_D |q| |r|,  gamma_D = D 2^-24 / (1 - D 2^-24)
    norms       gamma_D (|q|^2 + |r|^2)          (l2: float32 sums of squares)
    additions   2^-23 (|q|^2 + |r|^2 + |q.r|)   (l2; cosine's ``1 - p``: 2^-23 (1 + |p|))

for any summation order (so whatever tile shape BLAS chose), with ``|q.r| <= |q| |r|``
and the other side's largest norms. A cell among a line's first k exactly then has a
tile value within the line's k-th smallest tile value plus twice the slack (each value
may be off by one slack): the selection rule. On real 1920-d embeddings it adds about
3% to the recomputed cells (docs/scale.md, which also says why the tiles stay float32).

Memory: O(rows) per side.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from transforms.match_blocks.kernels import row_norms

__all__ = ["row_sizes", "line_slack"]

_F32 = 2.0 ** -23  # twice float32's unit roundoff
_NORM_ERR = 1.0 + 1e-3  # square roots and products of the norms, rounded up generously


def row_sizes(emb: np.ndarray, squared_norms: Optional[np.ndarray] = None,
              scale: float = 1.0) -> np.ndarray:
    """The L2 norm of each multiplied row, float64, rounded up: ``scale`` times the
    square root of ``squared_norms`` when the caller has them (l2's prepared norms, of
    the rows before the query side's scaling by 2), else of ``emb``'s rows."""
    if squared_norms is None:
        squared_norms = row_norms(emb)
    sums_err = 1.0 + _gamma(emb.shape[1] if emb.ndim == 2 else 0)  # of the float32 sums
    return np.sqrt(squared_norms.astype(np.float64) * sums_err) * (scale * _NORM_ERR)


def _gamma(dim: int) -> float:
    """The relative bound on a float32 sum of ``dim`` terms, any order."""
    return dim * 2.0 ** -24 / (1.0 - dim * 2.0 ** -24)


def line_slack(q_sizes: np.ndarray, r_sizes: np.ndarray, q_norms: Optional[np.ndarray],
               r_norms: Optional[np.ndarray], dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """(per query row, per reference row) float32 bounds on the error of any finite tile
    value of the line (module docstring; 0 for a row of NaN or inf). ``*_sizes``:
    :func:`row_sizes` of the rows that are multiplied; ``*_norms``: the squared norms
    added to the product for l2 (None for cosine, whose tile value is ``1 - p``)."""
    gamma = _gamma(dim)

    def top(values) -> float:  # the largest finite value (rows of NaN/inf never match)
        finite = None if values is None else values[np.isfinite(values)]
        return float(finite.max()) if finite is not None and len(finite) else 0.0

    def slack(sizes, other_sizes, norms, other_norms):
        product = sizes * top(other_sizes)
        added = 1.0 if norms is None else norms.astype(np.float64) + top(other_norms)
        bound = ((gamma + _F32) * (product + added)) * _NORM_ERR
        return _up32(np.where(np.isfinite(bound), bound, 0.0))

    return (slack(q_sizes, r_sizes, q_norms, r_norms),
            slack(r_sizes, q_sizes, r_norms, q_norms))


def _up32(values: np.ndarray) -> np.ndarray:
    """float64 -> float32, rounded up (a bound must not shrink in the cast)."""
    out = values.astype(np.float32)
    low = out.astype(np.float64) < values
    out[low] = np.nextafter(out[low], np.float32(np.inf))
    return out
