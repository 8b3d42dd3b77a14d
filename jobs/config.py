"""Typed job configs, named presets, YAML files and `--set section.field=value` overrides.

A run is `preset` → optional YAML file → `--set` overrides, each validated once when the dataclasses are built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from actors.hf_backend import TargetConfig
from actors.models import SMOLLM2, TINY
from eagle3.data import DataConfig, packaged_sharegpt_path
from eagle3.ttt import TTTConfig


@dataclass(frozen=True, kw_only=True)
class DraftSettings:
    """Draft model choices that don't come from the target."""

    vocab_size: int = 32000
    """Draft vocabulary size (most frequent assistant tokens of the training data)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 0.5
    """Max global gradient norm (0 disables)."""
    epochs: int = 1
    """Passes over the data."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    max_target_tokens: int = 0
    """Stop once the targets have processed this many tokens (features + relabels + regenerated responses, all
    workers): an equal-cost budget across feedback modes. 0 = no limit. Pair with min_lr_ratio=1 (constant LR)."""
    rows_per_batch: int = 1
    """Rows per worker batch (each row is one sample, or max_length tokens of packed samples)."""
    seed: int = 0
    """Seed of the draft init and the data order."""
    bf16: bool = True
    """bf16 autocast for the draft forward where the device supports it (master weights stay fp32)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.max_target_tokens < 0:
            raise ValueError(f"optim.max_target_tokens must be >= 0, got {self.max_target_tokens}")
        if self.epochs < 1 or self.max_steps < 0 or self.rows_per_batch < 1 or self.warmup_steps < 0:
            raise ValueError("optim.epochs and optim.rows_per_batch must be >= 1; max_steps, warmup_steps >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Ray Train workers that train the draft."""

    num_workers: int = 1
    """Data-parallel train workers (DDP)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); CPU workers use gloo."""
    cpus_per_worker: float = 1.0
    """CPUs each worker reserves."""
    num_threads: int = 0
    """torch intra-op threads per worker; 0 = torch's default."""
    resources: dict | None = None
    """Extra custom Ray resources per worker, e.g. {"trainer": 1} to land on trainer nodes."""
    stream_depth: int = 2
    """Target requests each worker keeps in flight."""
    checkpoint_every: int = 50
    """Report a checkpoint every this many steps (and at the end)."""
    max_failures: int = 1
    """Worker-group restarts (from the latest checkpoint) before the run fails."""
    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.stream_depth < 1 or self.checkpoint_every < 1:
            raise ValueError("trainer.num_workers, stream_depth and checkpoint_every must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """MLflow."""

    uri: str = ""
    """Tracking URI; empty = the embedded default, sqlite:///<output_dir>/mlflow.db."""
    experiment: str = "aerie"
    """MLflow experiment name."""
    register_model: str = ""
    """If set, register the exported draft as a version of this registered model."""
    system_metrics_interval_s: float = 10.0
    """Sampling interval of CPU/GPU/memory metrics on the rank-0 trainer node (0 disables)."""


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Fault injection, for tests and drills only."""

    crash_worker_at_step: int = 0
    """Rank 0 raises once at this step (0 = never); the run must resume from its checkpoint."""
    kill_target_at_step: int = 0
    """Rank 0 kills target actor 0 once at this step (0 = never); in-flight requests must be resent."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Speculative-decoding evaluation of the exported draft at the end of training (jobs/eval.py), on held-back
    prompts: records of data.path after the ones read for training."""

    enabled: bool = False
    """Run it after export and log eval/* into the training run."""
    num_prompts: int = 8
    """Held-back prompts to decode."""
    method: Literal["chain", "tree"] = "chain"
    """Draft shape (see eagle3.spec_decode.SpecConfig)."""
    num_draft_tokens: int = 5
    """Chain: draft tokens per verification; tree: the tree depth."""
    max_new_tokens: int = 32
    """Tokens generated per prompt (greedy; the output is checked against plain target decoding)."""
    max_prompt_tokens: int = 512
    """Longer prompts are skipped."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.num_draft_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.num_prompts, eval.num_draft_tokens and eval.max_new_tokens must be >= 1")
        if self.method not in ("chain", "tree"):
            raise ValueError(f"eval.method={self.method!r}: choose chain or tree")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """One training run."""

    name: str = "aerie"
    """Run name: the Ray Train run and the MLflow run; submitting the same name again resumes it."""
    output_dir: str = "runs"
    """Root folder; the run writes <output_dir>/<name>/{export,ray,mlflow.db}."""
    export_format: Literal["vllm", "sglang", "speculators"] = "vllm"
    """Layout of the exported draft: vllm, sglang (layer ids one lower) or vLLM's speculators format (names the
    target as its verifier and K = ttt.length)."""
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig
    draft: DraftSettings = field(default_factory=DraftSettings)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # Cross-section check: a combination the backend cannot serve fails here, not at the first request.
        if self.target.backend == "vllm" and self.ttt.uses_branches:
            raise ValueError(f"ttt.token_feedback={self.ttt.token_feedback} needs the target's relabel, which only "
                             "target.backend=hf offers (a tree mask over a cached prefix); use target.backend=hf")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).absolute() / self.name

    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.run_dir / 'mlflow.db'}"


# ---------------------------------------------------------------------------------------------------------------
# Presets


def tiny() -> dict:
    """Seconds on a laptop: random 6-layer target, 48 ShareGPT conversations, 2 CPU workers' worth of data."""
    return {
        "name": "tiny",
        "target": {"model": TINY, "num_threads": 1},
        "data": {"path": str(packaged_sharegpt_path()), "max_length": 256, "max_samples": 48,
                 "on_bad_record": "skip"},
        "draft": {"vocab_size": 2000},
        "ttt": {"length": 3},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "rows_per_batch": 4, "bf16": False},
        "trainer": {"num_workers": 1, "num_threads": 1, "checkpoint_every": 4},
        "tracking": {"system_metrics_interval_s": 1.0},
    }


def smollm2_sharegpt_cpu() -> dict:
    """The real CPU demo: SmolLM2-135M-Instruct target on ShareGPT, 1 target actor + 1 trainer on 2 cores.

    Sized to finish in about a quarter of an hour: the trainer (~200 tokens/s at K=7 on one core) is the
    bottleneck; the target (bf16) runs ~1,300 tokens/s on the other core."""
    return {
        "name": "smollm2-sharegpt-cpu",
        "target": {"model": SMOLLM2, "dtype": "bfloat16", "num_threads": 1},
        "data": {"path": str(packaged_sharegpt_path()), "max_length": 512, "max_samples": 320,
                 "on_bad_record": "skip", "pack": True},
        "draft": {"vocab_size": 8192},
        "ttt": {"length": 7},
        "optim": {"lr": 1e-3, "warmup_steps": 10, "rows_per_batch": 2, "epochs": 1},
        "trainer": {"num_workers": 1, "num_threads": 1, "checkpoint_every": 50},
        "eval": {"enabled": True, "num_prompts": 8, "num_draft_tokens": 5, "max_new_tokens": 32},
    }


def smollm2_sharegpt_cpu_draft() -> dict:
    """The CPU demo with draft-path token feedback: a quarter of the scored positions feed the draft's own argmax
    at TTT steps >= 1, relabelled by the target, weighted by greedy chain survival (the best of the feedback modes
    in the equal-budget ablation, BENCHMARKS.md; at CPU budgets plain `data` still beats it: relabels cost steps)."""
    cfg = smollm2_sharegpt_cpu()
    cfg["name"] = "smollm2-sharegpt-cpu-draft"
    cfg["ttt"] = {**cfg["ttt"], "token_feedback": "draft", "branch_fraction": 0.25, "survival_weights": True}
    return cfg


def llama3_8b_8gpu() -> dict:
    """GPU cluster example: Llama-3.1-8B-Instruct target, 4 target GPUs + 4 trainer GPUs (see cluster/)."""
    return {
        "name": "llama3-8b-8gpu",
        "target": {"model": "/models/Meta-Llama-3.1-8B-Instruct", "dtype": "bfloat16", "device": "cuda",
                   "num_actors": 4, "gpus_per_actor": 1.0, "cpus_per_actor": 4.0, "resources": {"target": 1}},
        "data": {"path": "/data/sharegpt.jsonl", "max_length": 4096, "on_bad_record": "skip", "pack": True},
        "draft": {"vocab_size": 32000},
        "ttt": {"length": 7},
        "optim": {"lr": 1e-4, "warmup_steps": 500, "rows_per_batch": 1, "epochs": 10},
        "trainer": {"num_workers": 4, "use_gpu": True, "cpus_per_worker": 8.0, "resources": {"trainer": 1},
                    "stream_depth": 4, "checkpoint_every": 1000},
    }


PRESETS: dict[str, Callable[[], dict]] = {
    "tiny": tiny,
    "smollm2-sharegpt-cpu": smollm2_sharegpt_cpu,
    "smollm2-sharegpt-cpu-draft": smollm2_sharegpt_cpu_draft,
    "llama3-8b-8gpu": llama3_8b_8gpu,
}


# ---------------------------------------------------------------------------------------------------------------
# Building configs from nested dicts


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set(d: dict, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for p in path:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"--set {dotted}: {p} is not a section")
    d[last] = value


def _build(cls, values: dict, where: str):
    """Instantiate a (nested) config dataclass from a dict, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'the top level'}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, f"{where}.{k}".strip("."))
        elif isinstance(v, list) and typing.get_origin(t) in (tuple, types.UnionType, typing.Union):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where or 'config'}: {err}") from err


def load_config(preset: str | None = None, file: str | None = None, overrides: list[str] = ()) -> JobConfig:
    """preset → YAML file → `a.b=c` overrides (values parsed as YAML scalars) → validated JobConfig."""
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values = PRESETS[preset]()
    if file:
        loaded = yaml.safe_load(Path(file).read_text()) or {}
        values = _merge(values, loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected section.field=value")
        _set(values, key.strip(), yaml.safe_load(raw))
    if "data" not in values:
        raise ValueError("no data section: pick a --preset or give data.path (e.g. --set data.path=conversations.jsonl)")
    return _build(JobConfig, values, "")


def load_config_dict(values: dict) -> JobConfig:
    """A JobConfig from the plain dict `to_dict` produced (how configs travel to Ray workers)."""
    return _build(JobConfig, values, "")


def to_dict(cfg: Any) -> dict:
    """A config as plain nested dicts (tuples as lists), for YAML and Ray payloads."""
    d = dataclasses.asdict(cfg)

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(d)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}, for MLflow params."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out
