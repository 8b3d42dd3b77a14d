"""TTT attention: step-0 causal keys plus one "diagonal" key per later step, without any [T, T] tensor per step.

At TTT step k the query at index i attends to the step-0 keys 0..i of its own sample (causal + padding/packing
mask) and to the key at the same index i from each of steps 1..k. The official code materialises the [B,H,T,T]
scores of every step for backward (memory K·T²). Here the causal block runs as a flash-style kernel that returns
its log-sum-exp; the k diagonal keys are merged in closed form; and a custom backward calls the kernel's own
backward with the MERGED output and log-sum-exp, which is exactly the gradient of the full softmax restricted to
the causal keys (FlashAttention's split-KV identity). Saved state per step is O(B·H·T·(hd + k)): linear in K.

Kernels for the causal block:
- `flash_cpu`: the fused CPU flash op (`aten._scaled_dot_product_flash_attention_for_cpu`), custom backward as above;
- `flex` (CUDA): `flex_attention` compiled to a fused Triton kernel with a document-causal BlockMask (packing
  without a dense mask), returning the log-sum-exp; flex differentiates through its LSE, so the diagonal merge
  runs in plain autograd on top of it;
- `chunked`: a portable query-blocked PyTorch kernel (any device; the CPU default), O(chunk·T) transient memory.
  GQA runs inside (each kv head's query heads share one matmul, so k/v and their gradients stay at Hkv heads); a
  block plan per unroll gives each query block its key range (packed rows skip the earlier samples' keys) and
  where the mask must be added; probabilities come from torch.softmax (its exp is ~2x faster than aten::exp_ on
  CPU and has no slow path for masked entries), the LSE from the row max and the largest probability.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


CHUNK = 128  # queries per block in the portable kernel; bounds its transient memory to chunk·T scores per kv head


@dataclass
class TTTKV:
    """Per-unroll attention state: step-0 keys/values and the diagonal keys/values of steps 1..k."""

    doc_ids: Tensor | None = None  # [B, T] long: sample index inside a packed row, -1 at padding; None = unpacked
    kernel: str = "auto"  # "auto" | "flash_cpu" | "flex" | "chunked"
    k0: Tensor | None = None  # [B, Hkv, T, hd]
    v0: Tensor | None = None
    extra_k: list[Tensor] = field(default_factory=list)  # each [B, Hkv, T, hd]
    extra_v: list[Tensor] = field(default_factory=list)
    _mask: Tensor | None = None  # additive [B, 1, T, T] for packed rows, built once per unroll
    _block_mask: object | None = None  # flex BlockMask (document-causal), built once per unroll
    _plan: list | None = None  # chunked kernel's (s, e, lo, hi) query blocks, built once per unroll

    def snapshot(self) -> "TTTKV":
        """A copy that later `push` calls don't change (activation checkpointing recomputes a step later)."""
        return dataclasses.replace(self, extra_k=list(self.extra_k), extra_v=list(self.extra_v))

    def push(self, k: Tensor, v: Tensor) -> None:
        """Record the keys/values of the step just computed."""
        if self.k0 is None:
            self.k0, self.v0 = k, v
        else:
            self.extra_k.append(k)
            self.extra_v.append(v)

    def causal_mask(self, dtype: torch.dtype) -> Tensor | None:
        """Additive mask for packed rows (same sample and causal; every query sees itself), else None."""
        if self.doc_ids is None:
            return None
        if self._mask is None or self._mask.dtype != dtype:
            self._mask = packed_causal_bias(self.doc_ids, dtype)
        return self._mask

    def chunk_plan(self, T: int) -> list[tuple[int, int, int, int]]:
        """The chunked kernel's query blocks and their key ranges (`_chunk_plan`), built once per unroll."""
        if self._plan is None:
            self._plan = _chunk_plan(self.doc_ids, T, CHUNK)
        return self._plan

    def block_mask(self, B: int, T: int, device: torch.device):
        """The flex BlockMask of this unroll: causal, and within one packed sample when doc_ids is set."""
        if self._block_mask is None:
            self._block_mask = document_block_mask(self.doc_ids, B, T, device)
        return self._block_mask


