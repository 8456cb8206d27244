"""Actor runtime: virtual actors, one bounded mailbox each, group-committed appends.

An actor exists for every entity id, but only in name until a message arrives:
then it is activated (rebuilt from its snapshot and later events), processes its
mailbox one message at a time, and goes idle. An idle actor is a small object
with no task; after `idle_timeout` or when `max_active` is exceeded it is
passivated (dropped) and will be rebuilt from the store on its next message.

A busy actor takes every command waiting in its mailbox as one turn: it decides
them in order against its state, appends all their events in one store append
(which itself shares a transaction with other actors' appends) and replies to
each caller once the append is durable. Per-key order holds because one turn
runs at a time per actor; a hot key gets big batches instead of a long queue of
fsyncs.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from kaya.actors.entity import Command, Entity
from kaya.actors.errors import Conflict, Internal, KayaError, Overloaded, Rejected, Unavailable
from kaya.actors.masking import masked
from kaya.actors.replies import command_done, error_from, error_reply, state_reply
from kaya.store import Append, EventStore, NewEvent, Reply, Snapshot, StoreError, VersionConflict

log = logging.getLogger("kaya.actors")

ReplyFn = Callable[[bytes], Awaitable[None]]
"""Sends one encoded reply to the caller. The runtime calls it exactly once per message."""

AnyEntity = Entity[Any, Any, Any]

_encoder = msgspec.json.Encoder()


class _EventIds:
    """Event ids: 32 hex characters, unique across processes and restarts, increasing.

    The process's start time in ms (12 hex), 32 random bits (8 hex), then a counter
    (12 hex). Ids of one process sort in the order they were made, and a later
    process's after them (clock steps aside), so the store's unique index on
    event_id grows at its right edge instead of at random pages as with uuid4; and
    no syscall per id. A forked child starts its own sequence.
    """

    def __init__(self) -> None:
        self._restart()
        os.register_at_fork(after_in_child=self._restart)

    def _restart(self) -> None:
        self._prefix = f"{time.time_ns() // 1_000_000:012x}{secrets.randbits(32):08x}"
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


_event_ids = _EventIds()

_MAX_IDLE_WORKERS = 1024


@dataclass(frozen=True)
class RuntimeSettings:
    mailbox_size: int = 1024
    max_active: int = 100_000
    idle_timeout: float = 300.0
    snapshot_every: int = 100
    max_turn: int = 512
    """Most commands one actor decides per turn (and so per append)."""


@dataclass(frozen=True)
class RuntimeStatistics:
    active: int
    busy: int
    queued: int
    activations: int
    passivations: int
    commands: int
    crashes: int


class _Message:
    __slots__ = ("command", "command_id", "deadline", "reply", "request_hash", "traceparent")

    def __init__(
        self,
        command: Command | None,
        command_id: str | None,
        request_hash: bytes,
        traceparent: str | None,
        reply: ReplyFn,
    ) -> None:
        self.command = command  # None: a state query
        self.command_id = command_id
        self.request_hash = request_hash
        self.traceparent = traceparent
        self.reply = reply
        self.deadline: float | None = None  # unix time; decided after it: `timeout`


class _Actor:
    __slots__ = (
        "entity",
        "entity_id",
        "last_used",
        "loaded",
        "mailbox",
        "running",
        "state",
        "traceparent",
        "version",
    )

    def __init__(self, entity: AnyEntity, entity_id: str) -> None:
        self.entity = entity
        self.entity_id = entity_id
        self.state: Any = None
        self.version = 0
        self.loaded = False
        self.running = False
        # None while idle: an empty deque is ~760 bytes, over half of an idle actor,
        # and most actors are idle most of the time (1M active ones: 1.3 GB -> 0.6 GB)
        self.mailbox: deque[_Message] | None = None
        self.last_used = 0.0
        self.traceparent: str | None = None  # of the last command: sagas carry it on


def trace_id(traceparent: str | None) -> str | None:
    """The W3C trace id inside a traceparent header: what log lines are joined on."""
    return traceparent.split("-")[1] if traceparent and traceparent.count("-") == 3 else None


def request_hash(command: Command) -> bytes:
    """Fingerprint of a command's canonical encoding: same command, same hash, any key order."""
    return hashlib.blake2b(_encoder.encode(command), digest_size=16).digest()


