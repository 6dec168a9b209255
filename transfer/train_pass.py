"""One pass on the cluster: Ray Train runs the train loop on every worker; the driver prints progress and exports."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import TextIO

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.tensorflow import TensorflowTrainer
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from transfer import evaluation, export, storage
from transfer.checkpoint import STATE, restore
from transfer.config import Config
from transfer.controller import PostController, PostEpochs, StopOnUserError
from transfer.data.parquet import MAX_EXAMPLES
from transfer.data.plan import DatasetPlan
from transfer.errors import Interrupted, TrainingError, TransferError
from transfer.job import Echo, finetune_start, workers
from transfer.pass_spec import PassSpec
from transfer.tensorboard import FOLDER as TENSORBOARD
from transfer.tensorboard import EpochScalars
from transfer.tracking import PassTracking
from transfer.train_loop import build_pass_model, train_loop_per_worker

CONTROLLER_POLL_S = 0.2  # read by Ray Train's controller from the driver's environment
BAR_EVERY_S = 1.0  # how often a progress bar on a terminal moves
STOP_TIMEOUT_S = 30  # how long a stopped pass waits for its workers to go: within Kubernetes' default grace period


def run_pass(cfg: Config, pass_name: str, plans: dict[int, DatasetPlan], echo: Echo) -> dict:
    """Trains one pass (resuming from its latest checkpoint, if any) and exports it; SIGTERM or SIGINT stops it
    (Interrupted), keeping its checkpoints. `plans`: by number of workers, the plan of every worker-group size
    the pass may get."""
    try:
        with signals_interrupt():
            return train_and_export(cfg, pass_name, plans, echo)
    except Interrupted as e:
        run_folder = storage.join(cfg.run_uri, pass_name)
        raise Interrupted(e.signum, f"{pass_name} {e}; {kept_checkpoint(run_folder)}") from None


def train_and_export(cfg: Config, pass_name: str, plans: dict[int, DatasetPlan], echo: Echo) -> dict:
    export_uri = storage.join(cfg.run_uri, "export", pass_name)
    shown_uri = storage.redact(export_uri)
    epochs = cfg.pass_settings(pass_name).epochs

    init_model = None
    if pass_name == "finetune":
        init_model = storage.join(finetune_start(cfg), export.MODEL)  # checked by run_job, when it already existed
    tensorboard = EpochScalars(
        storage.join(cfg.run_uri, TENSORBOARD, pass_name), cfg.pass_settings(pass_name).learning_rate
    )
    with closing(tensorboard) as scalars, closing(PassTracking(cfg, pass_name, echo)) as tracked:
        progress = Progress(pass_name, cfg.scaling.max_failures, echo, [scalars, tracked])
        every_s = cfg.run.progress_every_s if progress.bar is None else min(cfg.run.progress_every_s, BAR_EVERY_S)
        spec = PassSpec(cfg.to_dict(), pass_name, plans, init_model, progress.queue, progress_every_s=every_s)
        plan = spec.plan
        # Fine-tuning's model is built here first, so a bad unfreeze setting fails now, not on every worker.
        model = build_pass_model(spec, cfg.model.weights) if pass_name == "finetune" else None

        # Ray Train's controller takes one report per poll of the workers and a worker's next report waits for it:
        # at the default 2 s poll, every epoch shorter than 2 s (a cached head epoch takes ~0.3 s) is stretched to 2 s.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_S))
        trainer = TensorflowTrainer(
            train_loop_per_worker,
            train_loop_config=spec,
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.num_workers,  # [min, max]: Ray Train's elastic scaling
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=pass_name,
                storage_path=storage.absolute(cfg.run_uri),
                failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
                callbacks=[PostEpochs(progress.queue), StopOnUserError(), PostController(progress.queue)],
            ),
        )
        echo(f"{pass_name}: training {epochs} epochs on {workers(cfg)} workers")
        run_folder = storage.join(cfg.run_uri, pass_name)
        try:
            result = progress.fit(trainer)
        except Interrupted:
            raise
        except Exception as e:
            raise training_error(e, pass_name, run_folder, len(progress.resumed_from)) from e
        if result.checkpoint is None:
            raise TrainingError(f"{pass_name}: training ended without a checkpoint")

        if model is None:  # the head pass's: the model every worker built (its checkpoints hold the classifier alone)
            model = build_pass_model(spec, cfg.model.weights)
        state = restore(model, result.checkpoint)
        history, bad = state["history"], state["bad_records"]
        counted = progress.evaluation
        if counted is None:
            raise TrainingError(f"{pass_name}: the workers ended without evaluating the model")
        report = evaluation.report(
            pass_name, plan.classes, counted["confusion"], counted["top_k_hits"], progress.misclassified
        )
        exported, trials = cfg, None
        if pass_name == "head" and cfg.head.search.trials:
            from transfer.search import search_heads

            world_size = history[-1]["world_size"]  # the features persisted by the group that trained last
            searched = search_heads(spec, world_size, history, echo)
            trials = searched.trials
            if searched.winner is not None:
                w = searched.winner
                model, history, report, exported = w.model, w.history, w.report, w.cfg
        metrics = {
            "pass": pass_name,
            "final": history[-1],
            "history": history,
            "cluster": progress.cluster(),
            "restarts": {"count": len(progress.resumed_from), "resumed_after_epoch": progress.resumed_from},
            "bad_records": {
                "left_out_while_planning": len(plan.left_out),
                "found_while_reading": bad["found"],
                "examples": (plan.left_out + bad["examples"])[:MAX_EXAMPLES],
            },
        }
        curves = [*earlier_curves(cfg, pass_name), (pass_name, history)]
        export.write_export(model, plan.classes, exported.to_yaml(), metrics, export_uri, report, curves, trials)
        tracked.finish(export_uri)
        for line in evaluation.summary_lines(report):
            echo(line)
        echo(f"{pass_name}: exported to {shown_uri}")
        return {"status": "trained", "export": shown_uri, "final": history[-1]}


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """While a pass runs, SIGTERM and SIGINT raise Interrupted in the main thread (an Airflow task cancelled, a
    KubeRay job stopped, Ctrl-C), instead of Ray's SIGTERM handler's bare exit; the previous handlers come back
    after."""

    def interrupt(signum: int, frame) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Progress:
    """The driver's view of a pass: prints events as they come, counts worker-group restarts, and knows where
    the workers ran.

    Every worker posts `worker` (where it runs) and rank 0 `start` each time the train loop starts (after a
    restart too); PostEpochs posts each epoch.
    """

    def __init__(self, pass_name: str, max_failures: int, echo: Echo, epoch_logs: list):
        """`epoch_logs`: each gets every epoch's row (`write`): TensorBoard's, MLflow's."""
        self.pass_name, self.max_failures, self.epoch_logs = pass_name, max_failures, epoch_logs
        # On a terminal, a phase's progress is one line that updates; in a log (a Ray job's, Airflow's), lines.
        self.bar = ProgressBar(sys.stdout) if echo is print and sys.stdout.isatty() else None
        self.echo = echo if self.bar is None else self.bar.echo
        # On the driver's node, with 0 CPUs (a head node that runs no training): a worker node may go away.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.resumed_from: list[int] = []  # per restart, the epoch it resumed after
        self.starts = 0
        self.controller = None  # the Ray Train controller's actor handle, once PostController posts it
        self.groups: dict[str, dict[int, dict]] = {}  # per start of the worker group, its workers by rank
        self.last_group: str | None = None  # the group that reported the latest epoch
        self.evaluation: dict | None = None  # rank 0's counts over the validation rows, once the pass has trained
        self.misclassified: list[dict] = []  # every worker's most confidently wrong validation rows
        self.noted: set[str] = set()  # the `once` of the notes said: a reason every worker gives, said once

    def cluster(self) -> dict:
        """Where the workers of the group that trained the last epoch ran."""
        workers = sorted(self.groups.get(self.last_group, {}).values(), key=lambda w: w["rank"])
        return {
            "nodes": len({w["node_id"] for w in workers}),
            "workers": [{k: w[k] for k in ("rank", "node_id", "hostname", "allocator")} for w in workers],
        }

    def handle(self, event: dict) -> None:
        name = self.pass_name
        if event["event"] == "worker":
            group = self.groups.setdefault(event["group"], {})
            group[event["rank"]] = event
            if len(group) == event["world_size"]:
                nodes = {w["node_id"] for w in group.values()}
                hosts = sorted({w["hostname"] for w in group.values()})
                self.echo(f"{name}: {len(group)} workers on {len(nodes)} nodes ({', '.join(hosts)})")
        elif event["event"] == "controller":
            self.controller = event["actor"]
        elif event["event"] == "start":
            self.starts += 1
            if self.starts > 1:
                self.resumed_from.append(event["epoch"])
                self.echo(
                    f"{name}: worker group restarted ({len(self.resumed_from)} of at most {self.max_failures}); "
                    f"resuming after epoch {event['epoch']}"
                )
            elif event["epoch"]:
                self.echo(f"{name}: resuming after epoch {event['epoch']} from its latest checkpoint")
        elif event["event"] == "progress":
            if self.bar is not None:
                self.bar.show(format_progress(event))
            else:
                self.echo(format_progress(event))
        elif event["event"] == "evaluation":
            self.evaluation = event
        elif event["event"] == "misclassified":
            self.misclassified += event["rows"]
        elif event["event"] == "cache":
            saved = f"; {event['saved']}" if event.get("saved") else ""
            self.echo(f"{name}: {event['what']} in {event['seconds']:.1f} s, cached in {event['where']}{saved}")
        elif event["event"] == "note":
            once = event.get("once")
            if once is None or once not in self.noted:
                self.echo(f"{name}: {event['line']}")
                self.noted.add(once)
        else:
            self.last_group = event.get("group")
            self.echo(format_epoch(event))
            for log in self.epoch_logs:
                log.write(event)

    def fit(self, trainer: TensorflowTrainer):
        """Runs trainer.fit() in a thread, handling events until it ends."""
        outcome: dict = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except Exception as e:  # handed to the main thread
                outcome["error"] = e

        thread = threading.Thread(target=fit, name="trainer-fit", daemon=True)
        thread.start()
        try:
            while thread.is_alive() or not self.queue.empty():
                try:
                    self.handle(self.queue.get(timeout=0.5))
                except Empty:
                    continue
        except Interrupted:
            self.stop_workers(thread)
            raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def stop_workers(self, fit_thread: threading.Thread) -> None:
        """Aborts the run as Ray Train's own SIGINT handler does: the controller stops the worker group and exits.
        Waits a bounded time, so a stuck cluster cannot hold the driver past its grace period; whatever is left
        goes with the driver (its actors, and a local Ray through the reaper)."""
        if self.controller is None:  # signalled before the controller started: nothing runs yet to stop
            return
        controller = self.controller

        def abort() -> None:
            try:
                ray.get(controller.abort.remote())
            except Exception:  # the controller ends itself in abort() (RayActorError), or is gone already
                pass

        # In a thread of its own: with Ray's own processes gone too (a signal to the whole process group), a call
        # to Ray can block past any timeout it is given.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        aborting = threading.Thread(target=abort, name="abort-train-run", daemon=True)
        aborting.start()
        aborting.join(STOP_TIMEOUT_S)
        fit_thread.join(max(0.0, deadline - time.monotonic()))


