"""Loss and metrics vs a direct re-implementation of the official formula."""

from __future__ import annotations

import torch

from eagle3 import target_head
from eagle3.loss import simulated_accept_length, soft_ce_sum, step_weights
from eagle3.target_head import TargetHead


def official_loss(target_logits, t2d, loss_mask, draft_logits):
    """SafeAILab/EAGLE traineagle3 formula, written out directly (full logits materialised)."""
    target_p = torch.softmax(target_logits[..., t2d], dim=-1)
    position_mask = t2d[target_logits.argmax(-1)][..., None].float() * loss_mask[..., None].float()
    out_logp = torch.log_softmax(draft_logits, dim=-1)
    return -torch.sum(position_mask * (target_p * out_logp), 2).mean()


def test_soft_ce_matches_official_formula():
    torch.manual_seed(0)
    B, T, V, Vd, h = 3, 17, 500, 120, 32
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[torch.randperm(V)[:Vd]] = True
    W = torch.randn(V, h)
    last = torch.randn(B, T, h) * 2
    loss_mask = torch.rand(B, T) > 0.4
    draft_logits = torch.randn(B, T, Vd, requires_grad=True)
    head = TargetHead(W, t2d)
    teacher = head(last)
    pm = loss_mask & teacher.in_draft
    ours = soft_ce_sum(draft_logits, teacher.probs, pm) / (B * T)
    ref = official_loss(last @ W.T, t2d, loss_mask, draft_logits)
    torch.testing.assert_close(ours, ref)
    g1, = torch.autograd.grad(ours, draft_logits)
    g2, = torch.autograd.grad(ref, draft_logits)
    torch.testing.assert_close(g1, g2)


def test_chunked_full_argmax_equals_naive(monkeypatch):
    torch.manual_seed(1)
    B, T, V, h = 2, 50, 3000, 16
    W = torch.randn(V, h)
    last = torch.randn(B, T, h)
    t2d = torch.rand(V) > 0.5
    monkeypatch.setattr(target_head, "ARGMAX_CHUNK_TOKENS", 7)  # force many chunks, incl. a ragged last one
    teacher = TargetHead(W, t2d)(last)
    naive = (last @ W.T).argmax(-1)
    assert torch.equal(teacher.argmax, naive)
    assert torch.equal(teacher.in_draft, t2d[naive])
    torch.testing.assert_close(teacher.probs, torch.softmax((last @ W.T)[..., t2d], -1))


def test_simulated_accept_length_and_weights():
    acc = torch.tensor([0.8, 0.5, 0.5])
    # Σ_k Π_{j<=k} acc_j = 0.8 + 0.4 + 0.2
    assert abs(float(simulated_accept_length(acc)) - 1.4) < 1e-6
    torch.testing.assert_close(step_weights(3, 0.8), torch.tensor([1.0, 0.8, 0.64]))
