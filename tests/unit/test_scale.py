"""Matching and calibration over long periods: the scale world, time chunks that change
nothing, and a shuffle whose copies do not grow with the number of partner cameras.

The worlds are small `cctview scale-world` outputs (real reference embeddings, planted
links), made once per session; the commands run in-process as a user runs them.
"""


def test_chunk_plan_covers_every_row_once_and_skips_gaps():
    from pipelines.chunks import plan_chunks
    from transforms.detections_io import FileSpan

    hour = 3_600_000
    spans = [FileSpan("a", [(1000, 0, hour - 1), (1000, hour, 2 * hour - 1)]),
             FileSpan("b", [(500, 10 * hour, 10 * hour + 600_000)])]
    chunks = plan_chunks(spans, margin_ms=600_000, align_ms=1_200_000, max_rows=800)
    owned = [c.owned_ms for c in chunks]
    assert all(a[1] <= b[0] for a, b in zip(owned, owned[1:]))  # disjoint, in order
    for t in (0, hour - 1, hour, 2 * hour - 1, 10 * hour, 10 * hour + 600_000):
        assert sum(lo <= t < hi for lo, hi in owned) == 1  # every row owned exactly once
    for c in chunks:
        assert c.read_ms[0] <= c.owned_ms[0] - 600_000 and c.read_ms[1] >= c.owned_ms[1] + 600_000
        assert c.files == (["b"] if c.owned_ms[0] >= 9 * hour else ["a"])
    assert len(chunks) < 12  # the 8-hour gap costs no chunk of its own
    whole = plan_chunks(spans, 600_000, 1_200_000, 0)
    assert len(whole) == 1 and whole[0].owned_ms is None and whole[0].files == ["a", "b"]
