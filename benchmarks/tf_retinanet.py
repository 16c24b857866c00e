"""A real-size RetinaNet-ResNet50-FPN in TensorFlow, exported with the TF2 Object Detection
API serving signature, so that ``tf_savedmodel`` can be timed against torchvision's
``retinanet_resnet50_fpn`` on the same network (benchmarks/backends.py).

The layers are torchvision's RetinaNet (v1) layer for layer: its transform (ImageNet
normalisation, bilinear resize to a shorter side of 800 up to 1333, padding to a multiple
of 32), a ResNet-50 (bottlenecks 3-4-6-3, frozen batch norm as a per-channel scale and
shift), an FPN on C3-C5 with P6 and P7 from P5, the two heads of four 3x3 convolutions
(256 channels) and their 3x3 output layers over 9 anchors and 91 classes, and its
post-processing (per level the 1000 best (anchor, class) scores above the threshold,
box decoding, class-wise NMS, 300 kept). Random weights, initialised as torchvision
initialises its heads (normal std 0.01, the classification bias at the 0.01 prior),
so both report the same (empty) detections and the time is the network's.

  python benchmarks/tf_retinanet.py OUT_DIR      # writes the SavedModel folder
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402,F401  (torchvision before tensorflow: models/__init__.py)
import tensorflow as tf  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CLASSES, ANCHORS = 91, 9
SIZES = (32, 64, 128, 256, 512)
STRIDES = (8, 16, 32, 64, 128)


def _conv(name, k, cin, cout, std=None):
    std = std if std is not None else math.sqrt(2.0 / (k * k * cin))
    return (tf.Variable(tf.random.normal([k, k, cin, cout], stddev=std), name=name + "_w"),
            tf.Variable(tf.zeros([cout]), name=name + "_b"))


def _apply(x, layer, stride=1):
    w, b = layer
    return tf.nn.conv2d(x, w, stride, "SAME") + b


def _base_anchors(size):
    """torchvision's AnchorGenerator: scales 2^0, 2^(1/3), 2^(2/3) x ratios 0.5, 1, 2, centred at 0, rounded."""
    out = []
    for ratio in (0.5, 1.0, 2.0):
        h_ratio = math.sqrt(ratio)
        for scale in (1.0, 2 ** (1 / 3), 2 ** (2 / 3)):
            ws, hs = size * scale / h_ratio, size * scale * h_ratio
            out.append([round(-ws / 2), round(-hs / 2), round(ws / 2), round(hs / 2)])
    return tf.constant(out, tf.float32)


