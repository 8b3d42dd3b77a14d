"""Evaluate an exported draft with real speculative decoding: `python -m jobs.eval` (also `aerie eval`).

draft folder + target + prompt file (JSONL/JSON of chat messages or ShareGPT) → a table on stdout, a JSON file,
and MLflow metrics/artifacts (acceptance histogram PNG) when a tracking URI or run id is given. Several configs
(chain K=3,5,7 and a tree) share one plain-target baseline, which is also the lossless reference at temperature 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from eagle3.data import DataError, record_messages
from eagle3.spec_decode import SpecConfig, SpecResult, evaluate, target_decode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def prompt_messages(record: dict) -> list[dict[str, str]]:
    """The conversation up to its first assistant reply (system turns kept, assistant turns before the first user
    turn dropped): what the target is asked to answer."""
    messages = record_messages(record)
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise DataError("no user turn, so no prompt; remove the record", "no_user_turn")
    first_user = roles.index("user")
    cut = next((i for i in range(first_user, len(roles)) if roles[i] == "assistant"), len(roles))
    return [m for m in messages[:first_user] if m["role"] == "system"] + messages[first_user:cut]


def load_prompts(path: str | Path | list[str], tokenizer, *, skip_records: int = 0, num_prompts: int | None = None,
                 max_prompt_tokens: int | None = None, on_bad_record: str = "error") -> tuple[list[list[int]], dict]:
    """Token ids of chat prompts (chat template, add_generation_prompt=True) from records skip_records.. of `path`.

    Prompts longer than max_prompt_tokens are skipped (a budget, not an error); malformed records raise naming the
    record, or are skipped and counted with on_bad_record='skip'. Repeats of an earlier prompt are skipped and
    counted (ShareGPT splits long chats into records that share their first turn; a repeated prompt would weigh one
    text several times in τ). Returns (prompts, counts)."""
    from eagle3.sources import SourceError, iter_source_records, resolve_parts

    try:
        parts = resolve_parts(path if isinstance(path, (list, tuple)) else str(path), what="prompts file")
    except SourceError as e:
        raise FileNotFoundError(str(e)) from None
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template, so chat prompts cannot be built from the "
                         "records; use a chat/instruct target (e.g. builtin:smollm2-135m-instruct) or add a "
                         "chat_template to its tokenizer_config.json")
    prompts: list[list[int]] = []
    counts = {"records_skipped_by_offset": 0, "too_long": 0, "bad": 0, "duplicate": 0}
    distinct: set[tuple[int, ...]] = set()
    seen = 0
    for part, index, record in iter_source_records(parts):
        if isinstance(record, DataError) and record.reason == "incomplete_tail":
            continue
        seen += 1
        if seen <= skip_records:
            counts["records_skipped_by_offset"] += 1
            continue
        try:
            if isinstance(record, DataError):
                raise record
            text = tokenizer.apply_chat_template(prompt_messages(record), tokenize=False, add_generation_prompt=True)
        except DataError as err:
            if on_bad_record == "skip":
                counts["bad"] += 1
                continue
            where = f"line {index + 1}" if part.kind == "jsonl" else ("row" if part.kind in ("parquet", "arrow")
                                                                        else "record") + f" {index}"
            raise ValueError(f"{part.path}: {where}: {err}; fix it or pass --on-bad-record skip") from err
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            counts["too_long"] += 1
            continue
        if tuple(ids) in distinct:
            counts["duplicate"] += 1
            continue
        distinct.add(tuple(ids))
        prompts.append(ids)
        if num_prompts is not None and len(prompts) >= num_prompts:
            break
    if not prompts:
        raise ValueError(f"{path}: no usable prompts after skipping {skip_records} records ({counts})")
    return prompts, counts


# ----------------------------------------------------------------------------------------------------------------
# Models


def load_target(spec: str, dtype: str = "float32"):
    """(model, tokenizer) of a target spec (see actors.models.resolve_model), eval mode, frozen, SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.models import resolve_model

    if dtype not in DTYPES:
        raise ValueError(f"target dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    folder = resolve_model(spec)
    # SDPA, not eager: eager attention with 4D tree masks is wrong in transformers (ENVIRONMENT.md).
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], attn_implementation="sdpa")
    return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(folder)


