"""What the driver learns about a Parquet dataset without reading its images: files, row groups, labels.

The image column holds encoded image bytes, or the URI of an image object (read by the workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from transfer import storage
from transfer.errors import DataError

MAX_EXAMPLES = 20


@dataclass(frozen=True)
class RowGroup:
    file: str  # a local path or URI
    index: int
    num_rows: int


@dataclass(frozen=True)
class ParquetIndex:
    """Every row group of a dataset in read order, and each row's raw label (None: left out) in the same order."""

    location: str
    row_groups: list[RowGroup]
    labels: list
    left_out: list[str] = field(default_factory=list)  # where and why rows were left out (null labels)

    @property
    def num_rows(self) -> int:
        return len(self.labels)


def scan(
    location: str, image_column: str, label_column: str, key: str = "data.train", bad_records: str = "skip"
) -> ParquetIndex:
    """Lists the files of `location`, checks their columns and reads only the label column.

    Rows with a null label are left out (bad_records: skip) or stop the run (fail).
    """
    files = list_or_fail(location, (".parquet", ".pq"), key)
    if not files:
        raise DataError(f"{key}: {storage.redact(location)}: no Parquet files found")
    row_groups: list[RowGroup] = []
    labels: list = []
    left_out: list[str] = []
    for file in files:
        fs, path = storage.resolve(file)
        try:
            parquet = pq.ParquetFile(path, filesystem=fs)
            _check_columns(file, parquet.schema_arrow, image_column, label_column)
            file_labels = parquet.read(columns=[label_column]).column(label_column).to_pylist()
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{key}: {storage.redact(file)}: cannot read as Parquet: {first_line(e)}") from None
        for row in (i for i, label in enumerate(file_labels) if label is None):
            where = f"{storage.redact(file)}: row {row}: {label_column} is null"
            if bad_records == "fail":
                raise DataError(f"{key}: {where}")
            left_out.append(where)
        meta = parquet.metadata
        row_groups += [RowGroup(file, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
        labels += file_labels
    if len(left_out) == len(labels):
        raise DataError(f"{key}: {storage.redact(location)}: the dataset has no labelled rows")
    return ParquetIndex(location, row_groups, labels, left_out)


def list_or_fail(location: str, suffixes: tuple[str, ...], key: str) -> list[str]:
    """The files at `location`; an unreachable store or missing credentials is a DataError naming the location."""
    try:
        storage.check_credentials(location)
        return storage.list_files(location, suffixes)
    except OSError as e:
        raise DataError(f"{key}: {storage.redact(location)}: cannot list: {first_line(e)}") from None


def _check_columns(file: str, schema: pa.Schema, image_column: str, label_column: str) -> None:
    where = storage.redact(file)
    for column, key in ((image_column, "data.image_column"), (label_column, "data.label_column")):
        if column not in schema.names:
            raise DataError(f"{key}: {where}: no column {column!r} (columns: {', '.join(schema.names)})")
    image_type = schema.field(image_column).type
    if not (_is_binary(image_type) or _is_string(image_type)):
        raise DataError(
            f"data.image_column: {where}: column {image_column!r} is {image_type}, expected binary (image bytes) "
            "or string (image URIs)"
        )
    label_type = schema.field(label_column).type
    if not (pa.types.is_integer(label_type) or _is_string(label_type)):
        raise DataError(f"data.label_column: {where}: column {label_column!r} is {label_type}, expected int or string")


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def class_names(labels: list) -> list[str]:
    """The sorted class list: string labels sorted as strings, int labels sorted as numbers, named by str()."""
    return [str(v) for v in sorted({v for v in labels if v is not None})]


def image_cells(column: pa.Array | pa.ChunkedArray, file: str) -> list[bytes | str | None]:
    """Per row: the encoded image bytes, or the URI of an image object, or None."""
    return column.to_pylist()


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
