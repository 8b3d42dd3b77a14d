"""Token feedback through the learner and the Ray job.

Independent reference: on text the target itself wrote greedily, the target's greedy continuation from every
branch point IS the dataset continuation, so 'target' feedback must reproduce the 'data' loss exactly; the draft's
own tokens relabelled by the target must give the 'data' loss wherever the draft happens to follow the data."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from mlflow.tracking import MlflowClient

from actors.hf_backend import HFTarget, TargetConfig
from eagle3.data import Batch
from eagle3.vocab import VocabMap
from jobs import train
from jobs.config import load_config
from jobs.train_loop import Learner, draft_config_for


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return HFTarget(TargetConfig(model="builtin:tiny-llama"))


def greedy_batch(target: HFTarget, prompt_len=12, new=40) -> Batch:
    """One row: a random prompt and the target's own greedy continuation (the loss covers the continuation)."""
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(100, 5000, (1, prompt_len), generator=g)
    out = target.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    T = out.shape[1]
    loss = torch.zeros(1, T, dtype=torch.bool)
    loss[:, prompt_len:] = True
    return Batch(input_ids=out, attention_mask=torch.ones(1, T, dtype=torch.bool), loss_mask=loss,
                 position_ids=torch.arange(T)[None], doc_ids=torch.zeros(1, T, dtype=torch.long),
                 sample_ids=[["s0"]])


def learner_for(target, batch, **ttt):
    cfg = load_config("tiny", overrides=["ttt.length=4", "optim.bf16=false"])
    cfg = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, **ttt))
    info = target.info()
    # Draft vocab = the tokens of this text (+ filler), so the target's argmax is always representable.
    used = torch.unique(batch.input_ids)
    extra = torch.tensor([t for t in range(info.vocab_size) if t not in set(used.tolist())][: 64 - len(used)])
    used = torch.cat([used, extra]).sort().values
    t2d = torch.zeros(info.vocab_size, dtype=torch.bool)
    t2d[used] = True
    from eagle3.vocab import VocabMap

    vocab = VocabMap(d2t=used - torch.arange(len(used)), t2d=t2d)
    cfg = dataclasses.replace(cfg, draft=dataclasses.replace(cfg.draft, vocab_size=len(used)))
    return Learner(cfg, draft_config_for(info, len(used)), target.frozen_weights(), vocab, 10, torch.device("cpu"))


def test_target_feedback_on_greedy_text_equals_data_feedback(target):
    batch = greedy_batch(target)
    tb = target.forward(batch)
    data = learner_for(target, batch).step(tb)
    learner = learner_for(target, batch, token_feedback="target")
    plan = learner.plan_branches(tb, step=0)
    assert len(plan.branches) == int(batch.loss_mask.sum())  # every scored query (token i+2 is a loss token)
    relabel = target.relabel(plan.request)
    # The target's greedy continuation from branch point p = i+1 is the text itself.
    p = plan.request.points
    want = torch.stack([batch.input_ids[0, (p + 1 + m).clamp(max=batch.input_ids.shape[1] - 1)] for m in range(3)], 1)
    inside = (p + 3) < batch.input_ids.shape[1]
    assert torch.equal(relabel.tokens[inside], want[inside])
    fb = learner.step(tb, plan=plan, relabel=relabel)
    assert fb.count_k == data.count_k
    assert fb.loss_k == pytest.approx(data.loss_k, rel=1e-5, abs=1e-6)
    assert fb.correct_k == data.correct_k


def test_draft_feedback_labels_come_from_the_target_on_the_drafts_path(target):
    """Draft mode with an untrained draft: the fed tokens are the draft's argmax, and each label is the target's
    forward on prefix + those tokens (checked against a plain forward for a few branches)."""
    batch = greedy_batch(target)
    tb = target.forward(batch)
    learner = learner_for(target, batch, token_feedback="draft", survival_weights=True)
    plan = learner.plan_branches(tb, step=0)
    relabel = target.relabel(plan.request)
    assert torch.equal(relabel.tokens, plan.request.tokens)
    for n in [0, len(plan.branches) // 2, len(plan.branches) - 1]:
        p = int(plan.request.points[n])
        seq = torch.cat([batch.input_ids[0, : p + 1], relabel.tokens[n]])[None]
        ref = target.model.model(input_ids=seq).last_hidden_state[0, p + 1 :]
        torch.testing.assert_close(relabel.last_hidden[n].float(), ref.float(), rtol=2e-2, atol=2e-2)
    r = learner.step(tb, plan=plan, relabel=relabel)
    assert r.survival_k[0] == 1.0 and all(0 <= s <= 1 for s in r.survival_k)
    assert r.survival_k == sorted(r.survival_k, reverse=True)  # a chain can only die


@pytest.mark.parametrize("mode", [
    ["ttt.token_feedback=draft", "ttt.survival_weights=true", "ttt.draft_temperature=0.7", "ttt.branch_fraction=0.5"],
    ["ttt.token_feedback=target", "optim.max_target_tokens=3000", "ttt.branch_fraction=0.25"],
], ids=["draft", "target+budget"])
def test_feedback_modes_train_through_the_ray_job(ray_local, tmp_path, mode):
    # draft: 14 steps cross the first epoch's end (12 batches), where the per-epoch fractions restart.
    steps = 14 if "draft" in mode[0] else 5
    args = ["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", "name=fb", "--set",
            f"optim.max_steps={steps}", "--set", "optim.epochs=2", "--set", "trainer.checkpoint_every=100"]
    for m in mode:
        args += ["--set", m]
    s = train.main(args)
    client = MlflowClient(s["mlflow_uri"])
    r = client.get_run(s["mlflow_run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["ttt.token_feedback"] == mode[0].split("=")[1]
    m = r.data.metrics
    K, frac = 3, float(mode[-1].split("=")[1])
    # Extra target tokens: about fraction * (K-1) per scored token, and scored tokens are a share of all tokens.
    assert 0 < m["relabel_tokens_per_token"] <= frac * (K - 1) + 1e-6
    assert m["relabel_cache_hit_frac"] == 1.0  # one actor: every relabel finds the forward's prefix KV
    budget = 3000 if "target" in mode[0] else 0
    spent = [x.value for x in sorted(client.get_metric_history(r.info.run_id, "target_tokens"), key=lambda x: x.step)]
    if budget:  # stops at the first step whose cumulative target tokens reach the budget
        assert spent[-1] >= budget and spent[-2] < budget and len(spent) < 5
        assert s["target_tokens"] == spent[-1]
    else:
        assert len(spent) == steps
    for key in ["loss", "relabel_wait_frac", "acc_1"]:
        assert len(client.get_metric_history(r.info.run_id, key)) == len(spent), key
    waits = [x.value for x in client.get_metric_history(r.info.run_id, "relabel_wait_frac")]
    assert all(0 <= w <= 1 for w in waits), waits  # a share of this epoch's time, also after an epoch's end
    if "draft" in mode[0]:
        assert "survival_1" in m
