"""The classifier: Inception-v3 backbone, global average pool, softmax over the training classes.

One graph from pixels to probabilities::

    image (float32 0..255, RGB) -> Rescaling x/127.5-1 ("scale") -> Inception-v3 (flat, mixed0..mixed10)
      -> GlobalAveragePooling2D ("embedding", 2048-d) [-> concat with pooled mixed7..9 ("features")]
      -> Dropout -> Dense ("logits") -> Softmax ("probs")

The scaling lives inside the model, so no caller (trainer, exporter, app) can get normalisation wrong. The backbone
is built flat with ``input_tensor=`` (no nested model), which quantization-aware training and the exporters need.

``pool_layers`` adds globally pooled mid-level blocks next to mixed10: for dermoscopy, mid-level texture features
transfer better than the last ImageNet block alone. The feature cache always stores all of them
(:data:`POOLABLE`), so the choice costs nothing to change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from derm.errors import DermError

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

POOLABLE = ("mixed7", "mixed8", "mixed9", "mixed10")  # pooled together in the feature cache, in this order
POOL_DIMS = {"mixed7": 768, "mixed8": 1280, "mixed9": 2048, "mixed10": 2048}
MIN_INPUT = 75  # Inception-v3's smallest input side


class ModelError(DermError, ValueError):
    """A model cannot be built or loaded as asked."""


def feature_slice(pool_layers: Sequence[str]) -> list[int]:
    """Column indices into a cached feature row (all :data:`POOLABLE`, concatenated) for ``pool_layers``."""
    cols: list[int] = []
    start = 0
    for name in POOLABLE:
        if name in pool_layers:
            cols.extend(range(start, start + POOL_DIMS[name]))
        start += POOL_DIMS[name]
    return cols


def check_pool_layers(pool_layers: Sequence[str]) -> tuple[str, ...]:
    layers = tuple(pool_layers)
    bad = [p for p in layers if p not in POOLABLE]
    if bad or not layers or "mixed10" not in layers or len(set(layers)) != len(layers):
        raise ModelError(
            f"pool_layers must name distinct blocks among {', '.join(POOLABLE)} and include mixed10; "
            f"received {list(layers)!r}."
        )
    return tuple(p for p in POOLABLE if p in layers)  # canonical order


def build_backbone(
    input_size: int = 299, weights: str = "inception-2015", cache: Path | None = None
) -> tuple[Any, Any, Any]:
    """``(inputs, scaled, backbone)``: a float32 0..255 input, its scaled tensor and the flat Inception-v3 on it."""
    import keras

    from derm.trainer.weights import load_backbone

    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < MIN_INPUT:
        raise ModelError(f"input_size must be an integer of at least {MIN_INPUT} pixels, received {input_size!r}.")
    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="float32", name="image")
    scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
    backbone = load_backbone(weights, input_tensor=scaled, cache=cache)
    return inputs, scaled, backbone


def pooled_features(backbone: Any, pool_layers: Sequence[str]) -> tuple[Any, Any]:
    """``(embedding, features)``: GAP of mixed10 named "embedding", and the head's input (the same tensor, or the
    concatenation of the pooled ``pool_layers`` in :data:`POOLABLE` order, named "features")."""
    import keras

    layers = check_pool_layers(pool_layers)
    embedding = keras.layers.GlobalAveragePooling2D(name="embedding")(backbone.output)
    if layers == ("mixed10",):
        return embedding, embedding
    parts = [
        embedding
        if name == "mixed10"
        else keras.layers.GlobalAveragePooling2D(name=f"pool_{name}")(backbone.get_layer(name).output)
        for name in layers
    ]
    return embedding, keras.layers.Concatenate(name="features")(parts)


def build_head(features: Any, num_classes: int, dropout: float = 0.0) -> Any:
    """Dropout -> Dense "logits" -> Softmax "probs" (float32 even under mixed precision)."""
    import keras

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"A classifier needs at least 2 training classes, received {num_classes!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), received {dropout!r}.")
    x = keras.layers.Dropout(dropout, name="dropout")(features) if dropout > 0 else features
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.layers.Activation("softmax", dtype="float32", name="probs")(logits)


def build_model(
    num_classes: int,
    input_size: int = 299,
    weights: str = "inception-2015",
    pool_layers: Sequence[str] = ("mixed10",),
    dropout: float = 0.0,
    cache: Path | None = None,
) -> keras.Model:
    """The classifier, one flat Keras model: input "image" (N, s, s, 3) float32 0..255, output "probs"."""
    import keras

    inputs, _, backbone = build_backbone(input_size, weights, cache)
    _, features = pooled_features(backbone, pool_layers)
    probs = build_head(features, num_classes, dropout)
    return keras.Model(inputs, probs, name="derm_inception_v3")


def compile_paper_rmsprop(model: keras.Model, cfg: Any, steps: int) -> Any:
    """Compile ``model`` with the paper's optimizer (RMSProp, rho 0.9, momentum 0.9, epsilon 0.1; ``cfg.lr`` divided by
    ``cfg.lr_drop_factor`` every ``cfg.lr_drop_every`` epochs of ``steps`` steps); returns the learning-rate
    schedule. Every-layer fine-tuning and the top blocks on cached activations both train this way."""
    import keras

    schedule = keras.optimizers.schedules.ExponentialDecay(
        cfg.lr, decay_steps=cfg.lr_drop_every * steps, decay_rate=1.0 / cfg.lr_drop_factor, staircase=True
    )
    opt = keras.optimizers.RMSprop(learning_rate=schedule, rho=0.9, momentum=0.9, epsilon=0.1)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    return schedule


def head_model(num_features: int, num_classes: int, dropout: float = 0.0) -> keras.Model:
    """The head alone, on cached features: its "logits" layer has the same shape as the full model's."""
    import keras

    inputs = keras.Input(shape=(num_features,), name="features")
    return keras.Model(inputs, build_head(inputs, num_classes, dropout), name="head")


