"""What the DAG's tasks send to Ray and read back, without a cluster (the Ray jobs themselves: test_ray_jobs.py)."""

import json
import shlex

from jobs.dags import ray_submit


def test_entrypoint_survives_the_shell_with_spaces_and_quotes():
    command = ray_submit.entrypoint("my jobs/job.yaml", "finetune", ["finetune.init_from=/runs/it's here/export/head"])
    assert shlex.split(command) == [
        "python",
        "-m",
        "jobs.train",
        "my jobs/job.yaml",
        "--pass",
        "finetune",
        "--set",
        "finetune.init_from=/runs/it's here/export/head",
    ]


def test_summary_is_found_with_stderr_lines_after_it():
    summary = {"status": "succeeded", "run": "flowers", "passes": {}}
    logs = f"head epoch 1/1: loss 0.5\n{{not json\n{json.dumps(summary)}\nWARNING: a late line on stderr\n"
    assert ray_submit.last_summary(logs) == summary
    assert ray_submit.last_summary("no summary here\n") is None


def test_job_name_is_the_same_on_every_try_and_safe_as_an_id():
    name = ray_submit.job_name("transfer_train", "manual__2026-11-30T23:56:36.205443+00:00", "head")
    assert name == "transfer_train-manual__2026_11_30T23_56_36.205443_00_00-head"


def test_config_and_data_errors_are_not_retried():
    assert not ray_submit.JobFailed("bad key", exit_code=2).retryable
    assert not ray_submit.JobFailed("bad row", exit_code=3).retryable
    assert ray_submit.JobFailed("worker lost", exit_code=1).retryable
    assert ray_submit.JobFailed("stopped").retryable


def test_predict_entrypoint_passes_its_options_through_the_shell():
    command = ray_submit.predict_entrypoint("s3://b/run/export/finetune", "/data/my images", "s3://b/o", ["--use-gpu"])
    assert shlex.split(command) == [
        "python", "-m", "jobs.predict", "--model", "s3://b/run/export/finetune", "--data", "/data/my images",
        "--out", "s3://b/o", "--use-gpu",
    ]  # fmt: skip
