"""One worker's input pipeline alone: decoded, resized batches per second, nothing trained.

    python benchmarks/pipeline.py --out results-pipeline.json [--repeats 3] [--sizes 128,512,1024] [--scale 1]

The same Parquet files of JPEG bytes (photo-like images, see `photo_like`) at each source size, resized to
224x224 in batches of 32, by three contenders:
  plain_full     the textbook tf.data decode: from_tensor_slices(bytes in memory).map(decode_jpeg + resize)
  plain_reduced  the same, but libjpeg decodes at the largest DCT scale 1/r (r in 8, 4, 2, 1) that keeps both
                 sides at least r times the target's: the fair baseline for what the job's pipeline does
  pipeline       the job's own worker pipeline, transfer.data.pipeline.make_dataset, on a 1-worker plan
  pipeline_tcmalloc  the same on tcmalloc (LD_PRELOAD), as the job's workers run where it is installed
                 (apt-get install libtcmalloc-minimal4; the cluster image has it)
Each measurement is a fresh process pinned to 1 or 2 cores (os.sched_setaffinity), with TensorFlow's
intra/inter-op pools and tf.data parallelism sized to that many threads, as a Ray worker with cpus_per_worker=N.
It times one pass's worth of batches of an endless training input (plain: .repeat()) after 4 warm-up batches,
and reports images/s, CPU ms per image and the process's peak RSS. Repeats alternate the contenders' order; the
table and the JSON give medians, the ratios, and the project's goals.
The generated data is made once (~1.5 min on 2 cores) and cached in <TRANSFER_CACHE_DIR or ~/.cache/transfer>/
bench-pipeline/; a run of the defaults then takes ~9-11 min on 2 cores. Run it alone on the machine: anything
else on the same cores distorts every number (the load average before and after is recorded).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported for real inside the functions: the parent process never loads TensorFlow
    import numpy as np
    import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: a scratch copy of `transfer` on PYTHONPATH (a pipeline.py under test) wins.
if REPO not in sys.path:
    sys.path.append(REPO)

from benchmarks.cached import cache_folder, in_fresh_process, made_once  # noqa: E402  (after the repo is on the path)
from transfer import allocator  # noqa: E402  (TensorFlow-free)

CONTENDERS = ("plain_full", "plain_reduced", "pipeline", "pipeline_tcmalloc")
PIPELINES = ("pipeline", "pipeline_tcmalloc")
TARGET = (224, 224)
BATCH = 32
WARM_UP_BATCHES = 4
SHUFFLE_BUFFER = 4 * BATCH  # the pipeline's: small, so the warm-up does not decode the dataset several times
QUALITY = 90
CLASSES = ("cat", "dog", "fox", "owl")
# ~1.5 s of a plain decode per measurement on one core here (more for a slower pipeline), ~6 min in all
DEFAULT_IMAGES = {128: 3000, 512: 800, 1024: 320}
GENERATE_CHUNK = 32  # images per generating task
DATA_VERSION = "v3"  # bump when the images change, so a stale cache is not reused
IMAGES_DESCRIPTION = (
    "photo-like synthetic JPEGs: luma from smooth random fields at every octave down to 2 px (amplitude "
    "falling slowly with frequency, like natural texture), coarse chroma fields, a linear light gradient, "
    "3-7 sharp-edged regions (ellipses, half-planes), per-pixel grain (luma sigma 8, chroma 2.7); "
    f"tf.io.encode_jpeg quality {QUALITY}, baseline, 4:2:0 chroma"
)


# ---------------------------------------------------------------- data


def source_shape(size: int, aspect: str) -> tuple[int, int]:
    """(height, width) of a source image: `size` is the long side; 4:3 is landscape, as most photos."""
    return (size, size) if aspect == "1:1" else (size * 3 // 4, size)


def reduced_ratio(height: int, width: int, target: tuple[int, int] = TARGET) -> int:
    """The largest DCT scale divisor r in (8, 4, 2) with both sides at least r times the target's, else 1."""
    return next((r for r in (8, 4, 2) if height >= r * target[0] and width >= r * target[1]), 1)


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB uint8 image that compresses and decodes like a photo, not like a flat drawing.

    Flat synthetic shapes make JPEGs of mostly empty DCT blocks that decode several times faster than
    photos; the entropy decoding of busy blocks is what a real pipeline pays for. So: texture at every
    scale, edges, and grain, tuned to ~0.4-0.5 bytes per pixel at quality 90 (camera photos: ~0.3-0.6).
    """
    import numpy as np
    import tensorflow as tf

    longest = max(height, width)

    def noise(cells: int, channels: int) -> np.ndarray:
        """Unit noise on a grid of `cells` along the long side."""
        shape = (max(2, round(cells * height / longest)), max(2, round(cells * width / longest)), channels)
        return rng.standard_normal(shape, dtype=np.float32)

    def upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return tf.image.resize(field, shape, method="bicubic").numpy()

    # Luma: a pyramid, 2 cells up to longest/2 cells (2 px features), each octave's noise added at its own
    # grid, then smoothed by the upsampling above it. Fine scales nearly as strong as coarse: texture.
    luma, cells, octave = noise(2, 1), 2, 0
    while cells * 2 <= longest // 2:
        cells, octave = cells * 2, octave + 1
        finer = noise(cells, 1)
        luma = upsample(luma, finer.shape[:2]) + finer * 2 ** (-0.1 * octave)
    luma = upsample(luma, (height, width))
    image = luma * (32.0 / (luma.std() + 1e-6))  # a photo's contrast, whatever the number of octaves
    image = image + upsample(noise(3, 3), (height, width)) * 25 + upsample(noise(12, 3), (height, width)) * 8
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = np.cos(angle) * xx / width + np.sin(angle) * yy / height
    image += light[..., None] * np.float32(rng.uniform(-60, 60)) * (1 + rng.uniform(-0.2, 0.2, 3)).astype(np.float32)
    for _ in range(rng.integers(3, 8)):  # objects: regions with sharp borders and their own tint
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * longest
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + ((yy - cy) * rng.uniform(0.5, 2)) ** 2 < r**2
        else:
            b = rng.uniform(0, 2 * np.pi)
            mask = np.cos(b) * (xx - cx) + np.sin(b) * (yy - cy) > 0
        tint = (rng.uniform(-50, 50) * (1 + rng.uniform(-0.3, 0.3, 3))).astype(np.float32)
        image += mask[..., None] * tint
    image += rng.uniform(100, 150, 3).astype(np.float32)
    image += rng.standard_normal((height, width, 1), dtype=np.float32) * 8  # sensor grain: luma,
    image += rng.standard_normal((height, width, 3), dtype=np.float32) * (8 / 3)  # and weaker chroma
    return np.clip(image, 0, 255).astype(np.uint8)


def dataset_for(cache: str, size: int, images: int, aspect: str, row_group: int) -> dict:
    """The Parquet dataset of one source size, made once and cached; returns where it is and what it holds."""
    height, width = source_shape(size, aspect)
    name = f"{DATA_VERSION}-{height}x{width}-n{images}-rg{row_group}"
    return made_once(cache, name, lambda folder: _write_dataset(folder, height, width, images, row_group, seed=size))


def _write_dataset(directory: str, height: int, width: int, images: int, row_group: int, seed: int) -> dict:
    """Two Parquet files (image bytes, string label) in data/, row groups of `row_group` rows; what they hold."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Chunks on all cores (a fresh interpreter each: this process has not loaded TensorFlow), each chunk
    # seeded by its position, so the images do not depend on the number of cores.
    chunks = [(height, width, min(GENERATE_CHUNK, images - i), (seed, i)) for i in range(0, images, GENERATE_CHUNK)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(os.sched_getaffinity(0)), mp_context=context) as pool:
        encoded = [jpeg for chunk in pool.map(_encode_chunk, *zip(*chunks, strict=True)) for jpeg in chunk]
    labels = [CLASSES[i % len(CLASSES)] for i in range(images)]
    half = images // 2
    os.makedirs(os.path.join(directory, "data"))
    for part, (start, stop) in enumerate(((0, half), (half, images))):
        table = pa.table(
            {"image": pa.array(encoded[start:stop], type=pa.binary()), "label": pa.array(labels[start:stop])}
        )
        pq.write_table(table, os.path.join(directory, "data", f"part-{part}.parquet"), row_group_size=row_group)
    total = sum(len(e) for e in encoded)
    info = {
        "images": images,
        "height": height,
        "width": width,
        "row_group_rows": row_group,
        "files": 2,
        "jpeg_bytes": total,
        "bytes_per_pixel": total / (images * height * width),
        "reduced_ratio": reduced_ratio(height, width),
    }
    return info


