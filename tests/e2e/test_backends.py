"""The TensorFlow (``tf_savedmodel``) and ImageAI (``imageai_*``) backends.

The SavedModels and ImageAI weight files are built here with random weights (none can be
downloaded); the frames are real. The import-order guard is checked in fresh processes,
because this one has torchvision loaded already.
"""
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import models  # noqa: F401  (before tensorflow: the order that does not crash)
import numpy as np
import pyarrow.dataset as ds
import pytest
import tensorflow as tf
import torch
from PIL import Image

from conftest import FRAMES, REPO, copy_frames, require_shared
from models.imaging import crop_boxes
from models.registry import build_detector, build_embedder
from models.weights import WeightsError, folder_sha256

CAMERA = "733-681-N"
BOXES = [[0.1, 0.2, 0.5, 0.6], [0.2, 0.1, 0.4, 0.3], [0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]]
CLASSES = [3.0, 8.0, 1.0, 6.0]  # COCO-91 ids: car, truck, person, bus (the 4th is past num_detections)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images():
    paths = sorted(require_shared(FRAMES / CAMERA).rglob("*--original.jpeg"))[:4]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


class _Detector(tf.Module):
    """The Object Detection API signature around a small convolution: fixed boxes and
    classes, scores from the image content, three valid rows of four, and the largest
    batch it was called with (to see the batching)."""

    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 4], seed=[1, 2]) * 0.1)
        self.largest_batch = tf.Variable(0, dtype=tf.int32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="input_tensor")])
    def serve(self, input_tensor):
        n = tf.shape(input_tensor)[0]
        self.largest_batch.assign(tf.maximum(self.largest_batch, n))
        x = tf.cast(input_tensor, tf.float32) / 255.0
        scores = tf.sigmoid(10.0 * tf.reduce_mean(tf.nn.conv2d(x, self.kernel, 1, "SAME"), axis=[1, 2]))
        return {"detection_boxes": tf.tile(tf.constant([BOXES]), [n, 1, 1]),
                "detection_scores": scores,
                "detection_classes": tf.tile(tf.constant([CLASSES]), [n, 1]),
                "num_detections": tf.fill([n], 3.0)}


class _Embedder(tf.Module):
    """Crops float32 [N, 32, 16, 3] -> 8-d vectors: a convolution, mean pooling, a dense layer."""

    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 6], seed=[3, 4]))
        self.dense = tf.Variable(tf.random.stateless_normal([6, 8], seed=[5, 6]))

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 16, 3], tf.float32, name="crops")])
    def serve(self, crops):
        pooled = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(crops, self.kernel, 1, "SAME")), axis=[1, 2])
        return {"embedding": tf.matmul(pooled, self.dense)}


def _export(module, path: Path) -> str:
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return _export(_Detector(), tmp_path_factory.mktemp("tf") / "detector")


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    return _export(_Embedder(), tmp_path_factory.mktemp("tf") / "embedder")


# --- tf_savedmodel ---------------------------------------------------------------------------

def test_tf_detector_maps_boxes_and_coco91_ids_and_batches(detector_dir, images):
    detector = build_detector("tf_savedmodel", detector_dir, min_score=0.0, classes=None)
    found = detector.detect(images)
    assert int(detector._loaded.largest_batch.numpy()) == len(images)  # one call for the whole batch
    h, w = images[0].shape[:2]
    for result in found:
        by_label = dict(zip(result["labels"], result["boxes"].tolist()))
        assert sorted(by_label) == ["car", "person", "truck"]  # the 4th row (bus) is past num_detections
        assert np.allclose(by_label["car"], [0.2 * w, 0.1 * h, 0.6 * w, 0.5 * h], atol=1e-3)
        assert np.allclose(by_label["truck"], [0.1 * w, 0.2 * h, 0.3 * w, 0.4 * h], atol=1e-3)
        assert list(result["scores"]) == sorted(result["scores"], reverse=True)
    one_by_one = [detector.detect([image])[0] for image in images]
    for a, b in zip(found, one_by_one):
        assert a["labels"] == b["labels"] and np.allclose(a["scores"], b["scores"], atol=1e-6)
    assert len({tuple(r["scores"]) for r in found}) > 1  # scores come from each frame's own pixels
    vehicles = build_detector("tf_savedmodel", detector_dir, min_score=0.0).detect(images[:1])[0]
    assert sorted(vehicles["labels"]) == ["car", "truck"]  # people are not vehicles
    # The fused path hands the detector torch frames: the same detections.
    from models.imaging import to_device

    fused = detector.detect_tensors(to_device(images, "cpu"))
    assert all(np.allclose(a["boxes"], b["boxes"]) and a["labels"] == b["labels"] for a, b in zip(fused, found))


