"""transfer-predict against a plain single-process `model.predict` loop, the same export over the same files.

    python benchmarks/predict.py --out benchmarks/results/predict.json [--images 1000] [--repeats 2]

Contenders, alternating, each in a fresh process:
  plain       one process: pyarrow reads the files, tf.data decodes and resizes on every CPU, model.predict, argmax
  predict_1w  transfer-predict --workers 1 --cpus-per-worker 2 (one actor decoding on both CPUs)
  predict_2w  transfer-predict --workers 2 (two actors, one CPU each)
Each runs over the data once (N images) and REPEAT times over (the files listed that often), timed from process
start to exit as a user waits for it. Reported per contender: the wall seconds of each, images/s end to end over
the larger, and the marginal rate (REPEAT - 1) N / (wall(REPEAT N) - wall(N)), which leaves out what every run pays
once (Python, TensorFlow and Ray start-up, loading the model). Medians over the repeats, and each rate's ratio to
the plain loop's. The plain loop decodes at full size, as a hand-written one does; transfer-predict as training
does (`decode_image`: a JPEG at least 2x the target is decoded at a reduced DCT scale).

The data is benchmarks/run.py's (JPEGs of --source-size px, cached in bench-peers/); the export is mobilenet_v2
at 96 px with random weights (what is measured does not depend on trained weights), written once per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.cached import cache_folder  # noqa: E402  (after the repo is on the path)
from benchmarks.run import dataset_for  # noqa: E402

BACKBONE, IMAGE_SIZE, BATCH = "mobilenet_v2", 96, 64
CONTENDERS = ("plain", "predict_1w", "predict_2w")
REPEAT = 4  # the larger run's copies of the data: enough images that their cost stands out of the start-up's

# The plain loop: what a user writes by hand without this job.
PLAIN = """
import json, sys
import numpy as np, pyarrow.parquet as pq, tensorflow as tf
export, files, size, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = tf.keras.models.load_model(export + "/model.keras")
classes = json.load(open(export + "/labels.json"))
def images():
    for file in files:
        for group in pq.ParquetFile(file).iter_batches(256, columns=["image"]):
            yield from group.column(0).to_pylist()
decode = lambda b: tf.cast(tf.round(tf.image.resize(tf.io.decode_jpeg(b, channels=3), (size, size))), tf.uint8)
data = tf.data.Dataset.from_generator(images, output_signature=tf.TensorSpec((), tf.string))
data = data.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)
predicted = [classes[i] for i in model.predict(data, verbose=0).argmax(axis=1)]
print(json.dumps({"rows": len(predicted)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON report")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--source-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", help="where the data is made once (default: bench-peers/ in the cache)")
    args = parser.parse_args()

    dataset = dataset_for(cache_folder("bench-peers", args.cache_dir), args.images, args.source_size)
    work = tempfile.mkdtemp(prefix="transfer-bench-predict-")
    try:
        export = write_export(work, dataset["path"])
        once = sorted(os.path.join(dataset["path"], f) for f in os.listdir(dataset["path"]) if f.endswith(".parquet"))
        repeated = os.path.join(work, "repeated")
        os.makedirs(repeated)
        for copy in range(REPEAT):
            for file in once:
                os.symlink(file, os.path.join(repeated, f"{copy}-{os.path.basename(file)}"))
        sources = {
            "once": (dataset["path"], once),
            "repeated": (repeated, sorted(os.path.join(repeated, f) for f in os.listdir(repeated))),
        }
        runs: dict = {name: {"once": [], "repeated": []} for name in CONTENDERS}
        for _ in range(args.repeats):
            for name in CONTENDERS:
                for size, (folder, files) in sources.items():
                    seconds, rows = timed(name, export, folder, files, os.path.join(work, "out"))
                    runs[name][size].append(seconds)
                    print(f"{name} {size}: {rows} rows in {seconds:.1f} s", flush=True)
        report = summarize(runs, args.images, dataset)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for name, row in report["medians"].items():
        print(f"{name}: {json.dumps(row)}")
    print(json.dumps(report["ratios"], indent=1))


def write_export(work: str, data: str) -> str:
    """An export of mobilenet_v2 (random weights) at IMAGE_SIZE over the data's classes, as the job writes one."""
    code = f"""
import sys; sys.path.insert(0, {REPO!r})
import transfer
from transfer import export
from transfer.config import from_dict
from transfer.data.parquet import scan
from transfer.model import build_model
classes = scan({data!r}, "image", "label").class_keys()
cfg = from_dict({{"data": {{"train": {data!r}, "image_size": [{IMAGE_SIZE}, {IMAGE_SIZE}]}},
                 "model": {{"backbone": "{BACKBONE}", "weights": "none"}}}})
model = build_model("{BACKBONE}", "none", ({IMAGE_SIZE}, {IMAGE_SIZE}), len(classes), 0.0)
export.write_export(model, classes, cfg.to_yaml(), {{"final": {{}}, "history": []}}, {work + "/export"!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return os.path.join(work, "export")


def timed(name: str, export: str, folder: str, files: list[str], out: str) -> tuple[float, int]:
    """One contender's run over `folder`: wall seconds from process start to exit, and the rows it predicted."""
    if name == "plain":
        command = [sys.executable, "-c", PLAIN, export, json.dumps(files), str(IMAGE_SIZE), str(BATCH)]
    else:
        workers = ["--workers", "1", "--cpus-per-worker", "2"] if name == "predict_1w" else ["--workers", "2"]
        command = [sys.executable, "-m", "jobs.predict", "--model", export, "--data", folder, "--out", out, *workers]
        command += ["--batch-size", str(BATCH)]
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_USE_LEGACY_KERAS": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - start
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return seconds, json.loads(lines[-1])["rows"]


def summarize(runs: dict, images: int, dataset: dict) -> dict:
    medians = {}
    for name, sizes in runs.items():
        once, repeated = statistics.median(sizes["once"]), statistics.median(sizes["repeated"])
        medians[name] = {
            "wall_s_once": round(once, 2),
            f"wall_s_x{REPEAT}": round(repeated, 2),
            "end_to_end_images_per_s": round(REPEAT * images / repeated, 1),
            "marginal_images_per_s": round((REPEAT - 1) * images / (repeated - once), 1) if repeated > once else None,
        }
    ratios = {}
    for name in CONTENDERS[1:]:
        for rate in ("end_to_end_images_per_s", "marginal_images_per_s"):
            mine, plain = medians[name][rate], medians["plain"][rate]
            ratios[f"{rate}_{name}_over_plain"] = round(mine / plain, 3) if mine and plain else None
    return {
        "setup": {
            "backbone": BACKBONE,
            "image_size": IMAGE_SIZE,
            "batch": BATCH,
            "images": images,
            "source_size": dataset["source_size"],
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "runs": runs,
        "medians": medians,
        "ratios": ratios,
    }


if __name__ == "__main__":
    main()
