"""One pass of the training job, or a batch prediction, as a Ray job, submitted to a Ray job server and waited
for: what the DAG's tasks do.

Kept apart from the DAG file and free of Airflow, TensorFlow and the `transfer` package: a scheduler parses the DAG
file often, so it must import fast, and these functions run (and are tested) anywhere Ray's job client is installed.
Ray itself is imported only when a job is submitted.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# Exit codes of `python -m jobs.train` and `jobs.predict` that fail the same way on every try: 2 config or usage
# error, 3 data error.
NOT_RETRYABLE = (2, 3)
LOG_TAIL_LINES = 20


class JobFailed(RuntimeError):
    """A Ray job that ended FAILED or STOPPED, or without a summary; `exit_code` is the job's own, when known."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code

    @property
    def retryable(self) -> bool:
        """A config or data error fails again on a retry; a training failure (a lost node, OOM) may not."""
        return self.exit_code not in NOT_RETRYABLE


def entrypoint(config: str, pass_name: str, overrides: Sequence[str] = ()) -> str:
    """The job's command line, shell-quoted: `python -m jobs.train CONFIG --pass PASS [--set KEY=VALUE ...]`."""
    args = ["python", "-m", "jobs.train", config, "--pass", pass_name]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def predict_entrypoint(model: str, data: str, out: str, options: Sequence[str] = ()) -> str:
    """`python -m jobs.predict --model EXPORT --data DATA --out OUT [OPTIONS ...]`, shell-quoted."""
    return shlex.join(["python", "-m", "jobs.predict", "--model", model, "--data", data, "--out", out, *options])


def job_name(*parts: str) -> str:
    """A Ray submission id prefix from, e.g., the DAG id, the DAG run id and the pass: the same on every try."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", part).strip("_") for part in parts)


def submit_and_wait(
    address: str,
    entrypoint: str,
    runtime_env: dict[str, Any] | None = None,
    *,
    name: str,
    try_number: int = 1,
    poll_s: float = 5.0,
    echo: Callable[[str], None] = print,
    headers: dict[str, str] | None = None,
) -> dict:
    """Runs `entrypoint` as the Ray job `<name>-try<try_number>` and returns its JSON summary (its last log line).

    Safe to retry, as the job itself is (a finished pass is skipped, an interrupted one resumes): a retry first
    looks for the job of an earlier try that still runs (the task that submitted it died, the job did not) and
    waits for that one, rather than start a second driver on the same run. Raises JobFailed if the job fails.
    A cluster with token authentication takes the token from `headers` (`Authorization: Bearer ...`) or, as for
    Ray's own CLI, from RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) in the environment.
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address, headers=headers)
    jobs = {job.submission_id: job for job in client.list_jobs() if job.submission_id}
    ids = [f"{name}-try{n}" for n in range(1, try_number + 1)]
    running = [i for i in ids if i in jobs and not jobs[i].status.is_terminal()]
    if running:
        submission_id = running[-1]
        echo(f"{submission_id}: still running from an earlier try; waiting for it")
    else:
        submission_id = ids[-1]
        if submission_id not in jobs:  # else this very try was submitted already: its outcome is the answer
            client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
            echo(f"{submission_id}: submitted to {address}: {entrypoint}")
    return wait_for_summary(client, submission_id, poll_s, echo)


def wait_for_summary(
    client: JobSubmissionClient, submission_id: str, poll_s: float = 5.0, echo: Callable[[str], None] = print
) -> dict:
    """Polls the job until it ends, echoing its log lines as they come; returns its summary or raises JobFailed."""
    from ray.job_submission import JobStatus

    shown = 0
    while True:
        status = client.get_job_status(submission_id)
        logs = client.get_job_logs(submission_id)  # read after the status: complete once the status is final
        end = len(logs) if status.is_terminal() else logs.rfind("\n", shown) + 1
        for line in logs[shown:end].splitlines():
            echo(line)
        shown = max(shown, end)
        if status.is_terminal():
            break
        time.sleep(poll_s)

    summary = last_summary(logs)
    if status == JobStatus.SUCCEEDED and summary and summary.get("status") == "succeeded":
        return summary
    info = client.get_job_info(submission_id)
    exit_code = summary.get("exit_code") if summary else info.driver_exit_code
    why = summary.get("error") if summary else info.message
    tail = "\n".join(logs.rstrip().splitlines()[-LOG_TAIL_LINES:])
    if status == JobStatus.SUCCEEDED:
        why = "it printed no JSON summary line (is the entrypoint `python -m jobs.train`?)"
    raise JobFailed(f"Ray job {submission_id} {status.value} (exit code {exit_code}): {why}\n{tail}", exit_code)


def last_summary(logs: str) -> dict | None:
    """The job's JSON summary: its last stdout line, found as the last JSON object line (stderr may follow it)."""
    for line in reversed(logs.splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "status" in value:
                return value
    return None
