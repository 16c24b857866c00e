"""Tests of models/: weights, detectors, embedders, the fused path and the Beam handlers.

Plumbing runs on tiny or randomly initialised models; the accuracy checks run the
real small ONNX models of ../shared on real frames and skip when it is absent.
"""
import datetime
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SHARED, require_shared
from models.detectors import COCO_80, COCO_91, VEHICLE_CLASSES
from models.embedders import densenet201_veri
from models.fused import DetectAndEmbed
from models.imaging import crop_rois, to_device
from models.registry import DETECTORS, EMBEDDERS, build_detector, build_embedder
from models.weights import WeightsError, apply_state_dict, load_bytes, load_state_dict
from models.yolox import YOLOX_NANO

CAMERA = "733-681-N"
YOLOX_ONNX = SHARED / "models" / "yolox_nano.onnx"
OSNET_ONNX = SHARED / "models" / "osnet_x0_25.onnx"


def _frame_time(path: Path) -> datetime.datetime:
    """The camera-local capture time in a CCTView frame name (...--YYYY-MM-DD--HH.MM.SS--original.jpeg)."""
    _, day, clock = path.name.split("--")[:3]
    return datetime.datetime.strptime(day + " " + clock, "%Y-%m-%d %H.%M.%S")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def frames():
    """The first 60 frames of one camera: (paths, HxWx3 uint8 RGB arrays)."""
    root = require_shared(SHARED / "data" / "nyc-fdr" / "frames" / CAMERA)
    paths = sorted(root.rglob("*--original.jpeg"))[:60]
    return paths, [np.asarray(Image.open(p).convert("RGB")) for p in paths]


@pytest.fixture(scope="module")
def yolox_detector():
    return build_detector("yolox", str(require_shared(YOLOX_ONNX)), min_score=0.25, nms_iou=0.45)


@pytest.fixture(scope="module")
def osnet():
    return build_embedder("onnx", str(require_shared(OSNET_ONNX)))


def test_models_run_without_apache_beam():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'apache_beam': raise ImportError('apache_beam blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "from models import detectors, embedders, fused, imaging, registry, weights, yolox\n"
        "emb = registry.build_embedder('color_histogram')\n"
        "out = emb.embed_crops([np.zeros((20, 30, 3), np.uint8)], [np.array([[0, 0, 10, 10]], np.float32)])\n"
        "assert out[0].shape == (1, 512) and 'apache_beam' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


# --- weights ---------------------------------------------------------------------------------

def test_missing_weights_give_one_line(tmp_path):
    uri = str(tmp_path / "nope.pth")
    with pytest.raises(WeightsError) as err:
        load_bytes(uri)
    assert str(err.value) == "weights not found: %s" % uri
    with pytest.raises(WeightsError, match="^weights not found: "):
        build_embedder("densenet201_veri", uri)


def test_sha256_mismatch_names_file_and_both_digests(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"not the weights you pinned")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_bytes(str(path), actual) == path.read_bytes()
    with pytest.raises(WeightsError) as err:
        load_bytes(str(path), "ab" * 32)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "ab" * 32 in message and actual in message


def test_shared_yolox_has_the_pinned_digest():
    assert load_bytes(str(require_shared(YOLOX_ONNX)), YOLOX_NANO.sha256)


class _NotATensor:
    pass


def test_load_state_dict_unwraps_checkpoints_and_refuses_pickled_objects(tmp_path):
    weights = {"module.layer.weight": torch.ones(2, 3), "module.layer.bias": torch.zeros(2)}
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "ckpt.pth")
    state = load_state_dict(str(tmp_path / "ckpt.pth"))
    assert sorted(state) == ["layer.bias", "layer.weight"]

    torch.save({"w": torch.ones(1), "obj": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="not a loadable torch state dict"):
        load_state_dict(str(tmp_path / "evil.pth"))


def test_weights_that_do_not_fit_give_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(WeightsError) as err:
        apply_state_dict(model, {"0.weight": torch.ones(5, 3), "extra": torch.ones(1)}, "w.pth", "tiny")
    message = str(err.value)
    assert "\n" not in message
    assert "1 missing (0.bias)" in message and "1 unexpected (extra)" in message and "1 wrong shape" in message


def test_torchvision_weights_offline_error(monkeypatch):
    from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights as W

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(W.DEFAULT), "get_state_dict", offline)
    with pytest.raises(WeightsError) as err:
        build_detector("ssdlite320_mobilenet_v3_large")
    assert str(err.value) == ("weights not available offline for ssdlite320_mobilenet_v3_large: pass "
                              "--detector-weights URI (torchvision url: %s)" % W.DEFAULT.url)


