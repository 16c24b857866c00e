"""Where model weights come from, and how they are read and checked.

Weights live anywhere a Beam filesystem can read (a local path, ``gs://``,
``s3://``), because a Dataflow worker has no shared disk: the job names a URI and
every worker reads it. ``apache_beam`` is imported only when a non-local URI is
actually read, so that this package runs where Beam is not installed (the GPU
benchmark machine).

Every failure to get usable weights is a :class:`WeightsError` with a one-line
message, which the command line prints as its one-line reason for exiting.
"""
import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

if TYPE_CHECKING:
    import torch

__all__ = ["ONNX_OPTIMIZATION", "WeightsError", "WeightsSpec", "apply_state_dict", "folder_sha256", "is_local",
           "load_bytes", "load_state_dict", "local_file", "local_folder", "onnx_session", "open_uri",
           "torchvision_state_dict"]

_LOG = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Weights are missing, corrupt, or do not fit the model they are meant for."""


@dataclasses.dataclass(frozen=True)
class WeightsSpec:
    """What a model's weights file is and how its inputs must be prepared.

    Modelled on torchvision's ``Weights`` entries, but for files the job reads
    from a URI rather than downloads: ``url`` says where the published file
    lives, ``sha256`` (when known) lets a caller pin the exact file.

    ``transforms``, as in torchvision, builds the preprocessing the model was
    trained with: the model's builder calls it (with what only the loaded file
    knows, such as its input size, and the user's options) and the model runs
    every input through the callable it returns, so the recipe is stated once,
    here, and is the code that runs. A classical model has no file: its ``url``
    is empty and its ``file_format`` None.
    """

    name: str
    url: str
    sha256: Optional[str]
    transforms: Callable[..., Callable]
    categories: tuple = ()
    meta: dict = dataclasses.field(default_factory=dict)
    file_format: Optional[str] = "torch"  # 'torch' (a state dict), 'onnx', 'savedmodel', None (no file)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a path on this machine (no network needed to read it)."""
    scheme = urlparse(uri).scheme
    # A one-letter scheme is a Windows drive ("C:\\..."), not a URL.
    return scheme in ("", "file") or len(scheme) == 1


def open_uri(uri: str) -> bytes:
    """The bytes at ``uri``: a local path, ``file://`` or any Beam filesystem URI.

    Raises FileNotFoundError when nothing is there.
    """
    if is_local(uri):
        path = urlparse(uri).path if uri.startswith("file://") else uri
        with open(os.path.expanduser(path), "rb") as f:
            return f.read()
    from apache_beam.io.filesystems import FileSystems  # only remote URIs need Beam

    if not FileSystems.exists(uri):
        raise FileNotFoundError(uri)
    with FileSystems.open(uri) as f:
        return f.read()


def load_bytes(uri: str, sha256: Optional[str] = None) -> bytes:
    """Reads ``uri``; when ``sha256`` is given, the file must have that digest."""
    try:
        data = open_uri(uri)
    except FileNotFoundError:
        raise WeightsError("weights not found: %s" % uri) from None
    except (OSError, ValueError) as e:  # unreadable, or a scheme Beam does not know
        raise WeightsError("cannot read weights %s: %s" % (uri, e)) from None
    if sha256:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256.lower():
            raise WeightsError(
                "sha256 mismatch for weights %s: expected %s, got %s" % (uri, sha256.lower(), digest))
    return data


