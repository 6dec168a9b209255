"""Batch prediction with an export, on Ray Data: every input row in, one row out with its class or why not.

Ray Data reads the rows (Parquet, or the image list of a folder or manifest) and streams them through a pool of
actors that each load the export once. An actor fetches its batch's image objects, decodes and resizes them
exactly as training did (`decode_image`), and runs the model. The output is Parquet under OUT, marked complete by
`_SUCCESS.json` once every file is written. Everything before Ray starts (the export, the data's columns, OUT)
is checked on the driver, without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from transfer import config, evaluation, export, storage
from transfer.data import images, parquet
from transfer.errors import ConfigError, DataError, TrainingError

DONE = "_SUCCESS.json"  # written last; Parquet readers skip files named _*
OUTPUT_COLUMNS = ("prediction", "probability", "top_k", "error")
RAY_PATH = "path"  # the column Ray Data's include_paths adds: the file a row came from
BATCHES_PER_BLOCK = 4
ROWS_PER_FILE = 100_000  # at least, per output file (Ray Data writes a file per block otherwise)
TOP_K = pa.list_(pa.struct([("class", pa.string()), ("probability", pa.float32())]))


@dataclass(frozen=True)
class Request:
    """What `transfer-predict` was asked; None: the export's own setting."""

    model: str
    data: str
    out: str
    format: str = "parquet"  # parquet | images (a folder of images, or a CSV/Parquet manifest of them)
    image_column: str | None = None
    batch_size: int = 64
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1


@dataclass(frozen=True)
class Plan:
    """What the actors need, checked on the driver before Ray starts."""

    model: str
    classes: list[str]
    image_column: str
    image_size: tuple[int, int]
    keeps_image_column: bool  # a column of URIs stays in the output (it says where the image is); bytes do not
    with_paths: bool  # a Hugging Face Image column: relative paths are relative to each row's file
    scheme: str  # prefixed to Ray Data's paths, which it gives without one ("bucket/key")
    files: list[str]  # format parquet: the files to read
    image_list: pa.Table | None  # format images: the rows to predict


def plan_prediction(request: Request) -> Plan:
    """Checks the export, the data and OUT; reads the export's classes, image column and image size."""
    if request.format not in ("parquet", "images"):
        raise ConfigError(f"--format: {request.format!r}, expected parquet or images")
    for flag, value in (("--batch-size", request.batch_size), ("--workers", request.workers)):
        if value < 1:
            raise ConfigError(f"{flag}: {value}, expected at least 1")
    export.check_complete(request.model, "--model")
    classes = json.loads(storage.read_text(storage.join(request.model, "labels.json")))
    shown = f"{storage.redact(request.model)}/config.yaml"
    trained = config.from_dict(yaml.safe_load(storage.read_text(storage.join(request.model, "config.yaml"))), shown)
    column = request.image_column or trained.data.image_column
    check_out(request.out, request.data)
    files, image_list = [], None
    if request.format == "images":
        image_list = images.image_list(request.data, column, "--data")
        names, image_type = image_list.column_names, pa.string()
    else:
        files = parquet.list_or_fail(request.data, (".parquet", ".pq"), "--data")
        if not files:
            raise DataError(f"--data: {storage.redact(request.data)}: no Parquet files found")
        schema = _schema(files[0])
        if column not in schema.names:
            raise DataError(
                f"--image-column: {storage.redact(files[0])}: no column {column!r} (columns: {', '.join(schema.names)})"
            )
        names, image_type = schema.names, schema.field(column).type
        parquet.check_image_type(files[0], schema, column, "--image-column")
    with_paths = parquet.is_image_struct(image_type)
    taken = [name for name in names if name in OUTPUT_COLUMNS or (with_paths and name == RAY_PATH)]
    if taken:
        raise DataError(f"--data: {storage.redact(request.data)}: has a column {taken[0]!r}, which the output adds")
    scheme = request.data.split("://", 1)[0] + "://" if storage.is_uri(request.data) else ""
    return Plan(
        request.model,
        classes,
        column,
        tuple(trained.data.image_size),
        parquet.is_string(image_type),
        with_paths,
        scheme,
        files,
        image_list,
    )


