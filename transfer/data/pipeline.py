"""A worker's input pipeline: read its units' rows, decode and resize in tf.data, batch, prefetch.

Images leave the pipeline as float32 RGB in [0, 255]; the backbone's own preprocessing is part of the model.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import tensorflow as tf

from transfer import storage
from transfer.data.plan import Unit

PARALLEL_READS = 4


def read_unit(unit: Unit, image_column: str, label_column: str, class_index: dict[str, int]):
    """Yields (encoded image, class index) for the unit's rows, reading one row group's two columns."""
    fs, path = storage.resolve(unit.file)
    table = pq.ParquetFile(path, filesystem=fs).read_row_group(unit.row_group, columns=[image_column, label_column])
    table = table.take(list(unit.rows))
    for image, label in zip(
        table.column(image_column).to_pylist(), table.column(label_column).to_pylist(), strict=True
    ):
        yield image, class_index[str(label)]


def decode_image(encoded: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes to float32 RGB at image_size; grayscale and RGBA become RGB."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, image_size)
    image.set_shape((*image_size, 3))
    return image


def make_dataset(
    units: list[Unit],
    num_rows: int,
    classes: list[str],
    image_column: str,
    label_column: str,
    image_size: tuple[int, int],
    batch_size: int,
    training: bool,
    shuffle_buffer: int = 1024,
    seed: int = 0,
) -> tf.data.Dataset:
    """The batches of one worker's shard.

    Training: endless, reshuffled every pass (unit order and a bounded buffer), whole batches only, so
    `steps_per_epoch` alone decides an epoch. Validation: exactly `num_rows` rows in order, the last batch
    possibly partial, the same on every worker.
    """
    class_index = {name: i for i, name in enumerate(classes)}
    signature = (tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int32))

    def rows_of(i: tf.Tensor) -> tf.data.Dataset:
        return tf.data.Dataset.from_generator(
            lambda i: read_unit(units[i], image_column, label_column, class_index),
            output_signature=signature,
            args=(i,),
        )

    ids = tf.data.Dataset.range(len(units))
    if training:
        ids = ids.shuffle(len(units), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ids.interleave(
        rows_of, cycle_length=PARALLEL_READS, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training
    )
    ds = ds.map(lambda image, label: (decode_image(image, image_size), label), num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).batch(batch_size, drop_remainder=True)
    else:
        ds = ds.take(num_rows).batch(batch_size)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
