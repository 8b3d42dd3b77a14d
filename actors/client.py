"""The client a train worker uses to stream target features: several requests in flight over all target actors.

Deterministic: batches come out in the order they were given, whatever actor answered first. Fault tolerant: a
request whose actor died is sent again (to the least-loaded actor; Ray restarts the dead one in the background),
and every resend is counted, so each batch is delivered exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.protocol import RegenRequest, RelabelRequest, RelabelResult, TargetBatch
from eagle3.data import Batch

ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)
RESTART_TIMEOUT_S = 900  # a restarted target reloads its weights


@dataclass
class StreamStats:
    """Accounting of one stream (summed into metrics by the train loop)."""

    requests: int = 0  # forward/regenerate calls sent, resends included
    resent: int = 0  # requests sent again after their actor failed
    batches: int = 0  # batches delivered
    samples: int = 0  # samples delivered
    tokens: int = 0  # real (non-padding) tokens delivered
    wire_bytes: int = 0  # bytes of hidden states received
    wait_seconds: float = 0.0  # time the consumer blocked waiting for the target
    target_seconds: float = 0.0  # compute time reported by the actors
    generated_tokens: int = 0  # response tokens the targets wrote (online regeneration)
    generate_seconds: float = 0.0  # part of target_seconds spent writing them
    per_actor: dict[str, int] = field(default_factory=dict)  # batches served per actor


class FeatureStream:
    """Iterate `TargetBatch`es for `batches`, in order, keeping up to `depth` requests in flight.

    A `Batch` goes to the actors' `forward`; a `RegenRequest` to their `regenerate` (the target writes the
    responses first; the TargetBatch then carries the Batch it built).

    `offset` staggers the actor choice between train workers so that N targets : M trainers spread evenly.
    Backpressure: at most `depth` batches are requested ahead of the consumer.
    """

    def __init__(
        self, actors: Sequence, batches: Sequence[Batch] | Sequence[RegenRequest], *, depth: int = 2, offset: int = 0,
        max_resends: int = 8,
    ) -> None:
        if not actors:
            raise ValueError("FeatureStream needs at least one target actor")
        if depth < 1:
            raise ValueError(f"stream depth must be >= 1, got {depth}")
        self.actors, self.batches, self.depth = list(actors), batches, depth
        self.offset, self.max_resends = offset, max_resends
        self.stats = StreamStats()
        self._inflight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (batch index, actor index)
        self._load = [0] * len(self.actors)
        self._done: dict[int, TargetBatch] = {}
        self._resends: dict[int, int] = {}

    def _submit(self, i: int, avoid: int | None = None) -> None:
        n = len(self.actors)
        order = [(self.offset + i + j) % n for j in range(n)]
        if avoid is not None and n > 1:
            order.remove(avoid)
        a = min(order, key=lambda j: self._load[j])  # least loaded; ties by the staggered round robin
        if a == avoid:
            # The only actor just failed: wait for Ray to restart it instead of burning resends on it.
            self._wait_restarted(a)
        req, actor = self.batches[i], self.actors[a]
        ref = actor.regenerate.remote(req) if isinstance(req, RegenRequest) else actor.forward.remote(req)
        self._inflight[ref] = (i, a)
        self._load[a] += 1
        self.stats.requests += 1

    def _wait_restarted(self, a: int) -> None:
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(self.actors[a].ping.remote(), timeout=RESTART_TIMEOUT_S)
                return
            except ActorUnavailableError:  # still restarting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except RayActorError as err:
                raise RuntimeError(f"target actor {a} died and was not restarted (max_restarts spent?): {err}") from err

    def __iter__(self) -> Iterator[TargetBatch]:
        nxt_submit = 0
        for i in range(len(self.batches)):
            while nxt_submit < len(self.batches) and len(self._inflight) + len(self._done) < self.depth:
                self._submit(nxt_submit)
                nxt_submit += 1
            t0 = time.perf_counter()
            while i not in self._done:
                ready, _ = ray.wait(list(self._inflight), num_returns=1)
                self._collect(ready[0])
            self.stats.wait_seconds += time.perf_counter() - t0
            out = self._done.pop(i)
            self._account(out)
            yield out

    def _collect(self, ref: ray.ObjectRef) -> None:
        i, a = self._inflight.pop(ref)
        self._load[a] -= 1
        try:
            self._done[i] = ray.get(ref)
        except ACTOR_FAILURES as err:
            self._resends[i] = self._resends.get(i, 0) + 1
            if self._resends[i] > self.max_resends:
                raise RuntimeError(f"target request for batch {i} failed {self._resends[i]} times; last: {err}") from err
            self.stats.resent += 1
            self._submit(i, avoid=a)

    def _account(self, out: TargetBatch) -> None:
        s = self.stats
        s.batches += 1
        s.samples += sum(len(ids) for ids in out.batch.sample_ids)
        s.tokens += int(out.batch.attention_mask.sum())
        s.wire_bytes += out.wire_bytes
        s.target_seconds += out.target_seconds
        s.generated_tokens += out.generated_tokens
        s.generate_seconds += out.generate_seconds
        s.per_actor[out.actor] = s.per_actor.get(out.actor, 0) + 1


@dataclass
class RelabelStats:
    """Accounting of relabel requests (draft/target token feedback)."""

    requests: int = 0  # relabel calls sent, resends included
    resent: int = 0  # calls sent again after their actor failed
    answered: int = 0  # relabels received
    cache_hits: int = 0  # answers that reused the forward's prefix KV
    branch_tokens: int = 0  # extra target tokens computed for branches
    wait_seconds: float = 0.0  # time the trainer blocked waiting for relabels
    target_seconds: float = 0.0  # actor compute time


class RelabelClient:
    """Sends relabel requests to the actor that computed the batch's forward (its prefix KV is cached there);
    if that actor died, to another one (which recomputes the prefix). Results are awaited in submission order."""

    def __init__(self, actors: Sequence, max_resends: int = 8) -> None:
        self.actors, self.max_resends = list(actors), max_resends
        self.stats = RelabelStats()

    def _actor_index(self, name: str) -> int:
        # Target actors are named target-<i> by jobs.targets; anything else goes to actor 0.
        tail = name.rsplit("-", 1)[-1]
        return int(tail) % len(self.actors) if tail.isdigit() else 0

    def submit(self, tb: TargetBatch, request: RelabelRequest) -> tuple[ray.ObjectRef, int, RelabelRequest]:
        """Send `request` (branches of `tb`) to the actor that served `tb`; returns a ticket for `result`."""
        a = self._actor_index(tb.actor)
        self.stats.requests += 1
        return self.actors[a].relabel.remote(request), a, request

    def result(self, ticket: tuple[ray.ObjectRef, int, RelabelRequest]) -> RelabelResult:
        """Block until the relabel is done; resend to the next actor if the one it went to failed."""
        ref, a, request = ticket
        t0 = time.perf_counter()
        for attempt in range(self.max_resends + 1):
            try:
                out: RelabelResult = ray.get(ref)
                break
            except ACTOR_FAILURES as err:
                if attempt == self.max_resends:
                    raise RuntimeError(f"relabel failed {attempt + 1} times; last: {err}") from err
                self.stats.resent += 1
                self.stats.requests += 1
                a = (a + 1) % len(self.actors)
                time.sleep(min(2.0**attempt, 30.0))  # a lone actor may still be restarting
                ref = self.actors[a].relabel.remote(request)
        s = self.stats
        s.wait_seconds += time.perf_counter() - t0
        s.target_seconds += out.target_seconds
        s.answered += 1
        s.cache_hits += int(out.cache_hit)
        s.branch_tokens += int(out.tokens.numel())
        return out