def check_out(out: str, data: str) -> None:
    """OUT is replaced whole by a run: it must not hold the data, nor anything but earlier predictions."""
    here, there = storage.absolute(out).rstrip("/") + "/", storage.absolute(data).rstrip("/") + "/"
    if here.startswith(there) or there.startswith(here):
        raise ConfigError(f"--out: {storage.redact(out)} and --data overlap; predictions go to a folder of their own")
    fs, path = storage.resolve(out)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"--out: {storage.redact(out)} is a file; give a folder")
    if info.type == pafs.FileType.NotFound:
        return
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        ours = entry.type == pafs.FileType.Directory or entry.base_name == DONE or entry.path.endswith(".parquet")
        if not ours:
            raise ConfigError(
                f"--out: {storage.redact(out)} holds {entry.base_name}, which is no prediction output; "
                "give an empty or new folder (a rerun replaces the folder whole)"
            )


def run_prediction(request: Request, verbose: bool = False, echo=print) -> dict:
    """Predicts every row of the data into OUT (replacing it); returns the summary."""
    from transfer.job import connect_ray

    started = time.monotonic()
    plan = plan_prediction(request)
    what = f"{len(plan.image_list)} images" if plan.image_list is not None else f"{len(plan.files)} Parquet files"
    echo(
        f"predict: {what} of {storage.redact(request.data)} with {storage.redact(request.model)} "
        f"({len(plan.classes)} classes), {request.workers} workers"
    )
    connect_ray(verbose, echo)
    import ray

    if plan.image_list is not None:
        dataset = ray.data.from_arrow(plan.image_list)
    else:
        fs, _ = storage.resolve(plan.files[0])
        paths = [storage.resolve(file)[1] for file in plan.files]
        dataset = ray.data.read_parquet(paths, filesystem=fs, include_paths=plan.with_paths)
    # Blocks of a few batches: an actor takes a block whole, and small files come as one block.
    dataset = dataset.repartition(target_num_rows_per_block=BATCHES_PER_BLOCK * request.batch_size)
    cpus = actor_cpus(request, ray.cluster_resources().get("CPU", 0))
    if cpus < request.cpus_per_worker:
        echo(f"predict: each worker claims {cpus:.2g} CPUs of Ray's, so that reading and writing find one free")
    predicted = dataset.map_batches(
        Predictor,
        # Two batches at once per actor: one decodes while the other is on the model.
        compute=ray.data.ActorPoolStrategy(
            size=request.workers, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True
        ),
        fn_constructor_kwargs={
            "plan": dataclasses.replace(plan, files=[], image_list=None),
            "threads": request.cpus_per_worker,
        },
        batch_size=request.batch_size,
        batch_format="pyarrow",
        num_cpus=cpus,
        num_gpus=1 if request.use_gpu else 0,
    )
    fs, out = storage.resolve(request.out)
    storage.delete(storage.join(request.out, DONE))  # from here on, an earlier output is no longer complete
    storage.delete(request.out)
    try:
        predicted.write_parquet(out, filesystem=fs, min_rows_per_file=ROWS_PER_FILE)
    except ray.exceptions.RayError as e:
        raise TrainingError(f"prediction failed: {parquet.first_line(e)}") from e
    written = pq.read_table(out, columns=["error"], filesystem=fs)
    summary = {
        "rows": written.num_rows,
        "errors": written.num_rows - written.column("error").null_count,
        "seconds": round(time.monotonic() - started, 1),
        "out": storage.redact(storage.absolute(request.out)),
        "model": storage.redact(storage.absolute(request.model)),
    }
    storage.write_text_whole(storage.join(request.out, DONE), json.dumps(summary, indent=1))
    return summary


def actor_cpus(request: Request, cluster_cpus: float) -> float:
    """The CPUs each actor claims from Ray: its `cpus_per_worker`, unless the actors would then hold every CPU
    of the cluster. Ray Data starts the whole pool first, and its file listing, read and write tasks (a CPU each)
    would wait for ever; the actors then claim all but one CPU between them (they still decode with
    `cpus_per_worker` threads each)."""
    wanted = request.workers * request.cpus_per_worker
    if cluster_cpus < 2 or wanted <= cluster_cpus - 1:
        return float(request.cpus_per_worker)
    return (cluster_cpus - 1) / request.workers