def _encode_chunk(height: int, width: int, count: int, seed: tuple[int, int]) -> list[bytes]:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    return [tf.io.encode_jpeg(photo_like(rng, height, width), quality=QUALITY).numpy() for _ in range(count)]


# ---------------------------------------------------------------- one measurement (in its own process)


def measure(contender: str, data: str, cpus: int) -> dict:
    """One full pass of one contender in this process, pinned to `cpus` cores. Call before TensorFlow loads."""
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, available[:cpus])  # before TensorFlow starts its threads: they inherit it

    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow loads, as `transfer` sets it in the job's workers
    import tensorflow as tf

    # What the job's worker does with cpus_per_worker=N (train_loop._size_thread_pools), for every contender.
    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(cpus)
    extra: dict = {}
    if contender in PIPELINES:
        ds, extra = _job_pipeline(data, cpus)
        extra["allocator"] = allocator.in_this_process()
    else:
        ds = _plain(data, cpus, reduced=contender == "plain_reduced").repeat()
    import pyarrow.dataset

    pass_batches = pyarrow.dataset.dataset(data).count_rows() // BATCH
    batches = iter(ds)
    for _ in range(WARM_UP_BATCHES):  # traces the functions, starts the pools, opens the files, fills the buffers
        images, _ = next(batches)
    # A sanity check (the pipeline orders rows differently: means agree roughly, not exactly).
    first_batch_mean = float(tf.reduce_mean(tf.cast(images, tf.float32)))
    dtype, shape = images.dtype.name, list(images.shape[1:])
    start, cpu_start = time.perf_counter(), time.process_time()
    rows = 0
    for _ in range(pass_batches):  # one pass's worth, in the steady state of an endless training input
        rows += int(next(batches)[0].shape[0])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "contender": contender,
        "cpus": cpus,
        "cores_pinned": sorted(os.sched_getaffinity(0)),
        "rows": rows,
        "seconds": seconds,
        "images_per_s": rows / seconds,
        "cpu_ms_per_image": 1000 * cpu_seconds / rows,  # all the process's threads: what an image costs
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_batch_mean": first_batch_mean,
        "image_dtype": dtype,
        "image_shape": shape,
        **extra,
    }


