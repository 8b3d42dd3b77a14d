"""Benchmark one EAGLE-3 trainer step on CPU: teacher + TTT unroll forward + backward + AdamW, as `Learner.step`.

Paths compared on the same draft, inputs and unroll (same weights, same seed):
  aerie      the trainer's default: attention kernel `auto` (CPU: the chunked kernel with bf16 matmuls, GQA and
             per-block key ranges; diagonal keys merged in closed form, custom backward),
             fused draft-vocab loss (`TTTConfig.fused_loss`: lm_head + soft-CE + argmax in row chunks, gradients
             in the forward), teacher in the target's dtype (bf16), target features fed without an fp32 copy,
             torch's fused AdamW (jobs.train_loop.adamw).
  before     the trainer before issue 13: CPU flash attention, materialised [T, draft_vocab] logits with an fp32
             log-softmax per step (`fused_loss=False`), fp32 teacher over fp32 copies of the features, foreach AdamW.
  aerie-flash  `aerie` with the fused CPU flash attention op at every T (an ablation of the auto choice).
  eager      the official-style baseline (SafeAILab EAGLE-3 `cnets.py`, SpecForge's sdpa path), defined below:
             materialise the [B,H,T,T] causal scores, concat the per-step diagonal scores, fp32 softmax, let
             autograd save the [B,H,T,T+k] probabilities of every step (memory K·T²), materialised logits; its
             teacher is Aerie's (in the target's dtype), so the comparison isolates the draft's step; foreach AdamW.
All run under bf16 autocast over fp32 master weights where this CPU multiplies bf16 natively (the trainer's default,
`optim.bf16: auto`), else in fp32 (--dtype bf16 / fp32 force one).

Goals (issue 13), computed from the rows of one run: `aerie` tokens/s at the demo shapes (h 576, T 512, K 7, draft
vocab 8,192) against the FLOP floor = draft FLOPs per token ÷ a matmul rate (step dtype) measured in the same run at the
step's own GEMM shapes; `aerie` vs `eager` speed at T = 512 and 2,048; peak memory at T = 2,048, K = 7.

Each config runs in a fresh subprocess (`--one '<json>'`) so peak RSS does not leak across configs. Peak MiB is
the growth of `ru_maxrss` over the RSS after model and inputs are built, i.e. activations + gradients of one step
(Linux: KiB units, high-water mark reset through /proc). Step s is wall time; CPU s (process CPU time per step /
threads) is recorded too, since it is far less disturbed when other jobs share the cores. Teacher labels are built
directly from random logits (the target lm_head is not part of the draft's step).

    python benchmarks/ttt_step.py                  # the goal grid: h 576, T 512/2048, K 7, 4 paths, 1 thread
    python benchmarks/ttt_step.py --hidden 576 --T 512 --K 7 --paths aerie,eager --steps 5
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
from eagle3.target_head import TargetHead
from eagle3.ttt import TTTConfig, TTTOutput, data_feed, data_targets, ttt_unroll

RESULTS = Path(__file__).resolve().parent / "results" / "ttt_step.json"
PATHS = ("aerie", "aerie-flash", "aerie-unfused", "before", "eager")

# Target shapes: SmolLM2-135M (the demo's), a Llama-3.2-1B-like and a Llama-3.1-8B-like model (plain RoPE; llama3
# scaling does not change compute), each with the draft vocab its preset uses.
TARGETS = {
    576: dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
              vocab_size=49152, num_hidden_layers=30, rope_theta=100000.0, draft_vocab=8192),
    2048: dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
               vocab_size=128256, num_hidden_layers=16, rope_theta=500000.0, draft_vocab=32000),
    4096: dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
               vocab_size=128256, num_hidden_layers=32, rope_theta=500000.0, draft_vocab=32000),
}
DRAFT_VOCAB = None  # None: the target's own (TARGETS[h]["draft_vocab"]); an int overrides every shape


def draft_vocab_of(hidden: int) -> int:
    return DRAFT_VOCAB or TARGETS[hidden]["draft_vocab"]


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


def path_settings(path: str) -> dict:
    """How each benchmarked path runs: attention kernel, fused loss, teacher dtype ('target' = bf16 as shipped)."""
    return {
        "aerie": dict(kernel="auto", fused=True, teacher="target"),
        "aerie-flash": dict(kernel="flash_cpu", fused=True, teacher="target"),
        "aerie-unfused": dict(kernel="auto", fused=False, teacher="target"),  # ablation: materialised logits
        "before": dict(kernel="flash_cpu", fused=False, teacher="fp32"),
        "eager": dict(kernel="eager", fused=False, teacher="target"),
    }[path]


# ----------------------------------------------------------------------------------------------------------------
# Model, inputs, one step


def draft_config(hidden: int) -> DraftConfig:
    """DraftConfig of one of the benchmark targets, built through the HF config as the trainer does."""
    t = {k: v for k, v in TARGETS[hidden].items() if k != "draft_vocab"}
    theta = t.pop("rope_theta")
    target = LlamaConfig(**t, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    return DraftConfig.from_target_config(target, draft_vocab_size=draft_vocab_of(hidden))


def build(hidden: int, T: int, seed: int = 0, device: str = "cpu",
          target_dtype=torch.bfloat16, docs: int = 1) -> tuple[Eagle3Draft, dict]:
    """Random draft, the target's lm_head, and one batch (B=1, every token labelled): one sample per row, or
    `docs` equal samples packed in it (positions restart per sample, attention stays inside each).

    The target's outputs (aux features, last hidden, lm_head, embeddings) are in `target_dtype`, as a bf16 target
    ships them; `batch["teacher"]` holds the labels as `path_settings(..)["teacher"] == "target"` computes them."""
    torch.manual_seed(seed)
    cfg = draft_config(hidden)
    dev = torch.device(device)
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=target_dtype)
    draft = Eagle3Draft(cfg, embed_weight=embed).to(dev)
    B = 1
    doc = torch.arange(T) * docs // T  # sample index per position
    starts = torch.searchsorted(doc, doc)  # first position of each position's sample
    lm_head = (torch.randn(cfg.vocab_size, cfg.hidden_size) / math.sqrt(cfg.hidden_size) * 4).to(target_dtype)
    batch = dict(
        input_ids=torch.randint(0, cfg.vocab_size, (B, T)).to(dev),
        aux_hidden=torch.randn(B, T, 3 * cfg.hidden_size, dtype=target_dtype).to(dev),  # [B, T, 3h]
        last_hidden=torch.randn(B, T, cfg.hidden_size, dtype=target_dtype).to(dev),  # [B, T, h] post final norm
        position_ids=(torch.arange(T) - starts).repeat(B, 1).to(dev),  # [B, T]
        loss_mask=torch.ones(B, T, dtype=torch.bool, device=dev),
        doc_ids=doc.repeat(B, 1).to(dev),
        lm_head=lm_head.to(dev),
    )
    batch["heads"] = {"target": TargetHead(batch["lm_head"], draft.t2d), "fp32": None}
    batch["teacher"] = batch["heads"]["target"](batch["last_hidden"])
    return draft, batch


def teacher_for(batch: dict, kind: str):
    """The teacher labels as path kind 'target' (head in the target dtype) or 'fp32' (fp32 head, fp32 features)."""
    if kind == "target":
        return batch["heads"]["target"](batch["last_hidden"])
    if batch["heads"]["fp32"] is None:
        batch["heads"]["fp32"] = TargetHead(batch["lm_head"].float(), batch["heads"]["target"].t2d)
    return batch["heads"]["fp32"](batch["last_hidden"].float())


def train_step(draft: Eagle3Draft, batch: dict, K: int, kernel: str, grad_checkpoint: bool = False,
               dtype: str = "bf16", fused: bool = True, teacher=None) -> TTTOutput:
    """Forward + backward of the K-step TTT unroll with the given attention kernel; gradients land in `draft`.
    `teacher` defaults to batch["teacher"]; the features go in as shipped unless the teacher is fp32 (then as the
    pre-issue-13 trainer did, as an fp32 copy)."""
    cfg = TTTConfig(length=K, attention_kernel="auto" if kernel == "eager" else kernel,
                    grad_checkpoint=grad_checkpoint, fused_loss=fused)
    teacher = teacher if teacher is not None else batch["teacher"]
    aux = batch["aux_hidden"] if teacher.probs.dtype != torch.float32 else batch["aux_hidden"].float()
    feed = data_feed(batch["input_ids"])
    targets = data_targets(teacher, batch["loss_mask"], batch["doc_ids"])
    dev = batch["input_ids"].device.type
    # The patch covers backward too: with grad checkpointing each step's attention is recomputed there.
    with attention_patch(kernel):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = ttt_unroll(draft, aux, batch["position_ids"], batch["doc_ids"], feed, targets, cfg)
        out.loss.backward()
    return out


def trainer_step(draft: Eagle3Draft, batch: dict, opt: torch.optim.Optimizer, spec: dict) -> TTTOutput:
    """What `Learner.step` does for one batch: teacher, unroll forward + backward, grad clip, AdamW, zero_grad."""
    ps = path_settings(spec["path"])
    teacher = teacher_for(batch, ps["teacher"])
    out = train_step(draft, batch, spec["K"], ps["kernel"], spec["grad_checkpoint"], spec["dtype"], ps["fused"],
                     teacher)
    torch.nn.utils.clip_grad_norm_(draft.trainable_parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out


def flops_per_token(hidden: int, T: int, K: int, doc_lengths: list[int] | None = None) -> dict[str, float]:
    """Draft FLOPs per trained token of one TTT step (forward + backward = 3 × forward = 6 × MACs), by part.

    fc: 3h·h. Each of the K steps: q/k/v projections from 2h, o projection, SwiGLU MLP (3·h·I), draft lm_head
    (h·Vd), and causal attention (QKᵀ and PV: 2·H·hd MACs per visible key; a token of a document of length n sees
    (n+1)/2 keys on average, plus k diagonal keys at step k). The teacher (target lm_head, forward only,
    2·h·V) is reported apart: it is not the draft's work.
    """
    c = TARGETS[hidden]
    h, H, Hkv, hd, inter = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], \
        c["intermediate_size"]
    lengths = doc_lengths or [T]
    mean_keys = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    macs = dict(fc=3 * h * h, proj=K * (2 * h * (H + 2 * Hkv) * hd + H * hd * h), mlp=K * 3 * h * inter,
                lm_head=K * h * draft_vocab_of(hidden),
                attention=sum(2 * H * hd * (mean_keys + k) for k in range(K)))
    out = {k: 6.0 * v for k, v in macs.items()}
    out["draft"] = sum(out.values())
    out["teacher"] = 2.0 * h * c["vocab_size"]
    return out


def gemm_shapes(hidden: int, T: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count per TTT step) of the draft's forward GEMMs at T rows; backward runs the same sizes."""
    c = TARGETS[hidden]
    h, H, Hkv, hd, inter = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], \
        c["intermediate_size"]
    return [(T, 2 * h, H * hd, 1), (T, 2 * h, Hkv * hd, 2), (T, H * hd, h, 1), (T, h, inter, 2), (T, inter, h, 1),
            (T, h, draft_vocab_of(hidden), 1)]


