"""Real faults on a real local Ray with 2 workers, run storage on the S3 endpoint: killed workers and drivers,
too many failures, a frozen peer, a stop by signal. A lost node, and a damaged export: tests/test_multinode.py."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, run_cli, write_config
from transfer import storage

pytestmark = pytest.mark.integration


class Job:
    """`python -m jobs.train ARGS` in the background, its stdout lines collected as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobs.train", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line came (time.monotonic())
        self.started = time.monotonic()
        self.stderr: list[str] = []
        self._new: queue.Queue = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.times.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)

    def wait_for(self, prefix: str, timeout: float = 300) -> float:
        """Waits for a stdout line starting with `prefix`; returns when it came (time.monotonic())."""
        deadline = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None and self._new.empty():
                raise AssertionError(f"no line {prefix!r}; stdout so far: {self.lines[-10:]}")
            try:
                self._new.get(timeout=min(remaining, 1))
            except queue.Empty:
                pass
        return time.monotonic()

    def first(self, prefix: str) -> str:
        """The first stdout line starting with `prefix` (after `wait_for` it)."""
        return next(line for line in self.lines if line.startswith(prefix))

    def timeline(self) -> str:
        """The stdout lines so far, each with the seconds since the job started."""
        return "\n".join(f"{t - self.started:7.1f} s  {line}" for t, line in zip(self.times, self.lines, strict=False))

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return self.process.returncode, "".join(self.stderr)


def ray_train_worker_pids(job: Job) -> list[int]:
    """The job's Ray Train worker processes: under the local Ray that the job's driver started."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"ray::RayTrainWorker" in f.read() and _descends_from(int(entry), job.process.pid):
                        pids.append(int(entry))
            except OSError:
                continue
    return sorted(pids)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return False


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_one_worker(job: Job) -> float:
    pids = ray_train_worker_pids(job)
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    return time.monotonic()


def metrics_of(uri: str) -> dict:
    return json.loads(storage.read_text(f"{uri}/metrics.json"))


def test_past_max_failures_the_job_exits_1_naming_the_latest_checkpoint(s3, assets, tmp_path):
    config = write_config(tmp_path / "job.yaml", assets, storage=f"{s3}/runs", name="no-retries")
    job = Job(config, "--pass", "head", "--set", "head.epochs=4", "--set", "scaling.max_failures=0")
    job.wait_for("head epoch 1/4")
    kill_one_worker(job)
    code, stderr = job.finish()
    assert code == 1
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: head failed after 0 worker-group restarts: ")
    assert f"latest good checkpoint: {s3}/runs/no-retries/head/checkpoint_" in line
    assert line.endswith("; rerun to resume from it")
    assert json.loads(job.lines[-1])["status"] == "failed"


def test_a_frozen_peer_ends_in_an_error_within_the_collective_timeout_not_a_hang(s3, assets, tmp_path):
    config = write_config(tmp_path / "job.yaml", assets, storage=f"{s3}/runs", name="frozen-peer")
    job = Job(config, "--pass", "head", "--set", "head.epochs=3", "--set", "scaling.collective_timeout_s=15")
    job.wait_for("head epoch 1/3")
    os.kill(ray_train_worker_pids(job)[-1], signal.SIGSTOP)  # alive to Ray, silent to its peer
    frozen = time.monotonic()
    restarted = job.wait_for("head: worker group restarted", timeout=240)
    code, stderr = job.finish()
    assert code == 0, stderr[-3000:]
    assert restarted - frozen < 15 + 60
    print(f"frozen peer: {restarted - frozen:.1f} s from SIGSTOP to the restarted group resuming")


def test_a_driver_stopped_by_sigterm_then_killed_leaves_nothing_running_and_each_rerun_resumes(s3, assets, tmp_path):
    """SIGTERM (Airflow's cancel, a pod's deletion): a clean stop. Then SIGKILL of the rerun's driver (a node
    gone, an OOM kill): the local Ray it started goes with it. The last rerun finishes the pass."""
    config = write_config(tmp_path / "job.yaml", assets, storage=f"{s3}/runs", name="stop-driver")
    epochs = 20  # cached head epochs take well under a second: enough of them to still be training at the signal
    command = (config, "--pass", "head", "--set", f"head.epochs={epochs}")
    job = Job(*command)
    job.wait_for(f"head epoch 1/{epochs}")
    workers = ray_train_worker_pids(job)
    assert len(workers) == 2, workers
    job.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code, stderr = job.finish(timeout=120)
    stop_s = time.monotonic() - signalled
    assert code == 143, stderr[-3000:]
    summary = json.loads(job.lines[-1])
    assert {k: summary[k] for k in ("status", "run", "pass", "exit_code")} == {
        "status": "interrupted",
        "run": "stop-driver",
        "pass": "head",
        "exit_code": 143,
    }
    assert summary["error"].startswith(f"head stopped by SIGTERM; latest good checkpoint: {s3}/runs/stop-driver/head/")
    assert summary["error"].endswith("; rerun to resume from it")
    assert stderr.strip().splitlines()[-1] == f"error: {summary['error']}"
    assert_gone(workers, within_s=10)
    assert not storage.exists(f"{s3}/runs/stop-driver/export/head/manifest.json")

    job = Job(*command)
    job.wait_for("head: resuming after epoch")
    resumed = int(job.first("head: resuming after epoch").split()[4])
    assert resumed >= 1
    job.wait_for(f"head epoch {resumed + 1}/{epochs}")
    workers = ray_train_worker_pids(job)
    job.process.send_signal(signal.SIGKILL)
    job.finish()
    assert_gone(workers, within_s=20)  # nothing trains on unseen

    started = time.monotonic()
    result = run_cli(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("head: resuming after epoch"))
    after = int(line.split()[4])
    assert after > resumed
    assert f"head epoch {after}/{epochs}" not in result.stdout and f"head epoch {epochs}/{epochs}" in result.stdout
    history = metrics_of(f"{s3}/runs/stop-driver/export/head")["history"]
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    print(
        f"SIGTERM: the driver exited {stop_s:.1f} s after the signal; after SIGKILL the last rerun took "
        f"{time.monotonic() - started:.1f} s for {epochs - after} epochs"
    )


def assert_gone(pids: list[int], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(map(running, pids)), [pid for pid in pids if running(pid)]
