"""Online regeneration: batched turn-by-turn generation vs a one-conversation-at-a-time HF generate reference, loss
mask over exactly the generated replies, seeded sampling, and the tiny preset trained end to end with regeneration.
"""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from actors.hf_backend import HFTarget, TargetConfig
from actors.models import TINY, resolve_model
from actors.protocol import GenerationParams, RegenRequest
from actors.regenerate import prompt_turns, regenerate_batch, stop_token_ids
from eagle3.data import DataConfig
from jobs import train
from jobs.data_prep import regen_requests
from tests.targets import stopping_chat_target

EOT = 2  # <|im_end|> in SmolLM2's tokenizer: its EOS and the chat template's end of turn

CONVERSATIONS = [  # system/user turns only, as regeneration receives them
    [{"role": "user", "content": "Hello, who are you?"}, {"role": "user", "content": "And why is that?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem about the sea and sky."}],
    [{"role": "user", "content": "1+1?"}, {"role": "user", "content": "2+2?"}, {"role": "user", "content": "3+3?"}],
    [{"role": "user", "content": "Tell me a story."}],
]
IDS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """tests.targets.stopping_chat_target as an HF target."""
    folder = tmp_path_factory.mktemp("regen-target")
    stopping_chat_target(folder)
    return HFTarget(TargetConfig(model=str(folder), aux_layer_ids=(0, 1, 1), num_threads=1))


def recording(target, calls):
    def generate(prompts, params):
        replies = target.generate(prompts, params)
        calls.append((prompts, params, replies))
        return replies
    return generate


def reference_replies(target, conversation, max_new_tokens):
    """Turn by turn, one conversation, unbatched HF generate: the replies' token ids."""
    tok, messages, replies = target.tokenizer, [], []
    for turn in conversation:
        messages.append(turn)
        if turn["role"] != "user":
            continue
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        out = target.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOT,
                                    pad_token_id=EOT)[0, len(prompt):].tolist()
        reply = out[: out.index(EOT)] if EOT in out else out
        replies.append(reply)
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    return replies


def test_batched_turns_equal_one_at_a_time_greedy(target):
    calls = []
    data = DataConfig(path="x.jsonl", max_length=1024)
    regen = regenerate_batch(CONVERSATIONS, IDS, target.tokenizer, recording(target, calls),
                             GenerationParams(max_new_tokens=16), data)
    # One generate call per turn index over the conversations that still have a user turn: 4, 2, 1 prompts.
    assert [len(prompts) for prompts, _, _ in calls] == [4, 2, 1]
    got = {c: [] for c in range(4)}
    for turn, (_, _, replies) in enumerate(calls):
        for c, reply in zip([c for c in range(4) if sum(m["role"] == "user" for m in CONVERSATIONS[c]) > turn],
                            replies):
            got[c].append(reply)
    lengths = []
    for c, conv in enumerate(CONVERSATIONS):
        ref = reference_replies(target, conv, 16)
        assert got[c] == ref, c
        lengths += [len(r) for r in ref]
    # The fixture model stops at <|im_end|> at different lengths and also runs into max_new_tokens; conversation
    # d's only reply is empty (<|im_end|> at once), so d has nothing to train on and is left out of the batch.
    assert 16 in lengths and len(set(lengths)) >= 4 and got[3] == [[]], lengths
    assert regen.generated_tokens == sum(lengths) and regen.generate_seconds > 0
    assert regen.batch.sample_ids == [["a"], ["b"], ["c"]]

    # The loss mask covers exactly the generated replies, each followed by its end-of-turn token.
    tok = target.tokenizer
    for b, c in enumerate(range(3)):
        masked = tok.decode(regen.batch.input_ids[b][regen.batch.loss_mask[b]])
        assert masked == "".join(tok.decode(r, skip_special_tokens=True) + "<|im_end|>" for r in got[c]), c
        # ... and everything else is the prompt turns: the unmasked text holds each user turn verbatim.
        real = regen.batch.attention_mask[b]
        unmasked = tok.decode(regen.batch.input_ids[b][real & ~regen.batch.loss_mask[b]])
        assert all(m["content"] in unmasked for m in CONVERSATIONS[c])


def test_conversation_stops_at_max_length(target):
    tok = target.tokenizer
    calls = []
    first = len(tok.apply_chat_template(CONVERSATIONS[2][:1], add_generation_prompt=True, tokenize=True)["input_ids"])
    # Room for the first prompt and a reply, not for the second prompt: conversation c gets one turn only.
    data = DataConfig(path="x.jsonl", max_length=first + 6)
    regen = regenerate_batch(CONVERSATIONS[2:3], ["c"], tok, recording(target, calls),
                             GenerationParams(max_new_tokens=4), data)
    assert [len(p) for p, _, _ in calls] == [1]
    assert regen.batch.input_ids.shape[1] <= first + 6 and regen.batch.sample_ids == [["c"]]
    with pytest.raises(ValueError, match=r"none of the 1 conversations \(c\) gave a trainable sample"):
        regenerate_batch(CONVERSATIONS[2:3], ["c"], tok, recording(target, []), GenerationParams(max_new_tokens=4),
                         DataConfig(path="x.jsonl", max_length=first))


