"""Place the frozen target as Ray actors (one per device or device group) in a placement group."""

from __future__ import annotations

import ray
from dataclasses import dataclass

from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.hf_backend import HFTarget, TargetConfig
from actors.protocol import TargetInfo
from actors.vllm_backend import VLLMTarget

START_TIMEOUT_S = 900  # converting a large checkpoint on first use can take minutes


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

    A target that cannot load surfaces here with the actor's own error (not a hang). Ray restarts a target that
    dies later (`max_restarts`); the feature stream resends its in-flight requests.
    """
    bundle = {"CPU": cfg.cpus_per_actor, **({"GPU": cfg.gpus_per_actor} if cfg.gpus_per_actor else {}),
              **(cfg.resources or {})}
    pg = placement_group([bundle] * cfg.num_actors, strategy="SPREAD" if cfg.gpus_per_actor else "PACK")
    ready, _ = ray.wait([pg.ready()], timeout=START_TIMEOUT_S)
    if not ready:
        raise TimeoutError(
            f"could not reserve {cfg.num_actors} target bundle(s) of {bundle} within {START_TIMEOUT_S}s; "
            f"cluster resources: {ray.cluster_resources()}"
        )
    actor_cls = ray.remote(VLLMTarget if cfg.backend == "vllm" else HFTarget)  # vllm is imported in the actor only
    actors = [
        actor_cls.options(
            name=None, max_restarts=cfg.max_restarts, max_task_retries=0, num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor, resources=cfg.resources or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(cfg, f"target-{i}")
        for i in range(cfg.num_actors)
    ]
    try:
        infos = ray.get([a.info.remote() for a in actors], timeout=START_TIMEOUT_S)
        if any(i != infos[0] for i in infos[1:]):
            raise RuntimeError(f"target actors disagree about the model: {infos}")
    except BaseException as err:
        TargetGroup(actors, None, pg).shutdown()
        if isinstance(err, ray.exceptions.RayActorError):
            raise RuntimeError(f"target actor failed to start for model {cfg.model!r}: {err}") from err
        raise
    return TargetGroup(actors, infos[0], pg)
