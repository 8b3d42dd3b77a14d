"""Save and load drafts in the EAGLE-3 layout that vLLM and SGLang load (DESIGN.md §3), atomically, safetensors only.

Formats:
  vllm   — `eagle_aux_hidden_state_layer_ids` as trained (HF `hidden_states[i]`, the state entering layer i).
  sglang — SGLang captures the state entering layer id+1, so the ids are written one lower.
The folder also carries `aerie` metadata (the full DraftConfig and the format) so `load_draft` needs nothing else.
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
from safetensors.torch import load_file, save_file

from eagle3.model import DraftConfig, Eagle3Draft

ExportFormat = Literal["vllm", "sglang"]
WEIGHTS = "model.safetensors"
EXCLUDED_PREFIXES = ("embed_tokens.", "rotary.")  # frozen target embeddings and derived RoPE buffers


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


def hf_config(cfg: DraftConfig, fmt: ExportFormat, dtype: torch.dtype) -> dict[str, Any]:
    """The HF-style config.json of an EAGLE-3 draft (vLLM `LlamaForCausalLMEagle3`)."""
    ids = list(cfg.aux_layer_ids)
    if fmt == "sglang":
        if min(ids) < 1:
            raise ValueError(f"aux layer ids {ids} cannot be written in SGLang's id-1 convention (id 0 would be -1)")
        ids = [i - 1 for i in ids]
    rope = dict(cfg.rope_parameters)
    rope_scaling = None if rope.get("rope_type", "default") == "default" else rope
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "target_hidden_size": cfg.hidden_size,
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
        "draft_vocab_size": cfg.draft_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "norm_before_residual": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": ids,
            "use_aux_hidden_state": True,
            "use_input_layernorm_in_first_layer": True,
            "use_mtp_layernorm": False,
        },
        "aerie": {"format": fmt, "draft_config": cfg.to_dict()},
    }


def save_draft(
    draft: Eagle3Draft,
    out_dir: str | os.PathLike,
    *,
    fmt: ExportFormat = "vllm",
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write config.json + model.safetensors (+ extra text files) to `out_dir` atomically.

    The folder is built under a temporary name next to `out_dir` and renamed into place, so a crash leaves either
    the old export or the new one, never a half-written folder.
    """
    if fmt not in ("vllm", "sglang"):
        raise ValueError(f"unknown export format {fmt!r}; use 'vllm' or 'sglang'")
    out = Path(out_dir).absolute()
    state = export_state_dict(draft, dtype)
    w_dtype = dtype or draft.fc.weight.dtype
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "aerie_format": fmt})
        (tmp / "config.json").write_text(json.dumps(hf_config(draft.config, fmt, w_dtype), indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


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
    """The DraftConfig and format stored in an Aerie export's config.json."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not an exported draft folder")
    meta = json.loads(cfg_path.read_text()).get("aerie")
    if not meta:
        raise ValueError(f"{cfg_path} has no 'aerie' section: only drafts exported by Aerie can be loaded here")
    return DraftConfig.from_dict(meta["draft_config"]), meta["format"]


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
    cfg, _fmt = read_draft_config(path)
    if expected is not None and expected != cfg:
        diff = {k: (v, getattr(expected, k)) for k, v in cfg.to_dict().items() if expected.to_dict()[k] != v}
        raise ValueError(
            f"draft at {path} does not match the target: " +
            ", ".join(f"{k}: checkpoint={a} target={b}" for k, (a, b) in diff.items())
        )
    draft = Eagle3Draft(cfg, embed_weight=embed_weight)
    state = load_file(str(Path(path) / WEIGHTS))
    want = export_state_dict(draft)
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"draft weights at {path}: missing {missing}, unexpected {unexpected}")
    for name, t in want.items():
        if state[name].shape != t.shape:
            raise ValueError(
                f"draft weight {name} at {path} has shape {tuple(state[name].shape)}, config implies {tuple(t.shape)}"
            )
    if int(state["t2d"].sum()) != cfg.draft_vocab_size:
        raise ValueError(f"t2d at {path} selects {int(state['t2d'].sum())} tokens, draft_vocab_size={cfg.draft_vocab_size}")
    dtype = state["fc.weight"].dtype
    draft.to(dtype)
    draft.load_state_dict(state, strict=False)
    return draft
