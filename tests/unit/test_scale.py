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


def test_camera_groups_hold_what_one_step_of_a_chunk_fits():
    """50 cameras in a chain, one file each: when the smallest chunk of all of them
    outgrows the budget, pairs run in groups of consecutive cameras, each pair once;
    a file of several cameras counts for a group in the share of them it holds."""
    from pipelines.chunks import camera_groups
    from transforms.detections_io import FileSpan

    hour = 3_600_000
    cams = ["c%02d" % i for i in range(50)]
    spans = [FileSpan(c, [(3600, 0, hour - 1)], 4, (c,)) for c in cams]
    chain = [(a, b) for a, b in zip(cams, cams[1:])]
    # the smallest chunk (600 s step + 2 x 600 s margins) holds 1,800 rows per camera
    groups = camera_groups(chain, spans, 600_000, 600_000, max_rows=18_000)
    assert len(groups) > 1
    assert sorted(p for g, _ in groups for p in g) == chain  # each pair once
    for pairs, group_spans in groups:
        held = {c for p in pairs for c in p}
        assert len(held) <= 10 and [s.path for s in group_spans] == sorted(held)
    assert len(camera_groups(chain, spans, 600_000, 600_000, max_rows=10 ** 7)) == 1
    assert len(camera_groups(chain, spans, 600_000, 600_000, max_rows=0)) == 1
    shared = [FileSpan("all", [(5000, 0, hour - 1)], 4, tuple(cams[:5]))]
    (_, scaled), *_ = camera_groups([("c00", "c01"), ("c02", "c03")], shared, 600_000,
                                    600_000, max_rows=600)
    assert scaled[0].rows == 2000  # 2 of the file's 5 cameras
