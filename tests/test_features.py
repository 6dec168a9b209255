"""Persisted backbone features: read back whole by the run that made them, refused when made from anything else."""

import os

import numpy as np
import pytest

from transfer.config import from_dict
from transfer.data.features import StoredShard, read_split
from transfer.data.pipeline import BadRecords
from transfer.data.plan import DatasetPlan, Split, Unit
from transfer.errors import DataError

ROWS = 5000  # more than one row group (4096 rows)


def plan_of(rows: int = ROWS, file: str = "/data/train/part-0.parquet") -> DatasetPlan:
    def split(first: int) -> Split:
        return Split([[Unit(file, first, tuple(range(rows)), 1 << 20)]], rows)

    return DatasetPlan(["cat", "dog"], ["cat", "dog"], split(0), split(1))


def config(tmp_path, **model):
    return from_dict(
        {
            "run": {"name": "r", "storage": str(tmp_path / "runs")},
            "data": {"train": "/data/train", "image_size": [64, 64]},
            "model": {"backbone": "demo_cnn", "weights": "none", **model},
        }
    )


def shard(tmp_path, split: str = "validation", plan: DatasetPlan | None = None, **changes) -> StoredShard:
    cfg = config(tmp_path)
    raw = cfg.to_dict()
    for key, value in changes.items():
        section, name = key.split("__")
        raw[section][name] = value
    return StoredShard.of(from_dict(raw), plan or plan_of(), split, rank=0, world_size=1)


def features(rows: int = ROWS) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    places = [f"part-0.parquet row group 1 row {i}" for i in range(rows)]
    return rng.standard_normal((rows, 24)).astype("float32"), (np.arange(rows) % 2).astype("int32"), places


def test_a_shard_reads_back_row_for_row_with_its_places_and_bad_records(tmp_path):
    values, labels, places = features()
    bad = BadRecords("skip")
    bad.bad("part-0.parquet row group 1 row 7", "not an image")
    before = BadRecords("skip")
    shard(tmp_path).write(values, labels, places, bad.since(set(), 0))

    file = shard(tmp_path).open()
    assert file is not None and file.num_row_groups == 2
    chunks = list(StoredShard.chunks(file))
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), values)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), labels)
    assert sum((c[2] for c in chunks), []) == places
    before.add(StoredShard.bad_records(file))  # a run that reads the features still counts the record it skipped
    assert before.found == {"part-0.parquet row group 1 row 7"} and before.examples == bad.examples


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"data__image_size": [96, 96]}, "was computed with data.image_size [64, 64], now [96, 96]"),
        ({"model__backbone": "mobilenet_v2"}, "was computed with model.backbone 'demo_cnn', now 'mobilenet_v2'"),
        ({"scaling__mixed_precision": "bfloat16"}, "was computed with precision 'float32', now 'mixed_bfloat16'"),
    ],
)
def test_features_of_another_backbone_or_image_size_are_refused_saying_what_changed(tmp_path, changes, refusal):
    shard(tmp_path).write(*features(100), {"found": [], "examples": []})
    other = shard(tmp_path, **changes)
    assert other.open() is None
    assert other.refused == f"{other.uri} {refusal}"


def test_features_of_other_rows_are_refused(tmp_path):
    shard(tmp_path, plan=plan_of(100)).write(*features(100), {"found": [], "examples": []})
    moved = shard(tmp_path, plan=plan_of(100, file="/data/train/part-1.parquet"))
    assert moved.open() is None
    assert "holds features of other rows: the dataset or its shard plan changed" in moved.refused


def test_a_weights_file_written_again_makes_other_features(tmp_path):
    weights = tmp_path / "backbone.h5"
    weights.write_bytes(b"weights")
    cfg = config(tmp_path, weights=str(weights))
    StoredShard.of(cfg, plan_of(100), "train", 0, 1).write(*features(100)[:2], [], {"found": [], "examples": []})
    assert StoredShard.of(cfg, plan_of(100), "train", 0, 1).open() is not None
    os.utime(weights, (0, 0))  # rewritten: another modification time
    again = StoredShard.of(cfg, plan_of(100), "train", 0, 1)
    assert again.open() is None and "was computed with weights file" in again.refused


def test_a_truncated_file_or_one_with_missing_rows_is_refused(tmp_path):
    shard(tmp_path).write(*features(), {"found": [], "examples": []})
    path = shard(tmp_path).uri
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    cut = shard(tmp_path)
    assert cut.open() is None and cut.refused.startswith(f"{path} is not readable (")

    values, labels, places = features()
    shard(tmp_path).write(values[:-1], labels[:-1], places[:-1], {"found": [], "examples": []})
    short = shard(tmp_path)
    assert short.open() is None and short.refused == f"{path} holds {ROWS - 1} of its {ROWS} rows"


def test_the_search_reads_every_workers_shard_and_names_a_missing_one(tmp_path):
    cfg = config(tmp_path)
    plan = DatasetPlan(["cat", "dog"], ["cat", "dog"], *[Split([[Unit("/f", g, (0, 1, 2))] for g in (0, 1)], 3)] * 2)
    values, labels, _ = features(3)
    StoredShard.of(cfg, plan, "train", 0, 2).write(values, labels, [], {"found": [], "examples": []})
    with pytest.raises(DataError, match=r"features: .*/train/1-of-2.parquet is missing"):
        read_split(cfg, plan, "train", 2)
    StoredShard.of(cfg, plan, "train", 1, 2).write(values + 1, labels, [], {"found": [], "examples": []})
    joined, joined_labels, _ = read_split(cfg, plan, "train", 2)
    np.testing.assert_array_equal(joined, np.concatenate([values, values + 1]))
    assert list(joined_labels) == list(labels) * 2
