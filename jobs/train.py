"""Train an EAGLE-3 draft against a live target: `python -m jobs.train --preset tiny` (also `aerie train`).

The whole topology is `main`: config → MLflow run → data + vocab → Ray → target actors placed → Ray Train
workers fit the draft while streaming target features → export → summary. Runs unchanged under `ray job submit`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import yaml

from jobs.config import PRESETS, JobConfig, flatten, load_config, model_settings_diff, to_dict
from jobs.tracking import brief_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aerie train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="named run: " + " | ".join(PRESETS))
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--address", default=None,
                   help="Ray address; default: $RAY_ADDRESS (set by `ray job submit`), else a new local Ray")
    p.add_argument("--fresh", action="store_true",
                   help="discard this run name's checkpoints, export and summary and train from scratch "
                        "(a new MLflow run; the old one stays in the store)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.preset, args.config, args.overrides)
    with run_dir_lock(cfg):  # one driver per run name
        state = check_rerun(cfg, fresh=args.fresh)  # before anything is written or opened
        if state.finished is not None:
            print(f"[aerie] run {cfg.name!r} already finished with these settings; its export is untouched "
                  f"(--fresh trains it again)", file=sys.stderr, flush=True)
            print_summary(state.finished, cfg)
            return state.finished

        import ray

        from actors.models import resolve_model
        from eagle3.sources import resolve_parts
        from jobs.data_prep import prepare_data
        from jobs.targets import check_placeable, start_target_actors, target_bundles
        from jobs.tracking import check_store, close_run, open_run
        from jobs.watchdog import Watchdog, local_ray_pids

        check_store(cfg.tracking_uri())  # unreachable tracking fails in seconds, before tokenization
        # A data path that names nothing, or a missing target, fails before Ray starts.
        resolve_parts(cfg.data.path, cfg.data.split)
        resolve_model(cfg.target.model)
        # Started before Ray: if this driver is SIGKILLed, the guard stops the Ray processes it started (and, once
        # the MLflow run is open, marks it KILLED).
        watchdog = Watchdog(cfg.tracking_uri())
        started_ray, tracker = False, None
        try:
            with sigterm_as_interrupt():
                started_ray = not ray.is_initialized()
                if started_ray:
                    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
                watchdog.watch_pids(local_ray_pids())
                check_tracking_from_trainer_nodes(cfg)  # rank 0 logs from its own node, not the driver's
                # A request no node can ever hold fails now, naming the resource, not after a placement timeout.
                workers = [worker_bundle(cfg)] * cfg.trainer.num_workers
                check_placeable(target_bundles(cfg.target), "target actors (target.num_actors, gpus_per_actor, "
                                                            "cpus_per_actor, resources)")
                check_placeable(workers, "train workers (trainer.num_workers, use_gpu, cpus_per_worker, resources)")
                check_placeable(target_bundles(cfg.target) + workers, "target actors and train workers together "
                                                                      "(they run at the same time)")
                # Ray Data tokenizes into the token store (cached); bad data fails here, before the run opens.
                data = prepare_data(cfg)
                print(f"[aerie] run {cfg.name!r} in {cfg.run_dir}; data: {data.stats.summary()}; "
                      f"{len(data.batches)} batches", flush=True)
                # Inputs are valid: from here on the run is open, and every way out closes it with its true state.
                tracker = open_run(cfg.tracking_uri(), cfg.tracking.experiment, cfg.name, run_id=state.mlflow_run_id,
                                   fresh=True)  # a run folder resumes its own MLflow run, by id; else a new one
                watchdog.set_run(tracker.run_id)
                atomic_write(cfg.run_dir / RUN_ID_FILE, tracker.run_id)
                write_run_config(cfg)
                if state.extends:
                    (cfg.run_dir / "summary.json").unlink(missing_ok=True)  # unfinished until the longer run ends
                group = start_target_actors(cfg.target)
                try:
                    result, wall, draft_cfg = fit(cfg, group, data, tracker)
                finally:
                    group.shutdown()
                export_dir = export_from_checkpoint(cfg, draft_cfg, data, result.checkpoint)
                summary = finish_run(cfg, tracker, data, export_dir, wall)
                close_run(tracker, "FINISHED")
        except BaseException as err:
            if tracker is None:  # failed before the run opened: nothing to close
                watchdog.done()
                if started_ray:
                    ray.shutdown()
                raise
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            try:
                close_run(tracker, status, err)
            except Exception as close_err:  # noqa: BLE001 - keep the real error; the watchdog retries the close
                print(f"[aerie] could not mark the MLflow run {status} ({close_err}); the watchdog will retry",
                      file=sys.stderr, flush=True)
            else:
                watchdog.done()
            raise
        watchdog.done()
        # Written last, once MLflow says FINISHED: a run folder with a summary is a finished run.
        atomic_write(cfg.run_dir / "summary.json", json.dumps(summary, indent=2))
        if started_ray:
            ray.shutdown()  # flushes the workers' forwarded logs, so the summary is the last thing printed
        print_summary(summary, cfg)
        return summary


def check_tracking_from_trainer_nodes(cfg: JobConfig, timeout_s: float = 120, skip_driver_node: bool = True) -> None:
    """Probe the tracking store from every other node that can host a train worker, before any work starts.

    The driver already reached it (check_store); a URI that only the driver's node can reach (an embedded sqlite
    file, a server on the driver's loopback, a firewall) would otherwise fail on rank 0 after the targets loaded,
    or worse, write to a different store."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from jobs.tracking import probe_store

    need = worker_bundle(cfg)
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n["Alive"] and not (skip_driver_node and n["NodeID"] == here)
             and all(n["Resources"].get(k, 0) >= v for k, v in need.items() if v)]
    if not nodes:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_store)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        cfg.tracking_uri()) for n in nodes]
    try:
        answers = ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        raise ConnectionError(f"MLflow tracking URI {cfg.tracking_uri()!r}: no answer from the trainer nodes within "
                              f"{timeout_s:.0f}s") from err
    bad = [(n, why) for n, why in zip(nodes, answers) if why]
    if bad:
        where = "; ".join(f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]}): {why}" for n, why in bad)
        raise ConnectionError(
            f"MLflow tracking URI {cfg.tracking_uri()!r} answers on the driver but not on {len(bad)} of {len(nodes)} "
            f"trainer node(s): {where}. Rank 0 logs from its own node: use a tracking server that every node reaches "
            f"(export MLFLOW_TRACKING_URI=http://<head-private-ip>:5000 on every node, or --set tracking.uri=...; "
            f"see cluster/README.md)")


