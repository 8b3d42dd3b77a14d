"""The project's held-out evaluation prompts: ShareGPT first turns that no preset or benchmark arm trains on.

`jobs/assets/heldout-sharegpt.jsonl` holds the first user turn (and any system turn before it) of distinct
ShareGPT V3 records from record HELDOUT_FIRST_RECORD on: at least MIN_WORDS words, at most MAX_PROMPT_TOKENS tokens
under SmolLM2's chat template, and no user turn that also occurs in a record below TRAIN_RECORD_LIMIT (ShareGPT
repeats chats). Every training preset and recipe arm reads records below TRAIN_RECORD_LIMIT, and
tests/test_heldout.py checks that none of their prompts occurs in those records. Rebuild (same bytes) with
`python -m jobs.heldout`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

HELDOUT_PATH = Path(__file__).parent / "assets" / "heldout-sharegpt.jsonl"
HELDOUT_FIRST_RECORD = 16_000  # the packaged file has 17,671 complete records
TRAIN_RECORD_LIMIT = 12_000  # presets and recipe arms train on records [0, 12,000) at most
NUM_PROMPTS = 96
MAX_PROMPT_TOKENS = 384
MIN_WORDS = 4


def _norm(text: str) -> str:
    return " ".join(text.split())


def prompt_key(messages: list[dict[str, str]]) -> str:
    """What makes two prompts the same: the user/system text, whitespace-normalised."""
    return "\n".join(f"{m['role']}: {_norm(m['content'])}" for m in messages)


def build(path: Path = HELDOUT_PATH) -> Path:
    """Write the held-out prompt file (atomic): distinct prompts, in record order, as ShareGPT records."""
    from eagle3.data import DataError, iter_records, packaged_sharegpt_path, record_messages
    from jobs.data_prep import load_tokenizer
    from jobs.eval import prompt_messages

    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    seen: set[str] = set()
    src = packaged_sharegpt_path()
    to_from = {"system": "system", "user": "human"}
    trained: set[str] = set()  # every user turn of the records training may read: ShareGPT repeats chats
    rows: list[str] = []
    for index, record in iter_records(src):
        if index < TRAIN_RECORD_LIMIT and not isinstance(record, DataError):
            with contextlib.suppress(DataError):
                trained |= {_norm(m["content"]) for m in record_messages(record) if m["role"] == "user"}
        if index < HELDOUT_FIRST_RECORD or isinstance(record, DataError):
            continue
        try:
            messages = prompt_messages(record)
        except DataError:
            continue
        users = [_norm(m["content"]) for m in messages if m["role"] == "user"]
        # A prompt of a few words ("continue", "Hey") is a cut-off chat, not a request; one seen in training is not
        # held out.
        if len(" ".join(users).split()) < MIN_WORDS or any(u in trained for u in users):
            continue
        key = prompt_key(messages)
        if key in seen:
            continue
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if len(tok(text, add_special_tokens=False)["input_ids"]) > MAX_PROMPT_TOKENS:
            continue
        seen.add(key)
        rows.append(json.dumps({"id": f"sharegpt-{index}-{record.get('id', '')}",
                                "conversations": [{"from": to_from[m["role"]], "value": m["content"]}
                                                  for m in messages]}, ensure_ascii=False))
        if len(rows) == NUM_PROMPTS:
            break
    if len(rows) < NUM_PROMPTS:
        raise RuntimeError(f"only {len(rows)} usable prompts after record {HELDOUT_FIRST_RECORD}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(build())
