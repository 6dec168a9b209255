"""Shared fixtures: a small demo-like dataset and an offline-pretrained backbone, made once per test session."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

# Every Ray the tests start (ray.init's local cluster, Cluster nodes, the CLI's and its workers') binds 127.0.0.1,
# not this machine's network address: tests talk to loopback only. Set before Ray is imported anywhere.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Hugging Face `datasets` (used to write test data) must never reach for the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
# MLflow 3 refuses its file store (in maintenance) unless told: the tests track runs to one, with no server.
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"

import transfer  # noqa: E402, F401  (selects tf-keras before TensorFlow loads)
from tests.moto_s3 import start_moto_s3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AIRFLOW_VENV = os.path.join(REPO, ".venv-airflow")
_airflow_venv: Future | None = None  # .venv-airflow being made, from the end of collection on


def pytest_collection_finish(session: pytest.Session) -> None:
    """Starts making .venv-airflow (about 2 minutes of pip) in the background while the tests before the DAG's
    run, when a collected test needs it."""
    global _airflow_venv
    if any("airflow_python" in getattr(item, "fixturenames", ()) for item in session.items):
        _airflow_venv = ThreadPoolExecutor(1, thread_name_prefix="airflow-venv").submit(make_airflow_venv)


@pytest.fixture(scope="session")
def airflow_python() -> str:
    """The Python of .venv-airflow: Airflow 3 and Ray's job client, no TensorFlow, not this package."""
    return (_airflow_venv or ThreadPoolExecutor(1).submit(make_airflow_venv)).result()


