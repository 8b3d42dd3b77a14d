"""Where the trainer step's time goes: each part of `Learner.step` timed alone at the real shapes, on CPU.

Parts (forward + backward unless noted, summed over the K TTT steps):
  teacher    target lm_head over the full vocab: argmax + draft-vocab softmax (forward only, TargetHead)
  fc         draft.project: [T, 3h] → [T, h]
  layer      the decoder layer without its attention: norms, q/k/v/o projections, RoPE, SwiGLU MLP, residuals
  attention  the TTT attention of each step (causal block + its diagonal keys)
  lm_head    final norm + draft lm_head   } one fused op on the fused path (`TTTConfig.fused_loss`), reported as
  soft-CE    log-softmax · teacher, argmax } `lm_head+soft-CE`; separately on the reference path
  optimizer  grad-norm clip + AdamW step + zero_grad
Each part runs on inputs captured from a real unroll (the attention of step k sees the k diagonal keys of steps
1..k) and is timed best-of-N; `total` is the whole trainer step (benchmarks/ttt_step.py's `trainer_step`) timed the
same way, so Σ parts ÷ total says how much the split covers (the rest: glue, step bookkeeping).

    python benchmarks/ttt_profile.py                                   # demo shapes, both loss paths, ~2 min
    python benchmarks/ttt_profile.py --hidden 4096 --T 2048 --threads 2  # Llama-3.1-8B shapes, ~15 min, ~14 GiB
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttt_step as ts  # noqa: E402

import eagle3.model  # noqa: E402
from eagle3.attention import TTTKV, auto_kernel  # noqa: E402
from eagle3.loss import ScoredRows, fused_soft_ce, soft_ce_sum  # noqa: E402
from eagle3.ttt import data_feed, data_targets, shift_left, step_weights  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def best(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up (ttt_step's timer)."""
    return ts._best_time(fn, repeats)


