"""The fused draft-vocab loss (`eagle3.loss.fused_soft_ce`, `TTTConfig.fused_loss`) against today's reference path
(materialised logits, fp32 log-softmax, autograd): loss, per-step metrics and every gradient, and its memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eagle3 import loss as loss_mod
from eagle3 import target_head
from eagle3.feedback import Branches, branch_feed, branch_targets
from eagle3.loss import fused_soft_ce
from eagle3.target_head import TargetHead, Teacher
from eagle3.ttt import TTTConfig, data_feed, data_targets, ttt_unroll
from tests.test_ttt import make_batch, make_draft


def unroll(draft, head, batch, K, fused, autocast=False, feed=None, targets=None):
    ids, aux, last, loss_mask, doc, pos = batch
    teacher = head(last)
    feed = feed or data_feed(ids)
    targets = targets or data_targets(teacher, loss_mask, doc)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ttt_unroll(draft, aux, pos, doc, feed, targets, TTTConfig(length=K, fused_loss=fused))
    grads = torch.autograd.grad(out.loss, draft.trainable_parameters())
    return out, grads


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("K", [1, 3, 7])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_equals_reference_fp32(K, packed, monkeypatch):
    monkeypatch.setitem(loss_mod.CHUNK_ELEMENTS, "cpu", 200 * 7)  # 7 rows per chunk: many chunks, a ragged last one
    draft = make_draft(draft_vocab=200)
    c = draft.config
    batch = make_batch(3, 24, c, packed=packed)  # row 1 right-padded, row 0 packed with two samples
    head = TargetHead(torch.randn(c.vocab_size, c.hidden_size), draft.t2d)
    ref, g_ref = unroll(draft, head, batch, K, fused=False)
    out, g_out = unroll(draft, head, batch, K, fused=True)
    assert rel(out.loss, ref.loss) < 1e-6
    assert rel(out.loss_k, ref.loss_k) < 1e-6
    assert out.correct_k.tolist() == ref.correct_k.tolist()
    assert out.count_k.tolist() == ref.count_k.tolist()
    names = [n for n, p in draft.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, g_out, g_ref):
        assert rel(a, b) < 1e-6, f"{n}: max rel diff {rel(a, b):.2e}"


@pytest.mark.parametrize("K", [1, 3, 7])
def test_fused_close_to_reference_bf16(K):
    """Under bf16 autocast both paths round the logits and their gradient to bf16; the fused one accumulates dW in
    fp32 per chunk instead of one bf16 product, so they agree to bf16 rounding: loss 1e-3 relative, gradients 3e-2
    (relative to each tensor's largest entry)."""
    draft = make_draft(draft_vocab=200)
    c = draft.config
    batch = make_batch(2, 64, c, packed=True)
    head = TargetHead(torch.randn(c.vocab_size, c.hidden_size), draft.t2d)
    ref, g_ref = unroll(draft, head, batch, K, fused=False, autocast=True)
    out, g_out = unroll(draft, head, batch, K, fused=True, autocast=True)
    assert rel(out.loss, ref.loss) < 1e-3
    assert out.count_k.tolist() == ref.count_k.tolist()
    # argmax ties under bf16 rounding may flip a few positions
    assert (out.correct_k - ref.correct_k).abs().max() <= 2
    for a, b in zip(g_out, g_ref):
        assert rel(a, b) < 3e-2


def test_fused_with_branch_labels_and_survival_weights():
    """The draft/target feedback path: per-step probs rebuilt from a relabel, per-position survival weights."""
    draft = make_draft(draft_vocab=200).double()
    c = draft.config
    ids, aux, last, loss_mask, doc, pos = batch = make_batch(2, 20, c)
    aux, last = aux.double(), last.double()
    batch = (ids, aux, last, loss_mask, doc, pos)
    head = TargetHead(torch.randn(c.vocab_size, c.hidden_size, dtype=torch.float64), draft.t2d)
    K = 4
    teacher = head(last)
    br = Branches(rows=torch.tensor([0, 0, 1]), cols=torch.tensor([2, 7, 5]))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, c.vocab_size, (3, K - 1), generator=g)
    bteacher = head(torch.randn(3, K - 1, c.hidden_size, generator=g, dtype=torch.float64))
    weights = torch.rand(3, K, generator=g, dtype=torch.float64)
    feed = branch_feed(ids, br, tokens)
    targets = branch_targets(teacher, bteacher, br, loss_mask, doc, weights)
    ref, g_ref = unroll(draft, head, batch, K, fused=False, feed=feed, targets=targets)
    out, g_out = unroll(draft, head, batch, K, fused=True, feed=feed, targets=targets)
    assert rel(out.loss, ref.loss) < 1e-6
    assert out.correct_k.tolist() == ref.correct_k.tolist()
    for a, b in zip(g_out, g_ref):
        assert rel(a, b) < 1e-6


