"""Target placement (bundles, the fail-fast placeability check) and the vLLM engine arguments, without vLLM."""

from __future__ import annotations

import time

import pytest
from transformers import LlamaConfig

from actors.hf_backend import TargetConfig
from actors.vllm_backend import engine_args, engine_env
from jobs import targets
from jobs.targets import WAIT_ENV, check_placeable, start_target_actors, target_bundles


def node(addr, alive=True, **resources):
    """A ray.nodes()-style entry, with the bookkeeping resources every real node also reports."""
    return {"NodeID": addr, "Alive": alive, "NodeManagerAddress": addr,
            "Resources": {**resources, f"node:{addr}": 1.0, "memory": 8e9, "object_store_memory": 2e9}}


CPU_NODE = node("10.0.0.1", CPU=4.0)
GPU_NODE = node("10.0.0.2", CPU=16.0, GPU=8.0, target=1.0)


# -- bundles ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus, want", [
    (0.0, {"CPU": 2.0}),  # CPU machines: no GPU entry
    (0.5, {"CPU": 2.0, "GPU": 0.5}),  # two actors share one GPU
    (1.0, {"CPU": 2.0, "GPU": 1.0}),
    (4.0, {"CPU": 2.0, "GPU": 4.0}),  # one big target over 4 GPUs of one node: one bundle, never split
])
def test_one_bundle_per_actor(gpus, want):
    cfg = TargetConfig(num_actors=3, cpus_per_actor=2.0, gpus_per_actor=gpus)
    assert target_bundles(cfg) == [want] * 3
    with_res = target_bundles(TargetConfig(num_actors=1, cpus_per_actor=2.0, gpus_per_actor=gpus,
                                           resources={"target": 1.0}))
    assert with_res == [{**want, "target": 1.0}]


def test_start_target_actors_asks_ray_for_the_bundles(monkeypatch):
    """What start_target_actors hands to the check and to Ray's placement_group, per gpus_per_actor."""
    asked = []

    class Stop(Exception):
        pass

    def fake_pg(bundles, strategy):
        asked.append((bundles, strategy))
        raise Stop

    monkeypatch.setattr(targets, "check_placeable", lambda bundles, what, nodes=None: asked.append((bundles, what)))
    monkeypatch.setattr(targets, "placement_group", fake_pg)
    for gpus, strategy in ((0.0, "PACK"), (2.0, "SPREAD")):
        asked.clear()
        cfg = TargetConfig(num_actors=2, cpus_per_actor=4.0, gpus_per_actor=gpus, resources={"target": 1.0})
        with pytest.raises(Stop):
            start_target_actors(cfg)
        bundle = {"CPU": 4.0, **({"GPU": gpus} if gpus else {}), "target": 1.0}
        (checked, what), (placed, got_strategy) = asked
        assert checked == placed == [bundle, bundle] and got_strategy == strategy
        assert "target.gpus_per_actor" in what


@pytest.mark.parametrize("gpus", [1.5, 2.5])
def test_gpus_per_actor_fraction_only_below_one(gpus):
    with pytest.raises(ValueError, match=rf"target.gpus_per_actor={gpus}: use a fraction below 1"):
        TargetConfig(gpus_per_actor=gpus)
    for ok in (0.25, 1.0, 8.0):
        assert TargetConfig(gpus_per_actor=ok).gpus_per_actor == ok


# -- check_placeable -------------------------------------------------------------------------------------------------
def test_placeable_requests_pass():
    check_placeable([{"CPU": 1.0}] * 4, "x", [CPU_NODE])  # exactly the cluster's CPUs
    check_placeable([{"CPU": 4.0, "GPU": 2.0, "target": 1.0}], "x", [CPU_NODE, GPU_NODE])
    check_placeable([{"CPU": 0.5, "GPU": 0.25}] * 32, "x", [GPU_NODE])  # fractions add up to 16 CPUs, 8 GPUs
    check_placeable([{"CPU": 1.0, "GPU": 0.0}], "x", [CPU_NODE])  # a zero request needs nothing


def test_gpu_bundle_on_cpu_nodes_names_the_resource_and_the_fix():
    with pytest.raises(ValueError) as err:
        check_placeable([{"CPU": 1.0, "GPU": 1.0}] * 2, "2 target actor(s) (target.gpus_per_actor)", [CPU_NODE])
    msg = str(err.value)
    assert "cannot place 2 target actor(s) (target.gpus_per_actor): no node offers GPU: 1 (most on one node: 0)" in msg
    assert "offer: 10.0.0.1: CPU: 4. Fix" in msg and "memory" not in msg  # without Ray's bookkeeping entries
    assert "set AERIE_WAIT_FOR_NODES=1" in msg and "ray start" in msg


