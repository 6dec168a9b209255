"""Airflow 3 DAG `transfer_train`: the head pass, then the fine-tune pass from the head's export, then (when
`predict_data` is given) a batch prediction with the fine-tuned export; each a Ray job.

Each task submits `python -m jobs.train CONFIG --pass ...` (or `python -m jobs.predict ...`) to the Ray job server
and waits for it; a task's XCom is its job's JSON summary, from which the next task takes the export URI. The
Airflow workers need Airflow and Ray's job client only (jobs/dags/requirements.txt); the cluster runs the image
with this package. Deploy this file with ray_submit.py beside it in the DAGs folder (Airflow puts that folder on
sys.path).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import pendulum
import ray_submit
from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException


@dag(
    dag_id="transfer_train",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two runs of one config would train the same run folder at once
    # Retries are safe: the job skips a finished pass and resumes an interrupted one from its latest checkpoint
    # (same run.name), and a retry waits for a job of an earlier try that still runs instead of starting another.
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "ray_address": Param(
            os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
            type="string",
            description="the Ray job server, http://<head>:8265 (default: RAY_API_SERVER_ADDRESS, as ray job submit)",
        ),
        "config": Param(
            "job.yaml",
            type="string",
            description="the job config: relative to working_dir, or a path on the cluster's driver node",
        ),
        "working_dir": Param(
            None,
            type=["null", "string"],
            description="a folder on the Airflow worker uploaded with each job (holding the config), or a zip URI",
        ),
        "overrides": Param([], type="array", description="KEY.PATH=VALUE overrides, as --set for both passes"),
        "predict_data": Param(
            None,
            type=["null", "string"],
            description="data to label with the fine-tuned export (transfer-predict --data); none: no prediction",
        ),
        "predict_out": Param(
            None, type=["null", "string"], description="where the predictions go (default: <run>/predictions)"
        ),
        "predict_options": Param(
            [], type="array", description="more transfer-predict options, e.g. --format images --workers 4 --use-gpu"
        ),
    },
    tags=["transfer", "ray"],
)
def transfer_train() -> None:
    @task
    def head() -> dict:
        return _run_pass("head")

    @task
    def finetune(head_summary: dict) -> dict:
        return _run_pass("finetune", [f"finetune.init_from={head_summary['passes']['head']['export']}"])

    @task
    def predict(finetune_summary: dict) -> dict:
        params = get_current_context()["params"]
        if not params["predict_data"]:
            raise AirflowSkipException("no predict_data given")
        model = finetune_summary["passes"]["finetune"]["export"]
        out = params["predict_out"] or f"{finetune_summary['storage']}/predictions"
        return _submit(
            "predict", ray_submit.predict_entrypoint(model, params["predict_data"], out, params["predict_options"])
        )

    predict(finetune(head()))


def _run_pass(pass_name: str, overrides: Sequence[str] = ()) -> dict:
    """Submits one pass with this DAG run's params and waits for it."""
    params = get_current_context()["params"]
    return _submit(pass_name, ray_submit.entrypoint(params["config"], pass_name, [*overrides, *params["overrides"]]))


def _submit(step: str, entrypoint: str) -> dict:
    """Submits one job with this DAG run's params and waits for it; its summary becomes the task's XCom."""
    context = get_current_context()
    params, ti = context["params"], context["ti"]
    working_dir = params["working_dir"]
    try:
        return ray_submit.submit_and_wait(
            params["ray_address"],
            entrypoint,
            {"working_dir": working_dir} if working_dir else None,
            name=ray_submit.job_name(ti.dag_id, context["run_id"], step),
            try_number=ti.try_number,
        )
    except ray_submit.JobFailed as e:
        if not e.retryable:  # a config or data error: every retry would fail the same way
            raise AirflowFailException(str(e)) from e
        raise


transfer_train_dag = transfer_train()