def finish_run(cfg: JobConfig, tracker, data, export_dir: Path, wall: float) -> dict:
    """Evaluation (optional), artifacts, registration and summary.json of a trained run. A failed evaluation is
    reported in the summary and the run's tags; it never discards the training."""
    from jobs.tracking import log_files, plot_ttt_curves

    summary = {
        "run": cfg.name, "wall_seconds": round(wall, 1), "export": str(export_dir), "mlflow_uri": cfg.tracking_uri(),
        "mlflow_run_id": tracker.run_id, "samples": data.stats.kept, "batches": len(data.batches),
        **final_metrics(tracker, cfg),
    }
    tracker.log_artifacts(export_dir, "draft")  # first: the draft is safe in MLflow whatever the evaluation does
    plot = plot_ttt_curves(tracker, cfg.ttt.length, cfg.run_dir / "ttt_curves.png")
    tracker.client.log_artifact(tracker.run_id, str(plot), "plots")
    if cfg.tracking.register_model:
        summary["registered_model_version"] = tracker.register_draft(cfg.tracking.register_model)
    if cfg.eval.enabled:  # real speculative decoding of held-back prompts (records after those trained on)
        from jobs.eval import eval_after_training

        try:
            summary.update(eval_after_training(cfg, export_dir, data.stats.records_seen, tracker))
        except Exception as err:  # noqa: BLE001 - the training is done and logged; say what failed and go on
            summary["eval_error"] = f"{type(err).__name__}: {err}"
            tracker.set_tags({"eval.failed": summary["eval_error"][:4900]})
            print(f"[aerie] evaluation failed (training and export are kept): {summary['eval_error']}",
                  file=sys.stderr, flush=True)
    log_files(tracker, {"summary.json": json.dumps(summary, indent=2)})
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Run folder state: what a re-run of the same name finds


