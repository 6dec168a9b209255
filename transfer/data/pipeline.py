"""A worker's input pipeline: read its units' rows, decode and resize in tf.data, shuffle, batch, prefetch.

Python only reads: Parquet row groups (pyarrow) and image objects (many requests in flight, so object-store
latency does not starve the pipeline). Decoding and resizing run in tf.data's parallel calls, in C++ threads
without the GIL. Images leave the pipeline as uint8 RGB at `image_size` (the model casts them on its device, a
quarter of the bytes to move); augmented images leave as float32 in [0, 255]. The backbone's own preprocessing is
part of the model. Records that cannot be used are skipped and counted once each (bad_records: skip), or stop the
run naming the first one (fail).
"""

from __future__ import annotations

import bisect
import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from transfer import storage
from transfer.data import parquet
from transfer.data.parquet import MAX_EXAMPLES
from transfer.data.plan import Unit
from transfer.errors import DataError

UNDECODABLE = "not a decodable image (truncated or not JPEG/PNG/GIF/BMP)"
JPEG_SCALES = (1, 2, 4, 8)  # the scales libjpeg decodes at in the DCT domain
CHUNK = 64  # records handed from Python to tf.data at once
SLICE_ROWS = 16  # rows a row group is streamed in; an open row group holds two slices
READ_BUFFER = 1 << 20  # bytes per read of a column chunk
ROW_GROUPS_OPEN = 32  # per worker, by default: about a class each on class-sorted data of many classes
FETCHES = 64  # image objects in flight per worker, by default
READ_BUFFER_MB = 256  # per worker, by default: what the row groups open at once may hold in memory


@dataclass(frozen=True)
class Parallelism:
    """How much one worker's pipeline does at once: by default, from the CPUs the worker was given."""

    decode: int  # images decoded and resized at once (tf.data threads)
    row_groups: int  # row groups open at once, their records interleaved one by one into every chunk
    fetches: int  # image objects in flight per worker (URI columns)
    open_bytes: int = READ_BUFFER_MB << 20  # what the open row groups may hold in memory (Unit.open_bytes), beyond two
    # Slices read at once, in Python threads. Few: they contend for the GIL. On one CPU (512 px, single runs, noisy)
    # 1-2 readers gave 220-330 images/s, 32 gave 150.
    reads: int = 2

    @classmethod
    def for_cpus(
        cls,
        cpus: int,
        decode: int | None = None,
        row_groups: int | None = None,
        fetches: int | None = None,
        read_buffer_mb: int = READ_BUFFER_MB,
    ) -> Parallelism:
        return cls(decode or cpus, row_groups or ROW_GROUPS_OPEN, fetches or FETCHES, read_buffer_mb << 20, cpus + 1)


class BadRecords:
    """The records one worker could not use: each counted once, the first few named with why; or, in fail mode,
    the first stops the run."""

    def __init__(self, mode: str):
        self.mode = mode
        self.found: set[str] = set()
        self.examples: list[str] = []
        self.error: DataError | None = None
        self._lock = threading.Lock()  # reader threads and tf.data's threads report here

    def bad(self, where: str, why: str) -> bool:
        """Records one bad record; True when it is new. Raises in fail mode."""
        example = f"{where}: {why}"
        with self._lock:
            if self.mode == "fail":
                self.error = DataError(f"data.bad_records is fail: {example}")
                raise self.error
            if where in self.found:
                return False
            self.found.add(where)
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(example)
            return True

    def since(self, found: set[str], examples: int) -> dict:
        """The records found after a snapshot (`found` and the count of `examples` then), as `add` takes them."""
        with self._lock:
            return {"found": sorted(self.found - found), "examples": self.examples[examples:]}

    def add(self, records: dict) -> None:
        """Records found earlier (`since`'s), by a run that kept what it computed from the other rows."""
        with self._lock:
            self.found.update(records["found"])
            self.examples = (self.examples + records["examples"])[:MAX_EXAMPLES]


class ShardGuard:
    """Stops a shard none of whose rows is usable: its dataset would never yield a batch on this worker alone,
    and the other workers would wait for it in a collective."""

    def __init__(self, bad: BadRecords, shard_rows: int):
        self.bad_records, self.shard_rows = bad, shard_rows
        self.found: set[str] = set()

    def bad(self, where: str, why: str) -> None:
        self.bad_records.bad(where, why)
        self.found.add(where)
        if len(self.found) >= self.shard_rows:
            error = DataError(
                f"data: none of the {self.shard_rows} rows of a worker's shard is usable; last: {where}: {why}"
            )
            self.bad_records.error = error
            raise error


