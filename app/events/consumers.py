"""Consumers: one way to react to events, for projections, notifications and sagas.

    KAYA_EVENTS --durable pull consumer--> handler(event, effects)
        local effects (SQL) + checkpoint  -> one SQLite transaction  (effectively once)
        external effects (publish, call)  -> idempotent by event id  (at least once)
        a failing event: retried with exponential backoff and jitter, then KAYA_DLQ

The consumer reads in stream order, one batch at a time, and handles a batch's
events one after the other, so the events of one entity are handled in their
order; a slow consumer simply fetches less (nothing is dropped or buffered
without bound).

Schemas: before `handle`, the runner brings an event to its type's current version
(the producing entity's upcasters, so a consumer only ever sees the current shape)
and checks the consumer's `accepts`. An event whose entity, type or version it does
not know (a newer producer, a removed type) is handled by `unknown_event_policy`:
dead-letter it (the default: replay once the consumer knows it), skip it, or stop
the consumer (it leaves the event unacknowledged and waits for a fixed deployment);
never a crash, never a retry loop.

Where a consumer is comes from SQLite, not from the broker's ack state: the
checkpoint holds the store position of the last event applied (the
`Kaya-Position` header) and the stream sequence it came with. On start, and
whenever JetStream redelivers something (which it does out of order), the
durable consumer is recreated to deliver from the stream sequence after the
checkpoint, so delivery is always in order. The position is re-read inside the
transaction that applies a batch, so a republished event, or one already applied
by a rebuild (`kaya replay`), is skipped, never applied twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from kaya.actors import Registry, UnknownSchema
from kaya.actors.retry import Backoff
from kaya.actors.runtime import trace_id
from kaya.app.config import ConsumersConfig

if TYPE_CHECKING:
    from kaya.app.observability.tracing import Tracing
from kaya.actors.wire import (
    EVENT_SUBJECTS,
    EVENTS_STREAM,
    HEADER_ATTEMPTS,
    HEADER_CONSUMER,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_LAST_ERROR,
    HEADER_MSG_ID,
    HEADER_ORIGINAL_SEQUENCE,
    HEADER_ORIGINAL_SUBJECT,
    HEADER_POSITION,
    Delivered,
    MalformedEvent,
    delivered_from_stored,
    dlq_subject,
    parse_event,
    subscribes,
)
from kaya.app.broker.pull import PREFETCH, LeanPull, ack_tokens
from kaya.store import EventStore, StoreError

log = logging.getLogger("kaya.consumers")

UnknownEventPolicy = Literal["dead_letter", "skip", "stop"]


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

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only SQL query against the node's store."""
        return await self.store.query(sql, params)

    async def checkpoint(self, consumer: str) -> int:
        """The store position a consumer has applied up to (0 before its first event)."""
        return await self.store.checkpoint(f"consumer:{consumer}")


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


def current_shape(event: Delivered, registry: Registry) -> Delivered:
    """The event at its type's current version, as the producing entity's code reads it.

    Raises UnknownSchema when the registry does not know the entity, the type or
    the version (one newer than the code).
    """
    if event.entity not in registry:
        raise UnknownSchema(f"no entity named {event.entity!r} is registered here")
    entity = registry.get(event.entity)
    if entity.event_versions.get(event.type) == event.schema_version:
        return event
    try:
        decoded = entity.decode_event(event.type, event.schema_version, event.data)
    except UnknownSchema:
        raise
    except Exception as exc:  # the upcaster or the decoder refused it: this code cannot read it
        raise UnknownSchema(f"{event.type} v{event.schema_version} does not read: {exc!r}") from exc
    type_name, version = type(decoded).__name__, type(decoded).schema_version
    headers = {**event.headers, HEADER_EVENT_TYPE: type_name, "Kaya-Schema-Version": str(version)}
    return msgspec.structs.replace(
        event,
        type=type_name,
        schema_version=version,
        data=msgspec.json.encode(decoded),
        headers=headers,
    )


def admit(consumer: Consumer, event: Delivered, registry: Registry | None) -> Delivered:
    """The event as `consumer.handle` should get it; UnknownSchema when it must not get it."""
    if registry is not None:
        event = current_shape(event, registry)
    if consumer.accepts is not None and event.schema_version not in consumer.accepts.get(
        event.type, ()
    ):
        raise UnknownSchema(
            f"consumer {consumer.name} does not accept {event.type} v{event.schema_version}"
        )
    return event


