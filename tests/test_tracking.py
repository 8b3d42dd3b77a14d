"""The embedded MLflow store: created atomically, a damaged one named with the fix."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from jobs import tracking


def test_interrupted_store_creation_leaves_nothing_behind(tmp_path, monkeypatch):
    db = tmp_path / "run" / "mlflow.db"
    uri = f"sqlite:///{db}"
    real = tracking._create_schema

    def killed(side_uri):  # the migrations get part-way, then the user presses Ctrl-C
        real(side_uri)
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "_create_schema", killed)
    with pytest.raises(KeyboardInterrupt):
        tracking.open_run(uri, "aerie", "r1")
    assert list(db.parent.iterdir()) == []  # neither the DB nor the side file

    monkeypatch.setattr(tracking, "_create_schema", real)
    run = tracking.open_run(uri, "aerie", "r1")
    run.log_metrics({"loss": 1.5}, step=3)
    again = tracking.open_run(uri, "aerie", "r1")  # a resubmitted run name resumes the same run
    assert again.run_id == run.run_id
    hist = MlflowClient(uri).get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(3, 1.5)]


def test_damaged_store_is_named_with_the_fix(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a sqlite database" * 100)
    with pytest.raises(RuntimeError, match=rf"embedded MLflow store {db} cannot be opened .* move it away"):
        tracking.open_run(f"sqlite:///{db}", "aerie", "r1")
    assert db.read_bytes() == b"not a sqlite database" * 100  # never touched
