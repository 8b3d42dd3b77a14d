"""Bad input files: each error names the file (and record/line), the problem and the fix, before training starts,
and a failed conversion or cache build leaves nothing half-written behind."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from actors.models import resolve_model
from eagle3.checkpoint import load_train_state, save_train_state
from eagle3.data import DataConfig, DataError, iter_records, load_samples
from eagle3.export import load_draft, save_draft
from eagle3.model import DraftConfig, Eagle3Draft
from eagle3.vocab import load_or_build_vocab_map
from jobs.data_prep import load_tokenizer
from jobs.eval import load_draft_for, load_prompts
from tests.targets import tiny_config, tiny_target
from tests.test_data import GOOD, chatml_tokenizer, sharegpt, write_jsonl


def says(err: pytest.ExceptionInfo, *parts: str) -> str:
    """The message, after checking that it contains every part (file, problem, fix)."""
    msg = str(err.value)
    missing = [p for p in parts if p not in msg]
    assert not missing, f"{missing} not in {msg!r}"
    return msg


def cut(path, keep: float = 0.5) -> None:
    """Truncate a file to a fraction of its size, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A complete tiny HF model folder (config, safetensors weights, tokenizer with a chat template); tests copy it."""
    folder = tmp_path_factory.mktemp("model") / "m"
    tiny_target().save_pretrained(folder)
    chatml_tokenizer().save_pretrained(folder)
    return folder


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


# ---------------------------------------------------------------- data files: encoding


@pytest.mark.parametrize("reader", ["train", "eval"])
def test_utf16_data_file(tmp_path, tok, reader):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n", encoding="utf-16")
    with pytest.raises(DataError) as e:
        if reader == "train":
            load_samples(DataConfig(path=str(path)), tok)
        else:  # aerie eval --prompts
            load_prompts(path, tok)
    says(e, str(path), "is UTF-16 text, not UTF-8", "re-save it as UTF-8", "iconv -f UTF-16 -t UTF-8")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_binary_data_file(tmp_path, tok, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError) as e:
        load_samples(DataConfig(path=str(path)), tok)
    says(e, str(path), "is binary, or UTF-16/UTF-32 text without a byte-order mark", "give a UTF-8 file")


def test_latin1_line_is_a_bad_record(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    latin1 = json.dumps(sharegpt("x", ("human", "café"), ("gpt", "oui")), ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1 + b"\n")
    with pytest.raises(DataError) as e:
        load_samples(DataConfig(path=str(path)), tok)
    says(e, str(path), "record 1 (line 2)", "byte 0xe9", "is not UTF-8", "re-save it as UTF-8", "on_bad_record=skip")
    assert e.value.reason == "not_utf8"
    samples, stats = load_samples(DataConfig(path=str(path), on_bad_record="skip"), tok)
    assert len(samples) == 1 and stats.skipped == {"not_utf8": 1}


def test_utf8_bom_and_crlf_still_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in [GOOD, GOOD]) + b"\r\n")
    assert [r for _, r in iter_records(path)] == [GOOD, GOOD]


def test_latin1_in_json_list(tmp_path):
    path = tmp_path / "d.json"
    text = json.dumps([GOOD, sharegpt("x", ("human", "café"), ("gpt", "oui"))], indent=1, ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as e:
        list(iter_records(path))
    line = text[: text.index("é")].count("\n") + 1
    says(e, str(path), f"line {line}", "byte 0xe9", "is not UTF-8", "re-save it as UTF-8")


def test_parquet_bytes_under_a_json_name(tmp_path):
    misnamed = tmp_path / "d.jsonl"  # .parquet files are read as Parquet (tests/test_sources.py)
    misnamed.write_bytes(b"PAR1" + bytes(64))
    with pytest.raises(DataError) as e:
        iter_records(misnamed)
    says(e, str(misnamed), "is a Parquet file", "give it a .parquet name")


# ---------------------------------------------------------------- data files: wrong fields


WRONG = {  # name: (record, reason, what the message must say besides file and record)
    "no_messages": ({"id": "bad", "turns": []}, "missing_messages",
                    ["no 'conversations' (ShareGPT) or 'messages' (OpenAI) list", "'turns': a list"]),
    "role_name": (sharegpt("bad", ("human", "Hi"), ("robot", "beep")), "unknown_role",
                  ["turn 1 has unknown role 'robot'", "known roles: system, human", "rename it"]),
    "openai_role_name": ({"id": "bad", "messages": [{"role": "customer", "content": "Hi"}]}, "unknown_role",
                         ["turn 0 has unknown role 'customer' (its 'role')", '{"messages": [{"role": "user"']),
    "content_parts": ({"id": "bad", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
                      "bad_turn", ["turn 0 has 'content' = a list, not a string", "join their text"]),
    "number_content": ({"id": "bad", "conversations": [{"from": "human", "value": 3}]}, "bad_turn",
                       ["turn 0 has 'value' = a number, not a string"]),
    "openai_keys_in_sharegpt": ({"id": "bad", "conversations": [{"role": "user", "content": "Hi"}]}, "bad_turn",
                                ["turn 0 has no 'value' (its keys: 'role', 'content')",
                                 '{"conversations": [{"from": "human", "value": "..."}']),
    "turn_not_object": ({"id": "bad", "messages": ["Hi"]}, "bad_turn", ["turn 0 is a string, not an object"]),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_fields_name_file_record_and_layout(tmp_path, tok, case):
    record, reason, parts = WRONG[case]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, record])
    with pytest.raises(DataError) as e:
        load_samples(DataConfig(path=str(path)), tok)
    says(e, str(path), "record 1 (line 2) id='bad'", *parts, "expected", "on_bad_record=skip")
    assert e.value.reason == reason


def test_record_that_is_not_an_object(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, [GOOD]])
    with pytest.raises(DataError) as e:
        load_samples(DataConfig(path=str(path)), tok)
    says(e, str(path), "record 1 (line 2)", "record is a list, not an object", '{"conversations": [', '{"messages": [')


def test_json_list_named_jsonl_and_back(tmp_path):
    listed = tmp_path / "list.jsonl"
    listed.write_text(json.dumps([GOOD, GOOD], indent=2))
    with pytest.raises(DataError) as e:
        list(iter_records(listed))
    says(e, str(listed), "is a JSON list, not JSON Lines", "rename it to .json")
    lines = write_jsonl(tmp_path / "lines.json", [GOOD, GOOD])
    with pytest.raises(DataError) as e:
        list(iter_records(lines))
    says(e, str(lines), "expected a JSON list of records", "rename it to .jsonl")


# ---------------------------------------------------------------- target model folders


def test_model_folder_without_tokenizer(tmp_path, model_folder):
    folder = copy_of(model_folder, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(str(folder))
    msg = says(e, str(folder), "has no tokenizer (none of tokenizer.json", "save_pretrained")
    assert "sentencepiece" not in msg


def test_tokenizer_without_chat_template(tmp_path, model_folder):
    folder = copy_of(model_folder, tmp_path)
    (folder / "chat_template.jinja").unlink()
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ValueError) as e:
        load_samples(DataConfig(path=str(path)), load_tokenizer(str(folder)))
    says(e, str(folder), "has no chat template", "give target.model a folder whose tokenizer_config.json has a "
         "chat_template", "or a different target")


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing_shard"])
def test_model_folder_with_damaged_weights(tmp_path, model_folder, damage):
    folder = copy_of(model_folder, tmp_path)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        cut(weights)
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        resolve_model(str(folder))
    problem = "is missing" if damage == "missing_shard" else "is truncated or not a safetensors file"
    says(e, str(folder / ("model-00002-of-00002.safetensors" if damage == "missing_shard" else weights.name)),
         problem, "copy or download the model again")


def test_truncated_gguf_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AERIE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10, 4)[:13])  # header cut off mid-field
    with pytest.raises(ValueError) as e:
        resolve_model(str(gguf))
    says(e, str(gguf), "cannot be loaded as a GGUF model", "truncated", "download or copy it again")
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # no half-converted model folder, no temp folder


# ---------------------------------------------------------------- drafts and checkpoints


def small_draft(seed: int = 0, **overrides) -> Eagle3Draft:
    torch.manual_seed(seed)
    return Eagle3Draft(DraftConfig.from_target_config(tiny_config("llama", **overrides), draft_vocab_size=50))


def test_truncated_draft_export(tmp_path):
    out = save_draft(small_draft(), tmp_path / "export")
    cut(out / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_draft(out)
    says(e, str(out / "model.safetensors"), "is truncated or not a safetensors file", "re-export the draft")
    (out / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"], ')
    with pytest.raises(ValueError) as e:
        load_draft(out)
    says(e, str(out / "config.json"), "is not valid JSON", "re-export the draft")


@pytest.mark.parametrize("name", ["draft", "optim", "rng"])
def test_truncated_checkpoint_changes_nothing(tmp_path, name):
    draft = small_draft()
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    draft.fc.weight.grad = torch.ones_like(draft.fc.weight)
    opt.step()
    ckpt = save_train_state(tmp_path / "ckpt", draft, opt, sched, {"step": 1})
    cut(ckpt / f"{name}.safetensors", 0.9)
    fresh = small_draft(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError) as e:
        load_train_state(ckpt, fresh, fresh_opt, torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 1.0))
    says(e, str(ckpt / f"{name}.safetensors"), "is truncated or not a safetensors file", "delete it")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()) and not fresh_opt.state


def test_draft_for_another_target(tmp_path):
    out = save_draft(small_draft(), tmp_path / "export")
    other = tiny_target("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError) as e:  # aerie eval
        load_draft_for(out, other)
    says(e, str(out), "was not trained for this target", "hidden size 64 != target's 32")
    with pytest.raises(ValueError) as e:  # eagle3.export.load_draft with another target's embeddings
        load_draft(out, embed_weight=other.get_input_embeddings().weight)
    says(e, str(out), "trained for a target with vocab size 300 and hidden size 64", "(300, 32)",
         "use the target the draft was trained for, or train a draft for this target")


def test_draft_with_mismatched_vocab_map(tmp_path):
    from safetensors.torch import load_file, save_file

    out = save_draft(small_draft(), tmp_path / "export")
    state = load_file(str(out / "model.safetensors"))
    state["t2d"] = torch.roll(state["t2d"], 1)  # still 50 ids, but not the ones d2t maps to
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_draft(out)
    says(e, str(out / "model.safetensors"), "d2t/t2d", "are not one vocab map", "re-export the draft")
    state["d2t"] = state["d2t"][:40]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_draft(out)
    says(e, str(out / "model.safetensors"), "d2t", "has shape (40,), config implies (50,)", "draft_vocab_size=50",
         "re-export the draft")


def test_failed_vocab_map_build_leaves_no_cache(tmp_path):
    def batches():
        yield torch.tensor([1, 2]), torch.tensor([True, True])
        raise DataError("boom", "test")

    with pytest.raises(DataError):
        load_or_build_vocab_map(tmp_path / "vocab", "fp", "tok", 300, 50, batches)
    assert not (tmp_path / "vocab").exists() or not list((tmp_path / "vocab").iterdir())
