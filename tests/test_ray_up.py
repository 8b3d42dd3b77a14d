"""`ray up` for real on this machine: Ray's cluster launcher with the `local` provider (cluster/local.yaml) starts
a head and a worker over SSH, the tiny preset runs on them through `ray job submit`, and `ray down` ends them: the
launcher path that cluster/aws.yaml and cluster/gcp.yaml take, minus the cloud.

This one machine plays three: the client that runs `ray up` and two nodes. The test starts Debian's sshd on two
random loopback addresses (port 22: Ray's SSH runner has no port option), and its ForceCommand gives each address
its own home folder (its own ~/.bashrc, ~/.ray/auth_token, ~/ray_bootstrap_config.yaml, TMPDIR), as separate
machines would have. The client runs with its own HOME and TMPDIR too, so nothing of root's is read or written.

Two shims, on each node's PATH, make up for one machine posing as several:
- `ray stop`: `ray down` runs it on the head, and it kills every Ray process on the machine, other people's too.
  The node's ~/.bashrc turns it into "stop this cluster's processes" (those whose environment carries this test's
  marker, which the ForceCommand sets): the stand-in for the provider switching the machines off.
- `ssh`: the head's autoscaler reaches the worker with `ssh -i ~/ray_bootstrap_key.pem`, and ssh expands that `~`
  from the passwd entry (/root), not from $HOME; the shim expands it from $HOME.

Needs root, /usr/sbin/sshd and rsync (`make test` installs them: the Makefile's system-deps target).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil

from jobs.watchdog import terminate

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "cluster" / "local.yaml"
VENV = Path(sys.executable).parent.parent  # the virtualenv running pytest: it has aerie, Ray and mlflow
MARKER_VAR = "AERIE_RAY_UP_CLUSTER"


def marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries `marker` (setproctitle renames Ray workers, so the command line
    cannot be trusted; the environment is inherited unchanged)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER_VAR) == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def stop_marked(marker: str, spare: set[int] = frozenset()) -> list[psutil.Process]:
    """SIGTERM the processes carrying `marker` (except `spare`), SIGKILL what is left after 15 s; returns them."""
    procs = [p for p in marked(marker) if p.pid not in spare]
    terminate(procs, grace_s=15)
    return procs


def loopback_pair() -> tuple[str, str]:
    """Two loopback addresses whose port 22 is free: random, so that two runs of this test do not meet."""
    for _ in range(50):
        a, b = random.randrange(1, 255), random.randrange(1, 255)
        pair = (f"127.{a}.{b}.1", f"127.{a}.{b}.2")
        try:
            for ip in pair:
                with socket.socket() as s:
                    s.bind((ip, 22))
        except OSError:
            continue
        return pair
    raise AssertionError("port 22 is taken on every loopback address tried (is an sshd bound to 0.0.0.0:22?)")


def run(cmd: list[str], env: dict, timeout: float, what: str) -> str:
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{what} failed (exit {out.returncode}):\n{log[-6000:]}"
    return log


def wait_for(check, timeout: float, what: str, diagnose=lambda: ""):
    """Poll `check()` until it returns something truthy; fail with `what` and `diagnose()` after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := check():
            return value
        time.sleep(2)
    raise AssertionError(f"{what} within {timeout:.0f} s\n{diagnose()}")


def tail(path: Path, n: int = 3000) -> str:
    return f"--- {path}:\n{path.read_text(errors='replace')[-n:]}" if path.is_file() else f"(no {path})"


def start_sshd(ssh_dir: Path, nodes: dict[str, Path], marker: str) -> subprocess.Popen:
    """sshd on port 22 of each node address; a login to address X runs as node X (home, TMPDIR, marker)."""
    for name in ("host_key", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / name)], check=True)
    shutil.copy(ssh_dir / "id_ed25519.pub", ssh_dir / "authorized_keys")
    cases = "\n".join(f"  {ip}) home={home} ;;" for ip, home in nodes.items())
    shell = ssh_dir / "node-shell"
    shell.write_text(f"""#!/bin/sh
# ForceCommand: the server address of this connection (3rd field of SSH_CONNECTION) says which node it is.
set -- $SSH_CONNECTION
case "$3" in
{cases}
  *) echo "node-shell: no node at $3" >&2; exit 1 ;;
esac
export HOME="$home" TMPDIR="$home/tmp" {MARKER_VAR}={marker}
cd "$HOME" || exit 1
if [ -n "$SSH_ORIGINAL_COMMAND" ]; then exec /bin/bash -c "$SSH_ORIGINAL_COMMAND"; else exec /bin/bash -l; fi
""")
    shell.chmod(0o755)
    config = ssh_dir / "sshd_config"
    config.write_text("\n".join([
        *(f"ListenAddress {ip}:22" for ip in nodes),
        f"HostKey {ssh_dir / 'host_key'}",
        f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}",
        f"ForceCommand {shell}",
        "PidFile none",
        "StrictModes no",  # the key files live under /tmp, which is world-writable
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "",
    ]))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir, normally made by the service
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def listening():
        if sshd.poll() is not None:
            raise AssertionError(f"sshd exited with {sshd.returncode}:\n{sshd.stdout.read()}")
        try:
            for ip in nodes:
                socket.create_connection((ip, 22), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, 20, "sshd did not listen on port 22 of " + ", ".join(nodes))
    return sshd


