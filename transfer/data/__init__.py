"""Datasets: the driver scans and plans (parquet, plan); each worker builds its own tf.data pipeline (pipeline)."""
