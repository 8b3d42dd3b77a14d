"""Tiny random-config target models for fast CPU tests (no hub)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def tiny_config(kind: str = "llama", **overrides):
    """A tiny config of the given family: llama | llama-tied | qwen2 | qwen3 | mistral."""
    kw = {**TINY, **overrides}
    if kind == "llama":
        return LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    if kind == "llama-tied":
        return LlamaConfig(**kw, tie_word_embeddings=True)
    if kind == "llama3-scaled":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
        return LlamaConfig(**kw, rope_parameters=rope)
    if kind == "qwen2":
        return Qwen2Config(**kw)
    if kind == "qwen3":
        return Qwen3Config(**kw, head_dim=24)  # Qwen3: head_dim != hidden / heads
    if kind == "mistral":
        return MistralConfig(**kw, sliding_window=None)
    raise ValueError(kind)


def tiny_target(kind: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), attn_implementation="sdpa")
    return model.eval()