def test_fused_soft_ce_against_explicit_formula():
    """Independent of the unroll: Σ_k coef_k Σ_n w_n · (−Σ_v p_nv log softmax(x_n Wᵀ)_v), gradients by autograd."""
    torch.manual_seed(0)
    B, T, V, h = 2, 9, 50, 8
    W = torch.randn(V, h, dtype=torch.float64, requires_grad=True)
    coef = torch.tensor([1.0, 0.3], dtype=torch.float64)
    parts, ref, ref_k = [], 0.0, []
    for k, n in enumerate((B * T, 7)):  # step 1 scores a subset of positions
        x = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
        probs = torch.softmax(torch.randn(B, T, V, dtype=torch.float64), -1)
        rows, cols = torch.arange(B).repeat_interleave(T)[:n], torch.arange(T).repeat(B)[:n]
        w = torch.rand(n, dtype=torch.float64)
        parts.append(loss_mod.ScoredRows(x=x, probs=probs, rows=rows, cols=cols, w=w))
        ce = (w * -(probs[rows, cols] * F.log_softmax(x @ W.T, -1)).sum(-1)).sum()
        ref_k.append(ce)
        ref = ref + coef[k] * ce
    total, ce_k, argmaxes = fused_soft_ce(W, parts, coef, chunk=4)
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(ce_k, torch.stack(ref_k).detach())
    for a, part in zip(argmaxes, parts):
        assert torch.equal(a, (part.x @ W.T).argmax(-1))
    inputs = (W, *[p.x for p in parts])
    got = torch.autograd.grad(3.0 * total, inputs)  # a non-unit upstream gradient
    want = torch.autograd.grad(3.0 * ref, inputs)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def saved_bytes(fn) -> int:
    """Bytes of every tensor autograd saves for backward while `fn` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_fused_keeps_no_draft_vocab_tensor():
    """Saved state of the whole unroll: the reference keeps [B, T_k, Vd] logits/log-softmax per step, so its
    bytes grow with the draft vocab; the fused path's grow by one dW [Vd, h] for the whole unroll."""
    c = make_draft().config
    batch = make_batch(2, 64, c)
    out = {}
    for vd in (60, 280):
        draft = make_draft(draft_vocab=vd)
        head = TargetHead(torch.randn(c.vocab_size, c.hidden_size), draft.t2d)
        ids, aux, last, loss_mask, doc, pos = batch
        teacher = head(last)
        for fused in (False, True):
            cfg = TTTConfig(length=3, fused_loss=fused)
            out[vd, fused] = saved_bytes(lambda: ttt_unroll(draft, aux, pos, doc, data_feed(ids),
                                                            data_targets(teacher, loss_mask, doc), cfg))
    T, h, K, B = 64, c.hidden_size, 3, 2
    ref_growth = out[280, False] - out[60, False]
    fused_growth = out[280, True] - out[60, True]
    assert ref_growth >= K * B * (T - 3) * 220 * 4  # at least one fp32 [B, T_k, Vd] per step
    assert fused_growth <= 220 * h * 4 * 1.01  # only the one dW [Vd, h] grows with Vd
    

def test_teacher_in_bf16_matches_fp32_teacher(monkeypatch):
    """A bf16 target's head computes in bf16 and stores bf16 probs; argmax and probs stay close to fp32's."""
    monkeypatch.setattr(target_head, "ARGMAX_CHUNK_TOKENS", 5)
    torch.manual_seed(2)
    V, h = 3000, 32
    W = torch.randn(V, h) / h**0.5
    last = torch.randn(2, 30, h)
    t2d = torch.rand(V) > 0.5
    t32 = TargetHead(W, t2d)(last)
    t16 = TargetHead(W.bfloat16(), t2d)(last.bfloat16())
    assert t16.probs.dtype == torch.bfloat16 and t32.probs.dtype == torch.float32
    assert (t16.argmax == t32.argmax).float().mean() > 0.9  # bf16 logits can swap near-ties
    torch.testing.assert_close(t16.probs.float(), t32.probs, rtol=0, atol=2e-2)
    assert isinstance(t16, Teacher)
