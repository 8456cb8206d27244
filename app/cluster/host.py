"""The node's side of shard ownership: catch a shard up, serve it, hand it over, drop it.

    keeper (its thread) --ShardEvent--> host (the main loop)
      acquired(n, epoch): store caught up past the epoch marker -> writes allowed ->
                          subscribe to shard n -> resume its unfinished sagas
      drain(n):           unsubscribe -> wait for its actors' turns -> forget them ->
                          delete the lease (the next owner need not wait for the TTL)
      lost(n):            unsubscribe -> forget its actors (their queued commands get
                          `unavailable`; a write the lease check missed is refused by
                          the log if another owner wrote the entity since)

Events are handled one at a time, in order, so a shard's own events never overtake
each other. While a shard moves, a command for it finds no subscriber (no responders)
or an owner that is not ready (`unavailable`): never a write made on a stale state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup, TaskStatus

from kaya.actors import ActorRuntime
from kaya.actors.saga import SagaDriver
from kaya.actors.wire import shard_of
from kaya.app.cluster.follower import Follower
from kaya.app.cluster.journal import Journal
from kaya.app.cluster.leases import LeaseKeeper, ShardEvent
from kaya.app.ingress import Ingress

log = logging.getLogger("kaya.cluster")

CATCH_UP_TIMEOUT = 60.0
"""Seconds a new owner may take to bring its store past the epoch marker; beyond it the
shard is let go (another node, or this one later, tries again)."""
DRAIN_TIMEOUT = 10.0
"""Seconds a handover waits for the shard's turns in flight before it lets go anyway."""


class ShardHost:
    """Applies the keeper's decisions to the ingress, the actors and the sagas."""

    def __init__(
        self,
        keeper: LeaseKeeper,
        ingress: Ingress,
        runtime: ActorRuntime,
        sagas: SagaDriver,
        *,
        shards: int,
        journal: Journal | None = None,
        follower: Follower | None = None,
        resume_sagas: bool = True,
    ) -> None:
        """`resume_sagas`: wake a shard's unfinished sagas when it arrives (a cluster);
        a single node resumes them all at start instead."""
        self._resume_sagas = resume_sagas
        self._served = anyio.Event()
        self._keeper = keeper
        self._ingress = ingress
        self._runtime = runtime
        self._sagas = sagas
        self._shards = shards
        self._journal = journal
        self._follower = follower
        self._send, self._events = anyio.create_memory_object_stream[ShardEvent](
            max_buffer_size=4 * shards + 16  # at most a few events per shard are ever queued
        )
        self.serving: set[int] = set()
        self._singletons: dict[str, Callable[..., Awaitable[None]]] = {}
        self._running: dict[str, anyio.CancelScope] = {}
        self._tg: TaskGroup | None = None
        self.handovers = 0
        self.catch_up_seconds: list[float] = []

    def notify_from(self, loop_call: Callable[..., object]) -> Callable[[ShardEvent], None]:
        """The keeper's `notify`: hands each event to this loop (`call_soon_threadsafe`)."""

        def notify(event: ShardEvent) -> None:
            loop_call(self._deliver, event)

        return notify

    def _deliver(self, event: ShardEvent) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait(event)  # else the node is stopping: its shards go with it

    def _belongs(self, shard: int) -> Callable[[str, str], bool]:
        return lambda entity, entity_id: shard_of(self._shards, entity, entity_id) == shard

    def once_per_cluster(self, name: str, run: Callable[..., Awaitable[None]]) -> None:
        """Run `run` (a consumer runner's) only while this node holds the consumer's lease."""
        self._singletons[name] = run

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            async with self._send, self._events:
                async for event in self._events:
                    try:
                        await self._handle(event)
                    except Exception:
                        log.exception("shard %d: handling %s failed", event.shard, event.kind)
                        if event.shard >= 0:
                            self._keeper.give_up(event.shard)
            tg.cancel_scope.cancel()

    async def _singleton(self, name: str, run: Callable[..., Awaitable[None]]) -> None:
        with anyio.CancelScope() as scope:
            self._running[name] = scope
            try:
                await run()
            finally:
                if self._running.get(name) is scope:
                    del self._running[name]

    async def _handle(self, event: ShardEvent) -> None:
        n = event.shard
        if event.kind == "run":
            run = self._singletons.get(event.name)
            if run is not None and event.name not in self._running and self._tg is not None:
                self._tg.start_soon(self._singleton, event.name, run)
        elif event.kind == "stop":
            scope = self._running.pop(event.name, None)
            if scope is not None:
                scope.cancel()
        elif event.kind == "acquired":
            await self._acquired(n, event.epoch)
        elif event.kind == "drain":
            await self._drop(n)
            with anyio.move_on_after(DRAIN_TIMEOUT):
                await self._runtime.quiesce(self._belongs(n))
            self._runtime.unload(self._belongs(n))
            self._keeper.released(n)
            self.handovers += 1
            log.info("shard %d: handed over to %s", n, event.to)
        else:  # lost
            await self._drop(n)
            self._runtime.unload(self._belongs(n))

    async def _acquired(self, n: int, epoch: int) -> None:
        started = anyio.current_time()
        if self._follower is not None and epoch:
            with anyio.fail_after(CATCH_UP_TIMEOUT):
                await self._follower.wait_for(epoch)
        self._runtime.unload(self._belongs(n))  # another owner may have written since
        if self._journal is not None:
            self._journal.acquired(n)
        await self._ingress.serve_shard(n)
        self.serving.add(n)
        self._served.set()
        self._served = anyio.Event()
        self._keeper.serving(n)
        took = anyio.current_time() - started
        self.catch_up_seconds.append(took)
        log.info("shard %d: serving (epoch %d, caught up in %.3fs)", n, epoch, took)
        if self._resume_sagas:
            await self._sagas.resume(self._belongs(n))

    async def first_round_served(self, shards: set[int]) -> None:
        """Until every shard in `shards` is served (or was lost meanwhile: not waited for)."""
        while not shards <= self.serving:
            shards = {n for n in shards if self._keeper.leases.get(n) is not None}
            if shards <= self.serving:
                return
            await self._served.wait()

    async def _drop(self, n: int) -> None:
        self.serving.discard(n)
        await self._ingress.drop_shard(n)

    async def drain_all(self) -> None:
        """Graceful shutdown: stop serving every shard; the keeper then deletes the
        leases, and the other nodes take them at their next round, not after the TTL."""
        for n in sorted(self.serving):
            await self._drop(n)
