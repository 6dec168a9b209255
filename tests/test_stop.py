"""A clean stop, piece by piece, without a cluster: a real signal becomes Interrupted with the shell's exit code,
the CLI turns it into the `interrupted` summary line, and an export stopped midway is not marked complete.
The whole path on a real Ray (SIGTERM mid-pass, then a rerun) is in test_faults.py."""

import json
import os
import signal
import time

import pytest

from jobs import train
from transfer import export, storage
from transfer.errors import Interrupted
from transfer.train_pass import signals_interrupt


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_a_pass_runs_raises_interrupted_then_the_old_handler_is_back(signum, exit_code):
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as caught, signals_interrupt():
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the handler runs at once, in this (the main) thread
    assert caught.value.exit_code == exit_code
    assert str(caught.value) == f"stopped by {signal.Signals(signum).name}"
    assert signal.getsignal(signum) is before


def test_the_cli_ends_an_interrupted_run_with_its_exit_code_and_summary_line(tmp_path, monkeypatch, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("run: {name: stopped}\ndata: {train: /data}\n")
    message = "head stopped by SIGINT; latest good checkpoint: runs/stopped/head/checkpoint_1 (epoch 1)"

    def run_job(*args, **kwargs):
        raise Interrupted(signal.SIGINT, message)

    monkeypatch.setattr("transfer.job.run_job", run_job)
    assert train.main([str(config), "--pass", "head"]) == 130
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1]) == {
        "status": "interrupted",
        "pass": "head",
        "run": "stopped",
        "exit_code": 130,
        "error": message,
    }
    assert err == f"error: {message}\n"


def test_an_export_stopped_midway_is_not_marked_complete(tmp_path, monkeypatch):
    from transfer.model import build_model

    location = str(tmp_path / "export" / "head")
    model = build_model("demo_cnn", "none", (32, 32), num_classes=2, dropout=0.0)
    export.write_export(model, ["cat", "dog"], "{}\n", {"final": {"epoch": 1}}, location)
    assert export.is_complete(location)
    upload = storage.upload_dir

    def upload_then_stop(local: str, target: str) -> None:  # the signal lands once the files are up
        upload(local, target)
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(storage, "upload_dir", upload_then_stop)
    with pytest.raises(Interrupted):
        export.write_export(model, ["cat", "dog"], "{}\n", {"final": {"epoch": 2}}, location)
    assert not export.is_complete(location)  # neither the old export nor the new one counts as complete
    assert os.path.exists(os.path.join(location, export.MODEL))
