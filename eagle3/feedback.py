"""TTT token feedback off the dataset path: the draft's own samples (or the target's greedy choice) fed at steps >= 1,
labelled by the target along that exact path (DESIGN.md §4).

Every TTT query i is an independent chain: at step k it attends the step-0 (dataset) keys 0..i plus only its own
keys of steps 1..k. So any subset of queries can take another path while the rest keep the dataset's, and the
unroll in `eagle3.ttt` runs unchanged with a different `feed` and `targets`.

A branch at query i starts at branch point p = i+1 (the last dataset token the draft saw at step 0); its tokens
x_0..x_{K-2} are fed at steps 1..K-1 and sit at target positions pos[p]+1+m. The target's relabel returns its
final hidden state after each x_m: the teacher of step m+1 at query i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from eagle3.attention import TTTKV
from eagle3.model import Eagle3Draft
from eagle3.target_head import Teacher
from eagle3.ttt import StepLabels, StepTargets, TokenFeed, data_label_mask, data_targets, shift_left


@dataclass
class Branches:
    """Queries that take a fed path; branch n continues row rows[n] after token cols[n] + 1."""

    rows: Tensor  # [N] long
    cols: Tensor  # [N] long: TTT query index i (branch point = i + 1)

    @property
    def points(self) -> Tensor:
        return self.cols + 1

    def __len__(self) -> int:
        return int(self.rows.numel())


@dataclass
class DraftSamples:
    """Tokens the draft sampled along its own path, per branch."""

    tokens: Tensor  # [N, M] long target ids fed at steps 1..M
    draft_ids: Tensor  # [N, M] long the same tokens as draft-vocab ids
    q: Tensor  # [N, M] fp32 probability the draft's sampling distribution gave each token (1 when greedy)


def select_branches(loss_mask: Tensor, doc_ids: Tensor, fraction: float, generator: torch.Generator) -> Branches:
    """Queries scored at step 0 (token i+2 is an assistant token of i's sample), a random `fraction` of them."""
    valid = data_label_mask(loss_mask, doc_ids, 0)  # [B, T-2]
    rows, cols = valid.nonzero(as_tuple=True)
    if fraction < 1.0 and rows.numel():
        keep = torch.randperm(rows.numel(), generator=generator)[: max(1, round(fraction * rows.numel()))]
        keep = keep.sort().values
        rows, cols = rows[keep], cols[keep]
    return Branches(rows=rows, cols=cols)


@torch.no_grad()
def sample_draft_path(
    draft: Eagle3Draft,
    aux_hidden: Tensor,
    input_ids: Tensor,
    position_ids: Tensor,
    doc_ids: Tensor | None,
    branches: Branches,
    steps: int,
    temperature: float,
    generator: torch.Generator | None,
    kernel: str = "auto",
) -> DraftSamples:
    """Run the draft `steps` TTT steps feeding its own samples at the branch queries; return what it sampled.

    Step k's logits at query i give the token fed at step k+1 (exactly what the training unroll will feed).
    temperature 0 = argmax; otherwise a sample from softmax(logits / temperature) drawn with `generator`.
    """
    kv = TTTKV(doc_ids=doc_ids if doc_ids is not None and bool((doc_ids > 0).any()) else None, kernel=kernel)
    hidden = draft.project(aux_hidden)
    r, c = branches.rows, branches.cols
    draft_ids, q = [], []
    fed = None
    for k in range(steps):
        ids = shift_left(input_ids, 1 + k)
        if k:
            ids = ids.clone()
            ids[r, c] = fed
        hidden, key, value = draft.step(ids, hidden, position_ids + k, kv)
        kv.push(key, value)
        logits = draft.compute_logits(hidden[r, c]).float()  # [N, draft_vocab]
        if temperature == 0:
            d = logits.argmax(-1)
            q.append(torch.ones_like(d, dtype=torch.float32))
        else:
            p = torch.softmax(logits / temperature, -1)
            d = torch.multinomial(p.cpu(), 1, generator=generator).squeeze(-1).to(p.device)
            q.append(p.gather(-1, d[:, None]).squeeze(-1))
        draft_ids.append(d)
        fed = draft.draft_to_target(d)
    if not steps:
        empty = torch.zeros(len(branches), 0, dtype=torch.long, device=input_ids.device)
        return DraftSamples(tokens=empty, draft_ids=empty, q=empty.float())
    dids = torch.stack(draft_ids, 1)
    return DraftSamples(tokens=draft.draft_to_target(dids), draft_ids=dids, q=torch.stack(q, 1))


def branch_feed(input_ids: Tensor, branches: Branches, tokens: Tensor) -> TokenFeed:
    """Dataset tokens everywhere, except that branch n feeds tokens[n, k-1] at step k >= 1."""
    r, c = branches.rows, branches.cols

    def feed(k: int) -> Tensor:
        ids = shift_left(input_ids, 1 + k)
        if k and len(branches):
            ids = ids.clone()
            ids[r, c] = tokens[:, k - 1]
        return ids

    return feed


def survival_weights(
    teacher: Teacher, branch_teacher: Teacher, branches: Branches, samples: DraftSamples, greedy: bool
) -> Tensor:
    """[N, M+1] weight of steps 0..M: the probability that verification keeps the chain up to that step.

    Greedy: all fed tokens equal the target's argmax at their place. Sampling: prod_j min(1, p_j(x_j) / q_j(x_j))
    with p the target's distribution over the draft vocabulary (the one the loss uses) and q the draft's sampling
    distribution.
    """
    r, p = branches.rows, branches.points
    if greedy:
        want = torch.cat([teacher.argmax[r, p][:, None], branch_teacher.argmax[:, :-1]], 1)  # [N, M]
        keep = (samples.tokens == want).float()
    else:
        p_first = teacher.probs[r, p].gather(-1, samples.draft_ids[:, :1])  # [N, 1]
        p_rest = branch_teacher.probs[:, :-1].gather(-1, samples.draft_ids[:, 1:, None]).squeeze(-1)
        keep = (torch.cat([p_first, p_rest], 1) / samples.q.clamp_min(1e-12)).clamp(max=1.0)
    ones = keep.new_ones(keep.shape[0], 1)
    return torch.cat([ones, torch.cumprod(keep, 1)], 1)


def branch_targets(
    teacher: Teacher,
    branch_teacher: Teacher,
    branches: Branches,
    loss_mask: Tensor,
    doc_ids: Tensor,
    weights: Tensor | None = None,
) -> StepLabels:
    """Labels: the dataset teacher, except that at step k >= 1 branch n is labelled by branch_teacher[n, k-1]
    (the target after the branch's k-th fed token). `weights` [N, K] (survival) scale branch positions' loss.
    A branch query is scored at step k iff the dataset query is (same mask, so counts match the data mode)."""
    base = data_targets(teacher, loss_mask, doc_ids)
    r, c = branches.rows, branches.cols

    def targets(k: int) -> StepTargets:
        t = base(k)
        if not len(branches):
            return t
        inside = c < t.label_mask.shape[1]  # later steps have fewer labelled indices
        rk, ck = r[inside], c[inside]
        weight = None
        if weights is not None:
            weight = torch.ones_like(t.label_mask, dtype=torch.float32)
            weight[rk, ck] = weights[inside, k].float()
        if k == 0:
            return StepTargets(probs=t.probs, argmax=t.argmax, in_draft=t.in_draft, label_mask=t.label_mask,
                               weight=weight)
        probs, argmax, in_draft = t.probs.clone(), t.argmax.clone(), t.in_draft.clone()
        probs[rk, ck] = branch_teacher.probs[inside, k - 1]
        argmax[rk, ck] = branch_teacher.argmax[inside, k - 1]
        in_draft[rk, ck] = branch_teacher.in_draft[inside, k - 1]
        return StepTargets(probs=probs, argmax=argmax, in_draft=in_draft, label_mask=t.label_mask, weight=weight)

    return targets
