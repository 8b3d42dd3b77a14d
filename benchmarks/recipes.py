"""Learning curves of draft recipes: τ against trained tokens and against training seconds (SmolLM2 + ShareGPT, CPU).

    python benchmarks/recipes.py --arms official,regen --steps 600 --regen-dir runs/regen/sharegpt-3000
    python benchmarks/recipes.py --arms regen-k5,regen-k9 --steps 600 --regen-dir ...   # TTT length variants
    python benchmarks/recipes.py --table                                               # table + PNG only

An arm is a base recipe, optionally with `-kN` (TTT length N, default 7), `-vN` (draft vocab size N instead of the
preset's 8,192) and `-lrX` (learning rate X instead of --lr), in that order, e.g. `regen-k5`, `regen-v4096`,
`regen-lr3e-3`:
  official       `data` mode on ShareGPT (the official EAGLE-3 recipe: the dataset's own responses)
  regen          `data` mode on target-regenerated responses (`--regen-dir`: an `aerie regenerate` folder)
  target         `target` token feedback on ShareGPT (a quarter of the scored positions, relabelled by the target)
  regen-target   `target` token feedback on regenerated responses
  draft          `draft` token feedback with survival weights on ShareGPT; `regen-draft` on regenerated data
  regen-headinit `regen` with the draft lm_head initialized from the target's (`draft.init_lm_head=target`);
                 `headinit` the same on ShareGPT

Each arm trains the `smollm2-sharegpt-cpu-official` preset once through the real Ray job, `--steps` optimizer steps at a
constant learning rate after warm-up (so a snapshot mid-run is what a run stopped there would give), exporting a
snapshot every `--snapshot-every` steps (`trainer.snapshot_every`, with its trained tokens and training seconds).
Every snapshot is then scored by Aerie's evaluator (`jobs.eval`'s target, draft loader and `eagle3.spec_decode`):
chain K=5 and an EAGLE-2 tree, greedy, fp32 target, lossless check, on the project's held-out prompts
(`jobs/assets/heldout-sharegpt.jsonl`, records no arm trains on), τ with a 95% bootstrap interval over prompts.
Results go to benchmarks/results/recipes.json after every run and every snapshot, so an interrupted sweep resumes
(a re-run with the same name resumes the training run too); the table and benchmarks/results/recipes.png (τ vs
tokens, τ vs seconds) are drawn from it. `--steps` larger than before extends the arms' runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results"
SHAREGPT_RECORDS = 6000  # ShareGPT arms read records [0, 6000): < jobs.heldout.TRAIN_RECORD_LIMIT
BASES = {
    "official": ("sharegpt", []),
    "regen": ("regen", []),
    "target": ("sharegpt", ["ttt.token_feedback=target", "ttt.branch_fraction=0.25"]),
    "regen-target": ("regen", ["ttt.token_feedback=target", "ttt.branch_fraction=0.25"]),
    "draft": ("sharegpt", ["ttt.token_feedback=draft", "ttt.branch_fraction=0.25", "ttt.survival_weights=true"]),
    "regen-draft": ("regen", ["ttt.token_feedback=draft", "ttt.branch_fraction=0.25", "ttt.survival_weights=true"]),
    "regen-headinit": ("regen", ["draft.init_lm_head=target"]),
    "headinit": ("sharegpt", ["draft.init_lm_head=target"]),
}
CHAIN_K = 5


def parse_arm(arm: str) -> tuple[str, int, list[str]]:
    """'regen-k5' → ('regen', 5, overrides); 'regen-v4096' → draft vocab 4,096; 'regen-lr3e-3' → optim.lr=0.003.
    Suffixes in the order -kN, -vN, -lrX, each optional."""
    m = re.fullmatch(r"(?P<base>.+?)(?:-k(?P<k>\d+))?(?:-v(?P<v>\d+))?(?:-lr(?P<lr>.+))?", arm)
    base = m["base"] if m else arm
    if base not in BASES:
        raise SystemExit(f"unknown arm {arm!r}: a base of {sorted(BASES)} with optional -kN (TTT length), -vN (draft "
                         "vocab size) and -lrX (learning rate) suffixes, in that order, e.g. regen-k5-v4096-lr3e-4")
    sets = []
    if m["lr"] is not None:
        try:
            sets.append(f"optim.lr={float(m['lr'])}")
        except ValueError:
            raise SystemExit(f"arm {arm}: the learning rate after -lr must be a number, e.g. -lr3e-3") from None
    if m["v"] is not None:
        sets.append(f"draft.vocab_size={int(m['v'])}")
    k = int(m["k"]) if m["k"] is not None else 7
    source, base_sets = BASES[base]
    return source, k, [*base_sets, f"ttt.length={k}", *sets]


def arm_overrides(arm: str, args) -> list[str]:
    source, _k, sets = parse_arm(arm)
    if source == "regen":
        if not args.regen_dir:
            raise SystemExit(f"arm {arm} trains on regenerated data: pass --regen-dir (an `aerie regenerate` folder)")
        data = [f"data.path={Path(args.regen_dir).absolute()}", "data.max_samples=null"]
    else:
        data = [f"data.max_samples={SHAREGPT_RECORDS}"]
    lr = [] if any(o.startswith("optim.lr=") for o in sets) else [f"optim.lr={args.lr}"]
    return [f"output_dir={Path(args.runs).absolute()}", f"name=rc-{arm}", f"optim.max_steps={args.steps}",
            "optim.min_lr_ratio=1.0", *lr, "optim.epochs=100",
            f"trainer.snapshot_every={args.snapshot_every}", f"trainer.checkpoint_every={args.snapshot_every}",
            "eval.enabled=false", "tracking.system_metrics_interval_s=0", *data, *sets]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="", help="comma-separated arms (see the module docstring)")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per arm (~1,000 tokens each)")
    ap.add_argument("--snapshot-every", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--regen-dir", default="", help="`aerie regenerate` output folder for the regen arms")
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--eval-new-tokens", type=int, default=64)
    ap.add_argument("--score-steps", default="", help="comma-separated snapshot steps to score (default: all)")
    ap.add_argument("--no-tree", action="store_true", help="score the chain only (about half the eval time)")
    ap.add_argument("--out", default=str(RESULTS / "recipes.json"))
    ap.add_argument("--runs", default="runs/recipes")
    ap.add_argument("--table", action="store_true", help="print the table and draw the PNG from the JSON only")
    ap.add_argument("--score-only", action="store_true",
                    help="score the arms' existing snapshots, never train (e.g. while the arm's run still trains)")
    args = ap.parse_args()

    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    report.setdefault("arms", {})
    if not args.table:
        import torch

        eval_set = {"prompts_file": "jobs/assets/heldout-sharegpt.jsonl", "num_prompts": args.eval_prompts,
                    "max_new_tokens": args.eval_new_tokens, "chain_k": CHAIN_K, "tree": not args.no_tree}
        if report.get("eval_set", eval_set) != eval_set:
            raise SystemExit(f"{out_path} was scored on {report['eval_set']}, not {eval_set}; use another --out")
        report.update({"eval_set": eval_set, "preset": "smollm2-sharegpt-cpu-official", "torch": torch.__version__})
        scorer = Scorer(args, eval_set)
        for arm in [a for a in args.arms.split(",") if a]:
            run_arm(arm, args, report, scorer, out_path)
    print(table(report))
    print()
    print(equal_time_table(report))
    if report["arms"]:
        plot(report, out_path.with_suffix(".png"))
        print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


def run_arm(arm: str, args, report: dict, scorer: "Scorer", out_path: Path) -> None:
    from jobs import train
    from jobs.train_loop import snapshot_dir

    overrides = arm_overrides(arm, args)
    entry = report["arms"].setdefault(arm, {"snapshots": {}})
    run_dir = Path(args.runs).absolute() / f"rc-{arm}"
    if entry.get("steps_trained", 0) < args.steps and not args.score_only:
        print(f"[recipes] {arm}: training to step {args.steps}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        s = train.main(["--preset", "smollm2-sharegpt-cpu-official", *sum([["--set", o] for o in overrides], [])])
        entry.update({"overrides": overrides, "steps_trained": s.get("steps"), "job_wall_seconds": s.get("wall_seconds"),
                      "driver_seconds": round(time.perf_counter() - t0, 1), "final_acc_0": s.get("acc_0"),
                      "sim_accept_len": s.get("sim_accept_len"), "trained_tokens": s.get("trained_tokens")})
        save(report, out_path)
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "snapshots").glob("step-*") if p.is_dir())
    for step in steps:
        key = str(step)
        if key in entry["snapshots"] or (args.score_steps and key not in args.score_steps.split(",")):
            continue
        snap = snapshot_dir(run_dir, step)
        progress = json.loads((snap / "progress.json").read_text())
        entry["snapshots"][key] = {**progress, **scorer.score(snap)}
        save(report, out_path)
        r = entry["snapshots"][key]
        print(f"[recipes] {arm} step {step}: {progress['trained_tokens']:,} tokens, {progress['train_seconds']:.0f} s, "
              f"tau chain-{CHAIN_K} {r['tau_chain']:.3f}" + (f", tree {r['tau_tree']:.3f}" if "tau_tree" in r else ""),
              file=sys.stderr, flush=True)


class Scorer:
    """One fp32 target, the held-out prompts and one plain-decoding baseline for every snapshot (loaded once)."""

    def __init__(self, args, eval_set: dict):
        self.args, self.eval_set = args, eval_set
        self.target = None

    def _load(self) -> None:
        from eagle3.spec_decode import SpecConfig, target_decode
        from jobs import eval as ev
        from jobs.heldout import HELDOUT_PATH

        a = self.args
        self.target, self.tokenizer = ev.load_target("builtin:smollm2-135m-instruct", "float32")
        self.prompts, _ = ev.load_prompts(HELDOUT_PATH, self.tokenizer, num_prompts=a.eval_prompts,
                                          max_prompt_tokens=0)
        self.eos = ev.eos_ids(self.target, self.tokenizer)
        self.baseline = target_decode(self.target, self.prompts, max_new_tokens=a.eval_new_tokens, temperature=0.0,
                                      eos_token_ids=self.eos, progress=True)
        self.spec = [SpecConfig(method="chain", num_draft_tokens=CHAIN_K, max_new_tokens=a.eval_new_tokens)]
        if not a.no_tree:
            self.spec.append(SpecConfig(method="tree", tree_depth=5, tree_top_k=8, tree_total_tokens=48,
                                        max_new_tokens=a.eval_new_tokens))

    def score(self, export: Path) -> dict:
        """The snapshot's scores, kept next to it (score-<eval set hash>.json): a second process (--score-only, while
        the arm still trains) and a resumed sweep reuse them instead of decoding again."""
        import hashlib
        import os

        from jobs.train import atomic_write

        cache = export / f"score-{hashlib.sha256(json.dumps(self.eval_set, sort_keys=True).encode()).hexdigest()[:12]}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        load_before = os.getloadavg()[0]
        out = self._score(export)
        # Wall-clock speed-ups only mean something on otherwise idle cores: keep the load next to them.
        out["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        atomic_write(cache, json.dumps(out, indent=1))
        return out

    def _score(self, export: Path) -> dict:
        from eagle3.spec_decode import evaluate
        from jobs import eval as ev

        if self.target is None:
            self._load()
        draft = ev.load_draft_for(export, self.target)
        out: dict = {}
        for c in self.spec:
            t0 = time.perf_counter()
            r = evaluate(self.target, draft, self.prompts, c, aux_layer_ids=draft.config.aux_layer_ids,
                         eos_token_ids=self.eos, baseline=self.baseline, progress=True)
            d = r.to_dict()
            out[f"tau_{c.method}"] = r.tau
            out[f"tau_{c.method}_ci95"] = d["tau_ci95"]
            out[f"{c.method}_accept_rate_per_pos"] = d["accept_rate_per_pos"]
            out[f"{c.method}_speedup"] = d.get("speedup")
            out[f"{c.method}_eval_seconds"] = round(time.perf_counter() - t0, 1)
            out[f"{c.method}_lossless_checked"] = d["lossless_checked"]
        return out


def save(report: dict, path: Path) -> None:
    """Atomic write (jobs.train.atomic_write), so an interrupted sweep never leaves a torn JSON behind."""
    from jobs.train import atomic_write

    atomic_write(path, json.dumps(report, indent=1))


def _tau(r: dict, method: str) -> str:
    if f"tau_{method}" not in r:
        return "-"
    ci = r.get(f"tau_{method}_ci95")
    return f"{r[f'tau_{method}']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _points(entry: dict) -> list[dict]:
    return [entry["snapshots"][k] for k in sorted(entry["snapshots"], key=int)]


def table(report: dict) -> str:
    rows = [f"| arm | step | trained tokens | train s | τ chain K={CHAIN_K} [95% CI] | τ tree [95% CI] | "
            "accept rate per position (chain) |", "|---|---:|---:|---:|---:|---:|---|"]
    for arm, entry in report["arms"].items():
        for r in _points(entry):
            rates = " ".join(f"{x:.2f}" for x in r.get("chain_accept_rate_per_pos", [])[:4])
            rows.append(f"| {arm} | {r['step']} | {r['trained_tokens']:,} | {r['train_seconds']:.0f} | "
                        f"{_tau(r, 'chain')} | {_tau(r, 'tree')} | {rates} |")
    return "\n".join(rows)


def equal_time_table(report: dict) -> str:
    """Each arm's last snapshot within the smallest final training time of all arms: the equal-time comparison."""
    finals = [_points(e)[-1]["train_seconds"] for e in report["arms"].values() if e["snapshots"]]
    if not finals:
        return ""
    budget = min(finals)
    rows = [f"Equal training time (≤ {budget:.0f} s, each arm's last snapshot within it):", "",
            f"| arm | step | trained tokens | train s | τ chain K={CHAIN_K} [95% CI] | τ tree [95% CI] |",
            "|---|---:|---:|---:|---:|---:|"]
    for arm, entry in report["arms"].items():
        pts = [r for r in _points(entry) if r["train_seconds"] <= budget + 1e-6]
        if pts:
            r = pts[-1]
            rows.append(f"| {arm} | {r['step']} | {r['trained_tokens']:,} | {r['train_seconds']:.0f} | "
                        f"{_tau(r, 'chain')} | {_tau(r, 'tree')} |")
    return "\n".join(rows)


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("chain", "tree") if any(f"tau_{m}" in r for e in report["arms"].values()
                                                     for r in _points(e))]
    fig, axes = plt.subplots(len(methods), 2, figsize=(11, 3.8 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        for col, (xkey, xlabel) in enumerate([("trained_tokens", "trained tokens"),
                                              ("train_seconds", "training seconds (2 CPU cores)")]):
            ax = axes[row][col]
            for arm, entry in report["arms"].items():
                pts = [r for r in _points(entry) if f"tau_{method}" in r]
                if not pts:
                    continue
                x = [r[xkey] for r in pts]
                y = [r[f"tau_{method}"] for r in pts]
                lo = [r[f"tau_{method}_ci95"][0] for r in pts]
                hi = [r[f"tau_{method}_ci95"][1] for r in pts]
                line, = ax.plot(x, y, marker="o", label=arm)
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"τ {method}" + (f" K={CHAIN_K}" if method == "chain" else " (depth 5, top-8, 48)"))
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Draft recipes, SmolLM2-135M-Instruct: τ on held-out prompts (Aerie evaluator, 95% bands)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
