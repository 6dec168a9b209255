"""The head search on a finished run: trials on the features the head pass persisted, the best one exported; the
features reused by a rerun, and computed again where a stored shard is refused."""

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import run_cli, summary_of, write_config
from transfer import export
from transfer.search import balanced_weights

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def searched(finished_run, assets, tmp_path_factory) -> dict:
    """The finished run, copied, with one more head epoch and a head search of 3 trials; the train shard of
    worker 1 cut short first, so that worker computes its train features again."""
    root = tmp_path_factory.mktemp("search")
    shutil.copytree(finished_run["run"].parent, root / "runs")  # the finished run, left as it is for the others
    run = root / "runs" / "shapes"
    cut = run / "features" / "train" / "1-of-2.parquet"
    cut.write_bytes(cut.read_bytes()[:100])
    config = write_config(
        root / "job.yaml", assets, storage=str(root / "runs"), name="shapes", run={"progress_every_s": 0}
    )
    search = ["--set", "head.search.trials=3", "--set", "head.search.epochs=[2,4]"]
    result = run_cli(config, "--pass", "head", "--set", "head.epochs=4", *search)
    return {"config": config, "search": search, "result": result, "summary": summary_of(result), "run": run}


def test_a_rerun_reads_the_persisted_features_and_computes_a_refused_shard_again(searched):
    lines = searched["result"].stdout.splitlines()
    read = [line for line in lines if "read from features/" in line]  # worker 0's, for both splits
    assert len(read) == 2 and any("validation images" in line for line in read), lines
    assert not any("images per worker computed" in line for line in lines)
    cut = searched["run"] / "features" / "train" / "1-of-2.parquet"
    [refused] = [line for line in lines if "computing the features again" in line]
    assert refused.startswith(f"head: {cut} is not readable (")
    training = int(re.search(r"(\d+) training and", searched["result"].stdout).group(1))
    assert pq.ParquetFile(cut).metadata.num_rows == training  # computed again and saved for the next run


def test_every_trial_is_listed_and_the_best_head_is_the_export(searched):
    stdout = searched["result"].stdout
    assert re.search(r"head search: 3 trials \(random\) on the persisted features", stdout)
    assert len(re.findall(r"^head search: trial \d/3 learning_rate", stdout, re.M)) == 3
    head = searched["run"] / "export" / "head"
    export.check_complete(str(head))  # search.json among the manifest's files
    trials = json.loads((head / export.SEARCH).read_text())
    assert [t["trial"] for t in trials][0] == "configured" and len(trials) == 4
    assert all(t["error"] is None and t["val_accuracy"] is not None for t in trials)
    assert all(t["epochs_trained"] <= t["params"]["epochs"] for t in trials[1:])
    best = max(trials, key=lambda t: t["val_accuracy"])
    [chosen] = [t for t in trials if t["chosen"]]
    assert chosen["val_accuracy"] == best["val_accuracy"]

    metrics = json.loads((head / "metrics.json").read_text())
    assert metrics["history"][-1]["val_accuracy"] == pytest.approx(chosen["val_accuracy"])
    exported = yaml.safe_load((head / "config.yaml").read_text())
    assert exported["head"]["learning_rate"] == pytest.approx(chosen["params"]["learning_rate"])
    assert exported["model"]["dropout"] == pytest.approx(chosen["params"]["dropout"])
    evaluation = json.loads((head / "evaluation.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(chosen["val_accuracy"], abs=1e-6)


def test_a_finished_search_is_not_run_again(searched):
    result = run_cli(searched["config"], "--pass", "head", "--set", "head.epochs=4", *searched["search"])
    summary = summary_of(result)
    assert summary["passes"]["head"]["status"] == "skipped"
    assert "head search" not in result.stdout


def test_balanced_class_weights_make_each_class_weigh_the_same():
    weights = balanced_weights([0, 0, 0, 1], 3)
    assert weights == {0: 4 / 9, 1: 4 / 3, 2: 0.0}
    assert 3 * weights[0] == pytest.approx(1 * weights[1])
