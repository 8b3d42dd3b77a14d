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
- `chunked`: a portable query-chunked PyTorch version (any device, O(chunk·T) transient memory).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from eagle3 import numerics

CHUNK = 128  # queries per block in the portable kernel; bounds its transient memory to chunk·T scores
# CPU auto choice: up to this T the chunked kernel (bf16 matmuls, causal key range per block) beats the fused
# CPU flash op, which is slow at these sizes; above it flash wins (benchmarks/ttt_step.py, BENCHMARKS.md).
CPU_CHUNKED_MAX_T = 1024


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
    """The causal-block kernel `attention_kernel='auto'` picks: CUDA flex; CPU chunked up to CPU_CHUNKED_MAX_T
    positions, else flash_cpu; other devices chunked."""
    if device.type == "cuda":
        return "flex"
    if device.type == "cpu":
        return "chunked" if T <= CPU_CHUNKED_MAX_T else "flash_cpu"
    return "chunked"


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
    if extra_k:
        kd = _expand_kv(torch.stack(extra_k, dim=3), groups)  # [B, H, T, k, hd]
        vd = _expand_kv(torch.stack(extra_v, dim=3), groups)
    else:
        kd = vd = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], 0, q.shape[3])
    if kernel == "flex":  # GQA inside the kernel: step-0 keys stay at Hkv heads
        out_c, lse_c = flex_causal(q, k0.to(q.dtype), v0.to(q.dtype), kv.block_mask(q.shape[0], q.shape[2], q.device))
        return merge_diagonal(q, out_c, lse_c, kd.to(q.dtype), vd.to(q.dtype))
    k0, v0 = _expand_kv(k0, groups), _expand_kv(v0, groups)
    mask = kv.causal_mask(q.dtype)
    return _TTTAttention.apply(q, k0.to(q.dtype), v0.to(q.dtype), kd.to(q.dtype), vd.to(q.dtype), mask, kernel)


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
    """Merge the causal block's (out, LSE) with each query's k diagonal keys kd/vd [B,H,T,k,hd] (expanded to H):
    the softmax over [causal keys, diagonal keys] in closed form, in fp32, differentiable in every input."""
    if kd.shape[3] == 0:
        return out_c
    scale = 1.0 / math.sqrt(q.shape[-1])
    acc = _acc(q)
    s_d = torch.einsum("bhtd,bhtkd->bhtk", q.to(acc), kd.to(acc)) * scale  # [B, H, T, k]
    lse = torch.logaddexp(lse_c, torch.logsumexp(s_d, dim=-1))
    out = (torch.exp(lse_c - lse)[..., None] * out_c.to(acc)
           + torch.einsum("bhtk,bhtkd->bhtd", torch.exp(s_d - lse[..., None]), vd.to(acc)))
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Causal block kernels: forward returns (out, lse); backward takes the MERGED out/lse.