async def apply_batch(
    store: EventStore,
    consumer: Consumer,
    items: Sequence[tuple[int, Effects]],
    *,
    stream_seq: int | None = None,
) -> int:
    """Apply effects newer than the checkpoint and advance it, in one transaction."""
    async with store.transaction(durable=False) as tx:  # derived: a replay redoes it
        name = consumer.checkpoint_name()
        checkpoint = await tx.checkpoint(name)
        statements = []
        for position, effects in items:
            if position <= checkpoint:
                continue
            statements.extend(effects.statements)
            checkpoint = position
        # one database hop per run of identical statements, not one per statement: the
        # write lock is held meanwhile, and the group commit of every actor waits for it
        await tx.execute_in_order(statements)
        await tx.set_checkpoint(name, checkpoint)
        if stream_seq is not None:
            await tx.set_checkpoint(consumer.sequence_checkpoint_name(), stream_seq)
        return checkpoint


async def ensure_tables(store: EventStore, consumer: Consumer) -> None:
    if consumer.ddl:
        async with store.transaction() as tx:
            for statement in filter(None, (s.strip() for s in consumer.ddl.split(";"))):
                await tx.execute(statement)


def _log_fields(consumer: str, event: Delivered) -> dict[str, Any]:
    """What a log line about an event carries, so it can be found from its trace."""
    return {
        "consumer": consumer,
        "entity": event.entity,
        "id": event.entity_id,
        "event_id": event.event_id,
        "trace_id": trace_id(event.traceparent),
    }


async def _unsubscribe(sub: Any) -> None:
    try:
        await sub.unsubscribe()
    except Exception:  # the connection may be closed already: nothing to release then
        log.debug("unsubscribe failed", exc_info=True)


RESUBSCRIBE = Backoff(initial=0.2, cap=5.0)
"""Between attempts to recreate a durable the server lost (it may be restarting)."""


@dataclass
class ConsumerStatistics:
    handled: int = 0
    skipped: int = 0
    retries: int = 0
    dead_lettered: int = 0
    checkpoint: int = 0
    unknown: int = 0
    """Events of an unknown type or version, handled by the consumer's policy."""
    stopped: str = ""
    """Why the consumer stopped (policy `stop`), or empty while it runs."""


DeadLetterHook = Callable[[Delivered, int, BaseException], Awaitable[None]]


