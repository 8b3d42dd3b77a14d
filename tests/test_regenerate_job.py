"""`aerie regenerate`: the written replies equal an unbatched one-conversation HF generate reference turn by turn,
a faulted then resumed job writes the same bytes as an uninterrupted one, --fresh starts over, changed settings are
refused, a complete job is left alone, and the folder is a dataset that training reads (with its stamp)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from eagle3.data import record_messages
from eagle3.sources import iter_source_records, resolve_parts
from jobs import cli
from jobs import regenerate
from jobs.data_prep import STAMP, read_stamp
from tests.targets import stopping_chat_target

EOT = 2  # <|im_end|>: SmolLM2's EOS and end of turn
MAX_NEW = 16
ROOT = Path(__file__).resolve().parents[1]

RECORDS = [
    {"id": "a", "conversations": [{"from": "human", "value": "Hello, who are you?"}, {"from": "gpt", "value": "x"},
                                  {"from": "human", "value": "And why is that?"}, {"from": "gpt", "value": "y"}]},
    {"id": "b", "conversations": [{"from": "system", "value": "Be brief."},
                                  {"from": "human", "value": "Write a poem about the sea and sky."}]},
    {"id": "c", "messages": [{"role": "user", "content": "1+1?"}, {"role": "user", "content": "2+2?"},
                             {"role": "user", "content": "3+3?"}]},
    {"id": "bad", "conversations": [{"from": "gpt", "value": "no question"}]},  # skipped: no user turn
    {"id": "d", "conversations": [{"from": "human", "value": "Tell me a story."}]},  # empty first reply: left out
    {"conversations": [{"from": "human", "value": "What is the capital of France?"}]},  # id: its index, "5"
    {"id": "f", "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red"},
                                  {"from": "human", "value": "Another one?"}]},
    {"id": "g", "conversations": [{"from": "human", "value": "Why is the sky blue?"}]},
    {"id": "h", "conversations": [{"from": "human", "value": "Translate 'cat' to French."},
                                  {"from": "human", "value": "And to German?"}]},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tests.targets.stopping_chat_target's folder."""
    folder = tmp_path_factory.mktemp("regen-job-target")
    stopping_chat_target(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("regen-job-data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def job_args(model_dir, source, out, *extra):
    tmp = out.parent
    return ["--preset", "tiny", "--out", str(out), "--set", f"output_dir={tmp}", "--set", "name=regen",
            "--set", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "--set", f"target.model={model_dir}",
            "--set", "target.aux_layer_ids=[0, 1, 1]", "--set", "target.num_actors=2",
            "--set", f"data.path={source}", "--set", "data.max_length=1024", "--set", "data.max_samples=null",
            "--set", "data.regen_batch_size=2", "--set", f"data.regen_max_new_tokens={MAX_NEW}", *extra]


def parts_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.jsonl"))}


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for data in parts_of(out).values() for line in data.decode().splitlines()]


def reference(model, tok, turns):
    """The dialog a one-conversation, unbatched greedy HF generate writes turn by turn, up to its last reply."""
    messages, dialog = [], []
    for turn in turns:
        messages.append(turn)
        if turn["role"] != "user":
            continue
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=EOT,
                             pad_token_id=EOT)[0, len(prompt):].tolist()
        reply = tok.decode(out[: out.index(EOT)] if EOT in out else out, skip_special_tokens=True)
        if not reply.strip():
            break
        messages.append({"role": "assistant", "content": reply})
        dialog = list(messages)
    return dialog


@pytest.fixture(scope="module")
def clean(ray_local, model_dir, source, tmp_path_factory):
    """A greedy and a sampled uninterrupted job."""
    tmp = tmp_path_factory.mktemp("regen-job-clean")
    greedy, sampled = tmp / "greedy", tmp / "sampled"
    regenerate.main(job_args(model_dir, source, greedy))
    regenerate.main(job_args(model_dir, source, sampled, "--set", "data.regen_temperature=1.0",
                             "--set", "data.regen_seed=3"))
    return greedy, sampled


