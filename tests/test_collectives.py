"""Every tensor the train loop hands to a collective lives on the training device.

Ray Train gives GPU workers an NCCL process group, and NCCL takes no CPU tensors. This machine has no GPU, so the
audit runs the loop's collective code on torch's `meta` device: a device that is not the CPU, on which any tensor
built on the CPU by mistake shows up (a CPU tensor reaching the collective, or a device mismatch error). The
2-worker gloo runs in test_train_job exercise the same code for real on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eagle3.data import Sample, collate
from jobs.train_loop import Learner, StepResult, step_stats

REPO = Path(__file__).resolve().parents[1]
META = torch.device("meta")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv")


@pytest.fixture
def fake_group(monkeypatch):
    """A 2-rank 'process group' that records the device of every tensor given to all_reduce."""
    seen = []
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
    return seen


def meta_batch():
    g = torch.Generator().manual_seed(0)
    samples = [Sample(sample_id=f"s{i}", input_ids=torch.randint(0, 300, (9 + i,), generator=g),
                      loss_mask=torch.arange(9 + i) > 3) for i in range(2)]
    return collate(samples, pad_token_id=0).to(META)


def test_label_counts_are_reduced_on_the_training_device(fake_group):
    learner = SimpleNamespace(cfg=SimpleNamespace(ttt=SimpleNamespace(length=3)), device=META)
    out = Learner.global_denominators(learner, meta_batch(), 1.0)
    assert fake_group == [META] and out.device == META and out.shape == (3,)


def test_step_metrics_are_reduced_on_the_training_device(fake_group):
    r = StepResult(loss=1.0, loss_k=[1.0, 2.0], correct_k=[3, 4], count_k=[5, 6], grad_norm=0.5, lr=1e-3)
    batch = collate([Sample(sample_id="a", input_ids=torch.arange(6), loss_mask=torch.ones(6, dtype=torch.bool))], 0)
    tb = SimpleNamespace(batch=batch, wire_bytes=100, generated_tokens=0, generate_seconds=0.0)
    vec = step_stats(r, tb, None, 1.0, META)
    torch.distributed.all_reduce(vec)
    assert fake_group == [META] and vec.dtype == torch.float64 and vec.shape == (3 * 2 + 8,)
    # The same numbers on the CPU: the vector's layout, checked against the values it was built from.
    cpu = step_stats(r, tb, None, 0.5, torch.device("cpu"))
    assert cpu.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 0.5, 3.0, 50.0, 0.5, 0.0, 0.0, 0.0, 0.5 * 0xE8B7BE43]


def test_no_unaudited_collective_in_the_package():
    """The collectives above are the only ones Aerie calls itself (DDP's own are on the parameters' device). A new
    call site fails here until it is audited and added to this test."""
    calls = []
    pattern = re.compile(r"(?:dist|torch\.distributed)\.(" + "|".join(COLLECTIVES) + r")\(")
    for folder in ("eagle3", "actors", "jobs"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if pattern.search(line.split("#")[0]):
                    calls.append((f.relative_to(REPO).as_posix(), line.strip()))
    assert sorted(calls) == [("jobs/train_loop.py", "dist.all_reduce(counts)"),
                             ("jobs/train_loop.py", "torch.distributed.all_reduce(vec)")], calls
