"""Real Ray clusters on this machine for the job tests: a head and worker raylets started with `ray start`, each with
its own ports, all under one private temp dir; and a real `mlflow server` on loopback.

Everything is stopped by pid. `ray stop` would kill every Ray on the machine, someone else's included.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from jobs.watchdog import terminate

REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_env(**extra: str) -> dict[str, str]:
    """The environment for `ray` CLI calls: this venv first on PATH (a job's `python` resolves through the head's
    PATH), token auth, no inherited RAY_ADDRESS."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def stop_own_cluster(temp_dir: str, gcs_port: int) -> None:
    """Kill exactly one test cluster's Ray processes: those naming its temp dir (gcs, raylets, dashboard, ...) or its
    GCS address (the client server)."""

    def ours(p: psutil.Process) -> bool:
        cmd = " ".join(p.info["cmdline"] or [])
        if temp_dir in cmd or ("ray" in cmd and re.search(rf":{gcs_port}\b", cmd) is not None):
            return True
        # A job's driver (and its watchdog) names neither: it has the cluster's address in its environment.
        return "python" in cmd and (p.environ().get("RAY_ADDRESS") or "").endswith(f":{gcs_port}")

    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and ours(p):
                mine.append(p)
        except psutil.Error:
            pass
    terminate(mine, grace_s=15)


@dataclass
class Node:
    name: str
    node_manager_port: int
    resources: dict[str, float]


@dataclass
class LocalCluster:
    """A head (`head_cpus` task CPUs) plus worker raylets joined with `ray start --address`."""

    head_cpus: int = 0
    env: dict[str, str] = field(default_factory=ray_env)
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="aerie-ray-", dir="/tmp"))  # short: socket paths
    nodes: list[Node] = field(default_factory=list)

    def start(self) -> LocalCluster:
        (self.gcs, self.dashboard, *ports) = free_ports(11)
        subprocess.run(["ray", "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)
        agent, agent_grpc, client, rt_env, metrics, nm, om, wmin = ports[:8]
        self._run(["ray", "start", "--head", "--port", str(self.gcs), "--dashboard-port", str(self.dashboard),
                   "--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(client),
                   "--include-dashboard", "true", "--num-cpus", str(self.head_cpus),
                   *self._node_ports(agent, agent_grpc, rt_env, metrics, nm, om)])
        self.nodes.append(Node("head", nm, {"CPU": self.head_cpus}))
        return self

    def _node_ports(self, agent, agent_grpc, rt_env, metrics, nm, om) -> list[str]:
        # Two raylets on one machine collide on every default port, so each gets its own.
        return ["--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
                "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
                "--node-manager-port", str(nm), "--object-manager-port", str(om), "--temp-dir", self.temp_dir,
                "--disable-usage-stats"]

    def _run(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        out = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float], env: dict[str, str] | None = None) -> Node:
        """A worker raylet advertising `resources` plus a marker resource `node_<name>` (to find it again)."""
        agent, agent_grpc, rt_env, metrics, nm, om = free_ports(6)
        res = {**resources, f"node_{name}": 1}
        self._run(["ray", "start", "--address", f"127.0.0.1:{self.gcs}", "--num-cpus", str(num_cpus),
                   "--resources", json.dumps(res), *self._node_ports(agent, agent_grpc, rt_env, metrics, nm, om)],
                  env={**self.env, **(env or {})})
        node = Node(name, nm, {"CPU": num_cpus, **res})
        self.nodes.append(node)
        return node

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def raylet(self, node: Node) -> psutil.Process:
        """The raylet process of `node` (found by its node manager port)."""
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in cmd and self.temp_dir in cmd and f"--node_manager_port={node.node_manager_port}" in cmd:
                return p
        raise LookupError(f"no raylet for node {node.name}")

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node's raylet, as a machine failure would; its workers exit when their raylet is gone."""
        self.raylet(node).kill()

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.list("nodes", "state=ALIVE")) >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} nodes did not join within {timeout}s")

    def list(self, what: str, *filters: str) -> list[dict]:
        """`ray list <what>` through the dashboard's state API (dead actors included)."""
        cmd = ["ray", "list", what, "--address", self.address, "--format", "json", "--detail", "--limit", "10000"]
        for f in filters:
            cmd += ["--filter", f]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray list {what} failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    def node_of(self, node_id: str) -> str:
        """The name given in add_node of the node with this id."""
        for n in self.list("nodes"):
            if n["node_id"] == node_id:
                names = [k[len("node_"):] for k in n["resources_total"] if k.startswith("node_") and ":" not in k]
                return names[0] if names else "head"
        raise LookupError(node_id)

    def submit(self, job_id: str, entrypoint: list[str]) -> None:
        """`ray job submit --no-wait` from the repo root (its working dir is uploaded)."""
        self._run(["ray", "job", "submit", "--address", self.address, "--submission-id", job_id, "--no-wait",
                   "--working-dir", str(REPO), "--", *entrypoint])

    def job_status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED. Polled, because a `ray job submit` that tails the logs was
        seen to hang after its job had succeeded (once, after a node of the cluster died)."""
        out = subprocess.run(["ray", "job", "status", "--address", self.address, job_id], env=self.env,
                             capture_output=True, text=True, timeout=120)
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # the CLI colours its words
        m = re.search(r"Job '[^']+' (succeeded|failed|was stopped)|Status for job '[^']+': (?:JobStatus\.)?(\w+)", text)
        if not m:
            raise RuntimeError(f"ray job status {job_id}: {text[-2000:]}")
        if m.group(1):
            return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)]
        return "RUNNING" if m.group(2) in ("RUNNING", "PENDING") else m.group(2)

    def job_logs(self, job_id: str) -> str:
        out = subprocess.run(["ray", "job", "logs", "--address", self.address, job_id], env=self.env,
                             capture_output=True, text=True, timeout=120)
        return out.stdout + out.stderr

    def stop(self) -> None:
        stop_own_cluster(self.temp_dir, self.gcs)


@dataclass
class MlflowServer:
    """`mlflow server` on loopback with a sqlite backend and proxied artifacts, lean (1 worker, no job runner)."""

    root: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        self.port = self.port or free_ports(1)[0]
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = open(self.root / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server not up within {timeout}s")

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its gunicorn/uvicorn workers are in its session
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if getattr(self, "log", None):
            self.log.close()