def test_packed_request_holds_the_same_samples(target):
    params = GenerationParams(max_new_tokens=8)
    rows = regenerate_batch(CONVERSATIONS[:3], IDS[:3], target.tokenizer, target.generate, params,
                            DataConfig(path="x.jsonl", max_length=512)).batch
    packed = regenerate_batch(CONVERSATIONS[:3], IDS[:3], target.tokenizer, target.generate, params,
                              DataConfig(path="x.jsonl", max_length=512, pack=True)).batch
    assert packed.input_ids.shape[0] == 1 and sorted(packed.sample_ids[0]) == IDS[:3]
    for d, sid in enumerate(packed.sample_ids[0]):
        b = IDS.index(sid)
        cols = packed.doc_ids[0] == d
        assert torch.equal(packed.input_ids[0, cols], rows.input_ids[b, rows.attention_mask[b]])
        assert torch.equal(packed.loss_mask[0, cols], rows.loss_mask[b, rows.attention_mask[b]])


def test_seeded_sampling_is_reproducible(target):
    tok = target.tokenizer
    prompts = [tok.apply_chat_template(c[:1], add_generation_prompt=True, tokenize=True)["input_ids"]
               for c in CONVERSATIONS]
    sample = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    a, b = target.generate(prompts, sample), target.generate(prompts, sample)
    assert a == b
    other = target.generate(prompts, GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=8))
    greedy = target.generate(prompts, GenerationParams(max_new_tokens=16))
    assert other != a and greedy != a
    state = torch.get_rng_state()
    target.generate(prompts, sample)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    assert stop_token_ids(tok) == [EOT]


def test_hf_target_regenerate_returns_features_of_the_generated_batch(target):
    req = RegenRequest(conversations=CONVERSATIONS, sample_ids=IDS, params=GenerationParams(max_new_tokens=8),
                       data=DataConfig(path="x.jsonl", max_length=1024))
    out = target.regenerate(req)
    ref = target.forward(out.batch)
    assert torch.equal(out.aux_hidden, ref.aux_hidden) and torch.equal(out.last_hidden, ref.last_hidden)
    assert 0 < out.generated_tokens <= 8 * 7 and 0 < out.generate_seconds <= out.target_seconds


def test_prompt_turns_and_requests(tmp_path):
    msgs = [{"role": "assistant", "content": "mid-answer"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    assert prompt_turns(msgs) == [msgs[1], msgs[3]]
    with pytest.raises(ValueError, match="no user turn"):
        prompt_turns([{"role": "assistant", "content": "x"}])
    path = tmp_path / "d.jsonl"
    rows = ['{"id": "r%d", "conversations": [{"from": "human", "value": "q%d"}, {"from": "gpt", "value": "a"}]}' % (i, i)
            for i in range(5)]
    path.write_text("\n".join(rows + ['{"id": "bad", "conversations": [{"from": "gpt", "value": "a"}]}']) + "\n")
    tok = AutoTokenizer.from_pretrained(resolve_model(TINY))
    cfg = DataConfig(path=str(path), max_length=256, regen_conversations=2, regen_seed=10, on_bad_record="skip")
    reqs, stats = regen_requests(cfg, tok)
    assert [r.sample_ids for r in reqs] == [["r0", "r1"], ["r2", "r3"], ["r4"]]
    assert [r.params.seed for r in reqs] == [10, 11, 12] and stats.skipped == {"no_user_turn": 1}
    assert reqs[0].conversations[1] == [{"role": "user", "content": "q1"}]
    with pytest.raises(ValueError, match="data.regen_top_p"):
        DataConfig(path="x.jsonl", regen_top_p=0)


def test_tiny_preset_trains_with_regeneration(ray_local, tmp_path):
    s = train.main(["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", "name=regen",
                    "--set", "data.regenerate=true", "--set", "data.max_samples=8",
                    "--set", "data.regen_conversations=4", "--set", "data.regen_max_new_tokens=8"])
    client = MlflowClient(s["mlflow_uri"])
    r = client.get_run(s["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.data.params["data.regenerate"] == "True"
    assert s["batches"] == 2 and s["samples"] == 8  # 8 conversations, 4 per request
    loss = client.get_metric_history(r.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2] and all(m.value == m.value for m in loss)
    m = r.data.metrics
    # The builtin tiny target never emits <|im_end|>: every reply is max_new_tokens long, one turn per user turn.
    assert m["samples_trained"] == 8 and m["generated_tokens"] > 0 and m["generated_tokens"] % 8 == 0
    assert m["generate_tokens_per_s"] > 0
