"""The consumer runner: KAYA_EVENTS -> `Consumer.handle` -> one SQLite transaction a batch.

    durable pull (whole stream, in order) -> filter_subject -> admit -> handle, retried
      -> effects + checkpoint (position, stream sequence) in one transaction -> one ack

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

Positions are trusted only when the store backs them. Anyone who can publish on
`kaya.evt.>` can put a message on KAYA_EVENTS, and one message claiming position
10^12 would otherwise move the checkpoint there and make the consumer skip every
real event after it. So each message past the checkpoint is checked against the
event the store holds at its position (one read per batch): a position ahead of
the store, a missing envelope, or an envelope or body that differs from the
store's is dead-lettered with the reason and moves no checkpoint, on the handled
path and on the path that passes over events outside `filter_subject` alike.

Failures never leave the runner: a batch that cannot be committed (a full disk,
a broken database), a broker that does not answer, a subscription that cannot be
made: the runner records it (`statistics().health`), backs off, and starts again
after its checkpoint, so the node's command serving never notices and the
consumer resumes by itself once the cause is gone. Only an effect's own SQL
failing (a constraint, a typo in the handler's statement) is the event's fault,
and that event is dead-lettered so the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from kaya.actors import Registry, UnknownSchema
from kaya.actors.retry import Backoff
from kaya.actors.runtime import trace_id
from kaya.actors.wire import (
    EVENT_SUBJECTS,
    EVENTS_STREAM,
    Delivered,
    MalformedEvent,
    delivered_from_stored,
    parse_event,
    subscribes,
)
from kaya.app.broker.pull import PREFETCH, LeanPull, ack_tokens
from kaya.app.config import ConsumersConfig
from kaya.app.events.admission import admit
from kaya.app.events.consumers import Consumer, Effects
from kaya.app.events.dlq import publish_dead_letter, publish_malformed
from kaya.app.events.envelopes import Untrusted, stored_envelopes, unbacked
from kaya.app.events.failing import Failing, PartHealth
from kaya.store import EventStore

if TYPE_CHECKING:
    from kaya.app.observability.tracing import Tracing

log = logging.getLogger("kaya.consumers")


class EffectsFailed(Exception):
    """A handler's own SQL failed (a constraint, a typo, a wrong parameter): the fault of
    the events whose effects it was, not of the store, so retrying cannot help."""


_STORE_FAULTS = frozenset(
    {
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_ABORT,
    }
)
"""SQLite result codes that say the database, not the statement, failed: retry later."""


def _store_fault(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _STORE_FAULTS


async def apply_batch(
    store: EventStore,
    consumer: Consumer,
    items: Sequence[tuple[int, Effects]],
    *,
    stream_seq: int | None = None,
) -> int:
    """Apply effects newer than the checkpoint and advance it, in one transaction.

    Raises EffectsFailed when the effects' own SQL fails (nothing applied), StoreError
    when the store does (a full disk: nothing applied, try again later).
    """
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
        try:
            await tx.execute_in_order(statements)
        except sqlite3.Error as exc:
            if _store_fault(exc):
                raise  # the store makes a StoreError of it
            raise EffectsFailed(f"{type(exc).__name__}: {exc}") from exc
        except (TypeError, ValueError, OverflowError) as exc:  # a parameter SQLite refuses
            raise EffectsFailed(f"{type(exc).__name__}: {exc}") from exc
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


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerStatistics:
    """A frozen view of a runner's counters (for health, metrics and tests)."""

    handled: int
    skipped: int
    retries: int
    dead_lettered: int
    checkpoint: int
    """The store position applied up to (or skipped past)."""
    unknown: int
    """Events of an unknown type or version, handled by the consumer's policy."""
    stopped: str
    """Why the consumer stopped (policy `stop`), or empty while it runs."""
    untrusted: int = 0
    """Messages the store did not back (a bogus position or envelope): dead-lettered."""
    health: PartHealth = field(default_factory=PartHealth)
    """Failing since when, errors so far: a failure is retried, never raised."""

    @property
    def healthy(self) -> bool:
        return self.health.healthy and not self.stopped


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
        durable: str | None = None,
        shared: bool = False,
        before_batch: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """In a cluster (replicated durability): `durable` names the JetStream consumer
        (a projection's is per node: `<name>-<node>`); `shared` marks a consumer that
        runs on one node at a time and moves with its lease, so a new holder starts after
        what the previous one acknowledged, not from its own older checkpoint; and
        `before_batch(seq)` waits until the local store holds the events up to `seq`
        (positions are stream sequences there, checked against the store)."""
        self._durable = durable or consumer.name
        self._shared = shared
        self._before_batch = before_batch
        self._tracing = tracing
        self._nc = nc
        self._registry = registry
        self._js: JetStreamContext = nc.jetstream()
        self._store = store
        self.consumer = consumer
        self._config = config
        self._backoff = Backoff(initial=config.backoff_initial, cap=config.backoff_max)
        self._handled = 0
        self._skipped = 0
        self._retries = 0
        self._dead_lettered = 0
        self._checkpoint = 0
        self._unknown_events = 0
        self._stopped = ""
        self._untrusted = 0
        self._seq = 0
        self._prepared = False
        self._failing = Failing()
        self._progress = anyio.Event()

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(
            handled=self._handled,
            skipped=self._skipped,
            retries=self._retries,
            dead_lettered=self._dead_lettered,
            checkpoint=self._checkpoint,
            unknown=self._unknown_events,
            stopped=self._stopped,
            untrusted=self._untrusted,
            health=self._failing.snapshot(),
        )

    async def wait_for_position(self, position: int) -> None:
        """Until the consumer has applied (or skipped past) the store position `position`."""
        while self._checkpoint < position:
            await self._progress.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume until cancelled, the connection is closed, or policy `stop` stops it.

        Nothing it meets is raised: a failure is recorded, waited out (the consumer's
        backoff) and followed by a fresh start after the checkpoint. A consumer that
        cannot even start (its tables, its durable) does not hold up the node's start.
        """
        pull: LeanPull | None = None
        try:
            pull = await self._start()
        except nats.errors.ConnectionClosedError:
            task_status.started()
            return
        except Exception as exc:
            self._failed("starting", exc)
        task_status.started()
        try:
            while True:
                try:
                    if pull is None:
                        if self._failing.in_a_row:
                            await anyio.sleep(self._backoff.delay(self._failing.in_a_row))
                        pull = await self._start()
                    msgs = await pull.next_batch(timeout=1.0)
                    if not msgs:  # nothing new within a second: nothing is failing either
                        self._recovered()
                        continue
                    in_order = await self._handle_batch(msgs)
                    self._recovered()
                    if self._stopped:
                        log.error("consumer %s stopped: %s", self.consumer.name, self._stopped)
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
                except Exception as exc:  # a full disk, a broker away, a bug: never the node's
                    self._failed("batch" if pull is not None else "re-subscribing", exc)
                if pull is not None:  # start over after the checkpoint: in order, nothing lost
                    await pull.stop()
                    pull = None
        finally:
            if pull is not None:
                with anyio.CancelScope(shield=True):
                    await pull.stop()

    async def _start(self) -> LeanPull:
        """Tables and checkpoints (once), then a durable delivering what follows them."""
        if not self._prepared:
            await ensure_tables(self._store, self.consumer)
            self._checkpoint = await self._store.checkpoint(self.consumer.checkpoint_name())
            self._seq = await self._store.checkpoint(self.consumer.sequence_checkpoint_name())
            self._prepared = True
        return await self._subscribe_after_checkpoint()

    def _failed(self, what: str, error: BaseException) -> None:
        attempt = self._failing.failed(error)
        log.warning(
            "consumer %s: %s failed (%r); starting again after its checkpoint (attempt %d)",
            self.consumer.name,
            what,
            error,
            attempt,
        )

    def _recovered(self) -> None:
        if self._failing.recovered():
            log.info("consumer %s: recovered", self.consumer.name)

    async def _subscribe_after_checkpoint(self) -> LeanPull:
        """(Re)create the durable consumer to deliver, in order, what follows the checkpoint.

        The durable reads the whole stream and the runner applies `filter_subject`
        itself: a server-side filter on a stream with one subject per entity costs
        nats-server about four times the CPU of the delivery (bench.consumers).
        """
        if self._shared:
            with contextlib.suppress(NotFoundError):
                held = await self._js.consumer_info(EVENTS_STREAM, self._durable)
                floor = held.ack_floor.stream_seq if held.ack_floor else 0
                if floor and floor > self._seq:  # the previous holder got that far
                    self._seq = floor
                    self._checkpoint = max(self._checkpoint, floor)
        start = self._seq + 1
        with contextlib.suppress(NotFoundError):
            info = await self._js.stream_info(EVENTS_STREAM)
            if info.state.last_seq < self._seq:  # the stream was reset: positions still guard
                start = 1
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(EVENTS_STREAM, self._durable)
        batch = self._config.fetch_batch
        config = ConsumerConfig(
            durable_name=self._durable,
            description=f"Kaya consumer {self.consumer.name}",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.ALL,  # one ack per batch: acking the last acks all before
            ack_wait=self._config.ack_wait,
            max_ack_pending=batch * PREFETCH,  # the next batch arrives while one is handled
            filter_subject=EVENT_SUBJECTS,
        )
        await self._js.add_consumer(EVENTS_STREAM, config)
        pull = LeanPull(self._nc, EVENTS_STREAM, self._durable, batch=batch)
        await pull.start()
        return pull

    async def _handle_batch(self, msgs: list[Msg]) -> bool:
        """Check, handle, commit, ack. False when a redelivery means delivery must restart."""
        in_order = True
        batch: list[tuple[Msg, int, Delivered | MalformedEvent]] = []
        for msg in msgs:
            delivered, stream_seq = ack_tokens(msg.reply)
            if delivered > 1 and stream_seq > self._seq:
                in_order = False  # JetStream redelivers out of order: resume from SQLite
                break
            try:
                envelope: Delivered | MalformedEvent = parse_event(
                    msg.subject, msg.headers, msg.data, stream_seq=stream_seq
                )
            except MalformedEvent as exc:
                envelope = exc
            batch.append((msg, stream_seq, envelope))
        if self._before_batch is not None and batch:
            await self._before_batch(max(seq for _, seq, _ in batch))
        checkpoint = self._checkpoint
        # one read of the store for every position past the checkpoint: the judge of them
        newer = {e.position for _, _, e in batch if isinstance(e, Delivered)}
        newer = {p for p in newer if p > checkpoint}
        held = await stored_envelopes(self._store, newer) if newer else {}
        last_position = await self._store.last_position() if len(held) < len(newer) else 0

        items: list[tuple[int, Effects]] = []
        handled: list[Msg] = []
        stopped = ""
        last_seq = self._seq
        wanted = self.consumer.filter_subject
        for msg, stream_seq, envelope in batch:
            seq_before = last_seq
            handled.append(msg)
            last_seq = max(last_seq, stream_seq)
            if isinstance(envelope, MalformedEvent):
                log.error("consumer %s: %s", self.consumer.name, envelope)
                await self._dead_letter_raw(msg, envelope)
                continue
            event = envelope
            mine = wanted == EVENT_SUBJECTS or subscribes(wanted, msg.subject)
            if event.position <= checkpoint:
                self._skipped += mine  # applied already: a redelivery or a republish
                continue
            why = unbacked(event, held.get(event.position), last_position)
            if why:
                await self._reject(msg, why)
                continue
            if not mine:
                # not this consumer's: never seen, but passed, so its checkpoint (and lag)
                # counts it as done
                items.append((event.position, Effects()))
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
        self._stopped = stopped  # once what came before it is committed
        # wake every waiter, then arm a fresh event: a waiter that made its own would
        # leave an earlier one waiting on an event nobody sets any more
        self._progress.set()
        self._progress = anyio.Event()
        return in_order

    async def _reject(self, msg: Msg, why: str) -> None:
        """Dead-letter a message the store does not back; its position is not believed."""
        self._untrusted += 1
        log.error(
            "consumer %s: %s at stream sequence %d: dead-lettered, checkpoint kept",
            self.consumer.name,
            why,
            ack_tokens(msg.reply)[1],
        )
        await self._dead_letter_raw(msg, Untrusted(why))

    async def _unknown(self, event: Delivered, error: UnknownSchema) -> bool:
        """Apply the unknown-event policy; False when the consumer must stop here."""
        self._unknown_events += 1
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
                self._handled += 1
                return effects
            except Exception as exc:
                self._failing.failed(exc)
                if attempt >= self._config.max_attempts:
                    await self.dead_letter(event, attempt, exc)
                    return Effects()
                self._retries += 1
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
        """Commit the batch; if one event's SQL fails, isolate it and dead-letter it.

        A StoreError (the store itself failing) is raised: the whole batch is tried
        again later, and no event is blamed for a full disk.
        """
        try:
            self._checkpoint = await apply_batch(
                self._store, self.consumer, items, stream_seq=stream_seq
            )
            self._seq = stream_seq
            return
        except EffectsFailed as exc:
            log.warning(
                "consumer %s: batch failed (%s); applying one by one", self.consumer.name, exc
            )
        for position, effects in items:  # isolate the event whose SQL fails
            try:
                self._checkpoint = await apply_batch(
                    self._store, self.consumer, [(position, effects)]
                )
            except EffectsFailed as exc:
                log.error(
                    "consumer %s: effects of position %d failed: %s",
                    self.consumer.name,
                    position,
                    exc,
                )
                await self._dead_letter_position(position, exc)
                self._checkpoint = await apply_batch(
                    self._store, self.consumer, [(position, Effects())]
                )
        self._checkpoint = await apply_batch(self._store, self.consumer, [], stream_seq=stream_seq)
        self._seq = stream_seq

    async def dead_letter(self, event: Delivered, attempts: int, error: BaseException) -> None:
        """Publish the event to KAYA_DLQ with why, then move on (the checkpoint passes it)."""
        await publish_dead_letter(self._js, self.consumer.name, event, attempts, error)
        self._dead_lettered += 1
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
        await publish_malformed(self._js, self.consumer.name, msg, error)
        self._dead_lettered += 1

    async def _dead_letter_position(self, position: int, error: BaseException) -> None:
        events = await self._store.read_all(position - 1, 1)
        if events and events[0].position == position:
            await self.dead_letter(delivered_from_stored(events[0]), 1, error)
