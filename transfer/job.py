"""The job, phase by phase: plan the data, connect to Ray, then for each pass train on the workers and export."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.tensorflow import TensorflowTrainer
from ray.util.queue import Empty, Queue

from transfer import export, storage
from transfer.config import Config
from transfer.data import parquet
from transfer.data.plan import DatasetPlan, plan_dataset
from transfer.errors import ConfigError, TrainingError, TransferError
from transfer.train_loop import PassSpec, build_pass_model, restore, train_loop_per_worker

Echo = Callable[[str], None]


def run_job(cfg: Config, passes: Sequence[str], verbose: bool = False, echo: Echo = print) -> dict:
    """Runs the passes in order; returns the summary (run, storage, each pass's status, metrics and export)."""
    check_inputs(cfg)
    plan = plan_data(cfg)
    echo(
        f"data: {len(plan.classes)} classes, {plan.train.rows_per_worker} training and "
        f"{plan.validation.rows_per_worker} validation images per worker, {cfg.scaling.num_workers} workers"
    )
    connect_ray(verbose)
    summary = {"run": cfg.run.name, "storage": storage.absolute(cfg.run_uri), "passes": {}}
    for pass_name in passes:
        summary["passes"][pass_name] = run_pass(cfg, pass_name, plan, verbose, echo)
    return summary


def check_inputs(cfg: Config) -> None:
    """Checks what config validation cannot (files exist) before anything expensive starts."""
    weights = cfg.model.weights
    if weights not in ("imagenet", "none") and not storage.exists(weights):
        raise ConfigError(f"model.weights: {weights} not found")
    if cfg.finetune.init_from and not storage.exists(cfg.finetune.init_from):
        raise ConfigError(f"finetune.init_from: {cfg.finetune.init_from} not found")


def plan_data(cfg: Config) -> DatasetPlan:
    """Scans the dataset on the driver and gives every worker the same number of rows and steps."""
    d = cfg.data
    train = parquet.scan(d.train, d.image_column, d.label_column, "data.train")
    validation = parquet.scan(d.validation, d.image_column, d.label_column, "data.validation") if d.validation else None
    plan = plan_dataset(train, validation, d.validation_split, cfg.scaling.num_workers, d.seed)
    plan.check_batch_size(cfg.head.batch_size, "head.batch_size")
    plan.check_batch_size(cfg.finetune.batch_size or cfg.head.batch_size, "finetune.batch_size")
    return plan


def connect_ray(verbose: bool) -> None:
    """Joins the cluster at RAY_ADDRESS or a running local head; otherwise starts a local single-node Ray."""
    if ray.is_initialized():
        return
    env_vars = {"TF_USE_LEGACY_KERAS": "1"}
    if not verbose:
        env_vars["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    ray.init(
        runtime_env={"env_vars": env_vars},
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        include_dashboard=False,
    )


def run_pass(cfg: Config, pass_name: str, plan: DatasetPlan, verbose: bool, echo: Echo) -> dict:
    """Trains one pass (resuming from its latest checkpoint, if any) and exports it; skips a finished pass."""
    export_uri = storage.join(cfg.run_uri, "export", pass_name)
    epochs = cfg.head.epochs if pass_name == "head" else cfg.finetune.epochs
    if export.is_complete(export_uri):
        final = export.read_metrics(export_uri)["final"]
        if final["epoch"] >= epochs:
            echo(f"{pass_name}: already finished ({final['epoch']} epochs); export at {export_uri}")
            return {"status": "skipped", "export": export_uri, "final": final}

    init_model = None
    if pass_name == "finetune":
        init_uri = cfg.finetune.init_from or storage.join(cfg.run_uri, "export", "head")
        export.check_complete(init_uri, "finetune.init_from")
        init_model = storage.join(init_uri, export.MODEL)
    spec = PassSpec(cfg.to_dict(), pass_name, plan, init_model, progress=Queue())
    # Built here first: a bad unfreeze setting fails now, not on every worker; the export reuses it.
    model = build_pass_model(spec, backbone_weights="none")

    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=pass_name,
            storage_path=storage.absolute(cfg.run_uri),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
        ),
    )
    echo(f"{pass_name}: training {epochs} epochs on {cfg.scaling.num_workers} workers")
    result = _fit_printing_progress(trainer, spec.progress, echo)
    if result.checkpoint is None:
        raise TrainingError(f"{pass_name}: training ended without a checkpoint")

    history = restore(model, result.checkpoint)
    metrics = {"pass": pass_name, "final": history[-1], "history": history}
    export.write_export(model, plan.classes, cfg.to_yaml(), metrics, export_uri)
    echo(f"{pass_name}: exported to {export_uri}")
    return {"status": "trained", "export": export_uri, "final": history[-1]}


def _fit_printing_progress(trainer: TensorflowTrainer, progress: Queue, echo: Echo):
    """Runs trainer.fit() in a thread and prints rank 0's progress events as they arrive."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as e:  # handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="trainer-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not progress.empty():
        try:
            echo(format_event(progress.get(timeout=0.5)))
        except Empty:
            continue
    if "error" in outcome:
        raise _training_error(outcome["error"])
    return outcome["result"]


def format_event(event: dict) -> str:
    if event["event"] == "resume":
        return f"{event['pass']}: resuming after epoch {event['epoch']} from its latest checkpoint"
    return (
        f"{event['pass']} epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f} "
        f"accuracy {event['accuracy']:.3f} val_loss {event['val_loss']:.4f} "
        f"val_accuracy {event['val_accuracy']:.3f} | {event['images_per_s']:.0f} images/s {event['seconds']:.1f} s"
    )


def _training_error(error: Exception) -> TransferError:
    """The user's own error when a worker raised one (config, data); else a one-line training failure."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", failure)
        if isinstance(cause, TransferError):
            return cause
    cause = next(iter(failures.values()), error)
    cause = getattr(cause, "cause", cause)
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return TrainingError(f"training failed: {type(cause).__name__}: {lines[-1] if lines else ''}")
