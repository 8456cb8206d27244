"""Replicated durability: a command's events go into KAYA_EVENTS before it is answered.

    turn decided -> its events as one atomic batch, checked against the entity's last
                    event in the log -> ack (R3) -> answer

A turn's events go in one JetStream atomic batch (all stored or none: a command whose
first event landed and whose second did not would leave the entity half-way, a saga
stuck), its first message with `Nats-Expected-Last-Subject-Sequence: <seq>`, the stream
sequence of the entity's previous event (0 for its first): JetStream stores the batch
only if nothing else was written to that entity since. A single event goes as a plain
publish with the same check. Whoever acts on a stale view (a node
that lost its lease while paused, cut off, or slow to notice) has its write refused,
lets the shard go, and its callers get `unavailable` and retry with the new owner. The
lease is checked too, right before each turn's first publish: a node that wakes after
its lease lapsed refuses on its own, before it even asks.

Why per entity and not one epoch subject per shard (`...-Subject: kaya.epoch.<n>`, which
stopped every write of an old owner at once): on a clustered stream JetStream refuses
(10164) a second write checked against a subject while the first is still in flight,
so a shard's writes would go one at a time, one replication round trip each. Per entity
they are one at a time anyway (one turn at a time per actor), and the shards' entities
write in parallel. The epoch marker still serves the catch-up: a new owner serves once
its store has passed it (follower.py).

An outcome this node cannot know (no ack in time, the connection lost mid-publish) may
have stored the events or not. The actor's state would then be a guess, so the shard is
let go as well: whoever takes it next catches up from the log, which has the answer.
Each event carries its event id as `Nats-Msg-Id`, so a retried publish is stored once.

Headers are the contract's, plus `Kaya-Request-Hash` on events of a command with a
`Kaya-Command-Id`: with it every node's follower can remember the command's reply, so a
client that retries after a failover gets the first answer again, not a second effect.
`Kaya-Position` is left out: in replicated mode an event's position is its stream
sequence (see follower.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from kaya.actors.errors import Unavailable
from kaya.actors.retry import Backoff
from kaya.actors.wire import (
    HEADER_COMMAND_ID,
    HEADER_ENTITY_VERSION,
    HEADER_EVENT_TYPE,
    HEADER_MSG_ID,
    HEADER_SCHEMA_VERSION,
    HEADER_TRACEPARENT,
    event_subject,
    shard_of,
)
from kaya.app.cluster.leases import LeaseKeeper
from kaya.store import NewEvent

log = logging.getLogger("kaya.cluster")

HEADER_REQUEST_HASH = "Kaya-Request-Hash"
HEADER_COMMAND_START = "Kaya-Command-Start"
"""The entity version of the first event of the same command: a follower rebuilds the
command's reply from that range without searching the entity's history."""
WRONG_LAST_SEQUENCE = 10071
"""JetStream's "wrong last sequence: N": the entity has a newer event than the writer saw."""
IN_FLIGHT = 10164
"""JetStream's "wrong last sequence" without a number: on a clustered stream, another
write checked against the subject is still being applied (the previous one, just acked).
Not a refusal: sent again, the same message (same Nats-Msg-Id) is checked once it is."""
IN_FLIGHT_RETRIES = Backoff(initial=0.002, cap=0.05)
IN_FLIGHT_ATTEMPTS = 20
MAX_BATCH = 1000
"""Most messages in one atomic batch (JetStream's limit): a turn with more events is
written in several, split between commands."""


class _Refused(Exception):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code


class _Ack(msgspec.Struct):
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_Ack)


