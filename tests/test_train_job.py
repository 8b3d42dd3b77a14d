"""The tiny preset end to end through target actors + Ray Train + MLflow; resume after a worker crash and after
resubmitting the same run name; a target actor killed mid-run. Queried through the MLflow client."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from eagle3.export import load_draft
from eagle3.sources import SourceError
from jobs import train
from jobs.config import load_config
from jobs.tracking import MlflowTracker, metric_history

STEPS = 12


def run(tmp, name, *extra):
    return train.main(["--preset", "tiny", "--set", f"output_dir={tmp}", "--set", f"name={name}",
                       "--set", "trainer.num_workers=2", "--set", "optim.epochs=2", *extra])


@pytest.fixture(scope="module")
def reference_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return tmp, run(tmp, "ref", "--set", "tracking.register_model=aerie-tiny-draft")


def losses(summary):
    tracker = MlflowTracker(summary["mlflow_uri"], summary["mlflow_run_id"])
    return dict(metric_history(tracker, "loss"))


def test_tiny_preset_end_to_end(reference_run):
    tmp, s = reference_run
    client = MlflowClient(s["mlflow_uri"])
    r = client.get_run(s["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == "ref"
    p = r.data.params
    assert p["ttt.length"] == "3" and p["target_info.model_id"] == "builtin:tiny-llama"
    assert p["target_info.aux_layer_ids"] == "[2, 3, 3]" and p["trainer.num_workers"] == "2"
    for key in ["loss", "loss_0", "loss_2", "acc_0", "acc_2", "sim_accept_len", "lr", "grad_norm", "tokens_per_s",
                "target_wait_frac", "wire_bytes_per_token", "time_step_s", "time_learner_s", "time_trim_s",
                "time_log_s", "trainer_rss_mib"]:
        hist = client.get_metric_history(r.info.run_id, key)
        assert sorted(m.step for m in hist) == list(range(1, STEPS + 1)), key
    # Each sample exactly once per epoch across both workers: 48 samples in 12 batches of 4, 2 workers → 6 steps
    # per epoch, 2 epochs → 12 steps and 96 samples.
    cfg = load_config("tiny")
    assert r.data.metrics["samples_trained"] == 2 * s["samples"]
    assert s["samples"] == cfg.data.max_samples
    # bf16 wire floor: 8h bytes per real token (h = 64); padding tokens make the measured value higher.
    assert r.data.metrics["wire_bytes_per_token"] >= 8 * 64
    # The step's time split: the parts are measured inside the step's wall time, and a live process has pages.
    m = {k: sorted(client.get_metric_history(r.info.run_id, k), key=lambda x: x.step)
         for k in ["time_step_s", "time_learner_s", "time_trim_s"]}
    for st, le, tr in zip(*m.values()):
        assert st.step == le.step == tr.step and 0 < le.value and 0 <= tr.value <= st.value - le.value, (st, le, tr)
    assert r.data.metrics["trainer_rss_mib"] > 50
    assert any(k.startswith("system/") for k in r.data.metrics), sorted(r.data.metrics)  # CPU/memory of trainer
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "summary.json", "draft", "plots"} <= arts
    assert {a.path for a in client.list_artifacts(r.info.run_id, "draft")} >= {"draft/config.json",
                                                                              "draft/model.safetensors"}
    # Registered as a model version whose source is the logged draft folder.
    (mv,) = client.search_model_versions("name='aerie-tiny-draft'")
    assert mv.run_id == r.info.run_id and s["registered_model_version"] == mv.version
    # The export loads back and matches the target-implied config.
    draft = load_draft(s["export"])
    assert draft.config.aux_layer_ids == (2, 3, 3) and draft.config.draft_vocab_size == 2000
    assert json.loads((tmp / "ref" / "summary.json").read_text())["mlflow_run_id"] == s["mlflow_run_id"]


def test_worker_crash_resumes_exactly(reference_run):
    tmp, ref = reference_run
    s = run(tmp, "crash", "--set", "faults.crash_worker_at_step=6", "--set", "faults.kill_target_at_step=3",
            "--set", "trainer.snapshot_every=5")
    ref_l, got = losses(ref), losses(s)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # steps 5, 6 ran twice (crash after 6, checkpoint at 4): latest values
        assert got[step] == pytest.approx(ref_l[step], rel=1e-5, abs=1e-6), step
    r = MlflowClient(s["mlflow_uri"]).get_run(s["mlflow_run_id"])
    assert r.data.metrics["samples_trained"] == 2 * s["samples"]  # exactly once per epoch despite the crash
    a = load_draft(ref["export"]).state_dict()
    b = load_draft(s["export"]).state_dict()
    for k in a:
        if not k.startswith("embed_tokens"):  # not exported: the target's, loaded by the engine
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    check_snapshots(tmp / "crash", s)


def check_snapshots(run_dir, s):
    """trainer.snapshot_every=5 over 12 steps (step 5 trained twice: crash at 6, resume from 4): steps 5, 10 and the
    last; the last equals the export bit for bit, progress counts what the run's summary and MLflow report."""
    snaps = sorted(p.name for p in (run_dir / "snapshots").iterdir())
    assert snaps == ["step-0000005", "step-0000010", "step-0000012"]
    last = run_dir / "snapshots" / "step-0000012"
    a, b = load_draft(s["export"]).state_dict(), load_draft(last).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("embed_tokens"):  # not exported (the target's): random on load
            assert torch.equal(a[k], b[k]), k
    prog = [json.loads((run_dir / "snapshots" / n / "progress.json").read_text()) for n in snaps]
    assert [p["step"] for p in prog] == [5, 10, 12]
    assert prog[-1]["trained_tokens"] == s["trained_tokens"] and prog[-1]["samples_trained"] == 2 * s["samples"]
    tokens = dict(metric_history(MlflowTracker(s["mlflow_uri"], s["mlflow_run_id"]), "trained_tokens"))
    assert [p["trained_tokens"] for p in prog] == [tokens[5], tokens[10], tokens[12]]
    assert 0 < prog[0]["train_seconds"] < prog[1]["train_seconds"] < prog[2]["train_seconds"]