def make_node_home(home: Path, marker: str) -> None:
    """What a machine image would hold: a home with a TMPDIR, and two shims on PATH (see the module docstring)."""
    (home / "tmp").mkdir(parents=True)
    (home / "bin").mkdir()
    ssh = home / "bin" / "ssh"
    ssh.write_text("""#!/bin/sh
# ssh expands the ~ of `-i ~/key` from the passwd entry (/root), but this node's home is $HOME.
prev=
for a do
  shift
  case "$prev:$a" in "-i:~/"*) a="$HOME/${a#"~/"}" ;; esac
  prev=$a
  set -- "$@" "$a"
done
exec /usr/bin/ssh "$@"
""")
    ssh.chmod(0o755)
    (home / ".bashrc").write_text(
        'export PATH="$HOME/bin:$PATH"\n'
        "# `ray down` runs `ray stop`, which kills every Ray on the machine: stop only this cluster.\n"
        f'ray() {{ if [ "$1" = stop ]; then "{sys.executable}" "{Path(__file__)}" --stop {marker}; '
        'else command ray "$@"; fi; }\n')


def concrete_config(values: dict[str, str]) -> str:
    """cluster/local.yaml with each @NAME@ filled in; every placeholder must be known and every value used."""
    text = TEMPLATE.read_text()
    names = set(re.findall(r"@([A-Z_]+)@", text))
    assert names == set(values), f"local.yaml placeholders {sorted(names)} vs values {sorted(values)}"
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text