def document_block_mask(doc_ids: Tensor | None, B: int, T: int, device: torch.device):
    """flex_attention BlockMask: query i sees key j iff j <= i and (doc_ids given) both lie in the same packed
    sample. Padding (-1) positions see earlier padding, as in `packed_causal_bias`; their outputs are unused.
    On CUDA the mask is built by a compiled kernel (no transient [B, T, T] bool); elsewhere eagerly."""
    from functools import partial

    from torch.nn.attention.flex_attention import create_block_mask

    create_block_mask = partial(create_block_mask, _compile=device.type == "cuda")
    if doc_ids is None:
        def mask_mod(b, h, q, kv):
            return kv <= q
        return create_block_mask(mask_mod, None, None, T, T, device=device)
    docs = doc_ids.to(device)

    def mask_mod(b, h, q, kv):  # noqa: F811 - one of two closures
        return (kv <= q) & (docs[b, q] == docs[b, kv])

    return create_block_mask(mask_mod, B, None, T, T, device=device)


def packed_causal_bias(doc_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive [B, 1, T, T] mask (0 / dtype min): query i sees key j iff j <= i in the same packed sample
    (doc_ids [B, T], -1 = padding). Used by the draft's TTT attention and by the target alike.

    Every query also sees itself, so padding rows are never empty (their outputs are unused). Float, not bool:
    eager attention with bool 4D masks is silently wrong in transformers.
    """
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
    allowed |= torch.eye(T, dtype=torch.bool, device=doc_ids.device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    """[B, Hkv, ...] → [B, Hkv*groups, ...] for GQA (head j uses kv head j // groups, as in HF)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def auto_kernel(device: torch.device, T: int) -> str:
    """The causal-block kernel `attention_kernel='auto'` picks: CUDA flex; elsewhere chunked (on CPU ~1.7x faster
    than the fused CPU flash op at T = 2,048 and 4,096, forward + backward: BENCHMARKS.md)."""
    return "flex" if device.type == "cuda" else "chunked"


def ttt_attention(q: Tensor, k: Tensor, v: Tensor, kv: TTTKV) -> Tensor:
    """Attention of one TTT step. q [B,H,T,hd]; k, v [B,Hkv,T,hd] of this step. Returns [B,H,T,hd].

    Pure (no state change), so a step can be recomputed under activation checkpointing; the caller records this
    step's k/v with `kv.push` afterwards. With no step-0 keys yet, k/v are the step-0 keys.
    """
    groups = q.shape[1] // k.shape[1]
    if kv.k0 is None:
        k0, v0, extra_k, extra_v = k, v, [], []
    else:
        k0, v0, extra_k, extra_v = kv.k0, kv.v0, [*kv.extra_k, k], [*kv.extra_v, v]
    kernel = kv.kernel
    if kernel == "auto":
        kernel = auto_kernel(q.device, q.shape[2])
    if extra_k:  # [B, Hkv, T, k, hd]: the merge handles GQA
        kd, vd = torch.stack(extra_k, dim=3), torch.stack(extra_v, dim=3)
    else:
        kd = vd = q.new_zeros(k.shape[0], k.shape[1], k.shape[2], 0, k.shape[3])
    if kernel == "flex":  # GQA inside the kernel: step-0 keys stay at Hkv heads
        out_c, lse_c = flex_causal(q, k0.to(q.dtype), v0.to(q.dtype), kv.block_mask(q.shape[0], q.shape[2], q.device))
        return merge_diagonal(q, out_c, lse_c, kd.to(q.dtype), vd.to(q.dtype))
    if kernel == "flash_cpu":
        k0, v0, mask, plan = _expand_kv(k0, groups), _expand_kv(v0, groups), kv.causal_mask(q.dtype), None
    else:  # chunked: GQA inside the kernel, fp32 mask, blocks that skip other samples' keys
        mask, plan = kv.causal_mask(_acc(q)), kv.chunk_plan(q.shape[2])
    return _TTTAttention.apply(q, k0.to(q.dtype), v0.to(q.dtype), kd.to(q.dtype), vd.to(q.dtype), mask, kernel, plan)


# ----------------------------------------------------------------------------------------------------------------
# flex: the causal block by flex_attention (differentiable out and LSE), the diagonal keys merged in autograd.

_FLEX = None


def _compiled_flex():
    """flex_attention compiled once per process (uncompiled it is a slow reference on CUDA, forward-only on CPU)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_causal(q: Tensor, k: Tensor, v: Tensor, block_mask) -> tuple[Tensor, Tensor]:
    """(out [B,H,T,hd] in q's dtype, natural-log LSE [B,H,T] fp32) of the causal block; k/v may have fewer (GQA)
    heads. Compiled on CUDA; elsewhere the eager reference (CPU: forward only, flex has no CPU backward)."""
    if q.device.type == "cuda":
        fn = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as fn
    kw = dict(block_mask=block_mask, scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=k.shape[1] != q.shape[1])
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        out, lse = fn(q, k, v, return_lse=True, **kw)
    else:
        out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kw)
        lse = aux.lse
    return out, lse.float()


def merge_diagonal(q: Tensor, out_c: Tensor, lse_c: Tensor, kd: Tensor, vd: Tensor) -> Tensor:
    """Merge the causal block's (out, LSE) with each query's k diagonal keys kd/vd [B,Hkv,T,k,hd]:
    the softmax over [causal keys, diagonal keys] in closed form, in fp32, differentiable in every input."""
    return _merge_fwd(q, out_c, lse_c, kd, vd)[0]


# ----------------------------------------------------------------------------------------------------------------
# Causal block kernels. flash_cpu: forward returns (out, lse); its backward takes the MERGED out/lse. chunked: the
# query-blocked kernel below, GQA inside (k/v stay at Hkv heads: each kv head's g query heads share one matmul).


def _chunk_plan(doc_ids: Tensor | None, T: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """(s, e, lo, hi) per block of queries s..e-1: no query of the block (in any row) sees a key before lo, and
    every query of every row sees keys hi..s-1. So the block multiplies keys lo..e-1 only (packed rows skip the
    earlier samples' keys) and adds the mask only over keys lo..hi-1 and the diagonal block s..e-1.

    Unpacked: lo = hi = 0. Packed (doc_ids [B, T], -1 = padding; a query sees the earlier keys of its own id, as in
    `packed_causal_bias`): lo = the first occurrence of the block's earliest id; hi = the start of the run of equal
    ids that holds the block when every row's block lies in one run, else s. One host copy of doc_ids per unroll."""
    if doc_ids is None:
        return [(s, min(s + chunk, T), 0, 0) for s in range(0, T, chunk)]
    doc = doc_ids.detach().to("cpu", torch.long)
    ar = torch.arange(T)
    first = torch.empty_like(doc)  # first[b, i] = min j with doc[b, j] == doc[b, i]
    run = torch.empty_like(doc)  # run[b, i] = start of the run of equal ids that holds i
    for b in range(doc.shape[0]):
        vals, inv = torch.unique(doc[b], return_inverse=True)
        first[b] = torch.full((len(vals),), T).scatter_reduce_(0, inv, ar, "amin")[inv]
        starts = torch.ones(T, dtype=torch.bool)
        starts[1:] = doc[b, 1:] != doc[b, :-1]
        run[b] = torch.cummax(torch.where(starts, ar, 0), 0).values
    plan = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        lo = int(first[:, s:e].min())
        one_run = bool((run[:, e - 1] == run[:, s]).all())
        plan.append((s, e, lo, max(int(run[:, s].max()), lo) if one_run else s))
    return plan


def _block_scores(qc: Tensor, k: Tensor, mask: Tensor | None, s: int, e: int, lo: int, hi: int, g: int) -> Tensor:
    """fp32 scaled, masked scores [B, Hkv, g, c, e-lo] of queries qc [B, Hkv, g*c, hd] (= s..e-1) over keys lo..e-1.

    The matmul runs in the inputs' dtype (bf16: AMX / tensor cores); the mask (fp32, see `_TTTAttention`) is added
    only where a key may be hidden: keys lo..hi-1 and the diagonal block."""
    B, Hkv, _, hd = qc.shape
    c = e - s
    raw = qc @ k[:, :, lo:e].transpose(-1, -2)
    scores = raw.to(_acc(qc)).mul_(1.0 / math.sqrt(hd)).view(B, Hkv, g, c, e - lo)
    if mask is None:  # unpacked: causal inside the diagonal block only
        tri = torch.full((c, c), float("-inf"), device=qc.device, dtype=scores.dtype).triu_(1)
        scores[..., s - lo:].add_(tri)
        return scores
    m = mask[:, :, None, s:e]  # [B, 1, 1, c, T]
    if hi > lo:
        scores[..., : hi - lo].add_(m[..., lo:hi])
    scores[..., s - lo:].add_(m[..., s:e])
    return scores


def _chunked_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, plan) -> tuple[Tensor, Tensor]:
    """(out [B,H,T,hd] in q's dtype, natural-log LSE [B,H,T] fp32) of the causal block; k, v [B,Hkv,T,hd]."""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    g, dt = H // Hkv, q.dtype
    q5 = q.reshape(B, Hkv, g, T, hd)
    out = q.new_empty(B, Hkv, g, T, hd)
    lse = torch.empty(B, Hkv, g, T, dtype=_acc(q), device=q.device)
    for s, e, lo, hi in plan:
        c = e - s
        qc = q5[:, :, :, s:e].reshape(B, Hkv, g * c, hd)
        scores = _block_scores(qc, k, mask, s, e, lo, hi, g)
        # torch.softmax, not exp by hand: its fused exp is ~2x faster than aten::exp_ on CPU and has no slow path
        # for the masked entries. LSE = max + log(sum) and sum = 1 / (the largest probability).
        p = torch.softmax(scores, -1)
        lse[..., s:e] = (scores.amax(-1) - p.amax(-1).log())
        out[:, :, :, s:e] = (p.to(dt).view(B, Hkv, g * c, e - lo) @ v[:, :, lo:e]).view(B, Hkv, g, c, hd)
    return out.view(B, H, T, hd), lse.view(B, H, T)


def _chunked_bwd(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lse_c: Tensor,
                 mask: Tensor | None, plan) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the causal block's inputs, given the MERGED out/lse (causal + diagonal keys) and the causal
    block's own lse_c: the merged probabilities of the causal keys are softmax_causal · exp(lse_c - lse)."""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    g, dt, acc = H // Hkv, q.dtype, _acc(q)
    scale = 1.0 / math.sqrt(hd)
    q5, g5 = q.reshape(B, Hkv, g, T, hd), grad.to(dt).reshape(B, Hkv, g, T, hd)
    delta = (grad.to(acc) * out.to(acc)).sum(-1).view(B, Hkv, g, T, 1)  # rowsum(dO ∘ O) of the merged softmax
    w = torch.exp(lse_c - lse).view(B, Hkv, g, T, 1)
    dq = torch.empty(B, Hkv, g, T, hd, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for s, e, lo, hi in plan:
        c, n = e - s, e - lo
        qc = q5[:, :, :, s:e].reshape(B, Hkv, g * c, hd)
        gc = g5[:, :, :, s:e].reshape(B, Hkv, g * c, hd)
        kc, vc = k[:, :, lo:e], v[:, :, lo:e]
        p = torch.softmax(_block_scores(qc, k, mask, s, e, lo, hi, g), -1).mul_(w[:, :, :, s:e])
        dv[:, :, lo:e] += (p.to(dt).view(B, Hkv, g * c, n).transpose(-1, -2) @ gc).to(acc)
        dp = (gc @ vc.transpose(-1, -2)).view(B, Hkv, g, c, n)
        ds = p.mul_(dp.to(acc).sub_(delta[:, :, :, s:e])).to(dt).view(B, Hkv, g * c, n)
        dq[:, :, :, s:e] = (ds @ kc).to(acc).mul_(scale).view(B, Hkv, g, c, hd)
        dk[:, :, lo:e] += (ds.transpose(-1, -2) @ qc).to(acc).mul_(scale)
    return dq.view(B, H, T, hd).to(dt), dk.to(k.dtype), dv.to(v.dtype)


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, else the input's (fp64 stays fp64 for exact tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _merge_fwd(q: Tensor, out_c: Tensor, lse_c: Tensor, kd: Tensor, vd: Tensor) -> tuple[Tensor, Tensor]:
    """Merged (out [B,H,T,hd] in q's dtype, lse [B,H,T]) of the causal block and each query's diagonal keys kd/vd
    [B,Hkv,T,k,hd] (GQA: kv head n serves query heads n*g..n*g+g-1), in fp32, differentiable in every input."""
    if kd.shape[3] == 0:
        return out_c, lse_c
    B, H, T, hd = q.shape
    Hkv, acc = kd.shape[1], _acc(q)
    g = H // Hkv
    s_d = torch.einsum("bngtd,bntkd->bngtk", q.reshape(B, Hkv, g, T, hd).to(acc), kd.to(acc)) / math.sqrt(hd)
    lse_c = lse_c.reshape(B, Hkv, g, T)
    lse = torch.logaddexp(lse_c, torch.logsumexp(s_d, dim=-1))
    p_d = torch.exp(s_d - lse[..., None])
    out = (torch.exp(lse_c - lse)[..., None] * out_c.reshape(B, Hkv, g, T, hd).to(acc)
           + torch.einsum("bngtk,bntkd->bngtd", p_d, vd.to(acc)))
    return out.reshape(B, H, T, hd).to(q.dtype), lse.reshape(B, H, T)


class _TTTAttention(torch.autograd.Function):
    """Causal block + diagonal keys with a custom backward. flash_cpu takes k0/v0 expanded to H heads and the packed
    mask in q's dtype; chunked takes k0/v0 at Hkv heads, the mask in fp32 (added to fp32 scores) and its block plan."""

    @staticmethod
    def forward(ctx, q, k0, v0, kd, vd, mask, kernel, plan):  # noqa: D401 - autograd signature
        if kernel == "flash_cpu":
            out_c, lse_c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k0, v0, 0.0, mask is None, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))
            lse_c = lse_c.to(_acc(q))
        else:
            out_c, lse_c = _chunked_fwd(q, k0, v0, mask, plan)
        out, lse = _merge_fwd(q, out_c, lse_c, kd, vd)
        ctx.save_for_backward(q, k0, v0, kd, vd, out, lse, lse_c, mask)
        ctx.kernel, ctx.plan = kernel, plan
        return out

    @staticmethod
    def backward(ctx, g):
        q, k0, v0, kd, vd, out, lse, lse_c, mask = ctx.saved_tensors
        g = g.contiguous()
        if ctx.kernel == "flash_cpu":
            dq, dk0, dv0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g, q, k0, v0, out, lse, 0.0, mask is None, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))
        else:
            dq, dk0, dv0 = _chunked_bwd(g, q, k0, v0, out, lse, lse_c, mask, ctx.plan)
        if kd.shape[3] == 0:
            return dq, dk0, dv0, torch.zeros_like(kd), torch.zeros_like(vd), None, None, None
        B, H, T, hd = q.shape
        Hkv, acc = kd.shape[1], _acc(q)
        G, scale = H // Hkv, 1.0 / math.sqrt(hd)
        qf, gf = q.reshape(B, Hkv, G, T, hd).to(acc), g.reshape(B, Hkv, G, T, hd).to(acc)
        kdf, vdf = kd.to(acc), vd.to(acc)
        lse5 = lse.reshape(B, Hkv, G, T, 1)
        p_d = torch.exp(torch.einsum("bngtd,bntkd->bngtk", qf, kdf) * scale - lse5)  # [B, Hkv, G, T, k]
        delta = (gf * out.reshape(B, Hkv, G, T, hd).to(acc)).sum(-1, keepdim=True)
        dvd = torch.einsum("bngtk,bngtd->bntkd", p_d, gf)
        ds = p_d * (torch.einsum("bngtd,bntkd->bngtk", gf, vdf) - delta)
        dq = dq.to(acc) + torch.einsum("bngtk,bntkd->bngtd", ds, kdf).reshape(B, H, T, hd) * scale
        dkd = torch.einsum("bngtk,bngtd->bntkd", ds, qf) * scale
        return dq.to(q.dtype), dk0, dv0, dkd.to(kd.dtype), dvd.to(vd.dtype), None, None, None
