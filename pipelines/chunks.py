"""A long period of stored detections as consecutive time chunks: one bounded job each.

Why: a Beam runner that holds its shuffles in memory (the DirectRunner in every mode;
Dask holds them in its workers) would hold every embedding of the period at once, so
its memory would grow with the period (one hour of five cameras of 1920-d embeddings
once took 14 GB). Each chunk *owns* a time range of camera-A detections and reads the
detections of that range plus a margin on each side
(:func:`transforms.matching.context_margin_ms`): within the margin lies every
detection that can change an owned pair, so the chunks' matches together are exactly
those of one job over the whole period, and the memory of each job is bounded by the
chunk, not the period. Dataflow shuffles outside the workers' memory: there the whole
period is one job (``--chunk-mb 0``).

The plan is made on the driver from the files' metadata alone (row counts and
``frame_ts`` statistics per row group, :func:`transforms.detections_io.inspect_files`):
rows are taken as spread evenly over each row group's time span, and each chunk grows,
in steps of ``align_ms``, while the embeddings it reads (owned range plus margins) fit
``budget_bytes`` as float32. A chunk is at least one step, whatever the budget.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from transforms.detections_io import FileSpan

__all__ = ["Chunk", "camera_groups", "plan_chunks", "rows_budget"]


class Chunk(NamedTuple):
    """One job of a chunked run: ``owned_ms`` and ``read_ms`` are ``(lo, hi)`` epoch ms
    (None: the whole period, no filter), ``files`` the files that hold rows to read,
    ``rows`` the rows expected in ``read_ms``."""
    index: int
    owned_ms: Optional[Tuple[int, int]]
    read_ms: Optional[Tuple[int, int]]
    files: List[str]
    rows: int


def rows_budget(budget_bytes: int, dim: int) -> int:
    """Detections whose float32 embeddings of ``dim`` values fit ``budget_bytes``."""
    return max(1, int(budget_bytes) // max(1, 4 * int(dim)))


def _groups(spans: Sequence[FileSpan]):
    rows = np.asarray([g[0] for s in spans for g in s.groups], np.float64)
    first = np.asarray([g[1] for s in spans for g in s.groups], np.int64)
    last = np.asarray([g[2] for s in spans for g in s.groups], np.int64) + 1
    return rows, first, last


def _rows_in(groups, lo: int, hi: int) -> float:
    """Rows expected in ``[lo, hi)``: each group's rows spread evenly over its span."""
    rows, first, last = groups
    overlap = np.clip(np.minimum(last, hi) - np.maximum(first, lo), 0, None)
    return float((rows * overlap / np.maximum(last - first, 1)).sum())


def plan_chunks(spans: Sequence[FileSpan], margin_ms: int, align_ms: int,
                max_rows: int) -> List[Chunk]:
    """Consecutive chunks of the period of ``spans`` (see the module docstring);
    ``max_rows <= 0``: one chunk, the whole period."""
    total = sum(s.rows for s in spans)
    groups = _groups(spans)
    if max_rows <= 0 or not len(groups[0]) or total <= max_rows:
        return [Chunk(0, None, None, [s.path for s in spans], total)]
    align = max(1, int(align_ms))
    margin = int(margin_ms)
    start = int(groups[1].min()) // align * align
    end = int(groups[2].max())
    chunks, lo = [], start
    while lo < end:
        if _rows_in(groups, lo, lo + align) == 0:  # a gap in the data: to its end
            later = groups[1][groups[2] > lo + align]
            lo = max(lo + align, int(later.min()) // align * align) if len(later) else end
            continue
        hi = lo + align
        while hi < end and _rows_in(groups, lo - margin, hi + align + margin) <= max_rows:
            hi += align
        read = (lo - margin, hi + margin)
        files = [s.path for s in spans
                 if any(g[0] and g[2] >= read[0] and g[1] < read[1] for g in s.groups)]
        chunks.append(Chunk(len(chunks), (lo, hi), read, files,
                            int(round(_rows_in(groups, *read)))))
        lo = hi
    return chunks


def camera_groups(pairs: Sequence[Tuple[str, str]], spans: Sequence[FileSpan], margin_ms: int,
                  align_ms: int, max_rows: int) -> List[Tuple[list, List[FileSpan]]]:
    """Camera pairs cut into groups whose chunks can fit ``max_rows``: ``[(pairs, spans of
    their cameras)]``, each pair in one group.

    A chunk reads at least one step plus the margins of all the cameras it holds, so
    with many cameras (50 within +-300 s: half an hour of 50 cameras, 3 GB of
    float32 embeddings) even the smallest chunk outgrows the budget. Results per camera
    pair depend on that pair's two cameras only (mutual nearest neighbours of a and b),
    so pairs can run in groups of at most as many cameras as the smallest chunk fits
    (at the cameras' mean density; at least two). Pairs are taken in order, so
    neighbours along a road (a -> b, b -> c, ...) share a group and each camera is read
    by about one group. A file's rows count for a group in the share of its cameras
    the group holds. ``max_rows <= 0``: one group."""
    pairs = sorted(pairs)
    cameras = sorted({c for p in pairs for c in p})
    if max_rows <= 0 or len(cameras) <= 2:
        return [(pairs, list(spans))]
    rows, first, last = _groups(_spans_of(set(cameras), spans))
    held_rows = rows > 0
    if not held_rows.any():
        return [(pairs, list(spans))]
    period = int(last[held_rows].max()) - int(first[held_rows].min())
    per_camera = rows.sum() / len(cameras) * min(1.0, (align_ms + 2 * margin_ms) / max(1, period))
    fit = max(2, int(max_rows // max(per_camera, 1.0)))
    groups: List[list] = []
    held: set = set()
    for pair in pairs:
        if not groups or len(held | set(pair)) > fit:
            groups.append([])
            held = set()
        groups[-1].append(pair)
        held |= set(pair)
    return [(g, _spans_of({c for p in g for c in p}, spans)) for g in groups]


def _spans_of(cameras: set, spans: Sequence[FileSpan]) -> List[FileSpan]:
    """The spans that hold any of ``cameras``, their rows scaled to the share of their
    cameras among them."""
    out = []
    for span in spans:
        share = len(cameras & set(span.cameras)) / max(1, len(span.cameras))
        if share:
            groups = [(int(round(g[0] * share)),) + tuple(g[1:]) for g in span.groups]
            out.append(span._replace(groups=groups))
    return out
