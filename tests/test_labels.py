"""Labels and image columns as datasets hold them: Hugging Face `datasets` Parquet (Image structs, ClassLabel names,
-1 for no label), integer labels in Parquet and CSV manifests, and labels of different types in different files."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from tests.conftest import run_cli, write_config, write_hf_parquet
from transfer.data import images, parquet
from transfer.data.parquet import image_cells
from transfer.data.pipeline import make_dataset
from transfer.data.plan import plan_dataset
from transfer.errors import DataError

BRIGHTNESS = {"dark": 20, "mid": 128, "light": 235}
NAMES = ["light", "dark", "mid"]  # ClassLabel order, not sorted: the names must come from the schema


def flat_jpeg(value: int, size: int = 24) -> bytes:
    return tf.io.encode_jpeg(np.full((size, size, 3), value, np.uint8)).numpy()


def brightness_of(class_names: list[str], labels: list) -> list[bytes]:
    """One flat JPEG per row whose brightness tells its class, so a test can see a row reached the right class."""
    return [flat_jpeg(BRIGHTNESS[class_names[label]] if label >= 0 else 128) for label in labels]


def read_all(plan, split):
    """Every (image brightness, class name) the real pipeline yields for worker 0 of `split`."""
    ds = make_dataset(
        split.shards[0], split.rows_per_worker, plan.label_keys, "image", "label", (16, 16), 4, training=False
    )
    batches = [(batch.numpy(), classes.numpy()) for batch, classes in ds]
    return [
        (float(image.mean()), plan.classes[c])
        for batch, classes in batches
        for image, c in zip(batch, classes, strict=True)
    ]


@pytest.fixture
def hf_file(tmp_path):
    """12 rows written by `datasets`: half as bytes, half as image files beside the Parquet; one row without a
    label (-1)."""
    labels = [0, 1, 2] * 4
    labels[5] = -1
    path = str(tmp_path / "hf" / "train.parquet")
    os.makedirs(os.path.dirname(path))
    return write_hf_parquet(path, brightness_of(NAMES, labels), labels, NAMES, as_paths=range(6, 12), rows_per_group=5)


def test_image_cells_give_bytes_uris_or_none_for_every_column_kind(tmp_path):
    file = "s3://bucket/data/part-0.parquet"
    assert image_cells(pa.array([b"a", None], pa.binary()), file) == [b"a", None]
    assert image_cells(pa.array([b"a"], pa.large_binary()), file) == [b"a"]
    assert image_cells(pa.array(["s3://b/x.jpg", None], pa.string()), file) == ["s3://b/x.jpg", None]
    assert image_cells(pa.array(["/x.jpg"], pa.large_string()), file) == ["/x.jpg"]
    struct = pa.array(
        [
            {"bytes": b"jpeg", "path": "ignored.jpg"},  # bytes win
            {"bytes": None, "path": "images/1.jpg"},  # relative to the Parquet file's folder
            {"bytes": None, "path": "/abs/2.jpg"},
            {"bytes": None, "path": "gs://other/3.jpg"},
            {"bytes": None, "path": None},
            None,
        ],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    assert image_cells(pa.chunked_array([struct[:2], struct[2:]]), file) == [
        b"jpeg",
        "s3://bucket/data/images/1.jpg",
        "/abs/2.jpg",
        "gs://other/3.jpg",
        None,
        None,
    ]


def test_image_cells_of_a_column_written_by_datasets(hf_file):
    cells = image_cells(pq.read_table(hf_file).column("image"), hf_file)
    assert all(isinstance(c, bytes) for c in cells[:6])
    assert cells[6:] == [os.path.join(os.path.dirname(hf_file), f"images/{r:04d}.jpg") for r in range(6, 12)]


def test_hugging_face_parquet_is_read_with_class_names_and_no_label_rows_left_out(hf_file):
    index = parquet.scan(hf_file, "image", "label")
    assert index.left_out == [f"{hf_file}: row 5: label is -1 (no label)"]
    plan = plan_dataset(index, index, 0.0, 1, seed=0)  # every labelled row in training and validation
    assert plan.classes == NAMES  # names, in ClassLabel order: what labels.json gets
    assert plan.label_keys == ["0", "1", "2"]
    seen = read_all(plan, plan.validation)
    assert len(seen) == 11  # bytes rows and path rows alike; the -1 row left out
    assert all(abs(mean - BRIGHTNESS[name]) < 6 for mean, name in seen)
    with pytest.raises(DataError, match=r"data.train: .*train.parquet: row 5: label is -1 \(no label\)"):
        parquet.scan(hf_file, "image", "label", bad_records="fail")


def test_class_names_are_those_of_the_labels_that_occur_in_class_label_order(tmp_path):
    names = ["zebra", "ant", "cow", "bee"]
    labels = [3, 0, 3, 0]  # no "ant", no "cow"
    path = write_hf_parquet(str(tmp_path / "d.parquet"), [b"x"] * 4, labels, names)
    index = parquet.scan(path, "image", "label")
    plan = plan_dataset(index, index, 0.0, 1, seed=0)
    assert (plan.classes, plan.label_keys) == (["zebra", "bee"], ["0", "3"])


def test_separate_validation_maps_class_label_names_as_training_does(tmp_path, hf_file):
    labels = [2, 1, 0, 2]
    path = write_hf_parquet(str(tmp_path / "val.parquet"), brightness_of(NAMES, labels), labels, NAMES)
    train = parquet.scan(hf_file, "image", "label")
    plan = plan_dataset(train, parquet.scan(path, "image", "label", "data.validation"), 0.0, 1, seed=0)
    seen = read_all(plan, plan.validation)
    assert [name for _, name in seen] == ["mid", "dark", "light", "mid"]
    assert all(abs(mean - BRIGHTNESS[name]) < 6 for mean, name in seen)

    reordered = write_hf_parquet(str(tmp_path / "other.parquet"), [b"x"] * 2, [0, 1], ["dark", "light", "mid"])
    with pytest.raises(DataError) as error:
        plan_dataset(train, parquet.scan(reordered, "image", "label", "data.validation"), 0.0, 1, seed=0)
    assert str(error.value) == (
        f"data.validation: {reordered}: the ClassLabel names differ: label 0 is 'dark' here, 'light' in {hf_file}"
    )


def test_a_class_label_outside_its_names_is_refused(tmp_path):
    path = tmp_path / "d.parquet"
    write_hf_parquet(str(path), [b"x"] * 2, [0, 1], ["a", "b"])
    table = pq.read_table(path)  # the schema (and its names) kept, a label changed behind it
    pq.write_table(table.set_column(1, "label", pa.array([0, 7])), path)
    with pytest.raises(DataError, match=r"data.train: .*d.parquet: row 1: label is 7, but its ClassLabel has 2 names"):
        parquet.scan(str(path), "image", "label")


def test_integer_labels_sort_as_numbers_and_map_to_their_class(tmp_path):
    labels = [10, 2, 1, 10, 2, 1]
    classes = {1: "dark", 2: "mid", 10: "light"}
    table = pa.table({"image": [flat_jpeg(BRIGHTNESS[classes[v]]) for v in labels], "label": labels})
    pq.write_table(table, tmp_path / "ints.parquet")
    index = parquet.scan(str(tmp_path / "ints.parquet"), "image", "label")
    assert index.label_type.kind == "int"
    plan = plan_dataset(index, index, 0.0, 1, seed=0)
    assert plan.classes == plan.label_keys == ["1", "2", "10"]
    seen = read_all(plan, plan.validation)
    assert all(abs(mean - BRIGHTNESS[classes[int(name)]]) < 6 for mean, name in seen) and len(seen) == 6
    # -1 is an ordinary int label in a column that is no ClassLabel
    pq.write_table(pa.table({"image": [b"x"] * 2, "label": [-1, 3]}), tmp_path / "minus.parquet")
    assert parquet.scan(str(tmp_path / "minus.parquet"), "image", "label").class_keys() == ["-1", "3"]


def test_labels_of_different_types_in_different_files_stop_naming_both(tmp_path):
    pq.write_table(pa.table({"image": [b"x"] * 2, "label": [1, 2]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [b"x"] * 2, "label": ["1", "2"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError) as error:
        parquet.scan(str(tmp_path), "image", "label")
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert str(error.value) == f"data.train: {b}: labels are string, but int in {a}: all files need one label type"

    train = parquet.scan(str(a), "image", "label")
    validation = parquet.scan(str(b), "image", "label", "data.validation")
    with pytest.raises(DataError, match=f"data.validation: {b}: labels are string, but int in {a}"):
        plan_dataset(train, validation, 0.0, 1, seed=0)
    class_labels = write_hf_parquet(str(tmp_path / "hf" / "c.parquet"), [b"x"] * 2, [0, 1], ["1", "2"])
    with pytest.raises(DataError, match=f"data.validation: .*c.parquet: labels are ClassLabel, but int in {a}"):
        plan_dataset(train, parquet.scan(class_labels, "image", "label", "data.validation"), 0.0, 1, seed=0)


def manifest_plan(tmp_path, csv: str, validation_csv: str | None = None):
    """Plans a CSV manifest as the job does: written as a Parquet manifest, then scanned naming the CSV."""

    def scan(text: str, name: str):
        source = tmp_path / f"{name}.csv"
        source.write_text(text)
        target = images.write_manifest(str(source), "image", "label", f"data.{name}", str(tmp_path / f"{name}.pq"))
        return parquet.scan(target, "image", "label", f"data.{name}", source=str(source))

    validation = scan(validation_csv, "validation") if validation_csv else None
    return plan_dataset(scan(csv, "train"), validation, 0.0, 1, seed=0)  # 1 row to validation without one


def test_csv_manifest_labels_that_are_whole_numbers_are_ints_sorted_as_numbers(tmp_path):
    plan = manifest_plan(tmp_path, "image,label\na.jpg,10\nb.jpg,2\nc.jpg,10\nd.jpg,2\ne.jpg,1\nf.jpg,1\n")
    assert plan.classes == plan.label_keys == ["1", "2", "10"]
    # Written otherwise than as a number, a label is text as written, sorted as text.
    plan = manifest_plan(tmp_path, "image,label\na.jpg,007\nb.jpg,10\nc.jpg,007\nd.jpg,10\n")
    assert plan.classes == ["007", "10"]


def test_parquet_manifest_int_labels_sort_as_numbers(tmp_path):
    source = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"image": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "label": [10, 2, 10, 2]}), source)
    target = images.write_manifest(str(source), "image", "label", "data.train", str(tmp_path / "m.pq"))
    index = parquet.scan(target, "image", "label", source=str(source))
    assert index.row_groups and plan_dataset(index, index, 0.0, 1, seed=0).classes == ["2", "10"]
    assert pq.read_table(target).column("image").to_pylist()[0] == str(tmp_path / "a.jpg")


def test_class_folders_named_by_whole_numbers_are_int_labels(tmp_path):
    for name in ("10", "2", "2", "10"):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{len(list(folder.iterdir()))}.jpg").write_bytes(b"x")
    target = images.write_manifest(str(tmp_path / "images"), "image", "label", "data.train", str(tmp_path / "m.pq"))
    index = parquet.scan(target, "image", "label")
    assert plan_dataset(index, index, 0.0, 1, seed=0).classes == ["2", "10"]


def test_csv_manifest_empty_label_is_left_out_naming_the_csv_row(tmp_path):
    plan = manifest_plan(tmp_path, "image,label\na.jpg,1\nb.jpg,\nc.jpg,2\nd.jpg,1\ne.jpg,2\n")
    assert plan.left_out == [f"{tmp_path / 'train.csv'}: row 1: label is null"]


def test_csv_manifests_with_int_and_text_labels_stop_naming_both_csvs(tmp_path):
    with pytest.raises(DataError) as error:
        manifest_plan(tmp_path, "image,label\na.jpg,1\nb.jpg,2\n", "image,label\nc.jpg,1\nd.jpg,two\n")
    train, validation = tmp_path / "train.csv", tmp_path / "validation.csv"
    assert str(error.value) == (
        f"data.validation: {validation}: labels are string, but int in {train}: all files need one label type"
    )


@pytest.mark.integration
def test_csv_manifest_with_integer_labels_trains_and_exports_them_in_numeric_order(assets, tmp_path):
    """Images named by a CSV manifest with integer labels, on 2 workers: labels.json in numeric order, and the
    model learns (each row reached its class)."""
    ints = {"checker": 10, "cross": 2, "diamond": 1, "dots": 20, "ring": 3}  # string order would differ
    table = pq.read_table(assets["train"])
    folder = tmp_path / "images"
    folder.mkdir()
    lines = ["path,label"]
    for i, (image, label) in enumerate(zip(table["image"].to_pylist(), table["label"].to_pylist(), strict=True)):
        (folder / f"{i:04d}.jpg").write_bytes(image)
        lines.append(f"images/{i:04d}.jpg,{ints[label]}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    config = write_config(
        tmp_path / "job.yaml", assets, storage=str(tmp_path / "runs"), name="ints",
        data={"format": "images", "train": str(manifest), "image_column": "path"}, head={"epochs": 2},
    )  # fmt: skip
    result = run_cli(config, "--pass", "head")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["passes"]["head"]["final"]["val_accuracy"] >= 0.6  # 5 classes: chance is 0.2
    labels = json.loads((tmp_path / "runs" / "ints" / "export" / "head" / "labels.json").read_text())
    assert labels == ["1", "2", "3", "10", "20"]
