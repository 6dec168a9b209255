"""Entrypoints that Ray Jobs, KubeRay and Airflow run."""
