"""Online regeneration speed on a real target: `python benchmarks/regenerate.py --dtype bfloat16`.

The first user turn of the first N usable ShareGPT records (first prompt under --max-prompt tokens) goes to
one regeneration request (what `HFTarget.regenerate` does) (one batched generate, then the features). Prints one JSON line: generated
tokens, generate seconds and tokens/s, the whole request's seconds, and how many replies re-tokenise to exactly
the generated ids (responses travel as text, see actors/regenerate.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from actors.hf_backend import HFTarget, TargetConfig
from actors.models import SMOLLM2
from actors.protocol import GenerationParams
from actors.regenerate import regenerate_batch
from eagle3.data import DataConfig, packaged_sharegpt_path
from jobs.data_prep import regen_requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt", type=int, default=1024, help="skip records whose first prompt is this long")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--all-turns", action="store_true", help="regenerate every user turn, not only the first")
    args = p.parse_args()

    target = HFTarget(TargetConfig(model=args.model, dtype=args.dtype, num_threads=args.threads))
    data = DataConfig(path=str(packaged_sharegpt_path()), max_length=args.max_prompt, on_bad_record="skip",
                      max_samples=args.prompts, regen_conversations=args.prompts)
    (req,), _ = regen_requests(data, target.tokenizer)
    first_turns = req.conversations if args.all_turns else \
        [turns[: [m["role"] for m in turns].index("user") + 1] for turns in req.conversations]
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    target.generate([[1, 2, 3]], GenerationParams(max_new_tokens=4))  # warm-up: first-call allocations

    replies: list[list[int]] = []

    def generate(prompts, prm):  # HFTarget.generate, keeping the replies for the re-tokenisation check
        replies.extend(target.generate(prompts, prm))
        return replies[-len(prompts):]

    t0 = time.perf_counter()  # what HFTarget.regenerate does
    regen = regenerate_batch(first_turns, req.sample_ids, target.tokenizer, generate, params,
                             DataConfig(path=data.path, max_length=args.max_prompt + args.max_new_tokens))
    out = target.forward(regen.batch)
    wall = time.perf_counter() - t0
    tok = target.tokenizer
    exact = sum(tok(tok.decode(r, skip_special_tokens=True), add_special_tokens=False)["input_ids"] == r for r in replies)
    print(json.dumps({
        "model": args.model, "dtype": args.dtype, "threads": args.threads, "prompts": len(first_turns),
        "prompt_tokens": [len(target.tokenizer.apply_chat_template(t, add_generation_prompt=True)["input_ids"])
                          for t in first_turns],
        "max_new_tokens": args.max_new_tokens, "generated_tokens": regen.generated_tokens,
        "reply_lengths": [len(r) for r in replies], "generate_seconds": round(regen.generate_seconds, 2),
        "generate_tokens_per_s": round(regen.generated_tokens / regen.generate_seconds, 1),
        "request_seconds": round(wall, 2), "batch_shape": list(out.batch.input_ids.shape),
        "replies_retokenised_exactly": f"{exact}/{len(replies)}", "torch": torch.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