def load_draft_for(draft_dir: str | Path, target):
    """The exported draft, with the target's embeddings, checked against the target (clear errors)."""
    from eagle3.export import load_draft, read_draft_config

    cfg, _fmt = read_draft_config(draft_dir)
    tcfg = target.config.get_text_config()
    problems = []
    if cfg.vocab_size != tcfg.vocab_size:
        problems.append(f"vocab size {cfg.vocab_size} != target's {tcfg.vocab_size}")
    if cfg.hidden_size != tcfg.hidden_size:
        problems.append(f"hidden size {cfg.hidden_size} != target's {tcfg.hidden_size}")
    if cfg.target_num_layers != tcfg.num_hidden_layers or max(cfg.aux_layer_ids) >= tcfg.num_hidden_layers:
        problems.append(f"aux layer ids {cfg.aux_layer_ids} were chosen for a {cfg.target_num_layers}-layer target, "
                        f"this one has {tcfg.num_hidden_layers} layers")
    if problems:
        raise ValueError(f"draft {draft_dir} was not trained for this target: {'; '.join(problems)}")
    try:
        draft = load_draft(draft_dir, embed_weight=target.get_input_embeddings().weight.detach().float())
    except ValueError as err:
        if "d2t" in str(err) or "t2d" in str(err):
            raise ValueError(f"{err}. d2t/t2d map draft ids to target ids; re-export the draft with Aerie "
                             f"(eagle3.export.save_draft) so model.safetensors holds both") from err
        raise
    return draft.eval().requires_grad_(False)


def eos_ids(target, tokenizer) -> list[int]:
    """End-of-sequence ids: the generation config's (one or a list) and the tokenizer's."""
    ids = target.generation_config.eos_token_id if target.generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


# ----------------------------------------------------------------------------------------------------------------
# Run, report, track


def slug(cfg: SpecConfig) -> str:
    """Metric-name-safe config name, e.g. chain_k5 or tree_d5_k8_n48."""
    if cfg.method == "chain":
        return f"chain_k{cfg.num_draft_tokens}"
    return f"tree_d{cfg.tree_depth}_k{cfg.tree_top_k}_n{cfg.tree_total_tokens}"


def run_configs(target, draft, prompts: list[list[int]], configs: list[SpecConfig], *, eos: list[int],
                progress: bool = True, on_result=None) -> list[SpecResult]:
    """Evaluate each config; configs with the same (max_new_tokens, temperature, seed) share one baseline run.
    `on_result(results so far)` is called after each config (long CPU runs report as they go)."""
    baselines: dict[tuple, Any] = {}
    results = []
    for cfg in configs:
        key = (cfg.max_new_tokens, cfg.temperature, cfg.seed)
        if key not in baselines:
            baselines[key] = target_decode(target, prompts, max_new_tokens=cfg.max_new_tokens,
                                           temperature=cfg.temperature, seed=cfg.seed, eos_token_ids=eos,
                                           progress=progress)
        results.append(evaluate(target, draft, prompts, cfg, aux_layer_ids=draft.config.aux_layer_ids,
                                eos_token_ids=eos, baseline=baselines[key], progress=progress))
        if on_result is not None:
            on_result(results)
    return results


def format_table(configs: list[SpecConfig], results: list[SpecResult]) -> str:
    """Plain-text table: τ (with a 95% bootstrap interval over prompts), acceptance rate per draft position, speed."""
    head = f"{'config':<22} {'tau':>6} {'tau 95% CI':>13} {'calls':>6} {'draft/call':>10} {'spec s':>8} {'target s':>8} {'speedup':>7}" \
           f"  {'lossless':<13} accept rate per position"
    lines = [head, "-" * len(head)]
    for cfg, r in zip(configs, results):
        d = r.to_dict()
        rates = " ".join(f"{x:.2f}" for x in d["accept_rate_per_pos"])
        ci = f"[{d['tau_ci95'][0]:.2f}, {d['tau_ci95'][1]:.2f}]" if d["tau_ci95"] else "-"
        ties = d["num_numerical_ties"]  # divergences at rounding ties (eagle3.spec_decode.lossless_check)
        lossless = "n/a" if not r.lossless_checked else "yes" if not ties else f"yes ({ties} tie{'s' * (ties > 1)})"
        lines.append(
            f"{cfg.label():<22} {r.tau:>6.3f} {ci:>13} {r.verify_calls:>6} {r.draft_tokens / max(r.verify_calls, 1):>10.1f} "
            f"{r.seconds:>8.1f} {r.baseline_seconds or float('nan'):>8.1f} {r.speedup or float('nan'):>7.2f}  "
            f"{lossless:<13} {rates}"
        )
    return "\n".join(lines)


