"""`aerie eval` end to end on a tiny export (table, JSON, MLflow), prompt files, bad drafts, the train-job hook."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.models import TINY
from eagle3.export import save_draft
from eagle3.model import DraftConfig, Eagle3Draft
from jobs import cli
from jobs import eval as eval_job
from jobs.eval import eval_after_training, format_table, load_prompts, load_target, metrics_of

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
        assert r["numerical_ties"] == [] and r["num_numerical_ties"] == 0  # fp32: exact agreement

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("aerie").experiment_id])[0]
    assert run.data.metrics["eval/chain_k3/tau"] == pytest.approx(report["results"][1]["tau"])
    assert run.data.metrics["eval/chain_k3/tau_ci95_low"] == pytest.approx(report["results"][1]["tau_ci95"][0])
    assert run.data.metrics["eval/chain_k3/numerical_ties"] == 0 and run.info.status == "FINISHED"
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


def test_train_hook_logs_held_back_eval(tmp_path, tiny, monkeypatch):
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
    assert out["eval_target_dtype"] == "float32" and out["eval_numerical_ties"] == 0
    assert metric_history(tracker, "eval/numerical_ties")[0][1] == 0
    assert seconds < 20, f"the eval hook took {seconds:.1f} s on tiny: keep it off by default there"
    # Every record used for training: no held-back prompts, the hook says so and logs a tag instead of failing.
    assert eval_after_training(cfg, export, skip_records=12, tracker=tracker) == {}
    assert "no usable prompts" in tracker.client.get_run(tracker.run_id).data.tags["eval.skipped"]
    # The target is loaded in eval.target_dtype (here not the actors' target.dtype), and the summary says which.
    seen = []
    monkeypatch.setattr(eval_job, "load_target", lambda spec, dtype: seen.append(dtype) or load_target(spec, dtype))
    bf16 = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, target_dtype="bfloat16"))
    out = eval_after_training(bf16, export, skip_records=9, tracker=tracker)
    assert seen == ["bfloat16"] and cfg.target.dtype == "float32"
    assert out["eval_target_dtype"] == "bfloat16" and out["eval_prompts"] == 3
    assert isinstance(out["eval_numerical_ties"], int)
    # A small tree, as the CPU presets use: its shape comes from eval.tree_top_k / eval.tree_total_tokens.
    tree = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, method="tree", num_draft_tokens=2,
                                                             tree_top_k=2, tree_total_tokens=3))
    out = eval_after_training(tree, export, skip_records=9, tracker=tracker)
    assert out["eval_config"] == "tree d=2 k=2 n=3" and out["eval_numerical_ties"] == 0


def test_ties_in_table_and_metrics():
    """A result whose only divergence was a rounding tie: lossless 'yes (1 tie)', the count logged, ties in JSON."""
    from eagle3.spec_decode import SpecConfig, SpecResult

    tie = {"prompt": 0, "position": 25, "tokens": [7, 9], "gap": 0.06, "tol": 5.6, "margin": 0.06}
    base = dict(tau=2.0, emitted_tokens=8, verify_calls=4, draft_tokens=12, accepted_per_pos=[3, 1, 0],
                accept_hist=[1, 2, 1, 0], outputs=[[1] * 8], seconds=1.0, baseline_seconds=2.0, speedup=2.0,
                emitted_per_prompt=[8], calls_per_prompt=[4])
    cfgs = [SpecConfig(num_draft_tokens=3), SpecConfig(num_draft_tokens=4), SpecConfig(num_draft_tokens=5)]
    results = [SpecResult(**base, lossless_checked=True, numerical_ties=[tie]),
               SpecResult(**base, lossless_checked=True, numerical_ties=[tie, {**tie, "prompt": 1}]),
               SpecResult(**base, lossless_checked=False)]
    rows = format_table(cfgs, results).splitlines()[2:]
    assert "  yes (1 tie)  " in rows[0] and "  yes (2 ties) " in rows[1] and "  n/a  " in rows[2]
    assert results[0].to_dict()["numerical_ties"] == [tie] and results[1].to_dict()["num_numerical_ties"] == 2
    m = metrics_of(cfgs, results)
    assert m["eval/chain_k3/numerical_ties"] == 1 and m["eval/chain_k4/numerical_ties"] == 2
    assert "eval/chain_k5/numerical_ties" not in m  # not checked (temperature > 0): no count to report


@pytest.mark.parametrize("flag, value", [("--num-prompts", "0"), ("--num-prompts", "-3"), ("--k", "0"),
                                         ("--max-new-tokens", "0"), ("--tree-depth", "0")])
def test_cli_rejects_bad_counts_before_loading(flag, value, capsys, monkeypatch):
    monkeypatch.setattr(eval_job, "load_target", lambda *a: pytest.fail("loaded the target"))
    with pytest.raises(SystemExit) as err:
        eval_job.main(["--draft", "nowhere", "--target", TINY, "--prompts", "x.jsonl", flag, value])
    assert err.value.code == 2
    assert f"argument {flag}: got {value}, must be >= 1; pass a number >= 1" in capsys.readouterr().err


def test_cli_several_trees_one_run():
    """Tree shapes are zipped position by position, a single value applies to every tree, chains come first."""
    args = eval_job.parse_args(["--draft", "d", "--target", TINY, "--prompts", "p", "--method", "tree", "chain",
                                "--k", "1", "--tree-depth", "2", "3", "4", "--tree-top-k", "2",
                                "--tree-total-tokens", "3", "4", "8"])
    labels = [c.label() for c in eval_job.spec_configs(args)]
    assert labels == ["chain K=1", "tree d=2 k=2 n=3", "tree d=3 k=2 n=4", "tree d=4 k=2 n=8"]
    bad = eval_job.parse_args(["--draft", "d", "--target", TINY, "--prompts", "p", "--method", "tree",
                               "--tree-depth", "2", "3", "--tree-top-k", "2", "3", "4"])
    with pytest.raises(ValueError, match=r"gave \[2, 3, 1\] values; give each one value or 3"):
        eval_job.spec_configs(bad)


def test_cli_unreachable_tracking_uri_names_eval_flag(monkeypatch):
    monkeypatch.setattr(eval_job, "load_target", lambda *a: pytest.fail("loaded the target"))
    with pytest.raises(ConnectionError) as err:
        eval_job.main(["--draft", "nowhere", "--target", TINY, "--prompts", "x.jsonl",
                  "--tracking-uri", "http://127.0.0.1:9"])
    msg = str(err.value)
    assert "MLflow tracking URI 'http://127.0.0.1:9' is unreachable" in msg
    assert "pass a reachable --tracking-uri" in msg and "--set" not in msg


def test_cli_bad_run_id(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match=r"--run-id 0123abc: no such run at --tracking-uri .*pass an existing run's id"):
        eval_job.main(["--draft", "nowhere", "--target", TINY, "--prompts", "x.jsonl", "--tracking-uri", uri,
                  "--run-id", "0123abc"])


def test_no_chat_template(tiny, tmp_path, monkeypatch):
    _, tok = tiny
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(ValueError, match="no chat template.*use a chat/instruct target .* or add a chat_template"):
        load_prompts(write_jsonl(tmp_path / "p.jsonl", RECORDS), tok)


def test_cli_failed_eval_closes_its_mlflow_run(tmp_path, tiny, monkeypatch):
    """A failure after the run was opened: FAILED with the error tagged; Ctrl-C: KILLED; --run-id's run untouched."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking import open_run

    target, _ = tiny
    export = tiny_export(tmp_path, target)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    args = ["--draft", export, "--target", TINY, "--tracking-uri", uri, "--no-progress"]

    def last_run(name):
        exp = client.get_experiment_by_name("aerie").experiment_id
        return client.search_runs([exp], filter_string=f"tags.`mlflow.runName` = '{name}'")[0]

    with pytest.raises(FileNotFoundError, match="prompts file"):
        eval_job.main(args + ["--prompts", str(tmp_path / "missing.jsonl"), "--run-name", "fails"])
    run = last_run("fails")
    assert run.info.status == "FAILED" and "FileNotFoundError: prompts file" in run.data.tags["error"]

    prompts = str(write_jsonl(tmp_path / "p.jsonl", RECORDS))

    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_job, "run_configs", interrupt)
    with pytest.raises(KeyboardInterrupt):
        eval_job.main(args + ["--prompts", prompts, "--run-name", "stopped"])
    assert last_run("stopped").info.status == "KILLED"

    training = open_run(uri, "aerie", "training")  # RUNNING, e.g. the train job that asked for this eval
    with pytest.raises(KeyboardInterrupt):
        eval_job.main(args + ["--prompts", prompts, "--run-id", training.run_id])
    run = client.get_run(training.run_id)
    assert run.info.status == "RUNNING" and "error" not in run.data.tags