# --- registry and detectors ------------------------------------------------------------------

def test_registry_lists_known_names_for_unknown_ones():
    with pytest.raises(ValueError, match="unknown detector 'yolo'; known: .*retinanet_resnet50_fpn.*yolox"):
        build_detector("yolo")
    with pytest.raises(ValueError, match="unknown embedder 'vit'; known: color_bands, color_histogram, densenet201_veri"):
        build_embedder("vit")
    assert {"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn_v2",
            "ssdlite320_mobilenet_v3_large", "yolox"} <= set(DETECTORS)
    assert {"densenet201_veri", "resnet50", "onnx", "color_histogram"} <= set(EMBEDDERS)


def test_coco_names():
    assert len(COCO_91) == 91 and COCO_91[3] == "car" and COCO_91[8] == "truck"
    assert len(COCO_80) == 80 and [COCO_80.index(c) for c in ("person", "car", "motorcycle", "bus", "truck")] == \
        [0, 2, 3, 5, 7]


def test_torchvision_detector_plumbing():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (120, 160, 3), np.uint8), rng.integers(0, 255, (90, 200, 3), np.uint8)]
    everything = build_detector("ssdlite320_mobilenet_v3_large", pretrained=False, min_score=0.0,
                                classes=None, max_detections=50)
    vehicles = build_detector("ssdlite320_mobilenet_v3_large", pretrained=False, min_score=0.0, min_box=3)
    vehicles.model.load_state_dict(everything.model.state_dict())
    for det, image in zip(everything.detect(images), images):
        assert det["boxes"].dtype == np.float32 and det["boxes"].shape == (len(det["labels"]), 4)
        assert det["scores"].dtype == np.float32 and 0 < len(det["scores"]) <= 50
        assert np.all(np.diff(det["scores"]) <= 0)
        assert det["boxes"][:, 2].max() <= image.shape[1] and det["boxes"][:, 3].max() <= image.shape[0]
    for det in vehicles.detect(images):
        assert set(det["labels"]) <= set(VEHICLE_CLASSES)
        assert len(det["boxes"]) == 0 or (det["boxes"][:, 2:] - det["boxes"][:, :2]).min() >= 3
    with pytest.raises(ValueError, match="unknown classes"):
        build_detector("ssdlite320_mobilenet_v3_large", pretrained=False, classes=("car", "spaceship"))


def test_yolox_finds_cctviews_vehicle_boxes(frames, yolox_detector):
    """Recall of CCTView's confident vehicle boxes (score >= 0.5) at IoU >= 0.5."""
    import pyarrow.parquet as pq
    from torchvision.ops import box_iou

    paths, images = frames
    reference_file = require_shared(SHARED / "data" / "nyc-fdr" / "reference" / ("%s.parquet" % CAMERA))
    rows = pq.read_table(str(reference_file),
                         columns=["frame_ts", "label", "score", "box_xyxy"]).to_pylist()
    reference = {}
    for row in rows:
        if row["score"] >= 0.5 and row["label"] in VEHICLE_CLASSES:
            reference.setdefault(row["frame_ts"], []).append(row["box_xyxy"])
    detections = []
    for start in range(0, len(images), 16):
        detections += yolox_detector.detect(images[start:start + 16])
    found = total = 0
    for path, det in zip(paths, detections):
        assert set(det["labels"]) <= set(VEHICLE_CLASSES)
        boxes = reference.get(_frame_time(path), [])
        total += len(boxes)
        if boxes and len(det["boxes"]):
            found += int((box_iou(torch.tensor(boxes), torch.from_numpy(det["boxes"])).max(1).values >= 0.5).sum())
    assert total > 100
    assert found / total >= 0.8, "recall %.3f (%d of %d)" % (found / total, found, total)