def earlier_curves(cfg: Config, pass_name: str) -> list[tuple[str, list[dict]]]:
    """The history of the export fine-tuning starts from, for its learning curves: (pass, history), or none."""
    if pass_name != "finetune":
        return []
    try:
        metrics = json.loads(storage.read_text(storage.join(finetune_start(cfg), "metrics.json")))
        return [(metrics["pass"], metrics["history"])]
    except (OSError, KeyError, ValueError):  # an init_from export of another tool: its curves are not ours to draw
        return []


class ProgressBar:
    """A progress line that rewrites itself on a terminal, until the next line printed replaces it."""

    CLEAR = "\r\x1b[2K"  # to the line's start, then erase it

    def __init__(self, stream: TextIO):
        self.stream, self.shown = stream, False

    def show(self, line: str) -> None:
        self.stream.write(self.CLEAR + line)
        self.stream.flush()
        self.shown = True

    def echo(self, line: str) -> None:
        if self.shown:
            self.stream.write(self.CLEAR)
            self.shown = False
        self.stream.write(line + "\n")
        self.stream.flush()


def format_progress(event: dict) -> str:
    """`head: epoch 3/10: 12,800/50,000 images, 410 images/s, 1:31 left`."""
    done, total, seconds = event["done"], event["total"], event["seconds"]
    rate = done / seconds if seconds > 0 else 0.0
    left = int((total - done) / rate) if rate > 0 else 0
    return (
        f"{event['pass']}: {event['what']}: {done:,}/{total:,} images, {rate:.0f} images/s, "
        f"{left // 60}:{left % 60:02d} left"
    )


