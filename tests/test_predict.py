"""transfer-predict end to end on a real local Ray (a pool of 2 actors): Parquet locally, an image manifest on S3."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, summary_of, write_bad_parquet
from transfer.errors import ConfigError, DataError


def run_predict(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python -m jobs.predict ARGS` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.predict", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def validation_data(finished_run, tmp_path_factory) -> dict:
    """The finished run's validation rows (numbered 0..n-1) and a file of bad records (numbered -1..-7), as the
    Parquet folder a user would predict."""
    from transfer.config import load_config
    from transfer.job import plan_data

    plan = plan_data(load_config(finished_run["config"]))[2]
    parts = [
        pq.ParquetFile(unit.file).read_row_group(unit.row_group, columns=["image", "label"]).take(list(unit.rows))
        for shard in plan.validation.shards
        for unit in shard
    ]
    rows = pa.concat_tables(parts)
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    data.mkdir()
    pq.write_table(rows.append_column("row", pa.array(range(len(rows)), pa.int64())), data / "validation.parquet")
    write_bad_parquet(str(root / "bad.parquet"))
    bad = pq.read_table(root / "bad.parquet")
    pq.write_table(bad.append_column("row", pa.array(range(-1, -len(bad) - 1, -1), pa.int64())), data / "bad.parquet")
    return {"data": data, "rows": len(rows), "root": root}


@pytest.mark.integration
def test_predicts_every_row_of_a_parquet_folder_as_the_evaluation_did(finished_run, validation_data):
    export = finished_run["run"] / "export" / "finetune"
    out = validation_data["root"] / "predictions"
    out.mkdir()
    (out / "part-stale.parquet").write_bytes(b"an earlier run's file")  # a rerun replaces OUT whole
    result = run_predict(
        "--model", str(export), "--data", str(validation_data["data"]), "--out", str(out), "--workers", "2"
    )
    summary = summary_of(result)
    rows = validation_data["rows"]
    assert summary["rows"] == rows + 7 and summary["errors"] == 3 and summary["out"] == str(out)
    assert json.loads((out / "_SUCCESS.json").read_text())["rows"] == rows + 7
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