class ActorRuntime:
    """Hosts the actors of one node. Run it with `run()` inside a task group."""

    def __init__(
        self,
        store: EventStore,
        settings: RuntimeSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._settings = settings or RuntimeSettings()
        self._clock = clock
        self._actors: OrderedDict[tuple[str, str], _Actor] = OrderedDict()
        self._tg: TaskGroup | None = None
        self._busy = 0
        self._ready: deque[_Actor] = deque()  # running actors no worker has taken yet
        self._idle: list[asyncio.Future[None]] = []  # one per idle worker, to wake it
        self._activations = 0
        self._passivations = 0
        self._commands = 0
        self._crashes = 0
        self.after_turns: Callable[[AnyEntity, str, Any, str | None], None] | None = None
        """Called with the committed state when an actor's mailbox is drained (sagas)."""

    # ---- entry points --------------------------------------------------------------

    def tell(
        self,
        entity: AnyEntity,
        entity_id: str,
        command: Command,
        reply: ReplyFn,
        *,
        command_id: str | None = None,
        traceparent: str | None = None,
        deadline: float | None = None,
    ) -> None:
        """Queue a command; `reply` gets the contract reply. Raises Overloaded when full.

        A command still queued at `deadline` (unix time) is not applied: it gets
        `timeout`, remembered under its command id like any other reply.
        """
        digest = request_hash(command) if command_id is not None else b""
        message = _Message(command, command_id, digest, traceparent, reply)
        message.deadline = deadline
        self._enqueue(entity, entity_id, message)

    def query(self, entity: AnyEntity, entity_id: str, reply: ReplyFn) -> None:
        """Queue a state query behind the entity's pending commands (read-your-writes)."""
        self._enqueue(entity, entity_id, _Message(None, None, b"", None, reply))

    async def ask(
        self,
        entity: AnyEntity,
        entity_id: str,
        command: Command | None,
        *,
        command_id: str | None = None,
        traceparent: str | None = None,
        deadline: float | None = None,
    ) -> bytes:
        """Send and wait for the reply: for in-process callers (sagas, tools, tests)."""
        done = anyio.Event()
        box: list[bytes] = []

        async def reply(data: bytes) -> None:
            box.append(data)
            done.set()

        if command is None:
            self.query(entity, entity_id, reply)
        else:
            self.tell(
                entity,
                entity_id,
                command,
                reply,
                command_id=command_id,
                traceparent=traceparent,
                deadline=deadline,
            )
        await done.wait()
        return box[0]

    def _enqueue(self, entity: AnyEntity, entity_id: str, message: _Message) -> None:
        if self._tg is None:
            raise Unavailable("the actor runtime is not running")
        key = (entity.name, entity_id)
        actor = self._actors.get(key)
        if actor is None:
            # evict before adding: the new actor is idle too and must not be the victim
            if len(self._actors) >= self._settings.max_active:
                self._evict(len(self._actors) - self._settings.max_active + 1)
            actor = _Actor(entity, entity_id)
            self._actors[key] = actor
        else:
            self._actors.move_to_end(key)
        mailbox = actor.mailbox
        if mailbox is None:
            mailbox = actor.mailbox = deque()
        elif len(mailbox) >= self._settings.mailbox_size:
            raise Overloaded(f"mailbox of {entity.name}/{entity_id} is full; retry later")
        mailbox.append(message)
        if not actor.running:
            actor.running = True
            self._busy += 1
            self._ready.append(actor)
            while self._idle:
                wake = self._idle.pop()
                if not wake.done():  # else its worker was cancelled
                    wake.set_result(None)
                    return
            self._tg.start_soon(self._worker)

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; passivates idle actors in the background."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                task_status.started()
                interval = min(max(self._settings.idle_timeout / 4, 0.05), 30.0)
                while True:
                    await anyio.sleep(interval)
                    self.passivate_idle(self._clock())
            finally:
                self._tg = None

    def passivate_idle(self, now: float) -> int:
        """Drop actors idle since before `now - idle_timeout`; return how many."""
        cutoff = now - self._settings.idle_timeout
        idle = [
            key
            for key, actor in self._actors.items()
            if not actor.running and actor.last_used <= cutoff
        ]
        for key in idle:
            del self._actors[key]
        self._passivations += len(idle)
        return len(idle)

    def _evict(self, count: int) -> None:
        victims: list[tuple[str, str]] = []
        for key, actor in self._actors.items():  # least recently used first
            if not actor.running and not actor.mailbox:
                victims.append(key)
                if len(victims) >= count:
                    break
        for key in victims:
            del self._actors[key]
        self._passivations += len(victims)

    def statistics(self) -> RuntimeStatistics:
        return RuntimeStatistics(
            active=len(self._actors),
            busy=self._busy,
            queued=sum(len(a.mailbox or ()) for a in self._actors.values() if a.running),
            activations=self._activations,
            passivations=self._passivations,
            commands=self._commands,
            crashes=self._crashes,
        )

    # ---- one actor's turns -----------------------------------------------------------

    async def _worker(self) -> None:
        """Runs ready actors, one at a time, then waits to be woken for the next.

        Workers outlive the actors they run: starting a task in a task group costs
        more than a command's whole turn, and most commands find their actor idle.
        Every actor made ready wakes an idle worker or starts one, so no ready actor
        waits behind another's turn.
        """
        ready = self._ready
        while True:
            while ready:
                await self._run_actor(ready.popleft())
            if len(self._idle) >= _MAX_IDLE_WORKERS:
                return
            wake = asyncio.get_running_loop().create_future()
            self._idle.append(wake)
            await wake

    async def _run_actor(self, actor: _Actor) -> None:
        mailbox = actor.mailbox
        assert mailbox is not None  # made ready by _enqueue, which creates it
        try:
            while mailbox:
                if not actor.loaded and not await self._activate(actor):
                    return
                if mailbox[0].command is None:
                    query = mailbox.popleft()
                    await self._send(
                        query,
                        state_reply(actor.entity.name, actor.entity_id, actor.version, actor.state),
                    )
                    continue
                turn: list[_Message] = []
                while (
                    mailbox
                    and mailbox[0].command is not None
                    and len(turn) < self._settings.max_turn
                ):
                    turn.append(mailbox.popleft())
                await self._turn(actor, turn)
        finally:
            actor.running = False
            if not mailbox:
                actor.mailbox = None
            actor.last_used = self._clock()
            self._busy -= 1
        if actor.loaded and self.after_turns is not None:
            self.after_turns(actor.entity, actor.entity_id, actor.state, actor.traceparent)

    async def _activate(self, actor: _Actor) -> bool:
        """Rebuild state from snapshot + events. On failure, answer everything queued."""
        entity = actor.entity
        try:
            state, version = entity.initial, 0
            snapshot = await self._store.load_snapshot(entity.name, actor.entity_id)
            if snapshot is not None and snapshot.schema == entity.state_schema:
                try:
                    state, version = entity.decode_state(snapshot.state), snapshot.version
                except msgspec.DecodeError:
                    log.warning(
                        "ignoring unreadable snapshot of %s/%s", entity.name, actor.entity_id
                    )
            for stored in await self._store.read_stream(entity.name, actor.entity_id, version):
                event = entity.decode_event(stored.type, stored.schema_version, stored.data)
                state = entity.evolve(state, event)
                version = stored.version
        except Exception as exc:
            log.exception("activation of %s/%s failed", entity.name, actor.entity_id)
            error = error_from(Unavailable(f"cannot load {entity.name}/{actor.entity_id}: {exc}"))
            while actor.mailbox:
                await self._send(actor.mailbox.popleft(), error)
            self._actors.pop((entity.name, actor.entity_id), None)
            return False
        actor.state, actor.version, actor.loaded = state, version, True
        self._activations += 1
        return True

    async def _turn(self, actor: _Actor, turn: Sequence[_Message]) -> None:
        entity, entity_id = actor.entity, actor.entity_id
        command_ids = {m.command_id for m in turn if m.command_id is not None}
        try:
            known = await self._store.find_replies(entity.name, entity_id, command_ids)
        except StoreError as exc:
            error = error_from(Unavailable(str(exc)))
            for message in turn:
                await self._send(message, error)
            return

        state, version = actor.state, actor.version
        new_events: list[NewEvent] = []
        remembered: list[Reply] = []
        replies: list[tuple[_Message, bytes, bool]] = []  # (message, reply, needs the commit)
        decided: set[str] = set()
        crashed = False
        for message in turn:
            self._commands += 1
            cid = message.command_id
            if cid is not None and cid in known:
                prior = known[cid]
                # a repeat within this turn is only as good as this turn's commit
                pending = cid in decided
                if prior.request_hash == message.request_hash:
                    replies.append((message, prior.body, pending))
                else:
                    replies.append((message, _reused_id(cid), False))
                continue
            if cid is not None:
                decided.add(cid)
            if message.traceparent is not None:
                actor.traceparent = message.traceparent
            if message.deadline is not None and time.time() > message.deadline:
                body = error_reply("timeout", "the command reached the entity after its deadline")
                replies.append((message, body, cid is not None))
                if cid is not None:  # a definite answer: a later repeat must not apply it
                    reply = Reply(command_id=cid, request_hash=message.request_hash, body=body)
                    known[cid] = reply
                    remembered.append(reply)
                continue
            try:
                events = list(entity.decide(state, message.command))
                next_state = state
                for event in events:
                    next_state = entity.evolve(next_state, event)
                encoded = [entity.encode_event(event) for event in events]  # validated
            except Rejected as exc:
                body = error_from(exc)
                replies.append((message, body, cid is not None))
                if cid is not None:
                    reply = Reply(command_id=cid, request_hash=message.request_hash, body=body)
                    known[cid] = reply
                    remembered.append(reply)
                continue
            except Exception:
                crashed = True
                self._crashes += 1
                log.exception(
                    "handler crashed on %s for %s/%s",
                    type(message.command).__name__,
                    entity.name,
                    entity_id,
                    extra={
                        "entity": entity.name,
                        "id": entity_id,
                        "command": masked(message.command),
                        "command_id": cid,
                        "trace_id": trace_id(message.traceparent),
                    },
                )
                replies.append(
                    (message, error_reply("internal", "the handler failed; nothing changed"), False)
                )
                continue
            state = next_state
            version += len(events)
            for event, data in zip(events, encoded, strict=True):
                new_events.append(
                    NewEvent(
                        event_id=_event_ids.next(),
                        type=type(event).__name__,
                        schema_version=event.schema_version,
                        data=data,
                        command_id=cid,
                        traceparent=message.traceparent,
                    )
                )
            body = command_done(entity.name, entity_id, version, events)
            replies.append((message, body, True))
            if cid is not None:
                reply = Reply(command_id=cid, request_hash=message.request_hash, body=body)
                known[cid] = reply
                remembered.append(reply)

        if new_events or remembered:
            snapshot = None
            every = self._settings.snapshot_every
            if new_events and every > 0 and version // every != actor.version // every:
                snapshot = Snapshot(
                    version=version, state=_encoder.encode(state), schema=entity.state_schema
                )
            append = Append(
                entity=entity.name,
                entity_id=entity_id,
                expected_version=actor.version,
                events=new_events,
                replies=remembered,
                snapshot=snapshot,
            )
            try:
                await self._store.append(append)
            except VersionConflict as exc:
                actor.loaded = False  # someone else wrote: rebuild before the next turn
                failure = error_from(Conflict(f"{exc}; retry"))
                replies = [(m, failure if durable else r, durable) for m, r, durable in replies]
            except StoreError as exc:
                actor.loaded = False
                failure = error_from(Unavailable(f"store unavailable: {exc}"))
                replies = [(m, failure if durable else r, durable) for m, r, durable in replies]
            else:
                actor.state, actor.version = state, version
        if crashed:
            actor.loaded = False  # rebuilt from the store before its next message
        for message, body, _ in replies:
            await self._send(message, body)

    async def _send(self, message: _Message, body: bytes) -> None:
        try:
            await message.reply(body)
        except Exception:
            log.exception("could not deliver a reply")


def _reused_id(command_id: str) -> bytes:
    return error_from(
        Conflict(f"Kaya-Command-Id {command_id!r} was already used with a different command")
    )


__all__ = [
    "ActorRuntime",
    "Internal",
    "KayaError",
    "ReplyFn",
    "RuntimeSettings",
    "RuntimeStatistics",
    "request_hash",
]
