"""Datasets and run storage on a real S3 endpoint (moto's server on loopback), read by real Ray workers."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli, upload, write_bad_parquet, write_config, write_hf_parquet
from transfer import storage
from transfer.data import parquet
from transfer.data.plan import plan_dataset


@pytest.fixture(scope="module")
def s3_train(s3, assets, tmp_path_factory):
    """The test assets' 3 Parquet files (uneven row groups) plus one file of bad records, on S3."""
    bad = str(tmp_path_factory.mktemp("bad") / "part-bad.parquet")
    write_bad_parquet(bad)
    upload(assets["train"], f"{s3}/parquet/train")
    upload(bad, f"{s3}/parquet/train/part-bad.parquet")
    return f"{s3}/parquet/train/"


@pytest.fixture(scope="module")
def s3_folder(s3, assets):
    """An image folder <root>/<class>/<file>.jpg on S3, from the test assets' JPEGs."""
    table = pq.read_table(assets["train"])
    for i, (image, label) in enumerate(zip(table["image"].to_pylist(), table["label"].to_pylist(), strict=True)):
        storage.write_bytes(f"{s3}/folder/{label}/{i:04d}.jpg", image)
    return f"{s3}/folder"


def test_s3_and_local_copies_plan_the_same_shards_and_steps(s3_train, assets, tmp_path):
    local = str(tmp_path / "train")
    os.makedirs(local)
    for file in storage.list_files(s3_train, (".parquet",)):
        with open(os.path.join(local, os.path.basename(file)), "wb") as f:
            f.write(storage.read_bytes(file))
    plans = [plan_dataset(parquet.scan(loc, "image", "label"), None, 0.2, 2, seed=0) for loc in (s3_train, local)]

    def shape(plan):
        return [[(os.path.basename(u.file), u.row_group, u.rows) for u in shard] for shard in plan.train.shards]

    assert shape(plans[0]) == shape(plans[1])
    assert plans[0].steps_per_epoch(16) == plans[1].steps_per_epoch(16)
    assert plans[0].left_out == [f"{s3_train}part-bad.parquet: row 3: label is null"]


@pytest.mark.integration
def test_parquet_on_s3_with_bad_records_trains_on_2_workers_into_s3_storage(s3, s3_train, assets, tmp_path):
    config = write_config(tmp_path / "job.yaml", assets, storage=f"{s3}/runs", name="s3-parquet")
    # A separate, clean validation set: every bad record is then in the training shards, all read each epoch.
    validation = upload(os.path.join(assets["train"], "part-002.parquet"), f"{s3}/parquet/val/part.parquet")
    result = run_cli(
        config, "--pass", "head", "--set", f"data.train={s3_train}", "--set", f"data.validation={validation}",
        "--set", "head.epochs=2",
        # A head search on S3 storage whose trials (1 epoch at a tiny learning rate) cannot beat the head.
        "--set", "head.search.trials=2", "--set", "head.search.epochs=[1]",
        "--set", "head.search.learning_rate=[1.0e-5, 1.0e-5]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "data: 1 rows left out, for example s3://transfer-test/parquet/train/part-bad.parquet: row 3" in result.stdout
    )
    assert "bad records skipped" in result.stdout

    export = f"{s3}/runs/s3-parquet/export/head"
    assert storage.exists(f"{export}/manifest.json") and storage.exists(f"{export}/model.keras")
    metrics = json.loads(storage.read_text(f"{export}/metrics.json"))
    bad = metrics["bad_records"]
    assert (bad["left_out_while_planning"], bad["found_while_reading"]) == (1, 3)
    # Each bad record counted once, in the epoch that first met it, although every epoch skips it again.
    assert [row["bad_records"] for row in metrics["history"]] == [3, 0]
    assert result.stdout.count("| 3 bad records skipped") == 1
    reasons = "\n".join(bad["examples"])
    assert "row group 0 row 0: empty image" in reasons and "row group 0 row 1: not a decodable image" in reasons
    assert metrics["final"]["val_accuracy"] >= 0.5
    assert storage.list_files(f"{s3}/runs/s3-parquet/head", ("state.json",))  # checkpoints on S3
    assert len(storage.list_files(f"{s3}/runs/s3-parquet/features", (".parquet",))) == 4  # 2 splits, 2 workers
    trials = json.loads(storage.read_text(f"{export}/search.json"))
    assert [t["chosen"] for t in trials] == [True, False, False]  # the configured head stays the export
    assert "head search: 2 trials in" in result.stdout and "best: configured" in result.stdout


