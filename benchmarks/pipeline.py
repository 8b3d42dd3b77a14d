"""Pipeline benchmark: target alone, trainer alone (features pre-computed in memory), and online through Ray.

    python benchmarks/pipeline.py --preset smollm2-sharegpt-cpu --steps 30
    python benchmarks/pipeline.py --preset tiny --steps 20
    python benchmarks/pipeline.py --steps 30 --set ttt.token_feedback=draft --set ttt.branch_fraction=0.25

With token feedback ('draft'/'target') the target side also answers the relabels (extra target tokens per trained
token are reported) and the trainer side also plans the branches (samples the draft's tokens).

Reports tokens/s of each side alone (each pinned to its own core with one torch thread), online tokens/s of the
real job (1 target actor + 1 trainer, one thread each), pipeline efficiency = online ÷ min(alone), wire bytes per
token against the 8h bf16 floor, and the fraction of time the trainer waited on the target. Prints a table and
writes benchmarks/results/pipeline-<preset>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.hf_backend import HFTarget  # noqa: E402
from jobs import train  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.data_prep import prepare_data  # noqa: E402
from jobs.tracking import MlflowTracker  # noqa: E402
from jobs.train_loop import Learner, draft_config_for, epoch_order  # noqa: E402


def pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > core:
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-sharegpt-cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/pipeline-<preset>[-<mode>].json)")
    args = ap.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="aerie-bench-"))
    overrides = [f"output_dir={out_dir}", "name=bench", f"optim.max_steps={args.steps}", *args.overrides]
    cfg = load_config(args.preset, overrides=overrides)
    import ray

    ray.init(address="local", include_dashboard=False)  # the token store is built with Ray Data
    data = prepare_data(cfg)
    ray.shutdown()  # the rest runs in this process
    batches = [data.batches[b] for b in epoch_order(len(data.batches), cfg.optim.seed, 0)[: args.steps]]
    tokens = [int(b.attention_mask.sum()) for b in batches]

    # 1. Target alone (core 0).
    pin(0)
    target = HFTarget(cfg.target)
    target.forward(batches[0])  # warm-up
    t0 = time.perf_counter()
    feats = [target.forward(b) for b in batches]
    target_s = time.perf_counter() - t0
    h = target.info().hidden_size
    wire = sum(f.wire_bytes for f in feats) / sum(tokens)
    padded = sum(b.input_ids.numel() for b in batches) / sum(tokens)

    # 2. Trainer alone on pre-computed features (core 1); with token feedback it also plans the branches, and the
    # target (core 0) answers their relabels, timed on its side.
    pin(1)
    learner = Learner(cfg, draft_config_for(target.info(), cfg.draft.vocab_size), target.frozen_weights(),
                      data.vocab, args.steps, torch.device("cpu"))
    plans, relabels, plan_s, relabel_s, branch_tokens = [None] * len(feats), [None] * len(feats), 0.0, 0.0, 0
    if cfg.ttt.uses_branches:
        learner.plan_branches(feats[0], 0)  # warm-up
        for j, f in enumerate(feats):
            t0 = time.perf_counter()
            plans[j] = learner.plan_branches(f, j)
            plan_s += time.perf_counter() - t0
        pin(0)
        target.relabel(plans[0].request)  # warm-up
        for j, pl in enumerate(plans):
            t0 = time.perf_counter()
            relabels[j] = target.relabel(pl.request)
            relabel_s += time.perf_counter() - t0
            branch_tokens += relabels[j].tokens.numel()
        target_s += relabel_s
        pin(1)
    learner.step(feats[0], plan=plans[0], relabel=relabels[0])  # warm-up
    t0 = time.perf_counter()
    alone_steps = []
    for f, pl, rl in zip(feats, plans, relabels):
        t1 = time.perf_counter()
        learner.step(f, plan=pl, relabel=rl)
        alone_steps.append(time.perf_counter() - t1)
    trainer_s = time.perf_counter() - t0 + plan_s
    del target, learner, feats
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1))) if hasattr(os, "sched_setaffinity") else None

    # 3. Online: the real job through Ray (target actor and trainer, one thread each).
    summary = train.main(["--preset", args.preset, *sum([["--set", o] for o in overrides], [])])
    tracker = MlflowTracker(summary["mlflow_uri"], summary["mlflow_run_id"])
    hist = sorted(tracker.client.get_metric_history(tracker.run_id, "trained_tokens"), key=lambda m: m.step)
    # Steady state: from the first step's timestamp to the last (excludes actor start-up and the first request).
    online_tps = (hist[-1].value - hist[0].value) / max((hist[-1].timestamp - hist[0].timestamp) / 1000, 1e-9)
    wait = summary.get("target_wait_frac", float("nan"))
    learner_online = sorted(m.value for m in tracker.client.get_metric_history(tracker.run_id, "time_learner_s"))
    online_learner = learner_online[len(learner_online) // 2]  # median Learner.step online vs alone: the step's own
    # slowdown from sharing the machine, apart from waiting on the target

    target_tps = sum(tokens) / target_s
    trainer_tps = sum(tokens) / trainer_s
    result = {
        "preset": args.preset, "steps": args.steps, "tokens": sum(tokens), "hidden": h,
        "target_alone_tok_s": round(target_tps, 1), "trainer_alone_tok_s": round(trainer_tps, 1),
        "online_tok_s": round(online_tps, 1), "pipeline_efficiency": round(online_tps / min(target_tps, trainer_tps), 3),
        "wire_bytes_per_token": round(wire, 1), "wire_floor_8h": 8 * h, "padding_factor": round(padded, 3),
        "trainer_wait_frac": round(wait, 3), "ttt_length": cfg.ttt.length, "torch": torch.__version__,
        "token_feedback": cfg.ttt.token_feedback, "branch_fraction": cfg.ttt.branch_fraction,
        "relabel_tokens_per_token": round(branch_tokens / sum(tokens), 3),
        "relabel_s_share_of_target": round(relabel_s / target_s, 3),
        "plan_s_share_of_trainer": round(plan_s / trainer_s, 3),
        "relabel_wait_frac": round(summary.get("relabel_wait_frac", 0.0), 3),
        "pinned_online": dict(target=cfg.target.pin_cpus, trainer=cfg.trainer.pin_cpus),
        "learner_step_s_median": dict(alone=round(sorted(alone_steps)[len(alone_steps) // 2], 3),
                                      online=round(online_learner, 3)),
    }
    print("\n| metric | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v} |")
    res = Path(__file__).parent / "results"
    res.mkdir(exist_ok=True)
    mode = "" if cfg.ttt.token_feedback == "data" else f"-{cfg.ttt.token_feedback}"
    path = args.out or res / f"pipeline-{args.preset}{mode}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