class _Publisher:
    """JetStream publishes with their acks on one inbox of ours.

    nats-py's `publish_async` never completes a future whose ack is an error (its
    handler raises instead of failing the future), so a fenced write would look like
    a timeout: here each ack, error or not, settles its own future.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._waiting: dict[str, asyncio.Future[int]] = {}
        self._next = 0
        self._subscribed = False

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) + 1 :], None)
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(nats.errors.NoRespondersError())
            return
        try:
            ack = _ack_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            future.set_exception(exc)
            return
        if ack.error is not None:
            code = int(ack.error.get("err_code", 0))
            future.set_exception(_Refused(code, str(ack.error.get("description", ""))))
        else:
            future.set_result(ack.seq)

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str]
    ) -> asyncio.Future[int]:
        if not self._subscribed:
            await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_ack)
            self._subscribed = True
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        await self._nc.publish(subject, data, reply=f"{self._prefix}.{token}", headers=headers)
        return future

    def forget(self, futures: Sequence[asyncio.Future[int]]) -> None:
        for future in futures:
            future.cancel()
        done = {id(f) for f in futures}
        for token in [t for t, f in self._waiting.items() if id(f) in done]:
            del self._waiting[token]


class Journal:
    """Writes a node's events into KAYA_EVENTS under its shards' epochs."""

    def __init__(self, nc: NATS, keeper: LeaseKeeper, *, shards: int, ack_timeout: float) -> None:
        self._nc = nc
        self._publisher = _Publisher(nc)
        self._keeper = keeper
        self._shards = shards
        self._ack_timeout = ack_timeout
        self.last_seq = 0
        """Highest stream sequence this node wrote: what its own store must reach before
        it rebuilds an actor from it (the follower stores the events, not the turn)."""
        self.refused = 0
        self.unsure = 0
        self.in_flight_retries = 0
        self._given_up: set[int] = set()
        self._applied: Callable[[], int] | None = None
        self._wait_applied: Callable[[int], Awaitable[None]] | None = None

    def follow(self, applied: Callable[[], int], wait: Callable[[int], Awaitable[None]]) -> None:
        """The local store's progress along the log (the follower's), for `settled`."""
        self._applied, self._wait_applied = applied, wait

    def shard(self, entity: str, entity_id: str) -> int:
        return shard_of(self._shards, entity, entity_id)

    def admits(self, entity: str, entity_id: str) -> bool:
        shard = self.shard(entity, entity_id)
        return shard not in self._given_up and self._keeper.owned(shard) is not None

    def acquired(self, shard: int) -> None:
        """The shard is caught up under a new epoch: writes for it may go again."""
        self._given_up.discard(shard)

    async def settled(self) -> None:
        applied, wait = self._applied, self._wait_applied
        if applied is not None and wait is not None and applied() < self.last_seq:
            await wait(self.last_seq)

    async def record(
        self,
        entity: str,
        entity_id: str,
        version: int,
        events: Sequence[NewEvent],
        hashes: Mapping[str, bytes],
        last_seq: int,
    ) -> int:
        """Store `events` (following `version`, whose event is at stream sequence
        `last_seq`) in the log, or raise Unavailable; the last event's sequence."""
        shard = self.shard(entity, entity_id)
        epoch = self._keeper.owned(shard)  # checked now: a paused node wakes to None
        if epoch is None or shard in self._given_up:
            raise Unavailable(f"shard {shard} is not served by this node now; retry")
        subject = event_subject(entity, entity_id)
        starts: dict[str, int] = {}  # command id -> version of its first event
        batches: list[list[tuple[bytes, dict[str, str]]]] = [[]]
        previous = None
        for event in events:
            version += 1
            headers = {
                HEADER_MSG_ID: event.event_id,
                HEADER_EVENT_TYPE: event.type,
                HEADER_SCHEMA_VERSION: str(event.schema_version),
                HEADER_ENTITY_VERSION: str(version),
            }
            if event.traceparent:
                headers[HEADER_TRACEPARENT] = event.traceparent
            if event.command_id:
                headers[HEADER_COMMAND_ID] = event.command_id
                digest = hashes.get(event.command_id)
                if digest:
                    headers[HEADER_REQUEST_HASH] = digest.hex()
                    start = starts.setdefault(event.command_id, version)
                    headers[HEADER_COMMAND_START] = str(start)
            # a command's events never straddle two batches: each command is all or nothing
            if len(batches[-1]) >= MAX_BATCH and (
                event.command_id is None or event.command_id != previous
            ):
                batches.append([])
            batches[-1].append((event.data, headers))
            previous = event.command_id
        for batch in batches:
            if self._keeper.owned(shard) != epoch:  # lapsed while the last one was on its way
                self._let_go(shard, epoch)
                raise Unavailable(f"shard {shard} is not served by this node now; retry")
            last_seq = await self._write(subject, batch, last_seq, shard, epoch)
            self.last_seq = max(self.last_seq, last_seq)
        return last_seq

    async def _write(
        self,
        subject: str,
        batch: list[tuple[bytes, dict[str, str]]],
        last_seq: int,
        shard: int,
        epoch: int,
    ) -> int:
        """One message, or an atomic batch of them (JetStream stores all or none), checked
        against `last_seq`; the sequence of its last message."""
        batch[0][1]["Nats-Expected-Last-Subject-Sequence"] = str(last_seq)
        future = None
        try:
            for attempt in range(1, IN_FLIGHT_ATTEMPTS + 1):
                future = await self._send(subject, batch, attempt)
                try:
                    return await asyncio.wait_for(future, self._ack_timeout)
                except _Refused as refused:
                    if refused.code != IN_FLIGHT or attempt == IN_FLIGHT_ATTEMPTS:
                        raise
                    self.in_flight_retries += 1
                    await IN_FLIGHT_RETRIES.sleep(attempt)
        except _Refused as refused:
            if refused.code != WRONG_LAST_SEQUENCE:
                self._unsure(shard, epoch, refused)
            self.refused += 1
            log.warning(
                "shard %d: write to %s refused (%s): another owner wrote it",
                shard, subject, refused,
            )  # fmt: skip
            self._let_go(shard, epoch)
            raise Unavailable(f"shard {shard} moved to another node; retry") from None
        except (TimeoutError, nats.errors.Error, msgspec.DecodeError) as exc:
            if future is not None:
                self._publisher.forget([future])
            self._unsure(shard, epoch, exc)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send(
        self, subject: str, batch: list[tuple[bytes, dict[str, str]]], attempt: int
    ) -> asyncio.Future[int]:
        if len(batch) == 1:
            data, headers = batch[0]
            return await self._publisher.publish(subject, data, headers)
        batch_id = f"{batch[0][1][HEADER_MSG_ID]}-{attempt}"
        for number, (data, headers) in enumerate(batch, 1):
            headers["Nats-Batch-Id"] = batch_id
            headers["Nats-Batch-Sequence"] = str(number)
            if number < len(batch):
                await self._nc.publish(subject, data, headers=headers)
        last_data, last_headers = batch[-1]
        last_headers["Nats-Batch-Commit"] = "1"
        return await self._publisher.publish(subject, last_data, last_headers)

    def _let_go(self, shard: int, epoch: int) -> None:
        """Give the shard up, unless it was already given up and taken again since (a
        late answer about an older epoch says nothing about the current one)."""
        if self._keeper.owned(shard) == epoch:
            self._given_up.add(shard)
            self._keeper.give_up(shard)

    def _unsure(self, shard: int, epoch: int, exc: BaseException) -> NoReturn:
        self.unsure += 1
        log.warning("shard %d: write outcome unknown (%r); letting the shard go", shard, exc)
        self._let_go(shard, epoch)
        raise Unavailable(f"shard {shard}: the log did not confirm the write; retry")