Record = tuple[bytes, int, str]  # encoded image, class index, where the record is


class UnitReader:
    """Streams units' usable records a slice of rows at a time, so a worker's memory follows the slice, not the
    row group: pyarrow reads a column chunk in READ_BUFFER pieces instead of whole. Rows whose image cannot be
    had (empty, missing, an object that cannot be read) go to the guard instead."""

    def __init__(
        self,
        image_column: str,
        label_column: str,
        class_index: dict[str, int],
        guard: ShardGuard,
        fetches: ThreadPoolExecutor,
    ):
        self.columns = [image_column, label_column]
        self.class_index, self.guard, self.fetches = class_index, guard, fetches
        self.footers: dict[str, pq.FileMetaData] = {}  # per file, read once: a file holds many units

    def slices(self, unit: Unit) -> Iterator[list[Record]]:
        fs, path = storage.resolve(unit.file)
        footer = self.footers.get(unit.file)
        file = pq.ParquetFile(path, filesystem=fs, metadata=footer, pre_buffer=False, buffer_size=READ_BUFFER)
        self.footers.setdefault(unit.file, file.metadata)
        batches = file.iter_batches(SLICE_ROWS, row_groups=[unit.row_group], columns=self.columns, use_threads=False)
        where = f"{storage.redact(unit.file)} row group {unit.row_group} row"
        wanted, first, taken = unit.rows, 0, 0  # unit.rows are sorted positions in the row group
        for batch in batches:
            end = first + batch.num_rows
            stop = bisect.bisect_left(wanted, end, lo=taken)
            rows, taken = wanted[taken:stop], stop
            if rows:
                if len(rows) < batch.num_rows:
                    batch = batch.take(np.asarray(rows, np.int64) - first)
                yield self._records(batch, unit.file, [f"{where} {r}" for r in rows])
            first = end
            if taken == len(wanted):
                return

    def _records(self, batch, file: str, places: list[str]) -> list[Record]:
        cells = parquet.image_cells(batch.column(self.columns[0]), file)
        images = read_cells(cells, self.fetches)
        labels = batch.column(self.columns[1]).to_pylist()
        records = []
        for i, (cell, (data, why), label) in enumerate(zip(cells, images, labels, strict=True)):
            place = storage.redact(cell) if isinstance(cell, str) else places[i]
            if why:
                self.guard.bad(place, why)
            else:
                records.append((data, self.class_index[str(label)], place))
        return records


def read_cells(cells: list[bytes | str | None], fetches: ThreadPoolExecutor) -> list[tuple[bytes | None, str | None]]:
    """Each image cell's encoded image (fetched, all at once, where the cell is a URI), or None and why not."""
    fetched = {i: fetches.submit(fetch_image, cell) for i, cell in enumerate(cells) if isinstance(cell, str)}
    return [
        fetched[i].result()
        if i in fetched
        else (cell, None)
        if cell
        else (None, "empty image" if cell == b"" else "no image")
        for i, cell in enumerate(cells)
    ]


def fetch_image(uri: str) -> tuple[bytes | None, str | None]:
    """An image object's bytes, or None and why it cannot be had (a bad record, not an error)."""
    try:
        data = storage.read_object(uri)
    except Exception as e:  # any failure to fetch one object makes one bad record, whatever the store
        return None, f"cannot read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return (data, None) if data else (None, "empty image")


class OpenUnit:
    """A unit being read: its current slice of records, and the next slice read ahead in a thread."""

    def __init__(self, slices: Iterator[list[Record]], pool: ThreadPoolExecutor):
        self.slices, self.pool = slices, pool
        self.current: list[Record] = []
        self.position = 0
        self.ahead = pool.submit(next, slices, None)

    def take(self) -> Record | None:
        """The unit's next record; None when the unit is read."""
        while self.position >= len(self.current):  # slices may be empty: every row of them bad
            current = self.ahead.result()
            if current is None:
                return None
            self.current, self.position = current, 0
            self.ahead = self.pool.submit(next, self.slices, None)
        self.position += 1
        return self.current[self.position - 1]