def test_dead_nodes_offer_nothing():
    with pytest.raises(ValueError, match="no node offers GPU: 1"):
        check_placeable([{"GPU": 1.0}], "x", [CPU_NODE, node("10.0.0.3", alive=False, CPU=8.0, GPU=8.0)])


def test_bundle_larger_than_any_one_node():
    """12 CPUs exist in total, but a bundle lives on one node."""
    with pytest.raises(ValueError, match=r"no node offers CPU: 6 \(most on one node: 4\)"):
        check_placeable([{"CPU": 6.0}], "x", [CPU_NODE, node("10.0.0.4", CPU=4.0), node("10.0.0.5", CPU=4.0)])


def test_resources_on_different_nodes():
    nodes = [node("a", CPU=8.0, GPU=1.0), node("b", CPU=8.0, target=1.0)]
    with pytest.raises(ValueError, match="no single node offers all of CPU: 1, GPU: 1, target: 1 together"):
        check_placeable([{"CPU": 1.0, "GPU": 1.0, "target": 1.0}], "x", nodes)


def test_more_bundles_than_the_cluster_holds():
    with pytest.raises(ValueError, match=r"4 bundle\(s\) of CPU: 4, GPU: 4 need more than the whole cluster has "
                                         r"\(GPU: 16 asked, 8 in the cluster\)"):
        check_placeable([{"CPU": 4.0, "GPU": 4.0}] * 4, "x", [GPU_NODE])


def test_autoscaling_switch_waits_instead(monkeypatch):
    monkeypatch.setenv(WAIT_ENV, "1")
    check_placeable([{"GPU": 1.0}], "x", [CPU_NODE])  # the autoscaler may start a GPU node for it
    monkeypatch.setenv(WAIT_ENV, "0")
    with pytest.raises(ValueError):
        check_placeable([{"GPU": 1.0}], "x", [CPU_NODE])


def test_gpu_target_on_the_session_ray_fails_fast(ray_local):
    """The session Ray has 4 CPUs and no GPU: a GPU target fails in seconds, not after START_TIMEOUT_S, and leaves
    no placement group behind."""
    ray = ray_local
    check_placeable(target_bundles(TargetConfig(num_actors=4)), "target actors")  # the live nodes: 4 CPUs fit
    before = len(ray.util.placement_group_table())
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"cannot place 1 target actor\(s\) .*no node offers GPU: 1 "
                                         r"\(most on one node: 0\).*CPU: 4"):
        start_target_actors(TargetConfig(gpus_per_actor=1.0))
    assert time.monotonic() - t0 < 10
    assert len(ray.util.placement_group_table()) == before


# -- vLLM engine arguments -------------------------------------------------------------------------------------------
LLAMA31_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072)
TINY = LlamaConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=2048)
CAPTURE = [2, 16, 29, 32]


def vllm_cfg(**kw):
    return TargetConfig(backend="vllm", **kw)


@pytest.mark.parametrize("gpus, tp", [(0.5, 1), (1.0, 1), (2.0, 2), (8.0, 8)])
def test_tensor_parallel_is_the_actors_gpus(gpus, tp):
    args = engine_args(vllm_cfg(gpus_per_actor=gpus, vllm_gpu_memory_utilization=min(0.9, gpus)), "/m", LLAMA31_8B,
                       CAPTURE, on_cpu=False)
    assert args["tensor_parallel_size"] == tp
    # TP > 1: vLLM's own worker processes on the bundle's GPUs (its Ray executor wants one bundle per rank).
    assert args.get("distributed_executor_backend") == ("mp" if tp > 1 else None)


