"""Draft/target token feedback: the branch unroll vs the naive per-position loop with the branch tokens and labels
spelled out; draft sampling vs the draft's own logits on its path; survival weights vs hand-written loops."""

from __future__ import annotations

import pytest
import torch

from eagle3.feedback import (Branches, branch_feed, branch_targets, sample_draft_path, select_branches,
                             survival_weights)
from eagle3.target_head import TargetHead
from eagle3.ttt import TTTConfig, data_label_mask, ttt_unroll
from tests.test_ttt import make_batch, make_draft, naive_unroll


def setup(packed=True, seed=0):
    draft = make_draft(seed).double()
    c = draft.config
    ids, aux, last, loss_mask, doc, pos = make_batch(2, 12, c, packed=packed)
    torch.manual_seed(7)
    head_w = torch.randn(c.vocab_size, c.hidden_size, dtype=torch.float64)
    return draft, c, ids, aux.double(), last.double(), loss_mask, doc, pos, head_w, TargetHead(head_w, draft.t2d)


def index(br: Branches) -> dict:
    return {(int(b), int(i)): n for n, (b, i) in enumerate(zip(br.rows, br.cols))}


def path_logits(draft, ids, aux, last, loss_mask, doc, pos, head_w, br, tokens, M):
    """The naive loop's draft logits per step and query when branch n is fed tokens[n] at steps >= 1."""
    at = index(br)
    logits = [dict() for _ in range(M)]
    naive_unroll(draft, head_w, draft.t2d, ids, aux, last, loss_mask, doc, pos, M,
                 tok_fn=lambda k, b, i: tokens[at[(b, i)], k - 1] if k and (b, i) in at else None,
                 logits_out=logits)
    return at, logits


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_branch_unroll_matches_naive_reference(with_weights, packed):
    draft, c, ids, aux, last, loss_mask, doc, pos, head_w, head = setup(packed)
    K, M = 4, 3
    br = select_branches(loss_mask, doc, 0.6, torch.Generator().manual_seed(1))
    assert 0 < len(br) < int(data_label_mask(loss_mask, doc, 0).sum())
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, c.vocab_size, (len(br), M), generator=g)
    branch_last = torch.randn(len(br), M, c.hidden_size, generator=g, dtype=torch.float64) * 3
    weights = torch.rand(len(br), K, generator=g, dtype=torch.float64) if with_weights else None

    teacher, bteacher = head(last), head(branch_last)
    out = ttt_unroll(draft, aux, pos, doc, branch_feed(ids, br, tokens),
                     branch_targets(teacher, bteacher, br, loss_mask, doc, weights), TTTConfig(length=K))
    params = draft.trainable_parameters()
    g_fast = torch.autograd.grad(out.loss, params)

    at = index(br)
    tok_fn = lambda k, b, i: tokens[at[(b, i)], k - 1] if k and (b, i) in at else None
    last_fn = lambda k, b, i: branch_last[at[(b, i)], k - 1] if k and (b, i) in at else None
    weight_fn = (lambda k, b, i: weights[at[(b, i)], k] if (b, i) in at else 1.0) if with_weights else None
    ref_total, ref_losses, ref_correct = naive_unroll(draft, head_w, draft.t2d, ids, aux, last, loss_mask, doc, pos,
                                                      K, tok_fn=tok_fn, last_fn=last_fn, weight_fn=weight_fn)
    g_ref = torch.autograd.grad(ref_total, params)
    torch.testing.assert_close(out.loss.double(), ref_total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss_k.double(), ref_losses, rtol=1e-6, atol=1e-6)
    assert out.correct_k.tolist() == ref_correct
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-5)


def test_greedy_draft_path_is_the_drafts_own_argmax_on_that_path():
    draft, c, ids, aux, last, loss_mask, doc, pos, head_w, _ = setup()
    M = 3
    br = select_branches(loss_mask, doc, 1.0, torch.Generator().manual_seed(0))
    s = sample_draft_path(draft, aux, ids, pos, doc, br, M, 0.0, None)
    assert s.tokens.shape == (len(br), M) and bool((s.q == 1).all())
    torch.testing.assert_close(s.tokens, s.draft_ids + draft.d2t[s.draft_ids])
    # Feed exactly those tokens in the naive loop: the draft's argmax at step k must be the token fed at k+1.
    at, logits = path_logits(draft, ids, aux, last, loss_mask, doc, pos, head_w, br, s.tokens, M)
    for (b, i), n in at.items():
        for k in range(M):
            assert int(logits[k][(b, i)].argmax()) == int(s.draft_ids[n, k]), (b, i, k)


