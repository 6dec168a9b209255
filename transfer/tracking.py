"""MLflow tracking, when `run.mlflow_tracking_uri` is set (`pip install 'transfer[mlflow]'`): one MLflow run per
pass, named `<run.name>/<pass>` in the experiment `run.name`, with the config as parameters, every epoch's metrics
as they come, and the export folder as the artifact `export/`.

The tracking store is checked before Ray starts (a config error otherwise). Once training runs, a store that stops
answering costs a warning line, not the training.
"""

from __future__ import annotations

import time

from transfer import storage
from transfer.config import Config
from transfer.data.parquet import first_line
from transfer.errors import ConfigError

PARAMS_PER_CALL = 100  # MLflow's limit per log_batch
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "images_per_s", "bad_records")


def check_tracking(cfg: Config) -> None:
    """Stops a run whose MLflow store cannot be reached, or whose extra is not installed, before anything starts."""
    uri = cfg.run.mlflow_tracking_uri
    if uri is None:
        return
    try:
        import mlflow
    except ImportError:
        raise ConfigError("run.mlflow_tracking_uri: MLflow is not installed (pip install 'transfer[mlflow]')") from None
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        raise ConfigError(f"run.mlflow_tracking_uri: {storage.redact(uri)}: {first_line(e)}") from None


class PassTracking:
    """One pass's MLflow run; does nothing without a tracking URI."""

    def __init__(self, cfg: Config, pass_name: str, echo):
        self.client, self.run_id, self.echo, self.warned, self.finished = None, None, echo, False, False
        uri = cfg.run.mlflow_tracking_uri
        if uri is None:
            return
        import mlflow
        from mlflow.entities import Param

        self.client = mlflow.MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(cfg.run.name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.run.name)
        run = self.client.create_run(
            experiment_id, run_name=f"{cfg.run.name}/{pass_name}", tags={"transfer.pass": pass_name}
        )
        self.run_id = run.info.run_id
        params = [Param(k, storage.redact(str(v))) for k, v in {**flat(cfg.to_dict()), "pass": pass_name}.items()]
        for start in range(0, len(params), PARAMS_PER_CALL):
            self._call("log_batch", params=params[start : start + PARAMS_PER_CALL])

    def write(self, row: dict) -> None:
        """An epoch's row of metrics.json, at step = epoch."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), stamp, row["epoch"]) for k in METRICS if k in row]
        self._call("log_batch", metrics=metrics)

    def finish(self, export_uri: str) -> None:
        """The export folder as the artifact `export/`, then the run ended as finished."""
        if self.client is None:
            return
        with storage.local_copy(export_uri) as local:
            self._call("log_artifacts", local, "export")
        self._call("set_terminated", status="FINISHED")
        self.finished = True

    def close(self) -> None:
        """Ends a run that did not finish (the pass failed or was stopped) as failed."""
        if self.client is not None and not self.finished:
            self._call("set_terminated", status="FAILED")

    def _call(self, method: str, *args, **kwargs) -> None:
        try:
            getattr(self.client, method)(self.run_id, *args, **kwargs)
        except Exception as e:  # the store went away mid-run: the training goes on
            if not self.warned:
                self.echo(f"warning: MLflow: {method} failed, training goes on: {first_line(e)}")
                self.warned = True


def flat(values: dict, prefix: str = "") -> dict:
    """{"head": {"epochs": 3}} -> {"head.epochs": 3}: the config's keys as --set names them."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
