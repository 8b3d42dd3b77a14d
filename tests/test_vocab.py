"""eagle3.vocab: top-N draft vocabulary vs a Counter reference, d2t/t2d layout, padding, cache."""
import inspect
from collections import Counter
from pathlib import Path

import pytest
import torch

from eagle3 import vocab
from eagle3.vocab import VocabMap, build_vocab_map, data_fingerprint, load_or_build_vocab_map


def random_batches(seed=0, vocab_size=500, n=12):
    """Skewed token ids in batches of varying shapes, with random loss masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        shape = (int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 200, (1,), generator=g)))
        ids = (torch.rand(shape, generator=g) ** 3 * vocab_size).long()  # many repeats → many ties at the cut
        out.append((ids, torch.rand(shape, generator=g) < 0.6))
    return out


def reference_ids(batches, vocab_size, n):
    """Naive reference: Counter over masked ids, top n by (count desc, id asc), unseen ids count 0."""
    counter = Counter()
    for ids, mask in batches:
        counter.update(t for t, m in zip(ids.flatten().tolist(), mask.flatten().tolist()) if m)
    ranked = sorted(range(vocab_size), key=lambda t: (-counter[t], t))
    return sorted(ranked[:n])


def check_layout(vm: VocabMap, vocab_size: int, n: int):
    assert vm.d2t.shape == (n,) and vm.d2t.dtype == torch.long
    assert vm.t2d.shape == (vocab_size,) and vm.t2d.dtype == torch.bool
    assert int(vm.t2d.sum()) == n
    ids = torch.arange(n) + vm.d2t
    assert torch.equal(ids, vm.draft_ids) and torch.equal(ids, torch.nonzero(vm.t2d).flatten())  # sorted ids


@pytest.mark.parametrize("seed, n", [(0, 1), (0, 37), (1, 100), (2, 250)])
def test_matches_counter_reference(seed, n):
    batches = random_batches(seed)
    vm = build_vocab_map(iter(batches), 500, n)  # a one-shot iterator: the build streams
    assert vm.draft_ids.tolist() == reference_ids(batches, 500, n)
    check_layout(vm, 500, n)
    masked = torch.cat([ids[m] for ids, m in batches])
    assert torch.equal(vm.counts, torch.bincount(masked, minlength=500))
    assert vm.coverage == pytest.approx(float(vm.t2d[masked].float().mean()))


def test_unmasked_tokens_are_ignored():
    ids = torch.tensor([[5, 5, 5, 7, 9]])
    mask = torch.tensor([[False, False, False, True, True]])
    assert build_vocab_map([(ids, mask)], 10, 2).draft_ids.tolist() == [7, 9]


def test_pads_with_unseen_ids_when_data_is_small():
    ids = torch.tensor([8, 8, 3, 9])
    vm = build_vocab_map([(ids, torch.ones(4, dtype=torch.bool))], 12, 6)
    assert vm.draft_ids.tolist() == [0, 1, 2, 3, 8, 9]  # the 3 seen + the lowest unseen ids
    check_layout(vm, 12, 6)
    assert build_vocab_map([], 12, 12).draft_ids.tolist() == list(range(12))  # no data at all


def test_bad_sizes_and_ids():
    with pytest.raises(ValueError, match=r"draft_vocab_size=600 .* vocab_size=500.*<= 500"):
        build_vocab_map([], 500, 600)
    with pytest.raises(ValueError, match="draft_vocab_size=0"):
        build_vocab_map([], 500, 0)
    with pytest.raises(ValueError, match="token id 500 is outside"):
        build_vocab_map([(torch.tensor([1, 500]), torch.tensor([True, True]))], 500, 10)


def test_inconsistent_map_rejected():
    t2d = torch.zeros(10, dtype=torch.bool)
    t2d[[1, 4]] = True
    VocabMap(d2t=torch.tensor([1, 3]), t2d=t2d)
    with pytest.raises(ValueError, match="inconsistent VocabMap"):
        VocabMap(d2t=torch.tensor([1, 2]), t2d=t2d)


def test_cache_hit_and_misses(tmp_path):
    calls = []

    def batches_fn():
        calls.append(1)
        return random_batches(3)

    def get(fingerprint="fp", n=50):
        return load_or_build_vocab_map(tmp_path / "cache", fingerprint, "tok", 500, n, batches_fn)

    first = get()
    assert len(calls) == 1
    again = get()
    assert len(calls) == 1  # hit: nothing rebuilt
    for name in ("d2t", "t2d", "counts"):
        a, b = getattr(first, name), getattr(again, name)
        assert torch.equal(a, b) and a.dtype == b.dtype
    get(n=51)
    get(fingerprint="other")
    load_or_build_vocab_map(tmp_path / "cache", "fp", "other-tokenizer", 500, 50, batches_fn)
    assert len(calls) == 4  # N, fingerprint and tokenizer are all part of the key
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 4 and all(f.endswith(".safetensors") for f in files)  # no temp files left


def test_corrupt_cache_is_rebuilt(tmp_path):
    vm = load_or_build_vocab_map(tmp_path, "fp", "tok", 500, 20, lambda: random_batches(4))
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"garbage")
    again = load_or_build_vocab_map(tmp_path, "fp", "tok", 500, 20, lambda: random_batches(4))
    assert torch.equal(vm.d2t, again.d2t)
    assert torch.equal(load_or_build_vocab_map(tmp_path, "fp", "tok", 500, 20, lambda: 1 / 0).d2t, vm.d2t)


def test_no_pickle_loading():
    source = inspect.getsource(vocab)
    assert "torch.load" not in source and "pickle" not in source


def test_data_fingerprint(tmp_path):
    path = Path(tmp_path / "d.jsonl")
    path.write_text("abc\n")
    fp = data_fingerprint(path)
    assert fp == data_fingerprint(path) and len(fp) == 64
    path.write_text("abd\n")  # same size, different content
    assert data_fingerprint(path) != fp
