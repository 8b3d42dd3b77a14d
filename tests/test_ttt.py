"""TTT unroll vs a naive reference that loops over steps, rows and positions with explicit per-query key sets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eagle3.model import DraftConfig, Eagle3Draft
from eagle3.target_head import TargetHead
from eagle3.ttt import TTTConfig, data_feed, data_targets, ttt_unroll
from tests.targets import tiny_config

H_KV_GROUPS = 2


def make_draft(seed=0, draft_vocab=200, kind="llama"):
    torch.manual_seed(seed)
    cfg = DraftConfig.from_target_config(tiny_config(kind), draft_vocab_size=draft_vocab)
    draft = Eagle3Draft(cfg, embed_weight=torch.randn(cfg.vocab_size, cfg.hidden_size))
    # Non-trivial norms and a real (non-identity) vocab map.
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        used = torch.randperm(cfg.vocab_size)[:draft_vocab].sort().values
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[used] = True
        draft.set_vocab_map(used - torch.arange(draft_vocab), t2d)
    return draft


def make_batch(B, T, cfg, seed=1, packed=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    aux = torch.randn(B, T, 3 * cfg.hidden_size, generator=g)
    last = torch.randn(B, T, cfg.hidden_size, generator=g) * 3
    loss_mask = torch.rand(B, T, generator=g) > 0.3
    doc = torch.zeros(B, T, dtype=torch.long)
    pos = torch.arange(T).repeat(B, 1)
    # Row 1 is right-padded by 3 tokens.
    if B > 1:
        doc[1, T - 3 :] = -1
        loss_mask[1, T - 3 :] = False
        ids[1, T - 3 :] = 0
    if packed:  # row 0 holds two samples
        cut = T // 2
        doc[0, cut:] = 1
        pos[0, cut:] = torch.arange(T - cut)
    return ids, aux, last, loss_mask, doc, pos


def rope_ref(x, pos, theta):
    """Independent RoPE (default rope type): rotate pairs (j, j + d/2) by pos * theta^(-2j/d)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()]).to(x.dtype), torch.cat([ang.sin(), ang.sin()]).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def naive_unroll(draft, head_w, t2d, ids, aux, last, loss_mask, doc, pos, K, tok_fn=None, last_fn=None,
                 weight_fn=None, logits_out=None):
    """Returns (total loss, per-step losses, per-step correct counts) computed position by position.

    Hooks for other feedback paths: tok_fn(k, b, i) -> token fed at step k for query i (default: dataset token
    i+1+k); last_fn(k, b, i) -> the target's last hidden that labels it (default: last[b, i+1+k]);
    weight_fn(k, b, i) -> loss weight (default 1). logits_out[k][(b, i)] collects the draft logits."""
    c = draft.config
    m = draft.midlayer
    a = m.self_attn
    eps, theta = c.rms_norm_eps, c.rope_parameters["rope_theta"]
    B, T = ids.shape
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    used = t2d.nonzero().squeeze(-1)
    hidden = aux @ draft.fc.weight.T
    keys = [[[None] * T for _ in range(B)] for _ in range(K)]
    vals = [[[None] * T for _ in range(B)] for _ in range(K)]
    losses, corrects = [], []
    for k in range(K):
        new_hidden = torch.zeros_like(hidden)
        q_all = [[None] * T for _ in range(B)]
        for b in range(B):
            for i in range(T):
                tok = ids[b, i + 1 + k] if i + 1 + k < T else torch.tensor(0)
                if tok_fn is not None and tok_fn(k, b, i) is not None:
                    tok = tok_fn(k, b, i)
                x = torch.cat([rms(draft.embed_tokens.weight[tok], m.input_layernorm.weight, eps),
                               rms(hidden[b, i], m.hidden_norm.weight, eps)])
                p = pos[b, i] + k
                q = rope_ref((a.q_proj.weight @ x).view(nh, hd), p, theta)
                keys[k][b][i] = rope_ref((a.k_proj.weight @ x).view(nkv, hd), p, theta)
                vals[k][b][i] = (a.v_proj.weight @ x).view(nkv, hd)
                q_all[b][i] = q
        for b in range(B):
            for i in range(T):
                heads = []
                for h in range(nh):
                    kvh = h // (nh // nkv)
                    if doc[b, i] < 0:
                        js = [i]
                    else:
                        js = [j for j in range(i + 1) if doc[b, j] == doc[b, i]]
                    ks = [keys[0][b][j][kvh] for j in js] + [keys[s][b][i][kvh] for s in range(1, k + 1)]
                    vs = [vals[0][b][j][kvh] for j in js] + [vals[s][b][i][kvh] for s in range(1, k + 1)]
                    w = torch.softmax(torch.stack(ks) @ q_all[b][i][h] / math.sqrt(hd), 0)
                    heads.append(w @ torch.stack(vs))
                hres = hidden[b, i] + a.o_proj.weight @ torch.cat(heads)
                y = rms(hres, m.post_attention_layernorm.weight, eps)
                mlp = m.mlp.down_proj.weight @ (F.silu(m.mlp.gate_proj.weight @ y) * (m.mlp.up_proj.weight @ y))
                new_hidden[b, i] = hres + mlp
        hidden = new_hidden
        # Loss at (b, i): target distribution at p = i+1+k, predicting token i+2+k.
        tot, cnt, correct = 0.0, 0, 0
        for b in range(B):
            for i in range(T):
                p, t = i + 1 + k, i + 2 + k
                if logits_out is not None:
                    logits_out[k][(b, i)] = (draft.lm_head.weight @ rms(hidden[b, i], draft.norm.weight, eps)).detach()
                if t >= T or not loss_mask[b, t] or doc[b, t] != doc[b, i] or doc[b, i] < 0:
                    continue
                cnt += 1
                lh = last_fn(k, b, i) if last_fn is not None else None
                full = head_w @ (last[b, p] if lh is None else lh)
                target_p = torch.softmax(full[used], 0)
                draft_logits = draft.lm_head.weight @ rms(hidden[b, i], draft.norm.weight, eps)
                wt = weight_fn(k, b, i) if weight_fn is not None else 1.0
                if t2d[full.argmax()]:
                    tot = tot - wt * (target_p * torch.log_softmax(draft_logits, 0)).sum()
                correct += int(used[draft_logits.argmax()] == full.argmax())
        losses.append(tot / max(cnt, 1))
        corrects.append(correct)
    total = sum(0.8**k * l for k, l in enumerate(losses))
    return total, torch.stack([torch.as_tensor(l) for l in losses]), corrects


