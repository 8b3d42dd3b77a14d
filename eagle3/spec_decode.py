"""Speculative-decoding evaluator: a frozen HF target with KV cache verifies an EAGLE-3 draft (chain or tree).

One prompt at a time (batch 1), single device, pure PyTorch. Per round:
  1. the draft proposes a tree of tokens after the last committed token x_t (a chain is a tree of one branch);
  2. the target runs ONE forward over [x_t, draft tokens] with a tree attention mask (each token sees the cached
     prefix and its own ancestors; position = t + depth) — one verification call;
  3. the longest accepted path plus one bonus/corrected token from the target is emitted; the target KV cache keeps
     only the prefix, x_t and that path (gathered), and the target's aux features of x_t and the path are fed to the
     draft's step 0 (standard EAGLE-3 serving, as in vLLM/SGLang).

Acceptance: temperature 0 is greedy (a draft token is accepted iff it equals the target's argmax). At temperature
> 0 a chain draft samples from q and uses standard rejection sampling (accept with min(1, p/q), else sample the
residual max(0, p - q)); a tree draft picks its children deterministically (top-k, EAGLE-2) and uses EAGLE's
recursive rule over siblings (accept child x with probability p(x), else zero p(x), renormalise, try the next
sibling; sample the remainder if all fail). Both leave the output distribution exactly the target's.

Lossless check (temperature 0): each output is compared token for token with plain greedy target decoding. Verifying
K+1 tokens in one forward rounds differently from decoding one token at a time, so at a near-tie of the top logits
the two argmaxes can differ (in bf16 on CPU every few dozen tokens). At the first divergence of a prompt, one fresh
no-cache forward over prompt + common prefix decides: if both diverging tokens lie within
tol = LOSSLESS_RTOL[dtype] * max(1, max|logit|) of the top logit, it is a numerical tie (recorded, the rest of that
prompt is not compared); otherwise `LosslessError`.

Counting (vLLM's convention): τ = Σ(accepted + 1) / verification calls, pooled over all prompts, so the bonus token
counts and the prefill's first token does not; `accepted_per_pos[j]` counts calls that accepted draft depth j.
Counts are taken as verified, before the output is cut at max_new_tokens or EOS.

Draft index convention (eagle3/ttt.py): the draft's step 0 at index i combines fc(aux_i) with the embedding of
token i+1, sits at RoPE position i and predicts token i+2; a tree node at depth d below the last committed token
x_t (fed at index t-1) sits at position t-1+d and attends to the committed step-0 keys and its own ancestors,
exactly the keys TTT step d sees in training.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from eagle3.model import Eagle3Draft, rotate_half


# Tolerance of the lossless check's tie test, relative to max(1, max|logit|) at the diverging position, per target
# dtype. Measured on SmolLM2-135M-Instruct (CPU with AMX-BF16, 1 thread, 6 chat prompts x 32 greedy tokens, chain
# K=5): the largest |logit difference| over the vocabulary between any two of the batched verify forward,
# one-token-at-a-time decoding and a fresh no-cache forward, relative to max|logit| (~40 there), was
#   float32 4.4e-6 (1.8e-4 logits), bfloat16 5.1e-2 (2.0 logits), float16 6.3e-3 (0.26 logits).
# bf16 flipped the argmax at 7 of 192 positions (fresh-forward gaps 0 to 0.25 logits); fp32 and fp16 at none. A flip's
# gap in the fresh forward is at most twice that deviation; each rtol is 3-4x the measured max. In bf16 the check
# therefore only catches gross errors (tol ~6 logits at max|logit| 40): evaluate in fp32 for a strict one.
LOSSLESS_RTOL = {torch.float32: 2e-5, torch.bfloat16: 0.15, torch.float16: 0.02}


class LosslessError(AssertionError):
    """Speculative output differs from plain greedy decoding by more than rounding: a bug, not arithmetic."""


@dataclass(frozen=True, kw_only=True)
class SpecConfig:
    """How speculative decoding is run and measured."""

    method: Literal["chain", "tree"] = "chain"
    """'chain': K draft tokens in a line; 'tree': EAGLE-2 dynamic tree."""
    num_draft_tokens: int = 5
    """chain: K draft tokens per verification."""
    tree_depth: int = 5
    """tree: draft steps, i.e. the longest draft path in tokens (EAGLE-2 'depth'); like K for a chain."""
    tree_top_k: int = 8
    """tree: children expanded per node, and nodes expanded per level."""
    tree_total_tokens: int = 48
    """tree: draft tokens kept after reranking by cumulative log-prob (verified per call)."""
    temperature: float = 0.0
    """0: greedy verification (with the lossless check); > 0: speculative sampling."""
    max_new_tokens: int = 128
    """Tokens generated per prompt (fewer when an EOS token comes first)."""
    seed: int = 0
    """Seed of all sampling (draft, acceptance, baseline) at temperature > 0."""

    def __post_init__(self) -> None:
        if self.method not in ("chain", "tree"):
            raise ValueError(f"method={self.method!r}: choose 'chain' or 'tree'")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if self.tree_depth < 1 or self.tree_top_k < 1 or self.tree_total_tokens < 1:
            raise ValueError(
                f"tree_depth, tree_top_k and tree_total_tokens must be >= 1, got "
                f"{self.tree_depth}, {self.tree_top_k}, {self.tree_total_tokens}"
            )
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def max_depth(self) -> int:
        """Longest draft path: the length of `accepted_per_pos`."""
        return self.num_draft_tokens if self.method == "chain" else self.tree_depth

    def label(self) -> str:
        """Short name for tables, e.g. 'chain K=5' or 'tree d=5 k=8 n=48'."""
        if self.method == "chain":
            return f"chain K={self.num_draft_tokens}"
        return f"tree d={self.tree_depth} k={self.tree_top_k} n={self.tree_total_tokens}"


@dataclass
class SpecResult:
    """Pooled counts of one evaluation (all prompts)."""

    tau: float  # emitted tokens / verification calls, pooled over all prompts
    emitted_tokens: int  # Σ (accepted + 1) over verification calls
    verify_calls: int
    draft_tokens: int  # draft tokens proposed (chain: K per call)
    accepted_per_pos: list[int]  # [j] = verification calls that accepted draft token at depth j
    accept_hist: list[int]  # [n] = calls that accepted exactly n draft tokens
    outputs: list[list[int]]  # generated token ids per prompt (without the prompt)
    seconds: float  # wall-clock of speculative decoding, all prompts
    baseline_seconds: float | None  # wall-clock of plain target decoding, same prompts
    speedup: float | None  # baseline_seconds / seconds
    lossless_checked: bool = False  # outputs compared token for token with the target's greedy decoding
    emitted_per_prompt: list[int] = dataclasses.field(default_factory=list)  # sums to emitted_tokens
    calls_per_prompt: list[int] = dataclasses.field(default_factory=list)  # sums to verify_calls
    # Divergences that were rounding ties (see `lossless_check`): {prompt, position, tokens: [speculative, greedy],
    # gap, tol, margin (top1 - top2)}; logits of the fresh no-cache forward at that position.
    numerical_ties: list[dict] = dataclasses.field(default_factory=list)

    def tau_interval(self, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """Percentile bootstrap interval of the pooled τ over prompts (see `bootstrap_tau`)."""
        return bootstrap_tau(self.emitted_per_prompt, self.calls_per_prompt, level, resamples, seed)

    def to_dict(self) -> dict:
        """JSON-ready dict (with acceptance rate per position, without the outputs' token ids)."""
        d = dataclasses.asdict(self)
        d["tau_ci95"] = list(self.tau_interval()) if self.calls_per_prompt else None
        d["accept_rate_per_pos"] = [n / max(self.verify_calls, 1) for n in self.accepted_per_pos]
        d["num_prompts"] = len(self.outputs)
        d["output_tokens"] = sum(len(o) for o in self.outputs)
        d["num_numerical_ties"] = len(self.numerical_ties)
        del d["outputs"]
        return d


def bootstrap_tau(emitted: list[int], calls: list[int], level: float = 0.95, resamples: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of τ = Σ emitted / Σ calls, resampling whole prompts with replacement.

    Prompts, not verification calls, are the independent units (calls within one text are correlated), so two drafts
    whose intervals overlap widely were not told apart by that prompt set."""
    if len(emitted) != len(calls) or not calls:
        raise ValueError(f"need one (emitted, calls) pair per prompt, got {len(emitted)} and {len(calls)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    e = torch.tensor(emitted, dtype=torch.float64)
    c = torch.tensor(calls, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(calls), (resamples, len(calls)), generator=gen)
    taus = e[idx].sum(1) / c[idx].sum(1).clamp_min(1)
    lo, hi = torch.quantile(taus, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


@dataclass
class BaselineRun:
    """Plain target decoding of the same prompts: reference outputs and timing (reusable across configs)."""

    outputs: list[list[int]]  # generated ids per prompt
    seconds: float
    max_new_tokens: int
    temperature: float


# ----------------------------------------------------------------------------------------------------------------
# Draft interface


class DraftSession(Protocol):
    """Per-prompt draft state. Logits are over the TARGET vocabulary (-inf for tokens the draft cannot emit)."""

    def commit(self, aux_hidden: Tensor, next_tokens: Tensor) -> Tensor:
        """Consume accepted context: aux_hidden [n, 3h] are the target features of positions s..s+n-1 and
        next_tokens [n] the tokens at s+1..s+n. Drops any speculative nodes first. Returns the logits [V] for the
        token after the last of next_tokens (the tree root's children)."""
        ...

    def expand(self, parents: Tensor, tokens: Tensor) -> Tensor:
        """Run the draft on new tree nodes: node j holds tokens[j] below node parents[j] (an id returned in
        earlier expand order since the last commit; -1 = the root). New nodes get the next ids. Returns [n, V]."""
        ...


class Drafter(Protocol):
    """Anything that can draft: `Eagle3Drafter`, or a test double backed by the target itself."""

    def start(self, prompt_ids: Tensor) -> DraftSession:
        """A fresh session for one prompt (prompt_ids [T])."""
        ...


class Eagle3Drafter:
    """EAGLE-3 draft with an incremental KV cache (the training-time TTT attention, incrementally)."""

    def __init__(self, draft: Eagle3Draft) -> None:
        self.draft = draft
        # Draft vocab → target ids, for scattering draft logits into the target vocabulary.
        self.target_ids = draft.draft_to_target(torch.arange(draft.config.draft_vocab_size, device=draft.d2t.device))

    def start(self, prompt_ids: Tensor) -> "Eagle3Session":
        return Eagle3Session(self)


class Eagle3Session:
    """KV cache of one prompt: committed step-0 keys (one per target position) + speculative tree-node keys."""

    def __init__(self, drafter: Eagle3Drafter) -> None:
        d = drafter.draft
        self.drafter, self.draft = drafter, d
        cfg = d.config
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        dtype, dev = d.fc.weight.dtype, d.fc.weight.device
        self.k = torch.zeros(1, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=dtype, device=dev)
        self.v = self.k.clone()
        self.committed = 0  # step-0 keys in the cache (== target positions fed so far)
        self.root_hidden: Tensor | None = None  # [h] draft hidden at the last committed index
        self.node_hidden: list[Tensor] = []  # [h] per speculative node
        self.node_depth: list[int] = []
        self.node_anc: list[list[int]] = []  # ancestors-or-self of each speculative node (node ids)

    def _logits(self, hidden: Tensor) -> Tensor:
        """[n, h] → [n, V_target] with -inf outside the draft vocabulary."""
        d = self.draft.compute_logits(hidden).float()  # [n, draft_vocab]
        out = d.new_full((d.shape[0], self.draft.config.vocab_size), float("-inf"))
        out[:, self.drafter.target_ids] = d
        return out.cpu()  # drafting and acceptance run on CPU (CPU generator, tiny tensors)

    def _layer(self, ids: Tensor, hidden: Tensor, pos: Tensor, allowed: Tensor) -> Tensor:
        """The draft decoder layer over n new inputs with the cache: ids [n], hidden [n, h], pos [n],
        allowed [n, L] bool over all keys after appending these. Same math as `DraftLayer`, cached attention."""
        d, layer = self.draft, self.draft.midlayer
        attn = layer.self_attn
        n = ids.shape[0]
        hidden = hidden.unsqueeze(0)  # [1, n, h]
        embeds = d.embed_tokens(ids.unsqueeze(0)).to(hidden.dtype)
        cos, sin = d.rope(hidden, pos.unsqueeze(0))  # [1, n, hd]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x = torch.cat((layer.input_layernorm(embeds), layer.hidden_norm(hidden)), dim=-1)  # [1, n, 2h]
        q = attn.q_proj(x).view(1, n, attn.num_heads, attn.head_dim).transpose(1, 2)  # [1, H, n, hd]
        k = attn.k_proj(x).view(1, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)  # [1, Hkv, n, hd]
        v = attn.v_proj(x).view(1, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        kk = self.k.repeat_interleave(self.groups, dim=1)  # GQA: head j uses kv head j // groups
        vv = self.v.repeat_interleave(self.groups, dim=1)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias)  # [1, H, n, hd]
        h = hidden + attn.o_proj(out.transpose(1, 2).reshape(1, n, attn.num_heads * attn.head_dim))
        return (h + layer.mlp(layer.post_attention_layernorm(h)))[0]  # [n, h] pre-norm

    def _discard(self) -> None:
        self.k, self.v = self.k[:, :, : self.committed], self.v[:, :, : self.committed]
        self.node_hidden, self.node_depth, self.node_anc = [], [], []

    def commit(self, aux_hidden: Tensor, next_tokens: Tensor) -> Tensor:
        self._discard()
        n, c = next_tokens.shape[0], self.committed
        dev = self.k.device
        pos = torch.arange(c, c + n, device=dev)
        # Committed keys are all visible; the new ones causally.
        allowed = torch.ones(n, c + n, dtype=torch.bool, device=dev)
        allowed[:, c:] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        hidden = self.draft.project(aux_hidden.to(dev))  # [n, h]
        out = self._layer(next_tokens.to(dev), hidden, pos, allowed)
        self.committed += n
        self.root_hidden = out[-1]
        return self._logits(out[-1:])[0]

    def expand(self, parents: Tensor, tokens: Tensor) -> Tensor:
        parents_l = [int(p) for p in parents]
        n, s0, c = len(parents_l), len(self.node_hidden), self.committed
        dev = self.k.device
        hidden = torch.stack([self.root_hidden if p < 0 else self.node_hidden[p] for p in parents_l])
        depth = [1 if p < 0 else self.node_depth[p] + 1 for p in parents_l]
        allowed = torch.zeros(n, c + s0 + n, dtype=torch.bool, device=dev)
        allowed[:, :c] = True
        anc = []
        for j, p in enumerate(parents_l):
            a = ([] if p < 0 else self.node_anc[p]) + [s0 + j]
            allowed[j, [c + i for i in a]] = True
            anc.append(a)
        # The root x_t was fed at index c-1; depth d sits at position c-1+d (TTT step d's position).
        pos = torch.tensor(depth, device=dev) + (c - 1)
        out = self._layer(tokens.to(dev), hidden, pos, allowed)
        self.node_hidden += list(out)
        self.node_depth += depth
        self.node_anc += anc
        return self._logits(out)


# ----------------------------------------------------------------------------------------------------------------
# Draft trees and acceptance


@dataclass
class DraftTree:
    """Draft tokens below the root x_t, parents before children."""

    tokens: Tensor  # [N] long, target ids
    parents: list[int]  # parent node index per node, -1 = root
    scores: list[float]  # cumulative draft log-prob (sibling order at temperature > 0)
    q: Tensor | None = None  # [N, V] draft distribution each token was sampled from (chain at temperature > 0)

    @property
    def depths(self) -> list[int]:
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def children(self) -> dict[int, list[int]]:
        """node → children, best draft score first."""
        ch: dict[int, list[int]] = {}
        for j, p in enumerate(self.parents):
            ch.setdefault(p, []).append(j)
        for v in ch.values():
            v.sort(key=lambda j: -self.scores[j])
        return ch


def draft_chain(session: DraftSession, root_logits: Tensor, k: int, temperature: float,
                gen: torch.Generator | None) -> DraftTree:
    """K tokens in a line: argmax at temperature 0, else sampled from softmax(logits / T) (q kept)."""
    tokens, qs, logits = [], [], root_logits
    for j in range(k):
        if temperature > 0:
            q = torch.softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(q, 1, generator=gen)[0]
            qs.append(q)
        else:
            tok = logits.argmax()
        tokens.append(tok)
        if j < k - 1:
            logits = session.expand(torch.tensor([j - 1]), tok.view(1))[0]
    return DraftTree(tokens=torch.stack(tokens), parents=list(range(-1, k - 1)), scores=[0.0] * k,
                     q=torch.stack(qs) if qs else None)


def draft_tree(session: DraftSession, root_logits: Tensor, depth: int, top_k: int, total: int) -> DraftTree:
    """EAGLE-2 dynamic tree: each level expands its top_k nodes by cumulative log-prob, each into top_k children;
    of all candidates the `total` best (ties: shallower first, so every kept node's parent is kept) are verified."""
    lp = torch.log_softmax(root_logits.float(), dim=-1)
    v, i = lp.topk(min(top_k, int(torch.isfinite(lp).sum())))
    tok: list[int] = i.tolist()
    par: list[int] = [-1] * len(tok)
    score: list[float] = v.tolist()
    dep: list[int] = [1] * len(tok)
    sid: dict[int, int] = {}  # candidate → session node id (expanded candidates only)
    level = list(range(len(tok)))
    for _d in range(2, depth + 1):
        expand = sorted(level, key=lambda c: -score[c])[:top_k]
        parents = torch.tensor([sid[par[c]] if par[c] >= 0 else -1 for c in expand])
        logits = session.expand(parents, torch.tensor([tok[c] for c in expand]))
        base = len(sid)
        for j, c in enumerate(expand):
            sid[c] = base + j
        lp = torch.log_softmax(logits.float(), dim=-1)
        kk = min(top_k, int(torch.isfinite(lp[0]).sum()))
        v, i = lp.topk(kk, dim=-1)  # [len(expand), kk]
        level = []
        for j, c in enumerate(expand):
            for vv, ii in zip(v[j].tolist(), i[j].tolist()):
                level.append(len(tok))
                tok.append(ii)
                par.append(c)
                score.append(score[c] + vv)
                dep.append(dep[c] + 1)
    keep = sorted(sorted(range(len(tok)), key=lambda c: (-score[c], dep[c]))[:total])  # creation order
    index = {c: j for j, c in enumerate(keep)}
    return DraftTree(tokens=torch.tensor([tok[c] for c in keep]),
                     parents=[index[par[c]] if par[c] >= 0 else -1 for c in keep],
                     scores=[score[c] for c in keep])


def accept(tree: DraftTree, target_logits: Tensor, temperature: float,
           gen: torch.Generator | None) -> tuple[list[int], int]:
    """Walk the tree against the target. target_logits [1+N, V]: row 0 = the root x_t, row 1+j = node j.
    Returns (accepted node indices from the root down, the bonus/corrected token)."""
    children = tree.children()
    toks = tree.tokens.tolist()
    path: list[int] = []
    node = -1
    if temperature == 0:
        greedy = target_logits.argmax(-1).tolist()
        while True:
            want = greedy[node + 1]
            nxt = next((c for c in children.get(node, []) if toks[c] == want), None)
            if nxt is None:
                return path, want
            path.append(nxt)
            node = nxt
    probs = torch.softmax(target_logits.float() / temperature, dim=-1)  # [1+N, V]
    while True:
        p = probs[node + 1].clone()
        kids = children.get(node, [])
        if not kids:
            return path, int(torch.multinomial(p, 1, generator=gen))
        if tree.q is not None:
            # Chain: token sampled from q; accept with min(1, p/q), else sample the residual max(0, p - q).
            c = kids[0]
            q, x = tree.q[c], toks[c]
            if float(torch.rand((), generator=gen)) < min(1.0, float(p[x] / q[x])):
                path.append(c)
                node = c
                continue
            resid = (p - q).clamp_min(0)
            return path, int(torch.multinomial(resid if float(resid.sum()) > 0 else p, 1, generator=gen))
        # Tree: deterministic children; accept each with the (renormalised) target probability in turn.
        taken = None
        for c in kids:
            x = toks[c]
            if float(torch.rand((), generator=gen)) < float(p[x]):
                taken = c
                break
            p[x] = 0
            p = p / p.sum()
        if taken is None:
            return path, int(torch.multinomial(p, 1, generator=gen))
        path.append(taken)
        node = taken


def tree_mask(parents: list[int], prefix: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive [1, 1, 1+N, prefix+1+N] mask: every query sees the prefix and the root x_t; node j also sees its
    ancestors and itself. Float, not bool: eager attention with bool 4D masks is wrong in transformers."""
    n = len(parents)
    allowed = torch.zeros(1 + n, prefix + 1 + n, dtype=torch.bool)
    allowed[:, : prefix + 1] = True
    for j, p in enumerate(parents):
        row = allowed[1 + j]
        if p >= 0:
            row[prefix + 1 :] = allowed[1 + p, prefix + 1 :]
        row[prefix + 1 + j] = True
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias.to(device)[None, None]


# ----------------------------------------------------------------------------------------------------------------
# Target


class _Target:
    """The frozen HF causal LM with forward pre-hooks that capture the aux features (state ENTERING layer i)."""

    def __init__(self, model, aux_layer_ids: Sequence[int]) -> None:
        self.model, self.aux_layer_ids = model, tuple(aux_layer_ids)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.captured: dict[int, Tensor] = {}
        self.capture = False
        layers = model.model.layers
        self.handles = [layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i in set(self.aux_layer_ids)]

    def _hook(self, idx: int):
        def hook(_module, args, kwargs):
            if self.capture:
                self.captured[idx] = args[0] if args else kwargs["hidden_states"]
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def forward(self, ids: Tensor, pos: Tensor | None, mask: Tensor | None, cache, aux: bool,
                last_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """(logits [n, V] fp32 ([1, V] if last_only), aux [n, 3h] or None) for ids [n]; appends to `cache`."""
        self.capture = aux
        try:
            # last_only: a prefill needs one row of logits, not [T, V] (the lm_head dominates at 49K vocab).
            out = self.model(input_ids=ids[None].to(self.device),
                             position_ids=None if pos is None else pos[None].to(self.device),
                             attention_mask=mask, past_key_values=cache, use_cache=True,
                             logits_to_keep=1 if last_only else 0)
        finally:
            self.capture = False
        feats = torch.cat([self.captured[i][0] for i in self.aux_layer_ids], dim=-1) if aux else None
        self.captured.clear()
        return out.logits[0].float().cpu(), feats


def _keep_cache(cache, prefix: int, rows: list[int]) -> None:
    """Keep the first `prefix` positions and then the verified rows `rows` (ascending offsets after the prefix) in
    every layer of a DynamicCache. Only the few kept rows move (in place); the prefix is not copied: the cut is a view.
    A chain's accepted rows are already in place (0..m), so it is only the cut."""
    m = len(rows)
    moved = rows != list(range(m))
    index = torch.tensor(rows, device=cache.layers[0].keys.device) + prefix if moved else None
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if moved:
                t[:, :, prefix : prefix + m] = t.index_select(2, index)
            setattr(layer, name, t[:, :, : prefix + m])


def _pick(logits: Tensor, temperature: float, gen: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))


def _finish(out: list[int], eos: set[int], max_new: int) -> tuple[list[int], bool]:
    """Cut at the first EOS (kept) and at max_new tokens; (output, done)."""
    for j, t in enumerate(out[:max_new]):
        if t in eos:
            return out[: j + 1], True
    return out[:max_new], len(out) >= max_new


@torch.no_grad()
def target_decode(target, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0, eos_token_ids: Sequence[int] = (), progress: bool = False) -> BaselineRun:
    """Plain target decoding with KV cache, one token per forward (the baseline and the lossless reference)."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    tgt, eos = _Target(target, ()), set(eos_token_ids)
    outputs = []
    t0 = time.perf_counter()
    try:
        for prompt in tqdm(prompts, desc="target alone", unit=" prompt", disable=not progress):
            cache = DynamicCache(config=target.config)
            logits, _ = tgt.forward(torch.tensor(prompt), None, None, cache, aux=False, last_only=True)
            out = [_pick(logits[-1], temperature, gen)]
            while not _finish(out, eos, max_new_tokens)[1]:
                logits, _ = tgt.forward(torch.tensor(out[-1:]), None, None, cache, aux=False)
                out.append(_pick(logits[-1], temperature, gen))
            outputs.append(_finish(out, eos, max_new_tokens)[0])
    finally:
        tgt.close()
    return BaselineRun(outputs=outputs, seconds=time.perf_counter() - t0, max_new_tokens=max_new_tokens,
                       temperature=temperature)


def check_compatible(target, draft: Eagle3Draft, aux_layer_ids: Sequence[int]) -> None:
    """Loud errors when the draft was not trained for this target (vocab, hidden size, aux layers, embeddings)."""
    cfg = target.config.get_text_config()
    dc = draft.config
    problems = []
    if dc.vocab_size != cfg.vocab_size:
        problems.append(f"vocab size: draft {dc.vocab_size}, target {cfg.vocab_size}")
    if dc.hidden_size != cfg.hidden_size:
        problems.append(f"hidden size: draft {dc.hidden_size}, target {cfg.hidden_size}")
    if tuple(aux_layer_ids) != tuple(dc.aux_layer_ids):
        problems.append(f"aux layer ids: draft trained on {tuple(dc.aux_layer_ids)}, given {tuple(aux_layer_ids)}")
    bad = [i for i in aux_layer_ids if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        problems.append(f"aux layer ids {bad} out of range for a target with {cfg.num_hidden_layers} layers")
    if problems:
        raise ValueError("draft does not match the target: " + "; ".join(problems))
    emb = target.get_input_embeddings().weight
    if not torch.equal(draft.embed_tokens.weight.to(emb.device, emb.dtype), emb):
        raise ValueError("draft.embed_tokens is not the target's embedding table; load the draft with "
                         "eagle3.export.load_draft(path, embed_weight=target.get_input_embeddings().weight)")


@torch.no_grad()
def lossless_check(target, prompts: list[list[int]], outputs: list[list[int]],
                   reference: list[list[int]]) -> list[dict]:
    """Compare speculative `outputs` with the target's greedy `reference`, token for token; returns the ties.

    At the first divergence of prompt i, at generated position j (speculative token a, greedy token b), one fresh
    no-cache forward of the target (same model and dtype) over prompt + out[:j] gives logits l. With
    gap = max(l) - min(l[a], l[b]) and tol = LOSSLESS_RTOL[dtype] * max(1, max|l|): gap <= tol is a numerical tie
    (both tokens are within rounding of the top; recorded, the rest of prompt i is not compared), a larger gap raises
    `LosslessError`."""
    device, dtype = next(target.parameters()).device, next(target.parameters()).dtype
    rtol = LOSSLESS_RTOL[dtype]
    ties = []
    for i, (prompt, spec, ref) in enumerate(zip(prompts, outputs, reference)):
        if spec == ref:
            continue
        j = next((j for j, (a, b) in enumerate(zip(spec, ref)) if a != b), min(len(spec), len(ref)))
        where = (f"lossless check failed: prompt {i} differs from the target's greedy output at generated position "
                 f"{j}: speculative {spec[j:j + 5]} vs greedy {ref[j:j + 5]} (lengths {len(spec)}/{len(ref)})")
        if j == min(len(spec), len(ref)):  # one output ends early: no pair of tokens to weigh
            raise LosslessError(f"{where}; one output stops where the other goes on, which rounding cannot cause: a "
                                f"bug in the speculative decoder's EOS / max_new_tokens handling")
        a, b = spec[j], ref[j]
        logits = target(input_ids=torch.tensor([prompt + spec[:j]], device=device), use_cache=False,
                        logits_to_keep=1).logits[0, -1].float()  # [V]
        top2 = logits.topk(2).values
        tol = rtol * max(1.0, float(logits.abs().max()))
        gap = float(top2[0] - torch.minimum(logits[a], logits[b]))
        if gap > tol:
            raise LosslessError(
                f"{where}; a fresh forward puts token {a} (speculative) at {float(logits[a]):.4g} and {b} (greedy) at "
                f"{float(logits[b]):.4g}, top {float(top2[0]):.4g}: gap {gap:.3g} > tol {tol:.3g} ({dtype} rtol {rtol} "
                f"x max(1, max|logit|)). That is a real mismatch, not rounding: a bug in the speculative decoder "
                f"(verification mask, positions, KV-cache bookkeeping) or in how draft tokens are accepted"
            )
        ties.append({"prompt": i, "position": j, "tokens": [a, b], "gap": gap, "tol": tol,
                     "margin": float(top2[0] - top2[1])})
    return ties


@torch.no_grad()
def evaluate(target, draft: Eagle3Draft | Drafter, prompts: list[list[int]], cfg: SpecConfig, *,
             aux_layer_ids: Sequence[int], eos_token_ids: Sequence[int] = (), baseline: bool | BaselineRun = True,
             progress: bool = False) -> SpecResult:
    """Speculative decoding of `prompts` (token ids) with `draft` verifying on `target`; pooled counts + timing.

    At temperature 0 every output is compared token for token with plain greedy target decoding
    (`lossless_check`): a divergence at a rounding tie is recorded in `numerical_ties`, any other raises
    `LosslessError` naming prompt and position; that run is also the speed-up baseline. `baseline=False` skips the
    baseline only at temperature > 0; a `BaselineRun` from `target_decode` is reused (several configs, one
    baseline).
    """
    from transformers import DynamicCache

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    tcfg = target.config.get_text_config()
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens + cfg.max_depth + 1
    if longest > tcfg.max_position_embeddings:
        raise ValueError(f"longest prompt + max_new_tokens + draft depth = {longest} exceeds the target's "
                         f"max_position_embeddings={tcfg.max_position_embeddings}; shorten prompts or max_new_tokens")
    bad = [(i, t) for i, p in enumerate(prompts) for t in p if not 0 <= t < tcfg.vocab_size]
    if bad:
        raise ValueError(f"prompt {bad[0][0]} holds token id {bad[0][1]} outside the target vocab ({tcfg.vocab_size})")
    if isinstance(draft, Eagle3Draft):
        check_compatible(target, draft, aux_layer_ids)
        draft = Eagle3Drafter(draft)
    if isinstance(baseline, BaselineRun) and (baseline.max_new_tokens, baseline.temperature, len(baseline.outputs)) \
            != (cfg.max_new_tokens, cfg.temperature, len(prompts)):
        raise ValueError("the BaselineRun was made with other max_new_tokens/temperature/prompts than this config")
    dtype = next(target.parameters()).dtype
    if cfg.temperature == 0 and dtype not in LOSSLESS_RTOL:
        raise ValueError(f"target dtype {dtype} has no lossless-check tolerance; load the target in one of "
                         f"{', '.join(str(d) for d in LOSSLESS_RTOL)}")

    gen = torch.Generator().manual_seed(cfg.seed)
    eos = set(eos_token_ids)
    tgt = _Target(target, aux_layer_ids)
    K = cfg.max_depth
    accepted_per_pos, accept_hist = [0] * K, [0] * (K + 1)
    emitted = calls = drafted = 0
    outputs: list[list[int]] = []
    emitted_pp: list[int] = []
    calls_pp: list[int] = []
    t0 = time.perf_counter()
    try:
        for prompt in tqdm(prompts, desc=f"speculative ({cfg.label()})", unit=" prompt", disable=not progress):
            emitted_before, calls_before = emitted, calls
            ids = torch.tensor(prompt)
            cache = DynamicCache(config=target.config)
            logits, aux = tgt.forward(ids, None, None, cache, aux=True, last_only=True)
            out = [_pick(logits[-1], cfg.temperature, gen)]
            session = draft.start(ids)
            root_logits = session.commit(aux, torch.tensor(prompt[1:] + out))
            while not _finish(out, eos, cfg.max_new_tokens)[1]:
                if cfg.method == "chain":
                    tree = draft_chain(session, root_logits, cfg.num_draft_tokens, cfg.temperature, gen)
                else:
                    tree = draft_tree(session, root_logits, cfg.tree_depth, cfg.tree_top_k, cfg.tree_total_tokens)
                prefix = len(prompt) + len(out) - 1  # positions already in the target cache; x_t is next
                if cfg.method == "chain":  # a chain's tree mask is the causal one: the model's own fast path
                    pos = mask = None
                else:
                    depths = torch.tensor(tree.depths)
                    pos = torch.cat((torch.zeros(1, dtype=torch.long), depths)) + prefix
                    mask = tree_mask(tree.parents, prefix, tgt.dtype, tgt.device)
                logits, aux = tgt.forward(torch.cat((torch.tensor(out[-1:]), tree.tokens)), pos, mask, cache, aux=True)
                path, bonus = accept(tree, logits, cfg.temperature, gen)
                rows = [0] + [1 + j for j in path]
                _keep_cache(cache, prefix, rows)
                new = [int(tree.tokens[j]) for j in path] + [bonus]
                calls, emitted, drafted = calls + 1, emitted + len(new), drafted + len(tree.parents)
                accept_hist[len(path)] += 1
                for j in range(len(path)):
                    accepted_per_pos[j] += 1
                out += new
                if not _finish(out, eos, cfg.max_new_tokens)[1]:
                    root_logits = session.commit(aux[rows], torch.tensor(new))
            outputs.append(_finish(out, eos, cfg.max_new_tokens)[0])
            emitted_pp.append(emitted - emitted_before)
            calls_pp.append(calls - calls_before)
    finally:
        tgt.close()
    seconds = time.perf_counter() - t0

    if baseline is True or (baseline is False and cfg.temperature == 0):
        baseline = target_decode(target, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 seed=cfg.seed, eos_token_ids=eos_token_ids, progress=progress)
    checked, ties = cfg.temperature == 0, []
    if checked:
        ties = lossless_check(target, prompts, outputs, baseline.outputs)
    base_s = baseline.seconds if isinstance(baseline, BaselineRun) else None
    return SpecResult(
        tau=emitted / max(calls, 1), emitted_tokens=emitted, verify_calls=calls, draft_tokens=drafted,
        accepted_per_pos=accepted_per_pos, accept_hist=accept_hist, outputs=outputs, seconds=seconds,
        baseline_seconds=base_s, speedup=(base_s / seconds) if base_s else None, lossless_checked=checked,
        emitted_per_prompt=emitted_pp, calls_per_prompt=calls_pp, numerical_ties=ties,
    )
