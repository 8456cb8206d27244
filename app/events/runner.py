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
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
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
    HEADER_POSITION,
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
from kaya.store import EventStore, StoreError

if TYPE_CHECKING:
    from kaya.app.observability.tracing import Tracing

log = logging.getLogger("kaya.consumers")


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


RESUBSCRIBE = Backoff(initial=0.2, cap=5.0)
"""Between attempts to recreate a durable the server lost (it may be restarting)."""


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
        self._handled = 0
        self._skipped = 0
        self._retries = 0
        self._dead_lettered = 0
        self._checkpoint = 0
        self._unknown_events = 0
        self._stopped = ""
        self._seq = 0
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
        )

    async def wait_for_position(self, position: int) -> None:
        """Until the consumer has applied (or skipped past) the store position `position`."""
        while self._checkpoint < position:
            await self._progress.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await ensure_tables(self._store, self.consumer)
        self._checkpoint = await self._store.checkpoint(self.consumer.checkpoint_name())
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
                    if position > self._checkpoint:
                        items.append((position, Effects()))
                continue
            try:
                event = parse_event(msg.subject, msg.headers, msg.data, stream_seq=stream_seq)
            except MalformedEvent as exc:
                log.error("consumer %s: %s", self.consumer.name, exc)
                await self._dead_letter_raw(msg, exc)
                continue
            if event.position <= self._checkpoint:
                self._skipped += 1
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
        try:
            self._checkpoint = await apply_batch(
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
                self._checkpoint = await apply_batch(
                    self._store, self.consumer, [(position, effects)]
                )
            except StoreError as exc:
                log.error(
                    "consumer %s: effects of position %d failed: %s",
                    self.consumer.name,
                    position,
                    exc,
                )
                self._checkpoint = await apply_batch(
                    self._store, self.consumer, [(position, Effects())]
                )
                await self._dead_letter_position(position, exc)
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
