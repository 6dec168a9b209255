"""Data as users write it: a worker's memory on one giant row group, and the class mix of its batches on
class-sorted files, for the reader of an earlier commit and the working tree's, side by side.

    python benchmarks/layout.py --out results-layout.json [--repeats 3] [--before eab9226]

memory  the same 3,000 JPEGs of 384x512 px (the pipeline benchmark's, repeated) in one row group (what
        `pyarrow.parquet.write_table` writes by default) and in row groups of 128 rows; one worker's input
        (every row, decoded and resized to 224 px, nothing trained) in a fresh process on both cores; its peak
        RSS. Goal: giant / small <= 1.2x.
mixing  40 classes in 40 files of one row group each (a class per file, as data written a class at a time),
        250 rows each, planned for 2 workers; each worker's training batches of 32 over one epoch (the job's
        defaults: shuffle buffer 1,024 rows); the mean number of distinct classes in a batch against batches drawn
        i.i.d. (a random permutation) from the same worker's rows. Goal: >= 0.9x.
accuracy  the demo's data (5 classes, 3,000 JPEGs) with a fixed 20% validation file, its training rows written
        shuffled (row groups of 250) and class-sorted (a file per class, one row group each); the demo's job, both
        passes, run on each (the working tree's only); the fine-tune pass's final validation accuracy. Goal:
        class-sorted within 0.02 of shuffled. `--no-accuracy` skips it (~8 min).
`before` is the `transfer` package of a commit (`git archive`), `now` the working tree's; each measurement runs in
a fresh process with that package first on its path. The data is made once in
<TRANSFER_CACHE_DIR or ~/.cache/transfer>/bench-layout/ (the pipeline benchmark's 384x512 data is made first if
missing). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.append(REPO)

from benchmarks.cached import cache_folder, in_fresh_process, made_once  # noqa: E402

IMAGES = 3000
SMALL_ROW_GROUP = 128
CLASSES, ROWS_PER_CLASS, WORKERS, BATCH = 40, 250, 2, 32
TARGET = (224, 224)
GOALS = {"memory giant / small row groups": ("<=", 1.2), "distinct classes per batch / i.i.d.": (">=", 0.9)}
ACCURACY_GOAL = 0.02  # |val accuracy class-sorted - shuffled|


def memory_data(cache: str) -> dict:
    """The same JPEGs as one giant row group and as row groups of 128 rows."""

    def make(folder: str) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from benchmarks.pipeline import dataset_for

        source = dataset_for(cache_folder("bench-pipeline"), 512, 800, "4:3", 64)
        images = pq.read_table(source["path"], columns=["image"]).column("image").to_pylist()
        images = (images * (IMAGES // len(images) + 1))[:IMAGES]
        table = pa.table({"image": images, "label": [f"c{i % 4}" for i in range(IMAGES)]})
        for name, rows in (("giant", IMAGES), ("small", SMALL_ROW_GROUP)):
            os.makedirs(os.path.join(folder, "data", name))
            pq.write_table(table, os.path.join(folder, "data", name, "part.parquet"), row_group_size=rows)
        return {
            "images": IMAGES,
            "source": "384x512 photo-like JPEGs of benchmarks/pipeline.py",
            "bytes": sum(map(len, images)),
        }

    return made_once(cache, f"memory-n{IMAGES}", make)


def mixing_data(cache: str) -> dict:
    """A file per class, one row group each; each image a flat colour, a JPEG of 16x16."""

    def make(folder: str) -> dict:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import tensorflow as tf

        os.makedirs(os.path.join(folder, "data"))
        for c in range(CLASSES):
            image = tf.io.encode_jpeg(np.full((16, 16, 3), c * 6, np.uint8)).numpy()
            table = pa.table({"image": [image] * ROWS_PER_CLASS, "label": [f"class{c:02d}"] * ROWS_PER_CLASS})
            pq.write_table(table, os.path.join(folder, "data", f"class{c:02d}.parquet"))
        return {"classes": CLASSES, "rows_per_class": ROWS_PER_CLASS, "files": CLASSES, "row_groups_per_file": 1}

    return made_once(cache, f"mixing-c{CLASSES}-r{ROWS_PER_CLASS}", make)


def accuracy_data(cache: str) -> dict:
    """The demo's rows: a validation file, and the training rows shuffled and class-sorted."""

    def make(folder: str) -> dict:
        import numpy as np
        import pyarrow.parquet as pq

        from transfer import demo

        table = pq.read_table(demo.prepare()["train"])
        order = np.random.default_rng(0).permutation(table.num_rows)
        validation, train = table.take(order[: len(order) // 5]), table.take(order[len(order) // 5 :])
        for name in ("validation", "shuffled", "class_sorted"):
            os.makedirs(os.path.join(folder, "data", name))
        pq.write_table(validation, os.path.join(folder, "data", "validation", "part.parquet"))
        pq.write_table(train, os.path.join(folder, "data", "shuffled", "part.parquet"), row_group_size=250)
        labels = train.column("label").to_pylist()
        for c in sorted(set(labels)):
            rows = [i for i, label in enumerate(labels) if label == c]
            pq.write_table(train.take(rows), os.path.join(folder, "data", "class_sorted", f"{c}.parquet"))
        return {"train_rows": train.num_rows, "validation_rows": validation.num_rows, "classes": len(set(labels))}

    return made_once(cache, "accuracy-demo", make)


def run_job(data: str, validation: str, storage: str) -> dict:
    """The demo's job on `data`, both passes, as a user runs it; its JSON summary."""
    import yaml

    from transfer import demo

    config = demo.demo_config(demo.prepare())
    config["run"] = {"name": os.path.basename(data), "storage": storage}
    config["data"] = {**config["data"], "train": data, "validation": validation}
    config["data"].pop("validation_split")
    path = os.path.join(storage, os.path.basename(data) + ".yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    out = subprocess.run([sys.executable, "-m", "jobs.train", path], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}: {out.stderr.strip()[-1500:]}"}
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {pass_name: summary["passes"][pass_name]["final"] for pass_name in ("head", "finetune")}


# ---------------------------------------------------------------- one measurement, in a fresh process


def measure_memory(data: str) -> dict:
    import resource

    import tensorflow as tf

    from transfer.data import parquet, pipeline
    from transfer.data.plan import plan_dataset

    cpus = len(os.sched_getaffinity(0))
    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(cpus)
    index = parquet.scan(data, "image", "label")
    plan = plan_dataset(index, index, 0.0, 1, seed=0)
    ds = pipeline.make_dataset(
        plan.train.shards[0], plan.train.rows_per_worker, plan.classes, "image", "label", TARGET, BATCH,
        training=False, parallelism=pipeline.Parallelism.for_cpus(cpus),
    )  # fmt: skip
    start, rows = time.perf_counter(), 0
    for images, _ in ds:
        rows += int(images.shape[0])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "row_groups": len(index.row_groups), "seconds": seconds, "peak_rss_mb": peak}


def measure_mixing(data: str) -> dict:
    import numpy as np

    from transfer.data import parquet, pipeline
    from transfer.data.plan import plan_dataset

    index = parquet.scan(data, "image", "label")
    plan = plan_dataset(index, index, 0.0, WORKERS, seed=0)
    steps = plan.steps_per_epoch(BATCH)
    rng = np.random.default_rng(0)
    workers = []
    for rank, units in enumerate(plan.train.shards):
        ds = pipeline.make_dataset(
            units, plan.train.rows_per_worker, plan.classes, "image", "label", (16, 16), BATCH, training=True,
            seed=rank,
        )  # fmt: skip
        distinct = [len(set(labels.numpy())) for _, labels in ds.take(steps)]
        shard = np.array(_shard_labels(index, units))
        iid = [len(set(rng.permutation(shard)[i * BATCH : (i + 1) * BATCH])) for i in range(steps)]
        workers.append({
            "rank": rank, "classes_in_shard": len(set(shard)), "units": len(units), "steps": steps,
            "distinct_per_batch": float(np.mean(distinct)), "iid_distinct_per_batch": float(np.mean(iid)),
        })  # fmt: skip
    mean = float(np.mean([w["distinct_per_batch"] for w in workers]))
    iid = float(np.mean([w["iid_distinct_per_batch"] for w in workers]))
    return {"workers": workers, "distinct_per_batch": mean, "iid_distinct_per_batch": iid, "ratio": mean / iid}


def _shard_labels(index, units) -> list:
    starts, at = {}, 0
    for group in index.row_groups:
        starts[(group.file, group.index)] = at
        at += group.num_rows
    return [index.labels[starts[(u.file, u.row_group)] + r] for u in units for r in u.rows]


def run_one(tree: str, what: str, data: str) -> dict:
    env = {"PYTHONPATH": tree, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1"}
    return in_fresh_process(__file__, {"what": what, "data": data}, env, timeout=900)


def package_at(commit: str, into: str) -> str:
    """The `transfer` package of `commit`, unpacked into `into`; returns the folder to put on the path."""
    archive = subprocess.run(["git", "-C", REPO, "archive", commit, "transfer"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results-layout.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default="eab9226", help="the commit whose reader is the `before` contender")
    parser.add_argument("--cache-dir")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the two training runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        measure = measure_memory if spec["what"].startswith("memory") else measure_mixing
        import transfer

        print(json.dumps({**measure(spec["data"]), "package": os.path.dirname(transfer.__file__)}))
        return

    cache = cache_folder("bench-layout", args.cache_dir)
    memory, mixing = memory_data(cache), mixing_data(cache)
    data = {
        "memory_giant": os.path.join(memory["path"], "giant"),
        "memory_small": os.path.join(memory["path"], "small"),
        "mixing": mixing["path"],
    }
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory() as before_tree:
        trees = {"before": package_at(args.before, before_tree), "now": REPO}
        runs: dict[str, list[dict]] = {f"{c}/{w}": [] for c in trees for w in data}
        for repeat in range(args.repeats):
            contenders = list(trees) if repeat % 2 == 0 else list(trees)[::-1]
            for what in data:
                for contender in contenders:
                    result = run_one(trees[contender], what, data[what])
                    runs[f"{contender}/{what}"].append(result)
                    print(f"repeat {repeat + 1} {contender} {what}: {_shown(result)}", flush=True)
    report = summarize(runs, args)
    if not args.no_accuracy:
        report["accuracy"] = accuracy(cache)
    report["setup"].update(memory_data=memory, mixing_data=mixing, wall_s=time.time() - started)
    report["machine"] = {"nproc": os.cpu_count(), "load_average_before": load_before, "after": os.getloadavg()}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({"medians": report["medians"], "goals": report["goals"]}, indent=1))
    print(f"wrote {args.out}")
    if any("error" in r for rs in runs.values() for r in rs):
        raise SystemExit(1)


def accuracy(cache: str) -> dict:
    data = accuracy_data(cache)
    runs = {}
    with tempfile.TemporaryDirectory() as storage:
        for layout in ("shuffled", "class_sorted"):
            runs[layout] = run_job(
                os.path.join(data["path"], layout), os.path.join(data["path"], "validation"), storage
            )
            print(f"accuracy {layout}: {runs[layout]}", flush=True)
    if any("error" in r for r in runs.values()):
        return {"runs": runs, "met": False}
    difference = runs["class_sorted"]["finetune"]["val_accuracy"] - runs["shuffled"]["finetune"]["val_accuracy"]
    return {"data": data, "runs": runs, "finetune_val_accuracy_difference": difference,
            "goal": f"|difference| <= {ACCURACY_GOAL}", "met": abs(difference) <= ACCURACY_GOAL}  # fmt: skip


def _shown(result: dict) -> str:
    if "error" in result:
        return "FAILED " + result["error"][-300:]
    if "peak_rss_mb" in result:
        return f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['rows'] / result['seconds']:.0f} images/s"
    return (
        f"{result['distinct_per_batch']:.1f} distinct classes per batch (i.i.d. {result['iid_distinct_per_batch']:.1f})"
    )


def summarize(runs: dict, args: argparse.Namespace) -> dict:
    def median(key: str, field: str) -> float | None:
        values = [r[field] for r in runs[key] if field in r]
        return statistics.median(values) if values else None

    medians, goals = {}, {}
    for contender in ("before", "now"):
        giant = median(f"{contender}/memory_giant", "peak_rss_mb")
        small = median(f"{contender}/memory_small", "peak_rss_mb")
        mixing = median(f"{contender}/mixing", "ratio")
        medians[contender] = {
            "peak_rss_mb_giant_row_group": giant,
            "peak_rss_mb_small_row_groups": small,
            "memory giant / small row groups": giant / small if giant and small else None,
            "distinct_per_batch": median(f"{contender}/mixing", "distinct_per_batch"),
            "iid_distinct_per_batch": median(f"{contender}/mixing", "iid_distinct_per_batch"),
            "distinct classes per batch / i.i.d.": mixing,
        }
    for name, (op, bound) in GOALS.items():
        value = medians["now"][name]
        met = value is not None and (value <= bound if op == "<=" else value >= bound)
        goals[name] = {"value": value, "goal": f"{op} {bound}", "met": met, "before": medians["before"][name]}
    return {
        "benchmark": "layout",
        "setup": {"repeats": args.repeats, "before": args.before, "workers_mixing": WORKERS, "batch": BATCH},
        "medians": medians,
        "goals": goals,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
