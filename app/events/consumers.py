"""Consumers: what a user writes to react to events, for projections, notifications and sagas.

    KAYA_EVENTS --durable pull consumer--> handler(event, effects)
        local effects (SQL) + checkpoint  -> one SQLite transaction  (effectively once)
        external effects (publish, call)  -> idempotent by event id  (at least once)
        a failing event: retried with exponential backoff and jitter, then KAYA_DLQ

This module is the contract only, so an app imports it (through `kaya`) without the
machinery: `Consumer` and `Projection` to subclass, the `Effects` a handler fills,
the `Context` the node lends it and the `View`s it answers with. Why effects are
split: SQL put into `Effects` commits with the consumer's checkpoint, so it is
applied once whatever fails; anything else can happen again and must be idempotent.

Running a consumer is kaya.app.events.runner's job; what it gave up on goes to
kaya.app.events.dlq, and kaya.app.events.rebuild rebuilds a projection from the store.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from kaya.actors.sealing import Sealer, is_sealed
from kaya.actors.wire import EVENT_SUBJECTS, Delivered
from kaya.app.security.keys import pseudonym
from kaya.store import StoredEvent

UnknownEventPolicy = Literal["dead_letter", "skip", "stop"]
_NOT_SUBJECT_SAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class Effects:
    """The local effects of one event: SQL run with the checkpoint, in one transaction."""

    statements: list[tuple[str, Sequence[object]]] = field(default_factory=list)

    def execute(self, sql: str, params: Sequence[object] = ()) -> None:
        self.statements.append((sql, params))


Publish = Callable[[str, bytes, Mapping[str, str] | None], Awaitable[None]]
"""Publish one message on NATS: subject, body, headers."""


class Reader(Protocol):
    """Reads of a node's SQLite store: what consumers and views may look at."""

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]: ...

    async def checkpoint(self, name: str) -> int: ...

    async def read_stream(
        self, entity: str, entity_id: str, after_version: int = 0
    ) -> list[StoredEvent]: ...


async def _no_publish(subject: str, data: bytes, headers: Mapping[str, str] | None) -> None:
    raise RuntimeError(f"publishing to {subject} is not possible here (no NATS connection)")


@dataclass(frozen=True)
class Context:
    """What the node lends consumers and views: reads of its store and a NATS publish.

    Reads see committed data (the read models' tables included); writes go through
    `Effects`, so they commit with the consumer's checkpoint. `publish` is core NATS:
    at most once per call, so an external effect must carry its own dedup key (the
    event id) for readers to see it once.
    """

    store: Reader
    publish: Publish = _no_publish
    sealer: Sealer | None = None
    """With security on: what opens sealed sensitive fields (actors/sealing.py)."""
    pseudonym_key: bytes | None = None
    """With security on: the secret `pseudonym` keys its HMAC with."""

    async def reveal(self, entity: str, entity_id: str, data: bytes) -> bytes:
        """An event's JSON with its sealed sensitive fields opened (`"***"` once the
        entity was forgotten). Events reach `handle` sealed, so a read model never keeps
        what `kaya forget` must destroy; reveal only what you use and do not store it."""
        if self.sealer is None or not is_sealed(data):
            return data
        return await self.sealer.open(entity, entity_id, data)

    def pseudonym(self, value: str) -> str:
        """A stable subject token standing for `value` (an owner's name) that does not
        reveal it: an HMAC under a node secret with security on (`p` + 24 hex digits);
        without, the value itself with anything but [A-Za-z0-9_-] as `_` (development)."""
        if self.pseudonym_key is None:
            return _NOT_SUBJECT_SAFE.sub("_", value)[:64] or "_"
        return pseudonym(self.pseudonym_key, value)

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only SQL query against the node's store."""
        return await self.store.query(sql, params)

    async def checkpoint(self, consumer: str) -> int:
        """The store position a consumer has applied up to (0 before its first event)."""
        return await self.store.checkpoint(f"consumer:{consumer}")

    async def stream(
        self, entity: str, entity_id: str, after_version: int = 0
    ) -> list[StoredEvent]:
        """An entity's events in the node's store, oldest first. The store holds every
        event a consumer is delivered (in a cluster too: the node's store follows the
        log), so a reaction can look up what it needs here instead of keeping its own
        copy, and so run on whichever node holds it."""
        return await self.store.read_stream(entity, entity_id, after_version)


View = Callable[[Context, dict[str, Any]], Awaitable[dict[str, Any]]]
"""A read model's query on `kaya.view.<name>`: JSON parameters in, a JSON object out."""


class Consumer:
    """Base of consumers (reactions): subclass it, set `name`, write `handle`.

    The runner delivers every event of KAYA_EVENTS that matches `filter_subject`, in
    stream order, to `handle(event, effects)`. SQL put into `effects` commits in one
    SQLite transaction with the consumer's checkpoint, so it is applied exactly once;
    anything else `handle` does (a publish, a call) happens at least once and must be
    idempotent by `event.event_id`. `handle` may raise: the runner retries with
    backoff, then dead-letters the event to `kaya.dlq.<name>` and moves on.

    `name` is the durable consumer's name, the checkpoint's and the DLQ subject's token;
    `tables` are the tables it owns (created from `ddl`); `accepts` the event types and
    (current) versions `handle` was written for, None for whatever the app's entities
    declare; `unknown_event_policy` what to do with any other event. Events reach
    `handle` upcast to their type's current version.
    """

    name: ClassVar[str]
    filter_subject: ClassVar[str] = EVENT_SUBJECTS
    ddl: ClassVar[str] = ""
    tables: ClassVar[tuple[str, ...]] = ()
    accepts: ClassVar[Mapping[str, AbstractSet[int]] | None] = None
    unknown_event_policy: ClassVar[UnknownEventPolicy] = "dead_letter"

    context: Context
    """Set by `bind` before the first event."""

    def bind(self, context: Context) -> None:
        """Called by the node before the first event; override to set up per-node state."""
        self.context = context

    async def handle(self, event: Delivered, effects: Effects) -> None:
        raise NotImplementedError

    def checkpoint_name(self) -> str:
        return f"consumer:{self.name}"

    def sequence_checkpoint_name(self) -> str:
        return f"consumer:{self.name}:stream-seq"


class Projection(Consumer):
    """A consumer whose only effects are SQL on its own `tables`: a CQRS read model.

    Because nothing else depends on its side effects, `kaya replay NAME` can rebuild
    it from the store's history and swap it in while the node runs.
    """
