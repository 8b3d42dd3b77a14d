"""`make demo`'s own driver path, shortened: the smollm2-sharegpt-cpu preset (real SmolLM2-135M target, its
shipped regenerated ShareGPT answers, its dtype and its end-of-training evaluation on the held-out prompts) trains a
few steps, exports, evaluates, prints the summary and leaves its MLflow run FINISHED with everything logged. The demo
once died here, after training, in the evaluation; no test ran this path."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

from mlflow.tracking import MlflowClient

from eagle3.export import load_draft
from eagle3.numerics import resolve_dtype
from jobs import train
from jobs.config import load_config


def test_demo_preset_whole_driver_path(ray_local, tmp_path, capsys):
    preset = load_config("smollm2-sharegpt-cpu")
    assert preset.eval.enabled and preset.target.dtype == "auto"  # what the shortened run below exercises
    s = train.main(["--preset", "smollm2-sharegpt-cpu", "--set", f"output_dir={tmp_path}",
                    "--set", "optim.max_steps=3", "--set", "data.max_samples=24",
                    "--set", "eval.num_prompts=2", "--set", "eval.max_new_tokens=8"])
    console = capsys.readouterr()
    assert "[aerie] done" in console.err and "eval tau" in console.out and "lossless" in console.out
    assert "eval_error" not in s, s.get("eval_error")
    assert s["steps"] == 3 and s["eval_prompts"] == 2 and 1.0 <= s["eval_tau"] <= 6.0

    client = MlflowClient(s["mlflow_uri"])
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "eval/tau" in run.data.metrics and run.data.metrics["eval/tau"] == s["eval_tau"]
    # 'auto' resolved by the target actor on this machine (bf16 only with native bf16 matmuls) and logged as such.
    assert run.data.params["target_info.dtype"] == resolve_dtype("auto", "cpu")
    assert run.data.params["target.dtype"] == "auto"
    # target.pin_cpus / trainer.pin_cpus: the target actor and the trainer each hold a core of their own.
    if len(os.sched_getaffinity(0)) >= 2:
        (target_cores,) = ast.literal_eval(run.data.tags["aerie.target_cores"])  # one actor
        trainer_cores = ast.literal_eval(run.data.tags["aerie.trainer0_cores"])
        assert len(target_cores) == 1 and len(trainer_cores) == 1 and target_cores != trainer_cores
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "draft", "plots", "eval"} <= arts
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/eval.json", str(tmp_path))).read_text())
    assert report["target_dtype"] == preset.eval.target_dtype and report["results"][0]["lossless_checked"]
    assert report["prompts"].endswith("jobs/assets/heldout-sharegpt.jsonl")  # the project's held-out prompts
    assert preset.data.path.endswith("regen-smollm2-sharegpt-1000")  # trains on the shipped regenerated answers

    draft = load_draft(s["export"])
    assert draft.config.draft_vocab_size == 8192 and draft.config.hidden_size == 576
    assert json.loads((tmp_path / "smollm2-sharegpt-cpu" / "summary.json").read_text())["run"] == "smollm2-sharegpt-cpu"