def format_epoch(event: dict) -> str:
    return (
        f"{event['pass']} epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f} "
        f"accuracy {event['accuracy']:.3f} val_loss {event['val_loss']:.4f} "
        f"val_accuracy {event['val_accuracy']:.3f} | {event['images_per_s']:.0f} images/s {event['seconds']:.1f} s"
        + (f" | {event['bad_records']} bad records skipped" if event.get("bad_records") else "")
    )


def latest_checkpoint(run_folder: str) -> tuple[str, int] | None:
    """The newest checkpoint of a Ray Train run folder that holds a whole state, and its epoch."""
    best = None
    for state_file in storage.list_files(run_folder, (STATE,)):
        if not state_file.rsplit("/", 2)[-2].startswith("checkpoint_"):
            continue
        epoch = json.loads(storage.read_text(state_file))["epoch"]
        if best is None or epoch > best[1]:
            best = (state_file.rsplit("/", 1)[0], epoch)
    return best


def kept_checkpoint(run_folder: str) -> str:
    """What a stopped or failed pass leaves: its latest good checkpoint, which a rerun resumes from."""
    latest = latest_checkpoint(run_folder)
    if latest is None:
        return "no checkpoint was written"
    return f"latest good checkpoint: {storage.redact(latest[0])} (epoch {latest[1]}); rerun to resume from it"


def training_error(error: Exception, pass_name: str, run_folder: str, restarts: int) -> TransferError:
    """The user's own error when a worker raised one (config, data); else one line on what failed and what is
    left: the latest good checkpoint, which a rerun resumes from."""
    if isinstance(getattr(error, "controller_failure", None), TransferError):  # see StopOnUserError
        return error.controller_failure
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", failure)
        if isinstance(cause, TransferError):
            return cause
    cause = next(iter(failures.values()), error)
    cause = getattr(cause, "cause", cause)
    lines = [line for line in str(cause).splitlines() if line.strip()]
    kept = kept_checkpoint(run_folder)
    return TrainingError(
        f"{pass_name} failed after {restarts} worker-group restarts: {type(cause).__name__}: "
        f"{lines[-1] if lines else ''}; {kept}"
    )
