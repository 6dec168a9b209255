"""What every Ray Train worker runs for one pass: build the model under MWMS, restore, fit, checkpoint each epoch."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import resource
import socket
import tempfile
import time
from collections.abc import Callable

import numpy as np
import ray.train
import tensorflow as tf

from transfer import allocator, checkpoint, evaluation, storage
from transfer.checkpoint import restore
from transfer.config import Config
from transfer.data.cache import RowCache, inference
from transfer.data.features import FOLDER, StoredShard
from transfer.data.pipeline import BadRecords, Parallelism, make_dataset
from transfer.data.plan import Split
from transfer.model import build_model, compile_model, split_at_features, unfreeze_model, with_precision
from transfer.pass_spec import PassSpec


def build_pass_model(spec: PassSpec, backbone_weights: str) -> tf.keras.Model:
    """The head pass's new classifier, or for fine-tuning the head export with the top of its backbone unfrozen."""
    cfg = spec.cfg
    if spec.pass_name == "head":
        # The driver and every worker build the same model: a head-pass checkpoint holds the classifier alone,
        # and with `weights: none` the backbone is random.
        tf.keras.utils.set_random_seed(cfg.data.seed)
        return build_model(
            cfg.model.backbone, backbone_weights, cfg.data.image_size, len(spec.plan.classes), cfg.model.dropout
        )
    with storage.local_copy(spec.init_model) as path:
        model = tf.keras.models.load_model(path, compile=False, safe_mode=True)
    model = with_precision(model, cfg.precision_policy)  # a loaded model keeps the dtypes it was saved with
    unfreeze_model(model, cfg.finetune.unfreeze)
    return model


def train_loop_per_worker(spec: PassSpec) -> None:
    """One worker's pass, top to bottom: strategy -> model -> input -> fit, checkpointing every epoch."""
    # An elastic pass plans for the size of the worker group it got.
    spec = dataclasses.replace(spec, world_size=ray.train.get_context().get_world_size())
    cfg = spec.cfg
    start_tensorflow(cfg)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=cfg.scaling.collective_timeout_s
        )
    )
    rank = ray.train.get_context().get_world_rank()
    if spec.progress is not None:
        spec.progress.put({"event": "worker", "pass": spec.pass_name, **where_this_worker_runs()})
    inputs = CachedFeatures(spec) if spec.pass_name == "head" and cfg.caches_features else Images(spec)
    with strategy.scope():
        trained = inputs.trained_model()
        compile_model(trained, spec.learning_rate, cfg.scaling.jit_compile, inputs.steps_per_execution)
        # Create the optimizer's slots now, so a checkpoint restores them at once instead of lazily.
        trained.optimizer.build(trained.trainable_variables)
    history = restore(trained, ray.train.get_checkpoint(), trained.optimizer)["history"]
    if rank == 0 and spec.progress is not None:
        spec.progress.put({"event": "start", "pass": spec.pass_name, "epoch": len(history)})

    bad = BadRecords(cfg.data.bad_records)
    steps = spec.plan.steps_per_epoch(spec.batch_size)
    callback = CheckpointEachEpoch(spec, history, rank, steps * spec.batch_size * spec.world_size, strategy, bad)
    try:
        reader = ShardReader(spec, bad)
        cache = inputs.validation(reader, rank)  # once: the epochs and the evaluation share it
        validation = functools.partial(validation_batches, cache, spec.batch_size)
        trained.fit(
            strategy.distribute_datasets_from_function(inputs.train(reader, rank)),
            epochs=spec.epochs,
            initial_epoch=len(history),
            steps_per_epoch=steps,
            validation_data=strategy.distribute_datasets_from_function(validation),
            validation_steps=spec.plan.validation_steps(spec.batch_size),
            callbacks=[callback, EpochProgress(spec, rank, steps)],
            verbose=0,
        )
        classes = spec.plan.classes
        confusion, top_k_hits, wrong = count_predictions(trained, validation(None), len(classes), strategy)
        if spec.progress is not None:  # every worker its own rows
            rows = misclassified_rows(wrong, cache.places, classes)
            spec.progress.put({"event": "misclassified", "pass": spec.pass_name, "rows": rows})
        if rank == 0 and spec.progress is not None:
            evaluated = {"confusion": confusion.tolist(), "top_k_hits": top_k_hits}
            spec.progress.put({"event": "evaluation", "pass": spec.pass_name, **evaluated})
    except Exception:
        # The pipeline stopped on a bad record (reading, caching or training): say which, not TensorFlow's wrapper.
        if bad.error is not None:
            raise bad.error from None
        raise


DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


def validation_batches(cache: RowCache, batch_size: int, context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """Every row of the validation cache once, in order."""
    return cache.dataset(batch_size, training=False, seed=0)


def count_predictions(
    model: tf.keras.Model,
    validation: tf.data.Dataset,
    num_classes: int,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[np.ndarray, int, list[tuple[int, int, int, float]]]:
    """The confusion matrix (rows: true class) and top-k hits of the trained model over the validation rows,
    each row once; under `strategy` over every worker's rows: each worker counts its own, then one all-reduce
    sums them. And the most confidently wrong rows (this worker's): (row, true, predicted, probability), in
    `validation`'s row order."""
    k = evaluation.top_k(num_classes)
    wrong: list[tuple[int, int, int, float]] = []
    row = 0
    counts = np.zeros(num_classes * num_classes + 1, np.int64)  # the matrix, row by row, then the top-k hits
    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)  # the last batch is short
    for x, y in validation:
        scores, truth = predict(x).numpy(), y.numpy()
        np.add.at(counts, truth * num_classes + scores.argmax(axis=1), 1)
        ranked = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # the k best, in any order
        counts[-1] += int((ranked == truth[:, None]).any(axis=1).sum())
        predicted = scores.argmax(axis=1)
        wrong += [(row + i, int(truth[i]), int(predicted[i]), float(scores[i, predicted[i]]))
                  for i in np.flatnonzero(predicted != truth)]  # fmt: skip
        wrong = sorted(wrong, key=lambda w: -w[3])[: evaluation.MISCLASSIFIED]
        row += len(truth)
    if strategy is not None:
        counts = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(counts)), axis=None)
        counts = counts.numpy()
    return counts[:-1].reshape(num_classes, num_classes), int(counts[-1]), wrong


def misclassified_rows(wrong: list[tuple[int, int, int, float]], places: list[str], classes: list[str]) -> list[dict]:
    """count_predictions' wrong rows as the evaluation lists them: where each is, its true and predicted class."""
    return [
        {"where": places[i], "true": classes[t], "predicted": classes[p], "probability": probability}
        for i, t, p, probability in wrong
    ]


class ShardReader:
    """This worker's image datasets, read and decoded as the config says."""

    def __init__(self, spec: PassSpec, bad: BadRecords):
        self.spec, self.bad = spec, bad
        data = spec.cfg.data
        self.parallelism = Parallelism.for_cpus(
            spec.cfg.scaling.cpus_per_worker,
            data.decode_threads,
            data.row_groups_in_flight,
            data.fetches_in_flight,
            data.read_buffer_mb,
        )

    def images(self, split: Split, rank: int, training: bool, with_places: bool = False) -> tf.data.Dataset:
        data = self.spec.cfg.data
        return make_dataset(
            split.shards[rank],
            split.rows_per_worker,
            self.spec.plan.label_keys,
            data.image_column,
            data.label_column,
            data.image_size,
            self.spec.batch_size,
            training=training,
            bad=self.bad,
            shuffle_buffer=data.shuffle_buffer,
            seed=data.seed + rank,
            augment=data.augment if training else (),
            parallelism=self.parallelism,
            with_places=with_places,
        )


class Images:
    """The input of the fine-tune pass, and of a head pass with augmentation: images, decoded every epoch for
    training; the validation images decoded once, then kept (uint8) for every epoch's validation."""

    def __init__(self, spec: PassSpec):
        self.spec = spec
        self.steps_per_execution = 1

    def trained_model(self) -> tf.keras.Model:
        return build_pass_model(self.spec, self.spec.cfg.model.weights)

    def train(self, reader: ShardReader, rank: int) -> DatasetFn:
        return lambda context: reader.images(self.spec.plan.train, rank, training=True)

    def validation(self, reader: ShardReader, rank: int) -> RowCache:
        split, cfg = self.spec.plan.validation, self.spec.cfg
        progress = PhaseProgress(self.spec, rank, "validation images decoded per worker", split.rows_per_worker)
        cache = RowCache.fill(
            reader.images(split, rank, training=False, with_places=True), split.rows_per_worker,
            cfg.data.validation_cache_mb, dtype="uint8", on_rows=progress.update,
        )  # fmt: skip
        _post_cache(self.spec, rank, f"{len(cache.labels)} validation images per worker decoded once", cache)
        return cache


