"""Train an EAGLE-3 draft against a live target: `python -m jobs.train --preset tiny` (also `aerie train`).

The whole topology is `main`: config → MLflow run → data + vocab → Ray → target actors placed → Ray Train
workers fit the draft while streaming target features → export → summary. Runs unchanged under `ray job submit`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from jobs.config import JobConfig, flatten, load_config, to_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aerie train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="named run: tiny | smollm2-sharegpt-cpu | llama3-8b-8gpu")
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--address", default=None,
                   help="Ray address; default: $RAY_ADDRESS (set by `ray job submit`), else a new local Ray")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.preset, args.config, args.overrides)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[aerie] run {cfg.name!r} in {cfg.run_dir}", flush=True)

    import ray

    from jobs.data_prep import prepare_data
    from jobs.targets import start_target_actors
    from jobs.tracking import log_files, open_run, plot_ttt_curves

    tracker = open_run(cfg.tracking_uri(), cfg.tracking.experiment, cfg.name)  # fails fast if unreachable
    data = prepare_data(cfg)  # tokenize, batch, vocab map (cached) on the driver
    print(f"[aerie] data: {data.stats.summary()}; {len(data.batches)} batches", flush=True)

    if not ray.is_initialized():
        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)
    group = start_target_actors(cfg.target)
    try:
        result, wall, draft_cfg = fit(cfg, group, data, tracker)
    finally:
        group.shutdown()

    export_dir = export_from_checkpoint(cfg, draft_cfg, data, result.checkpoint)
    final = final_metrics(tracker, cfg)
    summary = {
        "run": cfg.name, "wall_seconds": round(wall, 1), "export": str(export_dir), "mlflow_uri": cfg.tracking_uri(),
        "mlflow_run_id": tracker.run_id, "samples": data.stats.kept, "batches": len(data.batches), **final,
    }
    if cfg.eval.enabled:  # real speculative decoding of held-back prompts (records after those trained on)
        from jobs.eval import eval_after_training

        summary.update(eval_after_training(cfg, export_dir, data.stats.records_seen, tracker))
    plot = plot_ttt_curves(tracker, cfg.ttt.length, cfg.run_dir / "ttt_curves.png")
    tracker.log_artifacts(plot.parent / "export", "draft")
    log_files(tracker, {"summary.json": json.dumps(summary, indent=2)})
    tracker.client.log_artifact(tracker.run_id, str(plot), "plots")
    if cfg.tracking.register_model:
        summary["registered_model_version"] = tracker.register_draft(cfg.tracking.register_model)
    tracker.client.set_terminated(tracker.run_id)
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, cfg)
    return summary


def fit(cfg: JobConfig, group, data, tracker):
    """Check the target against the draft, log params, and run the Ray Train workers. Returns (result, s, cfg)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.tracking import log_files
    from jobs.train_loop import draft_config_for, train_loop_per_worker

    targets, info = group.actors, group.info
    draft_cfg = draft_config_for(info, cfg.draft.vocab_size)  # loud on any target/draft mismatch
    if data.vocab_size != info.vocab_size:
        raise ValueError(f"tokenizer has {data.vocab_size} tokens but the target reports {info.vocab_size}")
    tracker.log_params({**flatten(to_dict(cfg)), **flatten(info.as_params(), "target_info."),
                        "data.batches": len(data.batches), "data.samples": data.stats.kept,
                        "draft.vocab_coverage": data.vocab.coverage})
    log_files(tracker, {"config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False)})

    t = cfg.trainer
    worker_resources = {"CPU": t.cpus_per_worker, **(t.resources or {})}
    if t.use_gpu:
        worker_resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": to_dict(cfg), "targets": targets, "info": info, "vocab": data.vocab,
            "batches": ray.put(data.batches), "mlflow_uri": cfg.tracking_uri(), "mlflow_run_id": tracker.run_id,
        },
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=worker_resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=str(cfg.run_dir / "ray"),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0

    return result, wall, draft_cfg


def export_from_checkpoint(cfg: JobConfig, draft_cfg, data, checkpoint) -> Path:
    """Load the final training checkpoint and export the draft (atomic) to <run_dir>/export."""
    from safetensors.torch import load_file

    from eagle3.export import save_draft
    from eagle3.model import Eagle3Draft

    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; nothing to export")
    draft = Eagle3Draft(draft_cfg)
    with checkpoint.as_directory() as d:
        draft.load_state_dict(load_file(str(Path(d) / "draft.safetensors")), strict=False)
    verifier = None
    if cfg.export_format == "speculators":
        from actors.models import resolve_model

        verifier = resolve_model(cfg.target.model)
    return save_draft(draft, cfg.run_dir / "export", fmt=cfg.export_format, verifier=verifier,
                      num_speculative_tokens=cfg.ttt.length)


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
           f"speed-up {s['eval_speedup']:.2f}x)"] if "eval_tau" in s else []),
        f"  export         {s['export']}",
        f"  MLflow         mlflow ui --backend-store-uri {s['mlflow_uri']}   (run {s['mlflow_run_id']})",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
