"""Pretrained backbones, looked up by name, each with its own input preprocessing.

The preprocessing of `tf.keras.applications.<module>.preprocess_input` is rebuilt from built-in layers and put
inside the model, so an exported model takes plain RGB pixels in [0, 255] and loads with Keras' safe mode (no
Lambda layers, no custom classes). tests/test_backbones.py checks it matches `preprocess_input` exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from transfer import storage
from transfer.errors import ConfigError

# The "caffe" mode of preprocess_input: RGB -> BGR, then the ImageNet mean of each BGR channel subtracted.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[..., tf.keras.Model]  # (input_shape=, weights=) -> a headless model
    preprocessing: str  # caffe | tf (scale to [-1, 1]) | included (the backbone does its own)
    module: str  # the tf.keras.applications module whose preprocess_input this reproduces


def _application(constructor: Callable) -> Callable[..., tf.keras.Model]:
    def build(input_shape: tuple[int, int, int], weights: str | None) -> tf.keras.Model:
        return constructor(include_top=False, weights=weights, input_shape=input_shape)

    return build


def demo_cnn(input_shape: tuple[int, int, int], weights: str | None = None) -> tf.keras.Model:
    """A small convolutional backbone for the demo and the tests, pretrained offline by `transfer.demo`.

    Conv-BatchNorm-ReLU blocks, like the real backbones, so freezing and unfreezing behave the same way.
    """
    if weights == "imagenet":
        raise ConfigError("model.weights: demo_cnn has no imagenet weights; use none or a weights file")
    layers = tf.keras.layers
    inputs = layers.Input(input_shape)
    x = inputs
    for i, filters in enumerate((16, 32, 64, 128), start=1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
        if i < 4:
            x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
    return tf.keras.Model(inputs, x, name="demo_cnn")


_apps = tf.keras.applications
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("vgg16", _application(_apps.VGG16), "caffe", "vgg16"),
        Backbone("resnet50", _application(_apps.ResNet50), "caffe", "resnet50"),
        Backbone("mobilenet_v2", _application(_apps.MobileNetV2), "tf", "mobilenet_v2"),
        Backbone("mobilenet_v3_small", _application(_apps.MobileNetV3Small), "included", "mobilenet_v3"),
        Backbone("mobilenet_v3_large", _application(_apps.MobileNetV3Large), "included", "mobilenet_v3"),
        Backbone("efficientnet_b0", _application(_apps.EfficientNetB0), "included", "efficientnet"),
        Backbone("efficientnet_v2_b0", _application(_apps.EfficientNetV2B0), "included", "efficientnet_v2"),
        Backbone("convnext_tiny", _application(_apps.ConvNeXtTiny), "included", "convnext"),
        Backbone("demo_cnn", demo_cnn, "tf", "mobilenet_v2"),
    )
}


def get(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"model.backbone: unknown backbone {name!r} (known: {', '.join(BACKBONES)})") from None


def load_backbone(name: str, weights: str, input_shape: tuple[int, int, int]) -> tf.keras.Model:
    """The headless backbone with `weights`: imagenet (downloads), none, or a .h5 weights file path or URI."""
    backbone = get(name)
    if weights in ("imagenet", "none"):
        return backbone.build(input_shape=input_shape, weights=None if weights == "none" else "imagenet")
    model = backbone.build(input_shape=input_shape, weights=None)
    if not storage.exists(weights):
        raise ConfigError(f"model.weights: {weights} not found")
    with storage.local_copy(weights) as path:
        try:
            model.load_weights(path)
        except (ValueError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"model.weights: {weights} does not fit backbone {name}: {first}") from None
    return model


def preprocessing_layers(name: str) -> list[tf.keras.layers.Layer]:
    """Built-in layers equal to the backbone's preprocess_input, for inputs in [0, 255] RGB."""
    mode = get(name).preprocessing
    if mode == "tf":
        return [tf.keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")]
    if mode == "caffe":
        # A frozen 1x1 convolution whose kernel swaps R and B and whose bias subtracts the mean: exact in float32.
        kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
        for rgb, bgr in ((0, 2), (1, 1), (2, 0)):
            kernel[0, 0, rgb, bgr] = 1.0
        bias = -np.array(CAFFE_MEAN_BGR, dtype=np.float32)
        conv = tf.keras.layers.Conv2D(3, 1, name="preprocess", trainable=False)
        conv.build((None, None, None, 3))
        conv.set_weights([kernel, bias])
        return [conv]
    return []
