"""The frozen target lm_head on the trainer side: `last_hidden` (after the target's final norm) → teacher labels.

Targets ship hidden states, not logits (at V=128K full logits are 31x the bytes), so the trainer holds this one
matrix and computes the base-model distribution itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

ARGMAX_CHUNK_TOKENS = 1024  # rows per chunk of the full-vocab argmax: one [chunk, V] block alive at a time


@dataclass
class Teacher:
    """Base-model labels per position p (the target's distribution over token p+1)."""

    probs: Tensor  # [B, T, draft_vocab] fp32: softmax of the target logits restricted to the draft vocab (t2d)
    argmax: Tensor  # [B, T] long: full-vocab argmax of the target (target ids)
    in_draft: Tensor  # [B, T] bool: t2d[argmax], the target's top token is representable by the draft


class TargetHead(nn.Module):
    """Holds the frozen target lm_head weight [V, h] and the draft-vocab mask; nothing else."""

    def __init__(self, lm_head_weight: Tensor, t2d: Tensor) -> None:
        super().__init__()
        if lm_head_weight.shape[0] != t2d.shape[0]:
            raise ValueError(f"lm_head has {lm_head_weight.shape[0]} rows but t2d covers {t2d.shape[0]} tokens")
        self.register_buffer("weight", lm_head_weight.detach().clone(), persistent=False)  # [V, h]
        self.register_buffer("t2d", t2d.bool().clone(), persistent=False)  # [V]
        # Rows of the draft vocab (sorted target ids), fp32 once instead of a gather + cast every step.
        rows = t2d.nonzero().squeeze(-1)
        self.register_buffer("draft_weight", lm_head_weight.detach()[rows].float(), persistent=False)  # [Vd, h]

    @torch.no_grad()
    def full_argmax(self, last_hidden: Tensor) -> Tensor:
        """Full-vocab argmax [B, T] computed in row chunks: never a whole [B, T, V] logits tensor."""
        flat = last_hidden.reshape(-1, last_hidden.shape[-1])
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        w = self.weight.to(flat.dtype)
        for s in range(0, flat.shape[0], ARGMAX_CHUNK_TOKENS):
            out[s : s + ARGMAX_CHUNK_TOKENS] = (flat[s : s + ARGMAX_CHUNK_TOKENS] @ w.T).argmax(-1)
        return out.view(last_hidden.shape[:-1])

    @torch.no_grad()
    def forward(self, last_hidden: Tensor) -> Teacher:
        """last_hidden [B, T, h] (post final norm) → Teacher."""
        draft_logits = last_hidden.float() @ self.draft_weight.T  # [B, T, draft_vocab]
        argmax = self.full_argmax(last_hidden)
        return Teacher(probs=draft_logits.softmax(-1), argmax=argmax, in_draft=self.t2d[argmax])
