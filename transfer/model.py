"""The classifier: preprocessing -> frozen pretrained backbone -> global average pooling -> dropout -> Dense."""

from __future__ import annotations

import tensorflow as tf

from transfer import backbones
from transfer.errors import ConfigError

BACKBONE_LAYER = "backbone"


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
    x = tf.keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = tf.keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="classifier")(x)
    return tf.keras.Model(inputs, outputs, name=f"{backbone_name}_classifier")


def split_at_features(model: tf.keras.Model) -> tuple[tf.keras.Model, tf.keras.Model]:
    """The model up to its pooled backbone features, and the head alone on those features.

    The head model reuses the classifier's layers, so training it trains the full model's head.
    """
    pooled = model.get_layer("pool").output
    extractor = tf.keras.Model(model.input, pooled, name="features")
    features = tf.keras.Input(pooled.shape[1:], name="features")
    outputs = model.get_layer("classifier")(model.get_layer("dropout")(features))
    return extractor, tf.keras.Model(features, outputs, name="head")


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


def compile_model(model: tf.keras.Model, learning_rate: float, jit_compile: bool = False) -> None:
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
