"""transfer-predict end to end on a real local Ray (a pool of 2 actors): an image manifest on S3. Its run on a
Parquet folder, checked against the export's evaluation, is the Airflow DAG's predict task (test_ray_jobs.py)."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, summary_of, write_validation_folder
from transfer.errors import ConfigError, DataError


def run_predict(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python -m jobs.predict ARGS` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.predict", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def validation_data(finished_run, tmp_path_factory) -> dict:
    return write_validation_folder(finished_run["config"], tmp_path_factory.mktemp("predict"))


@pytest.mark.integration
def test_predicts_an_image_manifest_on_s3_passing_its_columns_through(finished_run, s3, tmp_path):
    from transfer import demo, storage

    # Images the model never saw (another seed than the assets'), as objects <class>/<n>.jpg beside the manifest.
    demo.write_parquet_dataset(str(tmp_path / "held_out"), per_class=5, seed=11, files=((1.0, 50),))
    held_out = pq.read_table(tmp_path / "held_out" / "part-000.parquet").to_pylist()
    files = [f"{row['label']}/{i}.jpg" for i, row in enumerate(held_out)]
    for file, row in zip(files, held_out, strict=True):
        storage.write_bytes(f"{s3}/predict/images/{file}", row["image"])
    lines = ["file,id"] + [f"images/{f},{i}" for i, f in enumerate(files)] + ["images/ring/missing.jpg,900", ",901"]
    manifest = f"{s3}/predict/manifest.csv"
    storage.write_bytes(manifest, ("\n".join(lines) + "\n").encode())
    out = f"{s3}/predict/out"
    export = finished_run["run"] / "export" / "head"
    result = run_predict(
        "--model",
        str(export),
        "--data",
        manifest,
        "--format",
        "images",
        "--image-column",
        "file",
        "--out",
        out,
        "--workers",
        "2",
        "--batch-size",
        "8",
    )
    summary = summary_of(result)
    assert summary["rows"] == len(files) + 2 and summary["errors"] == 2 and summary["out"] == out
    table = pq.read_table(storage.resolve(out)[1], filesystem=storage.resolve(out)[0])
    assert table.column_names == ["file", "id", "prediction", "probability", "top_k", "error"]
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert by_id[900]["file"] == f"{s3}/predict/images/ring/missing.jpg" and by_id[900]["error"].startswith(
        "cannot read"
    )
    assert by_id[901]["file"] is None and by_id[901]["error"] == "no image"
    right = [by_id[i]["prediction"] == f.split("/")[0] for i, f in enumerate(files)]
    assert np.mean(right) >= 0.7  # images the model never saw; chance is 0.2


def test_bad_requests_are_refused_before_ray_starts_and_touch_nothing(finished_run, validation_data, tmp_path):
    from transfer.predict import Request, plan_prediction

    export, data = str(finished_run["run"] / "export" / "finetune"), str(validation_data["data"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_predict("--model", export, "--data", data, "--out", str(out))
    assert result.returncode == 2 and "holds notes.txt, which is no prediction output" in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "failed"
    assert (out / "notes.txt").read_text() == "mine"

    with pytest.raises(DataError, match="--model: .* is not a complete export"):
        plan_prediction(Request(str(finished_run["run"] / "export"), data, str(tmp_path / "new")))
    with pytest.raises(DataError, match=r"--image-column: .*: no column 'picture' \(columns: image, label, row\)"):
        plan_prediction(Request(export, data, str(tmp_path / "new"), image_column="picture"))
    with pytest.raises(ConfigError, match="--out: .* and --data overlap"):
        plan_prediction(Request(export, data, str(validation_data["data"] / "predictions")))
