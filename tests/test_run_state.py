"""Run state is always true: the MLflow run of a training job ends FINISHED, FAILED or KILLED whatever happens
(bad input, a worker crash, Ctrl-C, SIGTERM, kill -9), nothing half-written is trusted, and a re-run of a name
either resumes, reports "already finished", or refuses changed model settings.

The signal tests run the real CLI (`python -m jobs.train`) in a subprocess with its own local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from jobs import train
from jobs.tracking import MlflowTracker, metric_history

ROOT = Path(__file__).resolve().parents[1]


def args(tmp, name, *extra):
    return ["--preset", "tiny", "--set", f"output_dir={tmp}", "--set", f"name={name}", *extra]


def runs_of(tmp, name):
    db = tmp / name / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("aerie")
    return client.search_runs([exp.experiment_id], order_by=["attribute.start_time ASC"]) if exp else []


def test_bad_data_opens_no_run(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": "not a list"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl"):
        train.main(args(tmp_path, "bad", "--set", f"data.path={bad}", "--set", "data.on_bad_record=error"))
    assert runs_of(tmp_path, "bad") == []  # the run opens only after the inputs were validated
    assert not (tmp_path / "bad" / "config.yaml").exists()


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("state")
    return tmp, train.main(args(tmp, "done"))


def test_finished_run_artifacts_live_in_run_folder(finished_run):
    tmp, s = finished_run
    (run,) = runs_of(tmp, "done")
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp / "done" / "artifacts").as_uri()), run.info.artifact_uri
    assert list((tmp / "done" / "artifacts").glob("*/artifacts/draft/model.safetensors"))
    client = MlflowClient(s["mlflow_uri"])
    assert {"draft", "plots", "summary.json", "config.yaml"} <= {a.path for a in client.list_artifacts(s["mlflow_run_id"])}


def test_rerun_of_finished_run_reports_and_keeps_export(finished_run, capsys):
    tmp, s = finished_run
    export = Path(s["export"]) / "model.safetensors"
    before = export.stat().st_mtime_ns
    again = train.main(args(tmp, "done"))
    assert again["mlflow_run_id"] == s["mlflow_run_id"] and export.stat().st_mtime_ns == before
    assert "already finished" in capsys.readouterr().err
    (run,) = runs_of(tmp, "done")
    assert run.info.status == "FINISHED"  # not flipped back to RUNNING
    shorter = train.main(args(tmp, "done", "--set", "optim.max_steps=5"))  # a horizon it has already passed
    assert shorter["mlflow_run_id"] == s["mlflow_run_id"] and export.stat().st_mtime_ns == before


def test_rerun_with_changed_model_settings_is_refused(finished_run):
    tmp, s = finished_run
    export = Path(s["export"]) / "model.safetensors"
    before = export.read_bytes()
    with pytest.raises(ValueError) as err:
        train.main(args(tmp, "done", "--set", "ttt.length=5", "--set", "export_format=speculators"))
    assert "ttt.length 3 -> 5" in str(err.value) and "export_format 'vllm' -> 'speculators'" in str(err.value)
    assert "--fresh" in str(err.value)
    with pytest.raises(ValueError, match=r"draft\.vocab_size[\s\S]*--fresh"):
        train.main(args(tmp, "done", "--set", "draft.vocab_size=1000"))
    assert export.read_bytes() == before
    assert [r.info.status for r in runs_of(tmp, "done")] == ["FINISHED"]


def test_more_epochs_extend_a_finished_run(finished_run, capsys):
    tmp, s = finished_run
    more = train.main(args(tmp, "done", "--set", "optim.epochs=2"))  # 12 steps done, 24 asked for
    assert more["mlflow_run_id"] == s["mlflow_run_id"] and more["steps"] == 24
    tracker = MlflowTracker(s["mlflow_uri"], s["mlflow_run_id"])
    assert [step for step, _ in metric_history(tracker, "loss")] == list(range(1, 25))
    capsys.readouterr()
    again = train.main(args(tmp, "done", "--set", "optim.epochs=2"))
    assert again["steps"] == 24 and "already finished" in capsys.readouterr().err


def test_fresh_retrains_into_a_new_run(finished_run):
    tmp, s = finished_run
    new = train.main(args(tmp, "done", "--fresh", "--set", "ttt.length=2", "--set", "optim.max_steps=2"))
    runs = runs_of(tmp, "done")
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"] and new["mlflow_run_id"] == runs[1].info.run_id
    assert json.loads((Path(new["export"]) / "config.json").read_text())  # the new export is complete
    assert new["steps"] == 2


def test_worker_crash_marks_run_failed_with_error(ray_local, tmp_path):
    with pytest.raises(Exception, match="fault injection"):
        train.main(args(tmp_path, "crash", "--set", "faults.crash_worker_at_step=2", "--set", "trainer.max_failures=0"))
    (run,) = runs_of(tmp_path, "crash")
    assert run.info.status == "FAILED" and "fault injection: worker crash at step 2" in run.data.tags["error"]


def test_failed_evaluation_keeps_the_training(ray_local, tmp_path, monkeypatch):
    import jobs.eval

    def broken(*a, **k):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(jobs.eval, "eval_after_training", broken)
    s = train.main(args(tmp_path, "evalfail", "--set", "eval.enabled=true", "--set", "optim.max_steps=2"))
    assert s["eval_error"] == "RuntimeError: decoder exploded"
    (run,) = runs_of(tmp_path, "evalfail")
    assert run.info.status == "FINISHED" and "decoder exploded" in run.data.tags["eval.failed"]
    client = MlflowClient(s["mlflow_uri"])
    assert {"draft", "plots", "summary.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert json.loads((tmp_path / "evalfail" / "summary.json").read_text())["eval_error"]


# ---------------------------------------------------------------------------------------------------------------
# Signals: the real CLI in a subprocess


def start_cli(tmp, name, *extra):
    env = {**os.environ, "RAY_ADDRESS": "", "AERIE_CACHE": os.environ.get("AERIE_CACHE", str(Path.home() / ".cache" / "aerie"))}
    cmd = [sys.executable, "-m", "jobs.train", *args(tmp, name, "--set", "optim.epochs=3", *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_step(tmp, name, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        runs = runs_of(tmp, name)
        if runs:
            hist = MlflowClient(f"sqlite:///{tmp / name / 'mlflow.db'}").get_metric_history(runs[-1].info.run_id, "loss")
            if hist and max(m.step for m in hist) >= step:
                return
        time.sleep(0.5)
    raise TimeoutError(f"run {name} did not reach step {step}")


def latest_complete_step(tmp, name) -> int:
    """Step of the newest complete checkpoint in the run's storage: the resume point. (Ray's registration snapshot
    can lag behind the last checkpoint it finished copying when the driver is interrupted; the run resumes from the
    newest complete one either way, see jobs.train.scan_checkpoints.)"""
    from eagle3.checkpoint import verify_train_state
    from jobs.train_loop import checkpoint_step

    steps = []
    for d in (p for p in (tmp / name / "ray" / name).glob("checkpoint_*") if p.is_dir()):
        try:
            verify_train_state(d)
            steps.append(checkpoint_step(d))
        except (OSError, ValueError):
            pass
    assert steps, "no complete checkpoint"
    return max(steps)


def resume_and_check(tmp, name, resume_step):
    """Re-running the same command resumes from the last registered checkpoint and finishes every step once."""
    t0 = time.time() * 1000
    proc = start_cli(tmp, name)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    (run,) = runs_of(tmp, name)
    assert run.info.status == "FINISHED"
    tracker = MlflowTracker(f"sqlite:///{tmp / name / 'mlflow.db'}", run.info.run_id)
    hist = tracker.client.get_metric_history(run.info.run_id, "loss")
    resumed = sorted(m.step for m in hist if m.timestamp >= t0)
    assert resumed[0] == resume_step + 1, (resumed, resume_step)  # the resume point: last registered checkpoint
    assert resume_step % 3 == 0 and resume_step >= 6  # checkpoint_every=3, and the kill came after step 7
    assert [s for s, _ in metric_history(tracker, "loss")] == list(range(1, 37))  # 12 batches x 3 epochs, one worker
    assert run.data.metrics["samples_trained"] == 3 * 48  # every sample once per epoch, 3 epochs


def test_ctrl_c_marks_killed_and_the_same_command_resumes(tmp_path):
    proc = start_cli(tmp_path, "sigint", "--set", "trainer.checkpoint_every=3")
    wait_for_step(tmp_path, "sigint", 7, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "[aerie train] interrupted" in out, out[-3000:]
    # No traceback from the driver (Ray's own processes may forward theirs, prefixed with their pid)
    assert not [ln for ln in out.splitlines() if "Traceback" in ln and "pid=" not in ln], out[-3000:]
    (run,) = runs_of(tmp_path, "sigint")
    assert run.info.status == "KILLED"
    resume_and_check(tmp_path, "sigint", latest_complete_step(tmp_path, "sigint"))


def test_kill_9_marks_killed_stops_ray_and_the_same_command_resumes(tmp_path):
    proc = start_cli(tmp_path, "sigkill", "--set", "trainer.checkpoint_every=3")
    wait_for_step(tmp_path, "sigkill", 7, proc)
    driver = psutil.Process(proc.pid)
    spawned = [p for p in driver.children(recursive=True) if "jobs.watchdog" not in " ".join(p.cmdline())]
    assert spawned  # Ray's head processes and workers
    proc.send_signal(signal.SIGKILL)  # nothing in-process runs: the watchdog must close the run and stop Ray
    proc.wait(timeout=30)
    t0 = time.time()
    while time.time() - t0 < 60:
        runs = runs_of(tmp_path, "sigkill")
        alive = [p for p in spawned if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if runs[0].info.status == "KILLED" and not alive:
            break
        time.sleep(1)
    assert runs[0].info.status == "KILLED" and "died without closing the run" in runs[0].data.tags["error"]
    assert not alive, [p.cmdline()[:2] for p in alive]
    resume_and_check(tmp_path, "sigkill", latest_complete_step(tmp_path, "sigkill"))


# ---------------------------------------------------------------------------------------------------------------
# Torn and unregistered checkpoints (no Ray: the folder layout Ray Train 2.60 writes)


def test_torn_checkpoints_are_removed_and_an_unregistered_complete_one_is_adopted(tmp_path):
    import shutil

    from jobs.config import load_config
    from tests.test_bad_files import cut, small_draft
    import torch

    from eagle3.checkpoint import save_train_state

    cfg = load_config("tiny", overrides=[f"output_dir={tmp_path}", "name=torn"])
    root = cfg.run_dir / "ray" / "torn"
    draft = small_draft()
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    for step in (2, 4, 8, 12):  # 2: adopted by an earlier resume, now older than Ray's newest registered one
        save_train_state(root / f"checkpoint_{step:02d}", draft, opt, sched, {"step": step, "counters": {}})
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_04"}]}  # only step 4 registered
    (root / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    cut(root / "checkpoint_12" / "optim.safetensors", 0.5)  # a full disk during Ray's copy
    assert train.scan_checkpoints(cfg) == str(root / "checkpoint_08")  # complete, newer than the registered one
    assert sorted(p.name for p in root.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_04", "checkpoint_08"]

    shutil.rmtree(root / "checkpoint_08")
    assert train.scan_checkpoints(cfg) is None  # the registered one is the newest: Ray resumes from it
    cut(root / "checkpoint_04" / "draft.safetensors", 0.5)  # a registered one damaged afterwards: say so, loudly
    with pytest.raises(ValueError, match=r"checkpoint_04/draft.safetensors is truncated .* registered .* --fresh"):
        train.scan_checkpoints(cfg)


def test_cli_errors_are_one_line_with_the_traceback_kept(tmp_path, monkeypatch, capsys):
    import jobs.cli
    from jobs.cli import run_cli
    from jobs.config import ConfigError

    monkeypatch.setenv("AERIE_CACHE", str(tmp_path))
    # run_cli ends the process's Ray before printing; here that would be the test session's shared cluster
    monkeypatch.setattr(jobs.cli, "_flush_ray_logs", lambda: None)

    def worker_failure(argv):
        raise RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent "
                           "call last):\n  File \"x.py\", line 1\nValueError: data.path x.jsonl: line 3 is bad\n")

    with pytest.raises(SystemExit) as exit_:
        run_cli(worker_failure, [], prog="aerie train")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 2, err
    assert err[0] == ("[aerie train] error: Training failed due to worker errors: ValueError: data.path x.jsonl: "
                      "line 3 is bad")
    log = Path(err[1].split("traceback: ")[1].split(" (")[0])
    assert log.parent == tmp_path / "logs" and "Traceback" in log.read_text() and "worker_failure" in log.read_text()

    with pytest.raises(SystemExit):
        run_cli(worker_failure, ["--traceback"], prog="aerie train")  # the flag is taken off argv
    assert "Traceback (most recent call last)" in capsys.readouterr().err

    def bad_config(argv):
        raise ConfigError("invalid config:\n  optim.lr=-1: should be greater than 0")

    with pytest.raises(SystemExit):
        run_cli(bad_config, [])
    assert capsys.readouterr().err == "[aerie] error: invalid config:\n  optim.lr=-1: should be greater than 0\n"

    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        run_cli(interrupted, [], prog="aerie train")
    assert exit_.value.code == 130 and "marked KILLED" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(interrupted, [], prog="aerie eval")  # no checkpoints to resume from there
    assert capsys.readouterr().err.strip() == "[aerie eval] interrupted."
