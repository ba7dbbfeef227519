"""Inception-v3's architecture as Keras builds it, in two variants (stock Keras and Google's 2015 graph), and the
mapping of the 2015 convolution + batch-norm tensors onto it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from derm._progress import track
from derm.errors import WeightsError
from derm.trainer.kgraph import creation_order, parents_by_name, replay
from derm.trainer.torchscript import ConvBN

if TYPE_CHECKING:
    import keras

Variant = Literal["keras", "inception-2015"]
#: Architectures: Keras' own, and Google's 2015 graph (mixed10's pool branch a max pool).
VARIANTS: tuple[str, ...] = ("keras", "inception-2015")
N_CONV = 94
N_PARAMS = 21_802_784
BN_EPSILON = 1e-3
MIN_SIZE = 75  # Keras' smallest input side for InceptionV3


def keras_module() -> Any:
    try:
        import keras
    except ImportError as exc:
        raise WeightsError(
            f"Keras is not installed ({exc}); install the trainer extra: pip install 'derm-toolchain[train]'"
        ) from exc
    return keras


def _mixed10_pool(model: keras.Model) -> Any:
    """The AveragePooling2D of mixed10's pool branch: the last one in the model, fed by ``mixed9``."""
    keras = keras_module()
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.AveragePooling2D)]
    parents, _ = parents_by_name(model)
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
    keras = keras_module()
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
        outputs = replay(base, inputs, clone)
        return keras.Model(inputs, outputs, name=base.name)
    outputs = replay(base, input_tensor, clone)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), outputs, name=base.name)


def check_model(model: keras.Model, where: str) -> None:
    keras = keras_module()
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
    keras = keras_module()
    by_name = {layer.name: layer for layer in model.layers}
    order = creation_order(model)
    parents, _ = parents_by_name(model)
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
