"""Payloads that cross process boundaries between target actors and train workers (typed, shapes in comments)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from eagle3.data import Batch, DataConfig


@dataclass(frozen=True, kw_only=True)
class TargetInfo:
    """What a trainer must agree on with the target; checked once against the draft config."""

    model_id: str  # what the user asked for (builtin name, folder or .gguf path)
    revision: str  # content fingerprint of the weights (sha256 prefix of the safetensors index / file)
    num_layers: int
    hidden_size: int
    vocab_size: int
    aux_layer_ids: tuple[int, int, int]
    dtype: str  # compute dtype of the target, e.g. "bfloat16"
    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    chat_template_id: str  # sha256 prefix of the tokenizer's chat template
    hf_config: dict[str, Any] = field(hash=False)  # the target's full HF config (to build DraftConfig)

    def as_params(self) -> dict[str, Any]:
        """Flat dict for experiment tracking."""
        return {
            "model_id": self.model_id, "revision": self.revision, "num_layers": self.num_layers,
            "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
            "aux_layer_ids": list(self.aux_layer_ids), "dtype": self.dtype,
            "rope_theta": self.rope_parameters.get("rope_theta"),
            "max_position_embeddings": self.max_position_embeddings, "chat_template_id": self.chat_template_id,
        }


@dataclass
class TargetBatch:
    """Target features for a data Batch (tokens, masks, positions); the batch is passed through unchanged."""

    batch: Batch
    aux_hidden: Tensor  # [B, T, 3*h] bf16: hidden states ENTERING the 3 aux layers, concatenated low/mid/high
    last_hidden: Tensor  # [B, T, h] bf16: final hidden state AFTER the target's final norm (ready for lm_head)
    target_seconds: float = 0.0  # time the actor spent computing it
    actor: str = ""  # which actor produced it
    key: int = -1  # identity of this forward on its actor (RelabelRequest.key), -1 = not cached
    generated_tokens: int = 0  # response tokens the target wrote for this batch (online regeneration), else 0
    generate_seconds: float = 0.0  # part of target_seconds spent generating them

    @property
    def wire_bytes(self) -> int:
        return self.aux_hidden.numel() * self.aux_hidden.element_size() + \
            self.last_hidden.numel() * self.last_hidden.element_size()


@dataclass
class FrozenWeights:
    """Target tensors the trainer keeps (frozen): token embeddings for the draft, lm_head for TargetHead."""

    embed_tokens: Tensor  # [V, h]
    lm_head: Tensor  # [V, h] (the same tensor as embed_tokens for tied targets)


@dataclass
class RelabelRequest:
    """Branches off a batch the target already forwarded: the target labels the draft's own path (DESIGN.md §4).

    Branch n continues row `rows[n]` after token `points[n]`: it sees that row's prefix up to and including
    `points[n]` (same packed sample only) and its own earlier branch tokens; its positions continue from the
    branch point (position_ids[row, point] + 1 + m).
    """

    batch: Batch  # the batch already forwarded (recomputed from it when its cached KV was evicted)
    key: int  # identity of that forward (`TargetBatch.key`) to find its cached prefix KV
    rows: Tensor  # [N] long: row of each branch
    points: Tensor  # [N] long: branch point index in that row
    tokens: Tensor | None  # [N, M] long target ids of the branch tokens; None = the target's greedy continuation
    length: int = 0  # M when tokens is None (greedy continuation of `length` tokens)


@dataclass
class RelabelResult:
    """The target's view of each branch token."""

    tokens: Tensor  # [N, M] long: the branch tokens (the request's, or the greedy continuation)
    last_hidden: Tensor  # [N, M, h] bf16: final hidden (AFTER the final norm) at each branch token
    target_seconds: float = 0.0  # time the actor spent
    actor: str = ""  # which actor answered
    cache_hit: bool = False  # prefix KV was reused (False: the prefix was recomputed)


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """Sampling settings for target-written responses (online regeneration)."""

    max_new_tokens: int = 256
    """Longest response per assistant turn."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    seed: int = 0
    """Sampling seed (per request: seed + request index keeps runs reproducible)."""


@dataclass
class RegenRequest:
    """Conversations whose assistant turns the target writes itself (online regeneration, `regenerate`)."""

    conversations: list[list[dict[str, str]]]  # per conversation its system/user turns [{"role", "content"}]
    sample_ids: list[str]  # one per conversation
    params: GenerationParams  # sampling settings (seed already made unique to this request)
    data: DataConfig  # tokenisation of the result: max_length, overlong, pack


class TargetBackend(Protocol):
    """What a target actor offers; implemented by `actors.hf_backend.HFTarget` (and the vLLM backend)."""

    def info(self) -> TargetInfo: ...

    def frozen_weights(self) -> FrozenWeights: ...

    def forward(self, batch: Batch) -> TargetBatch: ...

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """Response token ids for each prompt: without the prompt, stopped at EOS (not included) or max_new_tokens."""
        ...

    def regenerate(self, request: RegenRequest) -> TargetBatch:
        """Write the assistant turns (`actors.regenerate.regenerate_batch` over `generate`), then `forward`."""
        ...

    def relabel(self, request: RelabelRequest) -> RelabelResult: ...
