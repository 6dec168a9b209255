"""The head search: heads with other learning rates, dropouts, epochs and class weights, each a Ray Tune trial
trained on the features the head pass persisted (the backbone does not run again); ASHA stops poor trials early.

The driver runs it after the head pass has trained the configured head; the best of all by validation accuracy
(the configured head included) becomes the head export, with `search.json` listing every trial.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray
import tensorflow as tf
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from transfer import checkpoint, evaluation, storage
from transfer.config import Config, HeadSearch
from transfer.data import features
from transfer.data.cache import RowCache
from transfer.data.plan import DatasetPlan
from transfer.job import Echo
from transfer.model import build_head, compile_model
from transfer.pass_spec import PassSpec
from transfer.train_loop import (
    build_pass_model,
    count_predictions,
    misclassified_rows,
    size_thread_pools,
    validation_batches,
)

FOLDER = "search"  # <run>/search: Ray Tune's experiment (each trial's results; the finished heads' checkpoints)
EVALUATION = "evaluation.json"  # in a finished trial's checkpoint: its counts over the validation rows
METRIC = "val_accuracy"


@dataclass
class Winner:
    """The trial that beat the configured head: its model (backbone and head), history, evaluation and config."""

    model: tf.keras.Model
    history: list[dict]
    report: dict
    cfg: Config


@dataclass
class Search:
    trials: list[dict]  # search.json: every trial, the configured head first
    winner: Winner | None  # None when no trial beat the configured head


def search_space(s: HeadSearch) -> dict:
    """Ray Tune's parameter space: random draws from the ranges and choices, or the grid of the values."""
    if s.method == "grid":
        return {name: tune.grid_search(list(getattr(s, name))) for name in s.PARAMS}

    def between(low: float, high: float, draw):
        return low if low == high else draw(low, high)

    return {
        "learning_rate": between(*s.learning_rate, tune.loguniform),
        "dropout": between(*s.dropout, tune.uniform),
        "epochs": tune.choice(list(s.epochs)),
        "class_weight": tune.choice(list(s.class_weight)),
    }


def search_heads(spec: PassSpec, world_size: int, configured: list[dict], echo: Echo) -> Search:
    """Runs the trials on the features the head pass (`spec`) persisted with `world_size` workers;
    `configured`: the history of the head the pass trained as configured."""
    cfg, plan = spec.cfg, spec.plans[world_size]
    s = cfg.head.search
    echo(f"head search: {s.trial_count()} trials ({s.method}) on the persisted features, {s.cpus_per_trial} CPU each")
    # Read once, by a task, into Ray's object store: every trial on a node shares that copy, none downloads it.
    loaded = ray.remote(_load_features).remote(cfg, plan, world_size)
    space = search_space(s)
    batch_size = cfg.head.batch_size * world_size  # the head pass's global batch: a learning rate means the same
    trainable = tune.with_resources(
        tune.with_parameters(
            train_trial, features=[loaded], classes=plan.classes, batch_size=batch_size, config=cfg.to_dict()
        ),
        {"cpu": s.cpus_per_trial},
    )
    longest = max(s.epochs)
    scheduler = ASHAScheduler(max_t=longest, grace_period=max(1, min(s.epochs) // 2), reduction_factor=3)
    run_folder = storage.join(cfg.run_uri, FOLDER)
    storage.delete(run_folder)  # an earlier, unfinished search: this one replaces it
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=cfg.data.seed),
            num_samples=1 if s.method == "grid" else s.trials,
            reuse_actors=True,  # one TensorFlow start per trial process, not per trial
        ),
        run_config=tune.RunConfig(
            name=FOLDER,
            storage_path=storage.absolute(cfg.run_uri),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[TrialLines(echo, s.trial_count())],
        ),
    )
    # Ray Tune's own tables and pointers on stdout: our lines (TrialLines) say what a user needs.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    start = time.monotonic()
    results = list(tuner.fit())
    table = [_configured_row(cfg, configured)] + [_trial_row(r) for r in results]
    finished = [r for r in results if r.error is None and r.checkpoint is not None]
    best = max(finished, key=lambda r: (r.metrics[METRIC], -r.metrics["val_loss"]), default=None)
    beats = best is not None and best.metrics[METRIC] > configured[-1][METRIC]
    chosen = best.metrics["trial_id"] if beats else "configured"
    for row in table:
        row["chosen"] = row["trial"] == chosen
    accuracy = best.metrics[METRIC] if beats else configured[-1][METRIC]
    seconds = time.monotonic() - start
    echo(f"head search: {len(results)} trials in {seconds:.1f} s; best: {chosen} ({METRIC} {accuracy:.3f})")
    return Search(table, _winner(spec, best) if beats else None)


def _load_features(cfg: Config, plan: DatasetPlan, world_size: int) -> tuple[RowCache, RowCache]:
    train = features.read_split(cfg, plan, "train", world_size)
    validation = features.read_split(cfg, plan, "validation", world_size)
    return RowCache(*train), RowCache(*validation)


