"""The frozen target lm_head on the trainer side: `last_hidden` (after the target's final norm) → teacher labels.

Targets ship hidden states, not logits (at V=128K full logits are 31x the bytes), so the trainer holds this one
matrix and computes the base-model distribution itself, in row chunks and in the target's own dtype: one
[chunk, V] logits block at a time gives both the full-vocab argmax and the draft-vocab softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eagle3.loss import rows_per_chunk

# One [rows, V] fp32 logits block alive at a time: rows = CHUNK_ELEMENTS // V (CPU: 64 MiB, ~340 rows at V=49K;
# fewer rows make the bf16 matmul slower; GPU: 512 MiB, few launches). ARGMAX_CHUNK_TOKENS fixes the rows
# instead (tests force ragged chunks with it).
CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}
ARGMAX_CHUNK_TOKENS: int | None = None


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per teacher chunk for a vocabulary of `vocab` on `device`."""
    return ARGMAX_CHUNK_TOKENS or rows_per_chunk(CHUNK_ELEMENTS, vocab, device)


@dataclass
class Teacher:
    """Base-model labels per position p (the target's distribution over token p+1)."""

    probs: Tensor  # [B, T, draft_vocab] in the head's dtype: softmax (fp32) of the target logits restricted to t2d
    argmax: Tensor  # [B, T] long: full-vocab argmax of the target (target ids)
    in_draft: Tensor  # [B, T] bool: t2d[argmax], the target's top token is representable by the draft


class TargetHead(nn.Module):
    """Holds the frozen target lm_head weight [V, h] (in the dtype given) and the draft-vocab mask; nothing else.

    Its matmuls run in that dtype (bf16 targets: bf16 on AMX / tensor cores, as the target itself computes its
    logits); the softmax runs in fp32 and is stored back in that dtype.
    """

    def __init__(self, lm_head_weight: Tensor, t2d: Tensor) -> None:
        super().__init__()
        if lm_head_weight.shape[0] != t2d.shape[0]:
            raise ValueError(f"lm_head has {lm_head_weight.shape[0]} rows but t2d covers {t2d.shape[0]} tokens")
        self.register_buffer("weight", lm_head_weight.detach().clone(), persistent=False)  # [V, h]
        self.register_buffer("t2d", t2d.bool().clone(), persistent=False)  # [V]
        self.register_buffer("draft_rows", t2d.nonzero().squeeze(-1), persistent=False)  # [Vd] sorted target ids

    @torch.no_grad()
    def forward(self, last_hidden: Tensor) -> Teacher:
        """last_hidden [B, T, h] (post final norm; cast to the head's dtype) → Teacher."""
        flat = last_hidden.reshape(-1, last_hidden.shape[-1]).to(self.weight.dtype)
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        n = flat.shape[0]
        argmax = torch.empty(n, dtype=torch.long, device=flat.device)
        probs = torch.empty(n, self.draft_rows.numel(), dtype=self.weight.dtype, device=flat.device)
        with torch.autocast(flat.device.type, enabled=False):
            step = chunk_rows(self.weight.shape[0], flat.device)
            for s in range(0, n, step):
                e = min(s + step, n)
                logits = (flat[s:e] @ self.weight.T).to(acc)  # [c, V]
                argmax[s:e] = logits.argmax(-1)
                probs[s:e] = logits.index_select(-1, self.draft_rows).softmax(-1)
        shape = last_hidden.shape[:-1]
        return Teacher(probs=probs.view(*shape, -1), argmax=argmax.view(shape), in_draft=self.t2d[argmax].view(shape))
