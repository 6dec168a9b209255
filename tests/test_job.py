"""End to end on a real local Ray cluster with 2 workers: real TensorFlow training under MWMS, as a user runs it."""

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import REPO, run_cli, summary_of, write_config
from transfer import allocator

pytestmark = pytest.mark.integration


def test_both_passes_learn_well_above_chance(finished_run):
    passes = finished_run["summary"]["passes"]
    head, finetune = passes["head"]["final"], passes["finetune"]["final"]
    # 5 classes: chance is 0.2.
    assert head["val_accuracy"] >= 0.7
    assert finetune["val_accuracy"] >= head["val_accuracy"] - 0.05  # what fine-tuning changed: the test below


def test_finetuning_changes_the_unfrozen_backbone_layers_and_no_others(finished_run):
    from transfer import export
    from transfer.model import BACKBONE_LAYER, CLASSIFIER_LAYER

    def weights(pass_name: str) -> dict[str, list]:
        model = export.load_model(str(finished_run["run"] / "export" / pass_name))
        layers = [*model.get_layer(BACKBONE_LAYER).layers, model.get_layer(CLASSIFIER_LAYER)]
        return {layer.name: [w.numpy() for w in layer.weights] for layer in layers if layer.weights}

    head, finetune = weights("head"), weights("finetune")
    changed = {name for name in head if any((h != f).any() for h, f in zip(head[name], finetune[name], strict=True))}
    # finetune.unfreeze is block3_conv: it and the layers above train, but for BatchNormalization, kept frozen.
    assert changed == {"block3_conv", "block4_conv", CLASSIFIER_LAYER}


def test_each_export_evaluates_every_validation_row_per_class(finished_run):
    from transfer.config import load_config
    from transfer.job import plan_data

    rows = 2 * plan_data(load_config(finished_run["config"]))[2].validation.rows_per_worker  # 2 workers' shards
    classes = ["checker", "cross", "diamond", "dots", "ring"]
    stdout = finished_run["result"].stdout
    for pass_name in ("head", "finetune"):
        export = finished_run["run"] / "export" / pass_name
        evaluation = json.loads((export / "evaluation.json").read_text())
        files = json.loads((export / "manifest.json").read_text())["files"]
        assert {"evaluation.json", "confusion_matrix.png", "learning_curves.png"} <= set(files)
        for picture in ("confusion_matrix.png", "learning_curves.png"):
            with Image.open(export / picture) as image:
                assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        confusion = evaluation["confusion_matrix"]
        assert evaluation["classes"] == classes and len(confusion) == 5 and all(len(row) == 5 for row in confusion)
        assert evaluation["rows"] == rows == sum(map(sum, confusion))
        assert [evaluation["per_class"][c]["support"] for c in classes] == [sum(row) for row in confusion]
        # The same rows and weights as the last epoch's validation, counted another way: the same accuracy.
        final = json.loads((export / "metrics.json").read_text())["final"]
        assert evaluation["accuracy"] == pytest.approx(final["val_accuracy"], abs=1e-6)
        assert evaluation["k"] == 2 and evaluation["top_k_accuracy"] >= evaluation["accuracy"]
        # The most confidently wrong rows, each where it is: that row of that file holds the true label.
        misclassified = evaluation["misclassified"]
        assert len(misclassified) == min(20, rows - sum(confusion[i][i] for i in range(5)))
        probabilities = [row["probability"] for row in misclassified]
        assert probabilities == sorted(probabilities, reverse=True)
        for row in misclassified:
            file, group, position = re.fullmatch(r"(.+\.parquet) row group (\d+) row (\d+)", row["where"]).groups()
            label = pq.ParquetFile(file).read_row_group(int(group), columns=["label"]).column(0)[int(position)]
            assert label.as_py() == row["true"] != row["predicted"]
        assert f"{pass_name}: evaluated on {rows} validation rows: accuracy {evaluation['accuracy']:.3f}" in stdout
        worst = min(classes, key=lambda c: (evaluation["per_class"][c]["f1"], c))
        assert f"per class, worst first:\n  {worst}: f1 " in stdout


