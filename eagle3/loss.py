"""EAGLE-3 TTT loss and metrics.

loss_k = -(position_mask · target_p · log_softmax(draft_logits)).sum(-1), reduced over positions, where
position_mask = t2d[target argmax] · label_mask. Total = Σ_k decay^k · loss_k.

Normalisation: the official code takes `.mean()` over all B·T positions (padding and unmasked included), so the
loss scale depends on batch padding. Aerie's default ("valid") divides by the number of labelled positions of
that step; "official" reproduces the official scale for parity checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from eagle3 import numerics

Normalization = Literal["valid", "official"]


def soft_ce_sum(draft_logits: Tensor, target_p: Tensor, position_mask: Tensor) -> Tensor:
    """Σ over positions of the soft cross-entropy of one TTT step (normalised by the caller).

    draft_logits, target_p: [B, T, draft_vocab]; position_mask: [B, T] bool (or fp32 per-position weights).
    """
    logq = F.log_softmax(draft_logits.float(), dim=-1)
    return (-(target_p * logq).sum(-1) * position_mask).sum()


def step_accuracy(draft_tokens: Tensor, target_argmax: Tensor, label_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(correct, count) over labelled positions; draft_tokens and target_argmax are both TARGET ids [B, T]."""
    correct = ((draft_tokens == target_argmax) & label_mask).sum()
    return correct, label_mask.sum()


def simulated_accept_length(acc: Tensor) -> Tensor:
    """Σ_k Π_{j≤k} acc_j: the expected number of accepted draft tokens per verification if step accuracies were
    independent. Real τ also counts the target's bonus token, so compare it with 1 + this."""
    return torch.cumprod(acc, dim=0).sum()


def step_weights(length: int, decay: float) -> Tensor:
    """decay^k for k = 0..length-1 (official: 0.8)."""
    return decay ** torch.arange(length, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Fused draft-vocab loss: lm_head matmul + soft-CE + argmax in row chunks, gradients computed in the forward.

# Rows per chunk = CHUNK_ELEMENTS // draft_vocab: bounds the transient fp32 [rows, draft_vocab] blocks. On CPU a
# block that fits the L2 cache (~8 MiB) is fastest; on GPU fewer, larger blocks keep the kernel launches few.
CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}


# Rows of dz / x staged before one dW += dzᵀ x matmul (see _DWAccumulator): 32 MiB of bf16 on CPU.
DW_BUFFER_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}