HORIZON = ("optim.epochs", "optim.max_steps", "optim.max_target_tokens")  # where a run stops: changing it extends
RUN_ID_FILE = "mlflow_run_id"  # in the run folder: the MLflow run this folder's training logs into


@dataclass
class RunState:
    """What a run name already holds (see check_rerun)."""

    finished: dict | None = None  # the summary of a finished run that asks for nothing more
    mlflow_run_id: str | None = None  # resume this MLflow run; None: open a new one
    extends: bool = False  # a finished run asked to go further: its summary.json goes once the run is open


def write_run_config(cfg: JobConfig) -> None:
    """<run_dir>/config.yaml: the run's settings (a re-run is compared against them; check_rerun has made sure that
    only settings outside the model's, such as HORIZON, can differ from those of its checkpoints)."""
    atomic_write(cfg.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def run_storage(cfg: JobConfig):
    """(pyarrow filesystem, path) of this run's Ray Train folder, <storage>/<name> (see trainer.storage)."""
    uri = cfg.storage_path()
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - pyarrow says ArrowInvalid or OSError (libhdfs, libjvm missing)
        raise ValueError(
            f"trainer.storage={uri!r}: its filesystem is not available here ({brief_error(err)}). Use a folder "
            f"every node mounts, or a URI whose filesystem pyarrow supports here (s3://, gs://, abfs://; hdfs:// "
            f"needs Java and libhdfs)") from err
    return fs, f"{path.rstrip('/')}/{cfg.name}"


def has_checkpoints(cfg: JobConfig) -> bool:
    fs, root = run_storage(cfg)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except Exception as err:  # noqa: BLE001 - credentials, permissions, network
        raise ConnectionError(f"trainer.storage={cfg.storage_path()!r} cannot be listed ({brief_error(err)}); check "
                              f"its credentials and permissions") from err
    return any(i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in infos)


def check_rerun(cfg: JobConfig, fresh: bool) -> RunState:
    """What a run name already holds decides what this invocation does.

    - nothing there, or nothing trained yet (no checkpoint), or `fresh` (its checkpoints, export and summary are
      removed first; MLflow keeps the old runs and their artifacts): train, into a new MLflow run;
    - checkpoints made with settings that change the model or its export: refuse, naming them (mixing them would
      corrupt the checkpoint or the export), or without a record of their settings: refuse;
    - finished with the same model settings, and a HORIZON it has already reached: its summary (nothing to do,
      export untouched);
    - finished but asked to go further (more epochs or steps), or unfinished (crashed, killed): train on from the
      newest complete checkpoint, into the same MLflow run."""
    run_dir = cfg.run_dir
    if fresh:
        fs, root = run_storage(cfg)
        if fs.get_file_info(root).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(root)
        shutil.rmtree(run_dir / "export", ignore_errors=True)
        for name in ("summary.json", "config.yaml", RUN_ID_FILE, "ttt_curves.png", "eval.json", ".crashed-once"):
            (run_dir / name).unlink(missing_ok=True)
        return RunState()
    saved = run_dir / "config.yaml"
    if not has_checkpoints(cfg):
        return RunState()  # a run that died before its first checkpoint: start over, settings may change
    if not saved.exists():
        raise ValueError(f"run {cfg.name!r} in {run_dir} has checkpoints but no config.yaml recording their "
                         f"settings (made by an older Aerie?); pass --fresh to train it again, or choose another name")
    try:
        old = yaml.safe_load(saved.read_text())
        was, now = flatten(old), flatten(to_dict(cfg))
        diff = [f"{k} {was.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in model_settings_diff(old, to_dict(cfg))]
    except Exception as err:  # noqa: BLE001 - unreadable: don't guess
        raise ValueError(f"run {cfg.name!r}: {saved} cannot be read ({err}); pass --fresh to start the run over, "
                         f"or choose another name") from err
    if diff:
        raise ValueError(
            f"run {cfg.name!r} in {run_dir} was started with other model settings: {'; '.join(diff)}. Continuing "
            f"would mix them in one checkpoint/export. Choose another --set name=..., or pass --fresh to discard "
            f"that run's checkpoints and export and train again")
    run_id_file = run_dir / RUN_ID_FILE
    state = RunState(mlflow_run_id=run_id_file.read_text().strip() if run_id_file.exists() else None)
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if all(was.get(k) == now.get(k) for k in HORIZON) or not goes_further(cfg, summary):
            return RunState(finished=summary)
        state.extends = True
    return state


def goes_further(cfg: JobConfig, summary: dict) -> bool:
    """Whether `cfg`'s horizon asks a finished run for more steps than it trained (a shorter one asks nothing)."""
    if cfg.optim.max_target_tokens and summary.get("target_tokens", 0) >= cfg.optim.max_target_tokens:
        return False
    return planned_steps(cfg, summary["batches"]) > summary.get("steps", 0)


@contextlib.contextmanager
def run_dir_lock(cfg: JobConfig):
    """An exclusive lock on the run folder while this driver uses it: a second driver for the same name (a
    resubmitted job, a `--fresh` while it runs) would share its checkpoints and MLflow run."""
    import fcntl

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.run_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RuntimeError(f"run {cfg.name!r} in {cfg.run_dir} is in progress ({holder}); wait for it, stop it, "
                               f"or choose another --set name=...") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}")
        lock.flush()
        yield


def scan_checkpoints(cfg: JobConfig) -> str | None:
    """Tidy the run's Ray Train checkpoint folder before training resumes from it.

    Ray copies a checkpoint into its final folder and registers it afterwards. A full disk or a kill during the copy
    leaves a torn folder, which is removed here, so nothing can ever resume from it. A complete folder whose
    registration was cut short (Ctrl-C right after the copy) is newer than Ray's latest registered checkpoint:
    its path is returned, and the workers resume from whichever of the two is newer."""
    from eagle3.checkpoint import verify_train_state
    from jobs.train_loop import checkpoint_step

    fs, path = run_storage(cfg)
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        return None  # object stores: Ray Train uploads a checkpoint before it registers it; nothing local to tidy
    root = Path(path)
    if not root.is_dir():
        return None
    fresh = "pass --fresh to train the run again (or restore the file from a copy)"
    registered = set()
    snapshot = root / "checkpoint_manager_snapshot.json"
    if snapshot.exists():
        try:
            snap = json.loads(snapshot.read_text())
            registered = {r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"Ray Train's checkpoint record {snapshot} cannot be read ({err}); {fresh}") from err
    steps = {}
    for d in sorted(p for p in root.glob("checkpoint_*") if p.is_dir()):  # not the snapshot file
        try:
            verify_train_state(d)
        except (OSError, ValueError) as err:
            if d.name not in registered:
                print(f"[aerie] removing torn checkpoint {d} ({str(err)[:120]})", file=sys.stderr, flush=True)
                shutil.rmtree(d, ignore_errors=True)
                continue
            # Ray would resume from it, and deleting it by hand leaves Ray's record pointing at nothing.
            raise ValueError(f"{err}. It is a registered checkpoint of run {cfg.name!r}: {fresh}") from err
        steps[d.name] = checkpoint_step(d)
    newest_registered = max((steps[n] for n in registered if n in steps), default=-1)
    adopt, adopt_step = None, newest_registered
    for name, step in steps.items():
        if name in registered:
            continue
        if step > adopt_step:
            adopt, adopt_step = str(root / name), step
        elif step <= newest_registered:  # an adopted one that Ray's own bookkeeping never deletes
            shutil.rmtree(root / name, ignore_errors=True)
    if adopt:
        print(f"[aerie] resuming from {adopt} (step {adopt_step}; complete, its registration was interrupted)",
              file=sys.stderr, flush=True)
    return adopt


def atomic_write(path: Path, text: str) -> None:
    """Write a small text file through a temp file and a rename: readers see the old or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (`ray job stop`, `kill`, a scheduler) unwinds like Ctrl-C, so the run is closed as KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(cfg: JobConfig, group, data, tracker):
    """Check the target against the draft, log params, and run the Ray Train workers. Returns (result, s, cfg)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from jobs.tracking import log_files
    from jobs.train_loop import draft_config_for, train_loop_per_worker

    InterruptibleTorchTrainer = _interruptible_trainer()

    targets, info = group.actors, group.info
    draft_cfg = draft_config_for(info, cfg.draft.vocab_size)  # loud on any target/draft mismatch
    if data.vocab_size != info.vocab_size:
        raise ValueError(f"tokenizer has {data.vocab_size} tokens but the target reports {info.vocab_size}")
    tracker.log_params({**flatten(to_dict(cfg)), **flatten(info.as_params(), "target_info."),
                        "data.batches": len(data.batches), "data.samples": data.stats.kept,
                        "draft.vocab_coverage": data.vocab.coverage,
                        **({"data.store": str(data.store.folder),
                            "data.store_bytes_per_token": round(data.store.manifest["bytes_per_token"], 3)}
                           if data.store is not None else {})})
    log_files(tracker, {"config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False)})
    if cfg.target.pin_cpus and cfg.target.backend == "hf":
        pinned = ray.get([a.pinned_cores.remote() for a in targets])
        tracker.set_tags({"aerie.target_cores": str(pinned)})

    t = cfg.trainer
    trainer = InterruptibleTorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": to_dict(cfg), "targets": targets, "info": info, "vocab": data.vocab,
            "batches": ray.put(data.batches), "frozen_weights": frozen_weights_ref(targets[0]),
            "mlflow_uri": cfg.tracking_uri(), "mlflow_run_id": tracker.run_id,
            "adopt_checkpoint": scan_checkpoints(cfg),
        },
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=worker_bundle(cfg)),
        run_config=RunConfig(
            name=cfg.name, storage_path=cfg.storage_path(),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.time()
    previous = signal.getsignal(signal.SIGINT)
    try:
        with progress_bar(tracker, planned_steps(cfg, len(data.batches))):
            result = trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)  # Ray Train leaves its handler installed
    wall = time.time() - t0

    return result, wall, draft_cfg


def worker_bundle(cfg: JobConfig) -> dict[str, float]:
    """What each Ray Train worker reserves."""
    t = cfg.trainer
    return {"CPU": t.cpus_per_worker, **(t.resources or {}), **({"GPU": 1} if t.use_gpu else {})}


def frozen_weights_ref(target):
    """The target's frozen embeddings + lm_head (in its dtype), put once into the object store by the driver.

    Workers get this ref, not the actor: one transfer per node, and a worker that restarts after the target's node
    died still finds the weights (the driver owns this copy; an actor's return value dies with its node)."""
    import ray

    weights = ray.get(target.frozen_weights.remote())
    ref = ray.put(weights)
    del weights
    return ref


def _interruptible_trainer():
    """TorchTrainer whose Ctrl-C aborts the Ray Train controller and then raises KeyboardInterrupt in the driver.

    Ray Train's own SIGINT handler aborts the controller and then exits the process with status 1 and no
    exception, so the driver could not tell an interrupt from a failure (nor mark the MLflow run KILLED)."""
    import ray
    from ray.train.torch import TorchTrainer

    class InterruptibleTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:  # Ray Train 2.60's hook, called in fit()
            def handler(signum, frame):
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
                try:
                    ray.get(controller.abort.remote(), timeout=60)  # workers stop; registered checkpoints stay
                except Exception:  # noqa: BLE001 - the controller may already be gone
                    pass
                raise KeyboardInterrupt("Ctrl-C")

            signal.signal(signal.SIGINT, handler)

    return InterruptibleTorchTrainer


def planned_steps(cfg: JobConfig, num_batches: int) -> int:
    """Optimizer steps the workers will take (as jobs.train_loop computes them; a token budget may stop earlier)."""
    from jobs.train_loop import steps_per_epoch

    total = steps_per_epoch(num_batches, cfg.trainer.num_workers) * cfg.optim.epochs
    return min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total


@contextlib.contextmanager
def progress_bar(tracker, total: int, every_s: float = 2.0):
    """One progress bar on the driver's console, fed from the run's own MLflow metrics (what the UI shows).

    Drawn here rather than in the rank-0 worker: Ray forwards a worker's output line by line, so a worker's bar
    arrives as a new full line per refresh (and twice per step when the postfix refreshed it too)."""
    from tqdm import tqdm

    stop = threading.Event()
    bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                m = tracker.client.get_run(tracker.run_id).data.metrics
            except Exception:  # noqa: BLE001 - a busy store: try again at the next tick
                continue
            step = int(m.get("train_step", 0))
            if step > bar.n:  # one redraw per new step: the postfix rides along
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc0=f"{m.get('acc_0', 0):.2f}",
                                tau=f"{1 + m.get('sim_accept_len', 0):.2f}", refresh=False)
                bar.update(step - bar.n)

    thread = threading.Thread(target=poll, name="aerie-progress", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join(timeout=5)
        bar.close()


def export_from_checkpoint(cfg: JobConfig, draft_cfg, data, checkpoint) -> Path:
    """Load the final training checkpoint and export the draft (atomic) to <run_dir>/export."""
    from eagle3.export import load_safetensors
    from eagle3.model import Eagle3Draft
    from jobs.train_loop import export_draft

    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; nothing to export")
    draft = Eagle3Draft(draft_cfg)
    with checkpoint.as_directory() as d:
        weights = load_safetensors(Path(d) / "draft.safetensors", "the final checkpoint is damaged; re-run with --fresh")
        draft.load_state_dict(weights, strict=False)
    return export_draft(cfg, draft, cfg.run_dir / "export")


def final_metrics(tracker, cfg: JobConfig) -> dict:
    """Last logged values of the headline metrics (from MLflow, so the summary matches what the UI shows)."""
    from jobs.tracking import metric_history

    out = {}
    for key in ["loss", "sim_accept_len", "trained_tokens", "samples_trained", "stream_resent", "stream_requests",
                "target_wait_frac", "wire_bytes_per_token", "relabel_tokens_per_token", "relabel_wait_frac",
                "target_tokens", "generated_tokens",
                *[f"acc_{k}" for k in range(cfg.ttt.length)]]:
        hist = metric_history(tracker, key)
        if hist:
            out[key] = hist[-1][1]
    out["steps"] = metric_history(tracker, "loss")[-1][0] if "loss" in out else 0
    return out


def print_summary(s: dict, cfg: JobConfig) -> None:
    print("\n[aerie] done", file=sys.stderr)
    lines = [
        f"  run            {s['run']}  ({s['wall_seconds']} s, {s.get('steps', 0)} steps, "
        f"{int(s.get('trained_tokens', 0))} tokens, {int(s.get('samples_trained', 0))} samples)",
        f"  final loss     {s.get('loss', float('nan')):.4f}",
        f"  simulated tau  {1 + s.get('sim_accept_len', 0.0):.3f}  (1 + sum_k prod_j<=k acc_j)",
        f"  target resends {int(s.get('stream_resent', 0))} of {int(s.get('stream_requests', 0))} requests",
        *([f"  eval tau       {s['eval_tau']:.3f}  ({s['eval_config']}, {s['eval_prompts']} held-back prompts, "
           f"{s.get('eval_target_dtype', 'float32')} target, speed-up {s['eval_speedup']:.2f}x, lossless"
           + (f"; {s['eval_numerical_ties']} numerical tie(s))" if s.get("eval_numerical_ties") else ")")]
          if "eval_tau" in s else []),
        *([f"  eval           FAILED: {s['eval_error'][:300]}"] if "eval_error" in s else []),
        f"  export         {s['export']}",
        f"  MLflow         mlflow ui --backend-store-uri {s['mlflow_uri']}   (run {s['mlflow_run_id']})",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    from jobs.cli import run_cli

    run_cli(main, sys.argv[1:], prog="aerie train")
