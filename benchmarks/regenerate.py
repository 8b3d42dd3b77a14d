"""Regeneration speed on a real target, online vs batch: `python benchmarks/regenerate.py --dtype bfloat16`.

The same N usable ShareGPT records (first prompt under --max-length tokens), their first user turn (--all-turns:
every user turn, answered turn by turn), greedy, the same --max-new-tokens, on one HF target in this process:
  (a) online (`data.regenerate=true`): what `HFTarget.regenerate` does per training step, `regen_requests` requests
      of data.regen_conversations (--online-conversations, default 4) conversations each: one batched generate per
      turn index, then `forward` for the features;
  (b) batch (`aerie regenerate`): the actors' `answer` on chunks of data.regen_batch_size (--batch-size, default 32)
      conversations: one batched generate per turn index, no features.
Prints a table and writes benchmarks/results/regenerate.json: generated tokens, seconds and tokens/s of each (for
(a) both generation alone and the whole request with its forward), the ratio, and how many replies re-tokenise to
exactly the generated ids (responses travel as text, see actors/regenerate.py). Each path runs --repeats times in
alternating order; the best run of each is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from actors.hf_backend import HFTarget, TargetConfig
from actors.models import SMOLLM2
from actors.protocol import GenerationParams
from actors.regenerate import regenerate_batch
from eagle3.data import DataConfig, packaged_sharegpt_path
from jobs.data_prep import regen_requests

RESULTS = Path(__file__).resolve().parent / "results" / "regenerate.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=32, help="conversations (records) to regenerate")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-length", type=int, default=1024,
                   help="data.max_length: records whose first prompt is this long are skipped; later turns stop there")
    p.add_argument("--online-conversations", type=int, default=4, help="data.regen_conversations of path (a)")
    p.add_argument("--batch-size", type=int, default=32, help="data.regen_batch_size of path (b)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--all-turns", action="store_true", help="answer every user turn, not only the first")
    p.add_argument("--repeats", type=int, default=2, help="runs of each path (alternating order); best one reported")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    target = HFTarget(TargetConfig(model=args.model, dtype=args.dtype, num_threads=args.threads))
    tok = target.tokenizer
    data = DataConfig(path=str(packaged_sharegpt_path()), max_length=args.max_length, on_bad_record="skip",
                      max_samples=args.prompts, regen_max_new_tokens=args.max_new_tokens,
                      regen_conversations=args.online_conversations, regen_batch_size=args.batch_size)
    online, _ = regen_requests(data, tok)
    batch, _ = regen_requests(dataclasses.replace(data, regen_conversations=args.batch_size), tok)
    if not args.all_turns:  # up to the first user turn
        for r in online + batch:
            r.conversations = [c[: [m["role"] for m in c].index("user") + 1] for c in r.conversations]
    conversations = [c for r in online for c in r.conversations]
    assert conversations == [c for r in batch for c in r.conversations]  # the same prompts in both paths
    for n in (args.online_conversations, args.batch_size):  # warm-up: first-call allocations
        target.generate([[1, 2, 3]] * n, GenerationParams(max_new_tokens=4))

    replies: list[list[int]] = []

    def generate(prompts, prm):  # HFTarget.generate, keeping the replies for the re-tokenisation check
        replies.extend(target.generate(prompts, prm))
        return replies[-len(prompts):]

    def run_online() -> tuple[int, float, float]:
        """(a): per request regenerate_batch + forward, as HFTarget.regenerate (features included)."""
        tokens, gen_s, t0 = 0, 0.0, time.perf_counter()
        for req in online:
            regen = regenerate_batch(req.conversations, req.sample_ids, tok, generate, req.params, data)
            target.forward(regen.batch)
            tokens, gen_s = tokens + regen.generated_tokens, gen_s + regen.generate_seconds
        return tokens, gen_s, time.perf_counter() - t0

    def run_batch() -> tuple[int, float, float]:
        """(b): the actor method `answer`, one call per chunk (what jobs.regenerate sends each actor)."""
        tokens, gen_s, t0 = 0, 0.0, time.perf_counter()
        for chunk in batch:
            answered = target.answer(chunk.conversations, chunk.params, data.max_length)
            tokens, gen_s = tokens + answered.generated_tokens, gen_s + answered.generate_seconds
        return tokens, gen_s, time.perf_counter() - t0

    # Alternating order, best of --repeats each: this machine's speed drifts (shared cores), see ENVIRONMENT.md.
    runs: dict[str, list] = {"online": [], "batch": []}
    for r in range(args.repeats):
        for name in (("batch", "online") if r % 2 else ("online", "batch")):
            runs[name].append(run_online() if name == "online" else run_batch())
            print(f"[{name} run {r + 1}] tokens {runs[name][-1][0]}, seconds {runs[name][-1][2]:.1f}", flush=True)
    a_tokens, a_gen_s, a_wall = min(runs["online"], key=lambda x: x[2])
    b_tokens, b_gen_s, b_wall = min(runs["batch"], key=lambda x: x[2])
    first = replies[: len(replies) // args.repeats]  # the first online run's replies
    exact = sum(tok(tok.decode(r, skip_special_tokens=True), add_special_tokens=False)["input_ids"] == r
                for r in first)
    a_replies = len(first)

    rows = {
        f"online ({args.online_conversations}/request, generate)": (a_tokens, a_gen_s),
        f"online ({args.online_conversations}/request, + forward)": (a_tokens, a_wall),
        f"batch ({args.batch_size}/call, answer)": (b_tokens, b_wall),
    }
    print(f"{'path':<36} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for name, (n, s) in rows.items():
        print(f"{name:<36} {n:>7} {s:>8.1f} {n / s:>9.1f}")
    ratio = (b_tokens / b_wall) / (a_tokens / a_gen_s)
    print(f"batch / online generate tokens/s: {ratio:.2f}x; vs online with forward: "
          f"{(b_tokens / b_wall) / (a_tokens / a_wall):.2f}x")
    report = {
        "model": args.model, "dtype": args.dtype, "threads": args.threads, "conversations": len(conversations),
        "user_turns": sum(m["role"] == "user" for c in conversations for m in c),
        "all_turns": args.all_turns, "max_new_tokens": args.max_new_tokens, "max_length": args.max_length,
        "greedy": True,
        "online": {"conversations_per_request": args.online_conversations, "requests": len(online),
                   "generated_tokens": a_tokens, "generate_seconds": round(a_gen_s, 2),
                   "generate_tokens_per_s": round(a_tokens / a_gen_s, 1), "request_seconds": round(a_wall, 2),
                   "request_tokens_per_s": round(a_tokens / a_wall, 1),
                   "replies_retokenised_exactly": f"{exact}/{a_replies}"},
        "batch": {"conversations_per_call": args.batch_size, "calls": len(batch), "generated_tokens": b_tokens,
                  "seconds": round(b_wall, 2), "generate_seconds": round(b_gen_s, 2),
                  "tokens_per_s": round(b_tokens / b_wall, 1)},
        "ratio_batch_vs_online_generate": round(ratio, 2),
        "ratio_batch_vs_online_request": round((b_tokens / b_wall) / (a_tokens / a_wall), 2),
        "repeats": args.repeats, "all_runs_seconds": {k: [round(x[2], 2) for x in v] for k, v in runs.items()},
        "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
