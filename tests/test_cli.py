"""The command line as a user meets it: exit codes and one-line errors, before any training starts."""

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import run_cli


def test_bad_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("data: {train: /data}\nscaling: {num_workers: 0}\n")
    result = run_cli(str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {config}: scaling.num_workers: must be >= 1, got 0"


def test_bad_set_override_exits_2(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("data: {train: /data}\n")
    result = run_cli(str(config), "--set", "head.epochz=3")
    assert result.returncode == 2
    assert "head.epochz: unknown key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_usage_error_exits_2():
    result = run_cli("--pass", "both")
    assert result.returncode == 2
    assert "invalid choice: 'both'" in result.stderr


def test_data_error_exits_3_naming_file_and_column(tmp_path):
    data = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": [b"x"] * 4, "target": ["a", "b"] * 2}), data)
    config = tmp_path / "job.yaml"
    config.write_text(f"data: {{train: {data}}}\nmodel: {{weights: none}}\n")
    result = run_cli(str(config))
    assert result.returncode == 3
    assert result.stderr.strip() == (f"error: data.label_column: {data}: no column 'label' (columns: image, target)")


def test_missing_weights_file_exits_2_before_training(tmp_path):
    data = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": [b"x"] * 4, "label": ["a", "b"] * 2}), data)
    config = tmp_path / "job.yaml"
    config.write_text(f"data: {{train: {data}}}\nmodel: {{backbone: demo_cnn, weights: {tmp_path}/w.h5}}\n")
    result = run_cli(str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: model.weights: {tmp_path}/w.h5 not found"
