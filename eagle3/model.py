"""The EAGLE-3 draft model: fc(3h→h) + one decoder layer with a 2h attention input + norm + reduced lm_head.

Matches the official EAGLE-3 / SpecForge layout so exports load in vLLM and SGLang (see DESIGN.md §3). The target's
token embeddings are used frozen and are never saved. Single device; distribution is applied from outside.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from eagle3.attention import TTTKV, ttt_attention


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default aux layers: the hidden states entering layers 2, L//2 and L-3 (HF `hidden_states[i]`)."""
    return (2, num_layers // 2, num_layers - 3)


@dataclass(frozen=True, kw_only=True)
class DraftConfig:
    """Everything that fixes the draft's shapes and numerics; built from the target's HF config."""

    hidden_size: int
    """Target (and draft) hidden size h."""
    num_attention_heads: int
    """Query heads of the draft layer (the target's)."""
    num_key_value_heads: int
    """KV heads (GQA) of the draft layer (the target's)."""
    head_dim: int
    """Per-head dim; the target's `head_dim` (Qwen3 and Mistral may differ from h / heads)."""
    intermediate_size: int
    """SwiGLU hidden size of the draft MLP."""
    rms_norm_eps: float
    """RMSNorm epsilon."""
    rope_parameters: dict[str, Any] = field(hash=False)
    """Transformers-5 style RoPE dict (`rope_type`, `rope_theta`, scaling fields); the target's, exported as is."""
    max_position_embeddings: int
    """Max positions; exported unchanged (a wrong value costs acceptance in serving engines)."""
    vocab_size: int
    """Target vocabulary size."""
    draft_vocab_size: int
    """Size of the draft's reduced vocabulary (lm_head rows)."""
    aux_layer_ids: tuple[int, int, int]
    """HF `hidden_states` indices of the low/mid/high aux features (vLLM convention)."""
    target_num_layers: int
    """Number of decoder layers of the target, to validate `aux_layer_ids`."""
    hidden_act: str = "silu"
    """MLP activation (the target's)."""
    target_model_type: str = "llama"
    """`model_type` of the target, informational."""

    def __post_init__(self) -> None:
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"draft_vocab_size={self.draft_vocab_size} exceeds the target vocab_size={self.vocab_size}; "
                f"set draft.vocab_size <= {self.vocab_size}"
            )
        if self.draft_vocab_size <= 0:
            raise ValueError(f"draft_vocab_size must be positive, got {self.draft_vocab_size}")
        if len(self.aux_layer_ids) != 3:
            raise ValueError(f"EAGLE-3 needs exactly 3 aux layer ids, got {self.aux_layer_ids}")
        for i in self.aux_layer_ids:
            # hidden_states[i] for i in 0..L exists; EAGLE-3 uses the state ENTERING layer i, so i < L.
            if not 0 <= i < self.target_num_layers:
                raise ValueError(
                    f"aux layer id {i} is out of range for a target with {self.target_num_layers} layers "
                    f"(valid: 0..{self.target_num_layers - 1}); default is {default_aux_layer_ids(self.target_num_layers)}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"only SwiGLU (hidden_act='silu') drafts are supported, target has {self.hidden_act!r}")

    @classmethod
    def from_target_config(
        cls,
        target_config: Any,
        *,
        draft_vocab_size: int,
        aux_layer_ids: tuple[int, int, int] | None = None,
    ) -> "DraftConfig":
        """Build from a HF config of a Llama-family target (Llama, Qwen2/3, Mistral, SmolLM2, ...)."""
        cfg = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        num_layers = cfg.num_hidden_layers
        return cls(
            hidden_size=cfg.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_parameters=dict(rope_parameters_of(cfg)),
            max_position_embeddings=cfg.max_position_embeddings,
            vocab_size=cfg.vocab_size,
            draft_vocab_size=draft_vocab_size,
            aux_layer_ids=tuple(aux_layer_ids) if aux_layer_ids is not None else default_aux_layer_ids(num_layers),
            target_num_layers=num_layers,
            hidden_act=getattr(cfg, "hidden_act", "silu"),
            target_model_type=getattr(cfg, "model_type", "llama"),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DraftConfig":
        d = dict(d)
        d["aux_layer_ids"] = tuple(d["aux_layer_ids"])
        return cls(**d)

    def llama_config(self) -> LlamaConfig:
        """A LlamaConfig with the draft layer's shapes (used for RoPE and for export)."""
        return LlamaConfig(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=dict(self.rope_parameters),
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size,
            num_hidden_layers=1,
            hidden_act=self.hidden_act,
        )


def rope_parameters_of(cfg: Any) -> dict[str, Any]:
    """The RoPE dict of a transformers-5 config (`rope_parameters`; `rope_scaling` is only an alias there)."""
    params = getattr(cfg, "rope_parameters", None)
    if not params:
        # Older configs: rope_theta + optional rope_scaling.
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.pop("type", "default"))
        params["rope_theta"] = getattr(cfg, "rope_theta", 10000.0)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(params).items()}


