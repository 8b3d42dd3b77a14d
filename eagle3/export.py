"""Save and load drafts in the EAGLE-3 layout that vLLM and SGLang load (DESIGN.md §3), atomically, safetensors only.

Formats (which engine takes which: README "Serving the draft"):
  vllm        — HF `LlamaForCausalLMEagle3` config; `eagle_aux_hidden_state_layer_ids` as trained (HF
                `hidden_states[i]`, the state entering layer i). vLLM: speculative_config={"method": "eagle3", ...}.
  sglang      — the same layout with the ids written one lower: SGLang captures the state entering layer id+1.
  speculators — vLLM's `speculators` layout (`speculators_model_type: eagle3`, `transformer_layer_config`,
                `speculators_config` with proposal method and verifier; weights `layers.0.*` instead of
                `midlayer.*`). vLLM reads it as a draft, or as the only model (`vllm serve <dir>` then serves the
                verifier named in it). vLLM's speculators loader defaults `norm_before_residual` to True, so it is
                written explicitly.
Every format also carries `aerie` metadata (the full DraftConfig and the format) so `load_draft` needs nothing else;
`read_draft_config` checks that the engine-facing fields still agree with it (a hand-edited export fails loudly).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from eagle3.model import DraftConfig, Eagle3Draft
from eagle3.vocab import VocabMap

ExportFormat = Literal["vllm", "sglang", "speculators"]
FORMATS: tuple[ExportFormat, ...] = ("vllm", "sglang", "speculators")
WEIGHTS = "model.safetensors"
SPECULATORS_LAYER_PREFIX = ("midlayer.", "layers.0.")  # Aerie/EAGLE-3 name → speculators name of the draft layer
EXCLUDED_PREFIXES = ("embed_tokens.", "rotary.")  # frozen target embeddings and derived RoPE buffers
REEXPORT = "re-export the draft (eagle3.export.save_draft; `aerie train` writes <run_dir>/export)"
OTHER_TARGET = "use the target the draft was trained for, or train a draft for this target"


def check_safetensors(path: str | os.PathLike, fix: str) -> None:
    """Read the header of a safetensors file (cheap: no tensor data); a missing, truncated or foreign file is an
    error naming it and `fix` instead of safetensors' bare "incomplete metadata"."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing; {fix}")
    try:
        with safe_open(str(path), framework="pt"):  # validates that the header covers the whole file
            pass
    except SafetensorError as e:
        raise ValueError(f"{path} is truncated or not a safetensors file ({e}); {fix}") from e


def load_safetensors(path: str | os.PathLike, fix: str) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, with the errors of `check_safetensors`."""
    check_safetensors(path, fix)
    return load_file(str(path))


def export_state_dict(draft: Eagle3Draft, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors an engine loads: midlayer.*, fc, norm, lm_head (optionally cast), d2t (int64), t2d (bool)."""
    out = {}
    for name, t in draft.state_dict().items():
        if name.startswith(EXCLUDED_PREFIXES):
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.detach().contiguous().cpu()
    return out


def engine_aux_layer_ids(cfg: DraftConfig, fmt: ExportFormat) -> list[int]:
    """The aux layer ids as `fmt` writes them (SGLang: one lower; vLLM and speculators: as trained)."""
    ids = list(cfg.aux_layer_ids)
    if fmt != "sglang":
        return ids
    if min(ids) < 1:
        raise ValueError(f"aux layer ids {ids} cannot be written in SGLang's id-1 convention (id 0 would be -1)")
    return [i - 1 for i in ids]


