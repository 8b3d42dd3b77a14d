"""`ray job submit` runs the same entrypoint unchanged against a head this test starts (own ports, own temp dir,
token auth) and stops (only its own processes; `ray stop` would kill every Ray on the machine)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def stop_own_cluster(temp_dir: str, gcs_port: int) -> None:
    """Kill exactly this test's Ray processes: those naming its temp dir (gcs, raylet, dashboard, ...) or its GCS
    address (the client server)."""

    def ours(cmd: str) -> bool:
        return temp_dir in cmd or ("ray" in cmd and re.search(rf":{gcs_port}\b", cmd) is not None)

    mine = [p for p in psutil.process_iter(["cmdline"]) if ours(" ".join(p.info["cmdline"] or []))]
    mine = [p for p in mine if p.pid != os.getpid()]
    for p in mine:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for p in alive:
        p.kill()


def test_ray_job_submit_tiny_preset(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="aerie-ray-", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    gcs, dash, agent, agent_grpc, client, rt_env, metrics, nm, om = free_ports(9)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    head = subprocess.run(
        ["ray", "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash), "--dashboard-host", "127.0.0.1",
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--ray-client-server-port", str(client), "--runtime-env-agent-port", str(rt_env),
         "--metrics-export-port", str(metrics), "--node-manager-port", str(nm), "--object-manager-port", str(om),
         "--temp-dir", temp_dir, "--num-cpus", "3", "--include-dashboard", "true", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        out = subprocess.run(
            ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".", "--",
             "python", "-m", "jobs.train", "--preset", "tiny", "--set", f"output_dir={tmp_path}",
             "--set", "name=submitted"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )
        log = out.stdout + out.stderr
        assert out.returncode == 0 and "succeeded" in log.lower(), log[-4000:]
        assert "[aerie] done" in log or "export" in log
    finally:
        stop_own_cluster(temp_dir, gcs)
    client_ = MlflowClient(f"sqlite:///{tmp_path / 'submitted' / 'mlflow.db'}")
    runs = client_.search_runs([client_.get_experiment_by_name("aerie").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "loss_0" in runs[0].data.metrics and runs[0].data.metrics["samples_trained"] == 48
    assert (tmp_path / "submitted" / "export" / "model.safetensors").is_file()
