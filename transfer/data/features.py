"""Backbone features kept in the run's storage, under `<run>/features/`: a restart, a rerun with more epochs and a
head search train on them instead of running the backbone again.

One Parquet file per worker shard (`train/0-of-2.parquet`, ...), written by the worker that computed it: a
`features` column (a fixed-size list of floats), `label` (the class index) and, for validation, `place` (where the
row is, for the evaluation's misclassified rows). The file's schema metadata holds the fingerprint of what made it:
the backbone, its weights, how images became inputs and exactly which rows. A file made from anything else (another
backbone, weights file, image size or dataset) is never used; neither is one that holds fewer rows than it should.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transfer import storage
from transfer.config import Config
from transfer.data.parquet import first_line
from transfer.data.plan import DatasetPlan
from transfer.errors import DataError

FOLDER = "features"
FINGERPRINT = b"transfer.fingerprint"  # schema metadata: the fingerprint, as JSON
BAD_RECORDS = b"transfer.bad_records"  # the bad records left out while computing the shard: found and examples
ROWS_PER_GROUP = 4096  # a reader holds one row group at a time


def fingerprint(cfg: Config, plan: DatasetPlan, split: str, rank: int) -> dict:
    """What decides one worker's features: the backbone and its weights, how images become its inputs, the
    classes and exactly which rows (each row group's file, index, rows and size)."""
    units = getattr(plan, split).shards[rank]
    rows = [[u.file, u.row_group, list(u.rows), u.open_bytes] for u in units]
    return {
        "model.backbone": cfg.model.backbone,
        "model.weights": storage.redact(cfg.model.weights),
        "weights file": _file_stamp(cfg.model.weights),
        "random weights seed": cfg.data.seed if cfg.model.weights == "none" else None,
        "data.image_size": list(cfg.data.image_size),
        "data.image_column": cfg.data.image_column,
        "precision": cfg.precision_policy or "float32",
        "classes": list(plan.label_keys),
        "rows": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
        "row count": getattr(plan, split).rows_per_worker,
    }


def _file_stamp(location: str) -> str | None:
    """A weights file's size and modification time: the same path rewritten with other weights is not the same."""
    if location in ("imagenet", "none"):
        return None
    fs, path = storage.resolve(location)
    info = fs.get_file_info(path)
    return f"{info.size} bytes, modified {info.mtime.isoformat() if info.mtime else 'unknown'}"


@dataclass
class StoredShard:
    """One worker's persisted features of one split, and whether they may be used."""

    uri: str
    fingerprint: dict
    reason: str | None = field(default=None, init=False)  # why an existing file was not used

    @property
    def refused(self) -> str | None:
        """The file, and why it was not used; None when it was, or when there was none."""
        return None if self.reason is None else f"{storage.redact(self.uri)} {self.reason}"

    @classmethod
    def of(cls, cfg: Config, plan: DatasetPlan, split: str, rank: int, world_size: int) -> StoredShard:
        uri = storage.join(cfg.run_uri, FOLDER, split, f"{rank}-of-{world_size}.parquet")
        return cls(uri, fingerprint(cfg, plan, split, rank))

    def open(self) -> pq.ParquetFile | None:
        """The file, when it exists, was made from the same inputs and holds all its rows; else None (and
        `refused` says why, when a file was there)."""
        fs, path = storage.resolve(self.uri)
        if fs.get_file_info(path).type == pa.fs.FileType.NotFound:
            return None
        try:
            file = pq.ParquetFile(fs.open_input_file(path))
        except (OSError, pa.ArrowException) as e:
            self.reason = f"is not readable ({first_line(e)})"
            return None
        found = json.loads((file.schema_arrow.metadata or {}).get(FINGERPRINT, b"{}"))
        differs = next((key for key in self.fingerprint if found.get(key) != self.fingerprint[key]), None)
        if differs is not None:
            then, now = found.get(differs), self.fingerprint[differs]
            if differs == "rows":
                self.reason = "holds features of other rows: the dataset or its shard plan changed"
            else:
                self.reason = f"was computed with {differs} {then!r}, now {now!r}"
            return None
        if file.metadata.num_rows != self.fingerprint["row count"]:
            self.reason = f"holds {file.metadata.num_rows} of its {self.fingerprint['row count']} rows"
            return None
        return file

    @staticmethod
    def bad_records(file: pq.ParquetFile) -> dict:
        """The bad records the worker left out while computing the file's features: `found` and `examples`."""
        return json.loads(file.schema_arrow.metadata.get(BAD_RECORDS, b'{"found": [], "examples": []}'))

    @staticmethod
    def chunks(file: pq.ParquetFile) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """The file's (features, labels, places) one row group at a time; places are empty for training rows."""
        for i in range(file.num_row_groups):
            table = file.read_row_group(i)
            flat = table["features"].combine_chunks().flatten().to_numpy()
            values = flat.reshape(table.num_rows, -1)
            places = table["place"].to_pylist() if "place" in table.column_names else []
            yield values, table["label"].to_numpy().astype("int32"), places

    def write(self, values: np.ndarray, labels: np.ndarray, places: list[str], bad_records: dict) -> None:
        """Writes the shard's features: on a local disk beside, then renamed into place; on an object store
        straight to its key (an object appears only once whole). A file cut short is refused when read."""
        metadata = {FINGERPRINT: json.dumps(self.fingerprint), BAD_RECORDS: json.dumps(bad_records)}
        columns = [
            pa.field("features", pa.list_(pa.from_numpy_dtype(values.dtype), int(np.prod(values.shape[1:])))),
            pa.field("label", pa.int32()),
        ]
        if places:
            columns.append(pa.field("place", pa.string()))
        schema = pa.schema(columns, metadata=metadata)
        fs, path = storage.resolve(self.uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        target = f"{path}.partial" if storage.is_local(self.uri) else path
        with fs.open_output_stream(target) as out, pq.ParquetWriter(out, schema) as writer:
            for start in range(0, len(labels), ROWS_PER_GROUP):
                part = slice(start, start + ROWS_PER_GROUP)
                flat = pa.array(np.ascontiguousarray(values[part]).reshape(-1))
                arrays = [pa.FixedSizeListArray.from_arrays(flat, schema.field("features").type.list_size)]
                arrays.append(pa.array(labels[part], pa.int32()))
                if places:
                    arrays.append(pa.array(places[part], pa.string()))
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        if target != path:
            fs.move(target, path)


def read_split(cfg: Config, plan: DatasetPlan, split: str, world_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every worker's features of a split, one after another: (features, labels, places)."""
    values, labels, places = [], [], []
    for rank in range(world_size):
        shard = StoredShard.of(cfg, plan, split, rank, world_size)
        file = shard.open()
        if file is None:
            raise DataError(f"{FOLDER}: {shard.refused or storage.redact(shard.uri) + ' is missing'}")
        for chunk_values, chunk_labels, chunk_places in shard.chunks(file):
            values.append(chunk_values)
            labels.append(chunk_labels)
            places += chunk_places
    return np.concatenate(values), np.concatenate(labels), places
