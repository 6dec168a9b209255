"""What every Ray Train worker runs for one pass: build the model under MWMS, restore, fit, checkpoint each epoch."""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import ray.train
import tensorflow as tf

from transfer import storage
from transfer.config import Config, from_dict
from transfer.data.pipeline import BadRecords, make_dataset
from transfer.data.plan import DatasetPlan, Split
from transfer.model import build_model, compile_model, split_at_features, unfreeze_model

WEIGHTS = "weights/ckpt"  # tf.train.Checkpoint: the weights the pass trains (see `trained_parts`) and the optimizer
STATE = "state.json"  # the pass, the last finished epoch and the per-epoch history
BAD_RECORDS = "bad_records"  # one JSON file per rank: the bad records it found, and the first few
CONFIG = "config.yaml"


@dataclass(frozen=True)
class PassSpec:
    """Everything a worker needs for one pass; sent by the driver as the train loop's config."""

    config: dict
    pass_name: str  # head | finetune
    plan: DatasetPlan
    init_model: str | None  # finetune: the model.keras to start from
    progress: Any = None  # a ray.util.queue.Queue the driver prints from; rank 0 posts when it starts

    @cached_property
    def cfg(self) -> Config:
        return from_dict(self.config)

    @property
    def epochs(self) -> int:
        return self.cfg.pass_settings(self.pass_name).epochs

    @property
    def learning_rate(self) -> float:
        return self.cfg.pass_settings(self.pass_name).learning_rate

    @property
    def batch_size(self) -> int:
        return self.cfg.pass_settings(self.pass_name).batch_size


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
    unfreeze_model(model, cfg.finetune.unfreeze)
    return model


def train_loop_per_worker(spec: PassSpec) -> None:
    cfg = spec.cfg
    _size_thread_pools(cfg.scaling.cpus_per_worker)
    if cfg.precision_policy:
        tf.keras.mixed_precision.set_global_policy(cfg.precision_policy)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=cfg.scaling.collective_timeout_s
        )
    )
    rank = ray.train.get_context().get_world_rank()
    cache = spec.pass_name == "head" and cfg.caches_features
    if cache:
        # Only the head trains, on features each worker computes once for its shard. The backbone is built
        # outside MWMS: inside, every variable's initial value is broadcast from rank 0, one collective per
        # variable (~9 s for mobilenet_v2 on 2 CPU workers), for weights every worker loads anyway.
        extractor, head = split_at_features(build_pass_model(spec, cfg.model.weights))
        extract = inference(extractor)
    with strategy.scope():
        # With the cache, the head's clone: the same layers and names, as MWMS variables.
        trained = tf.keras.models.clone_model(head) if cache else build_pass_model(spec, cfg.model.weights)
        compile_model(trained, spec.learning_rate, cfg.scaling.jit_compile)
        # Create the optimizer's slots now, so a checkpoint restores them at once instead of lazily.
        trained.optimizer.build(trained.trainable_variables)

    history = restore(trained, ray.train.get_checkpoint(), trained.optimizer)["history"]
    if rank == 0 and spec.progress is not None:
        spec.progress.put({"event": "start", "pass": spec.pass_name, "epoch": len(history)})

    data = cfg.data
    batch_size = spec.batch_size
    bad = BadRecords(data.bad_records)

    def images(split: Split, pipeline: int, training: bool) -> tf.data.Dataset:
        return make_dataset(
            split.shards[pipeline],
            split.rows_per_worker,
            spec.plan.classes,
            data.image_column,
            data.label_column,
            data.image_size,
            batch_size,
            training=training,
            bad=bad,
            shuffle_buffer=data.shuffle_buffer,
            seed=data.seed + pipeline,
            augment=data.augment,
        )

    def distributed(split: Split, training: bool):
        if cache:
            rows = split.rows_per_worker
            cached = FeatureCache(extract, images(split, rank, training=False), rows, cfg.head.feature_cache_mb)
            _post_cache(spec, rank, split, cached)

            def fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
                return cached.dataset(batch_size, training, seed=data.seed + context.input_pipeline_id)
        else:

            def fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
                return images(split, context.input_pipeline_id, training)

        return strategy.distribute_datasets_from_function(fn)

    steps = spec.plan.steps_per_epoch(batch_size)
    callback = CheckpointEachEpoch(spec, history, rank, steps * batch_size * _world_size(), strategy, bad)
    try:
        trained.fit(
            distributed(spec.plan.train, training=True),
            epochs=spec.epochs,
            initial_epoch=len(history),
            steps_per_epoch=steps,
            validation_data=distributed(spec.plan.validation, training=False),
            validation_steps=spec.plan.validation_steps(batch_size),
            callbacks=[callback],
            verbose=0,
        )
    except Exception:
        if bad.error is not None:  # the pipeline stopped on a bad record: say which, not TensorFlow's wrapper
            raise bad.error from None
        raise


def inference(model: tf.keras.Model) -> tf.types.experimental.ConcreteFunction:
    """The model's inference, traced once for any batch size: the training and validation caches and a partial
    last batch would each trace it again (seconds per trace, on every worker)."""
    spec = tf.TensorSpec(model.input_shape, model.input.dtype)
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)