def test_yolox_batch_of_mixed_sizes_equals_one_by_one(frames, yolox_detector):
    _, images = frames
    batch = [images[0], images[1][20:200, 30:330], images[2]]
    together = yolox_detector.detect(batch)
    for image, det in zip(batch, together):
        alone = yolox_detector.detect([image])[0]
        assert det["labels"] == alone["labels"]
        np.testing.assert_allclose(det["boxes"], alone["boxes"], atol=1e-3)
        np.testing.assert_allclose(det["scores"], alone["scores"], atol=1e-5)
    assert yolox_detector.detect([]) == []


def test_yolox_refuses_other_onnx_models():
    with pytest.raises(WeightsError, match="not a YOLOX model"):
        build_detector("yolox", str(require_shared(OSNET_ONNX)))
    with pytest.raises(WeightsError, match="yolox needs an ONNX file: pass --detector-weights URI"):
        build_detector("yolox")


# --- embedders -------------------------------------------------------------------------------

def _boxes_of(image: np.ndarray, n: int, rng) -> np.ndarray:
    """n small random boxes (12-40 px sides) inside the image."""
    h, w = image.shape[:2]
    size = rng.uniform(12, 40, (n, 2))
    x1 = rng.uniform(0, w - size[:, 0])
    y1 = rng.uniform(0, h - size[:, 1])
    return np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], axis=1).astype(np.float32)


def _batch_independence(embedder, images, boxes_per_image):
    alone = embedder.embed_crops(images[:1], boxes_per_image[:1])[0]
    together = embedder.embed_crops(images, boxes_per_image)
    assert [len(e) for e in together] == [len(b) for b in boxes_per_image]
    assert all(e.dtype == np.float32 and e.shape[1] == embedder.dim for e in together)
    return float(np.abs(alone - together[0]).max())


def test_onnx_embedder_does_not_depend_on_batch(frames, osnet):
    _, images = frames
    rng = np.random.default_rng(1)
    boxes = [_boxes_of(image, 4, rng) for image in images[:16]]
    assert osnet.dim == 512 and osnet.input_size == (256, 128)
    assert _batch_independence(osnet, images[:16], boxes) < 1e-4


def test_densenet201_veri_does_not_depend_on_batch(frames):
    _, images = frames
    rng = np.random.default_rng(2)
    # DenseNet201 is slow on a CPU: 5 crops in all, frames 4..15 without boxes.
    boxes = [_boxes_of(image, 2 if i == 0 else int(i < 4), rng) for i, image in enumerate(images[:16])]
    torch.manual_seed(0)
    embedder = build_embedder("densenet201_veri", pretrained=False)
    assert _batch_independence(embedder, images[:16], boxes) < 1e-4


def test_densenet201_veri_state_dict_round_trip(tmp_path):
    """A state dict saved from CCTView's layout loads unchanged and gives identical outputs."""
    torch.manual_seed(0)
    original = densenet201_veri(pretrained=False)
    state = original.model.state_dict()
    assert {"features.conv0.weight", "features.norm5.running_var", "classifier.weight", "classifier.bias"} <= set(state)
    assert state["classifier.weight"].shape == (576, 1920) and not any(k.startswith("mixer") for k in state)
    torch.save(state, tmp_path / "VeRI_densenet_ft50.pth")

    loaded = build_embedder("densenet201_veri", str(tmp_path / "VeRI_densenet_ft50.pth"))
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (240, 352, 3), np.uint8)
    boxes = [np.array([[10, 20, 60, 50], [100.5, 80.25, 130, 140]], np.float32)]
    a, b = original.embed_crops([image], boxes)[0], loaded.embed_crops([image], boxes)[0]
    assert a.shape == (2, 1920)
    np.testing.assert_array_equal(a, b)


