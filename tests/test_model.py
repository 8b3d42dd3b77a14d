"""Draft config and model built from Llama / Qwen2 / Qwen3 / Mistral targets."""

from __future__ import annotations

import pytest
import torch

from eagle3.model import DraftConfig, Eagle3Draft
from tests.targets import tiny_config, tiny_target

KINDS = ["llama", "llama-tied", "llama3-scaled", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("kind", KINDS)
def test_config_from_target_and_shapes(kind):
    target = tiny_target(kind)
    tc = target.config
    cfg = DraftConfig.from_target_config(tc, draft_vocab_size=120)
    L = tc.num_hidden_layers
    assert cfg.aux_layer_ids == (2, L // 2, L - 3)
    assert cfg.head_dim == (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
    assert cfg.num_key_value_heads == tc.num_key_value_heads
    assert cfg.rope_parameters["rope_theta"] == tc.rope_parameters["rope_theta"]
    draft = Eagle3Draft(cfg, embed_weight=target.get_input_embeddings().weight)
    h, hd = tc.hidden_size, cfg.head_dim
    sd = draft.state_dict()
    assert sd["fc.weight"].shape == (h, 3 * h)
    assert sd["midlayer.self_attn.q_proj.weight"].shape == (tc.num_attention_heads * hd, 2 * h)
    assert sd["midlayer.self_attn.k_proj.weight"].shape == (tc.num_key_value_heads * hd, 2 * h)
    assert sd["midlayer.self_attn.o_proj.weight"].shape == (h, tc.num_attention_heads * hd)
    assert sd["lm_head.weight"].shape == (120, h)
    assert not draft.embed_tokens.weight.requires_grad
    assert torch.equal(draft.embed_tokens.weight, target.get_input_embeddings().weight)


@pytest.mark.parametrize("kind", ["llama", "llama3-scaled", "qwen3"])
def test_draft_rope_equals_target_rope(kind):
    """The draft uses the target's RoPE (theta, scaling, head_dim), not a hard-coded base of 10000."""
    target = tiny_target(kind)
    draft = Eagle3Draft(DraftConfig.from_target_config(target.config, draft_vocab_size=50))
    pos = torch.arange(0, 400, 7)[None]
    x = torch.zeros(1, pos.shape[1], draft.config.head_dim)
    cos_t, sin_t = target.model.rotary_emb(x, pos)
    cos_d, sin_d = draft.rope(x, pos)
    torch.testing.assert_close(cos_d, cos_t)
    torch.testing.assert_close(sin_d, sin_t)


def test_bad_configs_raise_clear_errors():
    tc = tiny_config("llama")
    with pytest.raises(ValueError, match="exceeds the target vocab_size=300"):
        DraftConfig.from_target_config(tc, draft_vocab_size=301)
    with pytest.raises(ValueError, match="aux layer id 6 is out of range"):
        DraftConfig.from_target_config(tc, draft_vocab_size=10, aux_layer_ids=(1, 3, 6))
    with pytest.raises(ValueError, match="exactly 3 aux layer ids"):
        DraftConfig.from_target_config(tc, draft_vocab_size=10, aux_layer_ids=(1, 3))
    cfg = DraftConfig.from_target_config(tc, draft_vocab_size=10)
    with pytest.raises(ValueError, match="target embedding has shape"):
        Eagle3Draft(cfg, embed_weight=torch.zeros(299, 64))
