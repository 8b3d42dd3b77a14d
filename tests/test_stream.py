"""Streaming client over real target actors: order, N:M spreading, resends when an actor dies, load errors."""

from __future__ import annotations

import time

import pytest
import torch

from actors.client import FeatureStream
from actors.hf_backend import HFTarget, TargetConfig
from actors.models import TINY
from eagle3.data import Sample, collate


class SlowTarget(HFTarget):
    """A target whose requests stay in flight long enough to be caught by a kill."""

    def forward(self, batch):
        time.sleep(0.4)
        return super().forward(batch)


def make_batches(n=10):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ln = 5 + i % 4
        s = Sample(sample_id=f"s{i}", input_ids=torch.randint(0, 300, (ln,), generator=g),
                   loss_mask=torch.ones(ln, dtype=torch.bool))
        out.append(collate([s], pad_token_id=0))
    return out


@pytest.fixture(scope="module")
def reference():
    """Features computed in-process, the independent reference for what the stream delivers."""
    target = HFTarget(TargetConfig(model=TINY))
    return [target.forward(b) for b in make_batches()]


def check_same(delivered, reference):
    assert [d.batch.sample_ids for d in delivered] == [r.batch.sample_ids for r in reference]
    for d, r in zip(delivered, reference):
        assert torch.equal(d.aux_hidden, r.aux_hidden) and torch.equal(d.last_hidden, r.last_hidden)


def test_stream_in_order_over_two_actors(ray_local, reference):
    ray = ray_local
    actors = [ray.remote(HFTarget).options(num_cpus=0.5).remote(TargetConfig(model=TINY), f"t{i}") for i in range(2)]
    stream = FeatureStream(actors, make_batches(), depth=3)
    got = list(stream)
    check_same(got, reference)
    assert stream.stats.batches == 10 and stream.stats.requests == 10 and stream.stats.resent == 0
    assert set(stream.stats.per_actor) == {"t0", "t1"}  # both actors served
    h = reference[0].aux_hidden.shape[-1] // 3
    tokens = sum(int(b.batch.attention_mask.sum()) for b in reference)
    assert stream.stats.wire_bytes == tokens * 8 * h  # bf16 floor: (3h + h) * 2 bytes; no padding in 1-row batches
    for a in actors:
        ray.kill(a)


def test_dead_actor_requests_are_resent(ray_local, reference):
    ray = ray_local
    actors = [ray.remote(SlowTarget).options(num_cpus=0.5, max_restarts=1, max_task_retries=0)
              .remote(TargetConfig(model=TINY), f"t{i}") for i in range(2)]
    ray.get([a.ping.remote() for a in actors])
    stream = FeatureStream(actors, make_batches(), depth=4)
    got = []
    for i, tb in enumerate(stream):
        got.append(tb)
        if i == 0:
            ray.kill(actors[0], no_restart=False)  # its in-flight requests fail; Ray restarts it
    check_same(got, reference)  # every batch exactly once, in order, with correct features
    assert stream.stats.resent >= 1
    assert stream.stats.requests == 10 + stream.stats.resent
    for a in actors:
        ray.kill(a)


class NoComebackTarget(SlowTarget):
    """Restarts into a constructor that never returns: like an actor whose node died while no other node has room
    for its placement bundle, calls to it would wait forever."""

    def __init__(self, cfg, name, marker):
        import os

        if os.path.exists(marker):
            time.sleep(3600)
        open(marker, "w").close()
        super().__init__(cfg, name)


def test_an_actor_that_never_comes_back_gets_no_more_requests(ray_local, reference, tmp_path):
    ray = ray_local
    marker = str(tmp_path / "started")
    stuck = ray.remote(NoComebackTarget).options(num_cpus=0.5, max_restarts=1, max_task_retries=0).remote(
        TargetConfig(model=TINY), "t0", marker)
    alive = ray.remote(SlowTarget).options(num_cpus=0.5).remote(TargetConfig(model=TINY), "t1")
    ray.get([stuck.ping.remote(), alive.ping.remote()])
    stream = FeatureStream([stuck, alive], make_batches(), depth=4)
    got, t0 = [], time.time()
    for i, tb in enumerate(stream):
        got.append(tb)
        if i == 0:
            ray.kill(stuck, no_restart=False)
    check_same(got, reference)  # every batch exactly once, in order, all but the first served by the live actor
    assert stream.stats.resent >= 1 and stream.stats.per_actor.get("t1", 0) >= 9
    assert time.time() - t0 < 60  # nothing waited on the stuck actor
    for a in (stuck, alive):
        ray.kill(a, no_restart=True)


def test_every_actor_dead_fails_with_a_clear_error(ray_local):
    ray = ray_local
    actor = ray.remote(SlowTarget).options(num_cpus=0.5, max_restarts=0).remote(TargetConfig(model=TINY), "t0")
    ray.get(actor.ping.remote())
    stream = FeatureStream([actor], make_batches(4), depth=2)
    it = iter(stream)
    next(it)
    ray.kill(actor, no_restart=True)
    with pytest.raises(RuntimeError, match="every target actor is dead"):
        list(it)


def test_target_that_cannot_load_fails_on_the_driver(ray_local, tmp_path):
    from jobs.targets import start_target_actors

    t0 = time.time()
    with pytest.raises(RuntimeError, match="(?s)target actor failed to start.*not found: give a local HF folder"):
        start_target_actors(TargetConfig(model=str(tmp_path / "nope"), cpus_per_actor=0.5))
    assert time.time() - t0 < 120
