"""HF transformers target backend: a frozen causal LM that turns data Batches into aux + last hidden states.

The aux layers are captured with forward pre-hooks on the decoder layers (the state ENTERING layer i ==
HF `hidden_states[i]`), so only three [B, T, h] tensors are kept, never all L hidden states, and the base model
is called without the lm_head (no [B, T, V] logits on the target side either).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from actors.models import resolve_model, weights_fingerprint
from actors.protocol import GenerationParams, RegenRequest
from actors.regenerate import regenerate_batch, stop_token_ids
from actors.protocol import FrozenWeights, TargetBatch, TargetInfo
from eagle3.attention import packed_causal_bias
from eagle3.data import Batch
from eagle3.model import default_aux_layer_ids, rope_parameters_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """The frozen target model and how its actors run."""

    model: str = "builtin:tiny-llama"
    """Built-in name, local HF folder, or .gguf file (see actors.models)."""
    dtype: str = "float32"
    """Compute dtype of the target (float32 | bfloat16 | float16); features travel as bf16 regardless."""
    device: str = "auto"
    """'auto' (cuda if the actor has a GPU, else cpu), 'cpu' or 'cuda'."""
    aux_layer_ids: tuple[int, ...] | None = None
    """HF hidden_states indices of the 3 aux features; None = EAGLE-3 default (2, L//2, L-3)."""
    num_actors: int = 1
    """Target actors (one per device or device group)."""
    gpus_per_actor: float = 0.0
    """GPUs each target actor reserves (0 on CPU machines)."""
    cpus_per_actor: float = 1.0
    """CPUs each target actor reserves."""
    num_threads: int = 0
    """torch intra-op threads inside each actor; 0 = torch's default."""
    resources: dict | None = None
    """Extra custom Ray resources per actor, e.g. {"target": 1} to land on target nodes of a cluster."""
    max_restarts: int = 3
    """Ray restarts of a dead target actor before giving up."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"target.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"target.device={self.device!r}: choose auto, cpu or cuda")
        if self.num_actors < 1:
            raise ValueError(f"target.num_actors must be >= 1, got {self.num_actors}")
        if self.aux_layer_ids is not None and len(self.aux_layer_ids) != 3:
            raise ValueError(f"target.aux_layer_ids must name 3 layers, got {self.aux_layer_ids}")


def chat_template_id(tokenizer) -> str:
    template = tokenizer.chat_template or ""
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template else "none"


class HFTarget:
    """Frozen HF causal LM. Used directly in tests and wrapped as a Ray actor by the train entrypoint."""

    def __init__(self, cfg: TargetConfig, name: str = "target") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.name = cfg, name
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        folder = resolve_model(cfg.model)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        text_cfg = self.model.config.get_text_config()
        L = text_cfg.num_hidden_layers
        ids = tuple(cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else default_aux_layer_ids(L)
        bad = [i for i in ids if not 0 <= i < L]
        if bad:
            raise ValueError(f"aux layer ids {bad} are out of range for {cfg.model} with {L} layers (valid 0..{L - 1})")
        self.aux_layer_ids = ids
        self.layers = self.model.model.layers
        self._info = TargetInfo(
            model_id=cfg.model,
            revision=weights_fingerprint(folder),
            num_layers=L,
            hidden_size=text_cfg.hidden_size,
            vocab_size=text_cfg.vocab_size,
            aux_layer_ids=ids,
            dtype=cfg.dtype,
            rope_parameters=rope_parameters_of(text_cfg),
            max_position_embeddings=text_cfg.max_position_embeddings,
            chat_template_id=chat_template_id(self.tokenizer),
            hf_config=text_cfg.to_dict(),
        )

    # -- API -------------------------------------------------------------------------------------------------------
    def info(self) -> TargetInfo:
        return self._info

    def ping(self) -> str:
        return f"{self.name}@{os.getpid()}"

    def frozen_weights(self) -> FrozenWeights:
        emb = self.model.get_input_embeddings().weight.detach().float().cpu()
        head = self.model.get_output_embeddings().weight.detach().float().cpu()
        return FrozenWeights(embed_tokens=emb, lm_head=head)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """Response ids per prompt, cut before the first stop token (EOS or the chat template's end of turn).

        One left-padded HF `generate` over all prompts; temperature 0 is greedy, else seeded sampling (params.seed
        on a forked RNG, so the caller's random state is untouched)."""
        from transformers import GenerationConfig

        if not prompts or not all(prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        stops = stop_token_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = 1
        # A fresh config: the model's own generation_config may carry sampling defaults (top_k=50, penalties).
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0} \
            if params.temperature > 0 else {"do_sample": False}
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                  **sampling)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(params.seed)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=config)
        replies = out[:, T:].tolist()
        return [r[: next((k for k, t in enumerate(r) if t in stops), len(r))] for r in replies]

    def regenerate(self, request: RegenRequest) -> TargetBatch:
        """The target writes the request's assistant turns (`actors.regenerate`), then `forward` on the result."""
        t0 = time.perf_counter()
        regen = regenerate_batch(request.conversations, request.sample_ids, self.tokenizer, self.generate,
                                 request.params, request.data)
        out = self.forward(regen.batch)
        out.target_seconds = time.perf_counter() - t0
        out.generated_tokens, out.generate_seconds = regen.generated_tokens, regen.generate_seconds
        return out

    @torch.no_grad()
    def forward(self, batch: Batch) -> TargetBatch:
        """Features for `batch`; aux_hidden [B,T,3h] and last_hidden [B,T,h] in bf16 on CPU."""
        t0 = time.perf_counter()
        aux, last = self.features(batch.input_ids, batch.position_ids, batch.doc_ids)
        return TargetBatch(
            batch=batch,
            aux_hidden=aux.to(torch.bfloat16).cpu(),
            last_hidden=last.to(torch.bfloat16).cpu(),
            target_seconds=time.perf_counter() - t0,
            actor=self.name,
        )

    # -- internals -------------------------------------------------------------------------------------------------
    def features(self, input_ids: Tensor, position_ids: Tensor, doc_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(aux [B,T,3h], last [B,T,h]) in the target dtype, on the target device."""
        captured: dict[int, Tensor] = {}

        def capture(idx):
            def hook(_module, args, kwargs):
                hs = args[0] if args else kwargs["hidden_states"]
                captured[idx] = hs
            return hook

        handles = [self.layers[i].register_forward_pre_hook(capture(i), with_kwargs=True)
                   for i in set(self.aux_layer_ids)]
        try:
            ids = input_ids.to(self.device)
            pos = position_ids.to(self.device)
            docs = doc_ids.to(self.device)
            # One additive mask covers padding and packing alike (samples never see each other).
            mask = packed_causal_bias(docs, self.dtype)
            out = self.model.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        aux = torch.cat([captured[i] for i in self.aux_layer_ids], dim=-1)
        return aux, out.last_hidden_state
