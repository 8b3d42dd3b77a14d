"""Benchmark one EAGLE-3 TTT training step (forward + backward of `ttt_unroll`) on CPU.

Kernels compared on the same draft, inputs and unroll:
  flash_cpu  Aerie's default: fused CPU flash op for the causal block, diagonal keys merged in closed form, custom
             backward; saved attention state is linear in K.
  chunked    Aerie's portable query-chunked kernel (same merge and backward).
  eager      the official-style baseline (SafeAILab EAGLE-3 `cnets.py`, SpecForge's sdpa path), defined below:
             materialise the [B,H,T,T] causal scores, concat the per-step diagonal scores, fp32 softmax, and let
             autograd save the [B,H,T,T+k] probabilities of every step (memory K·T²).

Each config runs in a fresh subprocess (`--one '<json>'`) so peak RSS does not leak across configs. Peak MiB is
the growth of `ru_maxrss` over the RSS after model and inputs are built, i.e. activations + gradients of one step
(Linux: KiB units, high-water mark reset through /proc). Step s is wall time; CPU s (process CPU time per step /
threads) is recorded too, since it is far less disturbed when other jobs share the cores. Teacher labels are built
directly from random logits (the target lm_head is not part of the draft's step).

    python benchmarks/ttt_step.py          # full grid, 3 timed steps: ~45 min on 2 cores (fp32)
    python benchmarks/ttt_step.py --quick  # 12-14 min on 2 cores: 1 timed step, fewer rows (`quick_skips`)
    python benchmarks/ttt_step.py --hidden 576 --T 512 --K 7 --kernels flash_cpu,eager --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from transformers import LlamaConfig

import eagle3.model
from eagle3.attention import TTTKV
from eagle3.model import DraftConfig, Eagle3Draft
from eagle3.target_head import Teacher
from eagle3.ttt import TTTConfig, TTTOutput, data_feed, data_targets, ttt_unroll

RESULTS = Path(__file__).resolve().parent / "results" / "ttt_step.json"
DRAFT_VOCAB = 32000
KERNELS = ("flash_cpu", "chunked", "eager")

# Target shapes: SmolLM2-135M and a Llama-3.2-1B-like model (plain RoPE; llama3 scaling does not change compute).
TARGETS = {
    576: dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
              vocab_size=49152, num_hidden_layers=30, rope_theta=100000.0),
    2048: dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
               vocab_size=128256, num_hidden_layers=16, rope_theta=500000.0),
}


# ----------------------------------------------------------------------------------------------------------------
# Official-style eager TTT attention (the baseline)


def eager_ttt_attention(q: Tensor, k: Tensor, v: Tensor, kv: TTTKV) -> Tensor:
    """Drop-in for `eagle3.attention.ttt_attention`, written the way the official trainers do it.

    q [B,H,T,hd]; k, v [B,Hkv,T,hd] of this step. Returns [B,H,T,hd]. Scores of all step-0 keys are materialised
    with an additive causal mask, the k diagonal scores are concatenated (one `cat` instead of the official's one
    per step: same saved tensors, less transient copying), softmax runs in fp32, and autograd keeps the
    [B,H,T,T+k] probabilities for backward.
    """
    B, H, T, hd = q.shape
    groups = H // k.shape[1]
    if kv.k0 is None:
        k0, v0, extra_k, extra_v = k, v, [], []
    else:
        k0, v0, extra_k, extra_v = kv.k0, kv.v0, [*kv.extra_k, k], [*kv.extra_v, v]
    scale = 1.0 / math.sqrt(hd)
    mask = kv.causal_mask(q.dtype)  # [B, 1, T, T] for packed rows, else plain causal
    if mask is None:
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    def repeat_kv(x: Tensor) -> Tensor:  # [B, Hkv, T, hd] → [B, H, T, hd], HF's repeat_kv order
        return x.repeat_interleave(groups, dim=1)

    scores = q @ repeat_kv(k0).transpose(-1, -2) * scale + mask  # [B, H, T, T]
    diag = [(q * repeat_kv(ki)).sum(-1, keepdim=True) * scale for ki in extra_k]  # k × [B, H, T, 1]
    probs = F.softmax(torch.cat([scores, *diag], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)  # [B,H,T,T+k]
    out = probs[..., :T] @ repeat_kv(v0)  # [B, H, T, hd]
    for i, vi in enumerate(extra_v):
        out = out + probs[..., T + i, None] * repeat_kv(vi)
    return out


def attention_patch(kernel: str):
    """Route the draft's attention to the eager baseline (`DraftAttention` calls `eagle3.model.ttt_attention`)."""
    if kernel == "eager":
        return mock.patch.object(eagle3.model, "ttt_attention", eager_ttt_attention)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Model, inputs, one step


