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


def naive_ttt_steps(steps, doc):
    """Independent dense reference of TTT attention: step j's query i attends to the step-0 keys its mask allows
    (causal, same packed sample) and to key i of steps 1..j, one softmax over all of them."""
    q0, k0, v0 = steps[0]
    groups = q0.shape[1] // k0.shape[1]
    rep = lambda x: x.repeat_interleave(groups, 1)  # noqa: E731
    T = q0.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    if doc is not None:
        allowed = allowed & (doc[:, None, :, None] == doc[:, None, None, :])
    outs = []
    for j, (q, _, _) in enumerate(steps):
        scale = 1 / math.sqrt(q.shape[-1])
        ks = [rep(steps[i][1]) for i in range(1, j + 1)]
        vs = [rep(steps[i][2]) for i in range(1, j + 1)]
        s_c = ((q @ rep(k0).transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
        s_d = [(q * kk).sum(-1, keepdim=True) * scale for kk in ks]
        p = torch.cat([s_c, *s_d], -1).softmax(-1)
        out = p[..., :T] @ rep(v0)
        for i, vv in enumerate(vs):
            out = out + p[..., T + i : T + i + 1] * vv
        outs.append(out)
    return outs


def test_chunk_plan_skips_other_samples_keys():
    """Blocks of 4 queries over a row packing samples [0]*6 + [1]*7 + padding*3: each block's key range starts at
    its earliest sample, and keys of the block's own run before it need no mask."""
    doc = torch.tensor([[0] * 6 + [1] * 7 + [-1] * 3])
    assert attention._chunk_plan(doc, 16, 4) == [(0, 4, 0, 0), (4, 8, 0, 4), (8, 12, 6, 6), (12, 16, 6, 12)]
    # Two rows: the key range is the union, the unmasked run the intersection.
    two = torch.cat([doc, torch.tensor([[0] * 9 + [1] * 7])])
    assert attention._chunk_plan(two, 16, 4) == [(0, 4, 0, 0), (4, 8, 0, 4), (8, 12, 0, 8), (12, 16, 6, 12)]
    assert attention._chunk_plan(None, 10, 4) == [(0, 4, 0, 0), (4, 8, 0, 0), (8, 10, 0, 0)]


LAYOUTS = {
    "unpacked": None,
    # row 0: three samples, boundaries inside blocks; row 1: two samples, right-padded
    "packed": torch.tensor([[0] * 7 + [1] * 13 + [2] * 9 + [3] * 4, [0] * 18 + [1] * 10 + [-1] * 5]),
    # the same sample id in two separate runs (padding inside the row sees earlier padding)
    "split": torch.tensor([[0] * 5 + [-1] * 3 + [1] * 17 + [-1] * 8, [0] * 33]),
}


@pytest.mark.parametrize("chunk", [4, 7, 128])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chunked_kernel_matches_naive_across_blocks(monkeypatch, layout, chunk):
    """The chunked kernel (GQA inside, per-block key ranges, partial masks), forward and every gradient, against
    the dense reference in fp64, with many blocks and ragged ones."""
    monkeypatch.setattr(attention, "CHUNK", chunk)
    doc = LAYOUTS[layout]
    steps, _ = step_inputs(T=33, H=6, Hkv=2, dtype=torch.float64)
    leaves = {name: [t.clone().requires_grad_() for s in steps for t in s] for name in ("kernel", "naive")}
    group = lambda ls: [tuple(ls[i : i + 3]) for i in range(0, len(ls), 3)]  # noqa: E731
    got = run_steps("chunked", group(leaves["kernel"]), doc)
    want = naive_ttt_steps(group(leaves["naive"]), doc)
    weight = lambda o: torch.sin(torch.arange(o.numel(), dtype=o.dtype).view_as(o))  # noqa: E731
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    grads = {n: torch.autograd.grad(sum((o * weight(o)).sum() for o in outs), leaves[n])
             for n, outs in (("kernel", got), ("naive", want))}
    for a, b in zip(grads["kernel"], grads["naive"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_chunked_kernel_bf16_close_to_fp64(monkeypatch):
    """bf16 inputs (matmuls in bf16, softmax statistics in fp32) stay within bf16 rounding of the fp64 reference."""
    monkeypatch.setattr(attention, "CHUNK", 8)
    doc = LAYOUTS["packed"]
    steps, _ = step_inputs(T=33, H=6, Hkv=2, dtype=torch.float64)
    want = naive_ttt_steps(steps, doc)
    got = run_steps("chunked", [tuple(t.bfloat16() for t in s) for s in steps], doc)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert rel(g, w) < 2e-2


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
