"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a raylet per node, every address on
127.0.0.1): the job run against it with RAY_ADDRESS as a user would, run storage on the S3 endpoint, nodes removed
as when a machine dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli, write_config
from tests.test_faults import Job, metrics_of
from transfer import storage

pytestmark = pytest.mark.integration


class LocalCluster:
    """A head that trains nothing (0 CPUs) and worker nodes of 1 CPU each; the job's driver joins the head."""

    def __init__(self, workers: int):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        self.workers = [self.cluster.add_node(num_cpus=1) for _ in range(workers)]
        self.private: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return self.cluster.address

    def helper_actors(self) -> dict[str, str]:
        """Where the live actors the driver waits on run (the train controller, the job's progress queue):
        {class: node id}. Ray Train's own per-group helpers (a PreemptionWatcher) restart anywhere."""
        table = self.cluster.global_state.actor_table(None)
        return {
            actor["ActorClassName"]: actor["Address"]["NodeID"]
            for actor in table.values()
            if actor["State"] == "ALIVE" and actor["ActorClassName"] in ("TrainController", "_QueueActor")
        }

    def remove_worker_node(self) -> str:
        """Kills a worker node's raylet and every process on it, as when its machine dies; returns its id.

        The node to go is one that holds an actor besides the training workers, if there is one.
        """
        others = set(self.helper_actors().values())
        node = next((n for n in self.workers if n.node_id in others), self.workers[0])
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)
        return node.node_id

    def add_worker_node(self) -> str:
        node = self.cluster.add_node(num_cpus=1)
        self.workers.append(node)
        return node.node_id

    def add_node_without(self, folder: str) -> subprocess.Popen:
        """A worker node in a mount namespace of its own, where `folder` is an empty tmpfs (tests/private_node.py)."""
        if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
            pytest.skip("unshare --mount is not permitted here: cannot make a node with a file system of its own")
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "tests/private_node.py",
             self.cluster.gcs_address, folder],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        node_id = process.stdout.readline().strip()
        deadline = time.monotonic() + 60
        while not any(n["NodeID"] == node_id and n["Alive"] for n in self.cluster.global_state.node_table()):
            assert time.monotonic() < deadline and process.poll() is None, "the private node did not join"
            time.sleep(0.5)
        self.private.append(process)
        return process

    def job(self, *args: str, **env: str) -> Job:
        return Job(*args, env={**os.environ, "RAY_ADDRESS": self.address, **env})

    def shutdown(self) -> None:
        for process in self.private:
            process.terminate()
            process.wait(timeout=30)
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def local_cluster():
    cluster = LocalCluster(workers=2)
    yield cluster
    cluster.shutdown()


@pytest.fixture
def cluster(local_cluster):
    """The module's cluster with two worker nodes, however many the test before it left."""
    while len(local_cluster.workers) < 2:
        local_cluster.add_worker_node()
    return local_cluster


@pytest.fixture(scope="module")
def lost_node_run(local_cluster, s3, assets, tmp_path_factory):
    """A head pass on 2 workers on 2 nodes, storage on S3, that loses a node (its raylet and workers killed)
    after its first checkpoint; a replacement node joins 5 s later."""
    cluster = local_cluster
    config = write_config(
        tmp_path_factory.mktemp("lost") / "job.yaml", assets, f"{s3}/runs", "lost-node",
        scaling={"num_workers": 2, "max_failures": 3},
    )  # fmt: skip
    job = cluster.job(config, "--pass", "head", "--set", "head.epochs=4")
    job.wait_for("head: 2 workers on 2 nodes")
    job.wait_for("head epoch 1/4")
    helpers = cluster.helper_actors()
    removed = cluster.remove_worker_node()
    lost = time.monotonic()
    time.sleep(5)
    cluster.add_worker_node()
    restarted = job.wait_for("head: worker group restarted")
    code, stderr = job.finish()
    print(f"lost node, removed at {lost - job.started:.1f} s:\n{job.timeline()}")
    return {
        "config": config, "code": code, "stderr": stderr, "lines": job.lines, "helpers": helpers,
        "head_node": cluster.cluster.head_node.node_id, "removed": removed, "recovery_s": restarted - lost,
        "export": f"{s3}/runs/lost-node/export/head",
    }  # fmt: skip


