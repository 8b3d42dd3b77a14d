"""Driver-side data preparation: tokenize with the target's chat template, batch, build the draft vocab map."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from actors.hf_backend import chat_template_id
from actors.models import cache_root, resolve_model
from eagle3.data import Batch, DataStats, collate, load_samples, pack
from eagle3.vocab import VocabMap, data_fingerprint, load_or_build_vocab_map
from jobs.config import JobConfig


@dataclass
class PreparedData:
    batches: list[Batch]  # in file order; each epoch shuffles the batch order
    stats: DataStats
    vocab: VocabMap
    vocab_size: int  # the tokenizer's


def load_tokenizer(model: str):
    """The target's tokenizer (with its chat template) from the resolved local folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))


def prepare_data(cfg: JobConfig) -> PreparedData:
    """Tokenize `cfg.data`, make batches (packed rows or padded rows) and the cached draft vocab map."""
    path = Path(cfg.data.path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} not found; set data.path to a .json or .jsonl file")
    tok = load_tokenizer(cfg.target.model)
    samples, stats = load_samples(cfg.data, tok)
    if not samples:
        raise ValueError(f"dataset {path} gave no trainable samples ({stats.summary()}); check the file and data.*")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = cfg.optim.rows_per_batch
    if cfg.data.pack:
        batches = pack(samples, cfg.data.max_length, rows_per_batch=rows, pad_token_id=pad)
    else:
        batches = [collate(samples[i : i + rows], pad) for i in range(0, len(samples), rows)]
    # The vocab map depends on the file, on every setting that changes which tokens are loss tokens, and the
    # tokenizer; all of it goes into the cache key.
    settings = json.dumps([data_fingerprint(path), cfg.data.max_length, cfg.data.overlong, cfg.data.max_samples])
    vocab_digest = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]
    tokenizer_id = f"{len(tok)}:{chat_template_id(tok)}:{vocab_digest}"
    vocab = load_or_build_vocab_map(
        cache_root() / "vocab", hashlib.sha256(settings.encode()).hexdigest(), tokenizer_id, len(tok),
        cfg.draft.vocab_size, lambda: ((s.input_ids, s.loss_mask) for s in samples),
    )
    return PreparedData(batches=batches, stats=stats, vocab=vocab, vocab_size=len(tok))
