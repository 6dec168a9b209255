"""The head pass's feature cache and the augmentations that turn it off."""

import numpy as np
import pytest
import tensorflow as tf

from transfer.config import AUGMENTATIONS, from_dict
from transfer.data.cache import RowCache, inference
from transfer.data.pipeline import augmentation
from transfer.errors import ConfigError
from transfer.model import build_model, compile_model, split_at_features


@pytest.fixture
def model() -> tf.keras.Model:
    return build_model("demo_cnn", "none", (32, 32), num_classes=3, dropout=0.0)


def images(rows: int, batch: int = 8) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (rows, 32, 32, 3)).astype("float32")
    y = (np.arange(rows) % 3).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_training_the_head_on_features_trains_the_full_model(model):
    extractor, head = split_at_features(model)
    compile_model(head, 0.1)
    x, y = next(iter(images(16, 16)))
    before = model.predict(x, verbose=0)
    head.fit(extractor(x, training=False), y, epochs=3, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), head.predict(extractor(x), verbose=0), atol=1e-5)
    assert not np.allclose(model.predict(x, verbose=0), before)


@pytest.mark.parametrize("budget_mb", [64, 0])  # in memory; spilled to local disk
def test_feature_cache_holds_each_row_once_and_feeds_whole_batches(model, budget_mb):
    extractor, _ = split_at_features(model)
    cache = RowCache.fill(images(20), rows=20, budget_mb=budget_mb, transform=inference(extractor, tf.float32))
    assert cache.on_disk == (budget_mb == 0)
    x, _ = next(iter(images(20, 20)))
    np.testing.assert_allclose(cache.values, extractor(x).numpy(), atol=1e-5)
    validation = list(cache.dataset(batch_size=8, training=False, seed=0))
    assert [len(y) for _, y in validation] == [8, 8, 4]
    assert sorted(np.concatenate([y.numpy() for _, y in validation])) == sorted(cache.labels)
    training = list(cache.dataset(batch_size=8, training=True, seed=0).take(6))  # endless, whole batches
    assert all(f.shape == (8, cache.values.shape[1]) for f, _ in training)


@pytest.mark.parametrize("names", [("flip",), ("crop",), ("rotation",), ("contrast",), AUGMENTATIONS])
def test_each_augmentation_changes_images_and_keeps_their_shape_and_range(names):
    tf.keras.utils.set_random_seed(0)
    ramp = tf.cast(tf.range(40), tf.float32) * 6.0  # asymmetric, so a flip, a crop and a rotation all show
    image = tf.stack(
        [ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :], 255 - ramp[None, :] + 0 * ramp[:, None]],
        -1,
    )
    augment = augmentation(names, (40, 40))
    outs = [augment(image) for _ in range(8)]
    assert all(out.shape == (40, 40, 3) for out in outs)
    assert all(float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 255 for out in outs)
    changed = [float(tf.reduce_mean(tf.abs(out - image))) > 1.0 for out in outs]
    assert sum(changed) >= 3  # random: some draws may keep an image (a flip has a 1 in 2 chance)


def test_augmentation_turns_caching_off_and_on_is_refused_with_it():
    base = {"data": {"train": "x", "augment": ["flip"]}}
    assert not from_dict(base).caches_features
    assert from_dict({"data": {"train": "x"}}).caches_features
    with pytest.raises(ConfigError, match="head.cache_features: on cannot be used with data.augment"):
        from_dict({**base, "head": {"cache_features": "on"}})


def test_mixed_precision_is_on_by_default_only_on_gpu():
    assert from_dict({"data": {"train": "x"}}).precision_policy is None
    gpu = {"data": {"train": "x"}, "scaling": {"use_gpu": True}}
    assert from_dict(gpu).precision_policy == "mixed_float16"
    gpu["scaling"]["mixed_precision"] = "bfloat16"
    assert from_dict(gpu).precision_policy == "mixed_bfloat16"