def train_trial(params: dict, features: list, classes: list[str], batch_size: int, config: dict) -> None:
    """One trial (in its Ray Tune actor): a head trained on the cached features, reporting every epoch; a
    finished one checkpoints its head, with its evaluation over the validation rows."""
    from transfer.config import from_dict

    cfg = from_dict(config)
    size_thread_pools(int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    train, validation = ray.get(features[0])
    tf.keras.utils.set_random_seed(cfg.data.seed)
    head = build_head(train.values.shape[1], len(classes), params["dropout"])
    steps = len(train.labels) // batch_size
    compile_model(head, params["learning_rate"], steps_per_execution=steps)  # an epoch per call (see CachedFeatures)
    weights = balanced_weights(train.labels, len(classes)) if params["class_weight"] == "balanced" else None
    epochs = ReportEachEpoch(params["epochs"], steps * batch_size)
    head.fit(
        train.dataset(batch_size, training=True, seed=cfg.data.seed),
        epochs=params["epochs"],
        steps_per_epoch=steps,
        validation_data=validation_batches(validation, batch_size, None),
        class_weight=weights,
        callbacks=[epochs],
        verbose=0,
    )
    with tempfile.TemporaryDirectory(prefix="transfer-trial-") as directory:
        state = {"pass": "head", "epoch": params["epochs"], "history": epochs.history}
        trial_cfg = trial_config(cfg, params)
        checkpoint.write(directory, head, "head", 0, state, trial_cfg.to_yaml(), {"found": 0, "examples": []})
        batches = validation_batches(validation, batch_size, None)
        confusion, hits, wrong = count_predictions(head, batches, len(classes))
        counted = {"confusion": confusion.tolist(), "top_k_hits": hits,
                   "misclassified": misclassified_rows(wrong, validation.places, classes)}  # fmt: skip
        with open(os.path.join(directory, EVALUATION), "w") as f:
            json.dump(counted, f)
        tune.report(epochs.history[-1], checkpoint=tune.Checkpoint.from_directory(directory))


class ReportEachEpoch(tf.keras.callbacks.Callback):
    """A trial's epochs as the head pass's history has them; each but the last reported to Ray Tune as it ends
    (ASHA may stop the trial there), the last by train_trial with the trial's checkpoint."""

    def __init__(self, epochs: int, images_per_epoch: int):
        super().__init__()
        self.epochs, self.images_per_epoch = epochs, images_per_epoch
        self.history: list[dict] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.monotonic() - self.start
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        row.update(images_per_s=self.images_per_epoch / seconds, seconds=seconds, world_size=1)
        self.history.append(row)
        if epoch + 1 < self.epochs:
            tune.report(row)


def balanced_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Class weights that make each class weigh as much in the loss: rows / (classes * that class's rows)."""
    counts = np.bincount(labels, minlength=num_classes)
    return {c: float(len(labels) / (num_classes * n)) if n else 0.0 for c, n in enumerate(counts)}


def trial_config(cfg: Config, params: dict) -> Config:
    """The config a trial's head was trained with: the searched values in their own keys."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dropout=params["dropout"]),
        head=dataclasses.replace(cfg.head, learning_rate=params["learning_rate"], epochs=params["epochs"]),
    )


def _winner(spec: PassSpec, best) -> Winner:
    """The full model (the backbone the pass was built on, the trial's head), as the head pass exports it."""
    winning = trial_config(spec.cfg, best.config)
    model = build_pass_model(dataclasses.replace(spec, config=winning.to_dict()), winning.model.weights)
    state = checkpoint.restore(model, best.checkpoint)
    with best.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, EVALUATION)) as f:
            counted = json.load(f)
    report = evaluation.report(
        "head", spec.plan.classes, counted["confusion"], counted["top_k_hits"], counted["misclassified"]
    )
    return Winner(model, state["history"], report, winning)


def _configured_row(cfg: Config, history: list[dict]) -> dict:
    final = history[-1]
    params = {"learning_rate": cfg.head.learning_rate, "dropout": cfg.model.dropout, "epochs": cfg.head.epochs,
              "class_weight": "none"}  # fmt: skip
    return {"trial": "configured", "params": params, **_scores(history), "epochs_trained": final["epoch"],
            "stopped_early": False, "seconds": sum(row["seconds"] for row in history), "error": None}  # fmt: skip


def _trial_row(result) -> dict:
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    trained = int(result.metrics.get("training_iteration", 0)) if result.metrics else 0
    return {
        "trial": (result.metrics or {}).get("trial_id", os.path.basename(result.path)),
        "params": {name: result.config[name] for name in HeadSearch.PARAMS},
        **_scores(history),
        "epochs_trained": trained,
        "stopped_early": result.error is None and trained < result.config["epochs"],
        "seconds": float(result.metrics.get("time_total_s", 0.0)) if result.metrics else 0.0,
        "error": None if result.error is None else f"{type(result.error).__name__}: {result.error}".splitlines()[0],
    }


def _scores(history: list[dict]) -> dict:
    if not history:
        return {METRIC: None, "val_loss": None}
    return {METRIC: float(history[-1][METRIC]), "val_loss": float(history[-1]["val_loss"])}


class TrialLines(tune.Callback):
    """One line per trial as it ends: its params, its validation accuracy, whether ASHA stopped it."""

    def __init__(self, echo: Echo, trials: int):
        self.echo, self.trials, self.ended = echo, trials, 0

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended += 1
        result, p = trial.last_result or {}, trial.config
        trained = int(result.get("training_iteration", 0))
        early = " (stopped early: ASHA)" if trained < p["epochs"] else ""
        accuracy, seconds = result.get(METRIC, float("nan")), result.get("time_total_s", 0.0)
        self.echo(
            f"head search: trial {self.ended}/{self.trials} learning_rate {p['learning_rate']:.2g} dropout "
            f"{p['dropout']:.2f} epochs {p['epochs']} class_weight {p['class_weight']}: {METRIC} "
            f"{accuracy:.3f} after {trained} epochs{early}, {seconds:.1f} s"
        )

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended += 1
        self.echo(f"head search: trial {self.ended}/{self.trials} failed; its log is in {trial.path}")
