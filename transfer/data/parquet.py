"""What the driver learns about a Parquet dataset without reading its images: files, row groups, labels.

The image column holds encoded image bytes, the URI of an image object (read by the workers), or a Hugging Face
`datasets` Image: struct<bytes, path>. Labels are ints or strings, or a `datasets` ClassLabel: ints whose names
are in the schema metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from transfer import storage
from transfer.errors import DataError

MAX_EXAMPLES = 20
PAGE_ROWS = 1024
HF_METADATA = b"huggingface"  # the schema metadata key where `datasets` keeps its features (ClassLabel names)
NO_LABEL = -1  # a ClassLabel's "this row has no label"


@dataclass(frozen=True)
class RowGroup:
    file: str  # a local path or URI
    index: int
    num_rows: int
    image_bytes: int = 0  # the image column's uncompressed size in this row group

    def open_bytes(self) -> int:
        """About what streaming this row group holds in memory at once: a data page of its image column,
        compressed and not. pyarrow's writer checks its 1 MiB page limit only every PAGE_ROWS values, so a page
        of images can hold that many (80 MB of 512 px JPEGs)."""
        return round(2 * self.image_bytes * min(1.0, PAGE_ROWS / max(1, self.num_rows)))


@dataclass(frozen=True)
class LabelType:
    """What a label column holds. All files of a job (training and validation) must hold the same, so that one raw
    label means one class in every file."""

    kind: str  # int | string | ClassLabel (`datasets`: ints 0..n-1, named in the schema metadata)
    names: tuple[str, ...] = ()  # ClassLabel: the name of label i
    file: str = field(default="", compare=False)  # a file that holds it, for messages


@dataclass(frozen=True)
class ParquetIndex:
    """Every row group of a dataset in read order, and each row's raw label (None: left out) in the same order."""

    location: str
    row_groups: list[RowGroup]
    labels: list
    label_type: LabelType
    left_out: list[str] = field(default_factory=list)  # where and why rows were left out (null or -1 labels)

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def class_keys(self) -> list[str]:
        """The str() of each raw label that occurs, in class order: what the workers look each row's class up by."""
        return class_names(self.labels)

    def class_name(self, key: str) -> str:
        """A class's name: a ClassLabel's from the schema, any other label's is its key."""
        return self.label_type.names[int(key)] if self.label_type.kind == "ClassLabel" else key


def scan(
    location: str,
    image_column: str,
    label_column: str,
    key: str = "data.train",
    bad_records: str = "skip",
    source: str | None = None,
) -> ParquetIndex:
    """Lists the files of `location`, checks their columns and reads only the label column.

    Rows without a label (null, or a ClassLabel's -1) are left out (bad_records: skip) or stop the run (fail).
    `source`: what messages name instead of the files (format: images: the manifest or folder the user gave,
    not the Parquet copy of it, whose rows are in the same order).
    """
    files = list_or_fail(location, (".parquet", ".pq"), key)
    if not files:
        raise DataError(f"{key}: {storage.redact(location)}: no Parquet files found")
    row_groups: list[RowGroup] = []
    labels: list = []
    left_out: list[str] = []
    label_type: LabelType | None = None
    for file in files:
        fs, path = storage.resolve(file)
        try:
            parquet = pq.ParquetFile(path, filesystem=fs)
            _check_columns(file, parquet.schema_arrow, image_column, label_column)
            raw = parquet.read(columns=[label_column]).column(label_column).to_pylist()
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{key}: {storage.redact(file)}: cannot read as Parquet: {first_line(e)}") from None
        file_type = label_type_of(source or file, parquet.schema_arrow, label_column, key)
        label_type = label_type or file_type
        check_same_labels(label_type, file_type, key)
        file_labels, file_left_out = _labelled(source or file, raw, file_type, label_column, key, bad_records)
        meta = parquet.metadata
        row_groups += [_row_group(file, meta, i, image_column) for i in range(meta.num_row_groups)]
        labels += file_labels
        left_out += file_left_out
    if len(left_out) == len(labels):
        raise DataError(f"{key}: {storage.redact(location)}: the dataset has no labelled rows")
    assert label_type is not None
    return ParquetIndex(location, row_groups, labels, label_type, left_out)


def _labelled(
    file: str, raw: list, label_type: LabelType, label_column: str, key: str, bad_records: str
) -> tuple[list, list[str]]:
    """The one place that decides which rows have a label: the file's labels, None for a row left out, and where
    and why each was left out (a null; a ClassLabel's -1, `datasets`' "no label").

    A ClassLabel outside its names is an error: the file contradicts its own schema.
    """
    labels, left_out = [], []
    for row, label in enumerate(raw):
        if label is None:
            why = "is null"
        elif label_type.kind == "ClassLabel" and label == NO_LABEL:
            why = "is -1 (no label)"
        else:
            if label_type.kind == "ClassLabel" and not 0 <= label < len(label_type.names):
                raise DataError(
                    f"{key}: {storage.redact(file)}: row {row}: {label_column} is {label}, but its ClassLabel has "
                    f"{len(label_type.names)} names"
                )
            labels.append(label)
            continue
        where = f"{storage.redact(file)}: row {row}: {label_column} {why}"
        if bad_records == "fail":
            raise DataError(f"{key}: {where}")
        left_out.append(where)
        labels.append(None)
    return labels, left_out