def matmul_rate(hidden: int, T: int, threads: int, dtype: str = "bf16", repeats: int = 7) -> dict:
    """GFLOP/s in the step's dtype (bf16 | fp32) of its own forward GEMM shapes (FLOP-weighted: total FLOPs ÷ total
    best times), best of `repeats` each, with `threads` torch threads; the fp32 rate of the largest shape too."""
    torch.set_num_threads(threads)
    total_flop, total_s, per = 0.0, 0.0, []
    mm_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    for M, Kd, N, count in gemm_shapes(hidden, T):
        a, b = torch.randn(M, Kd).to(mm_dtype), torch.randn(Kd, N).to(mm_dtype)
        best = _best_time(lambda: a @ b, repeats)
        flop = 2.0 * M * Kd * N * count
        total_flop, total_s = total_flop + flop, total_s + best * count
        per.append(dict(shape=[M, Kd, N], gflops=2.0 * M * Kd * N / best / 1e9))
    M, Kd, N, _ = gemm_shapes(hidden, T)[-1]
    a, b = torch.randn(M, Kd), torch.randn(Kd, N)
    fp32 = 2.0 * M * Kd * N / _best_time(lambda: a @ b, repeats) / 1e9
    return dict(gflops=total_flop / total_s / 1e9, dtype=dtype, fp32_gflops_lm_head=fp32, shapes=per)


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def attn_state_bytes(hidden: int, T: int, K: int, kernel: str, B: int = 1, elem: int = 2) -> int:
    """Analytic bytes of the attention tensors saved for backward over the whole unroll (GQA k/v expanded to H),
    without grad checkpointing (which keeps only each step's inputs and recomputes the rest); elem = bytes per
    q/k/v element (2 under bf16 autocast).

    flash_cpu/chunked, step k: q, k0, v0, out [T,hd] + k diagonal keys/values + fp32 lse, per head.
    eager, step k: probs [T,T+k] (cast back to q's dtype) + q, k0, v0 and the k diagonal keys/values, per head.
    """
    H, hd = TARGETS[hidden]["num_attention_heads"], TARGETS[hidden]["head_dim"]
    kernel = path_settings(kernel)["kernel"]
    total = 0
    for k in range(K):
        if kernel == "eager":
            total += B * H * T * ((T + k) * elem + (3 + 2 * k) * hd * elem)
        else:
            total += B * H * T * ((4 + 2 * k) * hd * elem + 4)
    return total


