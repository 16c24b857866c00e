"""Detectors, embedders and their Beam model handlers.

Everything here but :mod:`models.handlers` and :mod:`models.tf_handlers` runs without
apache_beam, so the models can be benchmarked on a GPU machine that has only torch.

The package imports torchvision before anything else, because the other order crashes:
with tensorflow already loaded, importing torchvision (which loads triton's native
library) kills the process with a segmentation fault (measured with tensorflow 2.21 and
torch 2.14 / torchvision 0.29). Every model module, the TensorFlow and ImageAI backends
included, is imported through this package, so torchvision always comes first. A process
that imported tensorflow before this package gets an ImportError here instead of a crash.
"""
import sys

if sys.modules.get("tensorflow") is not None and "torchvision" not in sys.modules:
    raise ImportError("tensorflow was imported before torchvision: importing torchvision now would crash "
                      "this process (segmentation fault); import models (or torchvision) before tensorflow")

try:
    import torchvision  # noqa: F401  (first, before any TensorFlow import: see above)
except ImportError:  # without torch (models.background runs without it) nothing can crash this way
    pass
