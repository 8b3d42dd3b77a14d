"""Speculative decoding vs independent references: a no-cache one-forward-per-token greedy loop, the draft's own
full-sequence TTT computation, exact τ of a perfect draft, and sampling statistics of the acceptance rule."""

from __future__ import annotations

import pytest
import torch

from eagle3.attention import TTTKV
from eagle3.model import DraftConfig, Eagle3Draft
from eagle3.spec_decode import (
    LOSSLESS_RTOL,
    BaselineRun,
    DraftTree,
    Eagle3Drafter,
    LosslessError,
    SpecConfig,
    accept,
    evaluate,
)
from tests.targets import tiny_target

AUX = (1, 3, 4)
PROMPTS = [[5, 17, 42, 99, 7, 250, 3], [11, 12, 13, 14], [200, 1, 2, 150, 151, 9, 8, 60, 61]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=1)


def make_draft(target, seed: int = 0, draft_vocab: int = 300) -> Eagle3Draft:
    cfg = DraftConfig.from_target_config(target.config, draft_vocab_size=draft_vocab, aux_layer_ids=AUX)
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg, embed_weight=target.get_input_embeddings().weight)
    if draft_vocab < cfg.vocab_size:  # a non-identity vocabulary map: every third target token
        used = torch.arange(0, cfg.vocab_size, 3)[:draft_vocab]
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[used] = True
        draft.set_vocab_map(used - torch.arange(draft_vocab), t2d)
    return draft.eval()


@torch.no_grad()
def slow_greedy(target, prompt: list[int], n: int) -> list[int]:
    """Reference: one full forward per token, no KV cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(target(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


class OracleSession:
    """A draft backed by the target itself (no cache): logits = target logits (+ seeded noise, so that drafts are
    sometimes wrong at varying depths and branches); `noise` is relative to the logits' std."""

    def __init__(self, target, prompt, noise: float) -> None:
        self.target, self.noise = target, noise
        self.context = [int(prompt[0])]
        self.paths: list[list[int]] = []

    @torch.no_grad()
    def _logits(self, seqs: list[list[int]]) -> torch.Tensor:
        out = []
        for s in seqs:
            logits = self.target(input_ids=torch.tensor([s])).logits[0, -1].float()
            if self.noise:
                g = torch.Generator().manual_seed(hash(tuple(s)) % (2**31))
                logits = logits + self.noise * logits.std() * torch.randn(logits.shape, generator=g)
            out.append(logits)
        return torch.stack(out)

    def commit(self, aux_hidden, next_tokens):
        self.context += next_tokens.tolist()
        self.paths = []
        return self._logits([self.context])[0]

    def expand(self, parents, tokens):
        new = [([] if p < 0 else self.paths[p]) + [int(t)] for p, t in zip(parents.tolist(), tokens.tolist())]
        self.paths += new
        return self._logits([self.context + p for p in new])


class Oracle:
    def __init__(self, target, noise: float = 0.0) -> None:
        self.target, self.noise = target, noise

    def start(self, prompt_ids):
        return OracleSession(self.target, prompt_ids.tolist(), self.noise)


def check_counts(res, cfg: SpecConfig) -> None:
    assert sum(res.accept_hist) == res.verify_calls
    assert res.emitted_tokens == sum((n + 1) * c for n, c in enumerate(res.accept_hist))
    assert res.accepted_per_pos == [sum(res.accept_hist[j + 1:]) for j in range(cfg.max_depth)]
    assert res.tau == res.emitted_tokens / res.verify_calls
    assert sum(res.emitted_per_prompt) == res.emitted_tokens and sum(res.calls_per_prompt) == res.verify_calls
    assert len(res.calls_per_prompt) == len(res.outputs)
    # The prefill's token is not counted as emitted; the last round may overshoot max_new_tokens / EOS.
    assert all(e >= len(o) - 1 for e, o in zip(res.emitted_per_prompt, res.outputs))
    lo, hi = res.tau_interval()
    assert lo <= res.tau <= hi


# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_draft_cache_matches_full_sequence_ttt(target):
    """Incremental draft (commits in chunks, chain + sibling expansions) == Eagle3Draft.step over the full sequence
    with the training-time TTT attention (step-0 keys + diagonal keys)."""
    draft = make_draft(target, draft_vocab=100)
    torch.manual_seed(3)
    T = 9
    toks = torch.randint(0, 300, (T + 3,))
    aux = torch.randn(T + 1, 3 * 64)
    a, b, c = 17, 42, 77  # depth-1 siblings a, b below the root; c below a

    def reference(depth1: int, depth2: int | None):
        kv = TTTKV()
        pos = torch.arange(T)[None]
        h0, k, v = draft.step(toks[1:T + 1][None], draft.project(aux[None, :T]), pos, kv)
        kv.push(k, v)
        ids1 = toks[2:T + 2].clone()
        ids1[T - 1] = depth1  # index T-1 embeds the depth-1 token at position T
        h1, k, v = draft.step(ids1[None], h0, pos + 1, kv)
        kv.push(k, v)
        out = [h0[0, -1], h1[0, -1]]
        if depth2 is not None:
            ids2 = toks[3:T + 3].clone()
            ids2[T - 1] = depth2
            out.append(draft.step(ids2[None], h1, pos + 2, kv)[0][0, -1])
        return [draft.compute_logits(h).float() for h in out]

    ref_a, ref_b = reference(a, c), reference(b, None)
    session = Eagle3Drafter(draft).start(toks[:1])
    session.commit(aux[:4], toks[1:5])
    root = session.commit(aux[4:T], toks[5:T + 1])  # a second chunk: keys of the first are in the cache
    used = draft.draft_to_target(torch.arange(100))
    torch.testing.assert_close(root[used], ref_a[0], rtol=1e-4, atol=1e-5)
    assert torch.isinf(root).sum() == 300 - 100  # tokens outside the draft vocab are impossible
    d1 = session.expand(torch.tensor([-1, -1]), torch.tensor([a, b]))
    torch.testing.assert_close(d1[0, used], ref_a[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d1[1, used], ref_b[1], rtol=1e-4, atol=1e-5)  # b must not see a
    d2 = session.expand(torch.tensor([0]), torch.tensor([c]))
    torch.testing.assert_close(d2[0, used], ref_a[2], rtol=1e-4, atol=1e-5)
    # A new commit drops the speculative nodes: the root equals step 0 over one more position.
    root2 = session.commit(aux[T:], toks[T + 1:T + 2])
    h0 = draft.step(toks[1:T + 2][None], draft.project(aux[None]), torch.arange(T + 1)[None], TTTKV())[0]
    torch.testing.assert_close(root2[used], draft.compute_logits(h0[0, -1]).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [
    SpecConfig(method="chain", num_draft_tokens=3, max_new_tokens=14),
    SpecConfig(method="tree", tree_depth=3, tree_top_k=3, tree_total_tokens=7, max_new_tokens=14),
], ids=["chain", "tree"])
def test_outputs_equal_slow_reference(target, cfg):
    """A noisy oracle draft (partial acceptance at every depth, accepted paths through non-first branches) and a
    random real draft: outputs equal the no-cache greedy loop, counts are consistent."""
    refs = [slow_greedy(target, p, cfg.max_new_tokens) for p in PROMPTS]
    res = evaluate(target, Oracle(target, noise=0.7), PROMPTS, cfg, aux_layer_ids=AUX, baseline=False)
    assert res.outputs == refs
    assert res.lossless_checked and res.baseline_seconds is not None
    assert res.numerical_ties == [] and res.to_dict()["num_numerical_ties"] == 0  # exact agreement: no ties
    check_counts(res, cfg)
    assert 0 < res.accepted_per_pos[0] < res.verify_calls  # some, not all, accepted: the gather path ran
    assert 1.2 < res.tau < cfg.max_depth + 1
    real = evaluate(target, make_draft(target, draft_vocab=100), PROMPTS[:2], cfg, aux_layer_ids=AUX)
    assert real.outputs == refs[:2] and real.numerical_ties == []
    check_counts(real, cfg)


@pytest.mark.parametrize("rows", [[0], [0, 1, 2], [0, 2, 5], [0, 3]], ids=["root", "chain", "branches", "skip"])
def test_keep_cache_equals_index_select(target, rows):
    """The in-place cut keeps exactly what an index_select of prefix + kept rows would (reference), every layer."""
    from transformers import DynamicCache

    from eagle3.spec_decode import _keep_cache

    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(input_ids=torch.tensor([PROMPTS[2]]), past_key_values=cache, use_cache=True)
    prefix = 3
    keep = torch.tensor(list(range(prefix)) + [prefix + r for r in rows])
    want = [(layer.keys.index_select(2, keep).clone(), layer.values.index_select(2, keep).clone())
            for layer in cache.layers]
    _keep_cache(cache, prefix, rows)
    for layer, (k, v) in zip(cache.layers, want):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert cache.get_seq_length() == prefix + len(rows)


class Recorder:
    """Wraps a drafter and records what each session was committed: (aux_hidden, next_tokens) per call."""

    def __init__(self, inner) -> None:
        self.inner, self.commits = inner, []

    def start(self, prompt_ids):
        session, log = self.inner.start(prompt_ids), []
        self.commits.append(log)

        class Session:
            def commit(self, aux_hidden, next_tokens):
                log.append((aux_hidden.clone(), next_tokens.clone()))
                return session.commit(aux_hidden, next_tokens)

            def expand(self, parents, tokens):
                return session.expand(parents, tokens)

        return Session()


@torch.no_grad()
def test_draft_is_fed_the_target_features_of_the_accepted_sequence(target):
    """Across rounds (tree paths through varying branches) the draft receives exactly (hidden_states[i] for the aux
    layers at position p, token p+1) for p = 0, 1, ... of the final sequence: the pairing TTT trains on."""
    cfg = SpecConfig(method="tree", tree_depth=3, tree_top_k=3, tree_total_tokens=7, max_new_tokens=12)
    rec = Recorder(Oracle(target, noise=0.7))
    res = evaluate(target, rec, PROMPTS, cfg, aux_layer_ids=AUX, baseline=False)
    for prompt, out, log in zip(PROMPTS, res.outputs, rec.commits):
        seq = torch.tensor(prompt + out)
        aux = torch.cat([a for a, _ in log])
        toks = torch.cat([t for _, t in log])
        n = aux.shape[0]
        assert n >= len(prompt) + len(out) - 1 - cfg.max_depth  # only the last round's commit is skipped
        hs = target(input_ids=seq[None], output_hidden_states=True).hidden_states
        ref = torch.cat([hs[i][0, :n] for i in AUX], dim=-1)
        torch.testing.assert_close(aux, ref, rtol=1e-4, atol=1e-5)
        assert toks.tolist() == seq[1:n + 1].tolist()


def test_perfect_draft_tau(target):
    """A draft that copies the target's next-token choice: every draft token accepted, τ = K + 1 exactly."""
    cfg = SpecConfig(method="chain", num_draft_tokens=3, max_new_tokens=12)
    res = evaluate(target, Oracle(target), PROMPTS, cfg, aux_layer_ids=AUX)
    assert res.tau == 4.0
    assert res.accepted_per_pos == [res.verify_calls] * 3 and res.draft_tokens == 3 * res.verify_calls
    # All 2 + 4 + 4 candidates kept: on this near-uniform random target deeper nodes would lose the reranking.
    tree = SpecConfig(method="tree", tree_depth=3, tree_top_k=2, tree_total_tokens=10, max_new_tokens=12)
    assert evaluate(target, Oracle(target), PROMPTS[:1], tree, aux_layer_ids=AUX).tau == 4.0


def test_random_draft_tau_near_one(target):
    cfg = SpecConfig(method="chain", num_draft_tokens=4, max_new_tokens=16)
    res = evaluate(target, make_draft(target, seed=5), PROMPTS, cfg, aux_layer_ids=AUX)
    assert 1.0 <= res.tau < 1.1
    check_counts(res, cfg)


def test_sampling_reproducible(target):
    for cfg in (SpecConfig(method="chain", num_draft_tokens=3, temperature=0.9, max_new_tokens=10, seed=4),
                SpecConfig(method="tree", tree_depth=2, tree_top_k=2, tree_total_tokens=4, temperature=0.9,
                           max_new_tokens=10, seed=4)):
        a = evaluate(target, Oracle(target, noise=1.0), PROMPTS[:2], cfg, aux_layer_ids=AUX, baseline=False)
        b = evaluate(target, Oracle(target, noise=1.0), PROMPTS[:2], cfg, aux_layer_ids=AUX, baseline=False)
        assert a.outputs == b.outputs and a.baseline_seconds is None
        check_counts(a, cfg)


# ---------------------------------------------------------------------------------------------------------------
# The lossless check tells rounding ties from real mismatches


def near_tie_target(delta: float):
    """A tiny target where token v's logit is token u's minus `delta` at every position (lm_head row v = row u, bias
    -delta at v), u being the greedy token at generated position 1 of PROMPTS[0] and v one that greedy decoding never
    emits (so the greedy outputs are those of the unmodified model). Returns (target, u, v, greedy outputs)."""
    target = tiny_target("llama", seed=1)
    refs = [slow_greedy(target, p, 10) for p in PROMPTS]
    u = refs[0][1]
    v = next(t for t in range(300) if all(t not in r for r in refs))
    with torch.no_grad():
        target.lm_head.weight[v] = target.lm_head.weight[u]
        bias = torch.zeros(300)
        bias[v] = -delta
        target.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    assert [slow_greedy(target, p, 10) for p in PROMPTS] == refs
    return target, u, v, refs


def perturb_verify_forward(target, token: int, eps: float):
    """Adds `eps` to `token`'s logit whenever the lm_head computes more than one row: the speculative verify forward
    only (prefill and the tie check's forward keep one row, plain decoding computes one)."""
    def hook(_module, _args, out):
        if out.shape[1] == 1:
            return out
        out = out.clone()
        out[..., token] += eps
        return out

    return target.lm_head.register_forward_hook(hook)


def test_lossless_check_counts_rounding_ties():
    """Verify path lifts v by 2δ over u (δ = tol/5): it picks v where the stepwise path picks u, first at position 1
    of prompt 0. The fresh forward finds the two within tol: a tie, not an error, and prompt 0 is not compared on."""
    tol = LOSSLESS_RTOL[torch.float32]  # max|logit| < 1 on this target, so tol = rtol * 1
    target, u, v, refs = near_tie_target(delta=tol / 5)
    assert target.lm_head(torch.randn(20, 64)).abs().max() < 1
    cfg = SpecConfig(method="chain", num_draft_tokens=3, max_new_tokens=10)
    handle = perturb_verify_forward(target, v, 2 * tol / 5)
    try:
        res = evaluate(target, make_draft(target), PROMPTS, cfg, aux_layer_ids=AUX)
    finally:
        handle.remove()
    assert res.lossless_checked and res.outputs[0][:1] == refs[0][:1] and res.outputs[0][1] == v
    first = res.numerical_ties[0]
    assert (first["prompt"], first["position"], first["tokens"]) == (0, 1, [v, u])
    assert first["gap"] == pytest.approx(tol / 5, rel=0.05) and first["tol"] == pytest.approx(tol)
    assert first["margin"] == pytest.approx(first["gap"])  # v is the runner-up, δ below u
    for tie, out, ref in zip(res.numerical_ties, res.outputs, refs):  # any other prompt: the same u/v tie
        assert tie["tokens"] == [v, u] and out[:tie["position"]] == ref[:tie["position"]]
    d = res.to_dict()
    assert d["num_numerical_ties"] == len(res.numerical_ties) and d["numerical_ties"] == res.numerical_ties


def test_lossless_check_raises_on_a_real_mismatch():
    """The same construction with δ = 50 tol: the verify path's v is far below the top in the fresh forward."""
    tol = LOSSLESS_RTOL[torch.float32]
    target, u, v, _ = near_tie_target(delta=50 * tol)
    cfg = SpecConfig(method="chain", num_draft_tokens=3, max_new_tokens=10)
    handle = perturb_verify_forward(target, v, 100 * tol)
    try:
        with pytest.raises(LosslessError) as err:
            evaluate(target, make_draft(target), PROMPTS, cfg, aux_layer_ids=AUX)
    finally:
        handle.remove()
    msg = str(err.value)
    assert f"prompt 0 differs from the target's greedy output at generated position 1: speculative [{v}" in msg
    assert f"token {v} (speculative)" in msg and f"{u} (greedy)" in msg
    assert "gap 0.001 > tol 2e-05" in msg and "real mismatch, not rounding" in msg
    assert isinstance(err.value, AssertionError)


# ---------------------------------------------------------------------------------------------------------------
# Speculative sampling: the emitted tokens are distributed as the target's softmax


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with zero target probability was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_acceptance_rule_keeps_target_distribution(kind):
    """First emitted token ~ p(root); given the first draft token was accepted, the second ~ p(that node).
    V=6 with a draft q far from p; chi-square over 10,000 seeded trials, 5 degrees of freedom (p<1e-3 bound 20.5)."""
    V, T = 6, 0.7
    g = torch.Generator().manual_seed(0)
    target_logits = torch.randn(3, V, generator=g) * 1.5  # rows: root, node 0, node 1
    p = torch.softmax(target_logits / T, dim=-1)
    q_logits = torch.randn(V, generator=g) * 2
    first, second = torch.zeros(V), torch.zeros(V)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10000):
        if kind == "chain":  # one sampled draft token below the root, one below it
            q = torch.softmax(q_logits / T, dim=-1)
            x0 = int(torch.multinomial(q, 1, generator=gen))
            x1 = int(torch.multinomial(q, 1, generator=gen))
            tree = DraftTree(tokens=torch.tensor([x0, x1]), parents=[-1, 0], scores=[0.0, 0.0], q=torch.stack([q, q]))
        else:  # two fixed siblings (top-2 of the draft) under the root
            tree = DraftTree(tokens=torch.tensor([2, 4]), parents=[-1, -1], scores=[-0.5, -1.0])
        path, bonus = accept(tree, target_logits, T, gen)
        emitted = [int(tree.tokens[j]) for j in path] + [bonus]
        first[emitted[0]] += 1
        if path[:1] == [0]:  # node 0 accepted: the next token is the target's at node 0 (row 1)
            second[emitted[1]] += 1
    assert _chi2(first, p[0]) < 20.5
    assert second.sum() > 500
    assert _chi2(second, p[1]) < 20.5


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs(target):
    cfg = SpecConfig(method="chain", num_draft_tokens=2, max_new_tokens=4)
    other = tiny_target("llama", seed=1, vocab_size=320)
    wrong_vocab = Eagle3Draft(DraftConfig.from_target_config(other.config, draft_vocab_size=100, aux_layer_ids=AUX))
    with pytest.raises(ValueError, match="vocab size: draft 320, target 300"):
        evaluate(target, wrong_vocab, PROMPTS, cfg, aux_layer_ids=AUX)
    draft = make_draft(target)
    with pytest.raises(ValueError, match="aux layer ids: draft trained on"):
        evaluate(target, draft, PROMPTS, cfg, aux_layer_ids=(1, 2, 4))
    foreign = Eagle3Draft(draft.config)  # random embedding, not the target's
    with pytest.raises(ValueError, match="not the target's embedding table"):
        evaluate(target, foreign, PROMPTS, cfg, aux_layer_ids=AUX)
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(target, draft, [[1, 2], []], cfg, aux_layer_ids=AUX)
    with pytest.raises(ValueError, match="outside the target vocab"):
        evaluate(target, draft, [[1, 300]], cfg, aux_layer_ids=AUX)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate(target, draft, [[1] * 510], cfg, aux_layer_ids=AUX)
    with pytest.raises(ValueError, match="method="):
        SpecConfig(method="beam")
    # The lossless check: a reference that differs at generated position 2 is an error naming prompt and position.
    good = [slow_greedy(target, p, 4) for p in PROMPTS[:2]]
    bad = [good[0], good[1][:2] + [(good[1][2] + 1) % 300] + good[1][3:]]
    with pytest.raises(AssertionError, match="prompt 1 differs .* position 2"):
        evaluate(target, draft, PROMPTS[:2], cfg, aux_layer_ids=AUX,
                 baseline=BaselineRun(outputs=bad, seconds=1.0, max_new_tokens=4, temperature=0.0))
    with pytest.raises(LosslessError, match="prompt 0 differs .* position 3.*stops where the other goes on"):
        evaluate(target, draft, PROMPTS[:2], cfg, aux_layer_ids=AUX,  # a greedy output cut short, as if by EOS
                 baseline=BaselineRun(outputs=[good[0][:3], good[1]], seconds=1.0, max_new_tokens=4, temperature=0.0))


