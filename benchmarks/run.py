"""This job against the peers, the same data, backbone, image size, batch and epochs for every contender.

    python benchmarks/run.py --out results.json [--images 1000] [--repeats 3] [--source-size 512]

Contenders, measured in one run and alternating, each in a fresh process:
  textbook   tf.keras model.fit on the frozen backbone over a tf.data pipeline of the same Parquet files
  ray_data   Ray's documented path: TensorflowTrainer (1 worker) with Ray Data read_parquet + to_tf
  job_1w     this job, 1 worker          job_2w    this job, 2 workers (the machine's CPUs shared among them)
  limit      the compute limit: backbone forward (head pass) and forward+backward (fine-tune) on in-memory tensors
Per pass: wall seconds, images/s of training, seconds from process start to the first training step, an upper
bound of the input-wait fraction; per contender the peak RSS of the training process. For the job also its head
pass's feature computation rate (from its stdout) and the cost of one step on cached features (from its export's
metrics.json). Medians over the repeats; every ratio against the peers and the limit; the project's goals.

The JPEG sources are made at --source-size px (users' photos are larger than the training size) and every
contender resizes them to IMAGE_SIZE: the textbook and Ray Data decode them at full size, the job at a reduced
DCT scale when they are at least 2x the target. The data is made once per (images, source size) and cached in
<TRANSFER_CACHE_DIR or ~/.cache/transfer>/bench-peers/ (--cache-dir moves it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.cached import cache_folder, made_once  # noqa: E402  (after the repo is on the path)

BACKBONE, IMAGE_SIZE, BATCH, HEAD_EPOCHS, FINETUNE_EPOCHS, UNFREEZE = "mobilenet_v2", 96, 32, 10, 2, 20
T0 = time.time()  # this process's start, near enough
SOURCE_SIZE = 512  # default side of the generated JPEGs, px
DRAW_SIZE = 128  # patterns are drawn at most this size, then upscaled: demo.draw at 512 px takes ~70 ms an image
GRAIN = 12.0  # sigma of the per-pixel grain added at the source size (demo.draw's own, at its size)
DATA_VERSION = "v1"  # bump when the generated images change, so a stale cache is not reused
# rank 0's line: "head: backbone features of N [validation ]images per worker computed in S s, cached in memory"
FEATURES_LINE = re.compile(
    r"^head: backbone features of (\d+) (validation )?images per worker computed in ([0-9.]+) s, cached in (.+)$"
)
# The project's goals (issue 10): (name, measure, how it compares, target, stated target when it differs).
GOALS = (
    ("head features at >= 0.8x the forward limit, 1 worker", "head_features_images_per_s_job_1w_over_forward_limit",
     ">=", 0.8, None),
    ("head features at >= 0.8x the forward limit, 2 workers", "head_features_images_per_s_job_2w_over_forward_limit",
     ">=", 0.8, None),
    ("a cached-feature head step <= 5 ms, 2 workers", "head_step_ms_job_2w", "<=", 5.0, None),
    ("fine-tune images/s, 1 worker, >= the textbook's", "finetune_images_per_s_job_1w_over_textbook", ">=", 1.0, None),
    ("head pass wall >= 3x faster than the textbook's, 1 worker", "head_wall_speedup_job_1w_vs_textbook",
     ">=", 3.0, 4.0),
    ("head pass wall >= 3x faster than the textbook's, 2 workers", "head_wall_speedup_job_2w_vs_textbook",
     ">=", 3.0, 4.0),
)  # fmt: skip


def _load_images(data: str):
    """The whole dataset decoded in memory as float32 (for the compute limit only): the job's pixels."""
    import numpy as np
    import pyarrow.parquet as pq

    from transfer.data.pipeline import decode_image

    table = pq.read_table(data)
    decoded = [decode_image(b, (IMAGE_SIZE, IMAGE_SIZE)).numpy() for b in table["image"].to_pylist()]
    images = np.stack(decoded).astype("float32")
    classes = sorted(set(table["label"].to_pylist()))
    return images, np.array([classes.index(v) for v in table["label"].to_pylist()]), classes


