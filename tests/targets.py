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


def stopping_chat_target(folder) -> None:
    """Save into `folder` a random 2-layer Llama with SmolLM2's tokenizer whose greedy replies depend on the prompt
    and end at <|im_end|> (id 2) at different lengths (the builtin tiny target repeats one token and never stops):
    untied lm_head with init std 0.2 and the <|im_end|> row scaled up."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from actors.models import TINY, resolve_model

    eot = 2
    tok = AutoTokenizer.from_pretrained(resolve_model(TINY))
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, vocab_size=len(tok), max_position_embeddings=2048,
                      tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=eot,
                      pad_token_id=eot)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[eot] *= 3
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
