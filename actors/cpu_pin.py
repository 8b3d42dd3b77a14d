"""Pin a CPU-only target actor or trainer worker to cores of its own, coordinated between processes of one machine.

Ray reserves CPUs by count, not by core, so on a small machine the target actor, the trainer and Ray's own
processes float over the same cores and the OS migrates them; pinning each compute process to its own cores keeps
their caches warm (BENCHMARKS.md, "Pipeline"). Cores are claimed with an exclusive `flock` on one file per core
under LOCK_DIR: the kernel drops the lock when the process exits or dies, so a crashed run leaves no stale claim,
and separate jobs on one machine coordinate too. Targets claim from the lowest core up, trainers from the highest
core down, so in the demo (1 + 1 threads on 2 cores) each gets a core of its own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_DIR = Path(tempfile.gettempdir()) / "aerie-cpu-pins"
_held: list[int] = []  # open lock fds of this process: closing one releases its core
_before: set[int] | None = None  # the affinity before pinning, restored by release()


def _set_affinity(cores) -> None:
    """Every thread of this process (Ray's and torch's included) to `cores`; threads made later inherit it."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass
    os.sched_setaffinity(0, cores)


def pin_cores(n: int, role: str, from_top: bool = False) -> list[int] | None:
    """Claim `n` free cores of this process's allowed set and restrict the process to them.

    Returns the cores, or None (and leaves the affinity alone, with a log line) when fewer than n are free or the
    platform has no sched_setaffinity. Idempotent per process: a second call returns the cores already held."""
    if not hasattr(os, "sched_setaffinity"):
        log.warning("%s: this platform cannot pin threads to cores; running unpinned", role)
        return None
    if _held:
        return sorted(os.sched_getaffinity(0))
    allowed = sorted(os.sched_getaffinity(0), reverse=from_top)
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    got: list[tuple[int, int]] = []
    for core in allowed:
        if len(got) == n:
            break
        fd = os.open(LOCK_DIR / f"core-{core}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        got.append((core, fd))
    if len(got) < n:
        for _, fd in got:
            os.close(fd)
        log.warning("%s: %d free core(s) of %d allowed, %d wanted; running unpinned", role, len(got), len(allowed), n)
        return None
    global _before
    cores = sorted(c for c, _ in got)
    _before = set(os.sched_getaffinity(0))
    _set_affinity(cores)
    _held.extend(fd for _, fd in got)
    log.info("%s pinned to core(s) %s", role, cores)
    return cores


def release() -> None:
    """Give this process's cores back (tests; a process that exits releases them anyway)."""
    global _before
    while _held:
        os.close(_held.pop())
    if _before is not None:
        _set_affinity(_before)
        _before = None
