"""HF target backend: hook-captured features vs `output_hidden_states`, packing isolation, load errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from actors.hf_backend import HFTarget, TargetConfig
from actors.models import TINY, resolve_model
from eagle3.data import Sample, collate, pack
from tests.targets import tiny_target


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    """A random Qwen3 (head_dim != h/heads) saved as a local HF folder with a tokenizer."""
    folder = tmp_path_factory.mktemp("qwen3")
    tiny_target("qwen3").save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model(TINY)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("which", ["tiny", "qwen3"])
def test_features_equal_output_hidden_states(which, qwen3_folder):
    target = HFTarget(TargetConfig(model=TINY if which == "tiny" else qwen3_folder))
    V = target.info().vocab_size
    g = torch.Generator().manual_seed(0)
    samples = [Sample(sample_id=str(i), input_ids=torch.randint(0, min(V, 300), (n,), generator=g),
                      loss_mask=torch.ones(n, dtype=torch.bool)) for i, n in enumerate([17, 9, 12])]
    batch = collate(samples, pad_token_id=0)
    out = target.forward(batch)
    assert out.aux_hidden.dtype == torch.bfloat16 and out.last_hidden.dtype == torch.bfloat16
    h = target.info().hidden_size
    assert out.aux_hidden.shape == (3, 17, 3 * h) and out.last_hidden.shape == (3, 17, h)
    for b, s in enumerate(samples):
        n = len(s)
        ref = target.model(input_ids=s.input_ids[None], output_hidden_states=True)
        ref_aux = torch.cat([ref.hidden_states[i] for i in target.aux_layer_ids], -1)[0]
        torch.testing.assert_close(out.aux_hidden[b, :n].float(), ref_aux.bfloat16().float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(out.last_hidden[b, :n].float(), ref.hidden_states[-1][0].bfloat16().float(),
                                   rtol=1e-2, atol=1e-2)
        # last_hidden is AFTER the final norm: lm_head(last_hidden) reproduces the logits.
        aux32, last32 = target.features(s.input_ids[None], torch.arange(n)[None], torch.zeros(1, n, dtype=torch.long))
        torch.testing.assert_close(last32[0] @ target.model.lm_head.weight.T, ref.logits[0], rtol=1e-4, atol=1e-4)


def test_packed_rows_are_isolated():
    target = HFTarget(TargetConfig(model=TINY))
    g = torch.Generator().manual_seed(1)
    samples = [Sample(sample_id=str(i), input_ids=torch.randint(0, 300, (n,), generator=g),
                      loss_mask=torch.ones(n, dtype=torch.bool)) for i, n in enumerate([7, 5, 9, 4])]
    packed = pack(samples, max_length=16, rows_per_batch=2)[0]
    aux, last = target.features(packed.input_ids, packed.position_ids, packed.doc_ids)
    by_id = {s.sample_id: s for s in samples}
    for b, ids in enumerate(packed.sample_ids):
        for d, sid in enumerate(ids):
            s = by_id[sid]
            cols = (packed.doc_ids[b] == d).nonzero().squeeze(-1)
            ref_aux, ref_last = target.features(s.input_ids[None], torch.arange(len(s))[None],
                                                torch.zeros(1, len(s), dtype=torch.long))
            torch.testing.assert_close(aux[b, cols], ref_aux[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(last[b, cols], ref_last[0], rtol=1e-5, atol=1e-5)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: give a local HF folder"):
        HFTarget(TargetConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="unknown built-in target"):
        HFTarget(TargetConfig(model="builtin:nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HFTarget(TargetConfig(model=str(tmp_path)))
    with pytest.raises(ValueError, match=r"aux layer ids \[6\] are out of range .* 6 layers"):
        HFTarget(TargetConfig(model=TINY, aux_layer_ids=(1, 2, 6)))
    with pytest.raises(ValueError, match="target.dtype"):
        TargetConfig(dtype="fp8")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs: the spread test runs instead")
def test_spread_target_needs_its_gpus():
    """gpus_per_actor=2 loads one target over 2 GPUs; an actor that sees fewer says so instead of loading on one."""
    with pytest.raises(ValueError, match=r"target.gpus_per_actor=2 but this actor sees [01] GPU\(s\)"):
        HFTarget(TargetConfig(model=TINY, device="cuda", gpus_per_actor=2.0))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one target spread over both)")
def test_spread_target_equals_one_gpu():
    """device_map over 2 GPUs: the same features and relabels as the same target on one GPU (fp32)."""
    from actors.protocol import RelabelRequest

    one = HFTarget(TargetConfig(model=TINY, device="cuda", gpus_per_actor=1.0))
    two = HFTarget(TargetConfig(model=TINY, device="cuda", gpus_per_actor=2.0))
    assert {str(p.device) for p in two.model.parameters()} == {"cuda:0", "cuda:1"}
    g = torch.Generator().manual_seed(2)
    samples = [Sample(sample_id=str(i), input_ids=torch.randint(0, 300, (n,), generator=g),
                      loss_mask=torch.ones(n, dtype=torch.bool)) for i, n in enumerate([9, 6, 12])]
    batch = pack(samples, max_length=16, rows_per_batch=2)[0]
    a, b = one.forward(batch), two.forward(batch)
    assert a.aux_hidden.device.type == b.aux_hidden.device.type == "cpu"
    torch.testing.assert_close(b.aux_hidden.float(), a.aux_hidden.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(b.last_hidden.float(), a.last_hidden.float(), rtol=1e-2, atol=1e-2)
    for tokens, length in ((torch.randint(0, 300, (2, 3), generator=g), 0), (None, 3)):  # given and greedy
        req = dict(batch=batch, rows=torch.tensor([0, 1]), points=torch.tensor([4, 3]), tokens=tokens, length=length)
        ra = one.relabel(RelabelRequest(key=a.key, **req))
        rb = two.relabel(RelabelRequest(key=b.key, **req))
        assert torch.equal(ra.tokens, rb.tokens)
        torch.testing.assert_close(rb.last_hidden.float(), ra.last_hidden.float(), rtol=1e-2, atol=1e-2)
