"""HF transformers target backend: a frozen causal LM that turns data Batches into aux + last hidden states.

The aux layers are captured with forward pre-hooks on the decoder layers (the state ENTERING layer i ==
HF `hidden_states[i]`), so only three [B, T, h] tensors are kept, never all L hidden states, and the base model
is called without the lm_head (no [B, T, V] logits on the target side either).

Relabelling (DESIGN.md §4): `forward` keeps the prefix KV cache of each batch in a byte-bounded LRU and returns its
`key`; `relabel` runs branch tokens over that cached prefix with a tree mask (recomputing the prefix on a miss).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Annotated, Literal

import torch
from annotated_types import Ge, Gt, Le, Len, MinLen
from torch import Tensor
from transformers import DynamicCache

from actors.cpu_pin import pin_cores
from actors.models import resolve_model, weights_fingerprint
from actors.protocol import GenerationParams, RegenRequest
from actors.regenerate import (Answered, answer_conversations, cut_at_stop, regenerate_features,
                               stop_token_ids)
from actors.protocol import FrozenWeights, RelabelRequest, RelabelResult, TargetBatch, TargetInfo
from eagle3.attention import document_block_mask, packed_causal_bias
from eagle3.data import Batch
from eagle3.model import default_aux_layer_ids, rope_parameters_of
from eagle3.numerics import resolve_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """The frozen target model and how its actors run."""

    model: Annotated[str, MinLen(1)] = "builtin:tiny-llama"
    """Built-in name, local HF folder, or .gguf file (see actors.models)."""
    backend: Literal["hf", "vllm"] = "hf"
    """Engine of the target actors: 'hf' (transformers: everything) or 'vllm' (forward + generate, no relabel)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the target (float32 | bfloat16 | float16); features travel as bf16 regardless. 'auto':
    bfloat16 where the actor's device multiplies bf16 natively (CUDA >= sm80; CPUs with AVX512-BF16 or AMX), else
    float32, decided by each actor on its own device (TargetInfo.dtype reports the choice)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (cuda if the actor has a GPU, else cpu), 'cpu' or 'cuda'."""
    attn_implementation: Literal["auto", "sdpa", "flex_attention"] = "auto"
    """backend=hf: attention of the target's forward: 'flex_attention' (packed rows by a document-causal BlockMask,
    no dense [B, 1, T, T] mask), 'sdpa' (dense additive mask), or 'auto' (flex_attention on CUDA, else sdpa; sdpa
    for a target spread over GPUs or an architecture without flex support). Relabel and generate run sdpa."""
    aux_layer_ids: Annotated[tuple[Annotated[int, Ge(0)], ...], Len(3, 3)] | None = None
    """HF hidden_states indices of the 3 aux features; None = EAGLE-3 default (2, L//2, L-3)."""
    num_actors: Annotated[int, Ge(1)] = 1
    """Target actors (one per device or device group)."""
    gpus_per_actor: Annotated[float, Ge(0)] = 0.0
    """GPUs each target actor reserves, in one placement-group bundle (0 on CPU machines): a fraction below 1 shares
    a GPU, a whole number above 1 spreads one large target over that many GPUs of a node (HF device_map, vLLM
    tensor parallelism)."""
    cpus_per_actor: Annotated[float, Ge(0)] = 1.0
    """CPUs each target actor reserves."""
    num_threads: Annotated[int, Ge(0)] = 0
    """torch intra-op threads inside each actor; 0 = torch's default."""
    pin_cpus: bool = False
    """backend=hf on CPU: pin each actor to num_threads cores of its own (claimed from the lowest core up,
    coordinated with the trainer's claims; actors.cpu_pin), so target and trainer stop sharing and migrating
    between cores. Needs num_threads >= 1; ignored on GPU and by backend=vllm (which binds its own threads)."""
    resources: dict[str, Annotated[float, Ge(0)]] | None = None
    """Extra custom Ray resources per actor, e.g. {"target": 1} to land on target nodes of a cluster."""
    max_restarts: Annotated[int, Ge(0)] = 3
    """Ray restarts of a dead target actor before giving up."""
    vllm_kv_cache_gib: Annotated[float, Gt(0)] | None = None
    """backend=vllm: KV cache per engine rank in GiB (sequences in flight x their length x layers x 2 x kv heads x
    hd); None = 1 GiB on CPU, and on GPU what vllm_gpu_memory_utilization leaves after weights and activations."""
    vllm_max_model_len: Annotated[int, Ge(1)] | None = None
    """backend=vllm: longest sequence (sample, or prompt + reply) the engine serves; None = min(8192, the model's
    max_position_embeddings). The KV cache must hold one sequence this long."""
    vllm_gpu_memory_utilization: Annotated[float, Gt(0), Le(1)] = 0.9
    """backend=vllm on GPU: fraction of each of the actor's GPUs the engine may take (weights, activations, KV
    cache); at most gpus_per_actor when actors share a GPU."""
    vllm_tensor_parallel_size: Annotated[int, Ge(0)] = 0
    """backend=vllm: tensor-parallel ranks per actor; 0 = the actor's GPUs (gpus_per_actor), 1 on CPU. On CPU a
    value > 1 splits the actor's cores between the ranks (a proof of the TP path, not a speed-up)."""
    vllm_enforce_eager: bool = True
    """backend=vllm: no torch.compile / CUDA graphs (engine start ~25 s instead of ~85 s on CPU)."""
    relabel_cache_mb: Annotated[float, Ge(0)] = 1024.0
    """Byte budget (MiB) of the LRU of prefix KV caches that `forward` keeps for `relabel`; 0 = keep none."""
    relabel_chunk_tokens: Annotated[int, Ge(1)] = 512
    """Branch tokens per relabel forward; bounds the [chunk, prefix + chunk] mask and the activations (the mask is
    dense, so attention work grows with the chunk: 512 measured faster than 2048 for 2x512 rows, M=6)."""

    def __post_init__(self) -> None:
        # Repeats the annotations' ranges and choices for configs built in Python; jobs.config checks the
        # annotations themselves (types included) when it loads a run.
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"target.dtype={self.dtype!r}: choose auto or one of {', '.join(DTYPES)}")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"target.backend={self.backend!r}: choose hf or vllm")
        if self.pin_cpus and self.num_threads < 1:
            raise ValueError("target.pin_cpus needs target.num_threads >= 1: the number of cores each actor claims")
        if self.vllm_kv_cache_gib is not None and self.vllm_kv_cache_gib <= 0:
            raise ValueError(f"target.vllm_kv_cache_gib={self.vllm_kv_cache_gib}: expected > 0 (or unset)")
        if self.vllm_max_model_len is not None and self.vllm_max_model_len < 1:
            raise ValueError(f"target.vllm_max_model_len={self.vllm_max_model_len}: expected >= 1 (or unset)")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"target.vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization}: expected a "
                             "fraction in (0, 1]")
        g = self.gpus_per_actor
        if g < 0 or (g > 1 and not float(g).is_integer()):
            raise ValueError(f"target.gpus_per_actor={g}: use a fraction below 1 (actors share a GPU) or a whole "
                             "number of GPUs (one actor spans them); Ray cannot give 1.5 GPUs to one bundle")
        if self.backend == "vllm" and 0 < g < 1 and self.vllm_gpu_memory_utilization > g:
            raise ValueError(f"target.vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} is more than "
                             f"the target.gpus_per_actor={g} share of the GPU: actors sharing it would run out of "
                             f"memory; set target.vllm_gpu_memory_utilization <= {g}")
        tp = self.vllm_tensor_parallel_size
        if tp < 0 or (tp and g >= 1 and tp != int(g)):
            raise ValueError(f"target.vllm_tensor_parallel_size={tp} but each actor has target.gpus_per_actor={g} "
                             "GPUs: vLLM runs one rank per GPU; leave it 0 (= the actor's GPUs)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"target.device={self.device!r}: choose auto, cpu or cuda")
        if self.attn_implementation not in ("auto", "sdpa", "flex_attention"):
            raise ValueError(f"target.attn_implementation={self.attn_implementation!r}: choose auto, sdpa or "
                             "flex_attention")
        if self.attn_implementation == "flex_attention" and g > 1:
            # BlockMask.to(device) (what accelerate's hooks call per layer) leaves the mask_mod's doc ids on the
            # first GPU; unverified across GPUs, so not offered.
            raise ValueError(f"target.attn_implementation=flex_attention with target.gpus_per_actor={g}: a target "
                             "spread over GPUs runs sdpa; use auto or sdpa")
        if self.num_actors < 1:
            raise ValueError(f"target.num_actors must be >= 1, got {self.num_actors}")
        if self.aux_layer_ids is not None and len(self.aux_layer_ids) != 3:
            raise ValueError(f"target.aux_layer_ids must name 3 layers, got {self.aux_layer_ids}")
        if self.relabel_cache_mb < 0:
            raise ValueError(f"target.relabel_cache_mb={self.relabel_cache_mb}: expected >= 0 (0 disables the cache)")
        if self.relabel_chunk_tokens < 1:
            raise ValueError(f"target.relabel_chunk_tokens={self.relabel_chunk_tokens}: expected >= 1")


@dataclass
class PrefixKV:
    """One cached forward (stays inside the actor): its inputs, to check a request against, and its KV."""

    input_ids: Tensor  # [B, T] long, CPU
    position_ids: Tensor  # [B, T] long, CPU
    doc_ids: Tensor  # [B, T] long, CPU
    keys: list[Tensor]  # per layer [B, Hkv, T, hd], target dtype and device
    values: list[Tensor]  # per layer [B, Hkv, T, hd]
    last_hidden: Tensor  # [B, T, h] target dtype: the greedy first token is argmax lm_head(last_hidden[row, point])

    @property
    def nbytes(self) -> int:
        tensors = [getattr(self, f.name) for f in fields(self)]
        flat = [t for x in tensors for t in (x if isinstance(x, list) else [x])]
        return sum(t.numel() * t.element_size() for t in flat)

    def matches(self, batch: Batch) -> bool:
        """Same tokens, positions and packing: a key from another actor (or a restarted one) can't alias."""
        return all(a.shape == b.shape and torch.equal(a, b.cpu()) for a, b in (
            (self.input_ids, batch.input_ids), (self.position_ids, batch.position_ids), (self.doc_ids, batch.doc_ids)))


def resolved_dtype(cfg: TargetConfig, device: str) -> TargetConfig:
    """`cfg` with dtype 'auto' resolved on this actor's device (eagle3.numerics.resolve_dtype)."""
    dtype = resolve_dtype(cfg.dtype, device)
    return cfg if dtype == cfg.dtype else replace(cfg, dtype=dtype)


def target_info(cfg: TargetConfig, folder, text_cfg, aux_layer_ids: tuple[int, ...], tokenizer) -> TargetInfo:
    """The TargetInfo of a model folder (the same for every backend that serves it)."""
    return TargetInfo(
        model_id=cfg.model,
        revision=weights_fingerprint(folder),
        num_layers=text_cfg.num_hidden_layers,
        hidden_size=text_cfg.hidden_size,
        vocab_size=text_cfg.vocab_size,
        aux_layer_ids=aux_layer_ids,
        dtype=cfg.dtype,
        rope_parameters=rope_parameters_of(text_cfg),
        max_position_embeddings=text_cfg.max_position_embeddings,
        chat_template_id=chat_template_id(tokenizer),
        hf_config=text_cfg.to_dict(),
    )


GENERATE_GROUP = 16  # most prompts per HF generate call (one left-padded batch)


def length_groups(lengths: list[int], max_group: int = GENERATE_GROUP, waste: float = 0.25) -> list[list[int]]:
    """Indices grouped by length (ascending) so that each group's padding is at most `waste` of its padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        # Sorted ascending, so i would be the group's longest: padded size = len(i) × (group size + 1).
        if g and len(g) < max_group and \
                lengths[i] * (len(g) + 1) * (1 - waste) <= sum(lengths[j] for j in g) + lengths[i]:
            g.append(i)
        else:
            groups.append([i])
    return groups


def _load_spread(folder, dtype: torch.dtype, n_gpus: int, attn: str = "sdpa"):
    """The model spread over GPUs 0..n_gpus-1 (the actor's bundle: Ray sets CUDA_VISIBLE_DEVICES) by accelerate's
    balanced device_map. max_memory names the GPUs only, so nothing is offloaded to CPU (silently ~100x slower);
    a model that does not fit fails here."""
    from transformers import AutoModelForCausalLM

    visible = torch.cuda.device_count()
    if visible < n_gpus:
        raise ValueError(f"target.gpus_per_actor={n_gpus} but this actor sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run it as a Ray actor with num_gpus={n_gpus}")
    free = {i: torch.cuda.mem_get_info(i)[0] for i in range(n_gpus)}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn, device_map="auto",
                                                 max_memory=free)
    # What overflows the listed GPUs goes to "disk" (read from the safetensors on every forward): refuse it.
    off = sorted({str(d) for d in model.hf_device_map.values() if not isinstance(d, int)})
    if off:
        raise ValueError(f"{folder} does not fit on {n_gpus} GPUs ({sum(free.values()) / 2**30:.1f} GiB free): "
                         f"device_map put layers on {off}; raise target.gpus_per_actor or use a smaller target.dtype")
    return model


def _load_model(load, attn: str, fallback: bool):
    """`load(attn)`; with `fallback` ("auto"), an architecture without flex_attention support loads with sdpa instead
    (transformers refuses it in the model's __init__, before any weight is read)."""
    try:
        return load(attn)
    except ValueError as e:
        if not (fallback and attn == "flex_attention" and "flex_attention" in str(e)):
            raise
        return load("sdpa")


def chat_template_id(tokenizer) -> str:
    template = tokenizer.chat_template or ""
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template else "none"


class HFTarget:
    """Frozen HF causal LM. Used directly in tests and wrapped as a Ray actor by the train entrypoint."""

    def __init__(self, cfg: TargetConfig, name: str = "target", pin: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.name = cfg, name
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        folder = resolve_model(cfg.model)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # Only actors pin (jobs.targets passes pin=cfg.pin_cpus): a target built in a driver or benchmark process
        # must not restrict that process or hold a core's claim for its lifetime.
        self._cores = pin_cores(cfg.num_threads, name) if pin and device == "cpu" else None
        self.cfg = cfg = resolved_dtype(cfg, device)
        self.dtype = DTYPES[cfg.dtype]
        spread = int(cfg.gpus_per_actor) if device == "cuda" and cfg.gpus_per_actor > 1 else 0
        attn = cfg.attn_implementation
        if attn == "auto":
            attn = "flex_attention" if device == "cuda" and not spread else "sdpa"
        fallback = cfg.attn_implementation == "auto"
        if spread:
            self.model = _load_model(lambda a: _load_spread(folder, self.dtype, spread, a), attn, fallback)
            # Inputs go to the embeddings' GPU; every output is brought back to it (features, relabel results).
            self.device = self.model.get_input_embeddings().weight.device
        else:
            self.device = torch.device(device)
            self.model = _load_model(lambda a: AutoModelForCausalLM.from_pretrained(
                folder, dtype=self.dtype, attn_implementation=a), attn, fallback)
            self.model.to(self.device)
        self.model.eval().requires_grad_(False)
        self.attn_implementation = self.model.config._attn_implementation  # what was loaded: sdpa | flex_attention
        self.rng_devices = list(range(spread)) if spread else [self.device] if self.device.type == "cuda" else []
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        text_cfg = self.model.config.get_text_config()
        L = text_cfg.num_hidden_layers
        ids = tuple(cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else default_aux_layer_ids(L)
        bad = [i for i in ids if not 0 <= i < L]
        if bad:
            raise ValueError(f"aux layer ids {bad} are out of range for {cfg.model} with {L} layers (valid 0..{L - 1})")
        self.aux_layer_ids = ids
        self.layers = self.model.model.layers
        # Our 4D masks are full attention: a sliding window (if any layer has one) must cover every relabel key.
        types = getattr(text_cfg, "layer_types", None)
        sliding = any(t != "full_attention" for t in types) if types else True
        self.sliding_window = getattr(text_cfg, "sliding_window", None) if sliding else None
        self.prefix_cache: OrderedDict[int, PrefixKV] = OrderedDict()  # LRU: oldest first
        self.prefix_cache_bytes = 0
        self._keys = itertools.count()
        self._info = target_info(cfg, folder, text_cfg, ids, self.tokenizer)

    # -- API -------------------------------------------------------------------------------------------------------
    def info(self) -> TargetInfo:
        return self._info

    def ping(self) -> str:
        return f"{self.name}@{os.getpid()}"

    def pinned_cores(self) -> list[int] | None:
        """The cores this actor is pinned to (target.pin_cpus), None when unpinned."""
        return self._cores

    def frozen_weights(self) -> FrozenWeights:
        """Embeddings and lm_head in the target's dtype, on CPU (the driver puts them in the object store once)."""
        emb = self.model.get_input_embeddings().weight.detach().cpu()
        head = self.model.get_output_embeddings().weight.detach()
        head = emb if head.data_ptr() == self.model.get_input_embeddings().weight.data_ptr() else head.cpu()
        return FrozenWeights(embed_tokens=emb, lm_head=head)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """Response ids per prompt, cut before the first stop token (EOS or the chat template's end of turn).

        Prompts are sorted by length and cut into groups whose left padding stays under a quarter of their tokens
        (at most GENERATE_GROUP prompts each): one left-padded HF `generate` per group, so a long prompt does not
        make every short one prefill its padding. Temperature 0 is greedy, else seeded sampling (params.seed + group
        index, on a forked RNG, so the caller's random state is untouched)."""
        from transformers import GenerationConfig

        if not prompts or not all(prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        stops = stop_token_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        # A fresh config: the model's own generation_config may carry sampling defaults (top_k=50, penalties).
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0} \
            if params.temperature > 0 else {"do_sample": False}
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                  **sampling)
        replies: list[list[int] | None] = [None] * len(prompts)
        for g, group in enumerate(length_groups([len(p) for p in prompts])):
            T = max(len(prompts[i]) for i in group)
            ids = torch.full((len(group), T), pad, dtype=torch.long)
            mask = torch.zeros(len(group), T, dtype=torch.long)
            for b, i in enumerate(group):  # left padding: every prompt ends where generation starts
                ids[b, T - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[b, T - len(prompts[i]):] = 1
            with torch.random.fork_rng(devices=self.rng_devices), self._sdpa():
                torch.manual_seed(params.seed + g)
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=config)
            for b, i in enumerate(group):
                replies[i] = cut_at_stop(out[b, T:].tolist(), stops)
        return replies

    def regenerate(self, request: RegenRequest) -> TargetBatch:
        """The target writes the request's assistant turns (`actors.regenerate`), then `forward` on the result."""
        return regenerate_features(request, self.tokenizer, self.generate, self.forward)

    def answer(self, conversations: list[list[dict[str, str]]], params: GenerationParams, max_length: int) -> Answered:
        """The conversations (system/user turns) with target-written replies, turn by turn, one `generate` per
        turn index (`actors.regenerate.answer_conversations`): batch regeneration into a dataset
        (jobs/regenerate.py)."""
        return answer_conversations(conversations, self.tokenizer, self.generate, params, max_length)

    @torch.no_grad()
    def forward(self, batch: Batch) -> TargetBatch:
        """Features for `batch`; aux_hidden [B,T,3h] and last_hidden [B,T,h] in bf16 on CPU."""
        t0 = time.perf_counter()
        # use_cache only when caching: keeps the cost of forward unchanged with relabel_cache_mb=0.
        cache = DynamicCache() if self.cfg.relabel_cache_mb > 0 else None
        aux, last = self.features(batch.input_ids, batch.position_ids, batch.doc_ids, cache=cache)
        key = -1 if cache is None else self._cache_put(batch, cache, last)
        return TargetBatch(
            batch=batch,
            aux_hidden=aux.to(torch.bfloat16).cpu(),
            last_hidden=last.to(torch.bfloat16).cpu(),
            target_seconds=time.perf_counter() - t0,
            actor=self.name,
            key=key,
        )

    @torch.no_grad()
    def relabel(self, req: RelabelRequest) -> RelabelResult:
        """The target's last_hidden (after the final norm, bf16, CPU) at each branch token of `req`.

        All branches of a row run in one forward over the row's prefix KV (cached by `forward` under `req.key`, or
        recomputed from `req.batch` on a miss), chunked to `relabel_chunk_tokens` branch tokens. Greedy mode
        (`req.tokens` None) makes `length` sequential calls of one token per branch, reusing the branch KV.
        """
        t0 = time.perf_counter()
        tokens, hidden, hit = self.branch_features(req)
        return RelabelResult(tokens=tokens.cpu(), last_hidden=hidden.to(torch.bfloat16).cpu(),
                             target_seconds=time.perf_counter() - t0, actor=self.name, cache_hit=hit)

    # -- internals -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def branch_features(self, req: RelabelRequest) -> tuple[Tensor, Tensor, bool]:
        """(tokens [N, M], last_hidden [N, M, h] in the target dtype on the target device, cache hit) for `req`."""
        rows, points, tokens, M = self._check_relabel(req)
        entry = self.prefix_cache.get(req.key)
        hit = entry is not None and entry.matches(req.batch)
        if hit:
            self.prefix_cache.move_to_end(req.key)
        N, h = len(rows), self._info.hidden_size
        out_tokens = torch.zeros(N, M, dtype=torch.long, device=self.device)
        out_hidden = torch.zeros(N, M, h, dtype=self.dtype, device=self.device)
        batch = req.batch
        per_chunk = max(1, self.cfg.relabel_chunk_tokens // M)
        for r in rows.unique().tolist():
            idx = (rows == r).nonzero().squeeze(1)
            idx = idx[points[idx].argsort(stable=True)]  # chunks of nearby points share shorter prefixes
            end = int(points[idx].max()) + 1  # keys past the last branch point are never needed
            if hit:
                keys = [k[r:r + 1, :, :end] for k in entry.keys]
                values = [v[r:r + 1, :, :end] for v in entry.values]
                last = entry.last_hidden[r, :end]
            else:  # recompute this row's prefix only: memory stays one row of KV
                cache = DynamicCache()
                _, last = self.features(batch.input_ids[r:r + 1, :end], batch.position_ids[r:r + 1, :end],
                                        batch.doc_ids[r:r + 1, :end], cache=cache)
                keys, values = [lay.keys for lay in cache.layers], [lay.values for lay in cache.layers]
                last = last[0]
            docs = batch.doc_ids[r, :end].to(self.device)
            pos = batch.position_ids[r, :end].to(self.device)
            for c in range(0, len(idx), per_chunk):
                sel = idx[c:c + per_chunk]
                with self._sdpa():  # dense [q, prefix + q] tree masks over a filled KV cache
                    toks, hid = self._branches(keys, values, last, docs, pos, points[sel].to(self.device),
                                               None if tokens is None else tokens[sel].to(self.device), M)
                sel = sel.to(self.device)
                out_tokens[sel], out_hidden[sel] = toks, hid
        return out_tokens, out_hidden, hit

    def features(self, input_ids: Tensor, position_ids: Tensor, doc_ids: Tensor,
                 cache: DynamicCache | None = None) -> tuple[Tensor, Tensor]:
        """(aux [B,T,3h], last [B,T,h]) in the target dtype, on the target device; fills `cache` if given."""
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
            kw = dict(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=cache is not None)
            # One mask covers padding and packing alike (samples never see each other). An empty cache being
            # filled has the same T x T attention as none, so the BlockMask serves forward's prefix caching too.
            if self.attn_implementation == "flex_attention" and (cache is None or cache.get_seq_length() == 0):
                out = self.model.model(attention_mask=document_block_mask(docs, *docs.shape, self.device), **kw)
            else:
                with self._sdpa():
                    out = self.model.model(attention_mask=packed_causal_bias(docs, self.dtype), **kw)
        finally:
            for h in handles:
                h.remove()
        # Spread over GPUs (device_map), layers hand back states on their own GPU: gather on self.device.
        aux = torch.cat([captured[i].to(self.device) for i in self.aux_layer_ids], dim=-1)
        return aux, out.last_hidden_state.to(self.device)

    def _cache_put(self, batch: Batch, cache: DynamicCache, last: Tensor) -> int:
        """Keep the KV of the batch just forwarded (evicting least recently used entries); its key, or -1."""
        entry = PrefixKV(input_ids=batch.input_ids.cpu().clone(), position_ids=batch.position_ids.cpu().clone(),
                         doc_ids=batch.doc_ids.cpu().clone(), keys=[lay.keys for lay in cache.layers],
                         values=[lay.values for lay in cache.layers], last_hidden=last)
        budget = int(self.cfg.relabel_cache_mb * 2**20)
        size = entry.nbytes
        if size > budget:
            return -1
        while self.prefix_cache and self.prefix_cache_bytes + size > budget:
            self.prefix_cache_bytes -= self.prefix_cache.popitem(last=False)[1].nbytes
        key = next(self._keys)
        self.prefix_cache[key] = entry
        self.prefix_cache_bytes += size
        return key

    def _check_relabel(self, req: RelabelRequest) -> tuple[Tensor, Tensor, Tensor | None, int]:
        """(rows [N], points [N], tokens [N, M] or None, M) on CPU, or a ValueError naming the problem."""
        B, T = req.batch.input_ids.shape
        rows, points = req.rows.cpu().long(), req.points.cpu().long()
        if rows.ndim != 1 or rows.shape != points.shape or len(rows) == 0:
            raise ValueError(f"relabel: rows {tuple(rows.shape)} and points {tuple(points.shape)} must both be [N], "
                             "N >= 1")
        if rows.min() < 0 or rows.max() >= B or points.min() < 0 or points.max() >= T:
            raise ValueError(f"relabel: rows must lie in [0, {B}) and points in [0, {T}) for a [{B}, {T}] batch")
        if (req.batch.doc_ids[rows, points] < 0).any():
            raise ValueError("relabel: a branch point lies on padding (doc_ids == -1); branch from real tokens only")
        M = req.length if req.tokens is None else req.tokens.shape[-1]
        reach = int(req.batch.position_ids[rows, points].max()) + 1 + M
        if self.sliding_window is not None and reach > self.sliding_window:
            raise ValueError(f"relabel: branches reach past the target's sliding window ({self.sliding_window}); "
                             "the tree mask is full attention, so use shorter rows for this target")
        if req.tokens is None:
            if req.length < 1:
                raise ValueError(f"relabel: greedy mode (tokens=None) needs length >= 1, got {req.length}")
            return rows, points, None, req.length
        tokens = req.tokens.cpu().long()
        V = self._info.vocab_size
        if tokens.ndim != 2 or tokens.shape[0] != len(rows) or tokens.shape[1] < 1:
            raise ValueError(f"relabel: tokens {tuple(tokens.shape)} must be [N={len(rows)}, M>=1]")
        if req.length not in (0, tokens.shape[1]):
            raise ValueError(f"relabel: length={req.length} contradicts tokens with M={tokens.shape[1]}; "
                             "leave length 0 when giving tokens")
        if tokens.min() < 0 or tokens.max() >= V:
            raise ValueError(f"relabel: branch tokens must be target ids in [0, {V})")
        return rows, points, tokens, tokens.shape[1]

    def _branches(self, keys: list[Tensor], values: list[Tensor], last: Tensor, docs: Tensor, pos: Tensor,
                  points: Tensor, tokens: Tensor | None, M: int) -> tuple[Tensor, Tensor]:
        """Branches of one row: (tokens [n, M], last_hidden [n, M, h]) in the target dtype.

        keys/values [1, Hkv, P, hd] per layer: the row's prefix KV (never modified: the cache copies it);
        last [P, h], docs/pos [P]: that prefix's final hidden, doc ids, positions; points [n] < P.
        """
        n, P = len(points), docs.shape[0]
        same_doc = docs[None, :] == docs[points][:, None]  # [n, P]
        lo = int(same_doc.to(torch.uint8).argmax(1).min())  # first key any branch sees: skip earlier samples
        j = torch.arange(lo, P, device=self.device)
        sees_prefix = same_doc[:, lo:] & (j[None, :] <= points[:, None])  # [n, P - lo]
        cache = DynamicCache(ddp_cache_data=[(k[:, :, lo:], v[:, :, lo:]) for k, v in zip(keys, values)])
        start = pos[points] + 1  # [n]: the branch continues the positions of its own sample
        eye = torch.eye(n, dtype=torch.bool, device=self.device)
        if tokens is not None:
            # One forward, queries branch-major (n, m); a branch token sees its prefix and its own tokens 0..m.
            tree = torch.kron(eye, torch.ones(M, M, dtype=torch.bool, device=self.device).tril())  # [nM, nM]
            allowed = torch.cat([sees_prefix.repeat_interleave(M, 0), tree], 1)
            out = self.model.model(input_ids=tokens.reshape(1, n * M),
                                   position_ids=(start[:, None] + torch.arange(M, device=self.device)).reshape(1, -1),
                                   attention_mask=self._bias(allowed), past_key_values=cache, use_cache=True)
            return tokens, out.last_hidden_state[0].view(n, M, -1).to(self.device)
        # Greedy: step m feeds one token per branch; keys are the prefix then steps 0..m, step-major.
        head = self.model.get_output_embeddings()
        toks = torch.empty(n, M, dtype=torch.long, device=self.device)
        hidden = torch.empty(n, M, last.shape[-1], dtype=last.dtype, device=self.device)
        nxt = head(last[points]).argmax(-1).to(self.device)  # the target's argmax at the branch point
        for m in range(M):
            allowed = torch.cat([sees_prefix, eye.repeat(1, m + 1)], 1)
            out = self.model.model(input_ids=nxt[None], position_ids=(start + m)[None],
                                   attention_mask=self._bias(allowed), past_key_values=cache, use_cache=True)
            toks[:, m], hidden[:, m] = nxt, out.last_hidden_state[0].to(self.device)
            if m + 1 < M:
                nxt = head(hidden[:, m]).argmax(-1).to(self.device)
        return toks, hidden

    @contextlib.contextmanager
    def _sdpa(self):
        """Run the model with sdpa attention inside this block, whatever it was loaded with.

        Under flex_attention transformers passes a dense 4D mask through as a score_mod (`score + mask[b][0][q][kv]`,
        integrations/flex_attention.py `flex_attention_forward`): no block sparsity, recompiles as the shapes change
        (relabel shapes vary per chunk and greedy step), and on CPU (torch 2.13) a segfault in the compiled kernel.
        Dense masks and generate therefore go through sdpa: the attention function and the mask builders are looked
        up from `config._attn_implementation` at every forward, so switching it is enough (the actor runs one call
        at a time). A model loaded with sdpa (or eager, where it has no sdpa) is left as it is."""
        config = self.model.config
        before = config._attn_implementation
        if before != "flex_attention":
            yield
            return
        config._attn_implementation = "sdpa"  # the setter also sets the sub-configs
        try:
            yield
        finally:
            config._attn_implementation = before

    def _bias(self, allowed: Tensor) -> Tensor:
        """[q, k] bool → additive [1, 1, q, k] float mask (sdpa; eager + bool 4D masks are silently wrong)."""
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return bias.masked_fill_(~allowed, torch.finfo(self.dtype).min)[None, None]