class Predictor:
    """One actor of the pool: the export loaded once, then batch after batch."""

    def __init__(self, plan: Plan, threads: int):
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already initialised in this process
            pass
        self.plan, self.threads = plan, threads
        self.model = export.load_model(plan.model)
        # Traced once per batch shape; safe to call from the actor's two threads at once.
        self.forward = tf.function(lambda images: self.model(images, training=False), reduce_retracing=True)
        self.classes = plan.classes
        self.k = evaluation.top_k(len(plan.classes))
        from transfer.data.pipeline import FETCHES

        self.fetches = ThreadPoolExecutor(FETCHES)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from transfer.data.pipeline import UNDECODABLE

        data, errors = self._read(batch)
        decoded, images = self._decode(data)
        for i, d in enumerate(data):
            if d is not None and i not in decoded:
                errors[i] = UNDECODABLE
        probabilities = self.forward(images).numpy() if len(decoded) else np.zeros((0, len(self.classes)))
        return self._output(batch, errors, decoded, probabilities)

    def _read(self, batch: pa.Table) -> tuple[list[bytes | None], list[str | None]]:
        """Each row's encoded image (fetched where the row holds a URI), or None and why not."""
        column = batch.column(self.plan.image_column)
        if self.plan.with_paths:
            files = [self.plan.scheme + path for path in batch.column(RAY_PATH).to_pylist()]
            cells: list = [None] * batch.num_rows
            for file in dict.fromkeys(files):
                rows = [i for i, f in enumerate(files) if f == file]
                for i, cell in zip(rows, parquet.image_cells(column.take(rows), file), strict=True):
                    cells[i] = cell
        else:
            cells = parquet.image_cells(column, "")
        from transfer.data.pipeline import read_cells

        read = read_cells(cells, self.fetches)
        return [data for data, _ in read], [why for _, why in read]

    def _decode(self, data: list[bytes | None]) -> tuple[dict[int, int], np.ndarray]:
        """The rows that decode (row -> its place in the images) and their uint8 images, decoded in parallel;
        tf.data has no per-image try, so a row missing from the decode's output is one that did not decode."""
        import tensorflow as tf

        from transfer.data.pipeline import decode_image

        present = [i for i, d in enumerate(data) if d is not None]
        if not present:
            return {}, np.zeros((0, *self.plan.image_size, 3), np.uint8)
        rows = tf.data.Dataset.from_tensor_slices(
            (np.asarray(present, np.int64), tf.constant([data[i] for i in present], tf.string))
        )
        size = self.plan.image_size
        decoded = rows.map(
            lambda row, image: (row, decode_image(image, size)), num_parallel_calls=self.threads, deterministic=True
        )
        options = tf.data.Options()
        options.threading.private_threadpool_size = self.threads
        batches = decoded.ignore_errors().batch(len(present)).with_options(options)
        for row_ids, pixels in batches:
            return {int(row): place for place, row in enumerate(row_ids.numpy())}, pixels.numpy()
        return {}, np.zeros((0, *size, 3), np.uint8)

    def _output(
        self, batch: pa.Table, errors: list[str | None], decoded: dict[int, int], probabilities: np.ndarray
    ) -> pa.Table:
        n = batch.num_rows
        prediction: list[str | None] = [None] * n
        probability: list[float | None] = [None] * n
        top_k: list[list[dict] | None] = [None] * n
        if len(decoded):
            best = np.argpartition(-probabilities, self.k - 1, axis=1)[:, : self.k]
            for row, place in decoded.items():
                scores = probabilities[place]
                order = sorted(best[place], key=lambda c: -scores[c])
                prediction[row], probability[row] = self.classes[order[0]], float(scores[order[0]])
                top_k[row] = [{"class": self.classes[c], "probability": float(scores[c])} for c in order]
        dropped = [RAY_PATH] if self.plan.with_paths else []
        if not self.plan.keeps_image_column:
            dropped.append(self.plan.image_column)
        out = batch.drop_columns(dropped)
        for name, values, kind in (
            ("prediction", prediction, pa.string()),
            ("probability", probability, pa.float32()),
            ("top_k", top_k, TOP_K),
            ("error", errors, pa.string()),
        ):
            out = out.append_column(name, pa.array(values, kind))
        return out


def _schema(file: str) -> pa.Schema:
    fs, path = storage.resolve(file)
    try:
        return pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"--data: {storage.redact(file)}: cannot read as Parquet: {parquet.first_line(e)}") from None
