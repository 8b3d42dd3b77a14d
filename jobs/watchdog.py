"""A guard process for one training driver: if the driver dies without closing its run (kill -9, the OOM killer,
a lost terminal), it marks the MLflow run KILLED and stops the local Ray processes that driver started.

In-process handlers cover exceptions, Ctrl-C and SIGTERM (jobs/train.py); nothing in-process survives SIGKILL, so
this small process watches the driver through a pipe. The driver writes `pid <n>` lines (Ray head processes it
started), `run <id>` (the MLflow run, once open) and `done` when it closed the run itself; EOF without `done`
means the driver died.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

POLL_S = 2.0  # how often the watchdog refreshes the set of Ray processes (their children come and go)


class Watchdog:
    """Driver side: starts the guard process and talks to it."""

    def __init__(self, uri: str, run_id: str | None = None) -> None:
        # Own session: a Ctrl-C in the terminal reaches the driver (which closes the run itself), not the guard.
        self.proc = subprocess.Popen([sys.executable, "-m", "jobs.watchdog", uri, str(os.getpid())],
                                     stdin=subprocess.PIPE, text=True, start_new_session=True)
        if run_id is not None:
            self.set_run(run_id)

    def set_run(self, run_id: str) -> None:
        """The MLflow run to mark KILLED if the driver dies (none until this is called: then only Ray is stopped)."""
        self._send(f"run {run_id}\n")

    def watch_pids(self, pids: list[int]) -> None:
        """Processes to stop if the driver dies (with everything they spawned)."""
        self._send("".join(f"pid {p}\n" for p in pids))

    def done(self) -> None:
        """The driver closed the run itself: the guard exits without touching anything."""
        self._send("done\n")
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()

    def _send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text)
            self.proc.stdin.flush()
        except OSError:  # the guard is gone; the run state is still closed in-process
            pass


def local_ray_pids() -> list[int]:
    """Pids of the Ray head processes this process started with ray.init(address='local'); [] when it joined an
    existing cluster (those processes are not ours to stop)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # set only when this process started Ray
    if node is None:
        return []
    return [p.process.pid for procs in node.all_processes.values() for p in procs if p.process is not None]


def terminate(procs: list, grace_s: float) -> None:
    """SIGTERM each psutil.Process, then SIGKILL those still alive after `grace_s` (gone ones are skipped)."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _guard(uri: str, driver_pid: int) -> None:
    import signal

    import psutil

    # `ray job stop` sends SIGTERM to the driver and all its descendants: the guard outlives that and exits on the
    # driver's `done` or its death, whichever comes.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    watched: dict[int, float] = {}  # pid -> create_time (a reused pid is not ours)

    def refresh(pids) -> None:
        for pid in list(pids):
            try:
                p = psutil.Process(pid)
                for q in [p, *p.children(recursive=True)]:
                    watched.setdefault(q.pid, q.create_time())
            except psutil.Error:
                pass

    buf = ""
    roots: list[int] = []
    run_id = None
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 4096).decode()
            if not chunk:
                break  # EOF: the driver is gone
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                if line == "done":
                    return
                if line.startswith("pid "):
                    roots.append(int(line[4:]))
                if line.startswith("run "):
                    run_id = line[4:]
        refresh(roots)
    # The driver died without closing its run.
    procs = []
    for pid, created in watched.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and pid != driver_pid:
                procs.append(p)
        except psutil.Error:
            pass
    terminate(procs, grace_s=5)
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for attempt in range(3):
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "error", f"the driver (pid {driver_pid}) died without closing the run "
                                                "(SIGKILL or out of memory); re-run the same command to resume")
                client.set_terminated(run_id, "KILLED")
            return
        except Exception:  # noqa: BLE001 - a busy sqlite file: retry, then give up quietly
            time.sleep(1 + attempt)


if __name__ == "__main__":
    _guard(sys.argv[1], int(sys.argv[2]))
