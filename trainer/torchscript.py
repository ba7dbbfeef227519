"""Reading Google's 2015 Inception-v3 out of a TorchScript archive without torch: a restricted unpickler that builds
numpy arrays from the archive's storages and refuses every global outside a short allow-list, then the
convolution + batch-norm tensors in the order the graph uses them (:func:`conv_bn_layers`)."""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from derm.errors import WeightsError


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


def conv_bn_layers(root: Any) -> list[ConvBN]:
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