def test_resnet50_takes_torchvisions_full_state_dict(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    embedder = build_embedder("resnet50", str(tmp_path / "resnet50.pth"))
    image = np.full((64, 64, 3), 128, np.uint8)
    assert embedder.embed_crops([image], [np.array([[8, 8, 40, 56]], np.float32)])[0].shape == (1, 2048)


def test_onnx_embedder_refuses_a_detector():
    with pytest.raises(WeightsError, match="not an ONNX embedder: expected one input"):
        build_embedder("onnx", str(require_shared(YOLOX_ONNX)))


def test_roi_align_crops_match_pil_crops(frames, osnet):
    """The device crops see what CCTView's PIL crop + resize saw."""
    _, images = frames
    image = images[0]
    boxes = np.array([[127, 70, 147, 91], [40, 120, 79, 173], [200, 100, 238, 125]], np.float32)
    on_device = osnet.embed_crops([image], [boxes])[0]
    for box, vector in zip(boxes, on_device):
        pil = osnet.embed_pil(Image.fromarray(image).crop(tuple(int(v) for v in box)))
        assert np.dot(pil, vector) / np.linalg.norm(pil) / np.linalg.norm(vector) > 0.97


def test_center_crop_geometry_is_resize_256_center_crop_224():
    rois = crop_rois(torch.tensor([[0.0, 0.0, 40.0, 20.0]]), (224, 224), "center")
    side = 20 * 224 / 256
    np.testing.assert_allclose(rois.numpy(), [[20 - side / 2, 10 - side / 2, 20 + side / 2, 10 + side / 2]], rtol=1e-6)


def test_color_histogram():
    embedder = build_embedder("color_histogram")
    image = np.zeros((50, 60, 3), np.uint8)
    image[:, :30] = (255, 0, 0)
    image[:, 30:] = (0, 0, 255)
    red, blue = embedder.embed_crops([image], [np.array([[2, 2, 20, 40], [35, 5, 58, 45]], np.float32)])[0]
    assert embedder.dim == 512 and red.dtype == np.float32
    assert np.argmax(red) == 7 * 64 and np.argmax(blue) == 7 and abs(np.linalg.norm(red) - 1) < 1e-6
    empty = embedder.embed_crops([image, image], [np.zeros((0, 4), np.float32)] * 2)
    assert [e.shape for e in empty] == [(0, 512), (0, 512)]
    with pytest.raises(WeightsError, match="takes no weights"):
        build_embedder("color_histogram", "w.pth")
    assert build_embedder("color_histogram", None, sha256=None).dim == 512  # the options every builder takes


def test_color_bands_sees_where_the_colours_are():
    embedder = build_embedder("color_bands")
    assert embedder.dim == 4 * 4 ** 3
    # two crops with the same colours in other strips: one histogram, two band vectors
    top_red = np.zeros((64, 64, 3), np.uint8)
    top_red[:32] = (255, 0, 0)
    top_red[32:] = (0, 0, 255)
    top_blue = top_red[::-1].copy()
    box = [np.array([[0, 0, 64, 64]], np.float32)]
    (a,), (b,) = (embedder.embed_crops([img], box)[0] for img in (top_red, top_blue))
    (ha,), (hb,) = (build_embedder("color_histogram").embed_crops([img], box)[0]
                    for img in (top_red, top_blue))
    np.testing.assert_allclose(ha, hb, atol=1e-6)
    assert abs(np.linalg.norm(a) - 1) < 1e-6 and np.linalg.norm(a - b) > 1.0
    # strips are horizontal: a vehicle facing the other way gives the same vector
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    left, right = (embedder.embed_crops([img], [np.array([[0, 0, 70, 40]], np.float32)])[0][0]
                   for img in (image, image[:, ::-1].copy()))
    np.testing.assert_allclose(left, right, atol=1e-5)
    # each strip: square roots of its pixels' shares, all strips L2-normalised together
    crop = torch.tensor(rng.random((1, 3, 64, 64)), dtype=torch.float32)
    q = np.clip((crop[0].numpy() * 4).astype(int), 0, 3)
    cells = (q[0] * 4 + q[1]) * 4 + q[2]
    want = np.concatenate([np.sqrt(np.bincount(cells[16 * k:16 * (k + 1)].ravel(),
                                               minlength=64) / (16 * 64)) for k in range(4)])
    np.testing.assert_allclose(embedder._embed(crop)[0], want / np.linalg.norm(want), atol=1e-6)
    with pytest.raises(WeightsError, match="takes no weights"):
        build_embedder("color_bands", "w.pth")


def test_frames_must_be_uint8_rgb():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        to_device([np.zeros((4, 4), np.uint8)], "cpu")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        to_device([np.zeros((4, 4, 3), np.float32)], "cpu")


# --- fused path and Beam handlers ------------------------------------------------------------

def test_fused_equals_detect_then_embed(frames, yolox_detector, osnet):
    _, images = frames
    batch = [images[0], images[1][:200, :300], images[2]]
    fused = DetectAndEmbed(yolox_detector, osnet)(batch)
    detections = yolox_detector.detect(batch)
    embeddings = osnet.embed_crops(batch, [d["boxes"] for d in detections])
    assert [len(f) for f in fused] == [len(d["labels"]) for d in detections] and sum(map(len, fused)) > 0
    for per_image, det, emb in zip(fused, detections, embeddings):
        for i, row in enumerate(per_image):
            assert set(row) == {"box_xyxy", "score", "label", "embedding"}
            assert row["label"] == det["labels"][i] and row["score"] == pytest.approx(float(det["scores"][i]))
            np.testing.assert_allclose(row["box_xyxy"], det["boxes"][i])
            np.testing.assert_allclose(row["embedding"], emb[i], atol=1e-5)


def test_handlers_run_inference_in_a_pipeline(frames):
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.testing.util import assert_that, equal_to

    from models.handlers import DetectEmbedModelHandler, DetectModelHandler, EmbedModelHandler

    _, images = frames
    three = images[:3]
    yolox_uri, osnet_uri = str(require_shared(YOLOX_ONNX)), str(require_shared(OSNET_ONNX))
    fused = DetectEmbedModelHandler("yolox", "color_histogram", detector_weights=yolox_uri,
                                    detector_options={"min_score": 0.3}, max_batch_size=2)
    assert fused.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 2}
    assert not fused.share_model_across_processes()
    assert DetectModelHandler("yolox", weights=yolox_uri, device="cuda").share_model_across_processes()

    def fused_summary(result):
        return len(result.example.shape), all(len(d["embedding"]) == 512 for d in result.inference)

    def image_and_detections(result):
        return result.example, result.inference

    def embed_summary(result):
        image, detections = result.example
        rows = result.inference
        return len(rows), [r["label"] for r in rows] == detections["labels"] and all(
            r["embedding"].shape == (512,) for r in rows)

    detections = build_detector("yolox", yolox_uri).detect(three)
    expected = [(len(d["boxes"]), True) for d in detections]

    # Given plain boxes, the embed handler returns the embeddings array.
    embed = EmbedModelHandler("onnx", weights=osnet_uri)
    arrays = embed.run_inference([(three[0], detections[0]["boxes"])], embed.load_model())
    assert arrays[0].inference.shape == (len(detections[0]["boxes"]), 512)

    with beam.Pipeline() as p:
        frames_pc = p | beam.Create(three)
        fused_out = frames_pc | "Fused" >> RunInference(fused) | "SummariseFused" >> beam.Map(fused_summary)
        assert_that(fused_out, equal_to([(3, True)] * 3), label="CheckFused")
        staged = (frames_pc
                  | "Detect" >> RunInference(DetectModelHandler("yolox", weights=yolox_uri))
                  | beam.Map(image_and_detections)
                  | "Embed" >> RunInference(embed)
                  | "SummariseStaged" >> beam.Map(embed_summary))
        assert_that(staged, equal_to(expected), label="CheckStaged")



