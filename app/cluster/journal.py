"""Replicated durability: a command's events go into KAYA_EVENTS before it is answered.

    turn decided -> publish each event, fenced by the shard's epoch -> acks (R3) -> answer

Every event is published with `Nats-Expected-Last-Subject-Sequence: <epoch>` and
`Nats-Expected-Last-Subject-Sequence-Subject: kaya.epoch.<shard>`: JetStream stores it
only while the shard's last epoch marker is the one this node published when it took
the shard. A node that lost its lease (paused, cut off, slow to notice) has every later
write refused (10071), whatever it believes; it then lets go of the shard, and its
callers get `unavailable` and retry against the new owner.

An outcome this node cannot know (no ack in time, the connection lost mid-publish) may
have stored the events or not. The actor's state would then be a guess, so the shard is
let go as well: whoever takes it next catches up from the log, which has the answer.
The events of a turn are published together and awaited together (one round trip),
each with its event id as `Nats-Msg-Id`, so a retried publish is stored once.

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
from kaya.actors.wire import (
    EVENTS_STREAM,
    HEADER_COMMAND_ID,
    HEADER_ENTITY_VERSION,
    HEADER_EVENT_TYPE,
    HEADER_MSG_ID,
    HEADER_SCHEMA_VERSION,
    HEADER_TRACEPARENT,
    event_subject,
    shard_of,
)
from kaya.app.cluster.leases import LeaseKeeper, epoch_subject
from kaya.store import NewEvent

log = logging.getLogger("kaya.cluster")

HEADER_REQUEST_HASH = "Kaya-Request-Hash"
WRONG_LAST_SEQUENCE = 10071


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
        self._publisher = _Publisher(nc)
        self._keeper = keeper
        self._shards = shards
        self._ack_timeout = ack_timeout
        self.last_seq = 0
        """Highest stream sequence this node wrote: what its own store must reach before
        it rebuilds an actor from it (the follower stores the events, not the turn)."""
        self.refused = 0
        self.unsure = 0
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
    ) -> None:
        """Store `events` (following `version`) in the log, or raise Unavailable."""
        shard = self.shard(entity, entity_id)
        epoch = self._keeper.owned(shard)
        if epoch is None or shard in self._given_up:
            raise Unavailable(f"shard {shard} is not served by this node now; retry")
        subject = event_subject(entity, entity_id)
        fence = {
            "Nats-Expected-Last-Subject-Sequence": str(epoch),
            "Nats-Expected-Last-Subject-Sequence-Subject": epoch_subject(shard),
        }
        futures = []
        try:
            for event in events:
                version += 1
                headers = {
                    "Nats-Expected-Stream": EVENTS_STREAM,
                    HEADER_MSG_ID: event.event_id,
                    HEADER_EVENT_TYPE: event.type,
                    HEADER_SCHEMA_VERSION: str(event.schema_version),
                    HEADER_ENTITY_VERSION: str(version),
                    **fence,
                }
                if event.traceparent:
                    headers[HEADER_TRACEPARENT] = event.traceparent
                if event.command_id:
                    headers[HEADER_COMMAND_ID] = event.command_id
                    digest = hashes.get(event.command_id)
                    if digest:
                        headers[HEADER_REQUEST_HASH] = digest.hex()
                futures.append(await self._publisher.publish(subject, event.data, headers))
            done = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), self._ack_timeout
            )
        except (TimeoutError, nats.errors.Error) as exc:
            self._publisher.forget(futures)
            self._unsure(shard, exc)
        for outcome in done:
            if isinstance(outcome, _Refused):
                if outcome.code == WRONG_LAST_SEQUENCE:
                    self.refused += 1
                    log.warning("shard %d: write refused, epoch %d is over", shard, epoch)
                    self._given_up.add(shard)
                    self._keeper.give_up(shard)
                    raise Unavailable(f"shard {shard} moved to another node; retry")
                self._unsure(shard, outcome)
            if isinstance(outcome, BaseException):
                self._unsure(shard, outcome)
            self.last_seq = max(self.last_seq, outcome)

    def _unsure(self, shard: int, exc: BaseException) -> NoReturn:
        self.unsure += 1
        log.warning("shard %d: write outcome unknown (%r); letting the shard go", shard, exc)
        self._given_up.add(shard)
        self._keeper.give_up(shard)
        raise Unavailable(f"shard {shard}: the log did not confirm the write; retry")
