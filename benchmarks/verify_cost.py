"""What a verification costs on this CPU: the target's forward over n rows against one plain decode step, the draft's
own steps, and the τ a chain of K draft tokens needs before speculative decoding beats the target alone.

    python benchmarks/verify_cost.py                       # SmolLM2-135M-Instruct, fp32, one thread, ~2 min
    python benchmarks/verify_cost.py --dtype bfloat16 --out benchmarks/results/verify_cost-bf16.json

Per verification call a chain of K does: one draft commit (the accepted tokens, ~τ of them), K-1 draft expansions
and one target forward over K+1 rows; plain decoding does one target forward over 1 row per token. So the speed-up is
    τ · T(1) / (T(K+1) + commit + (K-1) · expand)
and the break-even τ is the denominator over T(1). Everything is timed here the way `eagle3.spec_decode` runs it
(its `_Target` with the aux hooks, a DynamicCache cut back after each call, its `Eagle3Session`), best of
`--repeats` rounds, in one process, on a cache of `--context` positions. The draft's weights are random: its cost does
not depend on them (the same shapes as the demo's draft).

A GEMM table shows where T(n) > T(1) comes from: the target's MLP-up and lm_head shapes, weights cycled through
enough copies to come from DRAM as in a real forward, with torch's linear (weight [N, K], what HF runs) and with
a pre-transposed weight ([K, N] contiguous). Prints the tables and writes benchmarks/results/verify_cost.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.ttt_step import _best_time  # noqa: E402
from jobs.train import atomic_write  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "verify_cost.json"


def best_ms(fn, calls: int, repeats: int) -> float:
    """Best over `repeats` rounds (after a warm-up) of the mean of `calls` calls, in ms: ttt_step's timer."""
    return _best_time(lambda: [fn() for _ in range(calls)], repeats) / calls * 1e3


def gemm_table(repeats: int) -> list[dict]:
    """ms per call of x[m, K] @ W^T for torch's linear and a pre-transposed weight, weights from DRAM."""
    rows = []
    for name, n, k in (("mlp up 1536x576", 1536, 576), ("lm_head 49152x576", 49152, 576)):
        copies = max(1, (64 << 20) // (n * k * 4))  # > 64 MB of weights: more than the L3 cache holds
        ws = [torch.randn(n, k) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        for m in (1, 2, 4, 8):
            x = torch.randn(m, k)
            lin = best_ms(lambda: [F.linear(x, w) for w in ws], 3, repeats) / copies
            pre = best_ms(lambda: [x @ w for w in wts], 3, repeats) / copies
            rows.append({"shape": name, "m": m, "linear_ms": lin, "pretransposed_ms": pre,
                         "linear_GBps": n * k * 4 / lin / 1e6, "pretransposed_GBps": n * k * 4 / pre / 1e6})
    base = {r["shape"]: r for r in rows if r["m"] == 1}
    for r in rows:
        r["linear_vs_m1"] = r["linear_ms"] / base[r["shape"]]["linear_ms"]
        r["pretransposed_vs_m1"] = r["pretransposed_ms"] / base[r["shape"]]["pretransposed_ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256, help="positions already in the KV cache")
    ap.add_argument("--max-rows", type=int, default=8)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import DynamicCache

    from eagle3.model import DraftConfig, Eagle3Draft
    from eagle3.spec_decode import Eagle3Drafter, _keep_cache, _Target
    from jobs.eval import load_target

    model, _tok = load_target(args.target, args.dtype)
    dcfg = DraftConfig.from_target_config(model.config, draft_vocab_size=args.draft_vocab)
    draft = Eagle3Draft(dcfg, embed_weight=model.get_input_embeddings().weight.detach().float())
    draft = draft.to(next(model.parameters()).dtype).eval().requires_grad_(False)
    vocab = model.config.vocab_size
    tgt = _Target(model, dcfg.aux_layer_ids)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        prompt = torch.randint(0, vocab, (args.context,))
        _, aux = tgt.forward(prompt, None, None, cache, aux=True, last_only=True)
        L = cache.get_seq_length()

        def target_call(n: int, with_aux: bool):
            def run():
                tgt.forward(torch.randint(0, vocab, (n,)), None, None, cache, aux=with_aux)
                _keep_cache(cache, L, [])  # back to the same context: every call sees L cached positions
            return run

        plain = best_ms(target_call(1, False), args.calls, args.repeats)
        verify = {n: best_ms(target_call(n, True), args.calls, args.repeats) for n in range(1, args.max_rows + 1)}

        session = Eagle3Drafter(draft).start(prompt)
        session.commit(aux, torch.cat((prompt[1:], torch.tensor([1]))))
        commits = {}
        for n in (1, 2):
            feats, toks = aux[-n:], torch.randint(0, vocab, (n,))

            def commit():
                session.committed -= n  # re-commit the same n positions: the cache stays at the same length
                session.k, session.v = session.k[:, :, : session.committed], session.v[:, :, : session.committed]
                session.commit(feats, toks)
            commit()
            commits[n] = best_ms(commit, args.calls * 3, args.repeats)

        def expand():
            session.expand(torch.tensor([-1]), torch.tensor([1]))
            session._discard()
        expand_ms = best_ms(expand, args.calls * 3, args.repeats)
    tgt.close()

    # A call commits ~τ tokens; commit(1) and commit(2) bracket it at the τ of these drafts (1.2-1.5).
    commit_ms = (commits[1] + commits[2]) / 2
    chain = []
    for k in range(1, args.max_rows):
        cost = verify[k + 1] + commit_ms + (k - 1) * expand_ms
        chain.append({"K": k, "call_ms": cost, "break_even_tau": cost / plain})
    gemm = gemm_table(args.repeats)

    print(f"\ntarget {args.target} {args.dtype}, {args.threads} thread(s), {args.context} cached positions; "
          f"plain decode step {plain:.1f} ms")
    print("\n| rows n | target forward ms | vs plain step |\n|---:|---:|---:|")
    for n, ms in verify.items():
        print(f"| {n} | {ms:.1f} | {ms / plain:.2f} |")
    print(f"\ndraft: commit of 1 {commits[1]:.2f} ms, of 2 {commits[2]:.2f} ms, expand of 1 {expand_ms:.2f} ms "
          f"({expand_ms / plain:.3f} of a plain step)")
    print("\n| chain K | ms per verification call | τ needed for speed-up 1 |\n|---:|---:|---:|")
    for c in chain:
        print(f"| {c['K']} | {c['call_ms']:.1f} | {c['break_even_tau']:.2f} |")
    print("\n| GEMM | m | linear ms | vs m=1 | GB/s | pre-transposed ms | vs m=1 | GB/s |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in gemm:
        print(f"| {r['shape']} | {r['m']} | {r['linear_ms']:.3f} | {r['linear_vs_m1']:.2f} | {r['linear_GBps']:.1f} "
              f"| {r['pretransposed_ms']:.3f} | {r['pretransposed_vs_m1']:.2f} | {r['pretransposed_GBps']:.1f} |")
    out = {"target": args.target, "dtype": args.dtype, "threads": args.threads, "context": args.context,
           "plain_ms": plain, "verify_ms": verify, "commit_ms": commits, "expand_ms": expand_ms, "chain": chain,
           "gemm": gemm, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    atomic_write(Path(args.out), json.dumps(out, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
