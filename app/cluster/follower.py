"""Every node's SQLite follows KAYA_EVENTS: in a cluster the log is the truth.

    KAYA_EVENTS (ordered consumer, from the checkpoint) -> events + replies + checkpoint
                                                            in one transaction a batch

With replicated durability a turn writes its events to the log only (journal.py); this
follower brings every event of every shard into the node's store, at the position of
its stream sequence, so positions mean the same on every node and a consumer's
checkpoint can be checked against any node's store. Partition recovery is then a
catch-up: a node that takes a shard waits until the follower has passed the shard's
new epoch marker: everything the previous owners wrote is before that marker, and an
old owner's late write after it is refused unless it follows the entity's last event
(journal.py), in which case the follower simply stores it in order.

Each node keeps the whole log, not only its shards: a shard can move to any node at
any time and be served after a short catch-up, and views read complete data on every
node. The cost is one SQLite insert per event per node.

Commands with a `Kaya-Command-Id` have their reply remembered here too, rebuilt from
the events that carry the id and the `Kaya-Request-Hash` header: a client retrying on
the new owner after a failover gets the first reply again, not a second effect.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from typing import Any

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from kaya.actors.retry import Backoff
from kaya.actors.wire import (
    EVENTS_STREAM,
    HEADER_COMMAND_ID,
    HEADER_ENTITY_VERSION,
    HEADER_EVENT_TYPE,
    HEADER_MSG_ID,
    HEADER_SCHEMA_VERSION,
    HEADER_TRACEPARENT,
    command_done,
)
from kaya.app.cluster.journal import HEADER_COMMAND_START, HEADER_REQUEST_HASH
from kaya.app.events.failing import Failing, PartHealth
from kaya.app.events.relay import RelayStatistics
from kaya.store import EventStore, StoreError

log = logging.getLogger("kaya.cluster")

CHECKPOINT = "follower"
BATCH = 1000
_INSERT_EVENT = (
    "INSERT INTO events (position, event_id, entity, entity_id, version, type, schema_version,"
    " data, recorded_at, command_id, traceparent)"
    " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS"
    " (SELECT 1 FROM events WHERE event_id = ? OR position = ?)"
)


class Follower:
    """Copies KAYA_EVENTS into the store, in stream order, from its checkpoint on."""

    def __init__(self, nc: NATS, store: EventStore) -> None:
        self._nc = nc
        self._store = store
        self.applied = 0
        """The last stream sequence the store holds (events and epoch markers alike)."""
        self._progress = anyio.Event()
        self._pending: list[Msg] = []
        self._arrived = anyio.Event()
        self._drained = anyio.Event()
        self.skipped = 0
        """Events the store refused (a gap in an entity's versions): logged, never silent."""
        self.imported = 0
        self._failing = Failing()

    # ---- in the relay's place: what health, status and metrics read -----------------

    @property
    def checkpoint(self) -> int:
        return self.applied

    @property
    def health(self) -> PartHealth:
        return self._failing.snapshot()

    def request_rewind(self) -> None:
        """Nothing to republish: the journal wrote to the log before answering."""

    async def wait_caught_up(self) -> None:
        """Nothing to flush at shutdown: the log already holds every answered command."""

    async def statistics(self) -> RelayStatistics:
        """As the relay's (health, status, metrics read one shape): `published` are the
        events this node's store took from the log, the backlog is what it has not."""
        return RelayStatistics(
            published=self.imported,
            duplicates=0,
            failures=self.skipped,
            checkpoint=self.applied,
            committed=self.applied,
            health=self._failing.snapshot(),
        )

    async def wait_for(self, seq: int) -> None:
        """Until the store holds everything up to stream sequence `seq`."""
        while self.applied < seq:
            await self._progress.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.applied = await self._store.checkpoint(CHECKPOINT)
        task_status.started()
        backoff = Backoff(initial=0.2, cap=5.0)
        while True:
            try:
                await self._follow()
            except (nats.errors.Error, StoreError, TimeoutError) as exc:
                attempt = self._failing.failed(exc)
                log.warning("follower: %r; resuming after %d", exc, self.applied)
                await backoff.sleep(attempt)

    async def _follow(self) -> None:
        js = self._nc.jetstream()

        async def on_msg(msg: Msg) -> None:
            self._pending.append(msg)
            self._arrived.set()
            if len(self._pending) >= 4 * BATCH:  # the store is behind: let NATS hold them
                await self._drained.wait()

        sub = await js.subscribe(
            ">",
            stream=EVENTS_STREAM,
            cb=on_msg,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.applied + 1,
            ),
        )
        try:
            while True:
                await self._arrived.wait()
                self._arrived = anyio.Event()
                while self._pending:
                    batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
                    await self._apply(batch)
                self._drained.set()
                self._drained = anyio.Event()
        finally:
            self._pending = []
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except nats.errors.Error:
                    log.debug("follower: unsubscribe failed", exc_info=True)

    async def _apply(self, msgs: list[Msg]) -> None:
        rows: list[tuple[Any, ...]] = []
        # (entity, id, command id) -> request hash, first version, the events seen here
        commands: dict[tuple[str, str, str], tuple[bytes, int, list[tuple[int, bytes]]]] = {}
        last = self.applied
        for msg in msgs:
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq <= last:
                continue  # the ordered consumer was reset and started over: seen
            last = seq
            tokens = msg.subject.split(".")
            if len(tokens) != 4 or tokens[:2] != ["kaya", "evt"]:
                continue  # an epoch marker: only its sequence matters
            headers = msg.headers or {}
            try:
                event_id = headers[HEADER_MSG_ID]
                row = (
                    seq,
                    event_id,
                    tokens[2],
                    tokens[3],
                    int(headers[HEADER_ENTITY_VERSION]),
                    headers[HEADER_EVENT_TYPE],
                    int(headers[HEADER_SCHEMA_VERSION]),
                    msg.data,
                    meta.timestamp.timestamp(),
                    headers.get(HEADER_COMMAND_ID),
                    headers.get(HEADER_TRACEPARENT),
                    event_id,
                    seq,
                )
            except (KeyError, ValueError):
                log.error("follower: %s at %d lacks the event headers; skipped", msg.subject, seq)
                self.skipped += 1
                continue
            rows.append(row)
            cid, digest = headers.get(HEADER_COMMAND_ID), headers.get(HEADER_REQUEST_HASH)
            if cid and digest:
                with contextlib.suppress(ValueError):
                    key = (tokens[2], tokens[3], cid)
                    version = int(row[4])
                    start = int(headers.get(HEADER_COMMAND_START) or version)
                    seen = commands.setdefault(key, (bytes.fromhex(digest), start, []))
                    seen[2].append((version, msg.data))
        if last == self.applied:
            return
        skipped = 0
        async with self._store.transaction(durable=False) as tx:  # the log has it anyway
            for row in rows:
                try:
                    await tx.execute(_INSERT_EVENT, row)
                except sqlite3.IntegrityError as exc:
                    skipped += 1
                    log.error(
                        "follower: %s/%s version %d at %d not stored: %s",
                        row[2], row[3], row[4], row[0], exc,
                    )  # fmt: skip
            for (entity, entity_id, cid), (request_hash, start, here) in commands.items():
                found = here
                if here[0][0] > start:  # the command's first events came in an earlier batch
                    found = [
                        (int(v), bytes(d))
                        for v, d in await tx.fetchall(
                            "SELECT version, data FROM events WHERE entity = ? AND entity_id = ?"
                            " AND version BETWEEN ? AND ? ORDER BY version",
                            (entity, entity_id, start, here[-1][0]),
                        )
                    ]
                if not found:
                    continue
                body = command_done(
                    entity, entity_id, found[-1][0], [msgspec.Raw(data) for _, data in found]
                )
                await tx.execute(
                    "INSERT INTO replies (entity, entity_id, command_id, request_hash, body,"
                    " recorded_at) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT DO UPDATE SET body = excluded.body",
                    (entity, entity_id, cid, request_hash, body, time.time()),
                )
            await tx.execute(
                "INSERT INTO checkpoints (name, position) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                (CHECKPOINT, last),
            )
        self.skipped += skipped
        self.imported += len(rows) - skipped
        self.applied = last
        if self._failing.recovered():
            log.info("follower: recovered at %d", last)
        self._progress.set()
        self._progress = anyio.Event()
