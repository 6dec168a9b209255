import pytest

from transfer.config import Config, apply_override, from_dict, load_config
from transfer.errors import ConfigError

VALID = {"data": {"train": "/data/train"}}


def build(**sections) -> Config:
    raw = {"data": {"train": "/data/train"}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw, "job.yaml")


def test_defaults_follow_the_contract():
    c = build()
    assert (c.model.backbone, c.model.weights, c.head.batch_size, c.scaling.num_workers) == ("vgg16", "imagenet", 32, 2)
    assert c.data.image_size == (224, 224)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"head": {"epochs": -1}}, "job.yaml: head.epochs: must be >= 1, got -1"),
        ({"scaling": {"num_workers": 0}}, "job.yaml: scaling.num_workers: must be >= 1, got 0"),
        ({"scaling": {"num_workers": [0, 2]}}, "job.yaml: scaling.num_workers: must be >= 1, got 0"),
        ({"scaling": {"num_workers": [3, 2]}}, "job.yaml: scaling.num_workers: [min, max] needs min <= max"),
        ({"scaling": {"num_workers": [1, 2, 3]}}, "job.yaml: scaling.num_workers: expected int or a list of 2"),
        ({"model": {"backbone": "alexnet"}}, "job.yaml: model.backbone: must be one of"),
        ({"head": {"epochs": "ten"}}, "job.yaml: head.epochs: expected int, got 'ten'"),
        ({"head": {"learning_rate": True}}, "job.yaml: head.learning_rate: expected float"),
        ({"head": {"epoch": 3}}, "job.yaml: head.epoch: unknown key"),
        ({"data": {"image_size": [224]}}, "job.yaml: data.image_size: expected a list of 2 integers"),
        ({"data": {"bad_records": "ignore"}}, "job.yaml: data.bad_records: must be one of skip, fail"),
        ({"data": {"train": ""}}, "job.yaml: data.train: required"),
        ({"finetune": {"unfreeze": 0}}, "job.yaml: finetune.unfreeze: must be a layer count >= 1"),
        ({"data": {"validation_split": 1.5}}, "job.yaml: data.validation_split: must be in [0, 1)"),
        ({"head": {"search": {"trials": 4}}, "data": {"augment": ["flip"]}}, "job.yaml: head.search: trains heads on"),
        ({"head": {"search": {"trials": 4, "dropout": [0.5, 0.1]}}}, "job.yaml: head.search.dropout: with method"),
        ({"head": {"search": {"trials": 4, "epochs": [5, "x"]}}}, "job.yaml: head.search.epochs[1]: expected int"),
        ({"head": {"search": {"trials": 4, "class_weight": ["auto"]}}}, "job.yaml: head.search.class_weight: must"),
        (
            {"head": {"search": {"trials": 4, "method": "grid", "learning_rate": [1e-3, 1e-2]}}},
            "job.yaml: head.search.trials: the grid has 24 combinations, more than the 4 trials",
        ),
    ],
)
def test_bad_values_name_the_key(sections, message):
    with pytest.raises(ConfigError) as e:
        build(**sections)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_a_search_range_takes_ints_and_yaml_1_1_exponents_as_floats():
    search = build(head={"search": {"trials": 2, "learning_rate": ["1e-4", 1], "dropout": [0, 0.5]}}).head.search
    assert (search.learning_rate, search.dropout) == ((1e-4, 1.0), (0.0, 0.5))


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="job.yaml: optimizer: unknown key"):
        from_dict({**VALID, "optimizer": {}}, "job.yaml")


def test_set_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data: {train: /data/train}\nhead: {epochs: 3}\n")
    c = load_config(str(path), ["head.epochs=7", "finetune.unfreeze=all", "head.learning_rate=1e-4"])
    assert (c.head.epochs, c.finetune.unfreeze, c.head.learning_rate) == (7, "all", 1e-4)


def test_set_rejects_a_value_without_a_key():
    with pytest.raises(ConfigError, match="--set head.epochs: expected key.path=value"):
        apply_override({}, "head.epochs")


def test_local_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "job.yaml"
    path.write_text("run: {storage: runs}\ndata: {train: s3://bucket/train/}\nmodel: {weights: none}\n")
    c = load_config(str(path))
    assert c.run.storage == str(tmp_path / "runs")
    assert c.data.train == "s3://bucket/train/"
    assert c.model.weights == "none"


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("head: {epochs: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: .*not valid YAML"):
        load_config(str(bad))


def test_resolved_config_round_trips():
    c = build(head={"epochs": 4}, finetune={"unfreeze": "block5_conv1"})
    assert from_dict(c.to_dict()) == c
