"""`ray job submit` runs the same entrypoint unchanged against a head this test starts (own ports, own temp dir,
token auth) and stops (only its own processes; `ray stop` would kill every Ray on the machine)."""

from __future__ import annotations

import subprocess

from mlflow.tracking import MlflowClient

from tests.local_cluster import REPO, LocalCluster


def test_ray_job_submit_tiny_preset(tmp_path):
    cluster = LocalCluster(head_cpus=3)
    try:
        cluster.start()
        out = subprocess.run(
            ["ray", "job", "submit", "--address", cluster.address, "--working-dir", ".", "--",
             "python", "-m", "jobs.train", "--preset", "tiny", "--set", f"output_dir={tmp_path}",
             "--set", "name=submitted"],
            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=900,
        )
        log = out.stdout + out.stderr
        assert out.returncode == 0 and "succeeded" in log.lower(), log[-4000:]
        assert "[aerie] done" in log or "export" in log
    finally:
        cluster.stop()
    client_ = MlflowClient(f"sqlite:///{tmp_path / 'submitted' / 'mlflow.db'}")
    runs = client_.search_runs([client_.get_experiment_by_name("aerie").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "loss_0" in runs[0].data.metrics and runs[0].data.metrics["samples_trained"] == 48
    assert (tmp_path / "submitted" / "export" / "model.safetensors").is_file()
