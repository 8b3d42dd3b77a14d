"""Training-time test (TTT): unroll the draft K steps, feeding its own hidden state back, scoring every step.

Index convention (target logits at position p predict token p+1):
  step k at index i embeds token i+1+k (from `feed`), reads the draft hidden of step k-1 at i (step 0: fc(aux_i)),
  sits at RoPE position pos_i + k, and is scored against the target distribution at p = i+1+k, i.e. the
  prediction of token i+2+k. The position counts iff token i+2+k is an assistant token (loss_mask) of the same
  packed sample. (The official code masks with loss_mask[i+k], two tokens early; ours scores exactly the tokens
  the draft will be asked to propose.)

Token inputs and labels per step are arguments (`feed`, `targets`), dataset tokens and the teacher shifted by
default, so other feedback modes (draft-sampled tokens relabelled by the target) reuse this unroll unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Literal

import torch
from annotated_types import Ge, Gt, Le
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from eagle3.attention import TTTKV
from eagle3.loss import (Normalization, ScoredRows, fused_soft_ce, simulated_accept_length, soft_ce_sum, step_accuracy,
                         step_weights)
from eagle3.model import Eagle3Draft
from eagle3.target_head import Teacher


@dataclass(frozen=True, kw_only=True)
class TTTConfig:
    """How the draft is unrolled and scored."""

    length: Annotated[int, Ge(1)] = 7
    """Number of TTT steps K (1 = plain EAGLE training without feedback)."""
    step_decay: Annotated[float, Gt(0), Le(1)] = 0.8
    """Weight of step k is step_decay**k."""
    normalization: Normalization = "valid"
    """'valid': divide each step's loss by its labelled positions; 'official': mean over all B·T positions."""
    attention_kernel: Literal["auto", "flash_cpu", "flex", "chunked"] = "auto"
    """Causal-block kernel: fused CPU flash op, compiled flex_attention (CUDA), portable chunked PyTorch, or auto
    (CUDA: flex; elsewhere chunked; see eagle3.attention.auto_kernel)."""
    grad_checkpoint: bool = False
    """Recompute each step's activations in backward (less memory, ~30% more compute)."""
    fused_loss: bool = True
    """Draft lm_head + soft-CE + argmax fused in row chunks over the scored positions only, gradients computed in
    the forward (`eagle3.loss.fused_soft_ce`): no [B, T, draft_vocab] tensor is kept per step. False = the
    reference path (logits, fp32 log-softmax, autograd), kept for parity tests and benchmarks."""
    token_feedback: Literal["data", "draft", "target"] = "data"
    """Tokens fed at steps k >= 1: 'data' = dataset tokens (official recipe); 'draft' = sampled from the draft's
    previous step and labelled by the target on that path (relabel); 'target' = the target's greedy continuation
    (what temperature-0 verification accepts)."""
    branch_fraction: Annotated[float, Gt(0), Le(1)] = 1.0
    """'draft'/'target': share of labelled positions that take the fed path (the rest keep dataset tokens);
    the extra target tokens per trained token are about branch_fraction * (length - 1)."""
    draft_temperature: Annotated[float, Ge(0)] = 0.0
    """'draft': sampling temperature of the fed tokens (0 = the draft's argmax)."""
    survival_weights: bool = False
    """'draft': weight step k by the probability the chain survives verification up to it (greedy: all fed tokens
    equal the target's argmax; sampling: prod min(1, p/q))."""

    def __post_init__(self) -> None:
        # Repeats the annotations' ranges and choices for configs built in Python; jobs.config checks the
        # annotations themselves (types included) when it loads a run.
        if self.length < 1:
            raise ValueError(f"ttt.length must be >= 1, got {self.length}")
        if not 0.0 < self.step_decay <= 1.0:
            raise ValueError(f"ttt.step_decay must be in (0, 1], got {self.step_decay}")
        if self.normalization not in ("valid", "official"):
            raise ValueError(f"ttt.normalization must be 'valid' or 'official', got {self.normalization!r}")
        if self.attention_kernel not in ("auto", "flash_cpu", "flex", "chunked"):
            raise ValueError(f"ttt.attention_kernel must be auto|flash_cpu|flex|chunked, got {self.attention_kernel!r}")
        if self.token_feedback not in ("data", "draft", "target"):
            raise ValueError(f"ttt.token_feedback must be data|draft|target, got {self.token_feedback!r}")
        if not 0.0 < self.branch_fraction <= 1.0:
            raise ValueError(f"ttt.branch_fraction must be in (0, 1], got {self.branch_fraction}")
        if self.draft_temperature < 0:
            raise ValueError(f"ttt.draft_temperature must be >= 0, got {self.draft_temperature}")
        if self.survival_weights and self.token_feedback != "draft":
            raise ValueError("ttt.survival_weights only applies to ttt.token_feedback=draft")

    @property
    def uses_branches(self) -> bool:
        """True when steps >= 1 feed a path other than the dataset's (needs the target's relabel)."""
        return self.token_feedback != "data" and self.length > 1


