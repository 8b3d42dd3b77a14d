"""Export → load round trip, config fields, atomic writes and mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle3 import export
from eagle3.export import load_draft, save_draft
from eagle3.model import DraftConfig, Eagle3Draft
from tests.targets import tiny_config

ENGINE_KEYS = {
    "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
    *(f"midlayer.{n}.weight" for n in [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj", "input_layernorm", "hidden_norm", "post_attention_layernorm"]),
}


def trained_like_draft(kind="llama3-scaled", seed=0):
    torch.manual_seed(seed)
    cfg = DraftConfig.from_target_config(tiny_config(kind), draft_vocab_size=90)
    d = Eagle3Draft(cfg, embed_weight=torch.randn(cfg.vocab_size, cfg.hidden_size))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p))
        used = torch.randperm(cfg.vocab_size)[:90].sort().values
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[used] = True
        d.set_vocab_map(used - torch.arange(90), t2d)
    return d


def test_round_trip_bit_exact(tmp_path):
    d = trained_like_draft()
    out = save_draft(d, tmp_path / "draft")
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == ENGINE_KEYS  # no target embeddings, no RoPE buffers
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    back = load_draft(out, embed_weight=d.embed_tokens.weight)
    for (n, a), (m, b) in zip(d.state_dict().items(), back.state_dict().items()):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b), n
    assert back.config == d.config


def test_config_fields(tmp_path):
    d = trained_like_draft()
    c = d.config
    cfg = json.loads((save_draft(d, tmp_path / "v") / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 90 and cfg["vocab_size"] == 300
    assert cfg["target_hidden_size"] == c.hidden_size
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3]
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["max_position_embeddings"] == 512
    assert cfg["norm_before_residual"] is False
    assert cfg["head_dim"] == c.head_dim
    sg = json.loads((save_draft(d, tmp_path / "s", fmt="sglang") / "config.json").read_text())
    assert sg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 2]
    # Loading the SGLang export gives back the training convention.
    assert load_draft(tmp_path / "s").config.aux_layer_ids == c.aux_layer_ids


def test_bf16_export(tmp_path):
    d = trained_like_draft()
    back = load_draft(save_draft(d, tmp_path / "b", dtype=torch.bfloat16))
    assert back.fc.weight.dtype == torch.bfloat16
    assert torch.equal(back.fc.weight, d.fc.weight.to(torch.bfloat16))


def test_mismatch_is_rejected(tmp_path):
    d = trained_like_draft()
    out = save_draft(d, tmp_path / "d")
    other = DraftConfig.from_target_config(tiny_config("llama3-scaled"), draft_vocab_size=80)
    with pytest.raises(ValueError, match="draft_vocab_size: checkpoint=90 target=80"):
        load_draft(out, expected=other)
    t = load_file(str(out / "model.safetensors"))
    t["fc.weight"] = t["fc.weight"].T.contiguous()  # transposed fc
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"fc.weight .* has shape \(192, 64\)"):
        load_draft(out)
    with pytest.raises(FileNotFoundError, match="not an exported draft folder"):
        load_draft(tmp_path / "nowhere")


def test_failed_write_leaves_previous_export(tmp_path, monkeypatch):
    d = trained_like_draft()
    out = save_draft(d, tmp_path / "d")
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_draft(trained_like_draft(seed=1), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folder left behind


@pytest.mark.parametrize("fmt", ["vllm", "sglang", "speculators"])
def test_every_format_round_trips(tmp_path, fmt):
    d = trained_like_draft()
    out = save_draft(d, tmp_path / fmt, fmt=fmt, verifier="/models/target")
    back = load_draft(out, embed_weight=d.embed_tokens.weight)
    assert back.config == d.config
    for (n, a), (m, b) in zip(d.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    assert export.read_draft_config(out) == (d.config, fmt)


def test_speculators_format(tmp_path):
    """The fields vLLM's speculators loader reads (vllm/transformers_utils/configs/speculators/, vLLM 0.32)."""
    d = trained_like_draft()
    c = d.config
    out = save_draft(d, tmp_path / "s", fmt="speculators", verifier="/models/target", num_speculative_tokens=5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3"
    spec = cfg["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 5
    assert spec["verifier"] == {"name_or_path": "/models/target", "architectures": ["LlamaForCausalLM"]}
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3]  # vLLM convention, as trained
    assert cfg["draft_vocab_size"] == 90 and cfg["target_hidden_size"] == c.hidden_size
    assert cfg["norm_before_residual"] is False  # vLLM's speculators loader defaults it to True
    layer = cfg["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and layer["vocab_size"] == 300
    assert layer["rope_theta"] == 500000.0 and layer["rope_scaling"]["rope_type"] == "llama3"
    assert layer["rope_parameters"] == c.rope_parameters and layer["max_position_embeddings"] == 512
    tensors = load_file(str(out / "model.safetensors"))
    renamed = {n.replace("midlayer.", "layers.0.") for n in ENGINE_KEYS}
    assert set(tensors) == renamed
    assert torch.equal(tensors["layers.0.self_attn.q_proj.weight"], d.midlayer.self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="pass verifier="):
        save_draft(d, tmp_path / "nover", fmt="speculators")
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        save_draft(d, tmp_path / "x", fmt="onnx")
    assert not (tmp_path / "nover").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt", ["vllm", "sglang", "speculators"])
def test_hand_edited_export_is_rejected(tmp_path, fmt):
    """A config.json whose engine-facing fields no longer match the trained config fails loudly on load."""
    out = save_draft(trained_like_draft(), tmp_path / fmt, fmt=fmt, verifier="t")
    cfg = json.loads((out / "config.json").read_text())
    if fmt == "speculators":
        cfg["eagle_aux_hidden_state_layer_ids"] = [3, 3, 2]
        cfg["transformer_layer_config"]["max_position_embeddings"] = 4096
    else:
        cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [3, 3, 2]
        cfg["max_position_embeddings"] = 4096
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"edited after export: eagle_aux_hidden_state_layer_ids=\[3, 3, 2\] .*"
                                         r"max_position_embeddings=4096 but the aerie section implies 512"):
        load_draft(out)