def fast_unroll(draft, head, ids, aux, last, loss_mask, doc, pos, K, kernel="auto", ckpt=False):
    cfg = TTTConfig(length=K, attention_kernel=kernel, grad_checkpoint=ckpt)
    teacher = head(last)
    return ttt_unroll(draft, aux, pos, doc, data_feed(ids), data_targets(teacher, loss_mask, doc), cfg)


@pytest.mark.parametrize("K", [1, 3, 7])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kernel", ["flash_cpu", "chunked"])
def test_unroll_matches_naive_reference(K, packed, kernel):
    draft = make_draft().double()
    c = draft.config
    B, T = 2, 11
    ids, aux, last, loss_mask, doc, pos = make_batch(B, T, c, packed=packed)
    aux, last = aux.double(), last.double()
    torch.manual_seed(5)
    head_w = torch.randn(c.vocab_size, c.hidden_size, dtype=torch.float64)
    head = TargetHead(head_w, draft.t2d)

    out = fast_unroll(draft, head, ids, aux, last, loss_mask, doc, pos, K, kernel=kernel)
    params = draft.trainable_parameters()
    g_fast = torch.autograd.grad(out.loss, params)

    ref_total, ref_losses, ref_correct = naive_unroll(draft, head_w, draft.t2d, ids, aux, last, loss_mask, doc, pos, K)
    g_ref = torch.autograd.grad(ref_total, params)

    # The model runs in fp64 here; the loss itself is accumulated in fp32 by design.
    tol = 1e-6
    torch.testing.assert_close(out.loss.double(), ref_total, rtol=tol, atol=tol)
    torch.testing.assert_close(out.loss_k.double(), ref_losses, rtol=tol, atol=tol)
    assert out.correct_k.tolist() == ref_correct
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-4, atol=tol * 10)


@pytest.mark.parametrize("ckpt", [False, True])
def test_every_trainable_parameter_gets_a_gradient(ckpt):
    draft = make_draft()
    c = draft.config
    ids, aux, last, loss_mask, doc, pos = make_batch(2, 16, c)
    head = TargetHead(torch.randn(c.vocab_size, c.hidden_size), draft.t2d)
    out = fast_unroll(draft, head, ids, aux, last, loss_mask, doc, pos, K=3, ckpt=ckpt)
    out.loss.backward()
    names = [n for n, p in draft.named_parameters() if p.requires_grad]
    assert any(n.startswith("midlayer.") for n in names) and "fc.weight" in names
    for n, p in draft.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient (checkpointing={ckpt})"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


def test_checkpointing_does_not_change_loss_or_grads():
    draft = make_draft()
    c = draft.config
    ids, aux, last, loss_mask, doc, pos = make_batch(2, 16, c, packed=True)
    head = TargetHead(torch.randn(c.vocab_size, c.hidden_size), draft.t2d)
    grads = []
    for ckpt in (False, True):
        draft.zero_grad()
        out = fast_unroll(draft, head, ids, aux, last, loss_mask, doc, pos, K=4, ckpt=ckpt)
        out.loss.backward()
        grads.append([p.grad.clone() for p in draft.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_close_to_fp32():
    draft = make_draft()
    c = draft.config
    ids, aux, last, loss_mask, doc, pos = make_batch(2, 32, c)
    head = TargetHead(torch.randn(c.vocab_size, c.hidden_size), draft.t2d)
    ref = fast_unroll(draft, head, ids, aux, last, loss_mask, doc, pos, K=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast_unroll(draft, head, ids, aux, last, loss_mask, doc, pos, K=3)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=3e-2, atol=3e-2)


def test_global_denominators_make_data_parallel_equal_one_big_batch():
    """Two workers, each normalising by (global labelled count / 2), average to the gradient of the whole batch."""
    from eagle3.ttt import data_label_mask

    draft = make_draft().double()
    c = draft.config
    ids, aux, last, loss_mask, doc, pos = make_batch(4, 12, c, seed=3)
    aux, last = aux.double(), last.double()
    head = TargetHead(torch.randn(c.vocab_size, c.hidden_size, dtype=torch.float64), draft.t2d)
    K, params = 3, draft.trainable_parameters()
    cfg = TTTConfig(length=K)

    def grads(rows, denominators=None):
        t = head(last[rows])
        out = ttt_unroll(draft, aux[rows], pos[rows], doc[rows], data_feed(ids[rows]),
                         data_targets(t, loss_mask[rows], doc[rows]), cfg, denominators)
        return torch.autograd.grad(out.loss, params)

    halves = [slice(0, 2), slice(2, 4)]
    counts = sum(torch.stack([data_label_mask(loss_mask[h], doc[h], k).sum() for k in range(K)]) for h in halves)
    per_worker = [grads(h, counts.double() / 2) for h in halves]
    full = grads(slice(0, 4))
    for a, b, f in zip(*per_worker, full):
        torch.testing.assert_close((a + b) / 2, f)