@dataclass
class StepTargets:
    """Labels of one TTT step, aligned with draft index i (length T_k <= T; later indices have no label)."""

    probs: Tensor  # [B, T_k, draft_vocab] fp32 teacher distribution
    argmax: Tensor  # [B, T_k] long target ids: the target's greedy choice
    in_draft: Tensor  # [B, T_k] bool: argmax is in the draft vocab
    label_mask: Tensor  # [B, T_k] bool: position is scored
    weight: Tensor | None = None  # [B, T_k] fp32 per-position loss weight (survival); None = 1


@dataclass
class TTTOutput:
    loss: Tensor  # scalar, Σ_k decay^k loss_k (with grad)
    loss_k: Tensor  # [K] detached per-step losses
    correct_k: Tensor  # [K] long: draft argmax == target argmax over labelled positions
    count_k: Tensor  # [K] long: labelled positions

    @property
    def acc_k(self) -> Tensor:
        return self.correct_k.float() / self.count_k.clamp_min(1).float()

    @property
    def sim_accept_len(self) -> float:
        return float(simulated_accept_length(self.acc_k))


TokenFeed = Callable[[int], Tensor]  # step k -> ids [B, T] embedded at step k
StepLabels = Callable[[int], StepTargets]


def shift_left(x: Tensor, n: int, fill: int | float | bool = 0) -> Tensor:
    """x[:, n:] padded with `fill` at the end to keep length T."""
    if n == 0:
        return x
    pad = x.new_full((x.shape[0], min(n, x.shape[1]), *x.shape[2:]), fill)
    return torch.cat((x[:, n:], pad), dim=1)


def data_feed(input_ids: Tensor) -> TokenFeed:
    """Teacher forcing (the official recipe): step k embeds dataset token i+1+k."""
    return lambda k: shift_left(input_ids, 1 + k)


def data_label_mask(loss_mask: Tensor, doc_ids: Tensor, k: int) -> Tensor:
    """[B, T_k] bool: index i of step k is scored iff token i+2+k is an assistant token of i's own sample."""
    n, T = 1 + k, loss_mask.shape[1]
    L = max(T - n - 1, 0)  # indices whose predicted token i+n+1 is inside the row
    same_doc = (doc_ids[:, :L] == doc_ids[:, n + 1 : n + 1 + L]) & (doc_ids[:, :L] >= 0)
    return loss_mask[:, n + 1 : n + 1 + L].bool() & same_doc


def data_targets(teacher: Teacher, loss_mask: Tensor, doc_ids: Tensor) -> StepLabels:
    """Labels along the dataset path: step k at index i uses the teacher at i+1+k (predicting token i+2+k)."""

    def targets(k: int) -> StepTargets:
        n = 1 + k
        label_mask = data_label_mask(loss_mask, doc_ids, k)
        L = label_mask.shape[1]
        return StepTargets(
            probs=teacher.probs[:, n : n + L],
            argmax=teacher.argmax[:, n : n + L],
            in_draft=teacher.in_draft[:, n : n + L],
            label_mask=label_mask,
        )

    return targets