def fwd_bwd(fn, inputs: list[Tensor]):
    """A callable that runs fn(*inputs) and back-propagates a gradient of ones into every output."""
    def run():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [o for o in outs if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


def profile(hidden: int, T: int, K: int, threads: int, repeats: int, fused: bool) -> dict:
    torch.set_num_threads(threads)
    draft, batch = ts.build(hidden, T)
    spec = dict(path="aerie" if fused else "before", K=K, grad_checkpoint=False, dtype="bf16")
    opt = torch.optim.AdamW(draft.trainable_parameters(), lr=1e-4, fused=fused)  # as ttt_step.py
    kernel = auto_kernel(torch.device("cpu"), T) if fused else "flash_cpu"
    teacher_kind = ts.path_settings(spec["path"])["teacher"]
    ac = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    parts: dict[str, float] = {}

    parts["teacher"] = best(lambda: ts.teacher_for(batch, teacher_kind), repeats)
    teacher = ts.teacher_for(batch, teacher_kind)
    aux = batch["aux_hidden"] if fused else batch["aux_hidden"].float()

    def fc():
        with ac():
            out = draft.project(aux)
        out.backward(torch.ones_like(out))
    parts["fc"] = best(fc, repeats)

    # Capture each step's inputs and attention inputs from one real (no-grad) unroll.
    feed = data_feed(batch["input_ids"])
    targets = data_targets(teacher, batch["loss_mask"], batch["doc_ids"])
    captured, attn_in = [], []
    real_attention = eagle3.model.ttt_attention

    def spy(q, k, v, kv):
        attn_in.append((q.detach(), k.detach(), v.detach(), kv.snapshot()))
        return real_attention(q, k, v, kv)

    eagle3.model.ttt_attention = spy
    try:
        with torch.no_grad(), ac():
            kv = TTTKV(kernel=kernel)
            hidden_state = draft.project(aux)
            for k in range(K):
                ids, pos = feed(k), batch["position_ids"] + k
                captured.append((ids, hidden_state.detach(), pos, kv.snapshot()))
                hidden_state, key, value = draft.step(ids, hidden_state, pos, kv)
                kv.push(key, value)
                captured[-1] += (hidden_state.detach(),)
    finally:
        eagle3.model.ttt_attention = real_attention

    step_s = attn_s = head_s = ce_s = 0.0
    fused_parts = []
    for k, (ids, h_in, pos, snap, h_out) in enumerate(captured):
        h = h_in.clone().requires_grad_()

        def step(h=h, ids=ids, pos=pos, snap=snap):
            with ac():
                out, _, _ = draft.step(ids, h, pos, snap)
            out.backward(torch.ones_like(out))
        step_s += best(step, repeats)
        q, kk, vv, asnap = attn_in[k]
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, kk, vv))
        attn_s += best(fwd_bwd(lambda a, b, c: real_attention(a, b, c, asnap), [qg, kg, vg]), repeats)
        tgt = targets(k)
        ho = h_out.clone().requires_grad_()
        if fused:  # one fused call over all K steps, as the unroll makes it: collected here, timed below
            rows, cols = tgt.label_mask.nonzero(as_tuple=True)
            fused_parts.append((ho, tgt.probs, rows, cols, tgt.in_draft[rows, cols].float()))
        else:
            Tk = tgt.label_mask.shape[1]
            with ac():
                logits_ref = draft.compute_logits(ho[:, :Tk]).detach()

            def head(ho=ho, Tk=Tk):
                with ac():
                    out = draft.compute_logits(ho[:, :Tk])
                out.backward(torch.ones_like(out))
            head_s += best(head, repeats)
            lg = logits_ref.clone().requires_grad_()
            pm = tgt.label_mask & tgt.in_draft

            def ce(lg=lg, tgt=tgt, pm=pm):
                with ac():
                    loss = soft_ce_sum(lg, tgt.probs, pm)
                    with torch.no_grad():
                        draft.draft_to_target(lg.argmax(-1))
                loss.backward()
            ce_s += best(ce, repeats)
    if fused:
        coef = step_weights(K, 0.8).double() / torch.tensor([max(len(r), 1) for _, _, r, _, _ in fused_parts])

        def head_ce():
            with ac():
                scored = [ScoredRows(draft.norm(ho[r, c]), probs, r, c, w) for ho, probs, r, c, w in fused_parts]
                total, _, _ = fused_soft_ce(draft.lm_head.weight, scored, coef)
            total.backward()
        head_s = best(head_ce, repeats)
    parts["layer"] = step_s - attn_s
    parts["attention"] = attn_s
    if fused:
        parts["lm_head+soft-CE"] = head_s
    else:
        parts["lm_head"], parts["soft-CE"] = head_s, ce_s

    ts.trainer_step(draft, batch, opt, spec)  # gradients present for the optimizer part

    def optimizer():
        for p in draft.trainable_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(draft.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
    parts["optimizer"] = best(optimizer, repeats)
    total = best(lambda: ts.trainer_step(draft, batch, opt, spec), repeats)
    return dict(hidden=hidden, T=T, K=K, threads=threads, path=spec["path"], kernel=kernel,
                draft_vocab=ts.draft_vocab_of(hidden), parts_s=parts, total_s=total,
                coverage=sum(parts.values()) / total)


def table(results: list[dict]) -> str:
    names = ["teacher", "fc", "layer", "attention", "lm_head", "soft-CE", "lm_head+soft-CE", "optimizer"]
    head = "| shape | path | " + " | ".join(names) + " | Σ parts | total step |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for r in results:
        cells = []
        for n in names:
            v = r["parts_s"].get(n)
            cells.append("–" if v is None else f"{v * 1e3:.0f} ms ({100 * v / r['total_s']:.0f}%)")
        shape = f"h {r['hidden']}, T {r['T']}, K {r['K']}, Vd {r['draft_vocab']}"
        lines.append(f"| {shape} | {r['path']} | " + " | ".join(cells) +
                     f" | {100 * r['coverage']:.0f}% | {r['total_s'] * 1e3:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576, choices=sorted(ts.TARGETS))
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--K", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="best of N per part (after 1 warm-up)")
    p.add_argument("--paths", default="aerie,before", help="aerie (fused loss) and/or before (reference loss)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    out = args.out or RESULTS / f"ttt_profile-h{args.hidden}-T{args.T}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), torch=torch.__version__, cpu=ts.cpu_name())
    results = []
    for path in args.paths.split(","):
        r = profile(args.hidden, args.T, args.K, args.threads, args.repeats, fused=path == "aerie")
        print(f"{path}: total {r['total_s'] * 1e3:.0f} ms, parts cover {100 * r['coverage']:.0f}%", flush=True)
        results.append(r)
        # after each path: a later path killed for memory (`before` at 8B shapes) keeps the earlier ones
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(meta=meta, results=results), indent=2) + "\n")
        tmp.replace(out)
    print("\n" + table(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