class ConsumerRunner:
    """Runs one consumer against KAYA_EVENTS until cancelled (or stopped by its policy).

    With a `registry`, events are upcast to their current version before `handle`.
    """

    def __init__(
        self,
        nc: NATS,
        store: EventStore,
        consumer: Consumer,
        config: ConsumersConfig,
        *,
        registry: Registry | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing
        self._nc = nc
        self._registry = registry
        self._js: JetStreamContext = nc.jetstream()
        self._store = store
        self.consumer = consumer
        self._config = config
        self._backoff = Backoff(initial=config.backoff_initial, cap=config.backoff_max)
        self.stats = ConsumerStatistics()
        self._seq = 0
        self._progress = anyio.Event()

    async def wait_for_position(self, position: int) -> None:
        """Until the consumer has applied (or skipped past) the store position `position`."""
        while self.stats.checkpoint < position:
            await self._progress.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await ensure_tables(self._store, self.consumer)
        self.stats.checkpoint = await self._store.checkpoint(self.consumer.checkpoint_name())
        self._seq = await self._store.checkpoint(self.consumer.sequence_checkpoint_name())
        pull = await self._subscribe_after_checkpoint()
        task_status.started()
        failures = 0
        try:
            while True:
                try:
                    msgs = await pull.next_batch(timeout=1.0)
                    if not msgs:  # nothing new within a second
                        continue
                    failures = 0
                    in_order = await self._handle_batch(msgs)
                    if self.stats.stopped:
                        log.error("consumer %s stopped: %s", self.consumer.name, self.stats.stopped)
                        return
                    if in_order:
                        continue
                    log.info(
                        "consumer %s: redelivery seen; restarting after sequence %d",
                        self.consumer.name,
                        self._seq,
                    )
                except nats.errors.ConnectionClosedError:
                    return
                except nats.errors.Error as exc:
                    # the server restarted and lost the consumer, or is not there yet
                    failures += 1
                    log.warning(
                        "consumer %s: pull failed (%r); re-subscribing", self.consumer.name, exc
                    )
                    await RESUBSCRIBE.sleep(failures)
                try:
                    await pull.stop()
                    pull = await self._subscribe_after_checkpoint()
                except nats.errors.Error as exc:
                    log.warning("consumer %s: re-subscribing failed (%r)", self.consumer.name, exc)
        finally:
            with anyio.CancelScope(shield=True):
                await pull.stop()

    async def _subscribe_after_checkpoint(self) -> LeanPull:
        """(Re)create the durable consumer to deliver, in order, what follows the checkpoint.

        The durable reads the whole stream and the runner applies `filter_subject`
        itself: a server-side filter on a stream with one subject per entity costs
        nats-server about four times the CPU of the delivery (bench.consumers).
        """
        start = self._seq + 1
        with contextlib.suppress(NotFoundError):
            info = await self._js.stream_info(EVENTS_STREAM)
            if info.state.last_seq < self._seq:  # the stream was reset: positions still guard
                start = 1
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(EVENTS_STREAM, self.consumer.name)
        batch = self._config.fetch_batch
        config = ConsumerConfig(
            durable_name=self.consumer.name,
            description=f"Kaya consumer {self.consumer.name}",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.ALL,  # one ack per batch: acking the last acks all before
            ack_wait=self._config.ack_wait,
            max_ack_pending=batch * PREFETCH,  # the next batch arrives while one is handled
            filter_subject=EVENT_SUBJECTS,
        )
        await self._js.add_consumer(EVENTS_STREAM, config)
        pull = LeanPull(self._nc, EVENTS_STREAM, self.consumer.name, batch=batch)
        await pull.start()
        return pull

    async def _handle_batch(self, msgs: list[Msg]) -> bool:
        """Handle, commit, ack. False when a redelivery means delivery must restart."""
        items: list[tuple[int, Effects]] = []
        handled: list[Msg] = []
        in_order = True
        stopped = ""
        last_seq = self._seq
        wanted = self.consumer.filter_subject
        for msg in msgs:
            delivered, stream_seq = ack_tokens(msg.reply)
            if delivered > 1 and stream_seq > self._seq:
                in_order = False  # JetStream redelivers out of order: resume from SQLite
                break
            seq_before = last_seq
            handled.append(msg)
            last_seq = max(last_seq, stream_seq)
            if wanted != EVENT_SUBJECTS and not subscribes(wanted, msg.subject):
                # not this consumer's: never seen, but passed, so its checkpoint (and lag)
                # counts it as done
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    position = int(msg.headers[HEADER_POSITION])  # type: ignore[index]
                    if position > self.stats.checkpoint:
                        items.append((position, Effects()))
                continue
            try:
                event = parse_event(msg.subject, msg.headers, msg.data, stream_seq=stream_seq)
            except MalformedEvent as exc:
                log.error("consumer %s: %s", self.consumer.name, exc)
                await self._dead_letter_raw(msg, exc)
                continue
            if event.position <= self.stats.checkpoint:
                self.stats.skipped += 1
                continue
            try:
                event = admit(self.consumer, event, self._registry)
            except UnknownSchema as exc:
                if await self._unknown(event, exc):
                    items.append((event.position, Effects()))
                    continue
                handled.pop()  # policy `stop`: neither applied nor acknowledged
                last_seq = seq_before
                stopped = f"{exc} (position {event.position})"
                break
            items.append((event.position, await self._attempt(event, msg)))
        if last_seq > self._seq:
            await self._commit(items, last_seq)
        if handled:
            try:
                await handled[-1].ack()
            except nats.errors.Error:
                log.debug(
                    "consumer %s: ack failed; a redelivery will restart delivery",
                    self.consumer.name,
                )
        self.stats.stopped = stopped  # once what came before it is committed
        # wake every waiter, then arm a fresh event: a waiter that made its own would
        # leave an earlier one waiting on an event nobody sets any more
        self._progress.set()
        self._progress = anyio.Event()
        return in_order

    async def _unknown(self, event: Delivered, error: UnknownSchema) -> bool:
        """Apply the unknown-event policy; False when the consumer must stop here."""
        self.stats.unknown += 1
        policy = self.consumer.unknown_event_policy
        if policy == "stop":
            return False
        if policy == "dead_letter":
            await self.dead_letter(event, 0, error)
        else:
            log.warning("consumer %s: skipped: %s", self.consumer.name, error)
        return True

    async def _attempt(self, event: Delivered, msg: Msg) -> Effects:
        if self._tracing is None:
            return await self._attempts(event, msg)
        attributes = {
            "kaya.consumer": self.consumer.name,
            "kaya.event": event.type,
            "kaya.entity": event.entity,
            "kaya.id": event.entity_id,
            "kaya.position": event.position,
        }
        with self._tracing.span(
            f"kaya.consume {self.consumer.name}", event.traceparent, attributes
        ):
            return await self._attempts(event, msg)

    async def _attempts(self, event: Delivered, msg: Msg) -> Effects:
        attempt = 1
        while True:
            effects = Effects()
            try:
                await self.consumer.handle(event, effects)
                self.stats.handled += 1
                return effects
            except Exception as exc:
                if attempt >= self._config.max_attempts:
                    await self.dead_letter(event, attempt, exc)
                    return Effects()
                self.stats.retries += 1
                log.warning(
                    "consumer %s: %s at position %d failed (attempt %d): %r",
                    self.consumer.name,
                    event.type,
                    event.position,
                    attempt,
                    exc,
                    extra=_log_fields(self.consumer.name, event),
                )
                await self._backoff.sleep(attempt)
                if msg.reply:
                    await msg.in_progress()
                attempt += 1

    async def _commit(self, items: list[tuple[int, Effects]], stream_seq: int) -> None:
        try:
            self.stats.checkpoint = await apply_batch(
                self._store, self.consumer, items, stream_seq=stream_seq
            )
            self._seq = stream_seq
            return
        except StoreError as exc:
            log.warning(
                "consumer %s: batch failed (%s); applying one by one", self.consumer.name, exc
            )
        for position, effects in items:  # isolate the event whose SQL fails
            try:
                self.stats.checkpoint = await apply_batch(
                    self._store, self.consumer, [(position, effects)]
                )
            except StoreError as exc:
                log.error(
                    "consumer %s: effects of position %d failed: %s",
                    self.consumer.name,
                    position,
                    exc,
                )
                self.stats.checkpoint = await apply_batch(
                    self._store, self.consumer, [(position, Effects())]
                )
                await self._dead_letter_position(position, exc)
        self.stats.checkpoint = await apply_batch(
            self._store, self.consumer, [], stream_seq=stream_seq
        )
        self._seq = stream_seq

    async def dead_letter(self, event: Delivered, attempts: int, error: BaseException) -> None:
        """Publish the event to KAYA_DLQ with why, then move on (the checkpoint passes it)."""
        headers = {k: v for k, v in event.headers.items() if not k.startswith("Nats-")}
        headers.update(
            {
                HEADER_MSG_ID: f"{self.consumer.name}:{event.event_id}",
                HEADER_EVENT_ID: event.event_id,
                HEADER_CONSUMER: self.consumer.name,
                HEADER_ORIGINAL_SUBJECT: event.subject,
                HEADER_ORIGINAL_SEQUENCE: str(event.stream_seq),
                HEADER_ATTEMPTS: str(attempts),
                HEADER_LAST_ERROR: f"{type(error).__name__}: {error}"[:1000],
            }
        )
        while True:
            try:
                await self._js.publish(
                    dlq_subject(self.consumer.name), event.data, headers=headers, timeout=5
                )
                break
            except nats.errors.Error as exc:  # the DLQ must not lose it either: keep trying
                log.warning(
                    "consumer %s: dead-lettering failed (%r); retrying", self.consumer.name, exc
                )
                await anyio.sleep(1.0)
        self.stats.dead_lettered += 1
        log.error(
            "consumer %s: %s at position %d dead-lettered after %d attempts: %r",
            self.consumer.name,
            event.type,
            event.position,
            attempts,
            error,
            extra=_log_fields(self.consumer.name, event),
        )

    async def _dead_letter_raw(self, msg: Msg, error: BaseException) -> None:
        headers = dict(msg.headers or {})
        headers.pop(HEADER_MSG_ID, None)
        headers.update(
            {
                HEADER_CONSUMER: self.consumer.name,
                HEADER_ORIGINAL_SUBJECT: msg.subject,
                HEADER_ORIGINAL_SEQUENCE: str(ack_tokens(msg.reply)[1]),
                HEADER_ATTEMPTS: "1",
                HEADER_LAST_ERROR: f"{type(error).__name__}: {error}"[:1000],
            }
        )
        await self._js.publish(dlq_subject(self.consumer.name), msg.data, headers=headers)
        self.stats.dead_lettered += 1

    async def _dead_letter_position(self, position: int, error: BaseException) -> None:
        events = await self._store.read_all(position - 1, 1)
        if events and events[0].position == position:
            await self.dead_letter(delivered_from_stored(events[0]), 1, error)
