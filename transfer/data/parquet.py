"""What the driver learns about a Parquet dataset without reading its images: files, row groups, labels."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from transfer import storage
from transfer.errors import DataError


@dataclass(frozen=True)
class RowGroup:
    file: str  # a local path or URI
    index: int
    num_rows: int


@dataclass(frozen=True)
class ParquetIndex:
    """Every row group of a dataset in read order, and each row's raw label in the same order."""

    location: str
    row_groups: list[RowGroup]
    labels: list

    @property
    def num_rows(self) -> int:
        return len(self.labels)


def scan(location: str, image_column: str, label_column: str, key: str = "data.train") -> ParquetIndex:
    """Lists the files of `location`, checks their columns and reads only the label column."""
    try:
        files = storage.list_files(location, suffixes=(".parquet", ".pq"))
    except OSError as e:
        raise DataError(f"{key}: {location}: cannot list: {_first_line(e)}") from None
    if not files:
        raise DataError(f"{key}: {location}: no Parquet files found")
    row_groups: list[RowGroup] = []
    labels: list = []
    for file in files:
        fs, path = storage.resolve(file)
        try:
            parquet = pq.ParquetFile(path, filesystem=fs)
            schema = parquet.schema_arrow
            _check_columns(file, schema, image_column, label_column)
            file_labels = parquet.read(columns=[label_column]).column(label_column).to_pylist()
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{key}: {file}: cannot read as Parquet: {_first_line(e)}") from None
        if None in file_labels:
            raise DataError(f"{key}: {file}: row {file_labels.index(None)}: {label_column} is null")
        meta = parquet.metadata
        row_groups += [RowGroup(file, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
        labels += file_labels
    if not labels:
        raise DataError(f"{key}: {location}: the dataset has no rows")
    return ParquetIndex(location, row_groups, labels)


def _check_columns(file: str, schema: pa.Schema, image_column: str, label_column: str) -> None:
    for column, key in ((image_column, "data.image_column"), (label_column, "data.label_column")):
        if column not in schema.names:
            raise DataError(f"{key}: {file}: no column {column!r} (columns: {', '.join(schema.names)})")
    image_type = schema.field(image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise DataError(f"data.image_column: {file}: column {image_column!r} is {image_type}, expected binary")
    label_type = schema.field(label_column).type
    if not (pa.types.is_integer(label_type) or pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
        raise DataError(f"data.label_column: {file}: column {label_column!r} is {label_type}, expected int or string")


def class_names(labels: list) -> list[str]:
    """The sorted class list: string labels sorted as strings, int labels sorted as numbers, named by str()."""
    return [str(v) for v in sorted(set(labels))]


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