def test_sampled_draft_path_probabilities_and_reproducibility():
    draft, c, ids, aux, last, loss_mask, doc, pos, head_w, _ = setup()
    M, temp = 3, 0.7
    br = select_branches(loss_mask, doc, 1.0, torch.Generator().manual_seed(0))
    s1 = sample_draft_path(draft, aux, ids, pos, doc, br, M, temp, torch.Generator().manual_seed(5))
    s2 = sample_draft_path(draft, aux, ids, pos, doc, br, M, temp, torch.Generator().manual_seed(5))
    assert torch.equal(s1.tokens, s2.tokens)
    at, logits = path_logits(draft, ids, aux, last, loss_mask, doc, pos, head_w, br, s1.tokens, M)
    for (b, i), n in at.items():
        for k in range(M):
            q = torch.softmax(logits[k][(b, i)] / temp, 0)[s1.draft_ids[n, k]]
            torch.testing.assert_close(s1.q[n, k].double(), q, rtol=1e-4, atol=1e-6)


def test_survival_weights_match_loops():
    draft, c, ids, aux, last, loss_mask, doc, pos, head_w, head = setup()
    M = 3
    br = select_branches(loss_mask, doc, 1.0, torch.Generator().manual_seed(0))
    teacher = head(last)
    g = torch.Generator().manual_seed(3)
    bteacher = head(torch.randn(len(br), M, c.hidden_size, generator=g, dtype=torch.float64))
    used = draft.t2d.nonzero().squeeze(-1)
    # Greedy: make about half of the fed tokens equal the target's argmax so weights are mixed.
    want = torch.cat([teacher.argmax[br.rows, br.points][:, None], bteacher.argmax[:, :-1]], 1)
    rand = used[torch.randint(0, len(used), (len(br), M), generator=g)]
    tokens = torch.where(torch.rand(len(br), M, generator=g) < 0.6, want, rand)
    dids = torch.searchsorted(used, tokens.clamp(max=int(used[-1])))
    from eagle3.feedback import DraftSamples
    q = torch.rand(len(br), M, generator=g) * 0.9 + 0.05
    s = DraftSamples(tokens=tokens, draft_ids=dids, q=q)
    w = survival_weights(teacher, bteacher, br, s, greedy=True)
    ws = survival_weights(teacher, bteacher, br, s, greedy=False)
    assert 0 < float(w[:, 1:].mean()) < 1
    for n in range(len(br)):
        b, p = int(br.rows[n]), int(br.points[n])
        alive, prob = 1.0, 1.0
        assert w[n, 0] == 1 and ws[n, 0] == 1
        for j in range(M):
            argmax = teacher.argmax[b, p] if j == 0 else bteacher.argmax[n, j - 1]
            probs = teacher.probs[b, p] if j == 0 else bteacher.probs[n, j - 1]
            alive *= float(tokens[n, j] == argmax)
            prob *= min(1.0, float(probs[dids[n, j]]) / float(q[n, j]))
            assert float(w[n, j + 1]) == alive
            assert abs(float(ws[n, j + 1]) - prob) < 1e-6


def test_select_branches_fraction_and_seed():
    draft, c, ids, aux, last, loss_mask, doc, pos, head_w, _ = setup()
    valid = data_label_mask(loss_mask, doc, 0)
    full = select_branches(loss_mask, doc, 1.0, torch.Generator().manual_seed(0))
    assert len(full) == int(valid.sum()) and bool(valid[full.rows, full.cols].all())
    half = select_branches(loss_mask, doc, 0.5, torch.Generator().manual_seed(0))
    again = select_branches(loss_mask, doc, 0.5, torch.Generator().manual_seed(0))
    assert len(half) == round(0.5 * len(full)) and torch.equal(half.cols, again.cols)
    assert bool(valid[half.rows, half.cols].all())


def test_config_validation():
    with pytest.raises(ValueError, match="token_feedback"):
        TTTConfig(token_feedback="self")
    with pytest.raises(ValueError, match="branch_fraction"):
        TTTConfig(token_feedback="draft", branch_fraction=0.0)
    with pytest.raises(ValueError, match="survival_weights"):
        TTTConfig(token_feedback="target", survival_weights=True)


def test_token_feedback_needs_the_hf_backend():
    from jobs.config import load_config

    with pytest.raises(ValueError, match="target.backend=hf"):
        load_config("tiny", overrides=["target.backend=vllm", "ttt.token_feedback=draft"])
    assert load_config("tiny", overrides=["target.backend=vllm"]).target.backend == "vllm"


def test_draft_feedback_preset():
    from jobs.config import load_config

    cfg = load_config("smollm2-sharegpt-cpu-draft")
    assert cfg.ttt.token_feedback == "draft" and cfg.ttt.survival_weights and cfg.ttt.branch_fraction == 0.25
    assert cfg.ttt.length == load_config("smollm2-sharegpt-cpu").ttt.length == 7
