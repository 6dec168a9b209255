"""Shared fixtures: a small demo-like dataset and an offline-pretrained backbone, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import transfer  # noqa: F401  (selects tf-keras before TensorFlow loads)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, str]:
    """600 JPEGs of the 5 demo classes in 3 Parquet files with uneven row groups, and demo_cnn weights."""
    from transfer import demo

    root = tmp_path_factory.mktemp("assets")
    train = str(root / "train")
    demo.write_parquet_dataset(train, per_class=120, seed=3, files=((0.5, 70), (0.3, 45), (0.2, 100)))
    weights = str(root / "demo_cnn.h5")
    demo.pretrain_backbone(weights)
    return {"train": train, "weights": weights}


def write_config(path, assets: dict[str, str], storage: str, name: str, **sections) -> str:
    """A small 2-worker config over the test assets; keyword sections update the defaults below."""
    import yaml

    config = {
        "run": {"name": name, "storage": storage},
        "data": {"train": assets["train"], "validation_split": 0.2, "image_size": [64, 64]},
        "model": {"backbone": "demo_cnn", "weights": assets["weights"], "dropout": 0.1},
        "head": {"epochs": 3, "learning_rate": 3.0e-3, "batch_size": 16},
        "finetune": {"epochs": 2, "learning_rate": 1.0e-4, "unfreeze": "block3_conv"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python -m jobs.train ARGS` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