def plot_acceptance(configs: list[SpecConfig], results: list[SpecResult], out_png: Path) -> Path:
    """PNG: share of verification calls accepting exactly n draft tokens, and acceptance rate per position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(results), 1)
    for c, (cfg, r) in enumerate(zip(configs, results)):
        share = [n / max(r.verify_calls, 1) for n in r.accept_hist]
        axes[0].bar([n + c * width for n in range(len(share))], share, width, label=f"{cfg.label()} (τ={r.tau:.2f})")
        axes[1].plot(range(len(r.accepted_per_pos)), r.to_dict()["accept_rate_per_pos"], marker="o", label=cfg.label())
    axes[0].set(title="accepted draft tokens per verification call", xlabel="accepted", ylabel="share of calls")
    axes[1].set(title="calls accepting draft position j", xlabel="draft position j", ylabel="rate", ylim=(0, 1))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def metrics_of(configs: list[SpecConfig], results: list[SpecResult]) -> dict[str, float]:
    """eval/<config>/{tau,speedup,accept_rate_j,numerical_ties}; with a single config also plain eval/tau, ...."""
    out: dict[str, float] = {}
    for cfg, r in zip(configs, results):
        d = r.to_dict()
        m = {"tau": r.tau, "verify_calls": r.verify_calls, "emitted_tokens": r.emitted_tokens,
             **{f"accept_rate_{j}": x for j, x in enumerate(d["accept_rate_per_pos"])}}
        if r.speedup is not None:
            m["speedup"] = r.speedup
        if r.lossless_checked:
            m["numerical_ties"] = len(r.numerical_ties)
        if d["tau_ci95"] is not None:
            m["tau_ci95_low"], m["tau_ci95_high"] = d["tau_ci95"]
        out.update({f"eval/{slug(cfg)}/{k}": float(v) for k, v in m.items()})
        if len(configs) == 1:
            out.update({f"eval/{k}": float(v) for k, v in m.items()})
    return out


def log_to_mlflow(tracker, configs, results, report: dict, out_dir: Path) -> None:
    """Metrics, params and artifacts (eval.json, acceptance PNG) into `tracker`'s run."""
    from jobs.tracking import log_files

    tracker.log_metrics(metrics_of(configs, results), step=0)
    tracker.log_params({"eval.draft": report["draft"], "eval.prompts": report["prompts"],
                        "eval.num_prompts": report["num_prompts"], "eval.configs": ", ".join(c.label() for c in configs)})
    log_files(tracker, {"eval.json": json.dumps(report, indent=2)}, "eval")
    png = plot_acceptance(configs, results, out_dir / "accept_hist.png")
    tracker.client.log_artifact(tracker.run_id, str(png), "eval")


def eval_prompts_path(spec: str) -> Path:
    """eval.prompts: "heldout" is the project's held-out ShareGPT prompts (jobs.heldout), else a file path."""
    from jobs.heldout import HELDOUT_PATH

    if spec == "heldout":
        return HELDOUT_PATH
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"eval.prompts={spec!r} does not exist; give a .jsonl/.json prompt file, "
                                "'heldout' (the project's held-out prompts) or '' (records after the training data)")
    return path