def draft_config(hidden: int) -> DraftConfig:
    """DraftConfig of one of the benchmark targets, built through the HF config as the trainer does."""
    t = dict(TARGETS[hidden])
    theta = t.pop("rope_theta")
    target = LlamaConfig(**t, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    return DraftConfig.from_target_config(target, draft_vocab_size=DRAFT_VOCAB)


def build(hidden: int, T: int, seed: int = 0) -> tuple[Eagle3Draft, dict]:
    """Random draft and one packed-free batch (B=1, one sample per row, every token labelled)."""
    torch.manual_seed(seed)
    cfg = draft_config(hidden)
    draft = Eagle3Draft(cfg, embed_weight=torch.randn(cfg.vocab_size, cfg.hidden_size))
    B = 1
    logits = 4 * torch.randn(B, T, DRAFT_VOCAB)  # stand-in for the target's logits over the draft vocab
    argmax = draft.draft_to_target(logits.argmax(-1))
    batch = dict(
        input_ids=torch.randint(0, cfg.vocab_size, (B, T)),
        aux_hidden=torch.randn(B, T, 3 * cfg.hidden_size),  # [B, T, 3h]
        position_ids=torch.arange(T).repeat(B, 1),  # [B, T]
        loss_mask=torch.ones(B, T, dtype=torch.bool),
        doc_ids=torch.zeros(B, T, dtype=torch.long),
        teacher=Teacher(probs=logits.softmax(-1), argmax=argmax, in_draft=draft.t2d[argmax]),
    )
    return draft, batch


def train_step(draft: Eagle3Draft, batch: dict, K: int, kernel: str, grad_checkpoint: bool = False,
               dtype: str = "fp32") -> TTTOutput:
    """Forward + backward of the K-step TTT unroll with the given attention kernel; gradients land in `draft`."""
    cfg = TTTConfig(length=K, attention_kernel="auto" if kernel == "eager" else kernel,
                    grad_checkpoint=grad_checkpoint)
    feed = data_feed(batch["input_ids"])
    targets = data_targets(batch["teacher"], batch["loss_mask"], batch["doc_ids"])
    # The patch covers backward too: with grad checkpointing each step's attention is recomputed there.
    with attention_patch(kernel):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = ttt_unroll(draft, batch["aux_hidden"], batch["position_ids"], batch["doc_ids"], feed, targets, cfg)
        out.loss.backward()
    return out


def attn_state_bytes(hidden: int, T: int, K: int, kernel: str, B: int = 1, elem: int = 4) -> int:
    """Analytic bytes of the attention tensors saved for backward over the whole unroll (GQA k/v expanded to H),
    without grad checkpointing (which keeps only each step's inputs and recomputes the rest).

    flash_cpu/chunked, step k: q, k0, v0, out [T,hd] + k diagonal keys/values + lse, per head.
    eager, step k: fp32 probs [T,T+k] + q, k0, v0 and the k diagonal keys/values, per head.
    Both match the bytes that `saved_tensors_hooks` see inside the attention call.
    """
    H, hd = TARGETS[hidden]["num_attention_heads"], TARGETS[hidden]["head_dim"]
    total = 0
    for k in range(K):
        if kernel == "eager":
            total += B * H * T * ((T + k) * 4 + (3 + 2 * k) * hd * elem)
        else:
            total += B * H * T * ((4 + 2 * k) * hd * elem + 4)
    return total


def estimate_peak_gib(hidden: int, T: int, K: int, kernel: str) -> float:
    """Rough absolute peak RSS of a config (model + grads + activations + attention), to skip obvious OOMs.

    Non-attention activations per step: ~1.5 [T, draft_vocab] fp32 (log-softmax saved, logits and grads in
    flight), ~20 [T, h] and ~4 [T, I] tensors (fitted to measured flash_cpu peaks); the eager kernel adds ~3
    transient [H, T, T+K] fp32 score tensors on top of its saved state.
    """
    cfg = draft_config(hidden)
    h, inter, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    with torch.device("meta"):  # parameter counts without allocating
        draft = Eagle3Draft(cfg)
    trainable = sum(p.numel() for p in draft.trainable_parameters())
    model = 4 * (2 * trainable + cfg.vocab_size * h) + 0.5 * 2**30  # params + grads + frozen embed + runtime
    acts = 4 * T * K * (1.5 * DRAFT_VOCAB + 20 * h + 4 * inter)
    transient = 3 * H * T * (T + K) * 4 if kernel == "eager" else 0
    return (model + acts + transient + attn_state_bytes(hidden, T, K, kernel)) / 2**30


# ----------------------------------------------------------------------------------------------------------------
# One config in this (fresh) process


def run_one(spec: dict) -> dict:
    """Build, then time 1 warm-up + `steps` forward+backward steps; peak RSS growth over the built state."""
    torch.set_num_threads(spec["threads"])
    draft, batch = build(spec["hidden"], spec["T"])
    try:  # reset the RSS high-water mark so transient build memory does not hide the step's peak (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times, loss = [], [], None
    for _ in range(1 + spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        out = train_step(draft, batch, spec["K"], spec["kernel"], spec["grad_checkpoint"], spec["dtype"])
        times.append(time.perf_counter() - t0)
        cpu_times.append((time.process_time() - c0) / spec["threads"])
        loss = out.loss.item()
        del out
        draft.zero_grad()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_s = statistics.median(times[1:])
    return dict(spec, step_s=step_s, tokens_per_s=spec["T"] / step_s, cpu_s=statistics.median(cpu_times[1:]),
                peak_mib=(peak_kib - base_kib) / 1024, base_mib=base_kib / 1024, warmup_s=times[0],
                times_s=times[1:], loss=loss)


def spawn_one(spec: dict) -> dict:
    """Run `spec` in a fresh interpreter (this script with --one) and return its result record."""
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    why = "killed (OOM?)" if proc.returncode in (-9, 137) else f"failed rc={proc.returncode}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return dict(spec, status=why, error="\n".join(tail))


# ----------------------------------------------------------------------------------------------------------------
# Sanity check and report


def check_eager_matches(hidden: int = 576, T: int = 256, K: int = 7) -> dict:
    """Same draft and inputs through every kernel: loss and gradients must agree with the eager baseline."""
    draft, batch = build(hidden, T)
    res = {}
    for kernel in ("eager", "flash_cpu", "chunked"):
        draft.zero_grad()
        out = train_step(draft, batch, K, kernel)
        res[kernel] = (out.loss.detach(), out.loss_k, [p.grad.clone() for p in draft.trainable_parameters()])
    ref_loss, ref_k, ref_g = res["eager"]
    report = dict(hidden=hidden, T=T, K=K, loss_eager=ref_loss.item())
    for kernel in ("flash_cpu", "chunked"):
        loss, loss_k, grads = res[kernel]
        report[kernel] = dict(
            loss_abs_diff=(loss - ref_loss).abs().item(),
            loss_k_max_abs_diff=(loss_k - ref_k).abs().max().item(),
            grad_max_rel_diff=max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                                  for g, r in zip(grads, ref_g)),
        )
    return report


def quick_skips(spec: dict) -> bool:
    """Rows --quick (which also times 1 step) leaves out: eager at its slowest shape (hidden 2048, T=2048, K=7:
    minutes per step on 2 cores) and the chunked kernel except at hidden 576."""
    if spec["kernel"] == "flash_cpu":
        return False
    if spec["kernel"] == "chunked" and spec["hidden"] != 576:
        return True
    return (spec["hidden"], spec["T"], spec["K"]) == (2048, 2048, 7)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| hidden | T | K | kernel | tokens/s | step s | CPU s | peak MiB | attn state MiB |",
             "|---:|---:|---:|:---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['hidden']} | {r['T']} | {r['K']} | {r['kernel']} |"
        state = f"{r['attn_state_mib']:.0f}"
        if "step_s" in r:
            lines.append(f"{head} {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | "
                         f"{r['peak_mib']:.0f} | {state} |")
        else:
            lines.append(f"{head} {r['status']} | – | – | – | {state} |")
    return "\n".join(lines)


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.machine())


