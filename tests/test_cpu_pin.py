"""Core pinning (actors.cpu_pin): claims are exclusive across processes, released on exit, and cover every thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from actors import cpu_pin

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux affinity and at least 2 allowed cores")

# A process Ray starts (raylet's child), not this test's: it does not inherit this process's pinned affinity.
CHILD = """
import os, sys
from pathlib import Path
from actors import cpu_pin
os.sched_setaffinity(0, range(os.cpu_count()))
cpu_pin.LOCK_DIR = Path(sys.argv[1])
print(cpu_pin.pin_cores(int(sys.argv[2]), "child", from_top=sys.argv[3] == "top"))
"""


def child(lock_dir, n, side="bottom") -> str:
    out = subprocess.run([sys.executable, "-c", CHILD, str(lock_dir), str(n), side], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    return out.stdout.strip()


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_pin, "LOCK_DIR", tmp_path)
    yield tmp_path
    cpu_pin.release()


def test_claims_are_exclusive_and_released(lock_dir):
    allowed = sorted(os.sched_getaffinity(0))
    mine = cpu_pin.pin_cores(1, "test")
    assert mine == [allowed[0]] and sorted(os.sched_getaffinity(0)) == mine
    # Another process, claiming from the bottom too, skips the core this one holds.
    assert child(lock_dir, 1) == str([allowed[1]])
    # Nothing is left for a process that wants every core: it runs unpinned.
    assert child(lock_dir, len(allowed)) == "None"
    cpu_pin.release()
    assert sorted(os.sched_getaffinity(0)) == allowed
    assert child(lock_dir, len(allowed)) == str(allowed)  # the child's claims ended with it


def test_target_and_trainer_sides_do_not_meet(lock_dir):
    allowed = sorted(os.sched_getaffinity(0))
    assert cpu_pin.pin_cores(1, "trainer", from_top=True) == [allowed[-1]]
    assert child(lock_dir, 1, "bottom") == str([allowed[0]])


def test_every_thread_follows(lock_dir):
    """Threads that exist before the pin (Ray's, torch's) are moved too, not only the calling one."""
    go, seen = threading.Event(), []

    def report():
        go.wait()
        seen.append(sorted(os.sched_getaffinity(0)))

    t = threading.Thread(target=report)
    t.start()
    cores = cpu_pin.pin_cores(1, "test")
    go.set()
    t.join()
    assert seen == [cores]


def test_pin_needs_a_thread_count():
    from actors.hf_backend import TargetConfig
    from jobs.config import TrainerConfig

    with pytest.raises(ValueError, match="target.pin_cpus needs target.num_threads"):
        TargetConfig(pin_cpus=True)
    with pytest.raises(ValueError, match="trainer.pin_cpus needs trainer.num_threads"):
        TrainerConfig(pin_cpus=True)