@contextlib.contextmanager
def local_file(uri: str, sha256: Optional[str] = None, suffix: str = "") -> Iterator[str]:
    """A local path holding the file at ``uri`` while the block runs, for libraries
    that only open paths (ImageAI). The file is checked against ``sha256``
    (:func:`load_bytes`); a local file is then used in place, a remote one copied to a
    temporary file ending in ``suffix``, removed afterwards."""
    if is_local(uri):
        path = os.path.expanduser(urlparse(uri).path if uri.startswith("file://") else uri)
        if not os.path.isfile(path):
            raise WeightsError("weights not found: %s" % uri)
        if sha256:
            load_bytes(path, sha256)
        yield path
        return
    data = load_bytes(uri, sha256)
    handle, path = tempfile.mkstemp(prefix="cctview-weights-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        yield path
    finally:
        os.remove(path)


def folder_sha256(root: str) -> str:
    r"""The digest that pins a weights folder (a TensorFlow SavedModel): the sha256 of
    ``sha256sum`` lines ("<hex>  <relative path>\n") of every file, sorted by path, i.e.
    ``(cd DIR && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs sha256sum) | sha256sum``."""
    lines = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                lines.append((os.path.relpath(path, root).replace(os.sep, "/"), hashlib.sha256(f.read()).hexdigest()))
    listing = "".join("%s  %s\n" % (digest, rel) for rel, digest in sorted(lines, key=lambda x: x[0].encode()))
    return hashlib.sha256(listing.encode()).hexdigest()


def _copy_remote_folder(uri: str, target: str) -> int:
    """Copies every file under the Beam filesystem folder ``uri`` into ``target``."""
    from apache_beam.io.filesystems import FileSystems  # only remote URIs need Beam

    prefix = uri.rstrip("/") + "/"
    found = FileSystems.match([prefix + "**"])[0].metadata_list
    for metadata in found:
        relative = metadata.path[len(prefix):]
        path = os.path.join(target, *relative.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with FileSystems.open(metadata.path) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return len(found)


@contextlib.contextmanager
def local_folder(uri: str, sha256: Optional[str] = None) -> Iterator[str]:
    """A local folder holding the weights folder at ``uri`` (local or any Beam filesystem
    URI) while the block runs; a remote folder is copied to a temporary one, removed
    afterwards. With ``sha256`` the folder must have that :func:`folder_sha256`."""
    if is_local(uri):
        path = os.path.expanduser(urlparse(uri).path if uri.startswith("file://") else uri)
        if not os.path.isdir(path):
            raise WeightsError("weights folder not found: %s" % uri)
        _check_folder(path, uri, sha256)
        yield path
        return
    target = tempfile.mkdtemp(prefix="cctview-weights-")
    try:
        try:
            copied = _copy_remote_folder(uri, target)
        except (OSError, ValueError) as e:  # unreachable bucket, or a scheme Beam does not know
            raise WeightsError("cannot read weights folder %s: %s" % (uri, _first_line(e))) from None
        if not copied:
            raise WeightsError("weights folder not found: %s" % uri)
        _check_folder(target, uri, sha256)
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _check_folder(path: str, uri: str, sha256: Optional[str]) -> None:
    if sha256:
        digest = folder_sha256(path)
        if digest != sha256.lower():
            raise WeightsError("sha256 mismatch for weights folder %s: expected %s, got %s"
                               % (uri, sha256.lower(), digest))


def load_state_dict(uri: str, sha256: Optional[str] = None) -> dict:
    """A tensor state dict from a checkpoint at ``uri``, on the CPU.

    Accepts a plain state dict or a training checkpoint holding one under
    ``state_dict`` or ``model``, and strips the ``module.`` prefix that
    ``nn.DataParallel`` adds. Loads with ``weights_only=True``: a checkpoint
    is data, and unpickling arbitrary objects from a URI would run their code.
    """
    import torch  # here, so that the classical models (numpy only) can use this module

    data = load_bytes(uri, sha256)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe pickles
        raise WeightsError("not a loadable torch state dict: %s (%s)" % (uri, _first_line(e))) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError("not a state dict of tensors: %s" % uri)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def apply_state_dict(model: "torch.nn.Module", state: dict, uri: str, name: str) -> None:
    """Loads ``state`` into ``model`` strictly, or says in one line why it does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or resized:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", resized)):
            if keys:
                parts.append("%d %s (%s%s)" % (len(keys), what, ", ".join(keys[:3]), ", ..." if len(keys) > 3 else ""))
        raise WeightsError("weights %s do not fit %s: %s" % (uri, name, "; ".join(parts)))
    model.load_state_dict(state)


def torchvision_state_dict(weights_enum, name: str, flag: str) -> dict:
    """torchvision's published weights, from the torch hub cache or the network.

    The download fails on an offline worker; the error then says which flag
    supplies a copy and where the original lives, instead of a urllib traceback.
    """
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        _LOG.debug("download of %s failed: %s", weights_enum.url, e)
        raise WeightsError(
            "weights not available offline for %s: pass %s URI (torchvision url: %s)"
            % (name, flag, weights_enum.url)) from None


ONNX_OPTIMIZATION = ("all", "extended", "basic")


def onnx_session(uri: str, sha256: Optional[str], device: str, *, threads: int = 0,
                 optimization: Optional[str] = None, known: Sequence[WeightsSpec] = ()):
    """An onnxruntime session for the ONNX file at ``uri``.

    Uses the CUDA provider when ``device`` is cuda and this onnxruntime build
    has it; otherwise the CPU (with a warning, since the caller asked for a GPU).
    ``threads`` is the session's intra-op thread count (0: onnxruntime's
    default, one per physical core); 1 where the runner already runs one
    bundle per core, else every bundle's session starts a thread per core.
    ``optimization`` is the graph optimisation level. ``all`` adds the CPU
    layout rewrite (NCHWc), which speeds up wide convolutions (YOLOX-Nano) but
    slows narrow and depthwise ones (OSNet x0.25: ~1.3x slower per crop on this
    project's CPU, BENCHMARKS.md). None: the ``onnx_optimization`` that the
    spec in ``known`` with this file's sha256 records, else ``all``.
    """
    import onnxruntime as ort

    if optimization not in (None,) + ONNX_OPTIMIZATION:
        raise ValueError("ONNX optimization must be one of %s, got %r" % (", ".join(ONNX_OPTIMIZATION), optimization))
    if int(threads) < 0:
        raise ValueError("threads must be >= 0 (0: onnxruntime's default), got %r" % threads)
    data = load_bytes(uri, sha256)
    if optimization is None:
        # load_bytes has checked a pinned digest; only an unpinned file is hashed here.
        digest = sha256.lower() if sha256 else hashlib.sha256(data).hexdigest()
        optimization = next((spec.meta.get("onnx_optimization", "all") for spec in known
                             if spec.sha256 == digest), "all")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            _LOG.warning("onnxruntime has no CUDA provider here; running %s on the CPU", uri)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, "ORT_ENABLE_" + optimization.upper())
    try:
        return ort.InferenceSession(data, options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise WeightsError("not a loadable ONNX model: %s (%s)" % (uri, _first_line(e))) from None