def _plain(data: str, cpus: int, reduced: bool) -> tf.data.Dataset:
    """The textbook tf.data decode of the bytes column, read into memory first (not timed)."""
    import pyarrow.parquet as pq
    import tensorflow as tf

    table = pq.read_table(data, columns=["image", "label"])
    classes = sorted(set(table["label"].to_pylist()))
    labels = [classes.index(v) for v in table["label"].to_pylist()]

    def full(encoded: tf.Tensor) -> tf.Tensor:
        return tf.io.decode_jpeg(encoded, channels=3)

    def at_reduced_scale(encoded: tf.Tensor) -> tf.Tensor:
        # `ratio` must be a Python int: one branch per DCT scale, chosen from the header alone.
        shape = tf.io.extract_jpeg_shape(encoded)
        fits = tf.minimum(shape[0] // TARGET[0], shape[1] // TARGET[1])  # how many times the target fits
        branch = tf.cast(fits < 8, tf.int32) + tf.cast(fits < 4, tf.int32) + tf.cast(fits < 2, tf.int32)
        return tf.switch_case(
            branch, [lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for r in (8, 4, 2, 1)]
        )

    decode = at_reduced_scale if reduced else full
    return (
        tf.data.Dataset.from_tensor_slices((table["image"].to_pylist(), labels))
        .map(lambda encoded, label: (tf.image.resize(decode(encoded), TARGET), label), num_parallel_calls=cpus)
        .batch(BATCH)
        .prefetch(tf.data.AUTOTUNE)
    )


def _job_pipeline(data: str, cpus: int) -> tuple[tf.data.Dataset, dict]:
    """The job's worker pipeline over a 1-worker plan holding every row, as a validation pass reads it."""
    from transfer.data import parquet
    from transfer.data import pipeline as job_pipeline
    from transfer.data.plan import plan_dataset

    index = parquet.scan(data, "image", "label")
    plan = plan_dataset(index, index, 0.0, 1, seed=0)
    # The pipeline is gaining a `parallelism` keyword (the worker's CPUs): a plain int, or (in a draft of the
    # rewrite) a `Parallelism` built by `Parallelism.for_cpus`. Pass what the signature takes, if anything.
    parameter = inspect.signature(job_pipeline.make_dataset).parameters.get("parallelism")
    kwargs: dict = {}
    passed = None
    if parameter is not None:
        sizing = getattr(job_pipeline, "Parallelism", None)
        if sizing is not None and "Parallelism" in str(parameter.annotation):
            kwargs["parallelism"], passed = sizing.for_cpus(cpus), f"Parallelism.for_cpus({cpus})"
        else:
            kwargs["parallelism"], passed = cpus, str(cpus)
    ds = job_pipeline.make_dataset(
        plan.train.shards[0],
        plan.train.rows_per_worker,
        plan.classes,
        "image",
        "label",
        TARGET,
        BATCH,
        training=True,
        shuffle_buffer=SHUFFLE_BUFFER,
        **kwargs,
    )
    with open(job_pipeline.__file__, "rb") as f:
        source_sha = hashlib.sha256(f.read()).hexdigest()[:12]
    return ds, {
        "parallelism_passed": passed,
        "pipeline_py": job_pipeline.__file__,
        "pipeline_py_sha256": source_sha,
    }


def run_one(contender: str, data: str, cpus: int) -> dict:
    """One measurement in a fresh process; a failure comes back as a record, so the others still run."""
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": str(cpus)}  # Ray: OMP = the worker's CPUs
    if contender == "pipeline_tcmalloc":  # as the job's workers run where tcmalloc is installed
        env |= allocator.worker_env(None)
    result = in_fresh_process(__file__, {"contender": contender, "data": data, "cpus": cpus}, env, timeout=600)
    return {"contender": contender, "cpus": cpus, **result} if "error" in result else result


# ---------------------------------------------------------------- the run, the summary, the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results-pipeline.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sizes", default="128,512,1024", help="source sizes (long side, px); other than the defaults: 400 images each"
    )
    parser.add_argument("--cpus", default="1,2", help="CPU counts to pin each measurement to")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the images per size (3000/800/320)")
    parser.add_argument("--aspect", choices=("4:3", "1:1"), default="4:3")
    parser.add_argument("--row-group", type=int, default=64, help="rows per Parquet row group")
    parser.add_argument("--cache-dir", help="where the generated data lives (default: TRANSFER_CACHE_DIR or ~/.cache)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(spec["contender"], spec["data"], spec["cpus"])))
        return

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # for the processes this one starts
    sizes = [int(s) for s in args.sizes.split(",")]
    available = len(os.sched_getaffinity(0))
    cpu_counts = [int(c) for c in args.cpus.split(",") if int(c) <= available]
    if not cpu_counts:
        raise SystemExit(f"--cpus {args.cpus}: this process may run on {available} cores only")
    cache = cache_folder("bench-pipeline", args.cache_dir)
    datasets = {}
    for size in sizes:
        images = max(BATCH, round(DEFAULT_IMAGES.get(size, 400) * args.scale))
        datasets[size] = dataset_for(cache, size, images, args.aspect, args.row_group)
        d = datasets[size]
        print(
            f"{d['width']}x{d['height']}: {d['images']} JPEGs, {d['bytes_per_pixel']:.3f} bytes/pixel, "
            f"reduced decode at 1/{d['reduced_ratio']}",
            flush=True,
        )

    load_before = os.getloadavg()
    if load_before[0] > 0.5:  # two cores: any other work on them distorts every number below
        print(f"warning: load average {load_before[0]:.2f} before the run; is something else running?", flush=True)
    if not allocator.tcmalloc_path():
        raise SystemExit("no tcmalloc on this machine for pipeline_tcmalloc: apt-get install libtcmalloc-minimal4")
    runs: dict[str, list[dict]] = {key(s, c, n): [] for s in sizes for c in cpu_counts for n in CONTENDERS}
    started = time.time()
    for repeat in range(args.repeats):
        turn = repeat % len(CONTENDERS)
        order = CONTENDERS[turn:] + CONTENDERS[:turn]  # each contender goes first in turn
        for size in sizes:
            for cpus in cpu_counts:
                for contender in order:
                    result = run_one(contender, datasets[size]["path"], cpus)
                    result["repeat"] = repeat
                    runs[key(size, cpus, contender)].append(result)
                    shown = f"{result['images_per_s']:.0f} images/s" if "error" not in result else "FAILED"
                    print(f"repeat {repeat + 1}/{args.repeats} {size}px {cpus} CPU {contender}: {shown}", flush=True)
                with open(args.out + ".partial", "w") as f:  # a later crash loses nothing measured so far
                    json.dump(runs, f)
    report = summarize(runs, sizes, cpu_counts, datasets, args)
    report["machine"]["load_average_before"] = load_before
    report["machine"]["load_average_after"] = os.getloadavg()
    report["setup"]["wall_s"] = time.time() - started
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if os.path.exists(args.out + ".partial"):
        os.remove(args.out + ".partial")
    print()
    print(tables(report, sizes, cpu_counts))
    failures = [r for rs in runs.values() for r in rs if "error" in r]
    for r in failures[:3]:
        print(f"\n{r['contender']} ({r['cpus']} CPU) failed: {r['error']}", file=sys.stderr)
    print(f"\nwrote {args.out}")
    if failures:
        raise SystemExit(1)


def key(size: int, cpus: int, contender: str) -> str:
    """The name of one (source size, CPU count, contender) cell in `runs`, `medians` and `ratios`."""
    return f"{size}px/{cpus}cpu/{contender}"


def summarize(runs: dict, sizes: list[int], cpu_counts: list[int], datasets: dict, args: argparse.Namespace) -> dict:
    """The report: setup, machine, medians, ratios, the project's goals (met or not), and every raw run."""

    def median(size: int, cpus: int, contender: str, field: str) -> float | None:
        values = [r[field] for r in runs[key(size, cpus, contender)] if "error" not in r]
        return statistics.median(values) if values else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    medians = {
        k: {
            f: median(*split_key(k), f)
            for f in ("images_per_s", "cpu_ms_per_image", "peak_rss_mb", "seconds", "first_batch_mean")
        }
        for k in runs
    }
    ips = {k: m["images_per_s"] for k, m in medians.items()}
    ratios: dict[str, float | None] = {}
    for s in sizes:
        for c in cpu_counts:
            full, reduced = ips[key(s, c, "plain_full")], ips[key(s, c, "plain_reduced")]
            for p in PIPELINES:
                ratios[f"{s}px/{c}cpu/{p}_over_plain_full"] = ratio(ips[key(s, c, p)], full)
                ratios[f"{s}px/{c}cpu/{p}_over_plain_reduced"] = ratio(ips[key(s, c, p)], reduced)
            ratios[f"{s}px/{c}cpu/plain_reduced_over_plain_full"] = ratio(reduced, full)
        lo, hi = min(cpu_counts), max(cpu_counts)
        if hi > lo:
            for n in CONTENDERS:
                ratios[f"{s}px/{n}/{hi}cpu_over_{lo}cpu"] = ratio(ips[key(s, hi, n)], ips[key(s, lo, n)])

    def goal(name: str, value: float | None, bound: float) -> dict:
        return {"goal": name, "value": value, "bound": bound, "met": value is not None and value >= bound}

    goals = []
    for p in PIPELINES:
        for s in sizes:
            for c in cpu_counts:
                for base in ("plain_full", "plain_reduced"):
                    goals.append(goal(f"{s}px {c} CPU: {p} / {base}", ratios[f"{s}px/{c}cpu/{p}_over_{base}"], 0.9))
        if len(cpu_counts) > 1:
            lo, hi = min(cpu_counts), max(cpu_counts)
            goals += [
                goal(f"{s}px: {p} {hi} CPUs / {lo} CPU", ratios[f"{s}px/{p}/{hi}cpu_over_{lo}cpu"], 1.7) for s in sizes
            ]
        if 1024 in sizes:
            goals += [
                goal(
                    f"1024px {c} CPU: {p} / plain_full (a full-size decode)",
                    ratios[f"1024px/{c}cpu/{p}_over_plain_full"],
                    2.0,
                )
                for c in cpu_counts
            ]
    shas = sorted({r.get("pipeline_py_sha256") for rs in runs.values() for r in rs if r.get("pipeline_py_sha256")})
    return {
        "benchmark": "pipeline",
        "setup": {
            "measured": "one pass's worth of batches of one worker's endless training input (read, decode, resize, "
            "shuffle, batch) after 4 warm-up batches, "
            "nothing trained, each measurement in a fresh process pinned to N cores with TensorFlow's "
            "intra/inter-op pools and the plain contenders' num_parallel_calls set to N",
            "contenders": {
                "plain_full": "from_tensor_slices(bytes in memory).map(decode_jpeg + resize, num_parallel_calls=N)"
                ".batch(32).prefetch(AUTOTUNE)",
                "plain_reduced": "the same with decode_jpeg(ratio=r), r the largest of 8/4/2/1 with both sides "
                ">= r x 224",
                "pipeline": "transfer.data.pipeline.make_dataset on a 1-worker plan of every row, training=True "
                "(reads the Parquet files in the timed pass; the plain contenders hold the bytes in memory)",
                "pipeline_tcmalloc": "the same, with tcmalloc preloaded (LD_PRELOAD) as the job's workers run "
                "where it is installed (transfer/allocator.py)",
            },
            "target": list(TARGET),
            "batch": BATCH,
            "repeats": args.repeats,
            "cpu_counts": cpu_counts,
            "scale": args.scale,
            "aspect": args.aspect,
            "images": IMAGES_DESCRIPTION,
            "bytes_per_pixel": {str(s): datasets[s]["bytes_per_pixel"] for s in sizes},
            "bytes_per_pixel_reference": "camera photos at JPEG quality 90: ~0.3-0.6",
            "datasets": {str(s): datasets[s] for s in sizes},
            "pipeline_py_sha256_seen": shas,  # more than one: pipeline.py changed during the run
            "pipeline_py_paths": sorted({r["pipeline_py"] for rs in runs.values() for r in rs if "pipeline_py" in r}),
            "git": _git_state(),
        },
        "machine": {
            "nproc": os.cpu_count(),
            "cores_allowed": len(os.sched_getaffinity(0)),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "libraries": {p: _version(p) for p in ("tensorflow", "tf_keras", "pyarrow", "numpy", "ray")},
        },
        "medians": medians,
        "ratios": ratios,
        "goals": goals,
        "runs": runs,
    }


def split_key(k: str) -> tuple[int, int, str]:
    """The inverse of `key`."""
    size, cpus, contender = k.split("/")
    return int(size.removesuffix("px")), int(cpus.removesuffix("cpu")), contender


def tables(report: dict, sizes: list[int], cpu_counts: list[int]) -> str:
    """The medians and ratios as Markdown: per source size and CPU count; per contender, the CPU scaling."""
    m, r, sets = report["medians"], report["ratios"], report["setup"]["datasets"]

    def cell(value: float | None, digits: int = 0, suffix: str = "") -> str:
        return "-" if value is None else f"{value:.{digits}f}{suffix}"  # "-": no successful run

    def source(s: int) -> str:
        d = sets[str(s)]
        return f"{d['width']}x{d['height']} ({d['bytes_per_pixel']:.2f} B/px, r={d['reduced_ratio']})"

    lines = [
        "images/s (median), 224x224 batches of 32",
        "",
        "| source | CPUs | "
        + " | ".join(CONTENDERS)
        + "".join(f" | {p} / plain_full | {p} / plain_reduced" for p in PIPELINES)
        + " | plain_reduced / plain_full |",
        "|---|---|" + "---|" * (len(CONTENDERS) + 2 * len(PIPELINES) + 1),
    ]
    for s in sizes:
        for c in cpu_counts:
            ips = [m[key(s, c, n)]["images_per_s"] for n in CONTENDERS]
            over = [r[f"{s}px/{c}cpu/{p}_over_{base}"] for p in PIPELINES for base in ("plain_full", "plain_reduced")]
            lines.append(
                f"| {source(s)} | {c} | "
                + " | ".join(cell(v) for v in ips)
                + "".join(f" | {cell(v, 2, 'x')}" for v in over)
                + f" | {cell(r[f'{s}px/{c}cpu/plain_reduced_over_plain_full'], 2, 'x')} |"
            )
    lo, hi = min(cpu_counts), max(cpu_counts)
    scaled = hi > lo
    header = "| source | contender | " + " | ".join(f"{c} CPU images/s" for c in cpu_counts)
    header += f" | {hi} CPU / {lo} CPU" if scaled else ""
    header += " | " + " | ".join(f"peak RSS MB ({c} CPU)" for c in cpu_counts) + " |"
    lines += ["", header, "|---|---|" + "---|" * (2 * len(cpu_counts) + scaled)]
    for s in sizes:
        for n in CONTENDERS:
            row = f"| {source(s)} | {n} | " + " | ".join(cell(m[key(s, c, n)]["images_per_s"]) for c in cpu_counts)
            row += f" | {cell(r[f'{s}px/{n}/{hi}cpu_over_{lo}cpu'], 2, 'x')}" if scaled else ""
            row += " | " + " | ".join(cell(m[key(s, c, n)]["peak_rss_mb"]) for c in cpu_counts) + " |"
            lines.append(row)
    lines += ["", "goals:"]
    for g in report["goals"]:
        lines.append(
            f"- {'MET ' if g['met'] else 'NOT MET'} {g['goal']}: {cell(g['value'], 2, 'x')} (goal >= {g['bound']}x)"
        )
    failed = [k for k, rs in report["runs"].items() if any("error" in r for r in rs)]
    if failed:
        lines.append(f"- FAILED measurements (their errors are in the JSON): {', '.join(failed)}")
    git, seen = report["setup"]["git"], report["setup"]["pipeline_py_sha256_seen"]
    commit = (git["commit"] or "?")[:8]
    same = seen == [git["head_pipeline_py_sha256"]]
    lines.append(
        f"\npipeline.py measured: {', '.join(report['setup']['pipeline_py_paths']) or '-'}, sha256 "
        f"{', '.join(seen) or '-'} ({'the same as' if same else 'not'} the one of commit {commit})"
    )
    if len(seen) > 1:
        lines.append("warning: transfer/data/pipeline.py changed during the run; the pipeline's numbers mix versions")
    lines.append(
        f"wall time {report['setup']['wall_s']:.0f} s; load average before/after "
        f"{report['machine']['load_average_before'][0]:.2f}/{report['machine']['load_average_after'][0]:.2f}"
    )
    return "\n".join(lines)


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_state() -> dict:
    """The commit, and its pipeline.py's hash: the one measured is often a work in progress."""

    def git(*argv: str) -> str | None:
        out = subprocess.run(["git", "-C", REPO, *argv], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    head = subprocess.run(
        ["git", "-C", REPO, "show", "HEAD:transfer/data/pipeline.py"], capture_output=True
    )  # bytes, hashed as the measuring process hashes the file it imported
    return {
        "commit": git("rev-parse", "HEAD"),
        "head_pipeline_py_sha256": hashlib.sha256(head.stdout).hexdigest()[:12] if head.returncode == 0 else None,
        "repo_pipeline_py_modified": bool(git("status", "--porcelain", "transfer/data/pipeline.py")),
    }


if __name__ == "__main__":
    main()