class FeatureCache:
    """One worker's backbone features for its shard, computed once: in memory, or on local disk past a budget.

    Reading images stays the job's pipeline (bad records skipped, exactly the shard's rows); training then
    reads features by index, reshuffled every pass, with the same number of steps as from images.
    """

    def __init__(
        self, extract: tf.types.experimental.ConcreteFunction, images: tf.data.Dataset, rows: int, budget_mb: int
    ):
        start = time.monotonic()
        width = extract.structured_outputs.shape[-1]
        self.on_disk = rows * width * 4 > budget_mb * 2**20
        if self.on_disk:
            self._folder = tempfile.TemporaryDirectory(prefix="transfer-features-")
            path = os.path.join(self._folder.name, "features.npy")
            self.features = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(rows, width))
        else:
            self.features = np.empty((rows, width), dtype="float32")
        self.labels = np.empty(rows, dtype="int32")
        row = 0
        for x, y in images:  # exactly `rows` rows: the pipeline makes up for skipped records
            self.features[row : row + len(y)] = extract(x).numpy()
            self.labels[row : row + len(y)] = y.numpy()
            row += len(y)
        self.seconds = time.monotonic() - start

    def dataset(self, batch_size: int, training: bool, seed: int) -> tf.data.Dataset:
        ids = tf.data.Dataset.range(len(self.labels))
        if training:
            ids = ids.shuffle(len(self.labels), seed=seed, reshuffle_each_iteration=True).repeat()
        ids = ids.batch(batch_size, drop_remainder=training)
        width = self.features.shape[1]

        def rows(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            i = np.sort(i)  # in file order: a disk-backed cache reads forward
            return self.features[i], self.labels[i]

        def gather(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            features, labels = tf.numpy_function(rows, [i], (tf.float32, tf.int32))
            features.set_shape((None, width))
            labels.set_shape((None,))
            return features, labels

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ids.map(gather).with_options(options).prefetch(tf.data.AUTOTUNE)


def _post_cache(spec: PassSpec, rank: int, split: Split, cache: FeatureCache) -> None:
    if rank == 0 and spec.progress is not None:
        where = "local disk" if cache.on_disk else "memory"
        spec.progress.put(
            {"event": "features", "pass": spec.pass_name, "rows": len(cache.labels), "seconds": cache.seconds,
             "where": where}
        )  # fmt: skip


def trained_parts(model: tf.keras.Model, pass_name: str) -> dict[str, tf.Module]:
    """What a pass's checkpoints hold: what it trains. The head pass changes only the classifier; its frozen
    backbone is the weights it was built from. Saving the backbone anyway would cost seconds every epoch:
    under MWMS, reading each BatchNorm statistic for a save is an all-reduce across the workers."""
    if pass_name == "head":
        return {"classifier": model.get_layer("classifier")}
    return {"model": model}


def restore(
    model: tf.keras.Model, checkpoint: ray.train.Checkpoint | None, optimizer: tf.keras.optimizers.Optimizer = None
) -> dict:
    """Loads the pass's trained weights (and the optimizer's state, when given) from a checkpoint into a model
    built for the pass (a head-pass model holds its backbone's weights already).

    Returns its per-epoch `history` ([] without a checkpoint) and the `bad_records` all ranks found.
    """
    if checkpoint is None:
        return {"history": [], "bad_records": {"found": 0, "examples": []}}
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE)) as f:
            state = json.load(f)
        parts = trained_parts(model, state["pass"])
        if optimizer is not None:
            parts["optimizer"] = optimizer
        # Partial: the driver's model (for export) restores the weights alone.
        tf.train.Checkpoint(**parts).read(os.path.join(directory, WEIGHTS)).expect_partial()
        return {"history": state["history"], "bad_records": read_bad_records(directory)}


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
        self.skipped_before = 0

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
        skipped = self._sum_over_workers(self.bad.skipped)
        row["bad_records"], self.skipped_before = skipped - self.skipped_before, skipped
        self.history.append(row)
        with tempfile.TemporaryDirectory(prefix="transfer-ckpt-") as directory:
            parts = trained_parts(self.model, self.spec.pass_name)  # self.model: the model being fit
            tf.train.Checkpoint(**parts, optimizer=self.model.optimizer).write(os.path.join(directory, WEIGHTS))
            if self.rank == 0:
                state = {"pass": self.spec.pass_name, "epoch": epoch + 1, "history": self.history}
                with open(os.path.join(directory, STATE), "w") as f:
                    json.dump(state, f, indent=1)
                with open(os.path.join(directory, CONFIG), "w") as f:
                    f.write(self.spec.cfg.to_yaml())
            else:
                shutil.rmtree(os.path.join(directory, os.path.dirname(WEIGHTS)))  # rank 0's weights are the ones
            # Every rank adds its own bad records; Ray Train merges the ranks' folders into one checkpoint.
            os.makedirs(os.path.join(directory, BAD_RECORDS))
            with open(os.path.join(directory, BAD_RECORDS, f"rank-{self.rank}.json"), "w") as f:
                json.dump({"found": len(self.bad.found), "examples": self.bad.examples}, f)
            report = {"pass": self.spec.pass_name, "epochs": self.spec.epochs, **row}
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def _sum_over_workers(self, value: int) -> int:
        """An all-reduce of one number; every rank calls it at the same point of every epoch."""
        per_replica = self.strategy.run(lambda: tf.constant(value, tf.int64))
        return int(self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))


def read_bad_records(checkpoint_dir: str) -> dict:
    """All ranks' bad records in a checkpoint: how many distinct ones, and the first few."""
    found, examples = 0, []
    folder = os.path.join(checkpoint_dir, BAD_RECORDS)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name)) as f:
            rank = json.load(f)
        found += rank["found"]
        examples += rank["examples"]
    return {"found": found, "examples": examples}


def _world_size() -> int:
    return ray.train.get_context().get_world_size()


def _size_thread_pools(cpus: int) -> None:
    """Ray sets OMP_NUM_THREADS=1 but leaves TensorFlow's pools at the node's core count: size them to ours."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
    except RuntimeError:  # TensorFlow already initialised in this process
        pass