def test_replies_equal_unbatched_greedy_reference(clean, model_dir, source):
    out, _ = clean
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    want = []
    for index, record in enumerate(RECORDS):
        if record.get("id") == "bad":
            continue
        turns = [m for m in record_messages(record) if m["role"] != "assistant"]
        dialog = reference(model, tok, turns)
        if dialog:
            sharegpt = {"system": "system", "user": "human", "assistant": "gpt"}
            want.append({"id": record.get("id", str(index)),
                         "conversations": [{"from": sharegpt[m["role"]], "value": m["content"]} for m in dialog]})
    got = records_of(out)
    assert got == want
    # Chunk i = conversations [2i, 2i + 2) of the 8 good records, in file order; d's empty reply leaves it out.
    assert [[r["id"] for r in map(json.loads, data.decode().splitlines())] for data in parts_of(out).values()] == \
        [["a", "b"], ["c"], ["5", "f"], ["g", "h"]]
    by_id = {r["id"]: r["conversations"] for r in got}
    assert [t["from"] for t in by_id["a"]] == ["human", "gpt", "human", "gpt"]  # answered turn by turn
    assert by_id["a"][1]["value"] not in ("x", "") and by_id["b"][0] == {"from": "system", "value": "Be brief."}
    assert {len(t["value"]) for r in got for t in r["conversations"] if t["from"] == "gpt"} != {1}

    stamp = json.loads((out / STAMP).read_text())
    assert stamp["complete"] and stamp["records"] == 7 and stamp["chunks"] == 4 and stamp["conversations"] == 8
    assert stamp["target"] == str(model_dir) and stamp["input"]["skipped"] == {"no_user_turn": 1}
    assert stamp["sampling"] == {"max_new_tokens": MAX_NEW, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    assert stamp["assistant_turns"] == sum(t["from"] == "gpt" for r in got for t in r["conversations"])
    assert stamp["response_tokens"] > 0 and stamp["source"]["path"] == str(source)
    run = MlflowClient(stamp["mlflow_uri"]).get_run(stamp["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "regen-regenerate"
    assert run.data.metrics["chunks_done"] == 4 and run.data.metrics["conversations_done"] == 8
    assert run.data.metrics["generated_tokens"] > 0 and run.data.metrics["tokens_per_s"] > 0


def test_resumed_job_writes_the_same_bytes(clean, model_dir, source, tmp_path):
    greedy_clean, sampled_clean = clean
    out = tmp_path / "resumed"
    shutil.copytree(greedy_clean, out)  # a complete job with other settings: --fresh discards it
    greedy_stamp = json.loads((out / STAMP).read_text())
    args = job_args(model_dir, source, out, "--set", "data.regen_temperature=1.0", "--set", "data.regen_seed=3")
    with pytest.raises(RuntimeError, match="fault injection"):
        regenerate.main(args + ["--fresh", "--fail-after-parts", "2"])
    assert list(parts_of(out)) == ["part-00000.jsonl", "part-00001.jsonl"]
    first = json.loads((out / STAMP).read_text())
    assert first["complete"] is False and first["sampling"]["seed"] == 3
    assert first["mlflow_run_id"] != greedy_stamp["mlflow_run_id"]  # a fresh job is a new MLflow run
    client = MlflowClient(first["mlflow_uri"])
    assert client.get_run(first["mlflow_run_id"]).info.status == "FAILED"
    assert first["target_resolved_dtype"] == "float32"
    # Parts written in another precision (target.dtype=auto on another machine) are not resumed in this one.
    (out / STAMP).write_text(json.dumps({**first, "target_resolved_dtype": "bfloat16"}))
    with pytest.raises(ValueError, match=r"generated in bfloat16, but target.dtype='float32' resolves to float32 "
                                         r"here; set --set target.dtype=bfloat16 to resume them, or --fresh"):
        regenerate.main(args)
    assert list(parts_of(out)) == ["part-00000.jsonl", "part-00001.jsonl"]
    (out / STAMP).write_text(json.dumps(first))
    (out / ".part-00002.jsonl.tmp-99999").write_text('{"id": "half')  # as a kill mid-write leaves it
    before = (out / "part-00000.jsonl").stat().st_mtime_ns

    stamp = regenerate.main(args)
    assert parts_of(out) == parts_of(sampled_clean)  # byte for byte
    assert (out / "part-00000.jsonl").stat().st_mtime_ns == before  # written parts are not redone
    ids = [r["id"] for r in records_of(out)]
    assert len(ids) == len(set(ids)) and not list(out.glob(".part-*"))
    assert stamp["complete"] and stamp["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run, resumed
    assert stamp["target_resolved_dtype"] == "float32"
    run = client.get_run(stamp["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["chunks_done"] == 4
    assert stamp["output_fingerprint"] == json.loads((sampled_clean / STAMP).read_text())["output_fingerprint"]
    # Sampling is seeded per chunk: the sampled replies differ from the greedy ones.
    assert records_of(out) != records_of(clean[0])


def test_changed_settings_refused_and_complete_job_left_alone(clean, model_dir, source, capsys, monkeypatch):
    out, _ = clean
    # run_cli ends the process's Ray before printing; here that would be the test session's shared cluster
    monkeypatch.setattr(cli, "_flush_ray_logs", lambda: None)
    parts, stamp = parts_of(out), (out / STAMP).read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(regenerate.main, job_args(model_dir, source, out, "--set", "data.regen_seed=1",
                                              "--set", "data.regen_batch_size=3"), prog="aerie regenerate")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "was regenerated with other settings" in err and "data.regen_seed 0 -> 1" in err
    assert "data.regen_batch_size 2 -> 3" in err and "another --out" in err and "--fresh" in err
    assert parts_of(out) == parts and (out / STAMP).read_bytes() == stamp

    # A second run of the complete job: exit status 0, nothing rewritten (a fresh process, as a user runs it).
    env = {**os.environ, "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-m", "jobs.regenerate", *job_args(model_dir, source, out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "already complete" in done.stderr
    assert parts_of(out) == parts and (out / STAMP).read_bytes() == stamp


def test_folder_is_a_dataset_with_its_stamp(clean, model_dir, source, tmp_path):
    out, _ = clean
    parts = resolve_parts(str(out))
    assert [Path(p.path).name for p in parts] == list(parts_of(out))  # no stamp, no lock, no dot-files
    stamp = read_stamp(parts)
    assert stamp is not None and stamp["target"] == str(model_dir) and stamp["complete"]
    from eagle3.data import tokenize_conversation

    tok = AutoTokenizer.from_pretrained(model_dir)
    records = [r for _, _, r in iter_source_records(parts)]
    assert len(records) == 7
    for r in records:
        sample = tokenize_conversation(record_messages(r), tok, max_length=1024, overlong="drop")
        assert sample is not None and sample.loss_mask.any()

    # A folder holding other files is not taken over, --fresh or not.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="no regeneration job wrote"):
        regenerate.main(job_args(model_dir, source, foreign, "--fresh"))


def test_length_groups_bound_padding():
    import random

    from actors.hf_backend import GENERATE_GROUP, length_groups

    rng = random.Random(0)
    lengths = [rng.randint(1, 2000) for _ in range(300)]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(300))  # every prompt exactly once
    for g in groups:
        padded = max(lengths[i] for i in g) * len(g)
        assert len(g) <= GENERATE_GROUP and sum(lengths[i] for i in g) >= 0.75 * padded
    assert length_groups([7] * 40) == [list(range(16)), list(range(16, 32)), list(range(32, 40))]


def test_a_run_trains_on_the_regenerated_dataset(clean, model_dir, tmp_path, capsys):
    """The regenerated folder is a dataset: a training run of the same target reads it (no warning) and finishes;
    the same folder under another target warns that the responses are not that target's own."""
    from jobs import train
    from jobs.config import load_config
    from jobs.data_prep import prepare_data

    out, _ = clean
    records = records_of(out)
    s = train.main(["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", "name=on-regen",
                    "--set", f"target.model={model_dir}", "--set", "target.aux_layer_ids=[0, 1, 1]",
                    "--set", f"data.path={out}", "--set", "data.max_samples=null", "--set", "data.max_length=1024",
                    "--set", "draft.vocab_size=500", "--set", "optim.max_steps=2", "--set", "data.tokenizer_workers=1"])
    assert "not this target's own" not in capsys.readouterr().err
    assert s["samples"] == len(records) and s["steps"] == 2
    assert MlflowClient(s["mlflow_uri"]).get_run(s["mlflow_run_id"]).info.status == "FINISHED"
    cfg = load_config("tiny", None, [f"data.path={out}", "data.max_samples=null", "data.max_length=1024",
                                     f"data.store_dir={tmp_path / 'store'}", "data.tokenizer_workers=1"])
    prepare_data(cfg)  # the builtin tiny target shares the tokenizer, not the weights
    err = capsys.readouterr().err
    assert f"data.path was regenerated by target {str(model_dir)!r}" in err and "not this target's own" in err
