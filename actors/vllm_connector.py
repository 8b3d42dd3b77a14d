"""In-memory, device-agnostic variant of vLLM's ExampleHiddenStatesConnector (loaded by vLLM for VLLMTarget).

vLLM's `extract_hidden_states` speculative method writes each token's captured hidden states into a cache-only
KV layer; a KV connector reads them out when the request finishes. The stock connector copies on a CUDA stream
and writes safetensors files (CUDA-only, and Aerie never writes hidden states to disk). This subclass copies
synchronously into `CAPTURED`, a dict in this process that `actors.vllm_backend.VLLMTarget` pops: that needs the
engine and the worker in the caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one device, no TP).

Only requests whose `kv_transfer_params` carry `CAPTURE_KEY: True` are captured; generation requests free their
blocks at once. vLLM imports this module by path (`kv_connector_module_path`), so it may import vllm at the top.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    ExampleHiddenStatesConnectorMetadata,
    PendingSave,
    extract_from_kv_cache,
)

from actors.vllm_backend import CAPTURE_KEY

CAPTURED: dict[str, Tensor] = {}  # engine request id -> [n_prompt_tokens, n_states, h] (engine dtype, CPU)


class InMemoryHiddenStatesConnector(ExampleHiddenStatesConnector):
    """Synchronous copy of the finished request's hidden states into `CAPTURED` (no files, no locks, no streams)."""

    # -- scheduler side --------------------------------------------------------------------------------------------
    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the blocks of capture requests until the worker copied them; hand the engine id back to the caller
        (LLM.generate reports it as RequestOutput.kv_transfer_params; the engine id carries a random suffix)."""
        if not (request.kv_transfer_params or {}).get(CAPTURE_KEY):
            self._request_filenames.pop(request.request_id, None)
            return False, None
        delay, _ = super().request_finished(request, block_ids)
        return delay, {CAPTURE_KEY: request.request_id}

    # -- worker side -----------------------------------------------------------------------------------------------
    def wait_for_save(self) -> None:
        """Nothing to wait for: no lock files, the copy in get_finished is synchronous."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (blocks[:, None] * self._block_size + offsets[None, :]).flatten().to(self._kv_cache.device)
        n = pending.token_ids.shape[0]
        CAPTURED[pending.req_id] = extract_from_kv_cache(self._kv_cache, slots, n).to("cpu", copy=True)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Copy the pending saves now and report them sent at once, so the scheduler frees their blocks."""
        done: set[str] = set()
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, ExampleHiddenStatesConnectorMetadata):
                for pending in meta.pending_saves:
                    self._submit_async_write(pending)
                    done.add(pending.req_id)
        return done or None, None
