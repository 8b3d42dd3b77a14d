"""Typed job configs, named presets, YAML files and `--set section.field=value` overrides.

A run is `preset` → optional YAML file → `--set` overrides, merged as plain dicts and validated once, when pydantic
builds the (plain, frozen) dataclasses from them: every field against its annotation (type, `annotated_types` range,
`Literal` choices), unknown keys by name, then each dataclass's `__post_init__` for the checks across fields. All
problems come back in one `ConfigError` that names each field, the value given and what it should be.

YAML is read as YAML 1.2 (ruamel.yaml), in files and in `--set` values alike: `3e-4` is a float, `no`/`on` are
strings, `010` is 10.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import AfterValidator, ConfigDict, TypeAdapter, ValidationError, with_config
from ruamel.yaml import YAML, YAMLError

from actors.hf_backend import TargetConfig
from actors.models import SMOLLM2, TINY
from eagle3.data import DataConfig, packaged_sharegpt_path
from eagle3.ttt import TTTConfig


class ConfigError(ValueError):
    """A config that cannot be loaded; the message says which fields (or which file) and why."""


_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _folder_name(name: str) -> str:
    """The run name becomes <output_dir>/<name>: one folder, so no '/', '.' or '..' that would leave output_dir."""
    if not _FOLDER_NAME.fullmatch(name):
        raise ValueError("should be a folder name: 1 to 128 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit (no '/', not '.' or '..')")
    return name


NonNegInt = Annotated[int, Ge(0)]
PosInt = Annotated[int, Ge(1)]
NonNegFloat = Annotated[float, Ge(0)]
Beta = Annotated[float, Ge(0), Lt(1)]


@dataclass(frozen=True, kw_only=True)
class DraftSettings:
    """Draft model choices that don't come from the target."""

    vocab_size: PosInt = 32000
    """Draft vocabulary size (most frequent assistant tokens of the training data)."""
    init_lm_head: Literal["random", "target"] = "random"
    """Initial draft lm_head: 'random' (the official EAGLE-3 code) or 'target' (the target's lm_head rows of the
    draft vocabulary, as vLLM's speculators does): the head then starts out mapping hidden states to tokens the
    way the target does. Measured on the demo's recipe (BENCHMARKS.md): no better than random at 150 steps (chain
    τ 1.194 against 1.222), hence the default."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: Annotated[float, Gt(0)] = 1e-4
    """Peak learning rate."""
    min_lr_ratio: Annotated[float, Ge(0), Le(1)] = 0.0
    """Final learning rate as a fraction of lr."""
    warmup_steps: NonNegInt = 20
    """Linear warmup steps."""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: NonNegFloat = 0.5
    """Max global gradient norm (0 disables)."""
    epochs: PosInt = 1
    """Passes over the data."""
    max_steps: NonNegInt = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    max_target_tokens: NonNegInt = 0
    """Stop once the targets have processed this many tokens (features + relabels + regenerated responses, all
    workers): an equal-cost budget across feedback modes. 0 = no limit. Pair with min_lr_ratio=1 (constant LR)."""
    rows_per_batch: PosInt = 1
    """Rows per worker batch (each row is one sample, or max_length tokens of packed samples)."""
    seed: NonNegInt = 0
    """Seed of the draft init and the data order."""
    bf16: Literal["auto"] | bool = "auto"
    """bf16 autocast for the draft forward (master weights stay fp32). 'auto': where the trainer's device multiplies
    bf16 natively (CUDA >= sm80; CPUs with AVX512-BF16 or AMX), else fp32 (an AVX2-only CPU emulates bf16 ~180x
    slower than fp32); true: always (on CUDA where supported); false: never."""


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Ray Train workers that train the draft."""

    num_workers: PosInt = 1
    """Data-parallel train workers (DDP)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); CPU workers use gloo."""
    cpus_per_worker: NonNegFloat = 1.0
    """CPUs each worker reserves."""
    num_threads: NonNegInt = 0
    """torch intra-op threads per worker; 0 = torch's default."""
    pin_cpus: bool = False
    """CPU workers: pin each to num_threads cores of its own (claimed from the highest core down, coordinated with
    the target actors' claims; actors.cpu_pin). Needs num_threads >= 1; ignored by GPU workers."""
    resources: dict[str, NonNegFloat] | None = None
    """Extra custom Ray resources per worker, e.g. {"trainer": 1} to land on trainer nodes."""
    stream_depth: PosInt = 2
    """Target requests each worker keeps in flight."""
    checkpoint_every: PosInt = 50
    """Report a checkpoint every this many steps (and at the end)."""
    snapshot_every: NonNegInt = 0
    """Also export the draft every this many steps into <run_dir>/snapshots/step-NNNNNNN (an engine-ready folder
    plus progress.json: step, trained tokens, training seconds), kept for learning curves; 0 = off."""
    max_failures: NonNegInt = 1
    """Worker-group restarts (from the latest checkpoint) before the run fails."""
    storage: str = ""
    """Where Ray Train keeps checkpoints: "" = <run_dir>/ray on the driver's disk (one machine only); on a cluster a
    folder every node mounts (NFS, EFS, a PVC) or a pyarrow URI (s3://bucket/prefix, gs://bucket/prefix)."""

    def __post_init__(self) -> None:
        if self.pin_cpus and self.num_threads < 1:
            raise ValueError("trainer.pin_cpus needs trainer.num_threads >= 1: the number of cores each worker claims")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """MLflow."""

    uri: str = ""
    """Tracking URI; empty = $MLFLOW_TRACKING_URI if set (the cluster files export it), else the embedded default
    sqlite:///<run_dir>/mlflow.db (one machine only: workers on other nodes cannot open it)."""
    experiment: Annotated[str, MinLen(1)] = "aerie"
    """MLflow experiment name."""
    register_model: str = ""
    """If set, register the exported draft as a version of this registered model."""
    system_metrics_interval_s: NonNegFloat = 10.0
    """Sampling interval of CPU/GPU/memory metrics on the rank-0 trainer node (0 disables)."""


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Fault injection, for tests and drills only."""

    crash_worker_at_step: NonNegInt = 0
    """Rank 0 raises once at this step (0 = never); the run must resume from its checkpoint."""
    kill_target_at_step: NonNegInt = 0
    """Rank 0 kills target actor 0 once at this step (0 = never); in-flight requests must be resent."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Speculative-decoding evaluation of the exported draft at the end of training (jobs/eval.py), on held-back
    prompts: records of data.path after the ones read for training."""

    enabled: bool = False
    """Run it after export and log eval/* into the training run."""
    prompts: str = ""
    """Prompt file (.jsonl/.json of ShareGPT or chat-message records, first user turn used), e.g. the project's
    held-out set "heldout" (jobs/assets/heldout-sharegpt.jsonl); "" = the records of data.path after the ones trained
    on."""
    num_prompts: PosInt = 8
    """Held-back prompts to decode."""
    method: Literal["chain", "tree"] = "chain"
    """Draft shape (see eagle3.spec_decode.SpecConfig)."""
    num_draft_tokens: PosInt = 5
    """Chain: draft tokens per verification; tree: the tree depth."""
    tree_top_k: PosInt = 8
    """Tree: children expanded per node and nodes expanded per level (EAGLE-2 top-k)."""
    tree_total_tokens: PosInt = 48
    """Tree: draft tokens verified per target call. On CPU the verification's cost grows with it (BENCHMARKS.md)."""
    max_new_tokens: PosInt = 32
    """Tokens generated per prompt (greedy; the output is checked against plain target decoding)."""
    max_prompt_tokens: PosInt = 512
    """Longer prompts are skipped."""
    target_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the target in the end-of-training evaluation; float32 so that greedy verification and plain
    decoding agree up to rounding."""

    def __post_init__(self) -> None:
        # Checked before training, not after it: a typo here would otherwise cost the whole run's evaluation.
        if self.prompts not in ("", "heldout") and not Path(self.prompts).is_file():
            raise ValueError(f"eval.prompts={self.prompts!r} is not a file; give a .jsonl/.json prompt file, "
                             "'heldout' (the project's held-out prompts) or '' (the records after the training data)")


# Pydantic's settings for building configs: unknown keys are errors; strict, fed JSON (see _validate): an int is an
# int (2.5, 2.0 and "2" are refused), a bool is true or false, a float is a number (YAML 1.2 already reads 3e-4 as
# one) and finite, a str is a str. The nested plain dataclasses inherit them (pydantic 2.10.0 alone did not pass
# them on, hence its exclusion in pyproject.toml; tests/test_config.py checks nested fields).
@with_config(ConfigDict(extra="forbid", strict=True, allow_inf_nan=False))
@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """One training run."""

    name: Annotated[str, AfterValidator(_folder_name)] = "aerie"
    """Run name: the Ray Train run and the MLflow run; submitting the same name again resumes it."""
    output_dir: Annotated[str, MinLen(1)] = "runs"
    """Root folder (absolute or relative); the run writes <output_dir>/<name>/{export,ray,mlflow.db}."""
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
        """tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded sqlite store in the run folder."""
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{self.run_dir / 'mlflow.db'}"

    def storage_path(self) -> str:
        """Ray Train's storage_path: trainer.storage (a plain path made absolute), else <run_dir>/ray."""
        s = self.trainer.storage
        if not s:
            return str(self.run_dir / "ray")
        return s if "://" in s else str(Path(s).absolute())


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


def smollm2_sharegpt_cpu_official() -> dict:
    """The official EAGLE-3 recipe on the CPU demo's target: `data` mode on ShareGPT's own responses, K=7, 320
    conversations (the demo before issue 14; the base of benchmarks/recipes.py's arms). 1 target actor + 1 trainer
    on 2 cores: the trainer (~550 tokens/s alone at K=7 on one core with native bf16, ~130 in fp32 on an AVX2-only
    CPU; BENCHMARKS.md) is the bottleneck; the target (dtype auto: bf16 where the CPU multiplies it natively, else
    fp32) runs on the other core."""
    return {
        "name": "smollm2-sharegpt-cpu-official",
        "target": {"model": SMOLLM2, "dtype": "auto", "num_threads": 1, "pin_cpus": True},
        "data": {"path": str(packaged_sharegpt_path()), "max_length": 512, "max_samples": 320,
                 "on_bad_record": "skip", "pack": True},
        "draft": {"vocab_size": 8192},
        "ttt": {"length": 7},
        "optim": {"lr": 1e-3, "warmup_steps": 10, "rows_per_batch": 2, "epochs": 1},
        "trainer": {"num_workers": 1, "num_threads": 1, "pin_cpus": True, "checkpoint_every": 50},
        "eval": {"enabled": True, "num_prompts": 8, "num_draft_tokens": 5, "max_new_tokens": 32},
    }


# The target's own greedy answers to 1,000 ShareGPT conversations (records 0-1,170), written by `aerie regenerate`
# (vLLM backend, bf16, <= 256 new tokens per turn) and stamped (aerie_regenerated.json): 1,983 replies, 368K tokens,
# 2 MB. Regenerating them costs ~28 min on 2 cores, so the demo ships them (BENCHMARKS.md, "Draft recipes").
REGEN_ASSET = Path(__file__).parent / "assets" / "regen-smollm2-sharegpt-1000"


def smollm2_sharegpt_cpu() -> dict:
    """The real CPU demo: the best recipe of benchmarks/recipes.py within ~15 min of training on 2 cores: `data`
    mode on the target's own (regenerated, shipped) responses, K=7, 300 steps at a constant learning rate after
    warm-up, evaluated on the project's held-out prompts. Settings equal the recipes' `regen` arm at --steps 300."""
    cfg = smollm2_sharegpt_cpu_official()
    cfg["name"] = "smollm2-sharegpt-cpu"
    cfg["data"] = {**cfg["data"], "path": str(REGEN_ASSET), "max_samples": None}
    cfg["optim"] = {**cfg["optim"], "max_steps": 300, "min_lr_ratio": 1.0}
    cfg["eval"] = {**cfg["eval"], "prompts": "heldout"}
    return cfg


def smollm2_sharegpt_cpu_1h() -> dict:
    """About an hour of training on 2 cores: the demo's recipe for 1,250 steps (~1.2M trained tokens, ~3.3 epochs of
    the shipped regenerated answers), constant learning rate after warm-up. Settings equal the recipes' `regen` arm
    at its step-1,250 snapshot (BENCHMARKS.md, "Draft recipes"); evaluated on 48 held-out prompts."""
    cfg = smollm2_sharegpt_cpu()
    cfg["name"] = "smollm2-sharegpt-cpu-1h"
    cfg["optim"] = {**cfg["optim"], "max_steps": 1250, "epochs": 100}  # max_steps ends it, after ~3.3 epochs
    cfg["trainer"] = {**cfg["trainer"], "checkpoint_every": 250}
    cfg["eval"] = {**cfg["eval"], "num_prompts": 48, "max_new_tokens": 64}
    return cfg


def smollm2_sharegpt_cpu_draft() -> dict:
    """The CPU demo with draft-path token feedback: a quarter of the scored positions feed the draft's own argmax
    at TTT steps >= 1, relabelled by the target, weighted by greedy chain survival (the best of the feedback modes
    in the equal-budget ablation, BENCHMARKS.md; at CPU budgets plain `data` still beats it: relabels cost steps)."""
    cfg = smollm2_sharegpt_cpu()
    cfg["name"] = "smollm2-sharegpt-cpu-draft"
    cfg["ttt"] = {**cfg["ttt"], "token_feedback": "draft", "branch_fraction": 0.25, "survival_weights": True}
    return cfg


def llama3_8b_8gpu() -> dict:
    """GPU cluster example: Llama-3.1-8B-Instruct target, 4 target GPUs + 4 trainer GPUs (the files in cluster/).

    Every path is on the filesystem all nodes mount at /mnt/aerie (cluster/README.md): the model and the data that
    the cluster files download there, the token store, the run folder and Ray Train's checkpoints."""
    return {
        "name": "llama3-8b-8gpu",
        "output_dir": "/mnt/aerie/runs",
        "target": {"model": "/mnt/aerie/models/Llama-3.1-8B-Instruct", "dtype": "bfloat16", "device": "cuda",
                   "num_actors": 4, "gpus_per_actor": 1.0, "cpus_per_actor": 4.0, "resources": {"target": 1}},
        "data": {"path": "/mnt/aerie/data/ShareGPT_V3_unfiltered_cleaned_split.json", "max_length": 4096,
                 "on_bad_record": "skip", "pack": True, "store_dir": "/mnt/aerie/cache/tokens"},
        "draft": {"vocab_size": 32000},
        "ttt": {"length": 7},
        "optim": {"lr": 1e-4, "warmup_steps": 500, "rows_per_batch": 1, "epochs": 10},
        "trainer": {"num_workers": 4, "use_gpu": True, "cpus_per_worker": 8.0, "resources": {"trainer": 1},
                    "stream_depth": 4, "checkpoint_every": 1000, "storage": "/mnt/aerie/checkpoints"},
    }


PRESETS: dict[str, Callable[[], dict]] = {
    "tiny": tiny,
    "smollm2-sharegpt-cpu": smollm2_sharegpt_cpu,
    "smollm2-sharegpt-cpu-official": smollm2_sharegpt_cpu_official,
    "smollm2-sharegpt-cpu-1h": smollm2_sharegpt_cpu_1h,
    "smollm2-sharegpt-cpu-draft": smollm2_sharegpt_cpu_draft,
    "llama3-8b-8gpu": llama3_8b_8gpu,
}


# ---------------------------------------------------------------------------------------------------------------
# Building configs from nested dicts

_YAML = YAML(typ="safe", pure=True)  # YAML 1.2: 3e-4 is a float, no/on are strings
_JOB = TypeAdapter(JobConfig)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set(d: dict, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for i, p in enumerate(path):
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(path[:i + 1])} is not a section")
    d[last] = value


def _read_yaml(file: str) -> dict:
    """The sections of a --config file; a missing file, malformed YAML or a non-mapping names the file."""
    try:
        loaded = _YAML.load(Path(file).read_text())
    except OSError as err:
        raise ConfigError(f"--config {file}: cannot read it ({err.strerror})") from None
    except YAMLError as err:
        raise ConfigError(f"--config {file}: malformed YAML{_where(err)}") from None
    if loaded is None:  # an empty file
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {file}: expected a mapping of sections (e.g. `optim: {{lr: 3.0e-4}}`), "
                          f"got a {type(loaded).__name__}: {loaded!r}")
    return loaded


def _where(err: YAMLError) -> str:
    """' at line L, column C: problem (while parsing X from line L', column C')' from a ruamel.yaml error."""
    mark, context, context_mark = (getattr(err, a, None) for a in ("problem_mark", "context", "context_mark"))
    if mark is None:
        return f": {err}"
    out = f" at line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    if context and context_mark:
        out += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    """`section.field=value` → (dotted key, value read as a YAML 1.2 scalar or flow collection)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. --set optim.lr=3e-4")
    if not raw.strip():
        return key, ""  # `--set tracking.uri=` means the empty string, not YAML's null
    try:
        return key, _YAML.load(raw)
    except YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML{_where(err)}") from None


def _validate(values: dict) -> JobConfig:
    """Build a JobConfig with pydantic, or raise one ConfigError with a line per wrong field.

    Fed as JSON because pydantic's strict mode takes lists for tuples and mappings for dataclasses only from JSON;
    config values are JSON-shaped anyway (YAML, --set scalars, the to_dict payloads sent to Ray workers), and
    default=str passes YAML dates and Paths on as text."""
    try:
        return _JOB.validate_json(json.dumps(values, default=str))
    except ValidationError as err:
        errors = err.errors()
    # A tuple with a bad item also reports itself as too short (the bad item is dropped): keep only the item's error.
    with_bad_items = {e["loc"][:-1] for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
    lines, unions = [], {}
    for e in errors:
        if e["type"] in ("too_short", "too_long") and e["loc"] in with_bad_items:
            continue
        if _is_union_member(e["loc"]):  # one error per member of e.g. Literal["auto"] | bool: merged below
            unions.setdefault(e["loc"][:-1], []).append(e)
            continue
        lines.append(_describe(e))
    for loc, errs in unions.items():
        shoulds = [_describe({**e, "loc": loc}).split(": ", 1)[1].removeprefix("should be ") for e in errs]
        lines.append(f"{_dotted(loc)}={errs[0]['input']!r}: should be {' or '.join(dict.fromkeys(shoulds))}")
    raise ConfigError("invalid config:" + ("\n  " if len(lines) > 1 else " ") + "\n  ".join(lines))


def _annotation(loc: tuple) -> Any:
    """The annotation of the field at `loc` (field names from JobConfig down), None past the dataclasses."""
    t = JobConfig
    for part in loc:
        hints = typing.get_type_hints(t, include_extras=True) if dataclasses.is_dataclass(t) else {}
        if part not in hints:
            return None
        t = hints[part]
    return t


def _is_union_member(loc: tuple) -> bool:
    """pydantic reports a union field's error once per member, at loc + (member tag,)."""
    if len(loc) < 2 or isinstance(loc[-1], int):
        return False
    return typing.get_origin(_annotation(loc[:-1])) in (typing.Union, types.UnionType) and _annotation(loc) is None


def _dotted(loc: tuple) -> str:
    """('optim', 'betas', 1) → 'optim.betas[1]'."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _describe(err: dict) -> str:
    """One pydantic error as `field=value: what it should be`."""
    loc, kind, value = err["loc"], err["type"], err["input"]
    path = _dotted(loc)
    section = _annotation(loc)
    if kind == "unexpected_keyword_argument":
        where = f"of {'.'.join(loc[:-1])}" if len(loc) > 1 else "at the top level"
        known = ", ".join(f.name for f in dataclasses.fields(_annotation(loc[:-1])))
        return f"unknown key {path!r} (= {value!r}); known keys {where}: {known}"
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length tuple given too few items
        n = len(typing.get_args(_annotation(loc[:-1])))
        return f"{_dotted(loc[:-1])}={value!r}: should have {n} items, not {len(value)}"
    if kind == "missing":
        return f"{path}: missing (it has no default)"
    if kind == "too_short":
        return f"{path}={value!r}: should have at least {err['ctx']['min_length']} items, not {len(value)}"
    if kind == "too_long":
        return f"{path}={value!r}: should have at most {err['ctx']['max_length']} items, not {len(value)}"
    if kind == "value_error":  # raised by a __post_init__ (whose message names its fields) or a field validator
        reason = str(err["ctx"]["error"])
        return reason if not loc or dataclasses.is_dataclass(section) else f"{path}={value!r}: {reason}"
    if kind == "dataclass_type":
        known = ", ".join(f.name for f in dataclasses.fields(section))
        return f"{path}={value!r}: should be a section, a mapping of {known}"
    if kind == "tuple_type":  # e.g. optim.betas=0.9
        items = typing.get_args(section)
        n = "" if Ellipsis in items else f"{len(items)} "
        return f"{path}={value!r}: should be a list of {n}values, e.g. [{', '.join(['...'] * (len(items) if n else 1))}]"
    should = {
        "bool_type": "should be true or false",
        "dict_type": "should be a mapping",
        "tuple_type": "should be a list",
        "string_type": "should be a string (quote text that YAML reads as a number, bool or null)",
    }.get(kind) or err["msg"].replace("Input should be", "should be")
    return f"{path}={value!r}: {should}"


def load_config(preset: str | None = None, file: str | None = None, overrides: list[str] = ()) -> JobConfig:
    """preset → YAML file → `a.b=c` overrides (values parsed as YAML 1.2) → validated JobConfig.

    Raises ConfigError (a ValueError) naming every wrong field, its value and what it should be."""
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values = PRESETS[preset]()
    if file:
        values = _merge(values, _read_yaml(file))
    for item in overrides:
        _set(values, *_parse_override(item))
    if "data" not in values:
        raise ConfigError("no data section: pick a --preset or give data.path "
                          "(e.g. --set data.path=conversations.jsonl)")
    return _validate(values)


def load_config_dict(values: dict) -> JobConfig:
    """A JobConfig from the plain dict `to_dict` produced (how configs travel to Ray workers)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of sections, got a {type(values).__name__}")
    return _validate(values)


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


# Settings that shape the trained draft or its export (see model_settings_diff): these sections whole, except
# _NOT_MODEL_KEYS, plus _MODEL_KEYS from the other sections.
_MODEL_SECTIONS = ("draft", "ttt", "optim", "data")
_MODEL_KEYS = {"export_format", "target.model", "target.aux_layer_ids", "target.dtype", "trainer.num_workers"}
_NOT_MODEL_KEYS = {"ttt.attention_kernel", "ttt.grad_checkpoint", "ttt.fused_loss", "optim.bf16", "optim.max_steps",
                   "optim.epochs", "optim.max_target_tokens", "data.on_bad_record", "data.tokenizer_workers",
                   "data.store_dir"}


def model_settings_diff(old: dict, new: dict) -> list[str]:
    """The dotted keys (sorted) whose values differ between two `to_dict` configs, among the settings that shape
    the trained draft or its export: what resuming a run under the same name must keep.

    Counted: draft.*; ttt.* (K, feedback mode, step weights, ...); data.* (which samples, their length, packing,
    regeneration); optim.* (lr, betas, weight decay, grad clip, warmup, final lr ratio, seed, rows per batch: the
    update rule, the schedule and the data order); target.model, target.aux_layer_ids and target.dtype (the
    features the draft learns from); trainer.num_workers (the global batch and each worker's data shard);
    export_format.
    Not counted: how the same computation runs (ttt.attention_kernel, ttt.grad_checkpoint, ttt.fused_loss,
    optim.bf16 autocast over fp32 master weights, target.backend, placement and resources); where the run stops (optim.max_steps,
    optim.epochs, optim.max_target_tokens: extending a run is what resuming is for, though a new horizon also
    stretches or shrinks the cosine decay of the remaining steps); data.on_bad_record (skip or error does not
    change what a run that got going trained on); data.tokenizer_workers and data.store_dir (who tokenizes, where
    the token store lives); name, output_dir, tracking, faults and eval.
    A key present in only one of the dicts (a field added or removed between versions) counts as differing."""
    a, b = flatten(old), flatten(new)
    keys = {k for k in a.keys() | b.keys()
            if (k in _MODEL_KEYS or k.split(".")[0] in _MODEL_SECTIONS) and k not in _NOT_MODEL_KEYS}
    absent = object()
    return sorted(k for k in keys if a.get(k, absent) != b.get(k, absent))
