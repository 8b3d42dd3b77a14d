"""In-memory, device-agnostic variant of vLLM's ExampleHiddenStatesConnector (loaded by vLLM for VLLMTarget).

vLLM's `extract_hidden_states` speculative method writes each token's captured hidden states into a cache-only
KV layer; a KV connector reads them out when the request finishes. The stock connector copies on a CUDA stream
and writes safetensors files (CUDA-only, and Aerie never writes hidden states to disk). This subclass copies
synchronously on TP rank 0 (every rank holds the full, all-reduced states) and hands the copies to the scheduler
side through vLLM's worker → scheduler connector metadata, which vLLM carries back from worker processes under
tensor parallelism too. The scheduler side puts them in `CAPTURED`, a dict in the engine core's process that
`actors.vllm_backend.VLLMTarget` pops: the engine core must run in the caller's process
(VLLM_ENABLE_V1_MULTIPROCESSING=0); the model workers may be separate processes (tensor_parallel_size > 1).

Only requests whose `kv_transfer_params` carry `CAPTURE_KEY: True` are captured; generation requests free their
blocks at once. vLLM imports this module by path (`kv_connector_module_path`), so it may import vllm at the top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    ExampleHiddenStatesConnectorMetadata,
    PendingSave,
    extract_from_kv_cache,
)

from actors.vllm_backend import CAPTURE_KEY

CAPTURED: dict[str, Tensor] = {}  # engine request id -> [n_prompt_tokens, n_states, h] (engine dtype, CPU)


@dataclass
class CapturedStates(KVConnectorWorkerMetadata):
    """Worker → scheduler: the hidden states copied in one engine step (only TP rank 0 sends any)."""

    states: dict[str, Tensor] = field(default_factory=dict)  # request id -> [n, n_states, h] CPU

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, CapturedStates)
        return CapturedStates({**self.states, **other.states})


class InMemoryHiddenStatesConnector(ExampleHiddenStatesConnector):
    """Synchronous copy of the finished request's hidden states into `CAPTURED` (no files, no locks, no streams)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._outgoing: dict[str, Tensor] = {}  # worker side: copied this step, not yet sent to the scheduler

    # -- scheduler side --------------------------------------------------------------------------------------------
    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the blocks of capture requests until the worker copied them; hand the engine id back to the caller
        (LLM.generate reports it as RequestOutput.kv_transfer_params; the engine id carries a random suffix)."""
        if not (request.kv_transfer_params or {}).get(CAPTURE_KEY):
            self._request_filenames.pop(request.request_id, None)
            return False, None
        delay, _ = super().request_finished(request, block_ids)
        return delay, {CAPTURE_KEY: request.request_id}

    def update_connector_output(self, connector_output) -> None:
        """Receive the states the workers copied this step."""
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, CapturedStates):
            CAPTURED.update(meta.states)

    # -- worker side -----------------------------------------------------------------------------------------------
    def wait_for_save(self) -> None:
        """Nothing to wait for: no lock files, the copy in get_finished is synchronous."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        assert self._kv_cache is not None
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (blocks[:, None] * self._block_size + offsets[None, :]).flatten().to(self._kv_cache.device)
        n = pending.token_ids.shape[0]
        self._outgoing[pending.req_id] = extract_from_kv_cache(self._kv_cache, slots, n).to("cpu", copy=True)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """TP rank 0 copies the pending saves now and reports them sent at once, so the scheduler frees their blocks
        (the parent's get_finished_count() is 1: one report per request, from rank 0; other ranks report nothing)."""
        if not self._is_tp_rank_zero or not self.has_connector_metadata():
            return None, None
        meta = self._get_connector_metadata()
        if not isinstance(meta, ExampleHiddenStatesConnectorMetadata):
            return None, None
        for pending in meta.pending_saves:
            self._submit_async_write(pending)
        return {p.req_id for p in meta.pending_saves} or None, None

    def build_connector_worker_meta(self) -> CapturedStates | None:
        """The states copied in this step's get_finished, for the scheduler side (vLLM calls this right after)."""
        if not self._outgoing:
            return None
        out, self._outgoing = CapturedStates(self._outgoing), {}
        return out