def csv(kind):
    return lambda s: [kind(x) for x in s.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=csv(int), default=[576, 2048], help="target hidden sizes (576, 2048)")
    p.add_argument("--T", type=csv(int), default=[512, 2048], help="sequence lengths")
    p.add_argument("--K", type=csv(int), default=[1, 7], help="TTT lengths")
    p.add_argument("--kernels", type=csv(str), default=list(KERNELS), help="flash_cpu,chunked,eager")
    p.add_argument("--steps", type=int, help="timed steps per config (median) after 1 warm-up; 3, or 1 with --quick")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = CPU autocast, fp32 weights")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each TTT step in backward")
    p.add_argument("--mem-limit-gib", type=float, default=20.0, help="skip configs estimated above this")
    p.add_argument("--quick", action="store_true", help="~15 min on 2 cores: 1 timed step, see `quick_skips`")
    p.add_argument("--no-check", action="store_true", help="skip the eager vs flash_cpu/chunked loss check")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one JSON spec in this process
    args = p.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    if unknown := set(args.kernels) - set(KERNELS):
        p.error(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    if unknown := set(args.hidden) - set(TARGETS):
        p.error(f"unknown hidden sizes {sorted(unknown)}; choose from {sorted(TARGETS)}")

    steps = args.steps or (1 if args.quick else 3)
    load_before = os.getloadavg()
    specs = [dict(hidden=h, T=T, K=K, kernel=kern, steps=steps, threads=args.threads, dtype=args.dtype,
                  grad_checkpoint=args.grad_checkpoint)
             for h in args.hidden for T in args.T for K in args.K for kern in args.kernels]
    rows = []
    bar = tqdm(specs, unit="config", dynamic_ncols=True)
    for spec in bar:
        name = f"h={spec['hidden']} T={spec['T']} K={spec['K']} {spec['kernel']}"
        bar.set_description(name)
        est = estimate_peak_gib(spec["hidden"], spec["T"], spec["K"], spec["kernel"])
        if est > args.mem_limit_gib:
            row = dict(spec, status=f"skipped (est. {est:.1f} GiB)")
        elif args.quick and quick_skips(spec):
            row = dict(spec, status="skipped (--quick)")
        else:
            row = spawn_one(spec)
        row.update(est_peak_gib=est, attn_state_mib=attn_state_bytes(spec["hidden"], spec["T"], spec["K"],
                                                                      spec["kernel"]) / 2**20)
        rows.append(row)
        done = (f"{row['tokens_per_s']:.0f} tok/s, {row['step_s']:.2f} s/step, peak +{row['peak_mib']:.0f} MiB"
                if "step_s" in row else row["status"])
        tqdm.write(f"{name}: {done}")
        if "error" in row:
            tqdm.write(row["error"])

    # After the grid: this process's RSS must stay small while children run (they inherit its ru_maxrss floor).
    check = None
    if not args.no_check:
        torch.set_num_threads(args.threads)
        check = check_eager_matches()
        print(f"\nsanity (h={check['hidden']} T={check['T']} K={check['K']}, fp32, same inputs): "
              f"|loss(flash_cpu) - loss(eager)| = {check['flash_cpu']['loss_abs_diff']:.2e}, "
              f"max |loss_k diff| = {check['flash_cpu']['loss_k_max_abs_diff']:.2e}, "
              f"max grad rel diff = {check['flash_cpu']['grad_max_rel_diff']:.2e}; "
              f"chunked: {check['chunked']['loss_abs_diff']:.2e} / {check['chunked']['grad_max_rel_diff']:.2e}")

    meta = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), threads=args.threads, steps=steps,
                dtype=args.dtype, grad_checkpoint=args.grad_checkpoint, quick=args.quick, batch=1,
                draft_vocab=DRAFT_VOCAB, torch=torch.__version__, cpu=cpu_name(), cpu_count=os.cpu_count(),
                loadavg_before=load_before, loadavg_after=os.getloadavg(),
                peak_mib="ru_maxrss growth over the built model+inputs, fresh process")
    print(f"\nTTT step (fwd+bwd), batch 1, {args.dtype}, {args.threads} threads, median of {steps} steps"
          f"{', grad checkpointing' if args.grad_checkpoint else ''}\n")
    print(markdown_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, check=check, results=rows), indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
