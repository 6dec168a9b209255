"""Image datasets (`data.format: images`): a folder `<root>/<class>/<file>` or a manifest (CSV or Parquet).

Either one becomes a Parquet manifest of (image URI, label) rows in the run's storage; from there on it is a
Parquet dataset whose image column holds URIs, planned and read like any other.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from transfer import storage
from transfer.data.parquet import first_line, list_or_fail
from transfer.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
ROWS_PER_GROUP = 256  # a row group is the unit of sharding: small enough to balance, large enough to batch reads


def write_manifest(location: str, image_column: str, label_column: str, key: str, target: str) -> str:
    """Lists an image folder, or reads a manifest, and writes it to `target` as Parquet; returns `target`."""
    if location.lower().endswith(MANIFEST_SUFFIXES):
        table = _read_manifest(location, image_column, label_column, key)
    else:
        table = _list_folder(location, image_column, label_column, key)
    if table.num_rows == 0:
        raise DataError(f"{key}: {storage.redact(location)}: no images found")
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROWS_PER_GROUP)
    storage.write_bytes(target, buffer.getvalue())
    return target


def _list_folder(root: str, image_column: str, label_column: str, key: str) -> pa.Table:
    """One row per image under <root>/<class>/; every class folder must hold at least one image."""
    root = root.rstrip("/")
    files = list_or_fail(root, IMAGE_SUFFIXES, key)
    uris, labels = [], []
    for file in files:
        relative = file[len(root) + 1 :]
        if "/" not in relative:
            raise DataError(f"{key}: {storage.redact(file)}: an image outside a class folder (<root>/<class>/<file>)")
        uris.append(file)
        labels.append(relative.split("/", 1)[0])
    fs, path = storage.resolve(root)
    folders = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    for folder in (f for f in folders if f.type == pafs.FileType.Directory):
        if folder.base_name not in labels and not folder.base_name.startswith((".", "_")):
            raise DataError(
                f"{key}: class {folder.base_name!r} ({storage.redact(root)}/{folder.base_name}/) has no images"
            )
    names = _whole_numbers_as_int(pa.chunked_array([pa.array(labels, pa.string())]))  # folders 2/ .. 10/ as numbers
    return pa.table({image_column: pa.array(uris, pa.string()), label_column: names})


def _read_manifest(location: str, image_column: str, label_column: str, key: str) -> pa.Table:
    """A CSV or Parquet manifest of (image, label); relative image paths are relative to the manifest's folder."""
    table = _read_table(location, image_column, key, text_columns=(label_column,))
    if label_column not in table.column_names:
        raise DataError(
            f"data.label_column: {storage.redact(location)}: no column {label_column!r} "
            f"(columns: {', '.join(table.column_names)})"
        )
    labels = table.column(label_column)
    if location.lower().endswith(".csv"):
        labels = _whole_numbers_as_int(labels)
    elif not (pa.types.is_integer(labels.type) or pa.types.is_string(labels.type)):
        labels = labels.cast(pa.string())
    return pa.table({image_column: table.column(image_column), label_column: labels})


def image_list(location: str, image_column: str, key: str) -> pa.Table:
    """The images to predict: a folder's (every image below it, as `image_column`), or a CSV or Parquet
    manifest's rows with all their columns, its image paths made absolute."""
    if location.lower().endswith(MANIFEST_SUFFIXES):
        return _read_table(location, image_column, key)
    files = list_or_fail(location, IMAGE_SUFFIXES, key)
    if not files:
        raise DataError(f"{key}: {storage.redact(location)}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return pa.table({image_column: pa.array(files, pa.string())})


def _read_table(location: str, image_column: str, key: str, text_columns: tuple[str, ...] = ()) -> pa.Table:
    """A manifest's rows, the image column as absolute URIs or paths (relative ones are relative to the manifest's
    folder). In a CSV the image column and `text_columns` are read as text, not left to type inference."""
    try:
        data = storage.read_bytes(location)
        if location.lower().endswith(".csv"):
            text = {column: pa.string() for column in (image_column, *text_columns)}
            options = pacsv.ConvertOptions(column_types=text, strings_can_be_null=True)  # an empty cell is null
            table = pacsv.read_csv(io.BytesIO(data), convert_options=options)
        else:
            table = pq.read_table(io.BytesIO(data))
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{key}: {storage.redact(location)}: cannot read the manifest: {first_line(e)}") from None
    if image_column not in table.column_names:
        raise DataError(
            f"data.image_column: {storage.redact(location)}: no column {image_column!r} "
            f"(columns: {', '.join(table.column_names)})"
        )
    uris = [None if uri is None else storage.beside(location, uri) for uri in table.column(image_column).to_pylist()]
    position = table.column_names.index(image_column)
    return table.set_column(position, image_column, pa.array(uris, pa.string()))


def _whole_numbers_as_int(labels: pa.ChunkedArray) -> pa.ChunkedArray:
    """Labels read as text (a CSV's, class folder names): int when every one is written as a whole number (so 2
    sorts before 10), else text as written: "007" stays "007", and no label becomes a date, a bool or a float as
    pyarrow's type inference would make it."""
    try:
        numbers = labels.cast(pa.int64())
    except pa.ArrowInvalid:
        return labels
    as_written = pc.all(pc.equal(numbers.cast(pa.string()), labels)).as_py() is not False
    return numbers if as_written else labels