def _layer_config(cfg: DraftConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The Llama decoder-layer fields every format shares; RoPE and max positions exactly as trained."""
    rope = dict(cfg.rope_parameters)
    rope_scaling = None if rope.get("rope_type", "default") == "default" else rope
    return {
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": rope_scaling,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_config(
    cfg: DraftConfig,
    fmt: ExportFormat,
    dtype: torch.dtype,
    *,
    verifier: str | None = None,
    num_speculative_tokens: int = 3,
) -> dict[str, Any]:
    """The config.json of an EAGLE-3 draft in `fmt` (see module docstring).

    `verifier` (speculators only): the target's path or hub id that `vllm serve <draft dir>` will load.
    `num_speculative_tokens` (speculators only): the default chain length K recorded in the proposal method.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {FORMATS}")
    ids = engine_aux_layer_ids(cfg, fmt)
    aerie = {"format": fmt, "draft_config": cfg.to_dict()}
    layer = _layer_config(cfg, dtype)
    if fmt == "speculators":
        if not verifier:
            raise ValueError("the speculators format names its verifier (target): pass verifier=<target path or id>")
        return {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": "eagle3",
            "transformer_layer_config": layer,
            "draft_vocab_size": cfg.draft_vocab_size,
            "target_hidden_size": cfg.hidden_size,
            "norm_before_residual": False,
            "norm_before_fc": False,
            "eagle_aux_hidden_state_layer_ids": ids,
            "speculators_config": {
                "algorithm": "eagle3",
                "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens,
                                      "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                "verifier": {"name_or_path": str(verifier), "architectures": [_target_architecture(cfg)]},
            },
            "torch_dtype": layer["torch_dtype"],
            "aerie": aerie,
        }
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        **layer,
        "target_hidden_size": cfg.hidden_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "norm_before_residual": False,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": ids,
            "use_aux_hidden_state": True,
            "use_input_layernorm_in_first_layer": True,
            "use_mtp_layernorm": False,
        },
        "aerie": aerie,
    }


