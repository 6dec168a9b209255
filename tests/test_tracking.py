"""MLflow tracking's checks before a run starts (the tracking itself: test_job.py, on a real run)."""

import pytest

from transfer.config import from_dict
from transfer.errors import ConfigError
from transfer.tracking import check_tracking, flat


def test_a_tracking_store_that_cannot_be_written_stops_the_run_naming_the_key():
    cfg = from_dict({"data": {"train": "/data"}, "run": {"mlflow_tracking_uri": "file:///proc/transfer-mlruns"}})
    with pytest.raises(ConfigError, match=r"^run.mlflow_tracking_uri: file:///proc/transfer-mlruns: "):
        check_tracking(cfg)


def test_parameters_are_named_as_set_names_them():
    assert flat({"head": {"epochs": 3, "batch_size": 16}, "run": {"name": "x"}}) == {
        "head.epochs": 3,
        "head.batch_size": 16,
        "run.name": "x",
    }
