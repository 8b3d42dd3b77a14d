"""Entrypoints, configs, the Ray Train loop and MLflow tracking."""