class CachedFeatures:
    """The head pass's input: each worker computes its shard's backbone features once; only the head trains.

    The backbone is built outside MWMS: inside, every variable's initial value is broadcast from rank 0, one
    collective per variable (~9 s for mobilenet_v2 on 2 CPU workers), for weights every worker loads anyway.
    """

    def __init__(self, spec: PassSpec):
        self.spec = spec
        extractor, self.head = split_at_features(build_pass_model(spec, spec.cfg.model.weights))
        self.extract = inference(extractor)
        # A step of a small head on cached features takes microseconds; Keras' own per-step work (a Python call,
        # a host sync) took ~30 ms of it. A whole epoch per call runs the same steps, in one graph.
        self.steps_per_execution = spec.plan.steps_per_epoch(spec.batch_size)

    def trained_model(self) -> tf.keras.Model:
        return tf.keras.models.clone_model(self.head)  # the same layers and names, as MWMS variables

    def train(self, reader: ShardReader, rank: int) -> DatasetFn:
        cache = self._features(reader, rank, "train")
        return lambda context: cache.dataset(self.spec.batch_size, training=True, seed=self.spec.cfg.data.seed + rank)

    def validation(self, reader: ShardReader, rank: int) -> RowCache:
        return self._features(reader, rank, "validation")

    def _features(self, reader: ShardReader, rank: int, split_name: str) -> RowCache:
        """This worker's features of a split: those persisted by an earlier run of the pass when they were made
        from the same inputs; else computed, then persisted for the next."""
        spec, cfg = self.spec, self.spec.cfg
        split = getattr(spec.plan, split_name)
        stored = StoredShard.of(cfg, spec.plan, split_name, rank, spec.world_size)
        which = "" if split_name == "train" else "validation "
        start = time.monotonic()
        file = stored.open()
        if file is not None:
            shape = tuple(self.extract.structured_outputs.shape[1:])
            cache = RowCache.empty(split.rows_per_worker, shape, cfg.head.feature_cache_mb)
            for values, labels, places in stored.chunks(file):
                cache.add(values, labels, places)
            reader.bad.add(stored.bad_records(file))
            cache.seconds = time.monotonic() - start
            what = f"backbone features of {len(cache.labels)} {which}images per worker read from {FOLDER}/"
            _post_cache(spec, rank, what, cache)
            return cache
        if stored.refused is not None and spec.progress is not None:
            # Every worker's: one shard may be cut short. The driver says a reason all shards share once.
            line = f"{stored.refused}; computing the features again"
            spec.progress.put({"event": "note", "pass": spec.pass_name, "line": line, "once": stored.reason})
        before = (set(reader.bad.found), len(reader.bad.examples))
        with_places = split_name == "validation"
        images = reader.images(split, rank, training=False, with_places=with_places)  # every row once, in order
        progress = PhaseProgress(spec, rank, f"backbone features of {which}images per worker", split.rows_per_worker)
        cache = RowCache.fill(
            images, split.rows_per_worker, cfg.head.feature_cache_mb, transform=self.extract, on_rows=progress.update
        )
        saving = time.monotonic()
        stored.write(cache.values, cache.labels, cache.places, reader.bad.since(*before))
        saved = f"saved to {FOLDER}/ in {time.monotonic() - saving:.1f} s"
        what = f"backbone features of {len(cache.labels)} {which}images per worker computed"
        _post_cache(spec, rank, what, cache, saved)
        return cache


class PhaseProgress:
    """Tells the driver how far one worker's long phase is (rank 0's, every `spec.progress_every_s`): the
    workers' shards are equal, so rank 0's share is everyone's."""

    def __init__(self, spec: PassSpec, rank: int, what: str, total: int):
        self.spec, self.what, self.total = spec, what, total
        self.posts = rank == 0 and spec.progress is not None
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        if not self.posts or done >= self.total:  # called every step: the other ranks do nothing more
            return
        now = time.monotonic()
        if now - self.last >= self.spec.progress_every_s:
            self.last = now
            event = {"what": self.what, "done": done, "total": self.total, "seconds": now - self.start}
            self.spec.progress.put({"event": "progress", "pass": self.spec.pass_name, **event})