class FirstStep:
    """A Keras callback noting when the first training batch starts and the training seconds of each epoch."""

    def __new__(cls):
        import tensorflow as tf

        class _Callback(tf.keras.callbacks.Callback):
            first_step = None
            seconds = 0.0

            def on_train_batch_begin(self, batch, logs=None):
                if self.first_step is None:
                    self.first_step = time.time() - T0

            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.time()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds += time.time() - self.start

        return _Callback()


def textbook(data: str, images_per_epoch: int) -> dict:
    import pyarrow.parquet as pq
    import tensorflow as tf

    from transfer.model import build_model, compile_model, unfreeze_model

    def decode(encoded, label):
        image = tf.image.resize(tf.io.decode_image(encoded, channels=3, expand_animations=False), (IMAGE_SIZE,) * 2)
        image.set_shape((IMAGE_SIZE, IMAGE_SIZE, 3))
        return image, label

    result = {}
    start = T0  # the head pass's wall time counts from the process start, as for the job
    table = pq.read_table(data)
    classes = sorted(set(table["label"].to_pylist()))
    labels = [classes.index(v) for v in table["label"].to_pylist()]
    ds = (
        tf.data.Dataset.from_tensor_slices((table["image"].to_pylist(), labels))
        .shuffle(2048)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(BATCH)
        .prefetch(tf.data.AUTOTUNE)
    )
    model = build_model(BACKBONE, "none", (IMAGE_SIZE, IMAGE_SIZE), len(classes), 0.2)
    for name, epochs, rate in (("head", HEAD_EPOCHS, 1e-3), ("finetune", FINETUNE_EPOCHS, 1e-5)):
        if name == "finetune":
            start = time.time()
            unfreeze_model(model, UNFREEZE)
        compile_model(model, rate)
        timing = FirstStep()
        model.fit(ds, epochs=epochs, verbose=0, callbacks=[timing])
        result[name] = {
            "wall_s": time.time() - start,
            "images_per_s": images_per_epoch * epochs / timing.seconds,
            "first_step_s": timing.first_step,
        }
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def ray_data(data: str, images_per_epoch: int) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    import transfer  # noqa: F401

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)

    def decode(batch):
        import numpy as np
        import tensorflow as tf

        batch["pixels"] = np.stack(
            [
                tf.image.resize(tf.io.decode_jpeg(b, channels=3), (IMAGE_SIZE, IMAGE_SIZE)).numpy()
                for b in batch["image"]
            ]
        )
        return batch

    def train_func(config):
        import tensorflow as tf

        from transfer.model import build_model, compile_model, unfreeze_model

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        with strategy.scope():
            model = build_model(BACKBONE, "none", (IMAGE_SIZE, IMAGE_SIZE), config["classes"], 0.2)
        shard = ray.train.get_dataset_shard("train")
        metrics = {}
        for name, epochs, rate in (("head", HEAD_EPOCHS, 1e-3), ("finetune", FINETUNE_EPOCHS, 1e-5)):
            start = config["t0"] if name == "head" else time.time()  # head: from the driver's start
            with strategy.scope():
                if name == "finetune":
                    unfreeze_model(model, UNFREEZE)
                compile_model(model, rate)
            timing = FirstStep()
            for _ in range(epochs):  # Ray's examples: a new to_tf dataset per epoch
                tf_ds = shard.to_tf("pixels", "label_index", batch_size=BATCH, local_shuffle_buffer_size=256)
                model.fit(tf_ds, epochs=1, verbose=0, callbacks=[timing])
            metrics[name] = {
                "wall_s": time.time() - start,
                "images_per_s": images_per_epoch * epochs / timing.seconds,
                "first_step_epoch_s": timing.first_step and timing.first_step + T0 - config["t0"],
            }
        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the training worker
        with open(config["out"], "w") as f:  # one machine: the driver reads it back
            json.dump(metrics, f)

    out = os.path.join(tempfile.mkdtemp(prefix="bench-ray-data-"), "passes.json")
    classes = sorted(set(ray.data.read_parquet(data, columns=["label"]).unique("label")))
    dataset = (
        ray.data.read_parquet(data)
        .map(lambda row: {**row, "label_index": classes.index(row["label"])})
        .map_batches(decode)
    )
    trainer = TensorflowTrainer(
        train_func,
        train_loop_config={"classes": len(classes), "t0": T0, "out": out},
        scaling_config=ScalingConfig(num_workers=1),
        datasets={"train": dataset},
        run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-ray-"), name="ray_data"),
    )
    trainer.fit()
    with open(out) as f:
        result = json.load(f)
    result["head"]["first_step_s"] = result["head"].pop("first_step_epoch_s")
    result["finetune"]["first_step_s"] = None
    result["finetune"].pop("first_step_epoch_s")
    return result


