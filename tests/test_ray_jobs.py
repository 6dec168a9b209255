"""The job submitted to a real Ray job server, directly and through the Airflow DAG, as a user or a scheduler does it.

One local Ray head (127.0.0.1, its own temp dir and ports) serves every test here; the DAG runs in its own
virtual environment (.venv-airflow: Airflow 3 and Ray's job client, no TensorFlow, not this package), made once.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, write_config, write_validation_folder

pytestmark = pytest.mark.integration

DAGS = os.path.join(REPO, "jobs", "dags")


# --- a local Ray head with its job server ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every live process (zombies are dead)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            found[int(entry)] = (int(fields[1]), int(fields[3]))
    return found


def head_processes(root: int, known: set[int]) -> set[int]:
    """The live processes of the head started as `root`: its session, its descendants (a job's driver runs in a
    session of its own) and those of `known`, found earlier, whose parents may have died since."""
    live = processes()
    tree = {root} | {p for p, (_, sid) in live.items() if sid == root} | known
    while more := {p for p, (parent, _) in live.items() if parent in tree} - tree:
        tree |= more
    return tree & set(live)


def stop_head(head: subprocess.Popen) -> None:
    """Ends every process of the head, also what its jobs started.

    `ray start --block` takes its processes down when it gets SIGTERM; SIGKILL ends whatever is left after 5 s.
    Not `ray stop`: that stops every Ray on the machine, a developer's own too.
    """
    known = head_processes(head.pid, set())
    head.terminate()
    for sig, grace in ((None, 5), (signal.SIGKILL, 5)):
        for pid in known if sig else ():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            head.poll()  # reaps `ray start` itself
            known = head_processes(head.pid, known)
            if not known:
                return
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """A Ray head on 127.0.0.1 with its dashboard, the job server; yields its address and its auth token.

    Its own temp dir and ports keep it apart from any other Ray here (none joins it by accident); the path is
    short because Ray's unix socket paths have a length limit. Token authentication is on, as a real cluster's
    should be. Every process it started ends with this fixture, on failure too.
    """
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    ports = [
        "--port",
        "--dashboard-port",
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    ]
    port_of = {flag: free_port() for flag in ports}
    bin_dir = os.path.dirname(sys.executable)
    # Nothing of this test process: the job selects tf-keras itself, and finds the head through the job server.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TF_USE_LEGACY_KERAS")}
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # a job's `python` is this environment's, as in an image
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
    # Ray replaces a loopback --node-ip-address by the machine's own address unless, as on macOS, it runs
    # single-node clusters only: so everything stays on 127.0.0.1.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    args = [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    args += ["--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "2"]
    args += ["--temp-dir", temp_dir, "--disable-usage-stats"]
    args += [str(a) for flag, port in port_of.items() for a in (flag, port)]
    log_path = os.path.join(temp_dir, "ray-start.log")
    with open(log_path, "w") as log:
        head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with open(token_path) as f:
            found = {
                "address": f"http://127.0.0.1:{port_of['--dashboard-port']}",
                "token": f.read(),
                "token_path": token_path,
            }
        wait_for_job_server(found, head, log_path)
        yield found
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_client(head: dict[str, str]):
    """Ray's job client for the head, with its token."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head["address"], headers=auth(head))