def estimate_peak_gib(hidden: int, T: int, K: int, path: str) -> float:
    """Rough absolute peak RSS of a config (model + grads + Adam + activations + attention), to skip obvious OOMs.

    Non-attention activations per step: ~1.5 [T, draft_vocab] fp32 with materialised logits (log-softmax saved,
    logits and grads in flight), ~20 [T, h] and ~4 [T, I] tensors; the eager kernel adds ~3 transient
    [H, T, T+K] fp32 score tensors on top of its saved state.
    """
    cfg = draft_config(hidden)
    h, inter, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    with torch.device("meta"):  # parameter counts without allocating
        draft = Eagle3Draft(cfg)
    trainable = sum(p.numel() for p in draft.trainable_parameters())
    model = 4 * (4 * trainable) + 2 * 2 * cfg.vocab_size * h + 0.5 * 2**30  # params, grads, Adam; embed + head
    logits = 0 if path_settings(path)["fused"] else 1.5 * cfg.draft_vocab_size
    acts = 4 * T * K * (logits + 20 * h + 4 * inter)
    transient = 3 * H * T * (T + K) * 4 if path_settings(path)["kernel"] == "eager" else 0
    return (model + acts + transient + attn_state_bytes(hidden, T, K, path)) / 2**30


# ----------------------------------------------------------------------------------------------------------------
# One config in this (fresh) process


