import json
import os

import numpy as np
import ray.train
import tensorflow as tf

from transfer.checkpoint import STATE, WEIGHTS, restore, trained_parts
from transfer.model import BACKBONE_LAYER, build_model, compile_model, unfreeze_model


def pretrained(path) -> str:
    """A demo_cnn backbone with non-default weights, saved as a weights file the way users point at one."""
    backbone = build_model("demo_cnn", "none", (32, 32), 3, 0.0).get_layer(BACKBONE_LAYER)
    backbone.set_weights([w + 0.1 for w in backbone.get_weights()])
    backbone.save_weights(str(path))
    return str(path)


def write_checkpoint(directory, model: tf.keras.Model, pass_name: str) -> ray.train.Checkpoint:
    compile_model(model, 1e-3)
    model.optimizer.build(model.trainable_variables)
    tf.train.Checkpoint(**trained_parts(model, pass_name), optimizer=model.optimizer).write(
        os.path.join(directory, WEIGHTS)
    )
    with open(os.path.join(directory, STATE), "w") as f:
        json.dump({"pass": pass_name, "epoch": 1, "history": [{"epoch": 1}]}, f)
    return ray.train.Checkpoint.from_directory(str(directory))


def checkpoint_bytes(directory) -> int:
    weights = os.path.join(directory, os.path.dirname(WEIGHTS))
    return sum(os.path.getsize(os.path.join(weights, name)) for name in os.listdir(weights))


def test_a_head_checkpoint_holds_the_classifier_and_restores_into_a_model_built_from_the_same_weights(tmp_path):
    weights = pretrained(tmp_path / "backbone.h5")
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    trained = build_model("demo_cnn", weights, (32, 32), 3, 0.0)
    classifier = trained.get_layer("classifier")
    classifier.set_weights([w + 1.0 for w in classifier.get_weights()])
    head_dir, full_dir = tmp_path / "head", tmp_path / "full"
    checkpoint = write_checkpoint(head_dir, trained, "head")
    write_checkpoint(full_dir, trained, "finetune")

    fresh = build_model("demo_cnn", weights, (32, 32), 3, 0.0)
    assert restore(fresh, checkpoint)["history"] == [{"epoch": 1}]
    np.testing.assert_allclose(fresh.predict(x, verbose=0), trained.predict(x, verbose=0), atol=1e-5)
    assert checkpoint_bytes(head_dir) < checkpoint_bytes(full_dir) / 5  # the frozen backbone is not saved again


def test_a_finetune_checkpoint_restores_the_unfrozen_backbone_too(tmp_path):
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    trained = build_model("demo_cnn", "none", (32, 32), 3, 0.0)
    unfreeze_model(trained, "all")
    backbone = trained.get_layer(BACKBONE_LAYER)
    backbone.set_weights([w * 1.5 for w in backbone.get_weights()])
    checkpoint = write_checkpoint(tmp_path, trained, "finetune")

    fresh = build_model("demo_cnn", "none", (32, 32), 3, 0.0)
    restore(fresh, checkpoint)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), trained.predict(x, verbose=0), atol=1e-4)