class EpochProgress(tf.keras.callbacks.Callback):
    """An epoch's PhaseProgress, in images of all workers. A cached-feature epoch runs as one call: no lines."""

    def __init__(self, spec: PassSpec, rank: int, steps: int):
        super().__init__()
        self.spec, self.rank, self.steps = spec, rank, steps
        self.images_per_step = spec.batch_size * spec.world_size

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        what = f"epoch {epoch + 1}/{self.spec.epochs}"
        self.phase = PhaseProgress(self.spec, self.rank, what, self.steps * self.images_per_step)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.phase.update((batch + 1) * self.images_per_step)


def _post_cache(spec: PassSpec, rank: int, what: str, cache: RowCache, saved: str | None = None) -> None:
    if rank == 0 and spec.progress is not None:
        where = "local disk" if cache.on_disk else "memory"
        event = {"event": "cache", "pass": spec.pass_name, "what": what, "seconds": cache.seconds, "where": where}
        spec.progress.put({**event, "saved": saved})


class CheckpointEachEpoch(tf.keras.callbacks.Callback):
    """Checkpoints every epoch and reports it with the epoch's metrics to Ray Train.

    Every rank saves (tf-keras' save_weights is a collective; a rank-0-only save hangs), each to its own
    temporary folder; only rank 0's checkpoint is handed to Ray Train.
    """

    def __init__(
        self,
        spec: PassSpec,
        history: list[dict],
        rank: int,
        images_per_epoch: int,
        strategy: tf.distribute.Strategy,
        bad: BadRecords,
    ):
        super().__init__()
        self.spec, self.history, self.rank = spec, history, rank
        self.images_per_epoch = images_per_epoch
        self.strategy, self.bad = strategy, bad
        self.found_before = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.monotonic()
        self.train_seconds = None

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.train_seconds = time.monotonic() - self.start

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.monotonic() - self.start
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        row["images_per_s"] = self.images_per_epoch / (self.train_seconds or seconds)
        row["seconds"] = seconds
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        row["world_size"] = self.spec.world_size
        # Each bad record once, in the epoch that first met it: the pipeline reads ahead into the next epoch,
        # and every later epoch skips the same records again.
        found = self._sum_over_workers(len(self.bad.found))
        row["bad_records"], self.found_before = found - self.found_before, found
        self.history.append(row)
        state = {"pass": self.spec.pass_name, "epoch": epoch + 1, "history": self.history}
        bad_records = {"found": len(self.bad.found), "examples": self.bad.examples}
        with tempfile.TemporaryDirectory(prefix="transfer-ckpt-") as directory:
            # self.model: the model being fit
            checkpoint.write(
                directory, self.model, self.spec.pass_name, self.rank, state, self.spec.cfg.to_yaml(), bad_records
            )
            report = {"pass": self.spec.pass_name, "epochs": self.spec.epochs, "group": worker_group(), **row}
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def _sum_over_workers(self, value: int) -> int:
        """An all-reduce of one number; every rank calls it at the same point of every epoch."""
        per_replica = self.strategy.run(lambda: tf.constant(value, tf.int64))
        return int(self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))


def worker_group() -> str:
    """An id shared by the workers of one start of the worker group, and no other: Ray Train gives each start
    a new TF_CONFIG, whose cluster lists the workers' fresh addresses."""
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return hashlib.sha1(json.dumps(cluster, sort_keys=True).encode()).hexdigest()[:12]


def where_this_worker_runs() -> dict:
    context = ray.train.get_context()
    return {
        "group": worker_group(),
        "rank": context.get_world_rank(),
        "world_size": context.get_world_size(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "allocator": allocator.in_this_process(),
    }


def start_tensorflow(cfg: Config) -> None:
    """Sizes TensorFlow's thread pools to the worker's CPUs (Ray sets OMP_NUM_THREADS=1 but leaves them at the
    node's core count, so workers on one node fight over the cores) and sets the mixed-precision policy."""
    size_thread_pools(cfg.scaling.cpus_per_worker)
    if cfg.precision_policy:
        tf.keras.mixed_precision.set_global_policy(cfg.precision_policy)


def size_thread_pools(cpus: int) -> None:
    """TensorFlow's intra- and inter-op thread pools, `cpus` threads each: once per process (after that,
    TensorFlow has started and keeps them)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
    except RuntimeError:  # TensorFlow already initialised in this process (a reused Tune actor, say)
        pass
