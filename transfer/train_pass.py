"""One pass on the cluster: Ray Train runs the train loop on every worker; the driver prints progress and exports."""

from __future__ import annotations

import threading

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.tensorflow import TensorflowTrainer
from ray.util.queue import Empty, Queue

from transfer import export, storage
from transfer.config import Config
from transfer.data.parquet import MAX_EXAMPLES
from transfer.data.plan import DatasetPlan
from transfer.errors import TrainingError, TransferError
from transfer.job import Echo
from transfer.train_loop import PassSpec, build_pass_model, restore, train_loop_per_worker


def run_pass(cfg: Config, pass_name: str, plan: DatasetPlan, echo: Echo) -> dict:
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

    state = restore(model, result.checkpoint)
    history, bad = state["history"], state["bad_records"]
    metrics = {
        "pass": pass_name,
        "final": history[-1],
        "history": history,
        "bad_records": {
            "left_out_while_planning": len(plan.left_out),
            "found_while_reading": bad["found"],
            "examples": (plan.left_out + bad["examples"])[:MAX_EXAMPLES],
        },
    }
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
        + (f" | {event['bad_records']} bad records skipped" if event.get("bad_records") else "")
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