def test_one_line_per_epoch_per_pass(finished_run):
    from transfer.config import load_config
    from transfer.job import plan_data

    lines = finished_run["result"].stdout.splitlines()
    assert len([line for line in lines if line.startswith("head epoch ")]) == 3
    assert len([line for line in lines if line.startswith("finetune epoch ")]) == 2
    assert any(line.startswith("head epoch 3/3: loss ") and "val_accuracy" in line for line in lines)
    assert any(line.startswith("head: 2 workers on 1 nodes (") for line in lines)
    plan = plan_data(load_config(finished_run["config"]))[2]  # the plan for 2 workers
    train, val = plan.train.rows_per_worker, plan.validation.rows_per_worker
    # The frozen backbone ran once per image, not once per epoch; fine-tuning decoded its validation images once.
    assert any(line.startswith(f"head: backbone features of {train} images per worker computed in") for line in lines)
    assert any(line.startswith(f"finetune: {val} validation images per worker decoded once in") for line in lines)
    # How far a long phase is, as it goes: the features per worker, an epoch in images of both workers.
    assert any(re.fullmatch(rf"head: backbone features of images per worker: \d+/{train} images, .*", s) for s in lines)
    epoch = 2 * 16 * plan.steps_per_epoch(16)
    assert any(
        re.fullmatch(rf"finetune: epoch 2/2: \d+/{epoch:,} images, \d+ images/s, \d+:\d\d left", s) for s in lines
    )


