"""Does the trainer's step get slower as the draft trains? Learner.step timed on the same real batches with fresh
weights and with a trained snapshot's weights, alternating (A B A B) in one process, with the CPU exp floor
(`eagle3.numerics.EXP_FLOOR`, the fix) and without it (floor -inf: torch's plain exp, as before the fix). The learning
rate is 0, so every repetition runs the same weights (AdamW still runs in full).

    python benchmarks/step_drift.py --snapshot runs/recipes-xeon/rc-regen-target/snapshots/step-0000500
    python benchmarks/step_drift.py --snapshot ... --rounds 0 --burn 150 --out benchmarks/results/step_drift-burn.json

`--burn N` asks the other question: fresh weights timed, N more steps on the same batches, fresh weights timed
again; a slowdown there belongs to the process (memory), not to the weights.

Prints a table and writes benchmarks/results/step_drift.json. One thread (as the trainer runs); the target's features
are computed first, in the same process, so nothing else runs while the steps are timed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from actors.hf_backend import HFTarget  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.data_prep import prepare_data  # noqa: E402
from jobs.train import atomic_write  # noqa: E402
from jobs.train_loop import Learner, draft_config_for, epoch_order, release_freed_memory  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "step_drift.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", required=True, help="an exported draft (trainer.snapshot_every) of this preset")
    ap.add_argument("--preset", default="smollm2-sharegpt-cpu")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--burn", type=int, default=0,
                    help="then this many more steps (fresh weights, the same batches) and time fresh weights again: "
                         "does the process itself slow down?")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from eagle3 import numerics
    from eagle3.export import load_draft

    default_floor = numerics.EXP_FLOOR

    cfg = load_config(args.preset, overrides=[f"output_dir={tempfile.mkdtemp(prefix='aerie-drift-')}", "name=drift"])
    import ray

    ray.init(address="local", include_dashboard=False)  # the token store is built with Ray Data
    data = prepare_data(cfg)
    ray.shutdown()
    batches = [data.batches[b] for b in epoch_order(len(data.batches), cfg.optim.seed, 0)[: args.batches]]
    target = HFTarget(cfg.target)
    feats = [target.forward(b) for b in batches]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    learner = Learner(cfg, draft_config_for(target.info(), cfg.draft.vocab_size), target.frozen_weights(),
                      data.vocab, 1000, torch.device("cpu"))
    fresh = {k: v.clone() for k, v in learner.draft.state_dict().items()}
    trained_draft = load_draft(args.snapshot, embed_weight=target.frozen_weights().embed_tokens)
    trained = {k: v for k, v in trained_draft.state_dict().items() if k in fresh}
    missing = sorted(set(k for k, p in learner.draft.named_parameters() if p.requires_grad) - set(trained))
    if missing:
        raise SystemExit(f"{args.snapshot} lacks trainable weights {missing[:3]}...: not a draft of this preset")
    del target, trained_draft
    for g in learner.optimizer.param_groups:
        g["lr"] = 0.0
    learner.scheduler.base_lrs = [0.0] * len(learner.scheduler.base_lrs)

    def timed(weights: dict, floor: bool) -> dict:
        learner.draft.load_state_dict(weights, strict=False)
        numerics.EXP_FLOOR = default_floor if floor else float("-inf")
        learner.step(feats[0])  # warm-up
        times, losses = [], []
        for f in feats:
            t0 = time.perf_counter()
            r = learner.step(f)
            release_freed_memory()
            times.append(time.perf_counter() - t0)
            losses.append(r.loss)
        numerics.EXP_FLOOR = default_floor
        return {"seconds": sum(times), "median_step_s": statistics.median(times), "mean_loss": statistics.fmean(losses)}

    rows = []
    for rnd in range(args.rounds):
        for name, w in [("fresh", fresh), ("trained", trained)]:
            for floor in (False, True):
                r = timed(w, floor)
                rows.append({"round": rnd, "weights": name, "exp_floor": floor, **r,
                             "tokens_per_s": tokens / r["seconds"]})
                print(f"round {rnd} {name:8s} exp floor={floor!s:5}: {r['seconds']:6.1f} s  "
                      f"{tokens / r['seconds']:6.0f} tok/s  loss {r['mean_loss']:.3f}", flush=True)
    if args.burn:
        before = timed(fresh, True)
        t0 = time.perf_counter()
        for j in range(args.burn):
            learner.step(feats[j % len(feats)])
            release_freed_memory()
        burn_s = time.perf_counter() - t0
        after = timed(fresh, True)
        rows += [{"round": "before-burn", "weights": "fresh", "exp_floor": True, **before,
                  "tokens_per_s": tokens / before["seconds"]},
                 {"round": f"after-{args.burn}-steps", "weights": "fresh", "exp_floor": True, **after,
                  "tokens_per_s": tokens / after["seconds"], "burn_seconds": burn_s}]
        print(f"fresh weights before {args.burn} more steps: {tokens / before['seconds']:.0f} tok/s, after: "
              f"{tokens / after['seconds']:.0f} tok/s (the {args.burn} steps took {burn_s:.0f} s)", flush=True)
    best = {}
    for row in [r for r in rows if isinstance(r["round"], int)]:
        key = (row["weights"], row["exp_floor"])
        best[key] = max(best.get(key, 0.0), row["tokens_per_s"])
    if best:
        print("\n| weights | exp floor | best tokens/s | vs fresh, no floor |\n|---|---|---:|---:|")
        for (w, fl), v in best.items():
            print(f"| {w} | {'on' if fl else 'off'} | {v:.0f} | {v / best[('fresh', False)]:.3f} |")
    atomic_write(Path(args.out), json.dumps({"snapshot": args.snapshot, "preset": args.preset, "tokens": tokens,
                                             "batches": args.batches, "cpu": platform.processor(),
                                             "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