@pytest.mark.integration
def test_image_folder_on_s3_trains_on_2_workers(s3, s3_folder, assets, tmp_path):
    config = write_config(tmp_path / "job.yaml", assets, storage=str(tmp_path / "runs"), name="s3-folder")
    result = run_cli(
        config, "--pass", "head", "--set", "data.format=images", "--set", f"data.train={s3_folder}",
        "--set", "head.epochs=2",
        # A head search on S3 storage whose trials (1 epoch at a tiny learning rate) cannot beat the head.
        "--set", "head.search.trials=2", "--set", "head.search.epochs=[1]",
        "--set", "head.search.learning_rate=[1.0e-5, 1.0e-5]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["passes"]["head"]["final"]["val_accuracy"] >= 0.6
    labels = json.loads((tmp_path / "runs" / "s3-folder" / "export" / "head" / "labels.json").read_text())
    assert labels == ["checker", "cross", "diamond", "dots", "ring"]


@pytest.mark.integration
def test_bad_records_fail_stops_naming_the_record(s3, s3_train, assets, tmp_path):
    config = write_config(tmp_path / "job.yaml", assets, storage=str(tmp_path / "runs"), name="fail")
    # The null label is found while planning; replace it so the first bad record is met while reading.
    table = pq.read_table(
        storage.read_bytes(f"{s3_train}part-bad.parquet")
        and pa.BufferReader(storage.read_bytes(f"{s3_train}part-bad.parquet"))
    )
    table = table.set_column(1, "label", pa.array([v or "ring" for v in table["label"].to_pylist()]))
    target = f"{s3}/failing/train/"
    storage.write_bytes(f"{target}part-bad.parquet", _parquet_bytes(table))
    storage.write_bytes(f"{target}part-000.parquet", storage.read_bytes(f"{s3_train}part-000.parquet"))
    result = run_cli(
        config, "--pass", "head", "--set", f"data.train={target}", "--set", "data.bad_records=fail",
        "--set", "scaling.max_failures=2",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    assert "error: data.bad_records is fail: s3://transfer-test/failing/train/part-bad.parquet row group 0 row" in (
        result.stderr
    )
    # The same data fails the same way on every try: no worker-group restart first.
    assert "worker group restarted" not in result.stdout


HF_NAMES = ["ring", "cross", "diamond", "checker", "dots"]  # ClassLabel order, not sorted


def _write_hf_split(assets: dict[str, str], files: list[str], folder: str, no_label: int = 0) -> str:
    """The assets' rows of `files` as a Parquet file written by `datasets`: a ClassLabel of HF_NAMES, every 8th
    image saved beside the file and named by a relative path, the first `no_label` rows labelled -1."""
    table = pq.read_table([os.path.join(assets["train"], f) for f in files])
    labels = [HF_NAMES.index(name) for name in table["label"].to_pylist()]
    labels[:no_label] = [-1] * no_label
    os.makedirs(folder)
    path = os.path.join(folder, "data.parquet")
    return write_hf_parquet(path, table["image"].to_pylist(), labels, HF_NAMES, range(0, len(labels), 8))


@pytest.mark.integration
def test_hugging_face_parquet_on_s3_trains_with_its_class_names(s3, assets, tmp_path):
    """Parquet written by `datasets` (Image bytes and paths, ClassLabel, -1 for no label) needs no configuration:
    training data on S3, validation data local, both mapped to the same classes by their ClassLabel names."""
    train = _write_hf_split(assets, ["part-000.parquet", "part-001.parquet"], str(tmp_path / "train"), no_label=3)
    upload(os.path.dirname(train), f"{s3}/hf/train")  # the Parquet file and its images/ folder
    validation = _write_hf_split(assets, ["part-002.parquet"], str(tmp_path / "validation"))
    config = write_config(
        tmp_path / "job.yaml", assets, storage=str(tmp_path / "runs"), name="hf",
        data={"train": f"{s3}/hf/train/", "validation": validation}, head={"epochs": 2},
    )  # fmt: skip
    result = run_cli(config, "--pass", "head")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data: 3 rows left out, for example {s3}/hf/train/data.parquet: row 0: label is -1 (no label)" in (
        result.stdout
    )
    export = tmp_path / "runs" / "hf" / "export" / "head"
    assert json.loads((export / "labels.json").read_text()) == HF_NAMES
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["bad_records"]["found_while_reading"] == 0  # every image read, from bytes or from its path
    assert metrics["final"]["val_accuracy"] >= 0.6  # 5 classes: chance is 0.2


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=4)
    return sink.getvalue().to_pybytes()


