"""Mixed precision reaches a model loaded from an export (the fine-tune pass), and XLA runs both passes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO, run_cli, write_config
from transfer.model import BACKBONE_LAYER, CLASSIFIER_LAYER, build_model, compile_model, unfreeze_model, with_precision


def all_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Every layer, those of the nested backbone included."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, tf.keras.Model):
            found += all_layers(layer)
    return found


def computing_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    return [layer for layer in all_layers(model) if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense))]


@pytest.fixture
def loaded(tmp_path) -> tf.keras.Model:
    """A head export's model as the fine-tune pass loads it."""
    path = str(tmp_path / "model.keras")
    build_model("demo_cnn", "none", (32, 32), 3, 0.0).save(path)
    return tf.keras.models.load_model(path, compile=False, safe_mode=True)


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)


@pytest.fixture
def global_policy():
    """Sets the global policy as a worker does; puts float32 back afterwards."""
    yield tf.keras.mixed_precision.set_global_policy
    tf.keras.mixed_precision.set_global_policy("float32")


def test_a_loaded_model_ignores_the_global_policy(tmp_path, global_policy):
    # Why with_precision exists: each layer's saved dtype wins over the policy set before loading.
    path = str(tmp_path / "model.keras")
    build_model("demo_cnn", "none", (32, 32), 3, 0.0).save(path)
    global_policy("mixed_bfloat16")
    model = tf.keras.models.load_model(path, compile=False, safe_mode=True)
    assert {layer.compute_dtype for layer in computing_layers(model)} == {"float32"}


def test_layers_compute_in_bfloat16_but_inputs_and_the_output_stay_float32(loaded, images):
    model = with_precision(loaded, "mixed_bfloat16")
    for layer in computing_layers(model):
        expected = "float32" if layer.name == CLASSIFIER_LAYER else "bfloat16"
        assert layer.compute_dtype == expected, layer.name
        assert layer.variable_dtype == "float32", layer.name  # mixed: the variables stay float32
    assert model.input.dtype == tf.float32
    assert model.get_layer(BACKBONE_LAYER).input.dtype == tf.float32
    assert model(images).dtype == tf.float32
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # left as it was


def test_same_architecture_names_weights_and_close_predictions(loaded, images):
    model = with_precision(loaded, "mixed_bfloat16")
    assert [layer.name for layer in all_layers(model)] == [layer.name for layer in all_layers(loaded)]
    assert model.name == loaded.name
    for new, old in zip(model.weights, loaded.weights, strict=True):
        assert new.name == old.name
        np.testing.assert_array_equal(new.numpy(), old.numpy())
    expected = loaded.predict(images, verbose=0)
    predicted = model.predict(images, verbose=0)
    assert predicted.dtype == np.float32
    # bfloat16 keeps 8 significant bits: softmax scores agree to about 1e-2.
    np.testing.assert_allclose(predicted, expected, atol=3e-2)
    assert not np.array_equal(predicted, expected)  # it did compute in bfloat16


def test_trainable_flags_survive_and_unfreezing_applies_afterwards(loaded):
    loaded.get_layer(CLASSIFIER_LAYER).trainable = False  # a flag set before, kept as set
    model = with_precision(loaded, "mixed_bfloat16")
    assert [layer.trainable for layer in all_layers(model)] == [layer.trainable for layer in all_layers(loaded)]
    assert not model.get_layer(CLASSIFIER_LAYER).trainable

    assert unfreeze_model(model, "block3_conv") == unfreeze_model(loaded, "block3_conv")
    for m in (model, loaded):
        compile_model(m, 1e-3)
    assert [v.name for v in model.trainable_variables] == [v.name for v in loaded.trainable_variables]
    assert {v.name.split("/")[0] for v in model.trainable_variables} == {"block3_conv", "block4_conv"}


def test_it_trains_a_step_after_unfreezing(loaded, images):
    model = with_precision(loaded, "mixed_bfloat16")
    unfreeze_model(model, "all")
    compile_model(model, 1e-3)
    before = model.get_layer(BACKBONE_LAYER).get_layer("block1_conv").get_weights()[0]
    history = model.fit(images, np.arange(8) % 3, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.array_equal(model.get_layer(BACKBONE_LAYER).get_layer("block1_conv").get_weights()[0], before)


def test_mixed_float16_gets_loss_scaling_when_compiled(loaded):
    # compile decides on loss scaling from the model's own policy, not the global one.
    model = with_precision(loaded, "mixed_float16")
    compile_model(model, 1e-3)
    assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)


