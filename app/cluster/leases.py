"""Shard leases: who owns which shard, kept in the JetStream KV bucket KAYA_SHARDS.

    shard.<n>   {"node", "epoch", "state"}   the lease: create to acquire, update with the
                                              expected revision to renew, gone after the TTL
    node.<name> {"shards", "at"}             a node's heartbeat: who is alive
    move.<n>    {"to"}                       an operator's (or a rebalance's) handover

The bucket's max age is the lease TTL, so a lease nobody renews disappears by itself,
and `create` is the only way to take a shard: NATS decides who wins, nothing here votes.

The keeper runs on a thread of its own, with its own event loop and NATS connection:
a node's main loop can be busy for seconds (a big catch-up, a burst of load), and a
renewal that waits for it is how other systems lose leases they still use. A lease is
valid here until `renewal sent + TTL - margin`, measured before the request left: the
server counts the TTL from when it stored the renewal, later than that, so this node
stops serving a shard before any other node may take it. What the node does with a
shard (catch up, serve, drain) happens on the main loop, told by `ShardEvent`s.

Each new owner (replicated durability) publishes an epoch marker, `kaya.epoch.<n>`, into
KAYA_EVENTS; its stream sequence is the epoch. Everything earlier owners wrote is before
it in the stream, so a new owner serves once its store has passed it (follower.py).
Writes themselves are fenced per entity (journal.py): JetStream refuses one made on a
view another owner's write has overtaken, whatever the writer believes of its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from kaya.actors.wire import EVENTS_STREAM
from kaya.app.cluster.plan import View, plan

log = logging.getLogger("kaya.cluster")

BUCKET = "KAYA_SHARDS"
WATCHER_IDLE = 2.0
"""Seconds after which the server drops a table read's watcher consumer."""
MARGIN = 0.5
"""Seconds a lease is given up before its TTL would let another node take it."""


def epoch_subject(shard: int) -> str:
    return f"kaya.epoch.{shard}"


def bucket_config(ttl: float, replicas: int) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=BUCKET,
        description="Kaya: shard leases, node heartbeats, handovers (kaya shards)",
        history=1,
        ttl=ttl,
        storage=StorageType.FILE,
        replicas=replicas,
    )


async def ensure_bucket(nc: NATS, ttl: float, replicas: int) -> KeyValue:
    """The bucket, created on first use. One made with another TTL is used as it is (the
    TTL is fixed when a cluster is created, like the shard count), with a warning."""
    js = nc.jetstream()
    try:
        return await js.create_key_value(bucket_config(ttl, replicas))
    except nats.js.errors.BadRequestError as exc:
        log.warning("KAYA_SHARDS exists with other settings (%s); using it as it is", exc)
        return await js.key_value(BUCKET)


@dataclass(frozen=True)
class ShardEvent:
    """What the keeper tells the main loop about one shard."""

    kind: Literal["acquired", "drain", "lost", "run", "stop"]
    shard: int
    epoch: int = 0
    to: str = ""
    name: str = ""
    """`run`/`stop`: the consumer that runs once per cluster, on the holder of its lease."""


@dataclass
class Lease:
    revision: int
    epoch: int
    valid_until: float  # monotonic
    state: str = "catching-up"


@dataclass(frozen=True)
class LeaseSettings:
    node: str
    shards: int
    ttl: float
    renew_every: float
    max_moves: int
    exclusive: bool
    """Local durability: this node takes every shard and hands none over."""
    fenced: bool
    """Replicated durability: publish an epoch marker on each acquisition."""
    singletons: tuple[str, ...] = ()
    """Consumers that run on one node of the cluster at a time: a lease `consumer.<name>`
    each, taken by whichever node finds it free."""
    serves_shards: bool = True
    """False in a `kaya run --role consumers` process: it takes only consumer leases, and
    is no node of the shard plan (its `commands` twin is, under the same name)."""


@dataclass
class Table:
    """The bucket as a node last read it, for `kaya shards` and the plan."""

    owners: dict[int, tuple[str, int, str]] = field(default_factory=dict)  # node, epoch, state
    revisions: dict[str, int] = field(default_factory=dict)
    """Key -> its revision: what taking over an earlier run's lease updates."""
    nodes: set[str] = field(default_factory=set)
    moves: dict[int, str] = field(default_factory=dict)
    singletons: dict[str, str] = field(default_factory=dict)  # consumer -> node