def test_resubmitting_same_run_name_resumes(reference_run):
    tmp, ref = reference_run
    with pytest.raises(Exception, match="fault injection: worker crash at step 6"):
        run(tmp, "again", "--set", "faults.crash_worker_at_step=6", "--set", "trainer.max_failures=0")
    s = run(tmp, "again")  # same name: Ray Train restores the step-4 checkpoint, MLflow reuses the run
    assert s["mlflow_run_id"] == losses_run_id(tmp, "again")
    got, ref_l = losses(s), losses(ref)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(ref_l[step], rel=1e-5, abs=1e-6), step


def losses_run_id(tmp, name):
    client = MlflowClient(f"sqlite:///{tmp / name / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aerie")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0].info.run_id


def test_unreachable_mlflow_fails_fast(tmp_path):
    import time

    t0 = time.time()
    with pytest.raises(ConnectionError, match="MLflow tracking URI 'http://127.0.0.1:9' is unreachable"):
        train.main(["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", "tracking.uri=http://127.0.0.1:9"])
    assert time.time() - t0 < 60


def test_bad_inputs_fail_before_training(tmp_path):
    with pytest.raises(SourceError, match="data.path=.*x.jsonl' does not exist"):
        train.main(["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", f"data.path={tmp_path}/x.jsonl"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="gave no trainable samples"):
        train.main(["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", f"data.path={empty}"])
    with pytest.raises(FileNotFoundError, match="target model .* not found"):
        train.main(["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", f"target.model={tmp_path}/m"])
    with pytest.raises(ValueError, match="larger than the target vocab_size"):
        train.main(["--preset", "tiny", "--set", f"output_dir={tmp_path}", "--set", "draft.vocab_size=100000"])
