"""A worker's input pipeline: read its units' rows, decode, resize, batch, prefetch.

Rows hold image bytes or image URIs; URIs are fetched with many requests in flight, so object-store latency
does not starve the pipeline. Images leave the pipeline as float32 RGB in [0, 255]; the backbone's own
preprocessing is part of the model. Records that cannot be used are skipped and counted (bad_records: skip),
or stop the run naming the first one (fail).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from transfer import storage
from transfer.data.parquet import MAX_EXAMPLES
from transfer.data.plan import Unit
from transfer.errors import DataError

PARALLEL_UNITS = 4  # row groups read at once
FETCHES_PER_UNIT = 16  # image objects in flight per row group


class BadRecords:
    """The records one worker could not use: how many, the first few with where and why; or, in fail mode, stop."""

    def __init__(self, mode: str):
        self.mode = mode
        self.found: set[str] = set()
        self.examples: list[str] = []
        self.skipped = 0  # every skip, the same record again in a later epoch included
        self.error: DataError | None = None
        self._lock = threading.Lock()

    def bad(self, where: str, why: str) -> None:
        example = f"{where}: {why}"
        with self._lock:
            if self.mode == "fail":
                self.error = DataError(f"data.bad_records is fail: {example}")
                raise self.error
            self.skipped += 1
            if where not in self.found:
                self.found.add(where)
                if len(self.examples) < MAX_EXAMPLES:
                    self.examples.append(example)


class NothingUsable:
    """Stops a shard in which a whole pass yields no usable record: its dataset would end early on this
    worker alone, and the other workers would wait for it in a collective."""

    def __init__(self, bad: BadRecords, shard_rows: int):
        self.bad_records, self.shard_rows, self.in_a_row = bad, shard_rows, 0

    def good(self) -> None:
        self.in_a_row = 0

    def bad(self, where: str, why: str) -> None:
        self.bad_records.bad(where, why)
        self.in_a_row += 1
        if self.in_a_row >= self.shard_rows:
            error = DataError(
                f"data: none of the {self.shard_rows} rows of a worker's shard is usable; last: {where}: {why}"
            )
            self.bad_records.error = error
            raise error


def read_unit(
    unit: Unit, image_column: str, label_column: str, class_index: dict[str, int], bad: NothingUsable
) -> Iterator[tuple[np.ndarray, int]]:
    """Yields (decoded RGB image, class index) for the unit's usable rows."""
    fs, path = storage.resolve(unit.file)
    table = pq.ParquetFile(path, filesystem=fs).read_row_group(unit.row_group, columns=[image_column, label_column])
    table = table.take(list(unit.rows))
    images = table.column(image_column).to_pylist()
    labels = table.column(label_column).to_pylist()
    holds_uris = bool(images) and isinstance(next((i for i in images if i is not None), b""), str)
    if holds_uris:
        places = [
            storage.redact(uri or f"{unit.file} row group {unit.row_group} row {r}")
            for uri, r in zip(images, unit.rows, strict=True)
        ]
        with ThreadPoolExecutor(FETCHES_PER_UNIT) as pool:
            contents = pool.map(_fetch, images)
            yield from _decoded(zip(places, contents, labels, strict=True), class_index, bad)
    else:
        where = f"{storage.redact(unit.file)} row group {unit.row_group} row"
        places = [f"{where} {r}" for r in unit.rows]
        contents = ((data, None) for data in images)
        yield from _decoded(zip(places, contents, labels, strict=True), class_index, bad)


def _fetch(uri: str | None) -> tuple[bytes | None, str | None]:
    if uri is None:
        return None, "no image URI"
    try:
        return storage.read_object(uri), None
    except Exception as e:  # any failure to fetch one object makes one bad record, whatever the store
        return None, f"cannot read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _decoded(rows, class_index: dict[str, int], bad: NothingUsable) -> Iterator[tuple[np.ndarray, int]]:
    for where, (data, fetch_error), label in rows:
        if fetch_error:
            bad.bad(where, fetch_error)
            continue
        if not data:
            bad.bad(where, "empty image")
            continue
        try:
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
            bad.bad(where, "not a decodable image (truncated or not JPEG/PNG/GIF/BMP)")
            continue
        bad.good()
        yield image.numpy(), class_index[str(label)]


def augmentation(names: tuple[str, ...], image_size: tuple[int, int]):
    """A random transformation of one image (float32 RGB in [0, 255]) made of the named augmentations."""
    rotate = tf.keras.layers.RandomRotation(0.1, fill_mode="reflect") if "rotation" in names else None
    crop_size = (int(image_size[0] * 0.9), int(image_size[1] * 0.9), 3)

    def apply(image: tf.Tensor) -> tf.Tensor:
        if "flip" in names:
            image = tf.image.random_flip_left_right(image)
        if "crop" in names:
            image = tf.image.resize(tf.image.random_crop(image, crop_size), image_size)
        if rotate is not None:
            image = rotate(image, training=True)
        if "contrast" in names:
            image = tf.clip_by_value(tf.image.random_contrast(image, 0.8, 1.2), 0.0, 255.0)
        return image

    return apply


def make_dataset(
    units: list[Unit],
    num_rows: int,
    classes: list[str],
    image_column: str,
    label_column: str,
    image_size: tuple[int, int],
    batch_size: int,
    training: bool,
    bad: BadRecords | None = None,
    shuffle_buffer: int = 1024,
    seed: int = 0,
    augment: tuple[str, ...] = (),
) -> tf.data.Dataset:
    """The batches of one worker's shard.

    Training: endless, reshuffled every pass (unit order and a bounded buffer), whole batches only, so
    `steps_per_epoch` alone decides an epoch. Validation: exactly `num_rows` rows, the last batch possibly
    partial, the same on every worker (skipped records are made up for by reading on from the start).
    """
    guard = NothingUsable(bad or BadRecords("skip"), shard_rows=sum(len(u.rows) for u in units))
    class_index = {name: i for i, name in enumerate(classes)}
    signature = (tf.TensorSpec((None, None, 3), tf.uint8), tf.TensorSpec((), tf.int32))

    def rows_of(i: tf.Tensor) -> tf.data.Dataset:
        return tf.data.Dataset.from_generator(
            lambda i: read_unit(units[i], image_column, label_column, class_index, guard),
            output_signature=signature,
            args=(i,),
        )

    def resize(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.image.resize(image, image_size)
        image.set_shape((*image_size, 3))
        return image, label

    ids = tf.data.Dataset.range(len(units))
    if training:
        ids = ids.shuffle(len(units), seed=seed, reshuffle_each_iteration=True)
    ds = ids.interleave(
        rows_of, cycle_length=PARALLEL_UNITS, num_parallel_calls=PARALLEL_UNITS, deterministic=not training
    ).repeat()  # pass after pass, each in a new unit order
    ds = ds.map(resize, num_parallel_calls=tf.data.AUTOTUNE)
    if training and augment:
        augmenter = augmentation(augment, image_size)
        ds = ds.map(lambda image, label: (augmenter(image), label), num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).batch(batch_size, drop_remainder=True)
    else:
        ds = ds.take(num_rows).batch(batch_size)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
