"""Place the frozen target as Ray actors (one per device or device group) in a placement group."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import ray

from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.hf_backend import HFTarget, TargetConfig
from actors.protocol import TargetInfo
from actors.vllm_backend import VLLMTarget

START_TIMEOUT_S = 900  # converting a large checkpoint on first use can take minutes
# Set on autoscaling clusters, whose nodes of a type start only once a request waits for them: there a bundle that
# no current node can hold is not an error, so placement waits (up to START_TIMEOUT_S) instead of failing at once.
WAIT_ENV = "AERIE_WAIT_FOR_NODES"
_EPS = 1e-6  # Ray keeps resources to 1e-4; compare with slack



def check_agree(infos: list[TargetInfo], cfg: TargetConfig) -> None:
    """Every target actor must serve the same model in the same dtype; raises RuntimeError naming the difference."""
    if all(i == infos[0] for i in infos[1:]):
        return
    dtypes = sorted({i.dtype for i in infos})
    if len(dtypes) > 1 and all(replace(i, dtype=infos[0].dtype) == infos[0] for i in infos[1:]):
        raise RuntimeError(f"target.dtype={cfg.dtype!r} resolved to {' and '.join(dtypes)} on different target "
                           "nodes (not every node multiplies bf16 natively); set target.dtype to one of them so that "
                           "every actor computes the same features")
    raise RuntimeError(f"target actors disagree about the model: {infos}")


def target_bundles(cfg: TargetConfig) -> list[dict[str, float]]:
    """One placement-group bundle per target actor: its CPUs, its GPUs (all on one node: a multi-GPU target spans
    the GPUs of one bundle) and its custom resources."""
    bundle = {"CPU": cfg.cpus_per_actor, **({"GPU": cfg.gpus_per_actor} if cfg.gpus_per_actor else {}),
              **(cfg.resources or {})}
    return [dict(bundle) for _ in range(cfg.num_actors)]


def check_placeable(bundles: list[dict[str, float]], what: str, nodes: list[dict] | None = None) -> None:
    """Raise ValueError at once if the alive nodes can never hold `bundles`, instead of a placement wait that ends
    in a timeout.

    nodes: `ray.nodes()`-style dicts (default: the live cluster's). Two checks, both necessary for any placement, so
    neither rejects a placeable request: each bundle fits the total resources of some single node (a bundle never
    spans nodes), and each resource summed over the bundles fits the cluster's total. Totals, not what is free now:
    resources held by other work come back, so waiting is right for those. `what` names the request and the config
    keys that size it, e.g. "target actors (target.gpus_per_actor, ...)". With $AERIE_WAIT_FOR_NODES=1 (autoscaling
    clusters, where missing node types start on demand) nothing is checked.
    """
    if os.environ.get(WAIT_ENV, "") not in ("", "0"):
        return
    if nodes is None:
        nodes = ray.nodes()
    alive = [n for n in nodes if n["Alive"]]
    totals = [n["Resources"] for n in alive]
    offer = "; ".join(f"{n['NodeManagerAddress']}: {_fmt(t)}" for n, t in zip(alive, totals)) or "none"
    fix = (f"Fix: lower the request in {what}, or add nodes that offer it (`ray start --num-cpus/--num-gpus/"
           f"--resources`, or a node type of the cluster YAML or KubeRay spec); on an autoscaling cluster that starts "
           f"such nodes on demand, set {WAIT_ENV}=1 to wait for them instead.")
    for b in {tuple(sorted(b.items())): b for b in bundles}.values():
        need = {k: v for k, v in b.items() if v > 0}
        if any(all(t.get(k, 0.0) + _EPS >= v for k, v in need.items()) for t in totals):
            continue
        short = {k: v for k, v in need.items() if not any(t.get(k, 0.0) + _EPS >= v for t in totals)}
        if short:
            missing = ", ".join(f"{k}: {v:g} (most on one node: {max((t.get(k, 0.0) for t in totals), default=0):g})"
                                for k, v in short.items())
            raise ValueError(f"cannot place {what}: no node offers {missing}. Each bundle is {_fmt(need)}, on one "
                             f"node. Cluster nodes offer: {offer}. {fix}")
        raise ValueError(f"cannot place {what}: no single node offers all of {_fmt(need)} together (each resource "
                         f"exists, but on different nodes). Cluster nodes offer: {offer}. {fix}")
    asked: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            asked[k] = asked.get(k, 0.0) + v
    over = {k: v for k, v in asked.items() if v > sum(t.get(k, 0.0) for t in totals) + _EPS}
    if over:
        have = ", ".join(f"{k}: {v:g} asked, {sum(t.get(k, 0.0) for t in totals):g} in the cluster"
                         for k, v in over.items())
        alike = all(b == bundles[0] for b in bundles)
        asks = f"{len(bundles)} bundle(s)" + (f" of {_fmt(bundles[0])}" if alike else "")
        raise ValueError(f"cannot place {what}: {asks} need more than the whole cluster has ({have}). Cluster nodes "
                         f"offer: {offer}. {fix}")


def _fmt(resources: dict[str, float]) -> str:
    """Resources as 'CPU: 4, GPU: 1, target: 1' (Ray's bookkeeping entries node:*, memory, ... left out)."""
    skip = ("node:", "accelerator_type:")
    shown = {k: v for k, v in resources.items()
             if not k.startswith(skip) and k not in ("memory", "object_store_memory")}
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items(), key=lambda kv: (kv[0] not in ("CPU", "GPU"),
                                                                                       kv[0]))) or "nothing"


