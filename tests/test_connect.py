"""Which Ray the job joins: a head recorded on this machine that has died, a RAY_ADDRESS nothing answers at.

Ray finds the recorded head in `<temp root>/ray/ray_current_cluster` (the temp root is /tmp, or RAY_TMPDIR).
Each test gives its subprocess a temp root of its own, so the record it writes is seen by no other Ray on this
machine and no other Ray's record is seen by it.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, run_cli

CONNECT = """
import ray
from transfer.job import connect_ray
connect_ray(verbose=False)
print("joined", ray.get_runtime_context().gcs_address, flush=True)
"""


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stale_record():
    """A Ray temp root whose ray_current_cluster names a head that is gone: a free loopback port."""
    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths under it must fit 107 bytes
    os.makedirs(os.path.join(root, "ray"))
    record = os.path.join(root, "ray", "ray_current_cluster")
    head = f"127.0.0.1:{free_port()}"
    with open(record, "w") as f:
        f.write(head)
    yield {"root": root, "record": record, "head": head}
    shutil.rmtree(root, ignore_errors=True)


def test_a_recorded_head_that_is_gone_starts_a_local_ray_and_says_why(stale_record):
    env = {**os.environ, "RAY_TMPDIR": stale_record["root"]}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", CONNECT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"ray: the head recorded in {stale_record['record']} ({stale_record['head']}) does not answer; "
        "starting a local Ray"
    )
    assert lines[1].startswith("joined 127.0.0.1:") and lines[1] != f"joined {stale_record['head']}"
    assert seconds < 60  # the local Ray's start (~5-10 s here), not minutes of retries
    print(f"stale head record: connected to a new local Ray in {seconds:.1f} s")


def test_a_ray_address_nothing_answers_at_exits_1_in_seconds_naming_it(tmp_path, monkeypatch):
    data = tmp_path / "train.parquet"  # planned only: the job stops before any image is read
    pq.write_table(pa.table({"image": [b"x"] * 64, "label": ["a", "b"] * 32}), data)
    config = tmp_path / "job.yaml"
    config.write_text(
        f"run: {{storage: {tmp_path}/runs}}\ndata: {{train: {data}}}\n"
        "model: {backbone: demo_cnn, weights: none}\nhead: {batch_size: 4}\n"
    )
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)  # run_cli's subprocess inherits it
    started = time.monotonic()
    result = run_cli(str(config), "--pass", "head", timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: RAY_ADDRESS={address}: no Ray head answers at {address}"
    assert seconds < 30  # planning and TensorFlow's import (~5 s each on a loaded machine), then 2 s at most
    print(f"dead RAY_ADDRESS: exit 1 after {seconds:.1f} s")
