"""The held-out evaluation prompts: rebuilt to the same bytes, distinct, and absent from every record a preset or
recipe arm trains on (records below jobs.heldout.TRAIN_RECORD_LIMIT of the packaged ShareGPT)."""

from __future__ import annotations

import json

from eagle3.data import DataError, iter_records, packaged_sharegpt_path, record_messages
from jobs import heldout
from jobs.config import PRESETS, load_config
from jobs.data_prep import load_tokenizer
from jobs.eval import load_prompts


def norm(text: str) -> str:
    """Whitespace-normalised text; written here, not imported from jobs.heldout, so the checks stay independent of
    the code that built the file."""
    return " ".join(text.split())


def heldout_texts() -> set[str]:
    rows = map(json.loads, heldout.HELDOUT_PATH.read_text().splitlines())
    return {norm(r["conversations"][-1]["value"]) for r in rows}


def test_heldout_file_rebuilds_identically(tmp_path):
    out = heldout.build(tmp_path / "h.jsonl")
    assert out.read_bytes() == heldout.HELDOUT_PATH.read_bytes()


def test_heldout_prompts_are_distinct_and_load():
    rows = [json.loads(line) for line in heldout.HELDOUT_PATH.read_text().splitlines()]
    assert len(rows) == heldout.NUM_PROMPTS >= 48
    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    prompts, counts = load_prompts(heldout.HELDOUT_PATH, tok, max_prompt_tokens=heldout.MAX_PROMPT_TOKENS)
    assert len(prompts) == len(rows) and counts["duplicate"] == counts["too_long"] == 0
    assert all(int(r["id"].split("-")[1]) >= heldout.HELDOUT_FIRST_RECORD for r in rows)


def test_no_training_record_holds_a_heldout_prompt():
    # Any human turn of any training record equal to a held-out first turn counts, not just first turns.
    held = heldout_texts()
    hits = []
    for index, record in iter_records(packaged_sharegpt_path()):
        if index >= heldout.TRAIN_RECORD_LIMIT:
            break
        if isinstance(record, DataError):
            continue
        try:
            messages = record_messages(record)
        except DataError:
            continue
        hits += [index for m in messages if m["role"] == "user" and norm(m["content"]) in held]
    assert hits == []


def test_presets_train_below_the_heldout_records():
    for name in PRESETS:
        cfg = load_config(name)
        if cfg.data.path.endswith("ShareGPT_V3_unfiltered_cleaned_split.json") and "/mnt/" not in cfg.data.path:
            assert cfg.data.max_samples is not None and cfg.data.max_samples <= heldout.TRAIN_RECORD_LIMIT, name


def test_shipped_regenerated_data_holds_no_heldout_prompt():
    from jobs.config import REGEN_ASSET

    held = heldout_texts()
    stamp = json.loads((REGEN_ASSET / "aerie_regenerated.json").read_text())
    assert stamp["complete"] and stamp["target"] == "builtin:smollm2-135m-instruct"
    assert stamp["sampling"]["temperature"] == 0.0
    assert stamp["input"]["records_seen"] <= heldout.TRAIN_RECORD_LIMIT
    records = [json.loads(line) for part in sorted(REGEN_ASSET.glob("part-*.jsonl")) for line in part.open()]
    assert len(records) == stamp["records"]
    assert not [r["id"] for r in records for t in r["conversations"]
                if t["from"] == "human" and norm(t["value"]) in held]
