"""The job, phase by phase: check and plan the data, start TensorFlow and Ray, then train and export each pass.

Everything before training runs without TensorFlow or Ray, so a bad config or dataset is reported in a second.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

from transfer import allocator, export, storage, tracking
from transfer.config import Config
from transfer.data import images, parquet
from transfer.data.plan import DatasetPlan, plan_dataset
from transfer.errors import ConfigError, TrainingError

Echo = Callable[[str], None]
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job server for a submitted job's driver
HEAD_ANSWER_TIMEOUT_S = 2.0  # a live head accepts a TCP connection in milliseconds, even on a loaded machine


def run_job(cfg: Config, passes: Sequence[str], verbose: bool = False, echo: Echo = print) -> dict:
    """Runs the passes in order; returns the summary (run, storage, each pass's status, metrics and export)."""
    check_inputs(cfg)
    tracking.check_tracking(cfg)
    plans = plan_data(cfg)
    plan = plans[max(plans)]
    echo(
        f"data: {len(plan.classes)} classes, {plan.train.rows_per_worker} training and "
        f"{plan.validation.rows_per_worker} validation images per worker, {workers(cfg)} workers"
    )
    if plan.left_out:
        echo(f"data: {len(plan.left_out)} rows left out, for example {plan.left_out[0]}")
    done = {pass_name: finished_pass(cfg, pass_name) for pass_name in passes}
    head_trains = "head" in passes and not done["head"]
    if "finetune" in passes and not done["finetune"] and (cfg.finetune.init_from or not head_trains):
        # Its start exists already (not an export this job is about to write): checked before Ray starts.
        export.check_complete(finetune_start(cfg), "finetune.init_from")
    if not all(done.values()):  # a rerun of a finished job (a DAG task's retry) starts neither TensorFlow nor Ray
        import_tensorflow(verbose)
        connect_ray(verbose, echo)
        check_storage_is_shared(cfg)
    summary = {
        "run": cfg.run.name,
        "storage": storage.redact(storage.absolute(cfg.run_uri)),
        "passes": {},
    }
    for pass_name in passes:
        if done[pass_name]:
            result = done[pass_name]
            echo(f"{pass_name}: already finished ({result['final']['epoch']} epochs); export at {result['export']}")
        else:
            from transfer.train_pass import run_pass  # imports TensorFlow

            result = run_pass(cfg, pass_name, plans, echo)
        summary["passes"][pass_name] = result
    return summary


def finished_pass(cfg: Config, pass_name: str) -> dict | None:
    """A pass whose export is complete and has all the configured epochs (raising `epochs` trains the rest); a
    head pass with a search, once its export holds the search's trials."""
    location = storage.join(cfg.run_uri, "export", pass_name)
    if not export.is_complete(location):
        return None
    final = export.read_metrics(location)["final"]
    if pass_name == "head" and cfg.head.search.trials:  # the chosen head may have trained fewer epochs
        if not storage.exists(storage.join(location, export.SEARCH)):
            return None
    elif final["epoch"] < cfg.pass_settings(pass_name).epochs:
        return None
    return {"status": "skipped", "export": storage.redact(location), "final": final}


def check_inputs(cfg: Config) -> None:
    """Checks what config validation cannot (files exist) before anything expensive starts."""
    weights = cfg.model.weights
    if weights not in ("imagenet", "none") and not storage.exists(weights):
        raise ConfigError(f"model.weights: {weights} not found")
    if cfg.finetune.init_from and not storage.exists(cfg.finetune.init_from):
        raise ConfigError(f"finetune.init_from: {cfg.finetune.init_from} not found")


def finetune_start(cfg: Config) -> str:
    """The export the fine-tune pass starts from."""
    return cfg.finetune.init_from or storage.join(cfg.run_uri, "export", "head")


def workers(cfg: Config) -> str:
    """The number of workers as the user set it: `2`, or `1-4` when elastic."""
    sizes = cfg.scaling.world_sizes
    return f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"


def plan_data(cfg: Config) -> dict[int, DatasetPlan]:
    """Scans the dataset on the driver and gives every worker the same number of rows and steps: a plan for each
    number of workers the passes may run on (one, unless elastic), keyed by that number."""
    d = cfg.data

    def scan(location: str, key: str) -> parquet.ParquetIndex:
        if d.format == "images":  # listed or read once, then planned and read as Parquet of image URIs
            name = key.split(".")[-1]
            target = storage.join(cfg.run_uri, "data", f"{name}.parquet")
            manifest = images.write_manifest(location, d.image_column, d.label_column, key, target)
            return parquet.scan(manifest, d.image_column, d.label_column, key, d.bad_records, source=location)
        return parquet.scan(location, d.image_column, d.label_column, key, d.bad_records)

    train = scan(d.train, "data.train")
    validation = scan(d.validation, "data.validation") if d.validation else None
    plans = {n: plan_dataset(train, validation, d.validation_split, n, d.seed) for n in cfg.scaling.world_sizes}
    for pass_name in ("head", "finetune"):  # the most workers give each the fewest rows
        plans[max(plans)].check_batch_size(cfg.pass_settings(pass_name).batch_size, f"{pass_name}.batch_size")
    return plans


def import_tensorflow(verbose: bool) -> None:
    """Imports TensorFlow; unless verbose, its native start-up chatter (oneDNN, CUDA probes) is kept off stderr."""
    if verbose:
        import tensorflow  # noqa: F401

        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()  # probes CUDA now, while stderr is closed
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    tf.get_logger().setLevel("ERROR")


def connect_ray(verbose: bool, echo: Echo = print) -> None:
    """Joins the cluster at RAY_ADDRESS or a running local head; otherwise starts a local single-node Ray."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(echo)
    env_vars = {"TF_USE_LEGACY_KERAS": "1", **allocator.worker_env(os.environ.get("RAY_ADDRESS"))}
    if not verbose:
        env_vars["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    # Submitted as a Ray job: Ray refuses to merge the job's runtime env with ours where both set a variable.
    submitted = ray.job_config.JobConfig.from_json(json.loads(os.environ.get(RAY_JOB_CONFIG, "{}")))
    env_vars = {k: v for k, v in env_vars.items() if k not in (submitted.runtime_env or {}).get("env_vars", {})}
    ray.init(
        address=address,
        runtime_env={"env_vars": env_vars},
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        include_dashboard=False,
    )
    node = ray._private.worker._global_node
    if node is not None and node.head:  # we started this Ray: it must not outlive us
        stop_with_this_process([info.process.pid for infos in node.all_processes.values() for info in infos])


PROBE_TIMEOUT_S = 120  # a node's first task starts a Ray worker process there


def check_storage_is_shared(cfg: Config) -> None:
    """Stops before training when the run's storage is a local folder that a node which may run workers cannot
    see: Ray Train would write that node's checkpoints to its own disk, and a restart or the export would not
    find them. Each such node reads a probe the driver wrote."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not storage.is_local(cfg.run_uri):
        return
    here = ray.get_runtime_context().get_node_id()
    need = {"GPU": 1} if cfg.scaling.use_gpu else {"CPU": cfg.scaling.cpus_per_worker}
    nodes = [
        node
        for node in ray.nodes()
        if node["Alive"] and node["NodeID"] != here and all(node["Resources"].get(k, 0) >= v for k, v in need.items())
    ]
    if not nodes:
        return
    token = os.urandom(8).hex()
    probe = storage.resolve(storage.join(cfg.run_uri, f".storage-probe-{token}"))[1]
    storage.write_text(probe, token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        answers = [
            read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(probe)
            for node in nodes
        ]
        seen = ray.get(answers, timeout=PROBE_TIMEOUT_S)  # a local path: the nodes read it as a file
    finally:
        storage.delete(probe)
    for node, text in zip(nodes, seen, strict=True):
        if text != token:
            raise ConfigError(
                f"run.storage: {cfg.run.storage} is a local folder that node {node['NodeManagerHostname']} "
                f"({node['NodeID'][:8]}) cannot see; with more than one node use s3://, gs:// or a folder "
                "mounted at the same path on every node (NFS)"
            )


def _read_probe(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def ray_address(echo: Echo) -> str | None:
    """The `address` for ray.init: None (Ray's own choice) once the head it would join answers, or "local".

    Ray joins the head recorded in ray_current_cluster even when that head died without `ray stop`, and then
    retries for minutes. A dead recorded head means no Ray runs here: start one. A dead RAY_ADDRESS is an error.
    """
    from ray._common.utils import get_ray_address_file
    from ray._private import services

    given = os.environ.get("RAY_ADDRESS", "")
    if "://" in given:  # Ray Client (ray://host:port): its own connection, with its own timeout
        return None
    try:
        head = services.canonicalize_bootstrap_address(None)
    except ConnectionError:  # RAY_ADDRESS=auto and no Ray here: ray.init says so at once
        return None
    if head is None or answers(head):
        return None
    if given:
        raise TrainingError(f"RAY_ADDRESS={given}: no Ray head answers at {head}")
    echo(f"ray: the head recorded in {get_ray_address_file(None)} ({head}) does not answer; starting a local Ray")
    return "local"


def answers(address: str) -> bool:
    """Whether something accepts a TCP connection at host:port (a Ray head's GCS), within a second or two."""
    from ray._common.network_utils import parse_address

    host, port = parse_address(address)
    try:
        with socket.create_connection((host, int(port)), timeout=HEAD_ANSWER_TIMEOUT_S):
            return True
    except OSError:
        return False


# Polls the driver; once it is gone (or a zombie) kills the local Ray it started. Ray's own shutdown runs only
# when the driver exits normally: after a SIGKILL the cluster and its train controller would go on without it.
_REAPER = """
import os, signal, sys, time
driver, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
def alive():
    try:
        with open(f"/proc/{driver}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
def parents():
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                found[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            pass
    return found
while alive():
    time.sleep(1)
tree, parent_of = set(pids), parents()
while True:  # the processes and everything they started: workers, agents
    more = {p for p, parent in parent_of.items() if parent in tree} - tree
    if not more:
        break
    tree |= more
for pid in tree:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def stop_with_this_process(pids: list[int]) -> None:
    """Kills the given processes and their descendants when this process ends, however it ends (SIGKILL too)."""
    subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid()), *map(str, pids)],
        start_new_session=True,  # a Ctrl-C to the driver's process group leaves the reaper to clean up
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