def label_type_of(file: str, schema: pa.Schema, label_column: str, key: str) -> LabelType:
    """int or string, or ClassLabel: an int column that `datasets` names in the schema metadata."""
    if is_string(schema.field(label_column).type):
        return LabelType("string", file=file)
    names = _class_label_names(file, schema, label_column, key)
    return LabelType("int", file=file) if names is None else LabelType("ClassLabel", names, file)


def _class_label_names(file: str, schema: pa.Schema, label_column: str, key: str) -> tuple[str, ...] | None:
    """The names of a ClassLabel column: `datasets` keeps them only in the schema metadata, at
    info.features.<column>.names; None when the column is no ClassLabel."""
    metadata = (schema.metadata or {}).get(HF_METADATA)
    if metadata is None:
        return None
    try:
        feature = json.loads(metadata).get("info", {}).get("features", {}).get(label_column) or {}
        if feature.get("_type") != "ClassLabel":
            return None
        return tuple(str(name) for name in feature["names"])
    except (ValueError, AttributeError, KeyError, TypeError):
        raise DataError(
            f"{key}: {storage.redact(file)}: the Hugging Face schema metadata of {label_column!r} cannot be read"
        ) from None


def check_same_labels(expected: LabelType, found: LabelType, key: str) -> None:
    """Stops data whose files hold labels of different types, or ClassLabels with different names: one raw label
    would then mean different classes in different files (and ints and strings do not sort together)."""
    if found == expected:
        return
    here, there = storage.redact(found.file), storage.redact(expected.file)
    if found.kind != expected.kind:
        raise DataError(
            f"{key}: {here}: labels are {found.kind}, but {expected.kind} in {there}: all files need one label type"
        )
    differ = next((i for i, (a, b) in enumerate(zip(found.names, expected.names, strict=False)) if a != b), None)
    if differ is None:
        what = f"{len(found.names)} names here, {len(expected.names)} in {there}"
    else:
        what = f"label {differ} is {found.names[differ]!r} here, {expected.names[differ]!r} in {there}"
    raise DataError(f"{key}: {here}: the ClassLabel names differ: {what}")


def _row_group(file: str, meta: pq.FileMetaData, index: int, image_column: str) -> RowGroup:
    group = meta.row_group(index)
    image_bytes = sum(
        group.column(c).total_uncompressed_size
        for c in range(group.num_columns)
        if group.column(c).path_in_schema.split(".")[0] == image_column  # a struct's fields too
    )
    return RowGroup(file, index, group.num_rows, image_bytes)


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
    check_image_type(file, schema, image_column, "data.image_column")
    label_type = schema.field(label_column).type
    if not (pa.types.is_integer(label_type) or is_string(label_type)):
        raise DataError(f"data.label_column: {where}: column {label_column!r} is {label_type}, expected int or string")


def check_image_type(file: str, schema: pa.Schema, column: str, key: str) -> None:
    """Stops an image column that holds neither image bytes, nor URIs, nor a Hugging Face Image."""
    kind = schema.field(column).type
    if not (is_binary(kind) or is_string(kind) or is_image_struct(kind)):
        raise DataError(
            f"{key}: {storage.redact(file)}: column {column!r} is {kind}, expected binary (image bytes), "
            "string (image URIs) or struct<bytes, path> (a Hugging Face Image)"
        )


def is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


IMAGE_STRUCT_PARTS = {"bytes": is_binary, "path": is_string}


def is_image_struct(t: pa.DataType) -> bool:
    """A `datasets` Image: struct<bytes: binary, path: string>; either part may be missing, not both."""
    if not pa.types.is_struct(t):
        return False
    parts = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    present = [name for name in IMAGE_STRUCT_PARTS if name in parts]
    return bool(present) and all(IMAGE_STRUCT_PARTS[name](parts[name]) for name in present)


def image_cells(column: pa.Array | pa.ChunkedArray, file: str) -> list[bytes | str | None]:
    """Each row's image as a worker reads it: encoded bytes, a URI or path to fetch, or None (no image).

    A binary column holds bytes, a string column URIs. A `datasets` Image struct holds bytes, or where they are
    null a path: a URI, an absolute path, or one relative to `file`'s folder, as `datasets` writes it beside its
    data. So one column can hold both: rows to decode and rows to fetch.
    """
    if isinstance(column, pa.ChunkedArray):
        return [cell for chunk in column.chunks for cell in image_cells(chunk, file)]
    kind = column.type
    if is_binary(kind) or is_string(kind):
        return column.to_pylist()
    if not is_image_struct(kind):
        raise DataError(f"data.image_column: {storage.redact(file)}: an image column of type {kind}")
    return [_struct_cell(row, file) for row in column.to_pylist()]


def _struct_cell(row: dict | None, file: str) -> bytes | str | None:
    if row is None:
        return None
    if row.get("bytes") is not None:
        return row["bytes"]
    path = row.get("path")
    return storage.beside(file, path) if path else None


def class_names(labels: list) -> list[str]:
    """The sorted class list: string labels sorted as strings, int labels sorted as numbers, named by str()."""
    return [str(v) for v in sorted({v for v in labels if v is not None})]


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