def rows_per_chunk(elements: dict[str, int], width: int, device: torch.device) -> int:
    """Rows of a [rows, width] block holding about elements[device type] entries (at least 16); shared by the
    fused loss and the teacher (eagle3.target_head), each with its own per-device budget."""
    return max(16, elements.get(device.type, 1 << 24) // width)


def chunk_rows(draft_vocab: int, device: torch.device) -> int:
    """Rows of one fused-loss chunk on `device`."""
    return rows_per_chunk(CHUNK_ELEMENTS, draft_vocab, device)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


@dataclass
class ScoredRows:
    """The scored positions of one TTT step, as the fused loss reads them."""

    x: Tensor  # [N, h] final-normed draft hidden of the N scored rows (with grad)
    probs: Tensor  # [B, T_k, Vd] teacher distribution (any float dtype); row n is read at (rows[n], cols[n])
    rows: Tensor  # [N] long
    cols: Tensor  # [N] long
    w: Tensor  # [N] fp32 loss weight per row (0 = counted for accuracy, not scored)


class _DWAccumulator:
    """dW = Σ dzᵀ x over every chunk of every step, in fp32, with few large matmuls.

    Adding a [Vd, h] product per small chunk would stream the whole dW through memory once per chunk (on CPU
    that costs as much as the chunk's matmuls), so dz and x rows are staged in buffers of DW_BUFFER_ELEMENTS //
    Vd rows and flushed with one matmul each.
    """

    def __init__(self, weight: Tensor, mm_dtype: torch.dtype, acc: torch.dtype, chunk: int) -> None:
        vd, h = weight.shape
        rows = max(chunk, DW_BUFFER_ELEMENTS.get(weight.device.type, 1 << 24) // vd)
        self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        self.dz = torch.empty(rows, vd, dtype=mm_dtype, device=weight.device)
        self.x = torch.empty(rows, h, dtype=mm_dtype, device=weight.device)
        self.n = 0

    def add(self, dz: Tensor, x: Tensor) -> None:
        while dz.shape[0]:
            take = min(dz.shape[0], self.dz.shape[0] - self.n)
            self.dz[self.n : self.n + take] = dz[:take]
            self.x[self.n : self.n + take] = x[:take]
            self.n += take
            dz, x = dz[take:], x[take:]
            if self.n == self.dz.shape[0]:
                self._flush()

    def _flush(self) -> None:
        if self.n:
            self.dw += self.dz[: self.n].T @ self.x[: self.n]
            self.n = 0

    def result(self) -> Tensor:
        self._flush()
        return self.dw


class _FusedSoftCE(torch.autograd.Function):
    """total = Σ_k coef_k Σ_n w_kn · softCE(x_kn Wᵀ, p_kn) over all K steps at once, plus per-step sums and argmax.

    `total` is the loss itself (a scalar that only gets scaled afterwards), so dL/dz = coef · w · (Σp · softmax(z)
    − p) is known in the forward: every chunk's dx and its share of dW are computed there (the fused linear
    cross-entropy trick) and the backward only scales them by the incoming scalar. Saved state: dx [N_k, h] per
    step and ONE dW [Vd, h] for the whole unroll, never a [N, Vd] tensor.
    """

    @staticmethod
    def forward(ctx, weight, coef, parts, mm_dtype, chunk, *xs):  # noqa: D401 - autograd signature
        acc = torch.promote_types(xs[0].dtype if xs else weight.dtype, torch.float32)
        need_dw = ctx.needs_input_grad[0]
        need_dx = any(ctx.needs_input_grad[5:])
        dev = weight.device
        wm = weight.to(mm_dtype)
        dw = _DWAccumulator(weight, mm_dtype, acc, chunk) if need_dw else None
        ces, argmaxes, dxs = [], [], []
        for k, part in enumerate(parts):
            x = xs[k]
            N = x.shape[0]
            xm = x.to(mm_dtype)
            ce = torch.zeros((), dtype=acc, device=dev)
            argmax = torch.empty(N, dtype=torch.long, device=dev)
            dx = torch.empty_like(x) if need_dx else None
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                # Few passes over each [c, Vd] block (this loop is elementwise-bound on CPU): max and argmax in one,
                # exp in place, dz written straight in the matmul dtype.
                z = (xm[s:e] @ wm.T).to(acc)  # [c, Vd]
                zmax, argmax[s:e] = z.max(-1)
                p = part.probs[part.rows[s:e], part.cols[s:e]].to(acc)  # [c, Vd], a fresh copy
                wc = part.w[s:e].to(acc)
                psum = p.sum(-1)
                pz = torch.linalg.vecdot(p, z)
                ez = numerics.exp_floored_(z.sub_(zmax[:, None]))  # z is not needed after this
                sumexp = ez.sum(-1)
                ce += (wc * ((zmax + torch.log(sumexp)) * psum - pz)).sum()
                if need_dx or need_dw:
                    # dz = coef · w · (Σp · softmax(z) − p)
                    dz = torch.empty(ez.shape, dtype=mm_dtype, device=dev)
                    torch.mul(ez.mul_((psum / sumexp)[:, None]).sub_(p), (wc * coef[k].to(acc))[:, None], out=dz)
                    if need_dx:
                        dx[s:e] = (dz @ wm).to(x.dtype)
                    if need_dw:
                        dw.add(dz, xm[s:e])
            ces.append(ce)
            argmaxes.append(argmax)
            dxs.append(dx)
        ce_k = torch.stack(ces) if ces else torch.zeros(0, dtype=acc, device=dev)
        total = (ce_k * coef.to(acc)).sum()
        ctx.save_for_backward(dw.result() if dw is not None else None, *[d for d in dxs if d is not None])
        ctx.has_dx, ctx.weight_dtype, ctx.num_parts = need_dx, weight.dtype, len(parts)
        ctx.mark_non_differentiable(ce_k, *argmaxes)
        return (total, ce_k, *argmaxes)

    @staticmethod
    def backward(ctx, g, _g_ce, *_g_argmax):
        dw, *dxs = ctx.saved_tensors
        gw = (dw * g).to(ctx.weight_dtype) if dw is not None else None
        gxs = [d * g.to(d.dtype) for d in dxs] if ctx.has_dx else [None] * ctx.num_parts
        return (gw, None, None, None, None, *gxs)


def fused_soft_ce(
    weight: Tensor, parts: list[ScoredRows], coef: Tensor, chunk: int | None = None
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Soft-CE of K steps' draft logits x_k @ weightᵀ against their teachers, fused and chunked.

    Returns (total = Σ_k coef_k · ce_k with grad to weight and every part's x; ce_k [K] = Σ_n w_n · soft-CE of
    step k, detached; the draft argmax [N_k] of each step). weight [Vd, h] is the draft lm_head; coef [K] the
    per-step factor of the loss (decay / normaliser). Equals `soft_ce_sum` on the gathered rows
    (tests/test_fused_loss.py), with transient memory bounded by one [chunk, Vd] block. Matmuls run in
    autocast's dtype when autocast is on (as nn.Linear would), reductions in fp32.
    """
    ref = parts[0].x if parts else weight
    mm_dtype = compute_dtype(ref)
    with torch.autocast(ref.device.type, enabled=False):
        total, ce_k, *argmaxes = _FusedSoftCE.apply(weight, coef, parts, mm_dtype,
                                                    chunk or chunk_rows(weight.shape[0], ref.device),
                                                    *[p.x for p in parts])
    return total, ce_k, argmaxes
