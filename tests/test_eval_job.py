"""`aerie eval` end to end on a tiny export (table, JSON, MLflow), prompt files, bad drafts, the train-job hook."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.models import TINY
from eagle3.export import save_draft
from eagle3.model import DraftConfig, Eagle3Draft
from jobs import cli
from jobs.eval import eval_after_training, load_prompts, load_target

AUX = (1, 3, 4)
RECORDS = [
    {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]},
    {"conversations": [{"from": "gpt", "value": "(cut-off answer)"}, {"from": "human", "value": "Name a colour"},
                       {"from": "gpt", "value": "Blue"}, {"from": "human", "value": "Another?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three"}]},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is ~10x faster than two contended ones
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return load_target(TINY)


def write_jsonl(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


def tiny_export(tmp_path, target, name="export", vocab=512) -> str:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=vocab, aux_layer_ids=AUX)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    used = torch.arange(0, 2 * vocab, 2)  # a non-identity map
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[used] = True
    draft.set_vocab_map(used - torch.arange(vocab), t2d)
    return str(save_draft(draft, tmp_path / name))


def test_load_prompts(tmp_path, tiny):
    _, tok = tiny
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    prompts, counts = load_prompts(path, tok)
    want = [
        [{"role": "user", "content": "Hello there"}],
        [{"role": "user", "content": "Name a colour"}],  # leading assistant turn dropped, cut at the first reply
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three"}],
    ]
    for ids, msgs in zip(prompts, want):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert load_prompts(path, tok, skip_records=1, num_prompts=1)[0] == prompts[1:2]
    shortest = min(map(len, prompts))
    assert load_prompts(path, tok, max_prompt_tokens=shortest)[1]["too_long"] == sum(len(p) > shortest for p in prompts)

    bad = write_jsonl(tmp_path / "bad.jsonl", RECORDS[:1], ["{not json\n", json.dumps({"messages": "x"}) + "\n"])
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: not valid JSON.*--on-bad-record skip"):
        load_prompts(bad, tok)
    prompts, counts = load_prompts(bad, tok, on_bad_record="skip")
    assert len(prompts) == 1 and counts["bad"] == 2
    dup = write_jsonl(tmp_path / "dup.jsonl", [RECORDS[0], RECORDS[1], RECORDS[0]])
    prompts, counts = load_prompts(dup, tok)
    assert len(prompts) == 2 and counts["duplicate"] == 1 and prompts[0] != prompts[1]
    only_bad = write_jsonl(tmp_path / "nouser.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(ValueError, match="line 1: no user turn"):
        load_prompts(only_bad, tok)


def test_cli_eval_on_tiny_export(tmp_path, tiny, capsys):
    target, _ = tiny
    export = tiny_export(tmp_path, target)
    prompts = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    out, uri = tmp_path / "eval.json", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli.main(["eval", "--draft", export, "--target", TINY, "--prompts", str(prompts), "--method", "chain", "tree",
              "--k", "2", "3", "--tree-depth", "2", "--tree-top-k", "2", "--tree-total-tokens", "4",
              "--max-new-tokens", "8", "--out", str(out), "--tracking-uri", uri, "--no-progress"])
    table = capsys.readouterr().out
    assert "chain K=2" in table and "chain K=3" in table and "tree d=2 k=2 n=4" in table and "yes" in table
    report = json.loads(out.read_text())
    assert report["num_prompts"] == 3 and len(report["results"]) == 3
    for r in report["results"]:
        assert r["lossless_checked"] and r["verify_calls"] > 0
        assert r["tau"] == r["emitted_tokens"] / r["verify_calls"]
        assert r["tau_ci95"][0] <= r["tau"] <= r["tau_ci95"][1] and len(r["calls_per_prompt"]) == 3

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("aerie").experiment_id])[0]
    assert run.data.metrics["eval/chain_k3/tau"] == pytest.approx(report["results"][1]["tau"])
    assert run.data.metrics["eval/chain_k3/tau_ci95_low"] == pytest.approx(report["results"][1]["tau_ci95"][0])
    assert run.data.metrics["eval/tree_d2_k2_n4/accept_rate_0"] == pytest.approx(
        report["results"][2]["accept_rate_per_pos"][0])
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert names == {"eval/eval.json", "eval/accept_hist.png"}


def test_bad_drafts(tmp_path, tiny):
    target, _ = tiny
    from jobs.eval import load_draft_for

    export = tiny_export(tmp_path, target)
    weights = f"{export}/model.safetensors"
    state = load_file(weights)
    del state["d2t"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing \['d2t'\].*re-export the draft with Aerie"):
        load_draft_for(export, target)

    other = DraftConfig.from_target_config(target.config, draft_vocab_size=64, aux_layer_ids=AUX)
    other = DraftConfig.from_dict({**other.to_dict(), "vocab_size": 1000})
    path = save_draft(Eagle3Draft(other), tmp_path / "other")
    with pytest.raises(ValueError, match="not trained for this target: vocab size 1000 != target's 49152"):
        load_draft_for(path, target)
    with pytest.raises(SystemExit):  # argparse rejects an unknown method before anything loads
        cli.main(["eval", "--draft", str(path), "--target", TINY, "--prompts", "x.jsonl", "--method", "beam"])


def test_train_hook_logs_held_back_eval(tmp_path, tiny):
    """eval_after_training on the tiny preset's settings: prompts come after the records training read."""
    from jobs.config import load_config
    from jobs.tracking import metric_history, open_run

    target, tok = tiny
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS * 4)
    cfg = load_config("tiny", overrides=[f"data.path={data}", f"output_dir={tmp_path}", "eval.enabled=true",
                                         "eval.num_prompts=4", "eval.max_new_tokens=16", "eval.num_draft_tokens=3"])
    export = tiny_export(cfg.run_dir, target)
    tracker = open_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "aerie", "tiny")
    t0 = time.perf_counter()
    out = eval_after_training(cfg, export, skip_records=9, tracker=tracker)
    seconds = time.perf_counter() - t0
    assert out["eval_prompts"] == 3  # 12 records, 9 used for training
    assert metric_history(tracker, "eval/tau")[0][1] == pytest.approx(out["eval_tau"])
    assert seconds < 20, f"the eval hook took {seconds:.1f} s on tiny: keep it off by default there"
    # Every record used for training: no held-back prompts, the hook says so and logs a tag instead of failing.
    assert eval_after_training(cfg, export, skip_records=12, tracker=tracker) == {}
    assert "no usable prompts" in tracker.client.get_run(tracker.run_id).data.tags["eval.skipped"]
