"""Draft vocabulary: the N target token ids most frequent under the loss mask, as EAGLE-3's d2t/t2d maps.

d2t holds offsets, target_id = draft_id + d2t[draft_id] (the layout SGLang and vLLM load); t2d marks which
target ids the draft can emit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class VocabMap:
    """Draft ↔ target token id maps."""

    d2t: torch.Tensor  # [draft_vocab] long, target_id = draft_id + d2t[draft_id]
    t2d: torch.Tensor  # [vocab] bool, True at target ids in the draft vocabulary
    counts: torch.Tensor | None = None  # [vocab] long, loss-token frequency the map was built from

    def __post_init__(self):
        ids = self.draft_ids
        ok = (
            len(ids) > 0
            and bool((ids[1:] > ids[:-1]).all())
            and 0 <= int(ids[0]) <= int(ids[-1]) < len(self.t2d)
            and int(self.t2d.sum()) == len(ids)
            and bool(self.t2d[ids].all())
        )
        if not ok:
            raise ValueError("inconsistent VocabMap: t2d must mark exactly the sorted target ids arange + d2t")

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target id of each draft id, ascending."""
        return torch.arange(len(self.d2t)) + self.d2t  # [draft_vocab] long

    @property
    def coverage(self) -> float | None:
        """Fraction of loss tokens the draft vocabulary can emit (None without counts)."""
        if self.counts is None or int(self.counts.sum()) == 0:
            return None
        return float(self.counts[self.t2d].sum() / self.counts.sum())


def build_vocab_map(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], vocab_size: int, draft_vocab_size: int
) -> VocabMap:
    """Keep the ``draft_vocab_size`` target ids most frequent under the loss mask.

    ``batches`` yields (input_ids, loss_mask) of any matching shape, streamed. Ties go to the lower id;
    if the data has fewer distinct tokens, the rest is filled with unseen ids, lowest first, so the map
    always has exactly draft_vocab_size entries.
    """
    _check_sizes(vocab_size, draft_vocab_size)  # before counting: a wrong size fails at once
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for input_ids, loss_mask in batches:
        ids = input_ids[loss_mask.bool()].long().cpu()
        if ids.numel() == 0:
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(
                f"token id {int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())} is outside the "
                f"target vocab [0, {vocab_size}); is vocab_size the target tokenizer's?"
            )
        counts += torch.bincount(ids, minlength=vocab_size)
    return vocab_map_from_counts(counts, draft_vocab_size)


def _check_sizes(vocab_size: int, draft_vocab_size: int) -> None:
    if draft_vocab_size <= 0:
        raise ValueError(f"draft_vocab_size={draft_vocab_size}: expected a positive number of tokens")
    if draft_vocab_size > vocab_size:
        raise ValueError(
            f"draft_vocab_size={draft_vocab_size} is larger than the target vocab_size={vocab_size}; the draft "
            f"vocabulary is a subset of the target's, so set draft_vocab_size <= {vocab_size}"
        )


def vocab_map_from_counts(counts: torch.Tensor, draft_vocab_size: int) -> VocabMap:
    """The map of the ``draft_vocab_size`` most frequent ids of ``counts`` ([vocab] loss-token counts)."""
    vocab_size = len(counts)
    _check_sizes(vocab_size, draft_vocab_size)
    counts = counts.long()
    # Stable descending sort keeps equal counts in id order: ties (and the unseen fill) go to lower ids.
    used = torch.sort(counts, descending=True, stable=True).indices[:draft_vocab_size].sort().values
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[used] = True
    return VocabMap(d2t=used - torch.arange(draft_vocab_size), t2d=t2d, counts=counts)


def data_fingerprint(path: str | Path) -> str:
    """sha256 of the file's content.

    A full hash rather than size/mtime/sampled blocks: it is exact (an in-place edit is never missed, a
    copy is still a hit) and reading a file once is cheap next to tokenizing it (~0.15 s for ShareGPT's
    125 MB).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def load_or_build_vocab_map(
    cache_dir: str | Path,
    fingerprint: str,
    tokenizer_id: str,
    vocab_size: int,
    draft_vocab_size: int,
    batches_fn: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
) -> VocabMap:
    """The cached map for (data fingerprint, tokenizer, vocab size, N), else build it from batches_fn().

    ``fingerprint`` should cover everything that changes the loss tokens: the data file
    (data_fingerprint) and data settings such as max_length. The cache is a safetensors file written
    atomically, so concurrent builders and crashes never leave a half-written map.
    """
    key = hashlib.sha256(json.dumps([fingerprint, tokenizer_id, vocab_size, draft_vocab_size]).encode()).hexdigest()
    cache_dir = Path(cache_dir)
    path = cache_dir / f"vocab_map_{key[:16]}.safetensors"
    if path.exists():
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    tensors = {name: f.get_tensor(name) for name in f.keys()}
                    return VocabMap(d2t=tensors["d2t"], t2d=tensors["t2d"], counts=tensors.get("counts"))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            logger.warning("ignoring unreadable vocab map cache %s (%s); rebuilding", path, e)
    vocab_map = build_vocab_map(batches_fn(), vocab_size, draft_vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"d2t": vocab_map.d2t, "t2d": vocab_map.t2d}
    if vocab_map.counts is not None:
        tensors["counts"] = vocab_map.counts
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name, suffix=".tmp")  # same filesystem → atomic
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"key": key, "tokenizer_id": tokenizer_id, "fingerprint": fingerprint})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return vocab_map