def test_tf_embedder_reads_its_input_size_and_normalises(embedder_dir, images):
    embedder = build_embedder("tf_savedmodel", embedder_dir)
    assert embedder.input_size == (32, 16) and embedder.dim == 8
    boxes = [np.array([[10, 20, 60, 100], [100, 50, 180, 200]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[0, 0, 30, 30]], np.float32)]
    out = embedder.embed_crops(images[:3], boxes)
    assert [o.shape for o in out] == [(2, 8), (0, 8), (1, 8)] and all(o.dtype == np.float32 for o in out)
    frames = [torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255]
    crops = crop_boxes(frames, [boxes[0]], (32, 16))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    direct = embedder._signature(crops=tf.constant(((crops - mean) / std).permute(0, 2, 3, 1).numpy()))["embedding"]
    assert np.allclose(out[0], direct.numpy(), atol=1e-4)


def test_savedmodel_sha256_pin_is_the_documented_coreutils_digest(detector_dir):
    shell = subprocess.run(
        "(cd %s && find . -type f -printf '%%P\\n' | LC_ALL=C sort | xargs sha256sum) | sha256sum" % detector_dir,
        shell=True, capture_output=True, text=True, check=True)
    digest = folder_sha256(detector_dir)
    assert shell.stdout.split()[0] == digest
    assert build_detector("tf_savedmodel", detector_dir, sha256=digest.upper()).name == "tf_savedmodel"
    with pytest.raises(WeightsError, match="^sha256 mismatch for weights folder .*expected (ab)+, got %s$" % digest):
        build_detector("tf_savedmodel", detector_dir, sha256="ab" * 32)


