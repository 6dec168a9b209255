"""The embedded demo: a small image dataset and a pretrained backbone, both made here, offline, once.

Target task (what the demo trains): 5 classes of drawn patterns (ring, cross, diamond, checker, dots) as real
JPEGs in Parquet. Source task (what the backbone was pretrained on, a different task): 6 other classes
(disc, square, triangle, stripes, line, blob). The frozen backbone's features carry over from one to the
other, which is what transfer learning needs: a random frozen backbone would learn nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VERSION = "v1"
TARGET_CLASSES = ("checker", "cross", "diamond", "dots", "ring")
SOURCE_CLASSES = ("blob", "disc", "line", "square", "stripes", "triangle")
IMAGE_SIZE = 64
SOURCE_IMAGE_SIZE = 48
BACKBONE = "demo_cnn"


def cache_root() -> str:
    """Where made-once data lives: the demo's, and the benchmarks'."""
    return os.environ.get("TRANSFER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "transfer")


def cache_dir() -> str:
    return os.path.join(cache_root(), f"demo-{VERSION}")


def demo_config(assets: dict[str, str]) -> dict:
    """The demo's config (as a raw dict; `--set` applies on top of it)."""
    return {
        "run": {"name": "demo", "storage": "runs"},
        "data": {
            "train": assets["train"],
            "validation_split": 0.2,
            "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        },
        "model": {"backbone": BACKBONE, "weights": assets["weights"], "dropout": 0.2},
        "head": {"epochs": 5, "learning_rate": 3.0e-3, "batch_size": 32},
        "finetune": {"epochs": 3, "learning_rate": 1.0e-4, "unfreeze": "block3_conv"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }


def prepare(directory: str | None = None, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Makes the demo dataset and backbone weights unless cached; returns their locations."""
    directory = directory or cache_dir()
    assets = {"train": os.path.join(directory, "train"), "weights": os.path.join(directory, f"{BACKBONE}.h5")}
    if not os.path.exists(os.path.join(directory, "done.json")):
        echo(f"demo: making the demo dataset and pretraining its backbone (once; cached in {directory})")
        _publish(directory, _make_assets)
    return assets


def _publish(directory: str, make: Callable[[str], None]) -> None:
    """Builds into a temporary sibling and renames it into place, so a crash never leaves half a cache."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    try:
        make(staging)
        with open(os.path.join(staging, "done.json"), "w") as f:
            json.dump({"version": VERSION}, f)
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_assets(directory: str) -> None:
    write_parquet_dataset(os.path.join(directory, "train"), TARGET_CLASSES, per_class=600, seed=1)
    pretrain_backbone(os.path.join(directory, f"{BACKBONE}.h5"))


def write_parquet_dataset(
    directory: str,
    classes: tuple[str, ...] = TARGET_CLASSES,
    per_class: int = 600,
    seed: int = 0,
    size: int = IMAGE_SIZE,
    files: tuple[tuple[float, int], ...] = ((0.4, 300), (0.35, 250), (0.25, 500)),
) -> None:
    """Writes JPEG images with string labels as Parquet, split over files of uneven sizes and row groups.

    `files` gives each file's share of the rows and its row-group size.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(classes)), per_class))
    images = [tf.io.encode_jpeg(draw(classes[c], rng, size), quality=90).numpy() for c in labels]
    os.makedirs(directory, exist_ok=True)
    start = 0
    for i, (share, row_group_size) in enumerate(files):
        stop = len(labels) if i == len(files) - 1 else start + round(share * len(labels))
        table = pa.table(
            {
                "image": pa.array(images[start:stop], type=pa.binary()),
                "label": pa.array([classes[c] for c in labels[start:stop]], type=pa.string()),
            }
        )
        pq.write_table(table, os.path.join(directory, f"part-{i:03d}.parquet"), row_group_size=row_group_size)
        start = stop


def pretrain_backbone(path: str, per_class: int = 700, epochs: int = 4, seed: int = 0) -> float:
    """Trains demo_cnn on the source task and saves the backbone's weights (.h5); returns train accuracy."""
    import tensorflow as tf

    from transfer.backbones import demo_cnn, preprocessing_layers

    tf.keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed + 100)
    labels = rng.permutation(np.repeat(np.arange(len(SOURCE_CLASSES)), per_class))
    images = np.stack([draw(SOURCE_CLASSES[c], rng, SOURCE_IMAGE_SIZE) for c in labels]).astype("float32")

    backbone = demo_cnn((SOURCE_IMAGE_SIZE, SOURCE_IMAGE_SIZE, 3))
    inputs = tf.keras.Input((SOURCE_IMAGE_SIZE, SOURCE_IMAGE_SIZE, 3))
    x = inputs
    for layer in preprocessing_layers(BACKBONE):
        x = layer(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(backbone(x))
    outputs = tf.keras.layers.Dense(len(SOURCE_CLASSES), activation="softmax")(x)
    model = tf.keras.Model(inputs, outputs)
    model.compile(tf.keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(images, labels, batch_size=64, epochs=epochs, verbose=0)
    backbone.save_weights(path)
    return float(history.history["accuracy"][-1])


def draw(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One uint8 RGB image of a pattern at a random place, scale and colour, on a noisy background."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.15, 0.3)
    dx, dy = xx - cx, yy - cy
    dist = np.hypot(dx, dy)
    if kind == "disc":
        mask = dist < r
    elif kind == "ring":
        mask = np.abs(dist - r) < r * 0.25
    elif kind == "square":
        mask = np.maximum(np.abs(dx), np.abs(dy)) < r * 0.8
    elif kind == "diamond":
        mask = np.abs(dx) + np.abs(dy) < r
    elif kind == "triangle":
        mask = (dy < r * 0.7) & (dy > -r + 2 * np.abs(dx))
    elif kind == "cross":
        arm = r * 0.25
        mask = ((np.abs(dx) < arm) & (np.abs(dy) < r)) | ((np.abs(dy) < arm) & (np.abs(dx) < r))
    elif kind == "stripes":
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(3, 6)
        mask = np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle))) > 0
    elif kind == "checker":
        cells = rng.integers(4, 8)
        mask = (np.floor(xx * cells + cx) + np.floor(yy * cells + cy)) % 2 == 0
    elif kind == "dots":
        mask = np.zeros_like(xx, dtype=bool)
        for _ in range(rng.integers(4, 8)):
            px, py = rng.uniform(0.1, 0.9, 2)
            mask |= np.hypot(xx - px, yy - py) < rng.uniform(0.04, 0.07)
    elif kind == "line":
        angle = rng.uniform(0, np.pi)
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        mask = (np.abs(across) < 0.05) & (np.abs(along) < r * 1.5)
    elif kind == "blob":
        mask = dist < r * (1 + 0.4 * np.sin(rng.integers(2, 5) * np.arctan2(dy, dx) + rng.uniform(0, 6)))
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    dark, bright = rng.uniform(0, 90, 3), rng.uniform(150, 255, 3)
    background, foreground = (dark, bright) if rng.random() < 0.5 else (bright, dark)
    image = np.where(mask[..., None], foreground, background) + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)