def make_airflow_venv() -> str:
    """Makes .venv-airflow from jobs/dags/requirements.txt when missing or out of date; returns its Python."""
    requirements = os.path.join(REPO, "jobs", "dags", "requirements.txt")
    with open(requirements, "rb") as f:
        wanted = hashlib.sha256(f.read()).hexdigest()
    stamp = os.path.join(AIRFLOW_VENV, "requirements.sha256")  # written last: a half-made venv has none
    python = os.path.join(AIRFLOW_VENV, "bin", "python")
    if not os.path.exists(stamp) or open(stamp).read() != wanted:
        shutil.rmtree(AIRFLOW_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", AIRFLOW_VENV], check=True)
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", requirements]
        result = subprocess.run(pip, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(stamp, "w") as f:
            f.write(wanted)
    return python


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, str]:
    """600 JPEGs of the 5 demo classes in 3 Parquet files with uneven row groups, and demo_cnn weights."""
    from transfer import demo

    root = tmp_path_factory.mktemp("assets")
    train = str(root / "train")
    demo.write_parquet_dataset(train, per_class=120, seed=3, files=((0.5, 70), (0.3, 45), (0.2, 100)))
    weights = str(root / "demo_cnn.h5")
    demo.pretrain_backbone(weights)
    return {"train": train, "weights": weights}


def write_config(path, assets: dict[str, str], storage: str, name: str, **sections) -> str:
    """A small 2-worker config over the test assets; keyword sections update the defaults below."""
    import yaml

    config = {
        "run": {"name": name, "storage": storage},
        "data": {"train": assets["train"], "validation_split": 0.2, "image_size": [64, 64]},
        "model": {"backbone": "demo_cnn", "weights": assets["weights"], "dropout": 0.1},
        "head": {"epochs": 3, "learning_rate": 3.0e-3, "batch_size": 16},
        "finetune": {"epochs": 2, "learning_rate": 1.0e-4, "unfreeze": "block3_conv"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def finished_run(assets, tmp_path_factory):
    """Both passes of a small run; its stdout and where it left its outputs."""
    root = tmp_path_factory.mktemp("job")
    # Progress lines at every batch, not every 30 s: these phases take a second.
    tracking = f"file://{root}/mlruns"  # MLflow's file store
    config = write_config(
        root / "job.yaml",
        assets,
        storage=str(root / "runs"),
        name="shapes",
        run={"progress_every_s": 0, "mlflow_tracking_uri": tracking},
    )
    result = run_cli(config)
    run = root / "runs" / "shapes"
    return {"config": config, "result": result, "summary": summary_of(result), "run": run, "mlflow": tracking}


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python -m jobs.train ARGS` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def s3():
    """A real S3 endpoint on loopback (moto's server), with this process's environment pointed at it.

    Subprocesses (the CLI, its Ray workers) inherit the endpoint and the test credentials.
    """
    server, env = start_moto_s3()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="transfer-test")
    yield "s3://transfer-test"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.terminate()
    server.wait(timeout=10)


def upload(local: str, uri: str) -> str:
    """Copies a local file or folder to a URI."""
    from transfer import storage

    if os.path.isdir(local):
        storage.upload_dir(local, uri)
    else:
        with open(local, "rb") as f:
            storage.write_bytes(uri, f.read())
    return uri


def write_bad_parquet(path: str) -> dict[str, int]:
    """A Parquet file of 7 rows with every kind of bad record, and good ones: grayscale, RGBA, palette PNGs."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    from transfer import demo

    rng = np.random.default_rng(0)
    jpeg = tf.io.encode_jpeg(demo.draw("ring", rng, 64)).numpy()
    gray = tf.io.encode_png(demo.draw("cross", rng, 40)[..., :1]).numpy()
    rgba = tf.io.encode_png(np.concatenate([demo.draw("dots", rng, 50), np.full((50, 50, 1), 128, np.uint8)], -1))
    from PIL import Image

    palette = io.BytesIO()
    Image.fromarray(demo.draw("diamond", rng, 70)).convert("P").save(palette, format="PNG")
    images = [b"", b"not an image", jpeg[: len(jpeg) // 2], jpeg, gray, rgba.numpy(), palette.getvalue()]
    labels = ["ring", "ring", "ring", None, "cross", "dots", "diamond"]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), path, row_group_size=4)
    return {"unreadable": 3, "null_labels": 1, "good": 3}


def write_validation_folder(config: str, root) -> dict:
    """A run's validation rows (numbered 0..n-1, with their labels) and a file of bad records (numbered -1..-7),
    as the Parquet folder `root/data` a user would predict."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from transfer.config import load_config
    from transfer.job import plan_data

    plan = plan_data(load_config(config))[2]
    parts = [
        pq.ParquetFile(unit.file).read_row_group(unit.row_group, columns=["image", "label"]).take(list(unit.rows))
        for shard in plan.validation.shards
        for unit in shard
    ]
    rows = pa.concat_tables(parts)
    data = root / "data"
    data.mkdir(parents=True)
    pq.write_table(rows.append_column("row", pa.array(range(len(rows)), pa.int64())), data / "validation.parquet")
    write_bad_parquet(str(root / "bad.parquet"))
    bad = pq.read_table(root / "bad.parquet")
    pq.write_table(bad.append_column("row", pa.array(range(-1, -len(bad) - 1, -1), pa.int64())), data / "bad.parquet")
    return {"data": data, "rows": len(rows), "root": root}


def write_hf_parquet(
    path: str, images: list[bytes], labels: list[int], names: list[str], as_paths=(), rows_per_group: int = 50
) -> str:
    """A Parquet file written by Hugging Face `datasets` itself: an Image column and a ClassLabel column.

    Each image is held as bytes, or, for the rows in `as_paths`, saved as a file beside the Parquet file and
    named by a path relative to it (how `datasets` refers to images it did not embed). -1 labels mean no label.
    """
    import datasets

    datasets.disable_progress_bars()
    folder = os.path.dirname(path)
    cells = []
    for row, data in enumerate(images):
        if row in as_paths:
            relative = f"images/{row:04d}.jpg"
            os.makedirs(os.path.join(folder, "images"), exist_ok=True)
            with open(os.path.join(folder, relative), "wb") as f:
                f.write(data)
            cells.append({"bytes": None, "path": relative})
        else:
            cells.append({"bytes": data, "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    dataset = datasets.Dataset.from_dict({"image": cells, "label": labels}, features=features)
    dataset.to_parquet(path, batch_size=rows_per_group)  # a batch per row group
    return path