def eval_after_training(cfg, export_dir: Path, skip_records: int, tracker) -> dict:
    """The train job's last step (cfg.eval): decode held-back prompts (records of cfg.data.path after the first
    `skip_records`, which training read) with the exported draft, the target in cfg.eval.target_dtype, and log eval/*
    into the training run. Prints the table; returns eval_* summary fields (τ, speed-up, ties, dtype)."""
    ec = cfg.eval
    if cfg.target.num_threads:  # as the target actors ran; two contended threads are far slower than one here
        torch.set_num_threads(cfg.target.num_threads)
    # Its own dtype, not the target actors': in bf16, batched verification and plain decoding round differently and
    # the lossless check can only tell ties from bugs with a wide tolerance (eagle3.spec_decode.LOSSLESS_RTOL).
    target, tokenizer = load_target(cfg.target.model, ec.target_dtype)
    draft = load_draft_for(export_dir, target)
    source, skip = (cfg.data.path, skip_records) if not ec.prompts else (eval_prompts_path(ec.prompts), 0)
    try:
        prompts, counts = load_prompts(source, tokenizer, skip_records=skip, num_prompts=ec.num_prompts,
                                       max_prompt_tokens=ec.max_prompt_tokens, on_bad_record="skip")
    except ValueError as err:  # training used the whole file: report it, don't fail a finished run
        print(f"[aerie] eval skipped: {err}; use a larger data file or lower data.max_samples", file=sys.stderr)
        tracker.set_tags({"eval.skipped": str(err)[:500]})
        return {}
    spec = SpecConfig(method=ec.method, num_draft_tokens=ec.num_draft_tokens, tree_depth=ec.num_draft_tokens,
                      tree_top_k=ec.tree_top_k, tree_total_tokens=ec.tree_total_tokens, max_new_tokens=ec.max_new_tokens)
    results = run_configs(target, draft, prompts, [spec], eos=eos_ids(target, tokenizer), progress=False)
    report = {"draft": str(export_dir), "target": cfg.target.model, "target_dtype": ec.target_dtype,
              "prompts": str(source) + (f" (records after the first {skip})" if skip else ""),
              "num_prompts": len(prompts),
              "prompt_counts": counts, "results": [{"config": spec.label(), "spec_config": dataclasses.asdict(spec),
                                                    **results[0].to_dict()}]}
    log_to_mlflow(tracker, [spec], results, report, Path(export_dir).parent)
    print(format_table([spec], results), file=sys.stderr, flush=True)
    return {"eval_tau": results[0].tau, "eval_speedup": results[0].speedup, "eval_config": spec.label(),
            "eval_prompts": len(prompts), "eval_target_dtype": ec.target_dtype,
            "eval_numerical_ties": len(results[0].numerical_ties)}


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def at_least(minimum: int):
    """argparse type: a whole number >= minimum (rejected, naming flag and fix, before anything loads)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass one >= {minimum}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"got {n}, must be >= {minimum}; pass a number >= {minimum}")
        return n

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aerie eval", description=__doc__.splitlines()[0])
    p.add_argument("--draft", required=True, help="exported draft folder (config.json + model.safetensors)")
    p.add_argument("--target", required=True, help="builtin:smollm2-135m-instruct | builtin:tiny-llama | HF folder | .gguf")
    p.add_argument("--prompts", required=True, help=".jsonl/.json of chat messages (messages) or ShareGPT (conversations)")
    p.add_argument("--target-dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--num-prompts", type=at_least(1), default=50)
    p.add_argument("--skip-records", type=at_least(0), default=0,
                   help="skip the first N records (e.g. those trained on)")
    p.add_argument("--max-prompt-tokens", type=at_least(0), default=1024, help="skip longer prompts (0: no limit)")
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error")
    p.add_argument("--method", nargs="+", choices=["chain", "tree"], default=["chain"])
    p.add_argument("--k", type=at_least(1), nargs="+", default=[5],
                   help="chain: draft tokens per call (several allowed)")
    # Several trees in one run (one baseline): lists of one value or of equal lengths, taken position by position.
    p.add_argument("--tree-depth", type=at_least(1), nargs="+", default=[5], help="tree: draft steps (EAGLE-2 depth)")
    p.add_argument("--tree-top-k", type=at_least(1), nargs="+", default=[8], help="tree: children per node")
    p.add_argument("--tree-total-tokens", type=at_least(1), nargs="+", default=[48],
                   help="tree: draft tokens verified per call")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=at_least(1), default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=at_least(0), default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--out", default=None, help="JSON report path (default: eval.json next to the draft folder)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI; empty: no MLflow")
    p.add_argument("--experiment", default="aerie")
    p.add_argument("--run-name", default=None, help="MLflow run name (default eval-<draft folder>)")
    p.add_argument("--run-id", default=None, help="log into this existing MLflow run (e.g. the training run)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def spec_configs(args: argparse.Namespace) -> list[SpecConfig]:
    common = dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    configs = []
    if "chain" in args.method:
        configs += [SpecConfig(method="chain", num_draft_tokens=k, **common) for k in args.k]
    if "tree" in args.method:
        shapes = [args.tree_depth, args.tree_top_k, args.tree_total_tokens]
        n = max(map(len, shapes))
        if any(len(v) not in (1, n) for v in shapes):
            raise ValueError(f"--tree-depth, --tree-top-k and --tree-total-tokens gave {[len(v) for v in shapes]} "
                             f"values; give each one value or {n} (one per tree, taken position by position)")
        d, k, t = (v * n if len(v) == 1 else v for v in shapes)
        configs += [SpecConfig(method="tree", tree_depth=a, tree_top_k=b, tree_total_tokens=c, **common)
                    for a, b, c in zip(d, k, t)]
    return configs


def open_tracker(args: argparse.Namespace):
    """The MLflow run to log into: --run-id's existing run, else a new (or same-named) eval run. Checks the server
    answers first; errors name eval's own flags."""
    from mlflow.exceptions import MlflowException

    from jobs.tracking import MlflowTracker, check_store, open_run

    fix = "start the server, pass a reachable --tracking-uri, or leave --tracking-uri out to evaluate without MLflow"
    if not args.run_id:
        return open_run(args.tracking_uri, args.experiment, args.run_name or f"eval-{Path(args.draft).name}",
                        fresh=True, unreachable_fix=fix)  # every evaluation is its own run
    check_store(args.tracking_uri, fix)
    tracker = MlflowTracker(args.tracking_uri, args.run_id)
    try:
        tracker.client.get_run(args.run_id)
    except MlflowException as err:
        raise ValueError(f"--run-id {args.run_id}: no such run at --tracking-uri {args.tracking_uri} "
                         f"({str(err)[:200]}); pass an existing run's id, or leave --run-id out to log into a new "
                         f"run") from err
    return tracker


