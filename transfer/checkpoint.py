"""A pass's checkpoint: what it trains, the optimizer, the epoch history, the config and each rank's bad records.

Every rank writes one (tf-keras' save_weights is a collective: a rank-0-only save hangs), each to its own
temporary folder; only rank 0's weights are kept, and Ray Train merges the ranks' folders into one checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil

import ray.train
import tensorflow as tf

WEIGHTS = "weights/ckpt"  # tf.train.Checkpoint: the weights the pass trains (see `trained_parts`) and the optimizer
STATE = "state.json"  # the pass, the last finished epoch and the per-epoch history
BAD_RECORDS = "bad_records"  # one JSON file per rank: the bad records it found, and the first few
CONFIG = "config.yaml"


def trained_parts(model: tf.keras.Model, pass_name: str) -> dict[str, tf.Module]:
    """What a pass's checkpoints hold: what it trains. The head pass changes only the classifier; its frozen
    backbone is the weights it was built from. Saving the backbone anyway would cost seconds every epoch:
    under MWMS, reading each BatchNorm statistic for a save is an all-reduce across the workers."""
    if pass_name == "head":
        return {"classifier": model.get_layer("classifier")}
    return {"model": model}


def write(
    directory: str,
    model: tf.keras.Model,
    pass_name: str,
    rank: int,
    state: dict,
    config_yaml: str,
    bad_records: dict,
) -> None:
    """Writes one rank's part of an epoch's checkpoint into `directory` (every rank must call it)."""
    parts = trained_parts(model, pass_name)
    tf.train.Checkpoint(**parts, optimizer=model.optimizer).write(os.path.join(directory, WEIGHTS))
    if rank == 0:
        with open(os.path.join(directory, STATE), "w") as f:
            json.dump(state, f, indent=1)
        with open(os.path.join(directory, CONFIG), "w") as f:
            f.write(config_yaml)
    else:
        shutil.rmtree(os.path.join(directory, os.path.dirname(WEIGHTS)))  # rank 0's weights are the ones
    os.makedirs(os.path.join(directory, BAD_RECORDS))
    with open(os.path.join(directory, BAD_RECORDS, f"rank-{rank}.json"), "w") as f:
        json.dump(bad_records, f)


def restore(
    model: tf.keras.Model, checkpoint: ray.train.Checkpoint | None, optimizer: tf.keras.optimizers.Optimizer = None
) -> dict:
    """Loads the pass's trained weights (and the optimizer's state, when given) from a checkpoint into a model
    built for the pass (a head-pass model holds its backbone's weights already).

    Returns its per-epoch `history` ([] without a checkpoint) and the `bad_records` all ranks found.
    """
    if checkpoint is None:
        return {"history": [], "bad_records": {"found": 0, "examples": []}}
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE)) as f:
            state = json.load(f)
        parts = trained_parts(model, state["pass"])
        if optimizer is not None:
            parts["optimizer"] = optimizer
        # Partial: the driver's model (for export) restores the weights alone.
        tf.train.Checkpoint(**parts).read(os.path.join(directory, WEIGHTS)).expect_partial()
        return {"history": state["history"], "bad_records": read_bad_records(directory)}


def read_bad_records(checkpoint_dir: str) -> dict:
    """All ranks' bad records in a checkpoint: how many distinct ones, and the first few."""
    found, examples = 0, []
    folder = os.path.join(checkpoint_dir, BAD_RECORDS)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name)) as f:
            rank = json.load(f)
        found += rank["found"]
        examples += rank["examples"]
    return {"found": found, "examples": examples}
