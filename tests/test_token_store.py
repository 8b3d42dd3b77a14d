"""The token store (Ray Data tokenization → Arrow shards → lazy batches) against the in-memory reference path
(eagle3.data.load_samples + pack/collate, unchanged), plus its atomicity and cache-key rules."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch

from eagle3.data import DataConfig, DataError, collate, load_samples, pack
from eagle3.token_store import MANIFEST, ShardView, StoreBatches, build_index, open_store, pack_rows, temp_folder
from eagle3.vocab import build_vocab_map
from tests.test_data import BAD, chatml_tokenizer, sharegpt, write_jsonl

pytestmark = pytest.mark.slow


def same_batches(ref, got, ids=True):
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), f.name
            elif ids:
                assert x == y, f.name


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    chatml_tokenizer().save_pretrained(d)
    return str(d)


def records(n, seed=0, bad_every=0):
    """n ShareGPT records of varied length (every bad_every-th one malformed in a rotating way)."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    out = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            bad = list(BAD.values())[i // bad_every % (len(BAD) - 1)]  # all but the not-JSON line
            out.append({**bad, "id": f"r{i}"} if isinstance(bad, dict) else bad)
            continue
        turns = [("human", " ".join(rng.choices(words, k=rng.randint(1, 30)))),
                 ("gpt", " ".join(rng.choices(words, k=rng.randint(1, 60))))]
        if rng.random() < 0.3:
            turns += [("human", "more?"), ("gpt", " ".join(rng.choices(words, k=rng.randint(1, 20))))]
        out.append(sharegpt(f"r{i}", *turns))
    return out


def build(cfg, tok_dir, root):
    from jobs.data_prep import tokenizer_identity
    from jobs.ingest import build_store
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    return build_store(cfg, tok_dir, tokenizer_identity(tok), len(tok), root), tok


def test_demo_records_same_batches_stats_and_vocab_as_in_memory_path(ray_local, tmp_path):
    """The official-recipe preset's data (SmolLM2 tokenizer, 320 ShareGPT records, packed): the store path = today's
    path, exactly."""
    from jobs.config import load_config
    from jobs.data_prep import load_tokenizer, prepare_data

    cfg = load_config("smollm2-sharegpt-cpu-official", None, [f"data.store_dir={tmp_path}", "data.tokenizer_workers=2"])
    data = prepare_data(cfg)
    tok = load_tokenizer(cfg.target.model)
    samples, stats = load_samples(cfg.data, tok)
    assert vars(data.stats) == vars(stats)
    same_batches(pack(samples, cfg.data.max_length, rows_per_batch=cfg.optim.rows_per_batch,
                      pad_token_id=tok.pad_token_id), data.batches)
    ref_vocab = build_vocab_map(((s.input_ids, s.loss_mask) for s in samples), len(tok), cfg.draft.vocab_size)
    assert torch.equal(data.vocab.counts, ref_vocab.counts) and torch.equal(data.vocab.d2t, ref_vocab.d2t)
    assert len(pickle.dumps(data.batches)) < 2000  # an index handle goes to the workers, not the tokens
    # Reused, not rebuilt: the same committed folder, untouched.
    manifest = data.store.folder / MANIFEST
    before = manifest.stat().st_mtime_ns
    again = prepare_data(cfg)
    assert again.store.folder == data.store.folder and manifest.stat().st_mtime_ns == before
    m = json.loads(manifest.read_text())
    assert 5.0 <= m["bytes_per_token"] < 5.5  # int32 id + uint8 mask per token, plus offsets and ids per sample


def test_padded_rows_several_files_and_skips(ray_local, tmp_path, tok_dir):
    recs = records(300, bad_every=7)
    one = write_jsonl(tmp_path / "all.jsonl", recs)
    (tmp_path / "parts").mkdir()
    for k in range(3):  # the same records in three files: same order, same samples
        write_jsonl(tmp_path / "parts" / f"p{k}.jsonl", recs[k * 100:(k + 1) * 100])
    cfg = DataConfig(path=str(tmp_path / "parts" / "p*.jsonl"), max_length=160, on_bad_record="skip",
                     tokenizer_workers=2)
    store, tok = build(cfg, tok_dir, tmp_path / "store")
    samples, stats = load_samples(dataclasses.replace(cfg, path=str(one)), tok)
    assert vars(store.stats) == vars(stats) and stats.skipped and stats.truncated and stats.kept > 60, stats
    got = StoreBatches(store, build_index(store, pack=False, max_length=160, rows_per_batch=3), tok.pad_token_id)
    same_batches([collate(samples[i:i + 3], tok.pad_token_id) for i in range(0, len(samples), 3)], got)
    # A worker's shard view reads only its own batches, when asked.
    read = []
    orig = type(store).sample
    store.sample = lambda i: (read.append(i), orig(store, i))[1]
    view = ShardView(got, [5, 2, 9])
    assert read == []
    for k in range(len(view)):
        view[k]
    assert sorted(read) == [*range(6, 9), *range(15, 18), *range(27, 30)], (read, got.store is store)


