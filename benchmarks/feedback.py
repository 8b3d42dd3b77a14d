"""Ablation of TTT token feedback at an equal budget of target tokens (SmolLM2-135M-Instruct + ShareGPT, CPU).

    python benchmarks/feedback.py --budget 60000                 # all configs, resumable
    python benchmarks/feedback.py --budget 60000 --only data,target
    python benchmarks/feedback.py --budget 60000 --reeval --eval-prompts 24   # re-score every stored export

Each config trains the `smollm2-sharegpt-cpu` preset through the real Ray job until the target has processed
`--budget` tokens (features + relabelled branch tokens + regenerated response tokens: `optim.max_target_tokens`),
with a constant learning rate after warm-up so that runs stopping at different steps stay comparable. Then the
exported draft is evaluated with Aerie's speculative decoder (chain K=7 and an EAGLE-2 tree, greedy, lossless
check) on held-out ShareGPT prompts. Writes benchmarks/results/feedback.json (after every config, so an
interrupted sweep resumes), prints a markdown table and draws benchmarks/results/feedback.png. `--reeval` trains
nothing: it re-scores every stored export on one eval set (the JSON records which), so that configs run in different
sessions stay comparable.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results"


def configs(fraction: float, regen_tokens: int) -> dict[str, list[str]]:
    """name → --set overrides. K=1 is plain EAGLE training (no TTT unroll, so no feedback either)."""
    base = {
        "k1": ["ttt.length=1"],
        "data": ["ttt.token_feedback=data"],
        "draft": ["ttt.token_feedback=draft", f"ttt.branch_fraction={fraction}"],
        "draft_sw": ["ttt.token_feedback=draft", f"ttt.branch_fraction={fraction}", "ttt.survival_weights=true"],
        "target": ["ttt.token_feedback=target", f"ttt.branch_fraction={fraction}"],
    }
    regen = ["data.regenerate=true", f"data.regen_max_new_tokens={regen_tokens}", "data.regen_conversations=4"]
    out = dict(base)
    out.update({f"{k}+regen": v + regen for k, v in base.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=60000, help="target tokens per config")
    ap.add_argument("--fraction", type=float, default=0.25, help="ttt.branch_fraction of draft/target modes")
    ap.add_argument("--regen-tokens", type=int, default=192, help="data.regen_max_new_tokens")
    ap.add_argument("--only", default="", help="comma-separated config names (default: all)")
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--eval-new-tokens", type=int, default=64)
    ap.add_argument("--eval-skip-records", type=int, default=2000, help="held out: the training reads < 600 records")
    ap.add_argument("--out", default=str(RESULTS / "feedback.json"))
    ap.add_argument("--runs", default="runs/feedback-bench")
    ap.add_argument("--reeval", action="store_true", help="re-score the stored exports (of --only, or all); no training")
    ap.add_argument("--adopt-finished", action="store_true",
                    help="score a config's finished run under --runs (summary.json) instead of retraining it, e.g. after "
                         "the JSON lost its entry; you vouch that it ran this sweep's settings (the budget is checked)")
    args = ap.parse_args()

    import torch

    from eagle3.spec_decode import SpecConfig
    from jobs import train

    all_cfgs = configs(args.fraction, args.regen_tokens)
    names = [n for n in args.only.split(",") if n] or list(all_cfgs)
    unknown = sorted(set(names) - set(all_cfgs))
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {sorted(all_cfgs)}")
    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    if report and report.get("budget") != args.budget:
        raise SystemExit(f"{out_path} holds a sweep with budget {report.get('budget')}; use another --out")
    report.update({"budget": args.budget, "fraction": args.fraction, "regen_max_new_tokens": args.regen_tokens,
                   "eval_prompts": args.eval_prompts, "eval_new_tokens": args.eval_new_tokens,
                   "preset": "smollm2-sharegpt-cpu", "torch": torch.__version__})
    results = report.setdefault("results", {})

    spec = [SpecConfig(method="chain", num_draft_tokens=7, max_new_tokens=args.eval_new_tokens),
            SpecConfig(method="tree", tree_depth=6, tree_top_k=8, tree_total_tokens=48,
                       max_new_tokens=args.eval_new_tokens)]
    scorer = Scorer(args, spec)
    for name in names:
        if args.reeval:
            if name in results:
                results[name].update(scorer.score(results[name]["export"]))
                report["eval_set"] = scorer.eval_set
                save(report, out_path)
                print(f"[feedback] {name} re-scored: tau chain-7 {results[name]['tau_chain_k7']:.3f}, "
                      f"tree {results[name]['tau_tree']:.3f}", file=sys.stderr)
            continue
        if name in results:
            print(f"[feedback] {name}: done already, skipping", file=sys.stderr)
            continue
        overrides = [f"output_dir={Path(args.runs).absolute()}", f"name=fb-{name.replace('+', '-')}",
                     f"optim.max_target_tokens={args.budget}", "optim.min_lr_ratio=1.0", "optim.epochs=50",
                     "trainer.checkpoint_every=100000", "eval.enabled=false", *all_cfgs[name]]
        run_dir = Path(args.runs) / f"fb-{name.replace('+', '-')}"
        done = run_dir / "summary.json"
        if args.adopt_finished and done.exists():
            s = json.loads(done.read_text())
            if s.get("target_tokens", 0) < args.budget:
                raise SystemExit(f"{done}: {s.get('target_tokens')} target tokens < budget {args.budget}; not adoptable")
            train_s = None  # not timed by this process; the job's own wall_seconds is kept below
            print(f"[feedback] {name}: adopting the finished run {run_dir}", file=sys.stderr)
        else:
            if run_dir.exists():  # an interrupted run: its half-written MLflow DB would break the new one
                shutil.rmtree(run_dir)
            t0 = time.perf_counter()
            s = train.main(["--preset", "smollm2-sharegpt-cpu", *sum([["--set", o] for o in overrides], [])])
            train_s = round(time.perf_counter() - t0, 1)
        results[name] = {
            "overrides": all_cfgs[name], "train_seconds": train_s, "job_wall_seconds": s.get("wall_seconds"),
            "steps": s.get("steps"),
            "trained_tokens": s.get("trained_tokens"), "relabel_tokens_per_token": s.get("relabel_tokens_per_token", 0.0),
            "generated_tokens": s.get("generated_tokens", 0), "sim_accept_len": s.get("sim_accept_len"),
            "acc_0": s.get("acc_0"), "export": s["export"], **scorer.score(s["export"]),
        }
        report["eval_set"] = scorer.eval_set
        save(report, out_path)
        print(f"[feedback] {name}: tau chain-7 {results[name]['tau_chain_k7']:.3f}, "
              f"tree {results[name]['tau_tree']:.3f}", file=sys.stderr)
    stale = sorted(n for n, r in results.items() if r.get("eval_set") != report.get("eval_set"))
    if stale:
        print(f"[feedback] WARNING: {stale} were scored on another eval set; rerun with --reeval", file=sys.stderr)

    print(table(report))
    plot(report, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


class Scorer:
    """One fp32 target, one prompt set and one plain-decoding baseline for every draft (loaded on first use)."""

    def __init__(self, args, spec):
        self.args, self.spec = args, spec
        self.target = self.tokenizer = self.prompts = self.baseline = None
        self.eval_set: dict = {}

    def _load(self) -> None:
        from eagle3.data import packaged_sharegpt_path
        from eagle3.spec_decode import target_decode
        from jobs import eval as ev

        a = self.args
        self.target, self.tokenizer = ev.load_target("builtin:smollm2-135m-instruct", "float32")
        self.prompts, counts = ev.load_prompts(packaged_sharegpt_path(), self.tokenizer,
                                               skip_records=a.eval_skip_records, num_prompts=a.eval_prompts,
                                               max_prompt_tokens=384, on_bad_record="skip")
        self.baseline = target_decode(self.target, self.prompts, max_new_tokens=a.eval_new_tokens, temperature=0.0,
                                      eos_token_ids=ev.eos_ids(self.target, self.tokenizer), progress=True)
        self.eval_set = {"prompts": len(self.prompts), "distinct": True, "skip_records": a.eval_skip_records,
                         "max_new_tokens": a.eval_new_tokens, "duplicates_skipped": counts["duplicate"],
                         "target_tokens_generated": sum(len(t) for t in self.baseline.outputs)}

    def score(self, export: str) -> dict:
        from eagle3.spec_decode import evaluate
        from jobs import eval as ev

        if self.target is None:
            self._load()
        draft = ev.load_draft_for(export, self.target)
        taus = {}
        for c in self.spec:
            r = evaluate(self.target, draft, self.prompts, c, aux_layer_ids=draft.config.aux_layer_ids,
                         eos_token_ids=ev.eos_ids(self.target, self.tokenizer), baseline=self.baseline, progress=True)
            d = r.to_dict()
            taus[ev.slug(c)] = {"tau": r.tau, "tau_ci95": d["tau_ci95"], "accept_rate_per_pos": d["accept_rate_per_pos"]}
        tree = taus[ev.slug(self.spec[1])]
        return {"tau_chain_k7": taus["chain_k7"]["tau"], "tau_tree": tree["tau"],
                "tau_chain_k7_ci95": taus["chain_k7"]["tau_ci95"], "tau_tree_ci95": tree["tau_ci95"],
                "eval": taus, "eval_set": dict(self.eval_set)}


def save(report: dict, path: Path) -> None:
    """Atomic write (jobs.train.atomic_write), so an interrupted sweep never leaves a torn JSON behind."""
    from jobs.train import atomic_write

    atomic_write(path, json.dumps(report, indent=2))


def ordered(report: dict) -> list[tuple[str, dict]]:
    """Results in the sweep's canonical order (K=1, data, draft, draft_sw, target, then each +regen)."""
    order = list(configs(report.get("fraction", 0.25), report.get("regen_max_new_tokens", 0)))
    return sorted(report["results"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def table(report: dict) -> str:
    """Markdown table; τ with its 95% bootstrap interval over eval prompts where recorded."""
    def tau(r: dict, key: str) -> str:
        ci = r.get(f"{key}_ci95")
        return f"{r[key]:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    rows = ["| config | steps | trained tokens | relabel tok / trained tok | generated tokens | final acc_0 | "
            "τ chain K=7 [95% CI] | τ tree [95% CI] |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in ordered(report):
        rows.append(f"| {name} | {r['steps']} | {r['trained_tokens']:,.0f} | {r['relabel_tokens_per_token']:.2f} | "
                    f"{r['generated_tokens']:,.0f} | {r['acc_0']:.3f} | {tau(r, 'tau_chain_k7')} | "
                    f"{tau(r, 'tau_tree')} |")
    return "\n".join(rows)


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _ in ordered(report)]
    res = report["results"]

    def bars(key: str) -> tuple[list[float], list[list[float]] | None]:
        vals = [res[n][key] for n in names]
        cis = [res[n].get(f"{key}_ci95") for n in names]
        if not all(cis):
            return vals, None
        return vals, [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]

    (chain, chain_err), (tree, tree_err) = bars("tau_chain_k7"), bars("tau_tree")
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(7, 1.0 * len(names)), 4.6))
    ax.bar([i - 0.2 for i in x], chain, 0.4, yerr=chain_err, capsize=3, label="chain K=7")
    ax.bar([i + 0.2 for i in x], tree, 0.4, yerr=tree_err, capsize=3, label="tree (depth 6, top-8, 48 tokens)")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    top = max(v + (e[1][i] if e else 0) for vals, e in ((chain, chain_err), (tree, tree_err)) for i, v in enumerate(vals))
    ax.set_ylim(1.0, top * 1.05)
    ax.set_ylabel("acceptance length τ")
    ax.set_title(f"TTT token feedback at {report['budget']:,} target tokens (SmolLM2-135M, ShareGPT)"
                 + ("\nerror bars: 95% bootstrap interval over eval prompts" if chain_err else ""), fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