class RMSNorm(nn.Module):
    """Llama RMSNorm (computed in fp32, cast back)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DraftAttention(nn.Module):
    """Self-attention whose q/k/v read the 2h concat [input_layernorm(emb), hidden_norm(hidden)]."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(2 * h, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: TTTKV) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (output [B,T,h], this step's rotated k and v [B,Hkv,T,hd])."""
        B, T, _ = x.shape  # x: [B, T, 2h]
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = ttt_attention(q, k, v, kv)  # [B, H, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)), k, v


class DraftMLP(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """The single EAGLE-3 decoder layer (`midlayer`); `norm_before_residual=False` as in the official model."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg)

    def forward(
        self, embeds: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, kv: TTTKV
    ) -> tuple[Tensor, Tensor, Tensor]:
        residual = hidden  # [B, T, h]
        x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)  # [B, T, 2h]
        attn, k, v = self.self_attn(x, cos, sin, kv)
        hidden = residual + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), k, v


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft. `embed_tokens` is the target's embedding table, frozen and excluded from exports."""

    def __init__(self, cfg: DraftConfig, embed_weight: Tensor | None = None) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        # In the target's dtype when given (frozen: a bf16 target's table stays bf16; step() casts the lookups).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h, dtype=None if embed_weight is None else embed_weight.dtype)
        if embed_weight is not None:
            if tuple(embed_weight.shape) != (cfg.vocab_size, h):
                raise ValueError(
                    f"target embedding has shape {tuple(embed_weight.shape)}, draft expects ({cfg.vocab_size}, {h})"
                )
            self.embed_tokens.weight.data.copy_(embed_weight)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.midlayer = DraftLayer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(cfg.llama_config())
        # Identity map until a real vocab map is loaded (d2t = used_id - draft_id).
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[: cfg.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)

    def set_vocab_map(self, d2t: Tensor, t2d: Tensor) -> None:
        """Install the draft↔target vocabulary map (see `eagle3.vocab`)."""
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(
                f"vocab map shapes d2t{tuple(d2t.shape)}/t2d{tuple(t2d.shape)} do not match the draft "
                f"(d2t{tuple(self.d2t.shape)}/t2d{tuple(self.t2d.shape)})"
            )
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    @torch.no_grad()
    def init_lm_head_from(self, target_lm_head: Tensor) -> None:
        """Copy the target's lm_head rows [V, h] of the draft vocabulary (draft id i ↔ target id i + d2t[i]) into
        the draft's lm_head, in the draft's dtype. Call after `set_vocab_map`."""
        if tuple(target_lm_head.shape) != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(f"target lm_head has shape {tuple(target_lm_head.shape)}, draft expects "
                             f"({self.config.vocab_size}, {self.config.hidden_size})")
        ids = self.draft_to_target(torch.arange(self.config.draft_vocab_size, device=self.d2t.device))
        self.lm_head.weight.copy_(target_lm_head[ids.to(target_lm_head.device)].to(self.lm_head.weight))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def rope(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin [B, T, hd] for the given positions, from the target's RoPE settings."""
        return self.rotary(x, position_ids)

    def project(self, aux_hidden: Tensor) -> Tensor:
        """fc: concatenated low/mid/high target features [B, T, 3h] → draft hidden [B, T, h].

        Under autocast fc casts its input itself (a bf16 target's features go in as they are, with no fp32 copy);
        without it the features are cast to the weights' dtype."""
        if torch.is_autocast_enabled(aux_hidden.device.type):
            return self.fc(aux_hidden)
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def step(
        self, input_ids: Tensor, hidden: Tensor, position_ids: Tensor, kv: TTTKV
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One draft step: (PRE-norm hidden [B,T,h] that feeds the next step, this step's k, v for `kv.push`)."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        cos, sin = self.rope(hidden, position_ids)
        return self.midlayer(embeds, hidden, cos, sin, kv)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Draft-vocab logits [B, T, draft_vocab] from a pre-norm hidden."""
        return self.lm_head(self.norm(hidden))

    def draft_to_target(self, draft_ids: Tensor) -> Tensor:
        """Map draft-vocab ids to target ids."""
        return draft_ids + self.d2t[draft_ids]
