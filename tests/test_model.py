import numpy as np
import pytest
import tensorflow as tf

from transfer import backbones
from transfer.errors import ConfigError
from transfer.model import BACKBONE_LAYER, build_model, unfreeze_model


@pytest.fixture
def model() -> tf.keras.Model:
    return build_model("demo_cnn", "none", (32, 32), num_classes=3, dropout=0.1)


def backbone_layers(model):
    return model.get_layer(BACKBONE_LAYER).layers


def test_backbone_starts_frozen_and_only_the_head_trains(model):
    assert not model.get_layer(BACKBONE_LAYER).trainable
    assert {v.name.split("/")[0] for v in model.trainable_variables} == {"classifier"}


def test_head_is_pooled_before_the_dense_layer(model):
    assert model.get_layer("classifier").input.shape.rank == 2
    assert model.output.shape == (None, 3)


def test_unfreeze_by_count_keeps_batchnorm_frozen(model):
    unfrozen = unfreeze_model(model, 5)  # block3_relu, block3_pool, block4_conv, block4_bn, block4_relu
    layers = backbone_layers(model)
    for layer in layers[:-5]:
        assert not layer.trainable, layer.name
    for layer in layers[-5:]:
        assert layer.trainable == (not isinstance(layer, tf.keras.layers.BatchNormalization)), layer.name
    assert unfrozen == ["block4_conv"]


def test_unfreeze_from_a_layer_name(model):
    unfrozen = unfreeze_model(model, "block3_conv")
    assert unfrozen == ["block3_conv", "block4_conv"]
    assert all(not layer.trainable for layer in backbone_layers(model) if "bn" in layer.name)


def test_unfreeze_all_still_keeps_batchnorm_frozen_and_trains_the_unfrozen(model):
    unfreeze_model(model, "all")
    model.compile("adam", "sparse_categorical_crossentropy")
    trainable = {v.name for v in model.trainable_variables}
    assert any("block1_conv" in name for name in trainable)
    assert not any("_bn" in name for name in trainable)


def test_unfreeze_unknown_layer_names_the_key(model):
    with pytest.raises(ConfigError, match="finetune.unfreeze: no layer 'block9_conv'"):
        unfreeze_model(model, "block9_conv")


@pytest.mark.parametrize(
    ("name", "module"),
    [("vgg16", "vgg16"), ("resnet50", "resnet50"), ("mobilenet_v2", "mobilenet_v2"), ("demo_cnn", "mobilenet_v2")],
)
def test_preprocessing_layers_equal_preprocess_input(name, module):
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = getattr(tf.keras.applications, module).preprocess_input(images.copy())
    x = tf.constant(images)
    for layer in backbones.preprocessing_layers(name):
        x = layer(x)
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-4)


def test_backbones_with_built_in_preprocessing_take_raw_pixels():
    for name in ("mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"):
        assert backbones.preprocessing_layers(name) == []


def test_weights_file_that_does_not_exist_is_a_config_error():
    with pytest.raises(ConfigError, match="model.weights: /nope/w.h5 not found"):
        backbones.load_backbone("demo_cnn", "/nope/w.h5", (32, 32, 3))


def test_weights_file_loads_into_the_backbone(tmp_path):
    source = backbones.demo_cnn((32, 32, 3))
    source.get_layer("block1_conv").kernel.assign(tf.ones_like(source.get_layer("block1_conv").kernel))
    source.save_weights(str(tmp_path / "w.h5"))
    loaded = backbones.load_backbone("demo_cnn", str(tmp_path / "w.h5"), (64, 64, 3))
    assert np.all(loaded.get_layer("block1_conv").kernel.numpy() == 1.0)


def test_the_config_accepts_exactly_the_registered_backbones():
    from transfer import config

    assert config.BACKBONES == tuple(backbones.BACKBONES)
