import json

import numpy as np
import pytest

from transfer import export
from transfer.config import from_dict
from transfer.errors import DataError
from transfer.model import build_model


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    location = str(tmp_path_factory.mktemp("export") / "head")
    model = build_model("demo_cnn", "none", (32, 32), num_classes=2, dropout=0.0)
    cfg = from_dict({"data": {"train": "s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/train/"}})
    export.write_export(model, ["cat", "dog"], cfg.to_yaml(), {"final": {"epoch": 1}}, location)
    return location, model


def test_export_is_complete_and_loads_safely(written):
    location, model = written
    export.check_complete(location)
    loaded = export.load_model(location)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    manifest = json.load(open(f"{location}/manifest.json"))
    assert {"model.keras", "labels.json", "config.yaml", "metrics.json", "saved_model/saved_model.pb"} <= set(
        manifest["files"]
    )


def test_saved_config_hides_credentials(written):
    text = open(f"{written[0]}/config.yaml").read()
    assert "wJalrXUtnFEMI" not in text and "s3://***@bucket/train/" in text


def test_an_altered_file_of_the_same_size_is_refused(written, tmp_path):
    location = str(tmp_path / "copy")
    import shutil

    shutil.copytree(written[0], location)
    with open(f"{location}/labels.json", "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data.replace(b"cat", b"cow"))
    with pytest.raises(DataError, match="labels.json differs from its manifest \\(sha256\\): the export was altered"):
        export.check_complete(location, "finetune.init_from")


def test_an_export_without_its_manifest_is_incomplete(written, tmp_path):
    import shutil

    location = str(tmp_path / "copy")
    shutil.copytree(written[0], location)
    (tmp_path / "copy" / "manifest.json").unlink()
    with pytest.raises(DataError, match="is not a complete export \\(no manifest.json\\)"):
        export.load_model(location)