def _target_architecture(cfg: DraftConfig) -> str:
    """HF architecture name of the target, from its model_type (llama → LlamaForCausalLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.target_model_type)
    if name is None:
        raise ValueError(f"no HF causal-LM architecture is registered for model_type {cfg.target_model_type!r}")
    return name


def save_draft(
    draft: Eagle3Draft,
    out_dir: str | os.PathLike,
    *,
    fmt: ExportFormat = "vllm",
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
    verifier: str | os.PathLike | None = None,
    num_speculative_tokens: int = 3,
) -> Path:
    """Write config.json + model.safetensors (+ extra text files) to `out_dir` atomically.

    The folder is built under a temporary name next to `out_dir` and renamed into place, so a crash leaves either
    the old export or the new one, never a half-written folder. `verifier` and `num_speculative_tokens` are
    written only by the speculators format (see `hf_config`).
    """
    w_dtype = dtype or draft.fc.weight.dtype
    config = hf_config(draft.config, fmt, w_dtype, verifier=None if verifier is None else str(verifier),
                       num_speculative_tokens=num_speculative_tokens)  # validates fmt before anything is written
    out = Path(out_dir).absolute()
    state = _engine_names(export_state_dict(draft, dtype), fmt)
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "aerie_format": fmt})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def _engine_names(state: dict[str, torch.Tensor], fmt: ExportFormat) -> dict[str, torch.Tensor]:
    """Rename Aerie's tensor names to `fmt`'s (only speculators differs: midlayer.* → layers.0.*)."""
    if fmt != "speculators":
        return state
    ours, theirs = SPECULATORS_LAYER_PREFIX
    return {(theirs + n[len(ours):] if n.startswith(ours) else n): t for n, t in state.items()}


def _aerie_names(state: dict[str, torch.Tensor], fmt: ExportFormat) -> dict[str, torch.Tensor]:
    """Inverse of `_engine_names`."""
    if fmt != "speculators":
        return state
    ours, theirs = SPECULATORS_LAYER_PREFIX
    return {(ours + n[len(theirs):] if n.startswith(theirs) else n): t for n, t in state.items()}


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temp folder next to `out`; when the block succeeds it takes `out`'s place (an existing `out` is
    moved aside and removed only after the swap), when it fails it is removed. Readers never see a half folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src → dst; an existing dst is moved aside first and removed only after the swap."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def read_draft_config(path: str | os.PathLike) -> tuple[DraftConfig, ExportFormat]:
    """The DraftConfig and format stored in an Aerie export's config.json (any of the three formats).

    The engine-facing fields (aux layer ids in the format's convention, vocab sizes, RoPE, max positions) must
    still agree with the stored DraftConfig: an export edited by hand would otherwise be evaluated by Aerie with one
    config and served by the engine with another.
    """
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not an exported draft folder")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}), e.g. cut off; {REEXPORT}") from e
    meta = raw.get("aerie")
    if not meta:
        raise ValueError(f"{cfg_path} has no 'aerie' section: only drafts exported by Aerie can be loaded here")
    fmt = meta["format"]
    if fmt not in FORMATS:
        raise ValueError(f"{cfg_path}: unknown export format {fmt!r} (known: {FORMATS})")
    cfg = DraftConfig.from_dict(meta["draft_config"])
    if fmt == "speculators":
        layer = raw["transformer_layer_config"]
        ids = raw.get("eagle_aux_hidden_state_layer_ids")
    else:
        layer = raw
        ids = raw.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
    engine = {"eagle_aux_hidden_state_layer_ids": ids, "draft_vocab_size": raw.get("draft_vocab_size"),
              "vocab_size": layer.get("vocab_size"), "hidden_size": layer.get("hidden_size"),
              "rope_parameters": layer.get("rope_parameters"),
              "max_position_embeddings": layer.get("max_position_embeddings")}
    want = {"eagle_aux_hidden_state_layer_ids": engine_aux_layer_ids(cfg, fmt),
            "draft_vocab_size": cfg.draft_vocab_size, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "rope_parameters": dict(cfg.rope_parameters), "max_position_embeddings": cfg.max_position_embeddings}
    bad = [f"{k}={engine[k]} but the aerie section implies {v}" for k, v in want.items() if engine[k] != v]
    if bad:
        raise ValueError(f"{cfg_path} ({fmt} format) was edited after export: " + "; ".join(bad) +
                         ". Re-export the draft with eagle3.export.save_draft instead of editing config.json")
    return cfg, fmt


def load_draft(
    path: str | os.PathLike,
    *,
    embed_weight: torch.Tensor | None = None,
    expected: DraftConfig | None = None,
) -> Eagle3Draft:
    """Load an export. Rejects a folder whose config, tensor names or shapes don't match, naming the difference.

    `expected`: the config the caller's target implies (e.g. `DraftConfig.from_target_config(...)`); any field that
    differs (vocab, hidden size, aux layers, ...) is an error.
    """
    cfg, fmt = read_draft_config(path)
    if expected is not None and expected != cfg:
        diff = {k: (v, getattr(expected, k)) for k, v in cfg.to_dict().items() if expected.to_dict()[k] != v}
        raise ValueError(
            f"draft at {path} does not match the target: " +
            ", ".join(f"{k}: checkpoint={a} target={b}" for k, (a, b) in diff.items()) + f"; {OTHER_TARGET}"
        )
    if embed_weight is not None and tuple(embed_weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(
            f"draft at {path} was trained for a target with vocab size {cfg.vocab_size} and hidden size "
            f"{cfg.hidden_size}, but the target's embeddings are {tuple(embed_weight.shape)}; {OTHER_TARGET}"
        )
    draft = Eagle3Draft(cfg, embed_weight=embed_weight)
    weights = Path(path) / WEIGHTS
    state = _aerie_names(load_safetensors(weights, REEXPORT), fmt)
    # The weights disagreeing with config.json means the folder mixes files of two exports.
    mixed = f"it does not match {Path(path) / 'config.json'}: {REEXPORT}"
    want = export_state_dict(draft)
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"draft weights {weights}: missing {missing}, unexpected {unexpected}; {mixed}")
    for name, t in want.items():
        if state[name].shape != t.shape:
            raise ValueError(
                f"draft weight {name} in {weights} has shape {tuple(state[name].shape)}, config implies "
                f"{tuple(t.shape)} (vocab_size={cfg.vocab_size}, draft_vocab_size={cfg.draft_vocab_size}, "
                f"hidden_size={cfg.hidden_size}); {mixed}"
            )
    try:
        VocabMap(d2t=state["d2t"], t2d=state["t2d"])
    except ValueError as e:
        raise ValueError(f"d2t/t2d in {weights} are not one vocab map ({e}); {REEXPORT}") from e
    dtype = state["fc.weight"].dtype
    draft.to(dtype)
    draft.load_state_dict(state, strict=False)
    return draft
