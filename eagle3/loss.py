"""EAGLE-3 TTT loss and metrics.

loss_k = -(position_mask · target_p · log_softmax(draft_logits)).sum(-1), reduced over positions, where
position_mask = t2d[target argmax] · label_mask. Total = Σ_k decay^k · loss_k.

Normalisation: the official code takes `.mean()` over all B·T positions (padding and unmasked included), so the
loss scale depends on batch padding. Aerie's default ("valid") divides by the number of labelled positions of
that step; "official" reproduces the official scale for parity checks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

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
