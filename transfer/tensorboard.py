"""A pass's per-epoch scalars for TensorBoard, under <run>/tensorboard/<pass>/{train,validation}/ on any storage.

Laid out as Keras' own TensorBoard callback lays them out (`epoch_loss` in train/ and validation/), so
`tensorboard --logdir <run>/tensorboard` draws training and validation on one chart per metric, for both passes.
TensorFlow writes only local event files (its S3 and GCS file systems left it), so they are written in a local
folder and uploaded after every epoch: a run's curves can be watched while it trains.
"""

from __future__ import annotations

import shutil
import tempfile

from transfer import storage

FOLDER = "tensorboard"
TRAIN_SCALARS = {"loss": "epoch_loss", "accuracy": "epoch_accuracy", "images_per_s": "images_per_s",
                 "bad_records": "bad_records"}  # fmt: skip
VALIDATION_SCALARS = {"val_loss": "epoch_loss", "val_accuracy": "epoch_accuracy"}


class EpochScalars:
    """Writes each epoch's row (a metrics.json history row) as TensorBoard scalars at step = epoch.

    Every driver process writes event files of its own, so a rerun that resumes adds its epochs beside the
    earlier ones instead of replacing them.
    """

    def __init__(self, location: str, learning_rate: float):
        self.location, self.learning_rate = location, learning_rate
        self.local = tempfile.mkdtemp(prefix="transfer-tensorboard-")
        self.writers: dict = {}

    def write(self, row: dict) -> None:
        import tensorflow as tf

        if not self.writers:
            self.writers = {
                part: tf.summary.create_file_writer(f"{self.local}/{part}") for part in ("train", "validation")
            }
        for part, names in (("train", TRAIN_SCALARS), ("validation", VALIDATION_SCALARS)):
            with self.writers[part].as_default(step=row["epoch"]):
                for key, tag in names.items():
                    if key in row:
                        tf.summary.scalar(tag, row[key])
                if part == "train":
                    tf.summary.scalar("learning_rate", self.learning_rate)
            self.writers[part].flush()
        storage.upload_dir(self.local, self.location)  # the event files so far, over their last upload

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        shutil.rmtree(self.local, ignore_errors=True)