def ttt_unroll(
    draft: Eagle3Draft,
    aux_hidden: Tensor,
    position_ids: Tensor,
    doc_ids: Tensor | None,
    feed: TokenFeed,
    targets: StepLabels,
    cfg: TTTConfig,
    denominators: Tensor | None = None,
) -> TTTOutput:
    """Run K TTT steps and return the weighted loss and per-step metrics.

    aux_hidden [B, T, 3h]; position_ids [B, T]; doc_ids [B, T] (packed rows, -1 at padding) or None when every row
    holds one sample (right padding: causal masking alone isolates padding from valid queries).
    denominators [K]: per-step normaliser for "valid" normalisation in place of this batch's own labelled
    positions (data parallel: global count / world size, so averaged gradients equal the global mean).
    """
    kv = TTTKV(doc_ids=doc_ids if doc_ids is not None and bool((doc_ids > 0).any()) else None,
               kernel=cfg.attention_kernel)
    weights = step_weights(cfg.length, cfg.step_decay)
    hidden = draft.project(aux_hidden)  # [B, T, h]
    B, T = position_ids.shape
    total = hidden.new_zeros((), dtype=torch.float32)
    loss_k, correct_k, count_k, parts, step_argmax = [], [], [], [], []
    for k in range(cfg.length):
        ids = feed(k)
        pos = position_ids + k
        if cfg.grad_checkpoint and torch.is_grad_enabled():
            hidden, key, value = checkpoint(draft.step, ids, hidden, pos, kv.snapshot(), use_reentrant=False)
        else:
            hidden, key, value = draft.step(ids, hidden, pos, kv)
        kv.push(key, value)
        tgt = targets(k)
        if cfg.fused_loss:  # scored after the loop, all steps in one fused call
            rows, cols = tgt.label_mask.nonzero(as_tuple=True)  # only these positions are scored or counted
            w = tgt.in_draft[rows, cols].float()
            if tgt.weight is not None:
                w = w * tgt.weight[rows, cols]
            parts.append(ScoredRows(x=draft.norm(hidden[rows, cols]), probs=tgt.probs, rows=rows, cols=cols, w=w))
            step_argmax.append(tgt.argmax[rows, cols])
            count_k.append(torch.tensor(rows.numel(), device=hidden.device))
            continue
        ce, correct, count = _reference_step_loss(draft, hidden, tgt)
        step_loss = ce / _denominator(cfg, k, count, denominators, B * T)
        total = total + weights[k] * step_loss
        loss_k.append(step_loss.detach())
        correct_k.append(correct)
        count_k.append(count)
    if cfg.fused_loss:
        denom = torch.stack([_denominator(cfg, k, c, denominators, B * T) for k, c in enumerate(count_k)])
        coef = weights.to(denom.device, torch.float64) / denom  # fp64: exact for fp64 parity tests, cast inside
        total, ce_k, argmaxes = fused_soft_ce(draft.lm_head.weight, parts, coef)
        with torch.no_grad():
            correct = [(draft.draft_to_target(a) == t).sum() for a, t in zip(argmaxes, step_argmax)]
        return TTTOutput(loss=total, loss_k=(ce_k / denom).float(), correct_k=torch.stack(correct),
                         count_k=torch.stack(count_k))
    return TTTOutput(
        loss=total,
        loss_k=torch.stack(loss_k),
        correct_k=torch.stack(correct_k),
        count_k=torch.stack(count_k),
    )


def _denominator(cfg: TTTConfig, k: int, count: Tensor, denominators: Tensor | None, positions: int) -> Tensor:
    """Normaliser of step k's loss: all B·T positions ('official'), else the labelled ones (global under DDP)."""
    if cfg.normalization == "official":
        return torch.tensor(float(positions), dtype=torch.float64, device=count.device)
    return (denominators[k] if denominators is not None else count).clamp_min(1).to(torch.float64)


def _reference_step_loss(draft: Eagle3Draft, hidden: Tensor, tgt: StepTargets) -> tuple[Tensor, Tensor, Tensor]:
    """(soft-CE sum, correct, count) of one step through materialised [B, T_k, draft_vocab] logits and autograd
    (`TTTConfig.fused_loss=False`: the reference the fused loss is tested against)."""
    Tk = tgt.label_mask.shape[1]
    logits = draft.compute_logits(hidden[:, :Tk])  # [B, T_k, draft_vocab]
    position_mask = tgt.label_mask & tgt.in_draft
    if tgt.weight is not None:
        position_mask = position_mask * tgt.weight
    ce = soft_ce_sum(logits, tgt.probs, position_mask)
    with torch.no_grad():
        draft_tokens = draft.draft_to_target(logits.argmax(-1))
        correct, count = step_accuracy(draft_tokens, tgt.argmax, tgt.label_mask)
    return ce, correct, count
