"""Driver-side data preparation: tokenize with the target's chat template, batch, build the draft vocab map.

With `data.regenerate` the prepared "batches" are `RegenRequest`s: the system/user turns of each record, which the
target answers itself (`actors.regenerate`); the vocab map is still built from the dataset's own responses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from actors.hf_backend import chat_template_id
from actors.models import cache_root, resolve_model
from actors.protocol import GenerationParams, RegenRequest
from actors.regenerate import prompt_ids, prompt_turns
from eagle3.data import (
    Batch, DataConfig, DataError, DataStats, collate, iter_records, load_samples, pack, record_location,
    record_messages,
)
from eagle3.vocab import VocabMap, data_fingerprint, load_or_build_vocab_map
from jobs.config import JobConfig


@dataclass
class PreparedData:
    batches: list[Batch] | list[RegenRequest]  # in file order; each epoch shuffles the batch order
    stats: DataStats  # of the samples, or with data.regenerate of the prompts (kept = conversations)
    vocab: VocabMap
    vocab_size: int  # the tokenizer's


def load_tokenizer(model: str):
    """The target's tokenizer (with its chat template) from the resolved local folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))


def prepare_data(cfg: JobConfig) -> PreparedData:
    """Tokenize `cfg.data`, make batches (packed rows or padded rows; RegenRequests with data.regenerate) and the
    cached draft vocab map (always from the dataset's own responses)."""
    path = Path(cfg.data.path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} not found; set data.path to a .json or .jsonl file")
    tok = load_tokenizer(cfg.target.model)
    samples, stats = load_samples(cfg.data, tok)
    if not samples:
        raise ValueError(f"dataset {path} gave no trainable samples ({stats.summary()}); check the file and data.*")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = cfg.optim.rows_per_batch
    if cfg.data.regenerate:
        batches, stats = regen_requests(cfg.data, tok)
        if not batches:
            raise ValueError(f"dataset {path} gave no prompts to regenerate ({stats.summary()}); check data.*")
    elif cfg.data.pack:
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


def regen_requests(cfg: DataConfig, tokenizer) -> tuple[list[RegenRequest], DataStats]:
    """The records' system/user turns in requests of `cfg.regen_conversations` (one training step each).

    Records follow load_samples' rules (on_bad_record, max_samples); one whose first prompt alone fills max_length
    is dropped as over-long (its reply would be cut away). Request i samples with seed regen_seed + i.
    """
    path = Path(cfg.path)
    prompts: list[tuple[str, list[dict[str, str]]]] = []
    stats = DataStats()
    for index, record in iter_records(path):
        if isinstance(record, DataError) and record.reason == "incomplete_tail":
            stats.incomplete_tail += 1
            continue
        stats.records_seen += 1
        try:
            if isinstance(record, DataError):
                raise record
            turns = prompt_turns(record_messages(record))
            first = turns[: next(k for k, m in enumerate(turns) if m["role"] == "user") + 1]
            n = len(prompt_ids(first, tokenizer))
        except DataError as e:
            if cfg.on_bad_record == "skip":
                stats.skipped[e.reason] = stats.skipped.get(e.reason, 0) + 1
                continue
            raise DataError(f"{path}: {record_location(path, index, record)}: {e}; or set data.on_bad_record=skip",
                            e.reason) from e
        if n >= cfg.max_length:
            stats.dropped_overlong += 1
            continue
        prompts.append((str(record.get("id", index)), turns))
        stats.kept += 1
        stats.total_tokens += n
        if cfg.max_samples is not None and stats.kept >= cfg.max_samples:
            break
    k = cfg.regen_conversations
    requests = [
        RegenRequest(
            conversations=[turns for _, turns in prompts[j : j + k]], sample_ids=[sid for sid, _ in prompts[j : j + k]],
            params=GenerationParams(max_new_tokens=cfg.regen_max_new_tokens, temperature=cfg.regen_temperature,
                                    top_p=cfg.regen_top_p, seed=cfg.regen_seed + j // k),
            data=cfg,
        )
        for j in range(0, len(prompts), k)
    ]
    return requests, stats