def test_outputs_are_where_the_contract_says(finished_run):
    run = finished_run["run"]
    for pass_name, epochs in (("head", 3), ("finetune", 2)):
        export = run / "export" / pass_name
        for name in ("model.keras", "saved_model/saved_model.pb", "labels.json", "config.yaml", "manifest.json"):
            assert (export / name).exists(), name
        metrics = json.loads((export / "metrics.json").read_text())
        assert [row["epoch"] for row in metrics["history"]] == list(range(1, epochs + 1))
        assert [row["world_size"] for row in metrics["history"]] == [2] * epochs
        assert metrics["cluster"]["nodes"] == 1 and [w["rank"] for w in metrics["cluster"]["workers"]] == [0, 1]
        # The workers run on tcmalloc where the machine has it (.ci/run installs it), else on glibc's malloc.
        expected = "tcmalloc" if allocator.tcmalloc_path() else "system"
        assert [w["allocator"] for w in metrics["cluster"]["workers"]] == [expected] * 2
        assert metrics["final"] == metrics["history"][-1]
        assert json.loads((export / "labels.json").read_text()) == ["checker", "cross", "diamond", "dots", "ring"]
        checkpoints = [p for p in (run / pass_name).iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
        assert checkpoints and all((c / "config.yaml").exists() for c in checkpoints)


def test_tensorboard_shows_each_pass_per_epoch_as_metrics_json_has_it(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for pass_name, learning_rate in (("head", 3.0e-3), ("finetune", 1.0e-4)):
        history = json.loads((finished_run["run"] / "export" / pass_name / "metrics.json").read_text())["history"]
        logs = finished_run["run"] / "tensorboard" / pass_name
        train, validation = (EventAccumulator(str(logs / part)).Reload() for part in ("train", "validation"))

        def curve(events, tag):
            return [(s.step, float(tf_value(s))) for s in events.Tensors(tag)]

        for events, tag, key in ((train, "epoch_loss", "loss"), (validation, "epoch_accuracy", "val_accuracy")):
            expected = [(row["epoch"], pytest.approx(row[key], rel=1e-6)) for row in history]
            assert curve(events, tag) == expected, (pass_name, tag)
        assert [value for _, value in curve(train, "learning_rate")] == [pytest.approx(learning_rate)] * len(history)
        assert "images_per_s" in train.Tags()["tensors"] and "bad_records" in train.Tags()["tensors"]


def test_mlflow_has_each_pass_with_its_config_epochs_and_export(finished_run):
    import mlflow

    client = mlflow.MlflowClient(finished_run["mlflow"])
    experiment = client.get_experiment_by_name("shapes")
    runs = {run.data.tags["transfer.pass"]: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["finetune", "head"]
    for pass_name, run in runs.items():
        assert run.info.run_name == f"shapes/{pass_name}" and run.info.status == "FINISHED"
        assert run.data.params["head.epochs"] == "3" and run.data.params["model.backbone"] == "demo_cnn"
        history = json.loads((finished_run["run"] / "export" / pass_name / "metrics.json").read_text())["history"]
        logged = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [(m.step, m.value) for m in logged] == [
            (row["epoch"], pytest.approx(row["val_accuracy"])) for row in history
        ]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
        assert {"export/model.keras", "export/manifest.json", "export/evaluation.json"} <= artifacts


def tf_value(event) -> float:
    import tensorflow as tf

    return tf.make_ndarray(event.tensor_proto)


PREDICT = """
import json, sys
import numpy as np, pyarrow.parquet as pq, tensorflow as tf
export, data = sys.argv[1], sys.argv[2]
model = tf.keras.models.load_model(export + "/model.keras")
classes = json.load(open(export + "/labels.json"))
table = pq.read_table(data)
decode = lambda b: tf.image.resize(tf.io.decode_jpeg(b, channels=3), (64, 64)).numpy()
images = np.stack([decode(b) for b in table["image"].to_pylist()])
scores = model.predict(images, verbose=0)
predicted = [classes[i] for i in scores.argmax(axis=1)]
saved_model = tf.saved_model.load(export + "/saved_model")
served = saved_model.serve(tf.constant(images)).numpy()
accuracy = float(np.mean([p == t for p, t in zip(predicted, table["label"].to_pylist())]))
print(json.dumps({"accuracy": accuracy, "agree": float(np.mean(served.argmax(axis=1) == scores.argmax(axis=1)))}))
"""


def test_export_loads_and_predicts_class_names_in_a_fresh_process(finished_run, tmp_path):
    from transfer import demo

    export = finished_run["run"] / "export" / "finetune"
    # Rows the model never trained on: new images of the same classes (another seed than the assets').
    demo.write_parquet_dataset(str(tmp_path / "held_out"), per_class=20, seed=11, files=((1.0, 50),))
    data = str(tmp_path / "held_out" / "part-000.parquet")
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", PREDICT, str(export), data], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["accuracy"] >= 0.7
    assert outcome["agree"] == 1.0


def test_rerunning_a_finished_run_does_nothing_and_says_so(finished_run):
    result = run_cli(finished_run["config"])
    summary = summary_of(result)
    assert {p["status"] for p in summary["passes"].values()} == {"skipped"}
    assert "head: already finished (3 epochs)" in result.stdout
    assert summary["passes"]["head"]["final"] == finished_run["summary"]["passes"]["head"]["final"]


def test_rerun_with_more_epochs_resumes_from_the_checkpoint_epoch(finished_run, assets, tmp_path):
    shutil.copytree(finished_run["run"].parent, tmp_path / "runs")  # the finished run, left as it is for the others
    config = write_config(
        tmp_path / "job.yaml", assets, storage=str(tmp_path / "runs"), name="shapes", run={"progress_every_s": 0}
    )
    result = run_cli(config, "--pass", "finetune", "--set", "finetune.epochs=3")
    summary = summary_of(result)
    assert "finetune: resuming after epoch 2 from its latest checkpoint" in result.stdout
    assert "finetune epoch 2/3" not in result.stdout and "finetune epoch 3/3" in result.stdout
    metrics = json.loads((tmp_path / "runs" / "shapes" / "export" / "finetune" / "metrics.json").read_text())
    before = json.loads((finished_run["run"] / "export" / "finetune" / "metrics.json").read_text())
    assert metrics["history"][:2] == before["history"]
    assert summary["passes"]["finetune"]["final"]["epoch"] == 3


def test_finetune_without_a_head_export_is_refused(assets, tmp_path):
    config = write_config(tmp_path / "job.yaml", assets, storage=str(tmp_path / "runs"), name="nohead")
    result = run_cli(config, "--pass", "finetune")
    assert result.returncode == 3
    assert "finetune.init_from:" in result.stderr and "is not a complete export" in result.stderr