def run_one(spec: dict) -> dict:
    """Build, then time 1 warm-up + `steps` trainer steps; peak RSS growth over the built state."""
    torch.set_num_threads(spec["threads"])
    if spec.get("draft_vocab"):
        global DRAFT_VOCAB
        DRAFT_VOCAB = spec["draft_vocab"]
    # The target's outputs in bf16 only where the step runs bf16 (a CPU without native bf16 runs all of it fp32).
    draft, batch = build(spec["hidden"], spec["T"], docs=spec.get("docs", 1),
                         target_dtype=torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32)
    # aerie paths: the trainer's fused AdamW (jobs.train_loop.adamw); before/eager: torch's default (foreach)
    opt = torch.optim.AdamW(draft.trainable_parameters(), lr=1e-4, fused=spec["path"].startswith("aerie"))
    try:  # reset the RSS high-water mark so transient build memory does not hide the step's peak (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times, loss = [], [], None
    for _ in range(1 + spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        out = trainer_step(draft, batch, opt, spec)
        times.append(time.perf_counter() - t0)
        cpu_times.append((time.process_time() - c0) / spec["threads"])
        loss = out.loss.item()
        del out
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_s = min(times[1:])
    return dict(spec, step_s=step_s, tokens_per_s=spec["T"] / step_s, cpu_s=min(cpu_times[1:]),
                median_step_s=statistics.median(times[1:]), peak_mib=(peak_kib - base_kib) / 1024,
                base_mib=base_kib / 1024, warmup_s=times[0], times_s=times[1:], loss=loss)


def spawn(arg: str, spec: dict) -> dict:
    """Run `spec` in a fresh interpreter (this script with --one/--rate) and return its result record."""
    proc = subprocess.run([sys.executable, __file__, arg, json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    why = "killed (OOM?)" if proc.returncode in (-9, 137) else f"failed rc={proc.returncode}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return dict(spec, status=why, error="\n".join(tail))


# ----------------------------------------------------------------------------------------------------------------
# Sanity check and report


def check_paths_match(hidden: int = 576, T: int = 256, K: int = 7) -> dict:
    """Same draft, inputs and fp32 teacher through every path in fp32: loss and gradients must agree with eager
    (T=256: `aerie` runs the chunked kernel, `aerie-flash` the CPU flash op)."""
    draft, batch = build(hidden, T)
    teacher = teacher_for(batch, "fp32")
    res = {}
    for path in ("eager", "aerie", "aerie-flash"):
        ps = path_settings(path)
        draft.zero_grad()
        out = train_step(draft, batch, K, ps["kernel"], dtype="fp32", fused=ps["fused"], teacher=teacher)
        res[path] = (out.loss.detach(), out.loss_k, [p.grad.clone() for p in draft.trainable_parameters()])
    ref_loss, ref_k, ref_g = res["eager"]
    report = dict(hidden=hidden, T=T, K=K, loss_eager=ref_loss.item())
    for path in ("aerie", "aerie-flash"):
        loss, loss_k, grads = res[path]
        report[path] = dict(
            loss_rel_diff=((loss - ref_loss).abs() / ref_loss.abs()).item(),
            loss_k_max_abs_diff=(loss_k - ref_k).abs().max().item(),
            grad_max_rel_diff=max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                                  for g, r in zip(grads, ref_g)),
        )
    return report


def doc_lengths(T: int, docs: int) -> list[int]:
    """Lengths of the `docs` samples `build` packs into T positions."""
    return torch.bincount(torch.arange(T) * docs // T).tolist()


def goals(rows: list[dict], rates: dict, docs: int = 1) -> list[dict]:
    """Issue 13's goals from this run's rows: % of the FLOP floor, speed-up vs eager, memory vs eager."""
    by = {(r["hidden"], r["T"], r["K"], r["path"]): r for r in rows if "step_s" in r}
    out = []
    for (h, T, K, path), r in sorted(by.items()):
        if path != "aerie":
            continue
        rate = rates.get(f"{h}/{T}", {}).get("gflops")
        g = dict(hidden=h, T=T, K=K, tokens_per_s=r["tokens_per_s"])
        if rate:
            floor = rate * 1e9 / flops_per_token(h, T, K, doc_lengths(T, docs))["draft"]
            g.update(floor_tokens_per_s=floor, pct_of_floor=100 * r["tokens_per_s"] / floor, matmul_gflops=rate)
        for other in ("eager", "before"):
            o = by.get((h, T, K, other))
            if o:
                g[f"speedup_vs_{other}"] = o["step_s"] / r["step_s"]
                g[f"cpu_speedup_vs_{other}"] = o["cpu_s"] / r["cpu_s"]
                g[f"peak_ratio_vs_{other}"] = r["peak_mib"] / o["peak_mib"] if o["peak_mib"] > 0 else None
        out.append(g)
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = ["| hidden | T | K | path | tokens/s | step s | CPU s | peak MiB | attn state MiB |",
             "|---:|---:|---:|:---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['hidden']} | {r['T']} | {r['K']} | {r['path']} |"
        state = f"{r['attn_state_mib']:.0f}"
        if "step_s" in r:
            lines.append(f"{head} {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | "
                         f"{r['peak_mib']:.0f} | {state} |")
        else:
            lines.append(f"{head} {r['status']} | – | – | – | {state} |")
    return "\n".join(lines)


def goals_table(gs: list[dict]) -> str:
    lines = ["| hidden | T | K | aerie tok/s | floor tok/s (matmul GFLOP/s) | % of floor | × eager (CPU s) | "
             "× before (CPU s) | peak vs eager |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda g, k, fmt: fmt.format(g[k]) if g.get(k) is not None else "–"  # noqa: E731
    for g in gs:
        floor = f"{g['floor_tokens_per_s']:.0f} ({g['matmul_gflops']:.0f})" if "floor_tokens_per_s" in g else "–"
        lines.append(f"| {g['hidden']} | {g['T']} | {g['K']} | {g['tokens_per_s']:.0f} | {floor} | "
                     f"{f(g, 'pct_of_floor', '{:.0f}%')} | {f(g, 'speedup_vs_eager', '{:.2f}')} "
                     f"({f(g, 'cpu_speedup_vs_eager', '{:.2f}')}) | {f(g, 'speedup_vs_before', '{:.2f}')} "
                     f"({f(g, 'cpu_speedup_vs_before', '{:.2f}')}) | {f(g, 'peak_ratio_vs_eager', '{:.2f}')} |")
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
    p.add_argument("--hidden", type=csv(int), default=[576], help=f"target hidden sizes {sorted(TARGETS)}")
    p.add_argument("--T", type=csv(int), default=[512, 2048], help="sequence lengths")
    p.add_argument("--K", type=csv(int), default=[7], help="TTT lengths")
    p.add_argument("--paths", "--kernels", type=csv(str), default=list(PATHS), help=",".join(PATHS))
    p.add_argument("--draft-vocab", type=int, help="override every shape's draft vocab")
    p.add_argument("--docs", type=int, default=1, help="samples packed per row (equal lengths; 1 = unpacked)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per config (best) after 1 warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo trainer uses 1)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 = CPU autocast over fp32 weights, bf16 target outputs; auto (the trainer's default): "
                        "bf16 where this CPU multiplies bf16 natively (AVX512-BF16 / AMX), else fp32")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each TTT step in backward")
    p.add_argument("--mem-limit-gib", type=float, default=20.0, help="skip configs estimated above this")
    p.add_argument("--no-check", action="store_true", help="skip the fp32 eager vs aerie/chunked parity check")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one JSON spec in this process
    p.add_argument("--rate", help=argparse.SUPPRESS)  # internal: measure the matmul rate of one shape
    args = p.parse_args()
    if args.dtype == "auto":
        from eagle3.numerics import native_matmul

        args.dtype = "bf16" if native_matmul(torch.bfloat16, "cpu") else "fp32"

    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    if args.rate:
        spec = json.loads(args.rate)
        if spec.get("draft_vocab"):
            globals()["DRAFT_VOCAB"] = spec["draft_vocab"]
        print("RESULT " + json.dumps(matmul_rate(spec["hidden"], spec["T"], spec["threads"], spec["dtype"])),
              flush=True)
        return
    if unknown := set(args.paths) - set(PATHS):
        p.error(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    if unknown := set(args.hidden) - set(TARGETS):
        p.error(f"unknown hidden sizes {sorted(unknown)}; choose from {sorted(TARGETS)}")
    if args.draft_vocab:
        globals()["DRAFT_VOCAB"] = args.draft_vocab

    load_before = os.getloadavg()
    specs = [dict(hidden=h, T=T, K=K, path=path, steps=args.steps, threads=args.threads, dtype=args.dtype,
                  grad_checkpoint=args.grad_checkpoint, draft_vocab=args.draft_vocab, docs=args.docs)
             for h in args.hidden for T in args.T for K in args.K for path in args.paths]
    rows, rates = [], {}
    bar = tqdm(specs, unit="config", dynamic_ncols=True)
    for spec in bar:
        key = f"{spec['hidden']}/{spec['T']}"
        if key not in rates:  # the matmul rate at these shapes, measured between the configs that use it
            bar.set_description(f"matmul rate h={spec['hidden']} T={spec['T']}")
            rates[key] = spawn("--rate", spec)
            tqdm.write(f"{spec['dtype']} matmul rate at h={spec['hidden']} T={spec['T']} shapes: "
                       f"{rates[key].get('gflops', float('nan')):.0f} GFLOP/s")
        name = f"h={spec['hidden']} T={spec['T']} K={spec['K']} {spec['path']}"
        bar.set_description(name)
        est = estimate_peak_gib(spec["hidden"], spec["T"], spec["K"], spec["path"])
        row = dict(spec, status=f"skipped (est. {est:.1f} GiB)") if est > args.mem_limit_gib else spawn("--one", spec)
        row.update(est_peak_gib=est, attn_state_mib=attn_state_bytes(spec["hidden"], spec["T"], spec["K"],
                                                                      spec["path"]) / 2**20,
                   flops_per_token=flops_per_token(spec["hidden"], spec["T"], spec["K"],
                                                   doc_lengths(spec["T"], args.docs)))
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
        check = check_paths_match()
        print(f"\nsanity (h={check['hidden']} T={check['T']} K={check['K']}, fp32, same inputs and teacher): "
              f"aerie vs eager: loss rel diff {check['aerie']['loss_rel_diff']:.1e}, max grad rel diff "
              f"{check['aerie']['grad_max_rel_diff']:.1e}; aerie-flash: {check['aerie-flash']['loss_rel_diff']:.1e} / "
              f"{check['aerie-flash']['grad_max_rel_diff']:.1e}")

    gs = goals(rows, rates, args.docs)
    meta = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), threads=args.threads, steps=args.steps,
                dtype=args.dtype, grad_checkpoint=args.grad_checkpoint, batch=1, docs_per_row=args.docs, torch=torch.__version__,
                cpu=cpu_name(), cpu_count=os.cpu_count(), loadavg_before=load_before, loadavg_after=os.getloadavg(),
                timing="best of the timed steps after 1 warm-up; CPU s = process CPU time / threads",
                peak_mib="ru_maxrss growth over the built model+inputs, fresh process")
    print(f"\nTrainer step (teacher + TTT fwd+bwd + AdamW), batch 1, {args.docs} sample(s) per row, {args.dtype}, "
          f"{args.threads} thread(s), best of {args.steps} steps{', grad checkpointing' if args.grad_checkpoint else ''}\n")
    print(markdown_table(rows))
    print("\nGoals (aerie path)\n")
    print(goals_table(gs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    record = dict(meta=meta, check=check, matmul_rates=rates, goals=gs, results=rows)
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