def auth(head: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {head['token']}"}


def wait_for_job_server(head: dict[str, str], process: subprocess.Popen, log_path: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            with open(log_path) as f:
                pytest.fail(f"ray start exited {process.returncode}:\n{f.read()[-3000:]}")
        try:
            job_client(head).list_jobs()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def wait_until_done(client, submission_id: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not client.get_job_status(submission_id).is_terminal():
        assert time.monotonic() < deadline, f"job {submission_id} still running after {timeout} s"
        time.sleep(2)
    return client.get_job_info(submission_id)


def job_dir(root, assets: dict[str, str], name: str, **sections) -> str:
    """A folder holding job.yaml, uploaded with each job; the run's storage is an absolute path outside it."""
    folder = root / "job"
    folder.mkdir()
    write_config(folder / "job.yaml", assets, storage=str(root / "runs"), name=name, **sections)
    return str(folder)


def summary_line(logs: str) -> dict:
    return json.loads(logs.strip().splitlines()[-1])


# --- a job submitted to the job server, as `ray job submit --working-dir DIR -- python -m jobs.train job.yaml` ---


@pytest.fixture(scope="module")
def submitted(ray_head, assets, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ray-job")
    folder = job_dir(root, assets, "shapes", head={"epochs": 2})
    client = job_client(ray_head)
    # The head pass only: the DAG's run below submits a fine-tune pass as a Ray job too.
    # A variable the job sets for its workers too: Ray refuses to merge two runtime envs that both set one.
    runtime_env = {"working_dir": folder, "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}}
    entrypoint = "python -m jobs.train job.yaml --pass head"
    submission_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    info = wait_until_done(client, submission_id)
    return {"info": info, "logs": client.get_job_logs(submission_id), "run": root / "runs" / "shapes"}


def test_submitted_job_trains_into_a_complete_export(submitted):
    from transfer import export

    assert submitted["info"].status == "SUCCEEDED", submitted["logs"][-3000:]
    summary = summary_line(submitted["logs"])
    assert summary["status"] == "succeeded"
    assert {name: p["status"] for name, p in summary["passes"].items()} == {"head": "trained"}
    location = str(submitted["run"] / "export" / "head")
    export.check_complete(location)
    assert summary["passes"]["head"]["export"] == location


def test_job_logs_show_each_epoch_and_end_with_the_summary(submitted):
    lines = submitted["logs"].strip().splitlines()
    assert [line[: len("head epoch 1/2: loss ")] for line in lines if line.startswith("head epoch ")] == [
        "head epoch 1/2: loss ",
        "head epoch 2/2: loss ",
    ]
    assert summary_line(submitted["logs"])["status"] == "succeeded"


def test_job_joins_the_cluster_it_was_submitted_to(submitted):
    # The job server sets RAY_ADDRESS for the driver, so the job joins this cluster rather than start a Ray of its
    # own: its driver registered here (a driver of another Ray would be unknown to this one).
    info = submitted["info"]
    assert info.driver_info is not None
    assert info.driver_info.id == info.job_id and info.driver_info.node_ip_address == "127.0.0.1"


# --- the Airflow DAG ---


# Parses the DAGs folder as Airflow's DAG processor does; with a JSON argument, also runs the DAG once (dag.test()).
DAG_CHECK = """
import json, sys, time
from airflow.dag_processing.dagbag import BundleDagBag
started = time.monotonic()
bag = BundleDagBag(dag_folder=sys.argv[1], bundle_path=sys.argv[1], bundle_name="dags-folder")
dag = bag.dags.get("transfer_train")
out = {
    "import_errors": bag.import_errors,
    "parse_seconds": time.monotonic() - started,
    "modules": sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "tf_keras", "transfer", "ray"}),
    "tasks": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks} if dag else None,
    "retries": {t.task_id: t.retries for t in dag.tasks} if dag else None,
}
if len(sys.argv) > 2:
    run = dag.test(run_conf=json.loads(sys.argv[2]))
    out.update(state=str(run.state), run_id=run.run_id)
print("RESULT " + json.dumps(out))
"""


def run_dag_check(airflow_python: str, airflow_home, head: dict[str, str] | None = None, **conf) -> tuple[dict, str]:
    """Runs DAG_CHECK in .venv-airflow, away from this checkout (so nothing of it is importable but the DAGs).

    With `head`, runs the DAG against it with the params `conf`; the token is where an Airflow worker has it, in
    its environment, as for Ray's own CLI.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RAY_", "PYTHON"))}
    env.update(
        AIRFLOW_HOME=str(airflow_home),
        AIRFLOW__CORE__DAGS_FOLDER=DAGS,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
    )
    args = []
    if head:  # dag.test() keeps its DAG runs in Airflow's database
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=head["token_path"])
        args = [json.dumps({"ray_address": head["address"], **conf})]
        migrate = subprocess.run(
            [airflow_python, "-m", "airflow", "db", "migrate"],
            env=env,
            cwd=airflow_home,
            capture_output=True,
            text=True,
        )
        assert migrate.returncode == 0, migrate.stderr[-3000:]
    result = subprocess.run(
        [airflow_python, "-c", DAG_CHECK, DAGS, *args],
        env=env,
        cwd=airflow_home,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout + result.stderr)[-5000:]
    return json.loads(lines[-1][len("RESULT ") :]), result.stdout + result.stderr


def test_dag_parses_without_tensorflow_ray_or_this_package(airflow_python, tmp_path):
    out, _ = run_dag_check(airflow_python, tmp_path)
    assert out["import_errors"] == {}
    assert out["tasks"] == {"head": [], "finetune": ["head"], "predict": ["finetune"]}
    assert out["retries"] == {"head": 2, "finetune": 2, "predict": 2}
    # Schedulers parse DAG files often: the DAG imports neither TensorFlow nor this package (neither is installed
    # there), nor Ray until a task runs.
    assert out["modules"] == []
    assert out["parse_seconds"] < 5


@pytest.fixture(scope="module")
def dag_run(airflow_python, ray_head, assets, tmp_path_factory) -> dict:
    """One run of the DAG against the Ray head (dag.test(), as Airflow runs it); the Ray jobs it submitted."""
    root = tmp_path_factory.mktemp("dag")
    # A head search of 2 trials, as a team tunes the head: the head task's job runs it after the head pass.
    search = {"trials": 2, "epochs": [2]}
    folder = job_dir(root, assets, "dagrun", head={"epochs": 2, "search": search}, finetune={"epochs": 1})
    # What the predict task labels: the run's own validation rows and bad records.
    predict = write_validation_folder(os.path.join(folder, "job.yaml"), root / "predict")
    stale = root / "runs" / "dagrun" / "predictions" / "part-stale.parquet"  # an earlier run's: replaced whole
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier run's file")
    (root / "airflow").mkdir()
    out, output = run_dag_check(
        airflow_python,
        root / "airflow",
        ray_head,
        config="job.yaml",
        working_dir=folder,
        predict_data=str(predict["data"]),
        predict_options=["--workers", "2"],
    )
    client = job_client(ray_head)
    jobs = {j.submission_id: j for j in client.list_jobs() if (j.submission_id or "").startswith("transfer_train-")}
    run = root / "runs" / "dagrun"
    return {"out": out, "output": output, "jobs": jobs, "client": client, "run": run, "predicted_rows": predict["rows"]}


def job_of(dag_run: dict, pass_name: str, try_number: int = 1):
    name = f"-{pass_name}-try{try_number}"
    found = [job for sid, job in dag_run["jobs"].items() if sid.endswith(name)]
    assert len(found) == 1, sorted(dag_run["jobs"])
    return found[0]


def test_dag_runs_the_head_pass_then_the_finetune_pass_as_ray_jobs(dag_run):
    from transfer import export

    assert dag_run["out"]["state"] == "success", dag_run["output"][-5000:]
    head, finetune = job_of(dag_run, "head"), job_of(dag_run, "finetune")
    assert head.status == finetune.status == "SUCCEEDED"
    assert head.end_time <= finetune.start_time
    assert "--pass head" in head.entrypoint and "--pass finetune" in finetune.entrypoint
    for pass_name in ("head", "finetune"):
        export.check_complete(str(dag_run["run"] / "export" / pass_name))
    # The Airflow task log shows the job's progress.
    assert "head epoch 2/2: loss " in dag_run["output"] and "finetune epoch 1/1: loss " in dag_run["output"]
    assert "head search: 2 trials (random) on the persisted features" in dag_run["output"]
    trials = json.loads((dag_run["run"] / "export" / "head" / export.SEARCH).read_text())
    assert len(trials) == 3 and sum(t["chosen"] for t in trials) == 1


def test_finetune_job_starts_from_the_export_the_head_task_returned(dag_run):
    head_summary = summary_line(dag_run["client"].get_job_logs(job_of(dag_run, "head").submission_id))
    head_export = head_summary["passes"]["head"]["export"]
    assert head_export == str(dag_run["run"] / "export" / "head")
    assert f"--set finetune.init_from={head_export}" in job_of(dag_run, "finetune").entrypoint


def test_predict_task_labels_every_row_with_the_finetune_export_as_its_evaluation_did(dag_run):
    import numpy as np
    import pyarrow.parquet as pq

    job = job_of(dag_run, "predict")
    export = dag_run["run"] / "export" / "finetune"
    assert job.status == "SUCCEEDED" and job.start_time >= job_of(dag_run, "finetune").end_time
    assert f"--model {export} " in job.entrypoint
    out, rows = dag_run["run"] / "predictions", dag_run["predicted_rows"]
    assert json.loads((out / "_SUCCESS.json").read_text())["rows"] == rows + 7
    assert f"predict: {rows + 7} rows, 3 without a prediction" in dag_run["output"]
    assert not (out / "part-stale.parquet").exists()

    table = pq.read_table(out)
    assert table.column_names == ["label", "row", "prediction", "probability", "top_k", "error"]  # no image bytes
    by_row = {r["row"]: r for r in table.to_pylist()}
    assert sorted(by_row) == list(range(-7, rows))  # every input row, once
    assert by_row[-1]["error"] == "empty image" and by_row[-1]["prediction"] is None
    assert by_row[-2]["error"].startswith("not a decodable image") and by_row[-3]["error"].startswith("not a decodable")
    assert all(by_row[r]["error"] is None and by_row[r]["prediction"] for r in (-4, -5, -6, -7))  # gray, RGBA, palette

    evaluation = json.loads((export / "evaluation.json").read_text())
    classes = evaluation["classes"]
    confusion = np.zeros((len(classes), len(classes)), int)
    for r in range(rows):
        row = by_row[r]
        assert row["top_k"][0] == {"class": row["prediction"], "probability": row["probability"]}
        assert len(row["top_k"]) == evaluation["k"] and row["top_k"][0]["probability"] >= row["top_k"][1]["probability"]
        confusion[classes.index(row["label"]), classes.index(row["prediction"])] += 1
    # The same rows through the same decode and weights as the pass's own evaluation: the same predictions, but for
    # a near-tie that another batch size's float sums may tip.
    assert np.abs(confusion - np.array(evaluation["confusion_matrix"])).sum() <= 2


def second_try(ray_head: dict[str, str], job, name: str) -> tuple[dict, list[str]]:
    """What the DAG's task does on its second try for `job`'s pass: its summary and the lines it echoed."""
    from jobs.dags import ray_submit

    lines: list[str] = []
    summary = ray_submit.submit_and_wait(
        ray_head["address"],
        job.entrypoint,
        job.runtime_env,
        name=name,
        try_number=2,
        poll_s=1,
        echo=lines.append,
        headers=auth(ray_head),
    )
    return summary, lines


def test_retried_head_task_does_not_train_again(dag_run, ray_head):
    head = job_of(dag_run, "head")
    summary, lines = second_try(ray_head, head, name=head.submission_id.removesuffix("-try1"))
    assert summary["passes"]["head"]["status"] == "skipped"
    assert any(line.startswith("head: already finished (2 epochs)") for line in lines)
    assert not any(line.startswith("head epoch ") for line in lines)


def test_retry_waits_for_the_earlier_try_still_running_instead_of_starting_another(dag_run, ray_head):
    client, head = dag_run["client"], job_of(dag_run, "head")
    name = head.submission_id.removesuffix("-try1") + "-again"
    # Try 1 submitted its job, then its Airflow worker died; the job runs on.
    client.submit_job(entrypoint=head.entrypoint, runtime_env=head.runtime_env, submission_id=f"{name}-try1")
    summary, lines = second_try(ray_head, head, name)
    assert lines[0] == f"{name}-try1: still running from an earlier try; waiting for it"
    assert summary["passes"]["head"]["status"] == "skipped"
    assert f"{name}-try2" not in {job.submission_id for job in client.list_jobs()}
