"""Rows a worker computes once per pass and then reads by index: backbone features, decoded validation images.

The head pass's backbone is frozen, so an image's features never change: epochs 2..N train the head on cached
features and cost almost nothing. Validation images are the same every epoch: decoded once, they are not
re-read and re-decoded for each validation.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf


def inference(model: tf.keras.Model, dtype: tf.DType = tf.uint8) -> tf.types.experimental.ConcreteFunction:
    """The model's inference on batches of `dtype` images, traced once for any batch size: the training and
    validation caches and a partial last batch would each trace it again (seconds per trace, on every worker)."""
    spec = tf.TensorSpec(model.input_shape, dtype)
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)


class RowCache:
    """One value per row of a worker's shard, in memory, or in a file on local disk past a budget; each row's
    label, and for validation rows its place. Filled once (`fill`, or `empty` then `add`), then read by index."""

    def __init__(
        self,
        values: np.ndarray,
        labels: np.ndarray,
        places: list[str] = (),
        filled: int | None = None,
        folder: tempfile.TemporaryDirectory | None = None,
    ):
        """Rows already at hand (a head search's trial: the features as Ray's object store holds them, not
        copied); `filled`, when fewer are filled yet; `folder`, the temporary folder of a disk-backed cache."""
        self.values, self.labels, self.places = values, labels, list(places)
        self.filled = len(labels) if filled is None else filled
        self._folder = folder  # removed with the cache
        self.on_disk = folder is not None
        self.seconds = 0.0  # how long filling it took

    @classmethod
    def empty(cls, rows: int, shape: tuple[int, ...], budget_mb: int, dtype: str = "float32") -> RowCache:
        """Room for `rows` rows, on local disk when they need more than `budget_mb`."""
        if rows * int(np.prod(shape)) * np.dtype(dtype).itemsize <= budget_mb * 2**20:
            return cls(np.empty((rows, *shape), dtype=dtype), np.empty(rows, dtype="int32"), filled=0)
        folder = tempfile.TemporaryDirectory(prefix="transfer-cache-")
        path = os.path.join(folder.name, "rows.npy")
        values = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, *shape))
        return cls(values, np.empty(rows, dtype="int32"), filled=0, folder=folder)

    def add(self, values: np.ndarray, labels: np.ndarray, places: list[str] = ()) -> None:
        """The next rows, in row order."""
        self.values[self.filled : self.filled + len(labels)] = values
        self.labels[self.filled : self.filled + len(labels)] = labels
        self.places += places
        self.filled += len(labels)

    @classmethod
    def fill(
        cls,
        batches: tf.data.Dataset,
        rows: int,
        budget_mb: int,
        transform: Callable[[tf.Tensor], tf.Tensor] | None = None,
        dtype: str = "float32",
        on_rows: Callable[[int], None] | None = None,
    ) -> RowCache:
        """The cache of a dataset of (x, labels) batches that holds exactly `rows` rows (the pipeline makes up for
        skipped records), each x turned into the cached value by `transform` (features) or kept as it is
        (images); batches of (x, labels, places) keep each row's place too. `on_rows(done)`: called after each
        batch, with the rows filled so far."""
        start = time.monotonic()
        if transform is None:
            shape = tuple(batches.element_spec[0].shape[1:])
        else:
            shape = tuple(transform.structured_outputs.shape[1:])
        cache = cls.empty(rows, shape, budget_mb, dtype)
        for x, y, *places in batches:
            values = (transform(x) if transform is not None else x).numpy()
            cache.add(values, y.numpy(), [place.decode() for place in places[0].numpy()] if places else [])
            if on_rows is not None:
                on_rows(cache.filled)
        cache.seconds = time.monotonic() - start
        return cache

    def dataset(self, batch_size: int, training: bool, seed: int) -> tf.data.Dataset:
        """Batches by index: endless and reshuffled every pass for training, every row once for validation."""
        ids = tf.data.Dataset.range(len(self.labels))
        if training:
            ids = ids.shuffle(len(self.labels), seed=seed, reshuffle_each_iteration=True).repeat()
        ids = ids.batch(batch_size, drop_remainder=training)
        shape = self.values.shape[1:]
        dtype = tf.as_dtype(self.values.dtype)

        def rows(i):
            i = np.sort(i)  # in file order: a disk-backed cache reads forward
            return self.values[i], self.labels[i]

        def gather(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            values, labels = tf.numpy_function(rows, [i], (dtype, tf.int32))
            values.set_shape((None, *shape))
            labels.set_shape((None,))
            return values, labels

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ids.map(gather).with_options(options).prefetch(tf.data.AUTOTUNE)