def test_onnx_sessions_take_threads_and_their_measured_optimisation_level(frames, osnet):
    """OSNet's spec records that it runs faster without the NCHWc layout rewrite; YOLOX-Nano's
    that it runs faster with it; an explicit level and a thread count reach the session; and
    the level changes the kernels, not the embeddings."""
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel
    options = osnet.session.get_session_options()
    assert options.graph_optimization_level == level.ORT_ENABLE_EXTENDED
    assert options.intra_op_num_threads == 0
    detector = build_detector("yolox", str(require_shared(YOLOX_ONNX)), threads=1)
    assert detector.session.get_session_options().graph_optimization_level == level.ORT_ENABLE_ALL
    assert detector.session.get_session_options().intra_op_num_threads == 1
    with_layout = build_embedder("onnx", str(require_shared(OSNET_ONNX)), optimization="all", threads=1)
    assert with_layout.session.get_session_options().graph_optimization_level == level.ORT_ENABLE_ALL
    _, images = frames
    boxes = [_boxes_of(image, 4, np.random.default_rng(2)) for image in images[:4]]
    for ours, theirs in zip(osnet.embed_crops(images[:4], boxes), with_layout.embed_crops(images[:4], boxes)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_onnx_session_refuses_unknown_levels_and_negative_threads():
    with pytest.raises(ValueError, match="optimization"):
        build_embedder("onnx", str(require_shared(OSNET_ONNX)), optimization="fastest")
    with pytest.raises(ValueError, match="threads"):
        build_detector("yolox", str(require_shared(YOLOX_ONNX)), threads=-1)


def test_an_onnx_file_no_spec_knows_gets_every_optimisation():
    """The level comes from the spec whose sha256 is the file's; no such spec: onnxruntime's full level."""
    import onnxruntime as ort

    from models.embedders import OSNET_X0_25
    from models.weights import onnx_session
    from models.yolox import YOLOX_NANO

    level = ort.GraphOptimizationLevel
    uri = str(require_shared(OSNET_ONNX))
    for known, expected in [((), level.ORT_ENABLE_ALL), ((YOLOX_NANO,), level.ORT_ENABLE_ALL),
                            ((YOLOX_NANO, OSNET_X0_25), level.ORT_ENABLE_EXTENDED)]:
        session = onnx_session(uri, None, "cpu", known=known)
        assert session.get_session_options().graph_optimization_level == expected


def test_handlers_set_the_worker_thread_budget(frames):
    from models.handlers import DetectEmbedModelHandler

    handler = DetectEmbedModelHandler(
        "yolox", "onnx", detector_weights=str(require_shared(YOLOX_ONNX)), embedder_weights=str(require_shared(OSNET_ONNX)),
        detector_options={"threads": 1}, embedder_options={"threads": 1}, threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = handler.load_model()
        assert torch.get_num_threads() == 1
        assert model.detector.session.get_session_options().intra_op_num_threads == 1
        assert model.embedder.session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)


# --- the registry's specs --------------------------------------------------------------------

class _Recording:
    """A model's preprocessing callable that records what it returns; its attributes are the
    wrapped callable's (an embedder reads its crop geometry from them)."""

    def __init__(self, inner, outputs: list):
        self._inner, self._outputs = inner, outputs

    def __call__(self, *args):
        out = self._inner(*args)
        self._outputs.append(out)
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _recording_entry(monkeypatch, table: dict, name: str) -> list:
    """Swaps ``table[name]`` for the same entry whose spec's transforms build a
    :class:`_Recording` of the real preprocessing; -> the list its outputs go to."""
    import dataclasses

    entry, outputs = table[name], []
    real = entry.weights.transforms

    def transforms(*args, **kwargs):
        return _Recording(real(*args, **kwargs), outputs)

    spec = dataclasses.replace(entry.weights, transforms=transforms)
    monkeypatch.setitem(table, name, dataclasses.replace(entry, weights=spec))
    return outputs


@pytest.mark.parametrize("name, weights, options", [
    ("yolox", YOLOX_ONNX, {}),
    ("ssdlite320_mobilenet_v3_large", None, {"pretrained": False, "min_score": 0.0, "classes": None}),
])
def test_a_detectors_preprocessing_is_its_registry_specs(frames, monkeypatch, name, weights, options):
    """The registry's callable is what prepares the frames: every forward goes through it, and
    a model built with it detects exactly what the model built without the swap does."""
    uri = str(require_shared(weights)) if weights else None
    torch.manual_seed(0)
    plain = build_detector(name, uri, **options)
    outputs = _recording_entry(monkeypatch, DETECTORS, name)
    torch.manual_seed(0)
    recorded = build_detector(name, uri, **options)
    _, images = frames
    got, expected = recorded.detect(images[:2]), plain.detect(images[:2])
    assert outputs, "the registry's preprocessing did not run"
    if name == "yolox":
        batch, scales = outputs[0]
        assert batch.shape == (2, 3, 416, 416) and float(batch.max()) > 1  # BGR 0..255, letterboxed
    for a, b in zip(got, expected):
        assert a["labels"] == b["labels"]
        np.testing.assert_array_equal(a["boxes"], b["boxes"])


@pytest.mark.parametrize("name, weights", [("onnx", OSNET_ONNX), ("color_histogram", None)])
def test_an_embedders_preprocessing_is_its_registry_specs(frames, monkeypatch, name, weights):
    """The registry's callable cuts and normalises the crops the network sees: the embeddings
    are the network's output on exactly the batch it returned."""
    uri = str(require_shared(weights)) if weights else None
    outputs = _recording_entry(monkeypatch, EMBEDDERS, name)
    embedder = build_embedder(name, uri)
    _, images = frames
    boxes = [np.array([[10, 20, 60, 50], [100, 80, 130, 140]], np.float32)]
    vectors = embedder.embed_crops(images[:1], boxes)[0]
    assert len(outputs) == 1 and outputs[0].shape == (2, 3) + embedder.input_size
    np.testing.assert_array_equal(vectors, embedder._embed(outputs[0]))
    if name == "onnx":  # OSNet's recipe: ImageNet mean/std, so values leave 0..1
        assert float(outputs[0].min()) < 0


def test_the_background_detectors_preprocessing_is_its_registry_specs(monkeypatch):
    from models.background import BackgroundDetector

    rng = np.random.default_rng(0)
    background = np.clip(rng.normal(100, 6, (120, 160, 3)), 0, 255).astype(np.uint8)
    frame = background.copy()
    frame[40:60, 50:90] = (220, 40, 40)
    outputs = _recording_entry(monkeypatch, DETECTORS, "background")
    found = build_detector("background").detect([frame], [background])[0]
    assert len(outputs) == 1 and outputs[0].dtype == np.float32 and outputs[0].shape == frame.shape
    expected = BackgroundDetector().detect([frame], [background])[0]
    assert len(found["boxes"]) == 1
    np.testing.assert_array_equal(found["boxes"], expected["boxes"])


def test_every_registry_entry_has_a_callable_preprocessing():
    for table in (DETECTORS, EMBEDDERS):
        for name, entry in table.items():
            assert callable(entry.weights.transforms), name
