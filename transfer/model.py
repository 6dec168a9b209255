"""The classifier: preprocessing -> frozen pretrained backbone -> global average pooling -> dropout -> Dense."""

from __future__ import annotations

import tensorflow as tf

from transfer import backbones
from transfer.errors import ConfigError

BACKBONE_LAYER = "backbone"
CLASSIFIER_LAYER = "classifier"


def build_model(
    backbone_name: str, weights: str, image_size: tuple[int, int], num_classes: int, dropout: float
) -> tf.keras.Model:
    """A new head on a frozen backbone.

    The backbone is called with training=False so its BatchNorm layers stay in inference mode, also after
    fine-tuning unfreezes them; pooling turns its 4-D feature map into the vector the Dense head needs.
    """
    input_shape = (*image_size, 3)
    backbone = backbones.load_backbone(backbone_name, weights, input_shape)
    backbone._name = BACKBONE_LAYER  # one name whatever the architecture, so unfreezing can find it
    backbone.trainable = False

    inputs = tf.keras.Input(input_shape, name="image")
    x = inputs
    for layer in backbones.preprocessing_layers(backbone_name):
        x = layer(x)
    x = backbone(x, training=False)
    x = tf.keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return tf.keras.Model(inputs, classify(x, num_classes, dropout), name=f"{backbone_name}_classifier")


def build_head(num_features: int, num_classes: int, dropout: float) -> tf.keras.Model:
    """The head alone, on pooled backbone features: what a head search trains, with the layers (and names) of
    build_model's head, so its weights load into the full model."""
    features = tf.keras.Input((num_features,), name="features")
    return tf.keras.Model(features, classify(features, num_classes, dropout), name="head")


def classify(features: tf.Tensor, num_classes: int, dropout: float) -> tf.Tensor:
    """The head: dropout, then the softmax classifier (in float32: softmax and loss in full precision)."""
    x = tf.keras.layers.Dropout(dropout, name="dropout")(features)
    return tf.keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=CLASSIFIER_LAYER)(x)


def split_at_features(model: tf.keras.Model) -> tuple[tf.keras.Model, tf.keras.Model]:
    """The model up to its pooled backbone features, and the head alone on those features.

    The head model reuses the classifier's layers, so training it trains the full model's head.
    """
    pooled = model.get_layer("pool").output
    extractor = tf.keras.Model(model.input, pooled, name="features")
    features = tf.keras.Input(pooled.shape[1:], name="features")
    outputs = model.get_layer(CLASSIFIER_LAYER)(model.get_layer("dropout")(features))
    return extractor, tf.keras.Model(features, outputs, name="head")


def with_precision(model: tf.keras.Model, policy: str | None) -> tf.keras.Model:
    """The same model (architecture, names, weights, trainable flags) computing in `policy`, e.g. "mixed_bfloat16".

    A loaded model.keras keeps the dtype policy each layer was saved with, so a global policy set before loading
    does not reach it. The inputs and stateful preprocessing stay float32 (see `_stays_float32`), and so does the
    classifier: softmax and loss in full precision. Call it before `unfreeze_model`. With `policy=None` the model
    is returned as it is.
    """
    if policy is None:
        return model
    config = model.get_config()
    _set_compute_policy(config, policy)
    previous = tf.keras.mixed_precision.global_policy()
    # The models themselves (outer and nested) save no dtype and take the global one; compile reads the outer
    # model's to decide on loss scaling (mixed_float16), so they must be made under `policy` too.
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        rebuilt = tf.keras.Model.from_config(config)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    for old, new in zip(_walk(model), _walk(rebuilt), strict=True):
        new.trainable = old.trainable
    # Same config, same trainable flags: the weights come in the same order.
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _set_compute_policy(config: dict, policy: str) -> None:
    for layer in config["layers"]:
        inner = layer["config"]
        if "layers" in inner:  # a nested model: the backbone
            _set_compute_policy(inner, policy)
        elif inner["name"] != CLASSIFIER_LAYER and not _stays_float32(layer["class_name"]):
            inner["dtype"] = policy


def _stays_float32(class_name: str) -> bool:
    """Input layers, and stateful preprocessing layers (EfficientNet's Normalization): these create their state in
    the compute dtype, and a bfloat16 variable saved in model.keras does not load again ("No cast function")."""
    cls = getattr(tf.keras.layers, class_name, None)
    return cls is tf.keras.layers.InputLayer or (
        isinstance(cls, type) and issubclass(cls, tf.keras.layers.experimental.preprocessing.PreprocessingLayer)
    )


def _walk(model: tf.keras.layers.Layer) -> list[tf.keras.layers.Layer]:
    """The model and every layer in it, each parent before its children (setting `trainable` on a parent
    sets it on all its children, so the children's own flags must come after)."""
    found = [model]
    for layer in getattr(model, "layers", []):
        found += _walk(layer)
    return found


def unfreeze_model(model: tf.keras.Model, unfreeze: int | str) -> list[str]:
    """Makes the top of the backbone trainable for fine-tuning; returns the names of the unfrozen layers.

    `unfreeze` is a count of layers from the top, a layer name (that layer and all above it), or "all".
    BatchNormalization layers stay frozen: updating their statistics on a small dataset destroys what the
    backbone learned. Recompile afterwards: Keras reads `trainable` at compile time.
    """
    backbone = model.get_layer(BACKBONE_LAYER)
    layers = backbone.layers
    if unfreeze == "all":
        start = 0
    elif isinstance(unfreeze, int):
        start = max(0, len(layers) - unfreeze)
    else:
        names = [layer.name for layer in layers]
        if unfreeze not in names:
            raise ConfigError(f"finetune.unfreeze: no layer {unfreeze!r} in the backbone ({names[-1]!r} is the top)")
        start = names.index(unfreeze)
    backbone.trainable = True
    unfrozen = []
    for i, layer in enumerate(layers):
        layer.trainable = i >= start and not isinstance(layer, tf.keras.layers.BatchNormalization)
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


def compile_model(
    model: tf.keras.Model, learning_rate: float, jit_compile: bool = False, steps_per_execution: int = 1
) -> None:
    """Adam on sparse categorical cross-entropy; `steps_per_execution` steps run in one call from Python."""
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