def copy_head(head: keras.Model, model: keras.Model) -> None:
    """Copy a trained :func:`head_model`'s weights into the full model's "logits" layer."""
    src, dst = head.get_layer("logits"), model.get_layer("logits")
    shapes = [w.shape for w in src.get_weights()], [w.shape for w in dst.get_weights()]
    if shapes[0] != shapes[1]:
        raise ModelError(f"Head weights {shapes[0]} do not fit the model's logits layer {shapes[1]}.")
    dst.set_weights(src.get_weights())


def feature_extractor(model: keras.Model) -> keras.Model:
    """Same inputs, outputs every pooled block of :data:`POOLABLE` concatenated (the feature-cache row)."""
    import keras

    parts = []
    for name in POOLABLE:
        out = model.get_layer(name).output
        parts.append(keras.layers.GlobalAveragePooling2D(name=f"cache_pool_{name}")(out))
    return keras.Model(model.input, keras.layers.Concatenate(name="cache_features")(parts), name="feature_cache")


def with_embedding(model: keras.Model) -> keras.Model:
    """Same inputs, outputs ``[probs, embedding]`` (for evaluation: t-SNE of the 2048-d embedding)."""
    import keras

    return keras.Model(model.input, [model.get_layer("probs").output, model.get_layer("embedding").output])


def load_model(path: str | Path) -> keras.Model:
    """Load a saved classifier (``model.keras``) with a clear error when it is missing or not one of ours."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"No model at {str(path)!r}: expected the model.keras of a derm-train run directory.")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types for a bad archive
        raise ModelError(f"Cannot load {str(path)!r} as a Keras model ({type(exc).__name__}: {exc}).") from exc
    for name in ("image", "scale", "embedding", "logits", "probs"):
        try:
            model.get_layer(name)
        except ValueError:
            if name == "image" and model.input.name.startswith("image"):
                continue
            raise ModelError(f"{str(path)!r} is a Keras model but not a derm classifier: no layer {name!r}.") from None
    return model