# Every data error below ends before any worker starts: exit 3 and one line naming the place at fault.


def data_error(config: str, *sets: str) -> str:
    args = [config]
    for item in sets:
        args += ["--set", item]
    result = run_cli(*args, timeout=120)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


@pytest.fixture
def config(assets, tmp_path):
    return write_config(tmp_path / "job.yaml", assets, storage=str(tmp_path / "runs"), name="errors")


def test_missing_column_on_s3(config, s3_train):
    line = data_error(config, f"data.train={s3_train}", "data.image_column=img")
    assert line == (f"error: data.image_column: {s3_train}part-000.parquet: no column 'img' (columns: image, label)")


def test_mistyped_column_on_s3(config, s3, tmp_path):
    pq.write_table(pa.table({"image": [1, 2], "label": ["a", "b"]}), tmp_path / "t.parquet")
    upload(str(tmp_path / "t.parquet"), f"{s3}/mistyped/t.parquet")
    line = data_error(config, f"data.train={s3}/mistyped/")
    assert line.startswith(f"error: data.image_column: {s3}/mistyped/t.parquet: column 'image' is int64, expected")


def test_empty_dataset_on_s3(config, s3):
    storage.write_bytes(f"{s3}/empty/readme.txt", b"no data here")
    assert data_error(config, f"data.train={s3}/empty/") == f"error: data.train: {s3}/empty/: no Parquet files found"


def test_class_folder_without_images(config, s3, s3_folder):
    storage.write_bytes(f"{s3}/folder2/ring/a.jpg", storage.read_bytes(f"{s3_folder}/ring/" + "0000.jpg")
                        if storage.exists(f"{s3_folder}/ring/0000.jpg") else _first_jpeg(s3_folder))  # fmt: skip
    storage.write_bytes(f"{s3}/folder2/cross/notes.txt", b"")
    line = data_error(config, "data.format=images", f"data.train={s3}/folder2")
    assert line == f"error: data.train: class 'cross' ({s3}/folder2/cross/) has no images"


def _first_jpeg(folder: str) -> bytes:
    return storage.read_bytes(storage.list_files(folder, (".jpg",))[0])


def test_validation_label_unknown_to_training(config, s3, s3_train, tmp_path):
    table = pq.read_table(pa.BufferReader(storage.read_bytes(f"{s3_train}part-000.parquet"))).slice(0, 10)
    table = table.set_column(1, "label", pa.array(["zebra"] * 10))
    storage.write_bytes(f"{s3}/val/part.parquet", _parquet_bytes(table))
    line = data_error(config, f"data.train={s3_train}", f"data.validation={s3}/val/")
    assert line == "error: data.validation: label 'zebra' does not occur in data.train"


def test_labels_of_different_types_on_s3(config, s3, tmp_path):
    for name, labels in (("a", [1, 2]), ("b", ["1", "2"])):
        pq.write_table(pa.table({"image": [b"x"] * 2, "label": labels}), tmp_path / f"{name}.parquet")
        upload(str(tmp_path / f"{name}.parquet"), f"{s3}/mixed/{name}.parquet")
    line = data_error(config, f"data.train={s3}/mixed/")
    assert line == (
        f"error: data.train: {s3}/mixed/b.parquet: labels are string, but int in {s3}/mixed/a.parquet: "
        "all files need one label type"
    )


def test_bucket_that_does_not_exist(config, s3):
    line = data_error(config, "data.train=s3://no-such-bucket/train/")
    assert line.startswith("error: data.train: s3://no-such-bucket/train/: cannot list:")
    assert "does not exist" in line


def test_missing_credentials_are_named_and_no_secret_is_echoed(config, s3_train, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws profile either
    line = data_error(config, f"data.train={s3_train}")
    assert line.startswith(f"error: data.train: {s3_train}: cannot list: no AWS credentials found")
    line = data_error(config, "data.train=s3://AKIDEXAMPLE:wJalrXUtnFEMI@no-such-bucket/train/")
    assert "wJalrXUtnFEMI" not in line and "AKIDEXAMPLE" not in line
