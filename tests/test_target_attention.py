"""target.attn_implementation: the flex_attention target (packed rows by a document-causal BlockMask, no dense
[B, 1, T, T] mask) gives the features, prefix KV, relabels and generations of the sdpa target, and of each sample
forwarded alone.

On CPU flex_attention is compiled by inductor (C++) once per process and shape family (~15-20 s the first time):
the two targets are module fixtures, and the batches keep few shapes.
"""

from __future__ import annotations

import pytest
import torch

import actors.hf_backend as hf_backend
from actors.hf_backend import HFTarget, TargetConfig, _load_model
from actors.models import TINY, resolve_model
from actors.protocol import GenerationParams
from eagle3.data import Batch
from jobs.config import ConfigError, load_config
from tests.test_relabel import branch_points, packed_batch, plain_last_hidden, request


@pytest.fixture(scope="module")
def flex():
    target = HFTarget(TargetConfig(model=TINY, attn_implementation="flex_attention"))
    assert target.attn_implementation == target.model.config._attn_implementation == "flex_attention"
    return target


@pytest.fixture(scope="module")
def sdpa():
    target = HFTarget(TargetConfig(model=TINY, attn_implementation="sdpa"))
    assert target.attn_implementation == "sdpa"
    return target


def alone(target: HFTarget, batch: Batch, b: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(columns, aux [n, 3h], last [n, h]) of sample d of row b forwarded alone, with transformers' own causal mask
    (no attention_mask given): independent of both packing masks."""
    cols = (batch.doc_ids[b] == d).nonzero().squeeze(1)
    ids = batch.input_ids[b, cols].to(target.device)
    out = target.model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    aux = torch.cat([out.hidden_states[i] for i in target.aux_layer_ids], -1)[0]
    return cols, aux, out.hidden_states[-1][0]


@pytest.fixture
def spy(monkeypatch):
    """Counts of the masks features() builds: document BlockMasks and dense additive ones."""
    calls = {"block": 0, "dense": 0}

    def block(*args, **kw):
        calls["block"] += 1
        return document_block_mask(*args, **kw)

    def dense(*args, **kw):
        calls["dense"] += 1
        return packed_causal_bias(*args, **kw)

    document_block_mask, packed_causal_bias = hf_backend.document_block_mask, hf_backend.packed_causal_bias
    monkeypatch.setattr(hf_backend, "document_block_mask", block)
    monkeypatch.setattr(hf_backend, "packed_causal_bias", dense)
    return calls


def test_choices_and_auto():
    assert TargetConfig().attn_implementation == "auto"
    with pytest.raises(ValueError, match="target.attn_implementation='flash'"):
        TargetConfig(attn_implementation="flash")
    with pytest.raises(ValueError, match="spread over GPUs runs sdpa"):
        TargetConfig(attn_implementation="flex_attention", gpus_per_actor=2)
    with pytest.raises(ConfigError, match="target.attn_implementation='eager': should be 'auto', 'sdpa' or "
                                          "'flex_attention'"):
        load_config("tiny", overrides=["target.attn_implementation=eager"])
    assert load_config("tiny", overrides=["target.attn_implementation=flex_attention"]).target.attn_implementation \
        == "flex_attention"
    # auto = sdpa off CUDA.
    assert HFTarget(TargetConfig(model=TINY, device="cpu")).attn_implementation == "sdpa"


def test_auto_falls_back_to_sdpa_without_flex_support(monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_supports_flex_attn", False)
    folder = resolve_model(TINY)

    def load(attn):
        return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn)

    assert _load_model(load, "flex_attention", fallback=True).config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="does not support an attention implementation through torch's flex"):
        _load_model(load, "flex_attention", fallback=False)  # asked for explicitly: no silent sdpa


def test_packed_features_equal_sdpa_and_each_sample_alone(flex, sdpa, spy):
    batch = packed_batch(flex.info().vocab_size)  # row 0: 11 + 9 tokens; row 1: 7 + 6 + 5 + 2 padding
    assert (batch.doc_ids[1] == -1).sum() == 2 and len(batch.sample_ids[0]) == 2
    aux_f, last_f = flex.features(batch.input_ids, batch.position_ids, batch.doc_ids)
    assert spy == {"block": 1, "dense": 0}  # no [B, 1, T, T] additive mask under flex
    aux_s, last_s = sdpa.features(batch.input_ids, batch.position_ids, batch.doc_ids)
    assert spy == {"block": 1, "dense": 1}
    # Padding columns too: under both masks a padding token sees the padding before it and itself.
    torch.testing.assert_close(aux_f, aux_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_f, last_s, rtol=1e-5, atol=1e-5)
    for b, ids in enumerate(batch.sample_ids):
        for d in range(len(ids)):
            cols, aux, last = alone(sdpa, batch, b, d)
            torch.testing.assert_close(aux_f[b, cols], aux, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(last_f[b, cols], last, rtol=1e-5, atol=1e-5)


def test_forward_fills_the_same_prefix_cache(flex, sdpa, spy):
    """forward() caches the prefix KV for relabel: an empty cache being filled still gets the BlockMask."""
    batch = packed_batch(flex.info().vocab_size, seed=4)
    a, b = flex.forward(batch), sdpa.forward(batch)
    assert spy == {"block": 1, "dense": 1} and a.key >= 0 and b.key >= 0
    torch.testing.assert_close(a.aux_hidden.float(), b.aux_hidden.float(), rtol=1e-2, atol=1e-2)  # bf16 copies
    torch.testing.assert_close(a.last_hidden.float(), b.last_hidden.float(), rtol=1e-2, atol=1e-2)
    ea, eb = flex.prefix_cache[a.key], sdpa.prefix_cache[b.key]
    for x, y in zip(ea.keys + ea.values + [ea.last_hidden], eb.keys + eb.values + [eb.last_hidden]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_relabel_under_flex(flex, sdpa):
    """Relabel runs its dense tree masks through sdpa (flex turns them into a score_mod that segfaults on CPU):
    hits (prefix KV from the flex forward), misses (prefix recomputed with a BlockMask) and greedy branches all
    equal the sdpa target's, and the model is back on flex_attention afterwards."""
    V = flex.info().vocab_size
    batch = packed_batch(V, seed=2)
    key_f, key_s = flex.forward(batch).key, sdpa.forward(batch).key
    rows, points = branch_points(batch)
    tokens = torch.randint(0, V, (len(rows), 3), generator=torch.Generator().manual_seed(3))
    ref = sdpa.branch_features(request(batch, key_s, rows, points, tokens))
    hit = flex.branch_features(request(batch, key_f, rows, points, tokens))
    miss = flex.branch_features(request(batch, -1, rows, points, tokens))
    assert ref[2] and hit[2] and not miss[2]
    for toks, hidden, _ in (hit, miss):
        assert torch.equal(toks, tokens)
        torch.testing.assert_close(hidden, ref[1], rtol=1e-5, atol=1e-5)
    n = 1
    torch.testing.assert_close(hit[1][n], plain_last_hidden(sdpa.model, batch, int(rows[n]), int(points[n]),
                                                            tokens[n]), rtol=1e-4, atol=1e-4)
    g_ref = sdpa.branch_features(request(batch, key_s, rows, points, length=3))
    g_flex = flex.branch_features(request(batch, key_f, rows, points, length=3))
    assert torch.equal(g_flex[0], g_ref[0])
    torch.testing.assert_close(g_flex[1], g_ref[1], rtol=1e-5, atol=1e-5)
    assert flex.model.config._attn_implementation == "flex_attention"


def test_generate_under_flex(flex, sdpa):
    prompts = [[1, 17, 40, 9], [1, 5, 6, 7, 8, 9, 10]]
    params = GenerationParams(max_new_tokens=5, temperature=0.0)
    assert flex.generate(prompts, params) == sdpa.generate(prompts, params)
    assert flex.model.config._attn_implementation == "flex_attention"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_equals_sdpa_on_cuda_bf16():
    """bf16 on CUDA, "auto" = flex_attention: packed rows over several 128-blocks (samples cross block borders, a
    padded row) vs the sdpa target and vs each sample alone in fp32; relabel hits/misses vs the exact forward."""
    flex = HFTarget(TargetConfig(model=TINY, device="cuda", dtype="bfloat16"))
    assert flex.attn_implementation == "flex_attention"
    sdpa = HFTarget(TargetConfig(model=TINY, device="cuda", dtype="bfloat16", attn_implementation="sdpa"))
    exact = HFTarget(TargetConfig(model=TINY, device="cuda", dtype="float32", attn_implementation="sdpa"))
    V = flex.info().vocab_size
    batch = packed_batch(V, seed=8, lengths=(200, 150, 110, 90, 60), max_length=320)
    assert (batch.doc_ids == -1).any()
    a, s = flex.forward(batch), sdpa.forward(batch)
    assert a.key >= 0
    real = batch.doc_ids >= 0
    # Two bf16 kernels differ by rounding only (a wrong mask is off by O(1)).
    assert rel_err(a.aux_hidden[real], s.aux_hidden[real]) < 0.03
    assert rel_err(a.last_hidden[real], s.last_hidden[real]) < 0.03
    for b, ids in enumerate(batch.sample_ids):
        for d in range(len(ids)):
            cols, aux, last = alone(exact, batch, b, d)
            for got, ref16, ref in ((a.aux_hidden, s.aux_hidden, aux), (a.last_hidden, s.last_hidden, last)):
                floor = rel_err(ref16[b, cols], ref.cpu())
                assert rel_err(got[b, cols], ref.cpu()) <= 1.5 * floor + 0.01, (b, d, floor)
    rows, points = branch_points(batch)
    tokens = torch.randint(0, V, (len(rows), 4), generator=torch.Generator().manual_seed(9))
    ref = exact.relabel(request(batch, exact.forward(batch).key, rows, points, tokens)).last_hidden  # fp32 → bf16
    ref16 = sdpa.relabel(request(batch, s.key, rows, points, tokens)).last_hidden
    for key in (a.key, -1):  # the prefix KV of the flex forward, and recomputed with a BlockMask
        res = flex.relabel(request(batch, key, rows, points, tokens))
        assert res.cache_hit == (key >= 0)
        for n in range(len(rows)):
            floor = rel_err(ref16[n], ref[n])
            assert rel_err(res.last_hidden[n], ref[n]) <= 1.5 * floor + 0.01, (key, n, floor)
    assert flex.model.config._attn_implementation == "flex_attention"
