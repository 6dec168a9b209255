"""The shard plan: which rows each worker reads, so that every worker runs exactly the same number of steps.

Under MultiWorkerMirroredStrategy one extra batch on one worker crashes the job, so the driver gives every worker
the same number of rows (the remainder, fewer than num_workers rows, is left out) and the same step counts.
Rows are handed out row group by row group in a seeded random order of the row groups, so a worker reads whole
row groups from all over the dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from transfer.data.parquet import ParquetIndex, check_same_labels
from transfer.errors import DataError


@dataclass(frozen=True)
class Unit:
    """The rows one worker reads from one row group (positions inside the row group)."""

    file: str
    row_group: int
    rows: tuple[int, ...]
    open_bytes: int = 0  # about what reading it holds in memory at once (RowGroup.open_bytes)


@dataclass(frozen=True)
class Split:
    """One worker's units per worker, each worker's total equal to rows_per_worker."""

    shards: list[list[Unit]]
    rows_per_worker: int


@dataclass(frozen=True)
class DatasetPlan:
    classes: list[str]  # the class names in output order, as labels.json holds them
    label_keys: list[str]  # in the same order, the str() of the raw label of each class, as the workers read it
    train: Split
    validation: Split
    left_out: list[str] = field(default_factory=list)  # rows left out while planning (no label), and why

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.train.rows_per_worker // batch_size

    def validation_steps(self, batch_size: int) -> int:
        return math.ceil(self.validation.rows_per_worker / batch_size)

    def check_batch_size(self, batch_size: int, key: str) -> None:
        if self.steps_per_epoch(batch_size) < 1:
            raise DataError(
                f"{key}: {batch_size} is more than the {self.train.rows_per_worker} training rows per worker"
            )


def plan_dataset(
    train: ParquetIndex,
    validation: ParquetIndex | None,
    validation_split: float,
    num_workers: int,
    seed: int,
) -> DatasetPlan:
    """Splits off validation rows (when no validation set is given) and shards both sets over the workers.

    The classes are those of the training labels; a separate validation set must label its rows the same way
    (the same label type, the same ClassLabel names), so that a raw label is one class in both.
    """
    keys = train.class_keys()
    labelled = _labelled_rows(train)
    if validation is None:
        val_rows, train_rows = split_validation(train, labelled, validation_split, seed)
        val_split = shard_rows(train, val_rows, num_workers, "data.validation_split", seed)
        left_out = train.left_out
    else:
        check_same_labels(train.label_type, validation.label_type, "data.validation")
        unknown = sorted(set(validation.class_keys()) - set(keys))
        if unknown:
            name = validation.class_name(unknown[0])
            raise DataError(f"data.validation: label {name!r} does not occur in data.train")
        train_rows = labelled
        val_split = shard_rows(validation, _labelled_rows(validation), num_workers, "data.validation", seed)
        left_out = train.left_out + validation.left_out
    missing = sorted(set(keys) - {str(train.labels[i]) for i in train_rows})
    if missing:
        name = train.class_name(missing[0])
        raise DataError(f"data.validation_split: class {name!r} has no training rows left after the split")
    classes = [train.class_name(key) for key in keys]
    train_split = shard_rows(train, train_rows, num_workers, "data.train", seed)
    return DatasetPlan(classes, keys, train_split, val_split, left_out)


GROUP_SPLIT_TRIES = 8  # random choices of whole row groups tried before splitting single rows
FRACTION_TOLERANCE = 0.1  # the validation rows of a whole-row-group split may miss the fraction by this much


def split_validation(
    index: ParquetIndex, labelled: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The validation and training rows (sorted global row numbers) of `fraction` of the labelled rows.

    Whole row groups where that keeps the fraction and the class mix of a random draw of single rows: a
    validation epoch then reads 10% of the row groups, not every row group for 10% of its rows. Otherwise
    (few row groups, or each holding a few classes) a random draw of single rows.
    """
    rng = np.random.default_rng(seed)
    target = max(1, round(len(labelled) * fraction))
    group_of_row = np.repeat(np.arange(len(index.row_groups)), [g.num_rows for g in index.row_groups])
    is_labelled = np.zeros(index.num_rows, bool)
    is_labelled[labelled] = True
    classes, class_of_labelled = np.unique([str(index.labels[i]) for i in labelled], return_inverse=True)
    class_of_row = np.full(index.num_rows, -1)
    class_of_row[labelled] = class_of_labelled
    share = np.bincount(class_of_labelled, minlength=len(classes)) / len(labelled)
    # The mean total-variation distance of a random draw of `target` rows from the class shares.
    chance_distance = 0.5 * np.sum(np.sqrt(2 / np.pi * share * (1 - share) / target))
    per_group = np.bincount(group_of_row[labelled], minlength=len(index.row_groups))
    for _ in range(GROUP_SPLIT_TRIES):
        order = rng.permutation(len(index.row_groups))
        taken = np.cumsum(per_group[order])
        count = int(np.argmin(np.abs(taken - target))) + 1
        if abs(taken[count - 1] - target) > FRACTION_TOLERANCE * target:
            continue
        in_validation = np.isin(group_of_row, order[:count]) & is_labelled
        val_rows, train_rows = np.flatnonzero(in_validation), np.flatnonzero(~in_validation & is_labelled)
        val_share = np.bincount(class_of_row[val_rows], minlength=len(classes)) / len(val_rows)
        keeps_classes = len(np.unique(class_of_row[train_rows])) == len(classes)
        if keeps_classes and 0.5 * np.abs(val_share - share).sum() <= 1.5 * chance_distance + 0.01:
            return val_rows, train_rows
    order = rng.permutation(labelled)
    return np.sort(order[:target]), np.sort(order[target:])


def _labelled_rows(index: ParquetIndex) -> np.ndarray:
    return np.flatnonzero([label is not None for label in index.labels])


def shard_rows(index: ParquetIndex, rows: np.ndarray, num_workers: int, key: str, seed: int = 0) -> Split:
    """Gives each worker an equal, contiguous run of `rows` (global row numbers) taken in a seeded random order
    of the row groups, as row-group units.

    A worker reads whole row groups (but for the two at the ends of its run), drawn from all over the dataset:
    on data written a class at a time (a file or row group per class) each worker still gets many classes.
    """
    per_worker = len(rows) // num_workers
    if per_worker == 0:
        raise DataError(f"{key}: {len(rows)} rows cannot be shared by {num_workers} workers")
    starts = np.cumsum([0] + [g.num_rows for g in index.row_groups])
    group_of_row = np.searchsorted(starts, rows, side="right") - 1
    rank_of_group = np.random.default_rng(seed).permutation(len(index.row_groups))
    order = np.lexsort((rows, rank_of_group[group_of_row]))
    rows, group_of_row = rows[order], group_of_row[order]
    shards = []
    for w in range(num_workers):
        run = slice(w * per_worker, (w + 1) * per_worker)
        worker_rows, worker_groups = rows[run], group_of_row[run]
        units = []
        for g in dict.fromkeys(worker_groups.tolist()):  # in the run's order
            group = index.row_groups[g]
            local = worker_rows[worker_groups == g] - starts[g]
            units.append(Unit(group.file, group.index, tuple(int(r) for r in local), group.open_bytes()))
        shards.append(units)
    return Split(shards, per_worker)