def _causal_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, kernel: str) -> tuple[Tensor, Tensor]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kernel == "flash_cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale
        )
        return out, lse.to(_acc(q))
    T, acc = q.shape[2], _acc(q)
    outs, lses = [], []
    for s in range(0, T, CHUNK):
        e = min(s + CHUNK, T)
        # Matmuls in the inputs' dtype (bf16: AMX / tensor cores), softmax statistics in fp32.
        # Causal: queries s..e-1 see keys 0..e-1 only, so later keys are never touched.
        scores = (q[:, :, s:e] @ k[:, :, :e].transpose(-1, -2)).to(acc) * scale  # [B, H, c, e]
        scores = scores + _block_mask(mask, s, e, q.device).to(acc)
        # Softmax by hand, not logsumexp + exp: its exps are floored (masked -inf entries hit CPU exp's slow path).
        m = scores.amax(-1, keepdim=True)  # [B, H, c, 1]; finite: every query sees at least itself
        p = numerics.exp_floored_(scores.sub_(m))
        total = p.sum(-1, keepdim=True)
        outs.append((p.div_(total).to(q.dtype) @ v[:, :, :e]).to(q.dtype))
        lses.append((m + total.log()).squeeze(-1))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _causal_bwd(
    g: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None, kernel: str
) -> tuple[Tensor, Tensor, Tensor]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kernel == "flash_cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, out, lse, 0.0, mask is None, attn_mask=mask, scale=scale
        )
    T, acc = q.shape[2], _acc(q)
    dq = torch.empty_like(q, dtype=acc)
    dk = torch.zeros_like(k, dtype=acc)
    dv = torch.zeros_like(v, dtype=acc)
    dt = q.dtype
    delta = (g.to(acc) * out.to(acc)).sum(-1)  # [B, H, T]: rowsum(dO ∘ O) of the merged softmax
    for s in range(0, T, CHUNK):
        e = min(s + CHUNK, T)
        qc, gc = q[:, :, s:e], g[:, :, s:e].to(dt)
        kc, vc = k[:, :, :e], v[:, :, :e]  # causal: keys 0..e-1
        scores = (qc @ kc.transpose(-1, -2)).to(acc) * scale + _block_mask(mask, s, e, q.device).to(acc)
        p = numerics.exp_floored_(scores.sub_(lse[:, :, s:e, None]))  # [B, H, c, e] fp32
        dv[:, :, :e] += (p.to(dt).transpose(-1, -2) @ gc).to(acc)
        ds = (p * ((gc @ vc.transpose(-1, -2)).to(acc) - delta[:, :, s:e, None])).to(dt)
        dq[:, :, s:e] = (ds @ kc).to(acc) * scale
        dk[:, :, :e] += (ds.transpose(-1, -2) @ qc).to(acc) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, else the input's (fp64 stays fp64 for exact tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _block_mask(mask: Tensor | None, s: int, e: int, device: torch.device) -> Tensor:
    """Additive mask of queries s..e-1 over keys 0..e-1 (the packed mask's block, else causal)."""
    if mask is not None:
        return mask[:, :, s:e, :e].float()
    rows = torch.arange(s, e, device=device)[:, None]
    cols = torch.arange(e, device=device)[None, :]
    return torch.zeros(e - s, e, device=device).masked_fill_(cols > rows, float("-inf"))


class _TTTAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k0, v0, kd, vd, mask, kernel):  # noqa: D401 - autograd signature
        scale = 1.0 / math.sqrt(q.shape[-1])
        out_c, lse_c = _causal_fwd(q, k0, v0, mask, kernel)  # [B,H,T,hd], [B,H,T]
        if kd.shape[3] == 0:
            out, lse = out_c, lse_c
        else:
            acc = _acc(q)
            s_d = torch.einsum("bhtd,bhtkd->bhtk", q.to(acc), kd.to(acc)) * scale  # [B, H, T, k]
            lse = torch.logaddexp(lse_c, torch.logsumexp(s_d, dim=-1))
            p_d = torch.exp(s_d - lse[..., None])
            out = torch.exp(lse_c - lse)[..., None] * out_c.to(acc) + torch.einsum("bhtk,bhtkd->bhtd", p_d, vd.to(acc))
            out = out.to(q.dtype)
        ctx.save_for_backward(q, k0, v0, kd, vd, out, lse, mask)
        ctx.kernel = kernel
        return out

    @staticmethod
    def backward(ctx, g):
        q, k0, v0, kd, vd, out, lse, mask = ctx.saved_tensors
        g = g.contiguous()
        dq, dk0, dv0 = _causal_bwd(g, q, k0, v0, out, lse, mask, ctx.kernel)
        if kd.shape[3] == 0:
            return dq, dk0, dv0, torch.zeros_like(kd), torch.zeros_like(vd), None, None
        scale = 1.0 / math.sqrt(q.shape[-1])
        acc = _acc(q)
        qf, gf, kdf, vdf = q.to(acc), g.to(acc), kd.to(acc), vd.to(acc)
        p_d = torch.exp(torch.einsum("bhtd,bhtkd->bhtk", qf, kdf) * scale - lse[..., None])  # [B, H, T, k]
        delta = (gf * out.to(acc)).sum(-1, keepdim=True)  # [B, H, T, 1]
        dvd = p_d[..., None] * gf[:, :, :, None, :]
        ds = p_d * (torch.einsum("bhtd,bhtkd->bhtk", gf, vdf) - delta)
        dq = dq.to(acc) + torch.einsum("bhtk,bhtkd->bhtd", ds, kdf) * scale
        dkd = ds[..., None] * qf[:, :, :, None, :] * scale
        return dq.to(q.dtype), dk0, dv0, dkd.to(kd.dtype), dvd.to(vd.dtype), None, None