def test_bootstrap_tau_interval():
    """Against a naive resampling loop (Python's own RNG, so only the distribution is shared) and two exact cases."""
    import random

    from eagle3.spec_decode import bootstrap_tau

    assert bootstrap_tau([4, 8, 12], [2, 4, 6]) == (2.0, 2.0)  # every prompt has τ = 2: no spread to find
    rng = random.Random(1)
    calls = [rng.randint(5, 40) for _ in range(30)]
    emitted = [c + rng.randint(0, 2 * c) for c in calls]
    lo, hi = bootstrap_tau(emitted, calls, resamples=20000)
    ref = []
    for _ in range(20000):
        pick = [rng.randrange(30) for _ in range(30)]
        ref.append(sum(emitted[i] for i in pick) / sum(calls[i] for i in pick))
    ref.sort()
    assert lo == pytest.approx(ref[500], abs=0.02) and hi == pytest.approx(ref[19499], abs=0.02)
    tau = sum(emitted) / sum(calls)
    assert lo < tau < hi and hi - lo > 0.1
    assert bootstrap_tau(emitted, calls, resamples=20000) == (lo, hi)  # seeded
    wide = bootstrap_tau(emitted[:8], calls[:8], resamples=20000)
    assert wide[1] - wide[0] > hi - lo  # fewer prompts, wider interval
    with pytest.raises(ValueError, match="one .emitted, calls. pair per prompt"):
        bootstrap_tau([1, 2], [1])
    with pytest.raises(ValueError, match="level"):
        bootstrap_tau([1], [1], level=95)
