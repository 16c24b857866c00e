"""Calibration finds planted camera links and no others; the time-shift control

The end-to-end half (Beam pipelines, servers, the long cases); the pure half, the
module's full description and the helpers both use are in tests/unit/test_calibration.py.
"""
import apache_beam as beam
import numpy as np
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from conftest import collect
from transforms.calibration import CalibrationPairs, links_of_pairs
from transforms.evaluation import EvaluateWithControl
from transforms.matching import MatchDetections


class _LinksFn(beam.DoFn):
    """One camera pair's dt lists -> its links (links_of_pairs, default thresholds)."""

    def __init__(self, max_gap_s: float):
        self.max_gap_s = max_gap_s

    def process(self, pair_dts):
        yield from links_of_pairs(dict([pair_dts]), self.max_gap_s)[0]


class CalibrateLinks(beam.PTransform):
    """Detection dicts -> link dicts (links.json objects), in one job: CalibrationPairs,
    then links_of_pairs per camera pair (``cctview calibrate`` runs the same two steps
    over time chunks)."""

    def __init__(self, cameras, span_ms, max_gap_s: float):
        super().__init__()
        self._pairs = CalibrationPairs(cameras, span_ms, max_gap_s)
        self._links = _LinksFn(max_gap_s)

    def expand(self, detections):
        return (detections
                | "Pairs" >> self._pairs
                | "FindLinks" >> beam.ParDo(self._links))


def _world(seed=0, vehicles=1500, span_s=3600, transit=25.0, jitter=2.0, dim=16, sigma=0.9,
           shuffle=False):
    """Cameras c1 -> c2 (transit s later, for half the vehicles) and an unrelated c3."""
    rng = np.random.default_rng(seed)
    identity = rng.normal(size=(vehicles, dim)).astype(np.float32)
    t1 = np.sort(rng.uniform(0, span_s, vehicles))
    dets, owner = [], {}

    def add(camera, vehicle, t_s):
        det_id = "%s-%d-%d" % (camera, vehicle, len(dets))
        owner[det_id] = vehicle
        dets.append({"camera_id": camera, "frame_ts_ms": int(1_600_000_000_000 + t_s * 1000),
                     "detection_id": det_id,
                     "embedding": identity[vehicle] + rng.normal(0, sigma, dim).astype(np.float32)})

    for v in range(vehicles):
        add("c1", v, t1[v])
        if v % 2 == 0:
            add("c2", v, (t1[v] + rng.normal(transit, jitter)) % span_s)
    others = rng.normal(size=(vehicles // 2, dim)).astype(np.float32)
    for k, t in enumerate(rng.uniform(0, span_s, vehicles // 2)):
        owner_id = vehicles + k
        dets.append({"camera_id": "c3", "frame_ts_ms": int(1_600_000_000_000 + t * 1000),
                     "detection_id": "c3-%d" % k,
                     "embedding": others[k] + rng.normal(0, sigma, dim).astype(np.float32)})
        owner["c3-%d" % k] = owner_id
    if shuffle:
        times = rng.permutation([d["frame_ts_ms"] for d in dets])
        for d, t in zip(dets, times):
            d["frame_ts_ms"] = int(t)
    return dets, owner


def _span(dets):
    ts = [d["frame_ts_ms"] for d in dets]
    return min(ts), max(ts) + 1000


def _run(transform, dets):
    p = beam.Pipeline(runner=FnApiRunner())
    out = collect(p | beam.Create(dets, reshuffle=False) | transform, "out")
    p.run().wait_until_finish()
    return out


def test_calibrate_finds_the_planted_link_only():
    dets, _ = _world()
    links = _run(CalibrateLinks(["c1", "c2", "c3"], _span(dets), max_gap_s=120), dets)
    assert [(l["camera_a"], l["camera_b"]) for l in links] == [("c1", "c2")]
    assert abs(links[0]["offset_s"] - 25) <= 2 and links[0]["spread_s"] <= 10
    shuffled, _ = _world(shuffle=True)
    assert _run(CalibrateLinks(["c1", "c2", "c3"], _span(shuffled), max_gap_s=120),
                shuffled) == []


def test_time_shift_estimate_matches_true_precision():
    """Pairwise matching (policy all + threshold): each pair stands on its own, as the
    estimator assumes. (With competing policies such as mutual NN, true pairs keep their
    detections from false pairs that the control still forms: the estimate is then a
    lower bound, conservative when true pairs are plentiful.)"""
    dets, owner = _world(seed=3, vehicles=3000, sigma=0.8)
    dets = [d for d in dets if d["camera_id"] != "c3"]
    make = lambda links: MatchDetections(policy="all", threshold=3.6, window_s=600,  # noqa
                                         links=links)
    rows = _run(EvaluateWithControl(make, ["c1", "c2"], None, max_gap_s=120), dets)
    assert len(rows) == 1
    estimate = rows[0]["precision"]
    matches = _run(MatchDetections(policy="all", threshold=3.6, max_gap_s=120, window_s=600),
                   dets)
    true = np.mean([owner[m["detection_id_a"]] == owner[m["detection_id_b"]] for m in matches])
    assert rows[0]["real"] == len(matches)
    assert 0.2 < true < 0.95, true
    assert abs(estimate - true) <= 0.05, (estimate, true)


def _copies_shuffled(transform, dets) -> int:
    """The embedding copies ``transform`` sends through its shuffle (a counter)."""
    from apache_beam.metrics.metric import MetricsFilter

    p = beam.Pipeline(runner=FnApiRunner())
    _ = p | beam.Create(dets, reshuffle=False) | transform
    result = p.run()
    result.wait_until_finish()
    return sum(c.committed for c in result.metrics().query(
        MetricsFilter().with_name("embedding_copies_shuffled"))["counters"])


def test_the_control_travels_in_the_real_pairs_copies():
    """Calibration's real pairs and control together shuffle no more copies of each
    embedding than the real pairs' matching alone (the control once travelled as a
    second set: 2.6 copies against 1.5)."""
    dets, _ = _world(vehicles=600)
    cameras = ["c1", "c2", "c3"]
    links = [{"camera_a": a, "camera_b": b, "offset_s": 0.0, "spread_s": 120.0}
             for i, a in enumerate(cameras) for b in cameras[i + 1:]]
    both = _copies_shuffled(CalibrationPairs(cameras, _span(dets), max_gap_s=120), dets)
    real = _copies_shuffled(MatchDetections(policy="mutual", links=links), dets)
    assert 0 < both <= real