def interleaved(
    units: list[Unit], reader: UnitReader, parallel: Parallelism, pool: ThreadPoolExecutor
) -> Iterator[list[Record]]:
    """The records of `units` in chunks of CHUNK, taken one by one from the units open at once in turn: up to
    `parallel.row_groups` of them, as many as `parallel.open_bytes` holds (two at least).

    Class-sorted data (a class per file or row group) then still gives chunks of many classes. The order of the
    records does not depend on the threads' timing.
    """
    open_units: list[tuple[Unit, OpenUnit]] = []
    waiting = 0  # units[waiting] opens next

    def fill() -> None:
        nonlocal waiting
        while waiting < len(units) and len(open_units) < parallel.row_groups:
            held = sum(unit.open_bytes for unit, _ in open_units)
            if len(open_units) >= 2 and held + units[waiting].open_bytes > parallel.open_bytes:
                return
            open_units.append((units[waiting], OpenUnit(reader.slices(units[waiting]), pool)))
            waiting += 1

    fill()
    chunk: list[Record] = []
    turn = 0
    while open_units:
        turn %= len(open_units)
        record = open_units[turn][1].take()
        if record is None:  # this unit is read: the next ones waiting open in its place
            del open_units[turn]
            fill()
            continue
        chunk.append(record)
        turn += 1
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def decode_image(data: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Encoded bytes -> uint8 RGB at `image_size` (bilinear resize, rounded to whole pixel values).

    A JPEG whose sides are both at least 2x, 4x or 8x the target's is decoded at 1/2, 1/4 or 1/8 scale in the
    DCT domain first: a 1,024 px photo then costs about a 256 px decode. PNG, GIF and BMP decode at full size.
    Grayscale, RGBA and palette images become RGB.
    """
    height, width = image_size

    def jpeg() -> tf.Tensor:
        shape = tf.io.extract_jpeg_shape(data)
        fits = tf.minimum(shape[0] // height, shape[1] // width)  # how many times the target fits in the source
        branch = tf.reduce_sum(tf.cast(fits >= JPEG_SCALES[1:], tf.int32))
        decoders = [functools.partial(tf.io.decode_jpeg, data, channels=3, ratio=s) for s in JPEG_SCALES]
        return tf.switch_case(branch, decoders)

    def other() -> tf.Tensor:
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    image = tf.image.resize(image, image_size)
    image.set_shape((height, width, 3))
    # Bilinear weights are convex: the result stays in [0, 255], so no clip (a saturate_cast's extra pass).
    return tf.cast(tf.round(image), tf.uint8)


class DecodeLedger:
    """Names the records that tf.data's decode dropped.

    tf.data has no per-image try: the decode is a parallel map whose failures are ignored, so a record that does
    not decode is simply missing from its output. Every record carries (chunk, position), so a missing one shows
    as a gap in that sequence; the ledger keeps each chunk in flight's places (registered once per chunk) to name
    it. Python runs once per chunk and once per gap, never per good image.
    """

    IN_FLIGHT = 512  # chunks remembered: far more than the pipeline holds between read and decode

    def __init__(self, guard: ShardGuard):
        self.guard = guard
        self.places: OrderedDict[int, np.ndarray] = OrderedDict()
        self.error: Exception | None = None  # a reader's: raised past the decode's ignore_errors
        self._lock = threading.Lock()

    def register(self, chunk: np.int64, places: np.ndarray) -> np.int64:
        with self._lock:
            self.places[int(chunk)] = places
            while len(self.places) > self.IN_FLIGHT:
                self.places.popitem(last=False)
        return np.int64(len(places))

    def missing(self, chunk: np.int64, position: np.int64, up_to_chunk: np.int64, up_to_position: np.int64) -> bool:
        """Reports every record from (chunk, position) up to, not including, (up_to_chunk, up_to_position)."""
        chunk, position = int(chunk), int(position)
        while (chunk, position) < (int(up_to_chunk), int(up_to_position)):
            with self._lock:
                places = self.places.get(chunk)
            if places is None or position >= len(places):
                chunk, position = chunk + 1, 0
                continue
            self.guard.bad(places[position].decode(), UNDECODABLE)
            position += 1
        if self.error is not None:
            raise self.error
        return True


def _decoded(
    chunks: tf.data.Dataset, image_size: tuple[int, int], ledger: DecodeLedger, threads: int, with_places: bool
):
    """Chunks of (encoded images, labels, places) -> (uint8 image, label) for every record that decodes, with its
    place too when `with_places`.

    A record with a negative label (the end of a pass, a reader's failure) always reaches the ledger.
    """

    def register(chunk: tf.Tensor, record: tuple[tf.Tensor, tf.Tensor, tf.Tensor]):
        data, labels, places = record
        size = tf.numpy_function(ledger.register, [chunk, places], tf.int64, stateful=True)
        n = tf.shape(data, out_type=tf.int64)[0]
        return tf.fill([n], chunk), tf.range(n), tf.fill([n], size), data, labels, places

    def decode(chunk, position, size, data, label, place):
        return chunk, position, size, decode_image(data, image_size), label, place

    def find_gaps(expected, record):
        chunk, position, size, image, label, place = record
        gap = tf.logical_or(chunk != expected[0], position != expected[1])
        reported = tf.cond(
            tf.logical_or(gap, label < 0),
            lambda: tf.numpy_function(ledger.missing, [expected[0], expected[1], chunk, position], tf.bool),
            lambda: tf.constant(True),
        )
        ends_chunk = position + 1 >= size
        following = (
            tf.where(ends_chunk, chunk + 1, chunk),
            tf.where(ends_chunk, tf.constant(0, tf.int64), position + 1),
        )
        with tf.control_dependencies([reported]):
            return following, (tf.identity(image), label, place) if with_places else (tf.identity(image), label)

    records = chunks.enumerate().map(register).prefetch(2).unbatch()  # Python (read, register) runs ahead
    decoded = records.map(decode, num_parallel_calls=threads, deterministic=True).ignore_errors()
    start = (tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    return decoded.scan(start, find_gaps)


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
    parallelism: Parallelism | None = None,
    with_places: bool = False,
) -> tf.data.Dataset:
    """The batches of one worker's shard: (images, labels), and with `with_places` each row's place too (where it
    is, as bad records name it: for the evaluation's misclassified examples).

    Training: endless, reshuffled every pass (unit order and a bounded buffer), whole batches only, so
    `steps_per_epoch` alone decides an epoch. Validation: exactly `num_rows` rows, the last batch possibly
    partial, the same on every worker (skipped records are made up for by reading on from the start).
    """
    parallel = parallelism or Parallelism.for_cpus(1)
    guard = ShardGuard(bad or BadRecords("skip"), shard_rows=sum(len(u.rows) for u in units))
    class_index = {name: i for i, name in enumerate(classes)}
    signature = (tf.TensorSpec((None,), tf.string), tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None,), tf.string))

    ledger = DecodeLedger(guard)
    # A record that always decodes, to carry a signal through the decode: the end of a pass, a failure.
    marker = tf.io.encode_jpeg(tf.zeros((8, 8, 3), tf.uint8)).numpy()

    def passes() -> Iterator[tuple[list[bytes], list[int], list[str]]]:
        """Pass after pass over the units, each in a new order when training, each ended by a marker record,
        so the gaps of a pass are found within it, also when no record of the shard decodes (the guard then
        stops the run)."""
        order = np.random.default_rng(seed)
        reads, fetches = ThreadPoolExecutor(parallel.reads), ThreadPoolExecutor(parallel.fetches)
        reader = UnitReader(image_column, label_column, class_index, guard, fetches)
        try:
            while True:
                ids = order.permutation(len(units)) if training else range(len(units))
                for chunk in interleaved([units[i] for i in ids], reader, parallel, reads):
                    yield tuple(map(list, zip(*chunk, strict=True)))
                yield [marker], [-1], ["(end of a pass)"]
        except Exception as e:  # the decode's ignore_errors would drop it: the ledger raises it past there
            ledger.error = e
            yield [marker], [-2], ["(a read failed)"]
        finally:
            reads.shutdown(wait=False, cancel_futures=True)
            fetches.shutdown(wait=False, cancel_futures=True)

    chunks = tf.data.Dataset.from_generator(passes, output_signature=signature)
    decoded = _decoded(chunks, image_size, ledger, parallel.decode, with_places)
    images = decoded.filter(lambda image, label, *place: label >= 0)
    if training:
        images = images.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if augment:
            augmenter = augmentation(augment, image_size)
            images = images.map(
                lambda image, label: (augmenter(tf.cast(image, tf.float32)), label),
                num_parallel_calls=parallel.decode,
            )
        batches = images.batch(batch_size, drop_remainder=True)
    else:
        batches = images.take(num_rows).batch(batch_size)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    # Its own threads: the inter-op pool is sized to the worker's CPUs for the model, 1 by default, and tf.data
    # would run every map on it, one at a time. The generator and the ledger (Python) need threads of their own
    # besides the decoding ones; the readers are Python threads outside tf.data.
    options.threading.private_threadpool_size = parallel.decode + 2
    return batches.with_options(options).prefetch(tf.data.AUTOTUNE)