@dataclass
class TargetGroup:
    """The running target actors, their (common) TargetInfo and their placement group."""

    actors: list
    info: TargetInfo
    pg: PlacementGroup

    def shutdown(self) -> None:
        """Kill the actors and release their resources (the job may share its Ray with later jobs)."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)


def start_target_actors(cfg: TargetConfig) -> TargetGroup:
    """Start `cfg.num_actors` target actors and wait until each has loaded its model.

    A cluster that can never hold the bundles fails at once (`check_placeable`); a target that cannot load
    surfaces here with the actor's own error (not a hang). Ray restarts a target that dies later (`max_restarts`);
    the feature stream resends its in-flight requests.
    """
    bundles = target_bundles(cfg)
    check_placeable(bundles, f"{cfg.num_actors} target actor(s) (target.num_actors, target.cpus_per_actor, "
                             "target.gpus_per_actor, target.resources)")
    pg = placement_group(bundles, strategy="SPREAD" if cfg.gpus_per_actor else "PACK")
    ready, _ = ray.wait([pg.ready()], timeout=START_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        raise TimeoutError(
            f"could not reserve {cfg.num_actors} target bundle(s) of {bundles[0]} within {START_TIMEOUT_S}s; "
            f"cluster resources: {ray.cluster_resources()}"
        )
    actor_cls = ray.remote(VLLMTarget if cfg.backend == "vllm" else HFTarget)  # vllm is imported in the actor only
    actors = [
        actor_cls.options(
            name=None, max_restarts=cfg.max_restarts, max_task_retries=0, num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor, resources=cfg.resources or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(cfg, f"target-{i}", **({"pin": cfg.pin_cpus} if cfg.backend == "hf" else {}))
        for i in range(cfg.num_actors)
    ]
    try:
        infos = ray.get([a.info.remote() for a in actors], timeout=START_TIMEOUT_S)
        check_agree(infos, cfg)
    except BaseException as err:
        TargetGroup(actors, None, pg).shutdown()
        if isinstance(err, ray.exceptions.RayActorError):
            raise RuntimeError(f"target actor failed to start for model {cfg.model!r}: {err}") from err
        raise
    return TargetGroup(actors, infos[0], pg)