async def read_table(kv: KeyValue) -> Table:
    """Every live key, read once through a watcher that stops after the current values."""
    table = Table()
    # a watcher is a consumer on the bucket's stream: let the server drop it soon after
    # (stopping it does not delete it, and a round a second would pile them up)
    watcher = await kv.watchall(ignore_deletes=True, inactive_threshold=WATCHER_IDLE)
    try:
        while True:
            entry = await watcher.updates(timeout=5.0)  # type: ignore[no-untyped-call]
            if entry is None:
                break
            if entry.value is None or entry.operation is not None:
                continue
            kind, _, name = entry.key.partition(".")
            try:
                value = orjson.loads(entry.value)
                if kind == "shard":
                    table.owners[int(name)] = (
                        str(value["node"]),
                        int(value.get("epoch", 0)),
                        str(value.get("state", "")),
                    )
                    table.revisions[entry.key] = entry.revision or 0
                elif kind == "node":
                    table.nodes.add(name)
                elif kind == "move":
                    table.moves[int(name)] = str(value["to"])
                elif kind == "consumer":
                    table.singletons[name] = str(value["node"])
                    table.revisions[entry.key] = entry.revision or 0
            except (ValueError, KeyError, TypeError):
                log.warning("KAYA_SHARDS: ignoring malformed %s", entry.key)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return table


async def request_move(kv: KeyValue, shard: int, to: str) -> None:
    await kv.put(f"move.{shard}", orjson.dumps({"to": to}))