def test_saved_as_model_keras_it_loads_in_safe_mode_still_mixed(loaded, tmp_path, images):
    model = with_precision(loaded, "mixed_bfloat16")
    path = str(tmp_path / "mixed.keras")
    model.save(path)
    again = tf.keras.models.load_model(path, safe_mode=True)
    assert [layer.compute_dtype for layer in computing_layers(again)] == [
        layer.compute_dtype for layer in computing_layers(model)
    ]
    np.testing.assert_array_equal(again.predict(images, verbose=0), model.predict(images, verbose=0))


def test_a_stateful_preprocessing_layer_stays_float32_so_the_export_loads_again(tmp_path):
    # EfficientNet's Normalization: its mean and variance are variables in its compute dtype.
    inputs = tf.keras.Input((8, 8, 3))
    norm = tf.keras.layers.Normalization(axis=-1, name="normalization")
    x = tf.keras.layers.Conv2D(4, 3, name="conv")(norm(inputs))
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(2, dtype="float32", name=CLASSIFIER_LAYER)(x))
    norm.set_weights([np.full(3, 100.0), np.full(3, 50.0), np.array(10)])
    mixed = with_precision(model, "mixed_bfloat16")
    assert mixed.get_layer("normalization").compute_dtype == "float32"
    assert mixed.get_layer("conv").compute_dtype == "bfloat16"
    path = str(tmp_path / "model.keras")
    mixed.save(path)
    again = tf.keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(again.get_layer("normalization").get_weights()[0], np.full(3, 100.0))


def test_no_policy_returns_the_model_itself(loaded):
    assert with_precision(loaded, None) is loaded


# End to end on a real local Ray cluster with 2 workers, through the CLI.


def succeeded(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    return summary


INSPECT = """
import json, sys
import numpy as np, tensorflow as tf
from transfer.export import load_model
model = load_model(sys.argv[1])
def layers(m):
    for layer in m.layers:
        yield layer
        if isinstance(layer, tf.keras.Model):
            yield from layers(layer)
computing = (tf.keras.layers.Conv2D, tf.keras.layers.Dense)
dtypes = {layer.name: layer.compute_dtype for layer in layers(model) if isinstance(layer, computing)}
scores = model.predict(np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32"), verbose=0)
print(json.dumps({"dtypes": dtypes, "output": str(scores.dtype), "sums": scores.sum(axis=1).tolist()}))
"""


def test_jit_compile_on_cpu_with_several_workers_is_a_config_error():
    from transfer.config import from_dict
    from transfer.errors import ConfigError

    scaling = {"jit_compile": True, "num_workers": 2}
    with pytest.raises(ConfigError, match="scaling.jit_compile: XLA has no collectives on CPU"):
        from_dict({"data": {"train": "x"}, "scaling": scaling})
    from_dict({"data": {"train": "x"}, "scaling": {**scaling, "use_gpu": True}})
    from_dict({"data": {"train": "x"}, "scaling": {**scaling, "num_workers": 1}})


@pytest.mark.integration
def test_jit_compiled_bfloat16_run_trains_both_passes_and_its_export_computes_in_bfloat16(assets, tmp_path):
    # One run for both (CI time): XLA on one worker, since XLA has no collectives on CPU (b/194942685) and tf-keras
    # compiles the whole train_step, the gradient all-reduce of MultiWorkerMirroredStrategy included; several CPU
    # workers are refused (above). The policy reaches the fine-tuned model whatever the number of workers.
    config = write_config(
        tmp_path / "job.yaml",
        assets,
        storage=str(tmp_path / "runs"),
        name="bf16",
        head={"epochs": 1},
        finetune={"epochs": 1},
        scaling={"mixed_precision": "bfloat16", "jit_compile": True, "num_workers": 1, "max_failures": 0},
    )
    summary = succeeded(run_cli(config, "--pass", "all"))
    for pass_name in ("head", "finetune"):
        assert summary["passes"][pass_name]["status"] == "trained"
        assert summary["passes"][pass_name]["final"]["epoch"] == 1
        assert np.isfinite(summary["passes"][pass_name]["final"]["loss"])
        assert (tmp_path / "runs" / "bf16" / "export" / pass_name / "manifest.json").exists()

    export = tmp_path / "runs" / "bf16" / "export" / "finetune"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", INSPECT, str(export)], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["dtypes"].pop(CLASSIFIER_LAYER) == "float32"
    assert outcome["dtypes"] and set(outcome["dtypes"].values()) == {"bfloat16"}, outcome["dtypes"]
    assert outcome["output"] == "float32"
    np.testing.assert_allclose(outcome["sums"], 1.0, atol=1e-3)  # softmax scores