def test_max_samples_reads_in_windows_and_matches(ray_local, tmp_path, tok_dir):
    """Two of three records are bad, so the first window (2 × max_samples records) keeps too few: a second
    window is read. Stats, samples and vocab counts (the overshoot taken out) equal the in-memory path's."""
    recs = records(2000, seed=1, bad_every=0)
    for i in range(len(recs)):
        if i % 3:
            recs[i] = {**BAD["no_assistant_turn"], "id": f"b{i}"}
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    cfg = DataConfig(path=str(path), max_length=160, on_bad_record="skip", max_samples=300, pack=True,
                     tokenizer_workers=2)
    store, tok = build(cfg, tok_dir, tmp_path / "store")
    samples, stats = load_samples(cfg, tok)
    assert vars(store.stats) == vars(stats) and stats.kept == 300 and stats.records_seen > 600
    same_batches(pack(samples, 160, rows_per_batch=2, pad_token_id=tok.pad_token_id),
                 StoreBatches(store, build_index(store, pack=True, max_length=160, rows_per_batch=2),
                              tok.pad_token_id))
    ref = build_vocab_map(((s.input_ids, s.loss_mask) for s in samples), len(tok), 100)
    assert torch.equal(torch.from_numpy(store.counts()), ref.counts)


def test_bad_record_names_file_and_record_and_leaves_no_store(ray_local, tmp_path, tok_dir):
    recs = records(1000)
    recs[700] = BAD["unknown_role"]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    root = tmp_path / "store"
    with pytest.raises(DataError, match=r"d.jsonl: record 700 \(line 701\) id='bad': turn 1 has unknown role "
                                         r"'robot'.*on_bad_record=skip"):
        build(DataConfig(path=str(path), tokenizer_workers=2), tok_dir, root)
    assert list(root.iterdir()) == []  # no store, no temporary folder


def test_partial_or_foreign_store_is_never_trusted(ray_local, tmp_path, tok_dir):
    from jobs.ingest import store_key

    path = write_jsonl(tmp_path / "d.jsonl", records(50))
    cfg = DataConfig(path=str(path), tokenizer_workers=1)
    root = tmp_path / "store"
    store, tok = build(cfg, tok_dir, root)
    key = store.manifest["key"]
    assert open_store(store.folder, key) is not None
    assert open_store(store.folder, "another key") is None  # other tokenizer or settings
    shard = store.folder / store.manifest["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-10])  # torn shard
    assert open_store(store.folder, key) is None
    rebuilt, _ = build(cfg, tok_dir, root)  # rebuilt in place, whole again
    assert open_store(rebuilt.folder, key) is not None
    (rebuilt.folder / MANIFEST).unlink()  # a folder without its manifest is not a store
    assert open_store(rebuilt.folder, key) is None
    # The key follows the tokenizer and every sample setting.
    from eagle3.sources import resolve_parts

    parts = resolve_parts(str(path))
    keys = {store_key(parts, "tok-a", cfg), store_key(parts, "tok-b", cfg),
            store_key(parts, "tok-a", dataclasses.replace(cfg, max_length=64)),
            store_key(parts, "tok-a", dataclasses.replace(cfg, overlong="drop")),
            store_key(parts, "tok-a", dataclasses.replace(cfg, max_samples=10))}
    assert len(keys) == 5
    assert store_key(parts, "tok-a", dataclasses.replace(cfg, tokenizer_workers=3, pack=True)) == \
        store_key(parts, "tok-a", cfg)  # who tokenizes and how rows are laid out do not change the samples


def test_killed_builder_leaves_only_a_temp_folder_that_is_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = temp_folder(tmp_path, "k")
    os.rename(stale, tmp_path / stale.name.replace(f"-{os.getpid()}-", f"-{pid}-"))
    (tmp_path / stale.name.replace(f"-{os.getpid()}-", f"-{pid}-") / "shard-x.arrow").write_bytes(b"half")
    mine = temp_folder(tmp_path, "k")  # a new build removes the dead builder's folder, keeps live ones
    assert [p.name for p in tmp_path.iterdir()] == [mine.name]
    assert open_store(tmp_path / "k", "k") is None


def test_pack_rows_vs_naive_best_fit_decreasing():
    """pack_rows (pack's rows, and the store's packed layout) against a plain O(n·rows) best-fit decreasing."""
    def naive(lengths, cap):
        rows, free = [], []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep input order
            fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
            if fits:  # the fullest row with room; among equally full rows the oldest
                r = min(fits, key=lambda r: (free[r], r))
            else:
                r = len(rows)
                rows.append([]), free.append(cap)
            rows[r].append(i)
            free[r] -= lengths[i]
        return rows

    rng = random.Random(0)
    for cap in (16, 128, 512):
        lengths = [rng.randint(1, cap) for _ in range(400)]
        assert pack_rows(lengths, cap) == naive(lengths, cap)
    with pytest.raises(ValueError, match="more than max_length"):
        pack_rows([10, 200], 128)
