import numpy as np
import pytest

from transfer.data.parquet import LabelType, ParquetIndex, RowGroup, class_names
from transfer.data.plan import plan_dataset, shard_rows
from transfer.errors import DataError


def index(group_sizes: list[int], labels: list | None = None) -> ParquetIndex:
    groups = [RowGroup(f"f{i // 3}.parquet", i % 3, n) for i, n in enumerate(group_sizes)]
    total = sum(group_sizes)
    return ParquetIndex("data/", groups, labels or [f"c{i % 4}" for i in range(total)], LabelType("string"))


def rows_of(units) -> int:
    return sum(len(u.rows) for u in units)


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_every_worker_gets_the_same_rows_on_uneven_row_groups(workers):
    data = index([97, 3, 250, 1, 64, 400, 17])
    split = shard_rows(data, np.arange(data.num_rows), workers, "data.train")
    assert len(split.shards) == workers
    assert {rows_of(s) for s in split.shards} == {split.rows_per_worker}
    assert split.rows_per_worker == data.num_rows // workers


def test_shards_are_disjoint_and_cover_all_but_the_remainder():
    data = index([97, 3, 250, 1, 64, 400, 17])  # 832 rows
    split = shard_rows(data, np.arange(data.num_rows), 3, "data.train")
    seen = [(u.file, u.row_group, r) for shard in split.shards for u in shard for r in u.rows]
    assert len(seen) == len(set(seen)) == 831


def test_units_stay_inside_their_row_group():
    data = index([10, 20, 30])
    split = shard_rows(data, np.arange(60), 4, "data.train")
    sizes = {(g.file, g.index): g.num_rows for g in data.row_groups}
    for shard in split.shards:
        for unit in shard:
            assert all(0 <= r < sizes[(unit.file, unit.row_group)] for r in unit.rows)


def test_equal_steps_for_every_worker():
    plan = plan_dataset(index([97, 3, 250, 1, 64, 400, 17]), None, 0.1, 3, seed=0)
    assert {rows_of(s) for s in plan.train.shards} == {plan.train.rows_per_worker}
    assert {rows_of(s) for s in plan.validation.shards} == {plan.validation.rows_per_worker}
    assert plan.steps_per_epoch(32) == plan.train.rows_per_worker // 32


def test_validation_split_is_deterministic_and_disjoint():
    data = index([100, 100, 100])
    a = plan_dataset(data, None, 0.2, 2, seed=7)
    b = plan_dataset(data, None, 0.2, 2, seed=7)
    c = plan_dataset(data, None, 0.2, 2, seed=8)
    assert a == b and a != c

    def rows(split):
        return {(u.file, u.row_group, r) for shard in split.shards for u in shard for r in u.rows}

    assert not rows(a.train) & rows(a.validation)
    assert len(rows(a.validation)) == 60


def test_too_few_rows_for_the_workers_or_the_batch():
    with pytest.raises(DataError, match="data.train: 3 rows cannot be shared by 4 workers"):
        shard_rows(index([3]), np.arange(3), 4, "data.train")
    plan = plan_dataset(index([100]), None, 0.2, 2, seed=0)
    with pytest.raises(DataError, match="head.batch_size: 64 is more than the 40 training rows per worker"):
        plan.check_batch_size(64, "head.batch_size")


def test_validation_labels_must_be_known_to_training():
    train = index([20], labels=["cat", "dog"] * 10)
    validation = index([4], labels=["cat", "dog", "cow", "cat"])
    with pytest.raises(DataError, match="data.validation: label 'cow' does not occur in data.train"):
        plan_dataset(train, validation, 0.0, 2, seed=0)


def test_class_names_sort_strings_and_numbers():
    assert class_names(["dog", "cat", "dog", "ant"]) == ["ant", "cat", "dog"]
    assert class_names([10, 2, 1, 2]) == ["1", "2", "10"]


def validation_groups(plan) -> dict[tuple[str, int], int]:
    """Validation rows per row group, over all workers."""
    rows: dict[tuple[str, int], int] = {}
    for unit in (u for shard in plan.validation.shards for u in shard):
        rows[(unit.file, unit.row_group)] = rows.get((unit.file, unit.row_group), 0) + len(unit.rows)
    return rows


def test_validation_takes_whole_row_groups_when_they_keep_the_fraction_and_the_class_mix():
    rng = np.random.default_rng(0)
    data = index([50] * 60, labels=list(rng.choice(["a", "b", "c", "d"], 3000)))
    plan = plan_dataset(data, None, 0.1, 2, seed=0)
    groups = validation_groups(plan)
    assert len(groups) == 6 and all(n >= 49 for n in groups.values())  # whole groups (less an odd row left out)
    assert 2 * plan.validation.rows_per_worker == 300


def test_validation_of_class_sorted_row_groups_is_drawn_row_by_row():
    # One class per row group, as files written class by class: whole groups would validate on a few classes.
    data = index([50] * 60, labels=[f"c{i // 50}" for i in range(3000)])
    plan = plan_dataset(data, None, 0.1, 2, seed=0)
    assert len(validation_groups(plan)) > 30  # rows from most groups, so every class is validated
    assert 2 * plan.validation.rows_per_worker == 300


def test_each_worker_gets_row_groups_from_all_over_class_sorted_data():
    # 40 files of one class each, 4 row groups apiece: a contiguous run would give each worker 10 classes.
    groups = [RowGroup(f"class{f}.parquet", g, 25) for f in range(40) for g in range(4)]
    labels = [f"c{f}" for f in range(40) for _ in range(100)]
    data = ParquetIndex("data/", groups, labels, LabelType("string"))
    split = shard_rows(data, np.arange(data.num_rows), 4, "data.train", seed=0)
    for units in split.shards:
        assert len({u.file for u in units}) >= 25
        assert sum(len(u.rows) == 25 for u in units) >= len(units) - 2  # whole row groups, but at the run's ends