def main(argv: list[str] | None = None) -> dict:
    from jobs.tracking import close_run

    args = parse_args(argv)
    configs = spec_configs(args)  # validates the numbers before anything loads
    if args.threads:
        torch.set_num_threads(args.threads)
    tracker = open_tracker(args) if args.tracking_uri else None
    own_run = tracker is not None and not args.run_id  # --run-id's run (e.g. training's) keeps its status
    try:
        target, tokenizer = load_target(args.target, args.target_dtype)
        draft = load_draft_for(args.draft, target)
        prompts, counts = load_prompts(args.prompts, tokenizer, skip_records=args.skip_records,
                                       num_prompts=args.num_prompts, max_prompt_tokens=args.max_prompt_tokens or None,
                                       on_bad_record=args.on_bad_record)
        print(f"[aerie eval] {len(prompts)} prompts ({sum(map(len, prompts))} tokens; {counts}), "
              f"{len(configs)} configs", file=sys.stderr, flush=True)
        out = Path(args.out) if args.out else Path(args.draft).absolute().parent / "eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "draft": str(Path(args.draft).absolute()), "target": args.target, "target_dtype": args.target_dtype,
            "prompts": str(Path(args.prompts).absolute()), "num_prompts": len(prompts), "prompt_counts": counts,
            "threads": torch.get_num_threads(), "results": [],
        }

        def save(results: list[SpecResult]) -> None:  # after every config: a partial report survives an interrupt
            report["results"] = [{"config": c.label(), "spec_config": dataclasses.asdict(c), **r.to_dict()}
                                 for c, r in zip(configs, results)]
            out.write_text(json.dumps(report, indent=2))
            print(format_table(configs[len(results) - 1:], results[-1:]).splitlines()[-1], file=sys.stderr,
                  flush=True)

        results = run_configs(target, draft, prompts, configs, eos=eos_ids(target, tokenizer),
                              progress=not args.no_progress, on_result=save)
        if tracker is not None:
            log_to_mlflow(tracker, configs, results, report, out.parent)
    except BaseException as err:  # an eval run of our own is not left RUNNING
        if own_run:
            try:
                close_run(tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", err)
            except Exception as close_err:  # noqa: BLE001 - the evaluation's error is the one to see
                print(f"[aerie eval] could not mark MLflow run {tracker.run_id} failed: {close_err}", file=sys.stderr)
        raise
    if own_run:
        close_run(tracker, "FINISHED")
    print(format_table(configs, results))
    print(f"[aerie eval] report: {out}" + (f"; MLflow run {tracker.run_id}" if tracker else ""), file=sys.stderr)
    return report


if __name__ == "__main__":
    from jobs.cli import run_cli

    run_cli(main, sys.argv[1:], prog="aerie eval")