class LeaseKeeper:
    """Takes, renews and hands over this node's shard leases, on a thread of its own."""

    def __init__(
        self,
        settings: LeaseSettings,
        servers: list[str],
        *,
        connect_options: dict[str, object] | None = None,
    ) -> None:
        self.settings = settings
        self._servers = servers
        self.notify: Callable[[ShardEvent], None] = lambda event: None
        """Called on the keeper's thread: it must hand over to the main loop
        (`loop.call_soon_threadsafe`) and return. Set before `start`."""
        self._options = connect_options or {}
        self.leases: dict[int, Lease] = {}
        self.singles: dict[str, Lease] = {}
        """The consumer leases held here (see LeaseSettings.singletons)."""
        """Read from the main loop (a dict read is atomic); written only on this thread."""
        self.table = Table()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._kv: KeyValue | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._started = threading.Event()
        self._stopped = threading.Event()
        self.error: BaseException | None = None
        self.conflict = ""
        """Why an exclusive (local durability) node could not take every shard."""
        self.rounds = 0
        self.first_taken: set[int] = set()
        """The shards taken in the first round: what a starting node serves before `ready`."""

    # ---- the main loop's side ------------------------------------------------------

    def owned(self, shard: int) -> int | None:
        """The epoch under which this node may serve `shard` right now, else None."""
        lease = self.leases.get(shard)
        if lease is None or lease.state == "draining" or time.monotonic() >= lease.valid_until:
            return None
        return lease.epoch

    def serving(self, shard: int) -> None:
        """The main loop caught the shard up and serves it (shown by `kaya shards`)."""
        self._call(self._set_state, shard, "serving")

    def released(self, shard: int) -> None:
        """The main loop drained `shard`: delete its lease so the next owner need not wait."""
        self._call(self._queue_release, shard)

    def give_up(self, shard: int) -> None:
        """The node cannot serve `shard` under its epoch (a write was refused, or its
        outcome is unknown): let go so it is caught up again, here or elsewhere."""
        self._call(self._give_up, shard)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def start(self, timeout: float) -> None:
        """Start the thread and wait for its first round (or its failure)."""
        self._thread = threading.Thread(target=self._main, name="kaya-leases", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"shard leases: no first round within {timeout:g}s")
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float = 10.0) -> None:
        """Delete every lease still held (after the main loop drained them) and stop."""
        self._call(self._begin_stop)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the keeper's thread -------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # the main loop sees it through `error`
            self.error = exc
            log.exception("shard leases stopped")
        finally:
            self._started.set()
            self._stopped.set()

    def _set_state(self, shard: int, state: str) -> None:
        lease = self.leases.get(shard)
        if lease is not None:
            lease.state = state
            if self._kv is not None:  # at once: `kaya shards move` waits for it
                task = asyncio.ensure_future(self._renew_one(self._kv, shard, lease))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _queue_release(self, shard: int) -> None:
        if self._kv is not None:
            self._tasks.add(task := asyncio.ensure_future(self._delete(self._kv, shard)))
            task.add_done_callback(self._tasks.discard)

    def _give_up(self, shard: int) -> None:
        lease = self.leases.get(shard)
        if lease is not None:
            self.notify(ShardEvent("lost", shard, lease.epoch))
            self._queue_release(shard)

    def _begin_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            log.warning("shard leases: nats: %r", exc)  # no traceback: the node's link says it

        nc = await nats.connect(
            self._servers,
            error_cb=on_error,
            name=f"{self.settings.node}-leases",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            **self._options,
        )
        try:
            kv = self._kv = await nc.jetstream().key_value(BUCKET)
            await self._round(nc, kv)
            self._started.set()
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.settings.renew_every)
                if self._stopping.is_set():
                    break
                try:
                    await self._round(nc, kv)
                except Exception as exc:  # NATS away: the leases lapse by their own deadline
                    log.warning("shard leases: round failed: %r", exc)
                    self._expire_lapsed()
            await self._release_all(kv)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _round(self, nc: NATS, kv: KeyValue) -> None:
        if not self.settings.serves_shards:
            await self._singletons(kv, await read_table(kv))
            self.rounds += 1
            return
        await self._renew(kv)
        me = self.settings.node
        beat = {"shards": sorted(self.leases), "at": time.time()}
        await kv.put(f"node.{me}", orjson.dumps(beat))
        self.table = table = await read_table(kv)
        table.nodes.add(me)
        owners = {n: owner for n, (owner, _, _) in table.owners.items()}
        for n in list(self.leases):  # the bucket says someone else holds it: not ours
            if owners.get(n, me) != me:
                self._lose(n, f"the bucket names {owners[n]} as its owner")
        # held under this node's name by an earlier run of it (a restart within the TTL):
        # taken over at once, under a new epoch that fences whatever that run still does
        stale = {
            n: table.revisions.get(f"shard.{n}", 0)
            for n, owner in owners.items()
            if owner == me and n not in self.leases
        }
        for n in stale:
            del owners[n]
        view = View(
            me=me,
            shards=self.settings.shards,
            owners=owners,
            nodes=frozenset(table.nodes),
            moves=table.moves,
        )
        decided = plan(view, max_moves=self.settings.max_moves, exclusive=self.settings.exclusive)
        for n in decided.take:
            took = await self._acquire(nc, kv, n, table.moves.get(n) == me, stale.get(n))
            if took and self.rounds == 0:
                self.first_taken.add(n)
        if self.settings.exclusive and not self.conflict:
            others = {o for n, (o, _, _) in table.owners.items() if o != me}
            if others:
                self.conflict = (
                    f"shards are held by {', '.join(sorted(others))}: a second node needs"
                    ' cluster.durability = "replicated" on every node'
                )
        await self._singletons(kv, table)
        for n, to in decided.hand_over.items():
            lease = self.leases.get(n)
            if lease is not None and lease.state != "draining":
                lease.state = "draining"
                await request_move(kv, n, to)
                log.info("shard %d: handing over to %s", n, to)
                self.notify(ShardEvent("drain", n, lease.epoch, to))
        self.rounds += 1

    async def _singletons(self, kv: KeyValue, table: Table) -> None:
        """Renew the consumer leases held, take the free ones (first come, first served)."""
        me = self.settings.node
        value = orjson.dumps({"node": me})
        for name, lease in list(self.singles.items()):
            if not await self._update(kv, f"consumer.{name}", value, lease):
                self._stop_single(name, "someone else holds it now")
            elif time.monotonic() >= lease.valid_until:
                self._stop_single(name, "not renewed within its TTL")
        for name in self.settings.singletons:
            holder = table.singletons.get(name)
            if name in self.singles or (holder is not None and holder != me):
                continue
            key = f"consumer.{name}"  # held by an earlier run of this node: taken over
            stale = table.revisions.get(key, 0) if holder is not None else None
            taken = await self._take(kv, key, value, stale)
            if taken is not None:
                self.singles[name] = taken
                log.info("consumer %s: runs on this node", name)
                self.notify(ShardEvent("run", -1, name=name))

    def _stop_single(self, name: str, why: str) -> None:
        del self.singles[name]
        log.warning("consumer %s: lease lost (%s); it stops here", name, why)
        self.notify(ShardEvent("stop", -1, name=name))

    async def _update(self, kv: KeyValue, key: str, value: bytes, lease: Lease) -> bool:
        """Renew one lease; False when someone else holds the key now. A renewal that does
        not reach NATS is logged, and the lease lapses by its own deadline if none does."""
        sent = time.monotonic()
        try:
            lease.revision = await kv.update(key, value, last=lease.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("%s: renewal failed: %r", key, exc)
            return True
        lease.valid_until = sent + self.settings.ttl - MARGIN
        return True

    async def _take(self, kv: KeyValue, key: str, value: bytes, stale: int | None) -> Lease | None:
        """A free key created, or one an earlier run of this node held (`stale`, its
        revision) updated; None if someone was quicker, or if the old lease expired while
        `create` looked at it: either way not ours this round."""
        sent = time.monotonic()
        try:
            if stale is None:
                revision = await kv.create(key, value)
            else:
                revision = await kv.update(key, value, last=stale)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            return None
        return Lease(revision=revision, epoch=0, valid_until=sent + self.settings.ttl - MARGIN)

    async def _renew(self, kv: KeyValue) -> None:
        for n, lease in list(self.leases.items()):
            await self._renew_one(kv, n, lease)
        self._expire_lapsed()

    async def _renew_one(self, kv: KeyValue, n: int, lease: Lease) -> None:
        if self.leases.get(n) is not lease:
            return  # released or lost meanwhile
        me = self.settings.node
        value = orjson.dumps({"node": me, "epoch": lease.epoch, "state": lease.state})
        if not await self._update(kv, f"shard.{n}", value, lease):
            self._lose(n, "someone else holds it now")

    def _expire_lapsed(self) -> None:
        now = time.monotonic()
        for n, lease in list(self.leases.items()):
            if now >= lease.valid_until:
                self._lose(n, "not renewed within its TTL")
        for name, lease in list(self.singles.items()):
            if now >= lease.valid_until:
                self._stop_single(name, "not renewed within its TTL")

    def _lose(self, shard: int, why: str) -> None:
        lease = self.leases.pop(shard, None)
        if lease is not None:
            log.warning("shard %d: lease lost (%s)", shard, why)
            self.notify(ShardEvent("lost", shard, lease.epoch))

    async def _acquire(
        self, nc: NATS, kv: KeyValue, shard: int, moved_to_me: bool, stale: int | None
    ) -> bool:
        me = self.settings.node
        value = orjson.dumps({"node": me, "epoch": 0, "state": "catching-up"})
        lease = await self._take(kv, f"shard.{shard}", value, stale)
        if lease is None:
            return False
        revision = lease.revision
        if self.settings.fenced:
            ack = await nc.jetstream().publish(
                epoch_subject(shard),
                orjson.dumps({"node": me, "lease": revision}),
                stream=EVENTS_STREAM,
            )
            lease.epoch = ack.seq
            value = orjson.dumps({"node": me, "epoch": lease.epoch, "state": "catching-up"})
            lease.revision = await kv.update(f"shard.{shard}", value, last=revision)
        if moved_to_me:
            with contextlib.suppress(nats.errors.Error):
                await kv.delete(f"move.{shard}")
        self.leases[shard] = lease
        log.info("shard %d: acquired (epoch %d)", shard, lease.epoch)
        self.notify(ShardEvent("acquired", shard, lease.epoch))
        return True

    async def _delete(self, kv: KeyValue, shard: int) -> None:
        lease = self.leases.pop(shard, None)
        if lease is None:
            return
        try:  # only our revision: never delete a lease someone else took meanwhile
            await kv.delete(f"shard.{shard}", last=lease.revision)
            log.info("shard %d: released", shard)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("shard %d: release failed (%r); it lapses by its TTL", shard, exc)

    async def _release_all(self, kv: KeyValue) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for n in list(self.leases):
            await self._delete(kv, n)
        for name, lease in list(self.singles.items()):
            with contextlib.suppress(Exception):
                await kv.delete(f"consumer.{name}", last=lease.revision)
        with contextlib.suppress(Exception):
            await kv.delete(f"node.{self.settings.node}")
