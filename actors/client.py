"""The client a train worker uses to stream target features: several requests in flight over all target actors.

Deterministic: batches come out in the order they were given, whatever actor answered first. Fault tolerant: a
request whose actor died is sent again (to the least-loaded live actor; Ray restarts the dead one in the
background, and it gets requests again once it answers a ping: an actor whose node is gone may never come back),
and every resend is counted, so each batch is delivered exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayActorError

from actors.protocol import RegenRequest, RelabelRequest, RelabelResult, TargetBatch
from eagle3.data import Batch

# A request is sent again when its actor died, or when its answer died with the node that held it (the actor ran
# the request, but the result sat in that node's object store; actor tasks cannot be re-executed by Ray itself).
ACTOR_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError, ObjectLostError)
RESTART_TIMEOUT_S = 900  # a restarted target reloads its weights
HEALTH_CHECK_S = 5.0  # a request unanswered this long makes the stream ask Ray whether its actor is alive
DEAD_AFTER_FAILED_PINGS = 10  # a restarting actor's ping waits; one that fails this often (1/s) is gone for good


def actor_state(actor) -> str | None:
    """Ray's view of an actor: ALIVE, RESTARTING, DEAD, ...; None if it cannot be read.

    Reads the GCS actor table directly (ray._private.state): the public state API goes through the dashboard, which
    a cluster may run without."""
    try:
        from ray._private.state import actors

        return actors(actor_id=actor._actor_id.hex())["State"]
    except Exception:  # noqa: BLE001 - best effort: the caller then keeps waiting as before
        return None


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
        # Actors that failed a request: index -> (pending ping or None, when to ping again, failed pings in a row).
        self._down: dict[int, tuple[ray.ObjectRef | None, float, int]] = {}

    def _submit(self, i: int) -> None:
        a = self._pick(i)
        req, actor = self.batches[i], self.actors[a]
        ref = actor.regenerate.remote(req) if isinstance(req, RegenRequest) else actor.forward.remote(req)
        self._inflight[ref] = (i, a)
        self._load[a] += 1
        self.stats.requests += 1

    def _pick(self, i: int) -> int:
        """The least-loaded live actor (ties by the staggered round robin). An actor whose request failed is down
        until its ping answers: a call to an actor that Ray cannot restart (its node is gone and no other node has
        room for its bundle) would wait forever. With every actor down, wait for the first to come back."""
        self._refresh_down(timeout=0)
        n = len(self.actors)
        order = [(self.offset + i + j) % n for j in range(n) if (self.offset + i + j) % n not in self._down]
        if not order:
            self._wait_any_up()
            return self._pick(i)
        return min(order, key=lambda j: self._load[j])

    def _mark_down(self, a: int) -> None:
        if a not in self._down:
            self._down[a] = (self.actors[a].ping.remote(), 0.0, 0)  # answers once Ray has restarted it

    def _refresh_down(self, timeout: float) -> None:
        """Bring back the down actors whose ping answered. A failed ping is sent again a second later: one sent
        before Ray noticed the death fails like the requests did, while one sent to a restarting actor waits."""
        now = time.monotonic()
        for a, (ref, retry_at, fails) in list(self._down.items()):
            if ref is None and now >= retry_at:
                self._down[a] = (self.actors[a].ping.remote(), 0.0, fails)
        pending = [ref for ref, _, _ in self._down.values() if ref is not None]
        if not pending:
            time.sleep(timeout)
            return
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout)
        for a, (ref, _, fails) in list(self._down.items()):
            if ref is None or ref not in ready:
                continue
            try:
                ray.get(ref)
                del self._down[a]  # restarted (or alive after all)
            except ACTOR_FAILURES:
                self._down[a] = (None, time.monotonic() + 1.0, fails + 1)

    def _wait_any_up(self) -> None:
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while len(self._down) == len(self.actors):
            if all(fails >= DEAD_AFTER_FAILED_PINGS for _, _, fails in self._down.values()):
                raise RuntimeError(f"every target actor is dead: each failed {DEAD_AFTER_FAILED_PINGS} pings in a "
                                   f"row (max_restarts spent, or the actor crashes on start; see its log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"all {len(self.actors)} target actors are down and none came back within "
                                   f"{RESTART_TIMEOUT_S}s (no node has room to restart them?)")
            self._refresh_down(timeout=1.0)

    def __iter__(self) -> Iterator[TargetBatch]:
        nxt_submit = 0
        for i in range(len(self.batches)):
            while nxt_submit < len(self.batches) and len(self._inflight) + len(self._done) < self.depth:
                self._submit(nxt_submit)
                nxt_submit += 1
            t0 = time.perf_counter()
            while i not in self._done:
                ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=HEALTH_CHECK_S)
                if ready:
                    self._collect(ready[0])
                else:
                    self._check_health()
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
            self._mark_down(a)
            self._submit(i)

    def _check_health(self) -> None:
        """Resend the requests of actors that Ray reports as not alive. A call to an actor whose node died waits in
        Ray's queue until the actor restarts, which may be never (no other node has room for its bundle), so a
        stream whose requests take long asks Ray where its actors stand."""
        busy = {a for _, a in self._inflight.values()} - set(self._down)
        for a in busy:
            if actor_state(self.actors[a]) not in ("RESTARTING", "DEAD"):  # a slow start is not a failure
                continue
            self._mark_down(a)
            for ref, (i, b) in list(self._inflight.items()):
                if b == a:  # its answer, should it ever come, is dropped with the ref
                    del self._inflight[ref]
                    self._load[a] -= 1
                    self.stats.resent += 1
                    self._submit(i)

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

    def _get(self, ref: ray.ObjectRef, a: int) -> RelabelResult:
        """ray.get, except that an actor Ray reports as restarting or dead counts as failed (see FeatureStream)."""
        while True:
            ready, _ = ray.wait([ref], timeout=HEALTH_CHECK_S)
            if ready:
                return ray.get(ref)
            if (state := actor_state(self.actors[a])) in ("RESTARTING", "DEAD"):
                raise ActorUnavailableError(f"target actor {a} is {state}", None)

    def result(self, ticket: tuple[ray.ObjectRef, int, RelabelRequest]) -> RelabelResult:
        """Block until the relabel is done; resend to the next actor if the one it went to failed."""
        ref, a, request = ticket
        t0 = time.perf_counter()
        for attempt in range(self.max_resends + 1):
            try:
                out: RelabelResult = self._get(ref, a)
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