def test_gpu_memory_comes_from_config():
    args = engine_args(vllm_cfg(gpus_per_actor=1.0), "/m", LLAMA31_8B, CAPTURE, on_cpu=False)
    assert args["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in args
    args = engine_args(vllm_cfg(gpus_per_actor=1.0, vllm_gpu_memory_utilization=0.6, vllm_kv_cache_gib=4.0), "/m",
                       LLAMA31_8B, CAPTURE, on_cpu=False)
    assert args["gpu_memory_utilization"] == 0.6 and args["kv_cache_memory_bytes"] == 4 * 2**30


def test_cpu_sizes_the_kv_cache_not_a_memory_fraction():
    """On CPU, vLLM reads gpu_memory_utilization as a fraction of the machine's RAM: never pass it there."""
    args = engine_args(vllm_cfg(), "/m", TINY, [2, 3, 3, 6], on_cpu=True)
    assert args["kv_cache_memory_bytes"] == 2**30 and "gpu_memory_utilization" not in args
    assert args["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in args
    args = engine_args(vllm_cfg(vllm_kv_cache_gib=0.5, vllm_tensor_parallel_size=2), "/m", TINY, [2, 3, 6], True)
    assert args["kv_cache_memory_bytes"] == 2**29
    assert args["tensor_parallel_size"] == 2 and args["distributed_executor_backend"] == "mp"
    # The capture layers and the in-memory connector reach the engine as given.
    hf = args["speculative_config"]["draft_model_config"]["hf_config"]
    assert args["speculative_config"]["method"] == "extract_hidden_states" and hf == {
        "eagle_aux_hidden_state_layer_ids": [2, 3, 6]}
    assert args["kv_transfer_config"]["kv_connector_module_path"] == "actors.vllm_connector"
    assert args["enable_prefix_caching"] is False


def test_max_model_len():
    assert engine_args(vllm_cfg(), "/m", LLAMA31_8B, CAPTURE, on_cpu=False)["max_model_len"] == 8192
    assert engine_args(vllm_cfg(), "/m", TINY, CAPTURE, on_cpu=True)["max_model_len"] == 2048  # the model's own
    cfg = vllm_cfg(vllm_max_model_len=32768)
    assert engine_args(cfg, "/m", LLAMA31_8B, CAPTURE, on_cpu=False)["max_model_len"] == 32768
    with pytest.raises(ValueError, match="target.vllm_max_model_len=4096 exceeds builtin:tiny-llama's "
                                         "max_position_embeddings=2048: .* set at most 2048"):
        engine_args(vllm_cfg(vllm_max_model_len=4096), "/m", TINY, CAPTURE, on_cpu=True)


def test_defaults_start_llama31_8b_on_one_80gb_gpu():
    """Independent arithmetic of vLLM's memory plan for the defaults (bf16 Llama-3.1-8B, one 80 GB GPU): weights
    plus a KV cache that holds one max_model_len sequence (vLLM's start-up condition) fit in
    gpu_memory_utilization of the GPU with room for activations; the old max_model_len (131,072) did not fit the
    old 1 GiB KV budget."""
    c, bf16 = LLAMA31_8B, 2
    args = engine_args(vllm_cfg(dtype="bfloat16", gpus_per_actor=1.0, device="cuda"), "/m", c, CAPTURE, False)
    hd = c.hidden_size // c.num_attention_heads
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * hd * bf16 + len(CAPTURE) * c.hidden_size * bf16
    params = 8.03e9
    budget = args["gpu_memory_utilization"] * 80e9
    used = params * bf16 + args["max_model_len"] * per_token
    assert used < budget - 10e9, (used, budget)  # >= 10 GB left for activations and the profiler's peak
    assert 131072 * per_token > 2**30


def test_engine_env():
    cfg = vllm_cfg()
    assert engine_env(cfg, [0, 1], {}) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    tp2 = vllm_cfg(vllm_tensor_parallel_size=2)
    # vLLM's default binding wants one NUMA node per rank; a 2-core, 1-node machine gets one core per rank.
    assert engine_env(tp2, [0, 1], {})["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert engine_env(tp2, [0, 1, 2, 3, 4], {})["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(tp2, [0, 1], {"VLLM_CPU_OMP_THREADS_BIND": "0-1|2-3"})
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size=2 needs at least 2 CPU cores"):
        engine_env(tp2, [0], {})


def test_vllm_config_errors():
    with pytest.raises(ValueError, match=r"vllm_gpu_memory_utilization=0.9 is more than the target.gpus_per_actor"
                                         r"=0.5 share"):
        vllm_cfg(gpus_per_actor=0.5)
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size=4 but each actor has target.gpus_per_actor=2.0"):
        vllm_cfg(gpus_per_actor=2.0, vllm_tensor_parallel_size=4)
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization=1.5"):
        vllm_cfg(vllm_gpu_memory_utilization=1.5)


def test_targets_and_workers_together():
    """Each group fits alone; both at once (they run at the same time) do not."""
    target_b, workers = [{"CPU": 1.0, "GPU": 4.0}], [{"CPU": 1.0, "GPU": 1.0}] * 5
    check_placeable(target_b, "x", [GPU_NODE])
    check_placeable(workers, "x", [GPU_NODE])
    with pytest.raises(ValueError, match=r"6 bundle\(s\) need more than the whole cluster has \(GPU: 9 asked, 8 in"):
        check_placeable(target_b + workers, "x", [GPU_NODE])