def test_bad_savedmodels_stop_with_one_line(detector_dir, embedder_dir, tmp_path, capsys):
    from pipelines.cli import main

    with pytest.raises(WeightsError, match="^weights folder not found: "):
        build_detector("tf_savedmodel", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="^not a loadable TensorFlow SavedModel: "):
        build_detector("tf_savedmodel", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="^not an Object Detection API SavedModel: .*input_tensor"):
        build_detector("tf_savedmodel", embedder_dir)
    with pytest.raises(WeightsError, match="^not a SavedModel embedder: "):
        build_embedder("tf_savedmodel", detector_dir)
    code = main(["extract", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                 "--detector", "tf_savedmodel", "--detector-weights", embedder_dir, "--embedder", "color_histogram"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "not an Object Detection API SavedModel" in err


def test_savedmodel_loads_from_gcs(gcs_server, detector_dir, images):
    from conftest import upload_tree

    bucket = gcs_server()
    client_bucket = gcs_server.client.bucket(bucket)
    uploaded = upload_tree(Path(detector_dir), lambda name, data: client_bucket.blob(
        "models/det/" + name).upload_from_string(data))
    assert uploaded >= 2  # saved_model.pb and the variables
    remote = build_detector("tf_savedmodel", "gs://%s/models/det" % bucket, min_score=0.0,
                            sha256=folder_sha256(detector_dir))
    local = build_detector("tf_savedmodel", detector_dir, min_score=0.0)
    a, b = remote.detect(images[:2]), local.detect(images[:2])
    for x, y in zip(a, b):
        assert np.array_equal(x["boxes"], y["boxes"]) and np.array_equal(x["scores"], y["scores"])
    with pytest.raises(WeightsError, match="^weights folder not found: gs://"):
        build_detector("tf_savedmodel", "gs://%s/models/missing" % bucket)


def test_tf_handlers_are_beams_tensorflow_handler_and_retry_frame_by_frame(detector_dir, embedder_dir, images):
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor

    from models.handlers import FailedInference
    from models.tf_handlers import TFDetectModelHandler, TFEmbedModelHandler

    detect = TFDetectModelHandler("tf_savedmodel", weights=detector_dir, options={"min_score": 0.0},
                                  max_batch_size=3)
    assert isinstance(detect, TFModelHandlerTensor) and detect.batch_elements_kwargs()["max_batch_size"] == 3
    model = detect.load_model()
    bad = np.zeros((5, 5), np.float32)
    results = detect.run_inference([images[0], bad, images[1]], model)
    assert isinstance(results[1].inference, FailedInference) and "HxWx3 uint8" in results[1].inference.error
    assert results[0].inference["labels"] == model.detect([images[0]])[0]["labels"]
    embed = TFEmbedModelHandler("tf_savedmodel", weights=embedder_dir)
    out = embed.run_inference([(images[0], results[0].inference)], embed.load_model())
    assert [len(d["embedding"]) for d in out[0].inference] == [8, 8]


def _extract(frames_dir, out, *flags):
    from pipelines.cli import main

    return main(["extract", "--input", str(frames_dir), "--output", str(out), "--timezone", "America/New_York",
                 "--batch-size", "3", "--min-score", "0"] + list(flags))


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    """Four real frames of one camera and one truncated file."""
    root = tmp_path_factory.mktemp("frames")
    src = copy_frames(root, CAMERA, 4)
    bad = root / CAMERA / "2020/05/05/13/59/59" / ("%s--2020-05-05--13.59.59--original.jpeg" % CAMERA)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(src[0].read_bytes()[:1500])
    return root


def test_tf_models_flow_through_the_same_stages(frames_dir, detector_dir, embedder_dir, tmp_path, capsys):
    """TF detector + TF embedder, then the same TF detector with a torch embedder: the same
    detections schema, the same ids for the same boxes, dead letters for the bad file."""
    out = tmp_path / "tf"
    assert _extract(frames_dir, out, "--detector", "tf_savedmodel", "--detector-weights", detector_dir,
                    "--embedder", "tf_savedmodel", "--embedder-weights", embedder_dir) == 0
    assert "frames_listed=5" in capsys.readouterr().out
    table = ds.dataset(out / "detections", partitioning="hive").to_table()
    rows = table.to_pylist()
    assert len(rows) == 8 and {r["label"] for r in rows} == {"car", "truck"}
    assert {r["detector"] for r in rows} == {"tf_savedmodel"} and {len(r["embedding"]) for r in rows} == {8}
    dead = ds.dataset(out / "dead_letter").to_table().to_pylist()
    assert [d["reason"] for d in dead] == ["corrupt_image"]
    mixed = tmp_path / "mixed"
    assert _extract(frames_dir, mixed, "--detector", "tf_savedmodel", "--detector-weights", detector_dir,
                    "--embedder", "color_histogram") == 0
    table2 = ds.dataset(mixed / "detections", partitioning="hive").to_table()
    assert table2.schema.equals(table.schema)  # the torch embedder's table has the same columns and types
    rows2 = table2.to_pylist()
    assert sorted(r["detection_id"] for r in rows2) == sorted(r["detection_id"] for r in rows)
    assert {len(r["embedding"]) for r in rows2} == {512}


# --- ImageAI ---------------------------------------------------------------------------------

def _save_imageai_yolo(kind: str, path: Path) -> str:
    """Random ImageAI YOLO weights as ImageAI saves them (a plain state dict). The
    detection convolutions are rescaled so that their outputs spread (std 1.5) instead of
    sitting at their biases: scores all near 0.5 would make float rounding at the
    thresholds and NMS ties, not the code, decide the comparison with ImageAI; a wider
    spread saturates sigmoids to exactly 1.0, which ties the objectness NMS ranks by."""
    from imageai.yolov3.tiny_yolov3 import YoloV3Tiny
    from imageai.yolov3.yolov3 import YoloV3

    torch.manual_seed(0)
    if kind == "imageai_yolov3":
        net = YoloV3(anchors=[10, 13, 16, 30, 33, 23, 30, 61, 62, 45, 59, 119, 116, 90, 156, 198, 373, 326],
                     num_classes=80, device="cpu")
    else:
        net = YoloV3Tiny(anchors=[10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319], num_classes=80, device="cpu")
    heads = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 3 * 85]
    spread = {}
    hooks = [m.register_forward_hook(lambda m, i, o: spread.__setitem__(m, float(i[0].std()))) for m in heads]
    with torch.no_grad():
        net.eval()(torch.rand(1, 3, 416, 416))
    for hook in hooks:
        hook.remove()
    for m in heads:
        fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.data.normal_(0, 1.5 / (spread[m] * fan_in ** 0.5))
        m.bias.data[4::85] -= 1.0  # objectness: fewer anchors above 0.5, fewer near-ties in NMS
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("name,kind", [("imageai_tiny_yolov3", "TinyYOLOv3"), ("imageai_yolov3", "YOLOv3")])
def test_imageai_yolo_batched_gives_imageais_own_boxes(name, kind, images, tmp_path):
    from imageai.Detection import ObjectDetection

    weights = _save_imageai_yolo(name, tmp_path / (name + ".pt"))
    # YOLOv3's thousands of random boxes leave some IoUs within float rounding of the NMS
    # threshold, where a batch and a single frame may round apart: one frame there.
    frames = images[:1] if name == "imageai_yolov3" else images
    detector = build_detector(name, weights, min_score=0.5, nms_iou=0.4, classes=None, max_detections=10 ** 6)
    ours = detector.detect(frames)
    reference = ObjectDetection()
    reference.useCPU()
    getattr(reference, "setModelTypeAs" + kind)()
    reference.setModelPath(weights)
    reference.loadModel()
    for image, found in zip(frames, ours):
        _, theirs = reference.detectObjectsFromImage(input_image=np.ascontiguousarray(image[:, :, ::-1]),
                                                     output_type="array")
        expected = sorted((d["box_points"], d["percentage_probability"]) for d in theirs)
        got = sorted(([int(v) for v in box], round(float(s) * 100, 2))
                     for box, s in zip(found["boxes"], found["scores"]))
        assert len(expected) > 10 and got == expected
    vehicles = build_detector(name, weights, min_score=0.5).detect(frames[:1])[0]
    assert set(vehicles["labels"]) <= {"car", "bus", "truck", "motorcycle"}  # ImageAI's 'motorbike', renamed


def test_imageai_retinanet_is_torchvisions_retinanet(images, tmp_path):
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(0)
    weights = tmp_path / "retinanet_resnet50_fpn_coco.pth"
    torch.save(retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict(), weights)
    options = {"min_score": 0.001, "classes": None}
    ours = build_detector("imageai_retinanet", str(weights), **options).detect(images[:1])
    torchvision_way = build_detector("retinanet_resnet50_fpn", str(weights), **options).detect(images[:1])
    for a, b in zip(ours, torchvision_way):
        assert len(a["boxes"]) > 0
        assert np.array_equal(a["boxes"], b["boxes"]) and np.array_equal(a["scores"], b["scores"])
        assert a["labels"] == b["labels"]


def test_bad_imageai_files_stop_with_one_line(tmp_path):
    tiny = _save_imageai_yolo("imageai_tiny_yolov3", tmp_path / "tiny.pt")
    with pytest.raises(WeightsError, match="^ImageAI cannot load .*tiny.pt as imageai_yolov3: Invalid weights"):
        build_detector("imageai_yolov3", tiny)
    renamed = tmp_path / "tiny.bin"
    shutil.copy(tiny, renamed)
    with pytest.raises(WeightsError, match="^ImageAI cannot load .* as imageai_tiny_yolov3: Invalid model file"):
        build_detector("imageai_tiny_yolov3", str(renamed))
    with pytest.raises(WeightsError, match="^imageai_retinanet needs an ImageAI weight file: pass --detector-weights"):
        build_detector("imageai_retinanet")
    digest = hashlib.sha256(Path(tiny).read_bytes()).hexdigest()
    assert build_detector("imageai_tiny_yolov3", tiny, sha256=digest).name == "imageai_tiny_yolov3"


def test_imageai_weights_load_from_gcs_with_a_pin(gcs_server, images, tmp_path):
    tiny = _save_imageai_yolo("imageai_tiny_yolov3", tmp_path / "tiny.pt")
    bucket = gcs_server()
    gcs_server.client.bucket(bucket).blob("models/tiny-yolov3.pt").upload_from_filename(tiny)
    digest = hashlib.sha256(Path(tiny).read_bytes()).hexdigest()
    remote = build_detector("imageai_tiny_yolov3", "gs://%s/models/tiny-yolov3.pt" % bucket, sha256=digest,
                            min_score=0.5, classes=None)
    local = build_detector("imageai_tiny_yolov3", tiny, min_score=0.5, classes=None)
    a, b = remote.detect(images[:1])[0], local.detect(images[:1])[0]
    assert len(a["boxes"]) and np.array_equal(a["boxes"], b["boxes"])
    with pytest.raises(WeightsError, match="^sha256 mismatch for weights gs://"):
        build_detector("imageai_tiny_yolov3", "gs://%s/models/tiny-yolov3.pt" % bucket, sha256="ab" * 32)


# --- import order: TensorFlow and torchvision in one process ----------------------------------

def _python(code: str, timeout: int = 180):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_tensorflow_first_is_an_import_error_not_a_crash():
    run = _python("import tensorflow\nimport models\n")
    assert run.returncode == 1, (run.returncode, run.stderr[-1500:])  # a segfault is -11
    assert "ImportError: tensorflow was imported before torchvision" in run.stderr


def _cli(*args, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "pipelines.cli"] + list(args), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_tf_detector_with_torch_embedder_in_worker_processes(frames_dir, detector_dir, tmp_path):
    """TensorFlow detector, torchvision embedder, in fresh worker processes that unpickle the
    handlers (the order in which they import tensorflow and torchvision is theirs)."""
    from models.embedders import DenseNetVeRI

    weights = tmp_path / "veri.pth"
    torch.save(DenseNetVeRI().state_dict(), weights)
    out = tmp_path / "out"
    run = _cli("extract", "--input", str(frames_dir), "--output", str(out), "--min-score", "0",
               "--detector", "tf_savedmodel", "--detector-weights", detector_dir,
               "--embedder", "densenet201_veri", "--embedder-weights", str(weights),
               "--direct_running_mode", "multi_processing", "--direct_num_workers", "2")
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    rows = ds.dataset(out / "detections", partitioning="hive").to_table().to_pylist()
    assert len(rows) == 8 and {len(r["embedding"]) for r in rows} == {1920}


def test_imageai_detector_with_tf_embedder_in_one_process(frames_dir, embedder_dir, tmp_path):
    weights = _save_imageai_yolo("imageai_tiny_yolov3", tmp_path / "tiny.pt")
    out = tmp_path / "out"
    from models.detectors import COCO_80

    run = _cli("extract", "--input", str(frames_dir), "--output", str(out), "--min-score", "0.5",
               "--detector", "imageai_tiny_yolov3", "--detector-weights", weights, "--classes", ",".join(COCO_80),
               "--embedder", "tf_savedmodel", "--embedder-weights", embedder_dir)
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    rows = ds.dataset(out / "detections", partitioning="hive").to_table().to_pylist()
    assert rows and {r["detector"] for r in rows} == {"imageai_tiny_yolov3"}
    assert {len(r["embedding"]) for r in rows} == {8}


def test_core_install_needs_neither_tensorflow_nor_imageai():
    """Without the extras every other model works and these say in one line what to install;
    the distribution's own requirements keep TensorFlow out of the core and in [test]."""
    from importlib.metadata import requires

    code = (
        "import sys\n"
        "sys.modules.update(tensorflow=None, imageai=None)  # as if not installed: imports fail, find_spec is None\n"
        "from models.registry import build_detector, build_embedder\n"
        "from models.weights import WeightsError\n"
        "assert build_embedder('color_histogram').dim == 512\n"
        "for build, name in ((build_detector, 'tf_savedmodel'), (build_embedder, 'tf_savedmodel'),\n"
        "                    (build_detector, 'imageai_retinanet')):\n"
        "    try:\n"
        "        build(name, '/tmp/x.pth')\n"
        "    except WeightsError as e:\n"
        "        print(e)\n"
    )
    run = _python(code)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3 and "pip install 'cctview-beam[tf]'" in lines[0] and "[tf]" in lines[1]
    assert "pip install 'cctview-beam[imageai]'" in lines[2]
    core = [r for r in requires("cctview-beam") if "extra ==" not in r]
    test = [r for r in requires("cctview-beam") if 'extra == "test"' in r]
    assert not any(r.lower().startswith(("tensorflow", "imageai")) for r in core)
    assert {"tensorflow", "imageai"} <= {r.split(">")[0].split("<")[0].split("[")[0].strip().lower() for r in test}