def test_ray_up_local_cluster(tmp_path, monkeypatch):
    from tests.local_cluster import free_ports  # here, not at the top: nodes run this file as a script

    assert os.geteuid() == 0, "ray up over SSH to this machine needs root (it starts sshd and logs in as root)"
    missing = [p for p in ("/usr/sbin/sshd", shutil.which("rsync") or "rsync") if not Path(p).is_file()]
    assert not missing, f"missing {missing}: apt-get install -y openssh-server rsync (make test does it)"

    head_ip, worker_ip = loopback_pair()
    marker = f"aerie-ray-up-{uuid.uuid4().hex[:8]}"
    # Ray's unix sockets live under each node's --temp-dir ($HOME/ray) and are length-limited: a short root.
    root = Path(tempfile.mkdtemp(prefix="ar-", dir="/tmp"))
    homes = {"head": root / "head", "worker": root / "worker"}
    for home in homes.values():
        make_node_home(home, marker)
    ssh_dir, client, shared = tmp_path / "ssh", tmp_path / "client", tmp_path / "shared"
    for d in (ssh_dir, client / "tmp", shared):
        d.mkdir(parents=True)
    gcs, dash, ray_client, head_agent, worker_agent, mlflow_port = free_ports(6)
    config = tmp_path / "local.yaml"
    config.write_text(concrete_config({
        "CLUSTER_NAME": marker, "HEAD_IP": head_ip, "WORKER_IP": worker_ip, "SSH_USER": getpass.getuser(),
        "SSH_KEY": str(ssh_dir / "id_ed25519"), "VENV": str(VENV), "SHARED": str(shared),
        "GCS_PORT": str(gcs), "DASHBOARD_PORT": str(dash), "CLIENT_PORT": str(ray_client),
        "HEAD_AGENT_PORT": str(head_agent), "WORKER_AGENT_PORT": str(worker_agent), "MLFLOW_PORT": str(mlflow_port),
    }))
    # The client: its own HOME (~/.ray/auth_token) and TMPDIR (the local provider's cluster state file).
    env = {**os.environ, "HOME": str(client), "TMPDIR": str(client / "tmp"), "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}",
           MARKER_VAR: f"{marker}-client"}
    env.pop("RAY_ADDRESS", None)
    dashboard, tracking = f"http://{head_ip}:{dash}", f"http://{head_ip}:{mlflow_port}"
    head_logs = homes["head"] / "ray" / "session_latest" / "logs"

    def logs():
        return "\n".join(tail(p) for p in (head_logs / "monitor.log", head_logs / "monitor.out",
                                             homes["head"] / "mlflow.log"))

    def worker_node():
        out = subprocess.run(["ray", "list", "nodes", "--address", dashboard, "--format", "json"], env=env,
                             capture_output=True, text=True, timeout=60)
        nodes = json.loads(out.stdout) if out.returncode == 0 else []
        return next((n for n in nodes if n["node_ip"] == worker_ip and n["state"] == "ALIVE"), None)

    def mlflow_up():
        try:
            return urllib.request.urlopen(f"{tracking}/health", timeout=2).status == 200
        except OSError:
            return False

    sshd, t0 = None, time.time()
    try:
        sshd = start_sshd(ssh_dir, {head_ip: homes["head"], worker_ip: homes["worker"]}, marker)
        run(["ray", "get-auth-token", "--generate"], env, 60, "ray get-auth-token --generate")
        run(["ray", "up", "-y", str(config)], env, 300, "ray up")
        t_up = time.time() - t0
        # The head's autoscaler launches the worker over SSH (as on a cloud), after `ray up` returns.
        worker = wait_for(worker_node, 150, f"the autoscaler did not bring up the worker {worker_ip}", logs)
        assert worker["resources_total"].get("target") == 1 and worker["resources_total"].get("trainer") == 1
        wait_for(mlflow_up, 60, "the head's MLflow server did not answer /health", logs)
        t_ready = time.time() - t0

        # The target and the trainer ask for the worker's custom resources, so the job can only run there.
        out = run(["ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
                   "python", "-m", "jobs.train", "--preset", "tiny", "--set", f"output_dir={shared / 'runs'}",
                   "--set", "name=ray-up", "--set", f"trainer.storage={shared / 'checkpoints'}",
                   "--set", "target.resources={target: 1}", "--set", "trainer.resources={trainer: 1}"],
                  env, 420, "ray job submit")
        (tmp_path / "job.log").write_text(out)
        assert "succeeded" in out.lower(), out[-4000:]
        t_job = time.time() - t0
        actors = json.loads(run(["ray", "list", "actors", "--address", dashboard, "--format", "json", "--detail"],
                                env, 60, "ray list actors"))
        placed = {(a["class_name"], a["node_id"]) for a in actors if a["class_name"] in ("HFTarget", "RayTrainWorker")}
        assert placed == {("HFTarget", worker["node_id"]), ("RayTrainWorker", worker["node_id"])}, placed

        # Rank 0, on the worker, logged to the head's MLflow with the cluster token as its password.
        try:
            urllib.request.urlopen(f"{tracking}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
            raise AssertionError("MLflow answered a request without credentials")
        except urllib.error.HTTPError as err:
            assert err.code == 401, err
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", (client / ".ray" / "auth_token").read_text().strip())
        from mlflow.tracking import MlflowClient

        mlflow = MlflowClient(tracking)
        runs = mlflow.search_runs([mlflow.get_experiment_by_name("aerie").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"], runs
        assert "loss_0" in runs[0].data.metrics and runs[0].data.metrics["samples_trained"] == 48
        assert mlflow.list_artifacts(runs[0].info.run_id), "the run has no artifacts"
    finally:
        down, left = teardown(config, env, sshd, marker)
        shutil.rmtree(root, ignore_errors=True)
    assert down.returncode == 0, f"ray down failed:\n{(down.stdout + down.stderr)[-4000:]}"
    assert f"of cluster {marker}" in down.stdout, "ray down did not go through the nodes' scoped `ray stop`"
    assert not left, f"cluster processes still running after ray down (now killed): {left}"
    assert (shared / "runs" / "ray-up" / "export" / "model.safetensors").is_file()
    assert any((shared / "checkpoints" / "ray-up").iterdir()), "no Ray Train checkpoint under trainer.storage"
    print(f"ray up {t_up:.0f} s, worker and MLflow ready at {t_ready:.0f} s, job done at {t_job:.0f} s, "
          f"ray down done at {time.time() - t0:.0f} s")


def teardown(config: Path, env: dict, sshd: subprocess.Popen | None, marker: str):
    """`ray down`, then whatever of ours is left: the cluster's processes (returned: `ray down` should have ended
    them), sshd with its sessions, the client's SSH control masters (they linger 10 s by design)."""
    down = None
    if sshd is not None:
        try:
            down = subprocess.run(["ray", "down", "-y", str(config)], env=env, cwd=REPO, capture_output=True,
                                  text=True, timeout=180)
        except subprocess.TimeoutExpired as err:
            down = subprocess.CompletedProcess(err.cmd, 124, err.stdout or "", f"timed out after {err.timeout} s")
        deadline = time.time() + 10  # processes that `ray down` signalled may still be exiting
        while marked(marker) and time.time() < deadline:
            time.sleep(1)
    left = stop_marked(marker)
    if sshd is not None:
        procs = [psutil.Process(sshd.pid), *psutil.Process(sshd.pid).children(recursive=True)]
        for p in procs:
            p.terminate()
        psutil.wait_procs(procs, timeout=15)
    stop_marked(env[MARKER_VAR])
    # Ray's SSH ControlPath folder for this cluster (/tmp/ray_ssh_<user hash>/<cluster hash>).
    control = Path("/tmp") / ("ray_ssh_" + hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10])
    shutil.rmtree(control / hashlib.sha256(marker.encode()).hexdigest()[:10], ignore_errors=True)
    try:
        control.rmdir()  # only if no other cluster uses it
    except OSError:
        pass
    return down, left


if __name__ == "__main__":  # a node's `ray stop` (see the module docstring): python tests/test_ray_up.py --stop M
    assert sys.argv[1] == "--stop", sys.argv
    me = psutil.Process()
    stopped = stop_marked(sys.argv[2], spare={me.pid, *(p.pid for p in me.parents())})
    print(f"stopped {len(stopped)} processes of cluster {sys.argv[2]}")