def job(data: str, workers: int, weights: str) -> dict:
    """This job as a user runs it, its stdout lines time-stamped."""
    import yaml

    root = tempfile.mkdtemp(prefix="bench-job-")
    config = {
        "run": {"name": "bench", "storage": root},
        "data": {"train": data, "validation_split": 0.1, "image_size": [IMAGE_SIZE, IMAGE_SIZE]},
        "model": {"backbone": BACKBONE, "weights": weights},
        "head": {"epochs": HEAD_EPOCHS, "batch_size": BATCH},
        "finetune": {"epochs": FINETUNE_EPOCHS, "unfreeze": UNFREEZE},
        # The machine's CPUs shared among the workers, as the textbook process has them all.
        "scaling": {"num_workers": workers, "cpus_per_worker": max(1, (os.cpu_count() or 1) // workers)},
    }
    with open(os.path.join(root, "job.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    start = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", os.path.join(root, "job.yaml")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    stamped = [(time.time() - start, line.strip()) for line in process.stdout]
    assert process.wait() == 0, stamped[-3:]
    features = _features_lines(stamped)
    assert "train" in features, f"no head features line in the job's stdout: {[line for _, line in stamped]}"
    result, histories = {}, {}
    for name in ("head", "finetune"):
        begun = next(t for t, line in stamped if line.startswith(f"{name}: training"))
        ended = next(t for t, line in stamped if line.startswith(f"{name}: exported"))
        with open(os.path.join(root, "bench", "export", name, "metrics.json")) as f:
            metrics = json.load(f)
        histories[name] = metrics["history"]
        first_epoch_t = next(t for t, line in stamped if line.startswith(f"{name} epoch 1/"))
        train_seconds = sum(row["seconds"] for row in metrics["history"])
        images = sum(row["images_per_s"] * row["seconds"] for row in metrics["history"])
        result[name] = {
            "wall_s": ended - begun + (begun if name == "head" else 0.0),
            "images_per_s": images / train_seconds,
            "first_step_s": first_epoch_t - metrics["history"][0]["seconds"] if name == "head" else None,
            "train_s": train_seconds,
        }
    head, train = result["head"], features["train"]
    head["features_images_per_s_per_worker"] = train["images_per_worker"] / train["seconds"]
    head["features_images_per_s"] = workers * head["features_images_per_s_per_worker"]
    head["features"] = features
    head["step_ms_by_epoch"] = [1000 * BATCH * workers / row["images_per_s"] for row in histories["head"]]
    head["step_ms"] = statistics.median(head["step_ms_by_epoch"][1:]) if len(histories["head"]) > 1 else None
    result["peak_rss_mb"] = max(row["peak_rss_mb"] for name in ("head", "finetune") for row in histories[name])
    result["stdout"] = [[round(t, 2), line] for t, line in stamped]
    return result


def _features_lines(stamped: list[tuple[float, str]]) -> dict:
    """The head pass's feature-cache lines (rank 0's), by split: images per worker, seconds, where, and when."""
    found = {}
    for t, line in stamped:
        match = FEATURES_LINE.match(line)
        if match:
            images, validation, seconds, where = match.groups()
            found["validation" if validation else "train"] = {
                "images_per_worker": int(images), "seconds": float(seconds), "where": where, "printed_at_s": t,
            }  # fmt: skip
    return found


def limit(data: str) -> dict:
    import tensorflow as tf

    from transfer.model import build_model, compile_model, split_at_features, unfreeze_model

    images, labels, classes = _load_images(data)
    model = build_model(BACKBONE, "none", (IMAGE_SIZE, IMAGE_SIZE), len(classes), 0.2)
    extractor, _ = split_at_features(model)
    forward = tf.function(lambda x: extractor(x, training=False))
    batches = [images[i : i + BATCH] for i in range(0, len(images), BATCH)]
    warm_up = {len(batch): batch for batch in batches}.values()  # a full and a partial last batch: traced here
    for batch in warm_up:
        forward(batch)
    start = time.time()
    for batch in batches:
        forward(batch).numpy()
    forward_ips = len(images) / (time.time() - start)
    # The same forward on uint8 batches, as the job's extractor takes them (the model casts them): for reference.
    as_uint8 = [tf.constant(batch.astype("uint8")) for batch in batches]
    for batch in warm_up:
        forward(tf.constant(batch.astype("uint8")))
    start = time.time()
    for batch in as_uint8:
        forward(batch).numpy()
    forward_uint8_ips = len(images) / (time.time() - start)
    unfreeze_model(model, UNFREEZE)
    compile_model(model, 1e-5)
    one_batch = tf.data.Dataset.from_tensors((images[:BATCH], labels[:BATCH])).repeat()  # never waits on input
    steps = len(images) // BATCH
    model.fit(one_batch, steps_per_epoch=2, epochs=1, verbose=0)  # trace
    start = time.time()
    model.fit(one_batch, steps_per_epoch=steps, epochs=1, verbose=0)
    return {
        "head": {"images_per_s": forward_ips, "uint8_images_per_s": forward_uint8_ips},
        "finetune": {"images_per_s": steps * BATCH / (time.time() - start)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results.json")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source-size", type=int, default=SOURCE_SIZE, help="side of the generated JPEGs, px")
    parser.add_argument("--cache-dir", help="where the generated data lives (default: TRANSFER_CACHE_DIR or ~/.cache)")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        import transfer  # noqa: F401

        n = _rows(args.data)
        run = {
            "textbook": lambda: textbook(args.data, n),
            "ray_data": lambda: ray_data(args.data, n),
            "job_1w": lambda: job(args.data, 1, args.weights),
            "job_2w": lambda: job(args.data, 2, args.weights),
            "limit": lambda: limit(args.data),
        }[args.contender]
        print(json.dumps(run()))
        return

    cache = cache_folder("bench-peers", args.cache_dir)
    dataset = dataset_for(cache, args.images, args.source_size)
    data = dataset["path"]
    work = tempfile.mkdtemp(prefix="transfer-bench-")
    weights = os.path.join(work, "backbone.h5")  # the job reads weights from a file: random ones, saved once
    _save_random_weights(weights)
    names = ["textbook", "ray_data", "job_1w", "job_2w", "limit"]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            out = subprocess.run(
                [sys.executable, __file__, "--contender", name, "--data", data, "--weights", weights],
                capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )  # fmt: skip
            result = _last_json(out.stdout)
            if out.returncode != 0 or result is None:
                raise SystemExit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            runs[name].append(result)
            with open(args.out + ".partial", "w") as f:  # a later crash loses nothing measured so far
                json.dump(runs, f)
    report = summarize(runs, args, dataset)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(table(report["medians"]))
    for name, value in report["ratios"].items():
        print(f"{name}: {'-' if value is None else f'{value:.2f}'}")
    print()
    print(goals_table(report["goals"]))


def dataset_for(cache: str, images: int, source_size: int) -> dict:
    """The Parquet dataset of `images` JPEGs at `source_size` px, made once and cached; where it is, what it holds."""
    name = f"{DATA_VERSION}-n{images}-{source_size}px"
    return made_once(cache, name, lambda folder: write_dataset(os.path.join(folder, "data"), images, source_size))


def write_dataset(directory: str, images: int, source_size: int, seed: int = 0) -> dict:
    """The demo's 5 pattern classes as JPEGs (quality 90) of `source_size` px in two Parquet files, row groups of
    256 rows. Up to DRAW_SIZE px they are demo.write_parquet_dataset's images; larger ones are drawn at DRAW_SIZE,
    upscaled (bilinear) and given fresh per-pixel grain at full size, so they compress like a noisy photo, not
    like a smooth upscale."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    from transfer import demo

    classes = demo.TARGET_CLASSES
    rng = np.random.default_rng(seed)  # the same draws as demo.write_parquet_dataset's
    labels = rng.permutation(np.repeat(np.arange(len(classes)), images // len(classes)))
    drawn = min(source_size, DRAW_SIZE)
    margin = 64  # each image's grain is a crop at a random offset of one larger field
    grain = np.random.default_rng(seed + 1).normal(0, GRAIN, (source_size + margin,) * 2 + (3,)).astype("float32")
    offsets = np.random.default_rng(seed + 2).integers(0, margin, (len(labels), 2))
    encoded = []
    for label, (dy, dx) in zip(labels, offsets, strict=True):
        image = demo.draw(classes[label], rng, drawn)
        if drawn < source_size:
            image = tf.image.resize(image, (source_size, source_size)).numpy()
            image = np.clip(image + grain[dy : dy + source_size, dx : dx + source_size], 0, 255).astype("uint8")
        encoded.append(tf.io.encode_jpeg(image, quality=90).numpy())
    os.makedirs(directory)
    half = len(labels) // 2
    for part, (start, stop) in enumerate(((0, half), (half, len(labels)))):
        table = pa.table(
            {
                "image": pa.array(encoded[start:stop], type=pa.binary()),
                "label": pa.array([classes[c] for c in labels[start:stop]], type=pa.string()),
            }
        )
        pq.write_table(table, os.path.join(directory, f"part-{part:03d}.parquet"), row_group_size=256)
    total = sum(len(e) for e in encoded)
    return {
        "images": len(labels),
        "source_size": source_size,
        "drawn_at": drawn,
        "jpeg_bytes": total,
        "jpeg_kb_per_image": total / len(labels) / 1024,
        "version": DATA_VERSION,
    }


def _last_json(stdout: str) -> dict | None:
    """A contender's result: its last stdout line that is a JSON object (Ray may print after it)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def table(medians: dict) -> str:
    """The medians as a Markdown table, one row per contender."""

    def cell(value, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| contender | head wall s | head images/s | head features images/s (per worker) | head step ms "
        "| first step s | finetune wall s | finetune images/s | input wait (finetune, upper bound) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in medians.items():
        head, finetune = m["head"], m["finetune"]
        features = cell(head.get("features_images_per_s"), 0)
        if head.get("features_images_per_s_per_worker") is not None:
            features += f" ({cell(head['features_images_per_s_per_worker'], 0)})"
        if name == "limit":  # its head column is the forward pass alone
            features = f"{cell(head['images_per_s'], 0)} forward"
        lines.append(
            f"| {name} | {cell(head['wall_s'])} | {cell(head['images_per_s'], 0)} | {features} "
            f"| {cell(head.get('step_ms'), 2)} | {cell(head['first_step_s'])} "
            f"| {cell(finetune['wall_s'])} | {cell(finetune['images_per_s'], 0)} "
            f"| {cell(finetune.get('input_wait_upper_bound'), 2)} | {cell(m['peak_rss_mb'], 0)} |"
        )
    return "\n".join(lines)


def goals_table(goals: list[dict]) -> str:
    """The project's goals as a Markdown table: each one's measure, value, target and whether it is met."""
    lines = ["| goal | measure | measured | target | met |", "|---|---|---|---|---|"]
    for g in goals:
        value = "-" if g["measured"] is None else f"{g['measured']:.2f}"
        target = f"{g['op']} {g['target']:g}" + (f" (stated {g['stated']:g})" if g.get("stated") else "")
        met = {True: "yes", False: "no", None: "-"}[g["met"]]
        lines.append(f"| {g['goal']} | `{g['measure']}` | {value} | {target} | {met} |")
    return "\n".join(lines)


def _rows(data: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetDataset(data).read(columns=["label"]).num_rows


def _save_random_weights(path: str) -> None:
    import transfer  # noqa: F401
    from transfer.backbones import load_backbone

    load_backbone(BACKBONE, "none", (IMAGE_SIZE, IMAGE_SIZE, 3)).save_weights(path)


def summarize(runs: dict, args: argparse.Namespace, dataset: dict) -> dict:
    """The report: setup, notes, per-contender medians, the ratios, the goals, and every run."""

    def median(name: str, pass_name: str | None, key: str):
        rows = [r[pass_name] if pass_name else r for r in runs[name]]
        values = [row[key] for row in rows if row.get(key) is not None]
        return statistics.median(values) if values else None

    keys = {
        "head": ("wall_s", "images_per_s", "first_step_s", "train_s", "features_images_per_s",
                 "features_images_per_s_per_worker", "step_ms", "uint8_images_per_s"),
        "finetune": ("wall_s", "images_per_s", "first_step_s", "train_s"),
    }  # fmt: skip
    medians = {
        name: {
            **{p: {k: median(name, p, k) for k in keys[p]} for p in ("head", "finetune")},
            "peak_rss_mb": median(name, None, "peak_rss_mb"),
        }
        for name in runs
    }
    data = dataset["path"]
    m = medians
    n = _rows(data)
    limit_ips = {p: m["limit"][p]["images_per_s"] for p in ("head", "finetune")}

    def wall(name: str) -> float:
        return m[name]["head"]["wall_s"] + m[name]["finetune"]["wall_s"]

    # Upper bound of the share of training time spent waiting on input: 1 - images/s over the compute limit
    # (the same model on one in-memory batch). It also holds any distribution overhead. The job's head pass
    # trains on cached features: it reads each image once, before its first epoch.
    for name in ("textbook", "ray_data", "job_1w", "job_2w"):
        for p in ("head", "finetune"):
            reads_images = not (name.startswith("job") and p == "head")
            ips = m[name][p]["images_per_s"]
            m[name][p]["input_wait_upper_bound"] = max(0.0, 1 - ips / limit_ips[p]) if reads_images else None
    ratios = {}
    for job in ("job_1w", "job_2w"):
        j = m[job]
        ideal_head_s = n / limit_ips["head"] + j["head"]["train_s"]  # one forward pass, then the head's training
        ratios.update(
            {
                f"head_wall_speedup_{job}_vs_textbook": m["textbook"]["head"]["wall_s"] / j["head"]["wall_s"],
                f"head_wall_speedup_{job}_vs_ray_data": m["ray_data"]["head"]["wall_s"] / j["head"]["wall_s"],
                f"head_wall_{job}_over_forward_pass_plus_head_training": j["head"]["wall_s"] / ideal_head_s,
                f"finetune_images_per_s_{job}_over_textbook": j["finetune"]["images_per_s"]
                / m["textbook"]["finetune"]["images_per_s"],
                f"finetune_images_per_s_{job}_over_ray_data": j["finetune"]["images_per_s"]
                / m["ray_data"]["finetune"]["images_per_s"],
                f"finetune_images_per_s_{job}_over_limit": j["finetune"]["images_per_s"] / limit_ips["finetune"],
                f"end_to_end_speedup_{job}_vs_ray_data": wall("ray_data") / wall(job),
                f"end_to_end_speedup_{job}_vs_textbook": wall("textbook") / wall(job),
                f"peak_rss_{job}_over_textbook": j["peak_rss_mb"] / m["textbook"]["peak_rss_mb"],
                f"peak_rss_{job}_over_ray_data": j["peak_rss_mb"] / m["ray_data"]["peak_rss_mb"],
                f"head_features_images_per_s_{job}_over_forward_limit": j["head"]["features_images_per_s"]
                / limit_ips["head"],
            }
        )
    measures = {**ratios, **{f"head_step_ms_{job}": m[job]["head"]["step_ms"] for job in ("job_1w", "job_2w")}}
    goals = []
    for goal, measure, op, target, stated in GOALS:
        value = measures.get(measure)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        goals.append(
            {"goal": goal, "measure": measure, "measured": value, "op": op, "target": target, "stated": stated,
             "met": met}
        )  # fmt: skip
    return {
        "benchmark": "peers",
        "setup": {
            "backbone": BACKBONE,
            "weights": "random (throughput only)",
            "image_size": IMAGE_SIZE,
            "batch": BATCH,
            "head_epochs": HEAD_EPOCHS,
            "finetune_epochs": FINETUNE_EPOCHS,
            "unfreeze": UNFREEZE,
            "images": n,
            "source_size": dataset["source_size"],
            "source_jpeg_kb_per_image": dataset["jpeg_kb_per_image"],
            "source_drawn_at": dataset["drawn_at"],
            "data": data,
            "data_made_in_s": dataset.get("made_in_s"),
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },  # fmt: skip
        "notes": {
            "source_size": "the JPEGs are made at source_size px (square) and every contender resizes them to "
            "image_size: the textbook (tf.io.decode_image + tf.image.resize), Ray Data (decode_jpeg + resize) and the "
            "limit's loading decode at full size; the job decodes a JPEG at least 2x the target at 1/2, 1/4 or 1/8 "
            "scale in the DCT domain (transfer.data.pipeline.decode_image). Larger than DRAW_SIZE, the patterns are "
            "drawn at DRAW_SIZE, upscaled and given fresh full-size grain",
            "wall_s": "head: from the process start to the export; finetune: from its start to its export",
            "first_step_s": "from the process start to the first training step",
            "peak_rss_mb": "peak RSS of the process that trains (the job and Ray Data: rank 0's worker)",
            "input_wait_upper_bound": "1 - images/s over the compute limit (also holds distribution overhead)",
            "features_images_per_s": "the job's head pass: rank 0's stdout line 'head: backbone features of N "
            "images per worker computed in S s' (reading, decoding, resizing and the backbone's forward pass of its "
            "training shard, once); per worker N/S, the job's total workers*N/S (the workers share the machine's "
            "CPUs). S covers the pipeline's start and the extractor's first call too (the limit's forward is "
            "warmed up first): small runs understate the rate; S is printed to 0.1 s. Validation features are "
            "computed separately (runs[...]['head']['features']['validation']) and not counted",
            "head_features_images_per_s_{job}_over_forward_limit": "the job's total feature rate over the limit's "
            "forward-only rate (float32 in-memory batches of BATCH, one at a time, all the machine's CPUs); the job's "
            "extractor takes uint8 batches and the model casts them: the limit's forward on uint8 batches is "
            "medians.limit.head.uint8_images_per_s, for reference",
            "step_ms": "the job's head pass on cached features, one training step: from its export's metrics.json "
            "history, per epoch 1000 * BATCH * workers / images_per_s (images_per_s: training images of the epoch "
            "across all workers over its training seconds, validation not included), the median over epochs 2..N "
            "(epoch 1 includes tracing). An epoch is one call (steps_per_execution = its steps): its fixed cost is "
            "spread over steps_per_epoch steps, so small runs overstate it. Per run and epoch in "
            "runs[...]['head']['step_ms_by_epoch']",
            "head_wall_speedup_{job}_vs_textbook": "the textbook's head-pass wall over the job's, both from the "
            "process start (the job's includes starting Ray and its workers)",
            "finetune_images_per_s_job_1w_over_textbook": "one worker on all the machine's CPUs against the textbook "
            "on all of them",
            "goals": "the project's goals (issue 10): each measure, its median value, the target and whether it is "
            "met; 'stated' is the target as the issue states it where the pass mark is lower",
            "stdout": "runs[job_*][i]['stdout']: the job's stdout lines, each with its seconds since the job started",
        },
        "medians": medians,
        "ratios": ratios,
        "goals": goals,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
