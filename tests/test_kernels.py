"""TTT attention and loss kernels against independent references, wherever each kernel runs.

flex_attention runs forward-only on CPU (torch has no CPU flex backward), so on CPU its forward is checked directly
and its autograd merge through a naive differentiable stand-in; the `gpu` tests run the compiled kernel's forward
and backward (benchmarks/gpu_check.py runs them on a lent GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from eagle3 import attention
from eagle3.attention import TTTKV, ttt_attention
from eagle3.target_head import TargetHead
from eagle3.ttt import TTTConfig, data_feed, data_targets, ttt_unroll
from tests.test_ttt import make_batch, make_draft

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def naive_causal(q, k, v, doc_ids):
    """Masked softmax attention and its natural-log LSE, differentiable; k/v at Hkv heads (GQA)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    T = q.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v, torch.logsumexp(s, -1)


def step_inputs(B=2, H=4, Hkv=2, T=40, hd=16, steps=4, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, T, hd, generator=g, dtype=dtype).to(device)  # noqa: E731
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 25:] = 1  # row 0 packs two samples
    doc[1, T - 5:] = -1  # row 1 is right-padded
    return [(mk(H), mk(Hkv), mk(Hkv)) for _ in range(steps)], doc.to(device)


def run_steps(kernel, steps, doc, grad=False):
    kv = TTTKV(doc_ids=doc, kernel=kernel)
    outs = []
    for q, k, v in steps:
        outs.append(ttt_attention(q, k, v, kv))
        kv.push(k, v)
    return outs


def test_flex_forward_matches_chunked_cpu():
    """Eager flex_attention (document BlockMask, GQA, LSE) + the diagonal merge == the chunked kernel."""
    steps, doc = step_inputs()
    with torch.no_grad():
        got = run_steps("flex", steps, doc)
        want = run_steps("chunked", steps, doc)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_flex_lse_is_natural_log_cpu():
    steps, doc = step_inputs(steps=1)
    q, k, v = steps[0]
    out, lse = attention.flex_causal(q, k, v, attention.document_block_mask(doc, q.shape[0], q.shape[2], q.device))
    ref_out, ref_lse = naive_causal(q, k, v, doc)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_flex_merge_gradients_cpu(monkeypatch):
    """The flex path's autograd (through out and LSE of the causal block, then the diagonal merge) gives the
    chunked kernel's gradients, with a naive differentiable block standing in for flex's missing CPU backward."""
    steps, doc = step_inputs(dtype=torch.float64)
    monkeypatch.setattr(attention, "flex_causal", lambda q, k, v, _bm: naive_causal(q, k, v, doc))
    monkeypatch.setattr(attention, "document_block_mask", lambda *a: None)
    grads = {}
    for kernel in ("flex", "chunked"):
        leaves = [t.clone().requires_grad_() for s in steps for t in s]
        it = iter(leaves)
        outs = run_steps(kernel, [(next(it), next(it), next(it)) for _ in steps], doc)
        loss = sum((o * torch.sin(torch.arange(o.numel(), dtype=o.dtype).view_as(o))).sum() for o in outs)
        grads[kernel] = torch.autograd.grad(loss, leaves)
    for a, b in zip(grads["flex"], grads["chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels, forward and backward


def unroll_grads(draft, head, batch, kernel, device, bf16, fused=True, K=5):
    ids, aux, last, loss_mask, doc, pos = (t.to(device) for t in batch)
    teacher = head(last)
    cfg = TTTConfig(length=K, attention_kernel=kernel, fused_loss=fused)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = ttt_unroll(draft, aux, pos, doc, data_feed(ids), data_targets(teacher, loss_mask, doc), cfg)
    return out, torch.autograd.grad(out.loss, draft.trainable_parameters())


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def compare_on_cuda(T, a, b, bf16, loss_tol, grad_tol):
    """Unroll the same draft and packed batch on CUDA two ways, a and b = (kernel, fused_loss); loss and every
    gradient must agree within the relative tolerances."""
    dev = torch.device("cuda")
    draft = make_draft(draft_vocab=200).to(dev)
    c = draft.config
    batch = make_batch(2, T, c, packed=True)
    head = TargetHead(torch.randn(c.vocab_size, c.hidden_size), draft.t2d).to(dev)
    ref, g_ref = unroll_grads(draft, head, batch, a[0], dev, bf16, fused=a[1])
    out, g_out = unroll_grads(draft, head, batch, b[0], dev, bf16, fused=b[1])
    assert rel(out.loss, ref.loss) < loss_tol
    for x, y in zip(g_out, g_ref):
        assert rel(x, y) < grad_tol


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_flex_unroll_matches_chunked_cuda(bf16):
    """Whole TTT unroll on CUDA, packed rows: compiled flex vs the chunked kernel, loss and every gradient."""
    compare_on_cuda(256, ("chunked", True), ("flex", True), bf16, 2e-2 if bf16 else 1e-4, 5e-2 if bf16 else 1e-3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_matches_reference_cuda(bf16):
    """The fused loss vs materialised logits on CUDA (flex attention in both)."""
    compare_on_cuda(128, ("flex", False), ("flex", True), bf16, 1e-3 if bf16 else 1e-5, 3e-2 if bf16 else 1e-4)