def test_a_lost_node_is_survived_on_a_replacement_node(lost_node_run):
    run = lost_node_run
    assert run["code"] == 0, run["stderr"][-3000:]
    # What the driver depends on (the train controller, the progress queue) lives on its own node, the head.
    assert run["helpers"] == {"TrainController": run["head_node"], "_QueueActor": run["head_node"]}
    restart = next(line for line in run["lines"] if line.startswith("head: worker group restarted"))
    resumed_after = int(restart.rsplit(" ", 1)[1])
    metrics = metrics_of(run["export"])
    assert metrics["restarts"] == {"count": 1, "resumed_after_epoch": [resumed_after]} and resumed_after >= 1
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4]  # at most the epoch in flight redone
    assert [row["world_size"] for row in metrics["history"]] == [2, 2, 2, 2]
    nodes = {worker["node_id"] for worker in metrics["cluster"]["workers"]}
    assert metrics["cluster"]["nodes"] == 2 and len(nodes) == 2 and run["removed"] not in nodes
    assert [w["rank"] for w in metrics["cluster"]["workers"]] == [0, 1]
    assert json.loads(run["lines"][-1])["status"] == "succeeded"
    print(f"node loss: {run['recovery_s']:.1f} s from the node's removal to the restarted group resuming")


def test_a_damaged_head_export_is_refused_by_the_finetune_pass(lost_node_run, local_cluster):
    export = lost_node_run["export"]
    model = storage.read_bytes(f"{export}/model.keras")
    storage.write_bytes(f"{export}/model.keras", model[: len(model) // 2])
    result = run_cli(lost_node_run["config"], "--pass", "finetune")
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.strip() == (
        f"error: finetune.init_from: {export}/model.keras has {len(model) // 2} bytes, its manifest says {len(model)}"
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "failed"


def test_an_elastic_pass_finishes_on_the_workers_left_after_a_node_is_lost_for_good(cluster, assets, tmp_path):
    # Local storage, which every node of this machine sees (as an NFS mount): the storage check lets it through.
    config = write_config(
        tmp_path / "job.yaml",
        assets,
        str(tmp_path / "runs"),
        "elastic",
        scaling={"num_workers": [1, 2], "max_failures": 3},
    )
    # After a loss, Ray's elastic policy first tries the old size on stale resource counts, and waits for its
    # placement group this long (60 s by default) before trying fewer workers. A group's placement group is ready in
    # milliseconds when its nodes are there.
    job = cluster.job(config, "--pass", "head", "--set", "head.epochs=4", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")
    job.wait_for("head: 2 workers on 2 nodes")
    job.wait_for("head epoch 1/4")
    cluster.remove_worker_node()
    lost = time.monotonic() - job.started
    job.wait_for("head: 1 workers on 1 nodes")
    code, stderr = job.finish()
    print(f"elastic, node lost at {lost:.1f} s:\n{job.timeline()}")
    assert code == 0, stderr[-3000:]
    metrics = metrics_of(str(tmp_path / "runs/elastic/export/head"))
    sizes = [row["world_size"] for row in metrics["history"]]
    assert sizes[0] == 2 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True), sizes
    assert metrics["cluster"]["nodes"] == 1 and len(metrics["cluster"]["workers"]) == 1
    assert metrics["final"]["epoch"] == 4


def test_a_local_storage_folder_that_a_node_cannot_see_stops_the_job_before_training(cluster, assets, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    cluster.add_node_without(str(runs))  # a node without the "NFS mount"
    config = write_config(tmp_path / "job.yaml", assets, str(runs), "unshared")
    job = cluster.job(config, "--pass", "head")
    code, stderr = job.finish(timeout=300)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, stderr[-3000:]
    assert f"run.storage: {runs} is a local folder that node" in errors[0] and "s3://" in errors[0]
    assert not any(line.startswith("head: training") for line in job.lines)
    assert json.loads(job.lines[-1])["status"] == "failed"
    assert [p.name for p in runs.rglob("*") if p.is_file()] == []  # the probe is gone