class RetinaNet(tf.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv("stem", 7, 3, 64)
        self.blocks = []
        cin = 64
        for stage, (count, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            for i in range(count):
                stride = 2 if i == 0 and stage > 0 else 1
                name = "s%d_b%d" % (stage, i)
                # The last convolution of a block starts small (std / 5), so that 16 random
                # residual additions do not blow the activations up and saturate every score.
                block = {"c1": _conv(name + "_c1", 1, cin, width), "c2": _conv(name + "_c2", 3, width, width),
                         "c3": _conv(name + "_c3", 1, width, width * 4, math.sqrt(2.0 / width) / 5),
                         "stride": stride, "stage": stage}
                if i == 0:
                    block["down"] = _conv(name + "_down", 1, cin, width * 4)
                self.blocks.append(block)
                cin = width * 4
        self.lateral = [_conv("lat%d" % i, 1, c, 256) for i, c in enumerate((512, 1024, 2048))]
        self.smooth = [_conv("fpn%d" % i, 3, 256, 256) for i in range(3)]
        self.p6, self.p7 = _conv("p6", 3, 256, 256), _conv("p7", 3, 256, 256)
        self.cls_convs = [_conv("cls%d" % i, 3, 256, 256, 0.01) for i in range(4)]
        self.reg_convs = [_conv("reg%d" % i, 3, 256, 256, 0.01) for i in range(4)]
        self.cls_out = _conv("cls_out", 3, 256, ANCHORS * CLASSES, 0.01)
        self.cls_out[1].assign(tf.fill([ANCHORS * CLASSES], -math.log((1 - 0.01) / 0.01)))
        self.reg_out = _conv("reg_out", 3, 256, ANCHORS * 4, 0.01)
        self.base_anchors = [_base_anchors(s) for s in SIZES]

    def _backbone(self, x):
        """-> C3, C4, C5: the outputs of the last blocks of stages 2, 3 and 4."""
        x = tf.nn.relu(_apply(x, self.stem, 2))
        x = tf.nn.max_pool2d(x, 3, 2, "SAME")
        ends = {}
        for block in self.blocks:
            shortcut = _apply(x, block["down"], block["stride"]) if "down" in block else x
            y = tf.nn.relu(_apply(x, block["c1"]))
            y = tf.nn.relu(_apply(y, block["c2"], block["stride"]))
            x = tf.nn.relu(_apply(y, block["c3"]) + shortcut)
            ends[block["stage"]] = x
        return [ends[1], ends[2], ends[3]]

    def _fpn(self, c3, c4, c5):
        l3, l4, l5 = (_apply(c, layer) for c, layer in zip((c3, c4, c5), self.lateral))
        p5 = l5
        p4 = l4 + tf.image.resize(p5, tf.shape(l4)[1:3], "nearest")
        p3 = l3 + tf.image.resize(p4, tf.shape(l3)[1:3], "nearest")
        p3, p4, p5 = (_apply(p, layer) for p, layer in zip((p3, p4, p5), self.smooth))
        p6 = _apply(p5, self.p6, 2)
        p7 = _apply(tf.nn.relu(p6), self.p7, 2)
        return [p3, p4, p5, p6, p7]

    def _head(self, p, convs, out, per_anchor):
        for layer in convs:
            p = tf.nn.relu(_apply(p, layer))
        p = _apply(p, out)
        return tf.reshape(p, [tf.shape(p)[0], -1, per_anchor])

    def _anchors(self, p, level):
        h, w = tf.shape(p)[1], tf.shape(p)[2]
        stride = float(STRIDES[level])
        ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32) * stride, tf.range(w, dtype=tf.float32) * stride,
                             indexing="ij")
        shifts = tf.reshape(tf.stack([xs, ys, xs, ys], axis=-1), [-1, 1, 4])
        return tf.reshape(shifts + self.base_anchors[level][None], [-1, 4])

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="input_tensor")])
    def serve(self, input_tensor):
        shape = tf.cast(tf.shape(input_tensor)[1:3], tf.float32)
        scale = tf.minimum(800.0 / tf.reduce_min(shape), 1333.0 / tf.reduce_max(shape))
        size = tf.cast(tf.floor(shape * scale), tf.int32)
        x = (tf.cast(input_tensor, tf.float32) / 255.0 - MEAN) / STD
        x = tf.image.resize(x, size, "bilinear")
        padded = (size + 31) // 32 * 32
        x = tf.pad(x, [[0, 0], [0, padded[0] - size[0]], [0, padded[1] - size[1]], [0, 0]])
        levels = self._fpn(*self._backbone(x))
        scores = [tf.sigmoid(self._head(p, self.cls_convs, self.cls_out, CLASSES)) for p in levels]
        deltas = [self._head(p, self.reg_convs, self.reg_out, 4) for p in levels]
        anchors = [self._anchors(p, i) for i, p in enumerate(levels)]
        limit = tf.cast(size, tf.float32)

        def one_image(i):
            boxes_all, scores_all, classes_all = [], [], []
            for s, d, a in zip(scores, deltas, anchors):
                flat = tf.reshape(s[i], [-1])
                keep = tf.where(flat > 0.05)[:, 0]
                top = tf.math.top_k(tf.gather(flat, keep), tf.minimum(1000, tf.size(keep)))
                index = tf.gather(keep, top.indices)
                anchor_index, cls = index // CLASSES, index % CLASSES
                delta, box = tf.gather(d[i], anchor_index), tf.gather(a, anchor_index)
                wh = box[:, 2:] - box[:, :2]
                centre = box[:, :2] + 0.5 * wh + delta[:, :2] * wh
                size_ = tf.exp(tf.minimum(delta[:, 2:], math.log(1000.0 / 16))) * wh
                decoded = tf.concat([centre - size_ / 2, centre + size_ / 2], axis=1)
                decoded = tf.clip_by_value(decoded, 0.0, tf.concat([limit[::-1], limit[::-1]], 0))
                boxes_all.append(decoded)
                scores_all.append(top.values)
                classes_all.append(tf.cast(cls, tf.float32))
            boxes, kept_scores, classes = (tf.concat(t, 0) for t in (boxes_all, scores_all, classes_all))
            offset = boxes + classes[:, None] * (tf.reduce_max(limit) + 1.0)
            keep = tf.image.non_max_suppression(tf.gather(offset, [1, 0, 3, 2], axis=1), kept_scores, 300, 0.5)
            n = tf.size(keep)
            xyxy = tf.gather(boxes, keep) / tf.concat([limit[::-1], limit[::-1]], 0)
            yxyx = tf.gather(xyxy, [1, 0, 3, 2], axis=1)
            pad = 300 - n
            return (tf.pad(yxyx, [[0, pad], [0, 0]]), tf.pad(tf.gather(kept_scores, keep), [[0, pad]]),
                    tf.pad(tf.gather(classes, keep), [[0, pad]]), tf.cast(n, tf.float32))

        boxes, det_scores, det_classes, count = tf.map_fn(
            one_image, tf.range(tf.shape(input_tensor)[0]),
            fn_output_signature=(tf.float32, tf.float32, tf.float32, tf.float32))
        return {"detection_boxes": boxes, "detection_scores": det_scores, "detection_classes": det_classes,
                "num_detections": count}


def export(path: str) -> str:
    """Writes the SavedModel folder at ``path`` and returns it."""
    tf.random.set_seed(0)
    module = RetinaNet()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


if __name__ == "__main__":
    print(export(sys.argv[1]))
