"""Worker-side reading: peak RSS and images/s, from local files and from an S3 endpoint, at 1x and 4x the data.

    python benchmarks/data_read.py --out results-data.json [--images 2000] [--repeats 3]

Each measurement is a fresh process that plans the dataset as the driver does and reads one worker's shard
(of 2) through the job's own pipeline (read, decode, resize, batch), once. The S3 endpoint is moto's server on
127.0.0.1. Runs alternate between the contenders; the table and the JSON give medians and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.moto_s3 import start_moto_s3  # noqa: E402


def read_one_shard(location: str, image_size: int, batch_size: int) -> dict:
    """What one worker does with its shard: plan (as the driver), then read it through the pipeline once."""

    from transfer.data import parquet
    from transfer.data.pipeline import BadRecords, make_dataset
    from transfer.data.plan import plan_dataset

    index = parquet.scan(location, "image", "label")
    plan = plan_dataset(index, None, 0.1, num_workers=2, seed=0)
    split = plan.train
    ds = make_dataset(
        split.shards[0], split.rows_per_worker, plan.classes, "image", "label", (image_size, image_size),
        batch_size, training=False, bad=BadRecords("skip"),
    )  # fmt: skip
    before = _peak_rss_mb()  # TensorFlow, pyarrow and the plan: what the worker holds before it reads
    start = time.perf_counter()
    rows = sum(int(images.shape[0]) for images, _ in ds)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    return {
        "rows": rows,
        "seconds": seconds,
        "images_per_s": rows / seconds,
        "peak_rss_mb": peak,
        "rss_growth_while_reading_mb": peak - before,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_dataset_files(directory: str, images: int, size: int) -> None:
    """JPEGs of the demo's classes, in 4 Parquet files of 256-row row groups."""

    from transfer import demo

    demo.write_parquet_dataset(
        directory, per_class=images // len(demo.TARGET_CLASSES), size=size,
        files=((0.25, 256), (0.25, 256), (0.25, 256), (0.25, 256)),
    )  # fmt: skip


def measure(location: str, env: dict, image_size: int, batch_size: int) -> dict:
    args = json.dumps({"location": location, "image_size": image_size, "batch_size": batch_size})
    result = subprocess.run(
        [sys.executable, __file__, "--worker", args],
        env={**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results-data.json")
    parser.add_argument("--images", type=int, default=4000, help="images in the 1x dataset")
    parser.add_argument("--image-size", type=int, default=128, help="side of the stored JPEGs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(read_one_shard(spec["location"], spec["image_size"], spec["batch_size"])))
        return

    server, env = start_moto_s3()
    os.environ.update(env)
    work = tempfile.mkdtemp(prefix="transfer-bench-")
    try:
        import boto3

        from transfer import storage

        boto3.client("s3").create_bucket(Bucket="transfer-bench")
        locations = {}
        for scale in (1, 4):
            local = os.path.join(work, f"x{scale}")
            make_dataset_files(local, args.images * scale, args.image_size)
            storage.upload_dir(local, f"s3://transfer-bench/x{scale}")
            locations[("local", scale)] = local
            locations[("s3", scale)] = f"s3://transfer-bench/x{scale}/"
        runs: dict[str, list[dict]] = {f"{where}-x{scale}": [] for where, scale in locations}
        for _ in range(args.repeats):  # alternate contenders so the machine's noise falls on all of them
            for (where, scale), location in locations.items():
                runs[f"{where}-x{scale}"].append(measure(location, env, 224, 32))
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)

    medians = {
        name: {
            k: statistics.median(r[k] for r in results)
            for k in ("images_per_s", "peak_rss_mb", "rss_growth_while_reading_mb", "rows")
        }
        for name, results in runs.items()
    }
    ratios = {
        "peak_rss_x4_over_x1_local": medians["local-x4"]["peak_rss_mb"] / medians["local-x1"]["peak_rss_mb"],
        "peak_rss_x4_over_x1_s3": medians["s3-x4"]["peak_rss_mb"] / medians["s3-x1"]["peak_rss_mb"],
        "images_per_s_s3_over_local_x1": medians["s3-x1"]["images_per_s"] / medians["local-x1"]["images_per_s"],
        "images_per_s_s3_over_local_x4": medians["s3-x4"]["images_per_s"] / medians["local-x4"]["images_per_s"],
    }
    report = {
        "benchmark": "data_read",
        "setup": {
            "images_x1": args.images,
            "stored_image_size": args.image_size,
            "decoded_to": 224,
            "workers_planned": 2,
            "measured": "one worker's shard read once through the job's pipeline, in a fresh process",
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
        },
        "medians": medians,
        "ratios": ratios,
        "goals": {"peak_rss_x4_over_x1": "<= 1.2", "images_per_s_s3_over_local": ">= 0.8"},
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'contender':<10} {'rows':>6} {'images/s':>9} {'peak RSS MB':>12} {'growth MB':>10}")
    for name, m in medians.items():
        print(
            f"{name:<10} {m['rows']:>6.0f} {m['images_per_s']:>9.0f} {m['peak_rss_mb']:>12.0f} "
            f"{m['rss_growth_while_reading_mb']:>10.0f}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
