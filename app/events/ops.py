"""Operator tools behind `kaya streams`, `kaya dlq ...`, `kaya replay` and `kaya tail`.

Each is a library function first (tests call them), and the CLI prints what they
return. They talk to JetStream like the NATS CLI would, and to the node's SQLite
file directly (WAL lets them work beside a running node).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from kaya.actors import Registry, UnknownSchema
from kaya.actors.wire import (
    DLQ_STREAM,
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
    delivered_from_stored,
    dlq_subject,
    event_subject,
    parse_event,
    subscribes,
)
from kaya.app.events.consumers import (
    Consumer,
    Effects,
    admit,
    ensure_tables,
)
from kaya.store import EventStore, StoredEvent, StoreError, Transaction, open_event_store

ViewReader = Callable[[EventStore], Any]

# ---- kaya streams -------------------------------------------------------------------


async def describe_streams(js: JetStreamContext) -> list[dict[str, Any]]:
    """Streams and their consumers with lag, as `nats stream ls` / `nats consumer ls` show."""
    result = []
    for name in (EVENTS_STREAM, DLQ_STREAM):
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            result.append({"stream": name, "missing": True})
            continue
        consumers = []
        for consumer in await js.consumers_info(name):
            consumers.append(
                {
                    "name": consumer.name,
                    "pending": consumer.num_pending or 0,
                    "ack_pending": consumer.num_ack_pending or 0,
                    "redelivered": consumer.num_redelivered or 0,
                    "lag": (consumer.num_pending or 0) + (consumer.num_ack_pending or 0),
                    "delivered_seq": consumer.delivered.stream_seq if consumer.delivered else 0,
                    "ack_floor_seq": consumer.ack_floor.stream_seq if consumer.ack_floor else 0,
                }
            )
        state = info.state
        result.append(
            {
                "stream": name,
                "subjects": info.config.subjects,
                "messages": state.messages,
                "bytes": state.bytes,
                "first_seq": state.first_seq,
                "last_seq": state.last_seq,
                "consumers": consumers,
            }
        )
    return result


# ---- kaya dlq -----------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    consumer: str
    original_subject: str
    original_seq: int
    attempts: int
    last_error: str
    event_type: str
    event_id: str
    time: str
    headers: dict[str, str]
    data: bytes

    def summary(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "consumer": self.consumer,
            "subject": self.original_subject,
            "type": self.event_type,
            "attempts": self.attempts,
            "error": self.last_error,
        }


def _dead_letter(raw: RawStreamMsg) -> DeadLetter:
    headers = {str(k): str(v) for k, v in (raw.headers or {}).items()}
    return DeadLetter(
        seq=raw.seq or 0,
        consumer=headers.get(HEADER_CONSUMER, (raw.subject or "").rsplit(".", 1)[-1]),
        original_subject=headers.get(HEADER_ORIGINAL_SUBJECT, ""),
        original_seq=int(headers.get(HEADER_ORIGINAL_SEQUENCE, "0") or 0),
        attempts=int(headers.get(HEADER_ATTEMPTS, "0") or 0),
        last_error=headers.get(HEADER_LAST_ERROR, ""),
        event_type=headers.get(HEADER_EVENT_TYPE, ""),
        event_id=headers.get(HEADER_EVENT_ID, ""),
        time=raw.time.isoformat() if raw.time else "",
        headers=headers,
        data=raw.data or b"",
    )


async def list_dead_letters(
    js: JetStreamContext, consumer: str | None = None, *, limit: int = 10_000
) -> list[DeadLetter]:
    subject = dlq_subject(consumer) if consumer else "kaya.dlq.>"
    letters: list[DeadLetter] = []
    seq = 1
    while len(letters) < limit:
        try:
            raw = await js.get_msg(DLQ_STREAM, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        letters.append(_dead_letter(raw))
        seq = (raw.seq or seq) + 1
    return letters


async def show_dead_letter(js: JetStreamContext, seq: int) -> DeadLetter:
    try:
        return _dead_letter(await js.get_msg(DLQ_STREAM, seq=seq))
    except NotFoundError:
        raise LookupError(f"no dead letter with sequence {seq} in {DLQ_STREAM}") from None


async def purge_dead_letters(js: JetStreamContext, consumer: str | None = None) -> int:
    before = (await js.stream_info(DLQ_STREAM)).state.messages
    await js.purge_stream(DLQ_STREAM, subject=dlq_subject(consumer) if consumer else None)
    after = (await js.stream_info(DLQ_STREAM)).state.messages
    return int(before - after)


_REPLAYED_DDL = (
    "CREATE TABLE IF NOT EXISTS replayed_dead_letters ("
    " consumer TEXT NOT NULL, event_id TEXT NOT NULL, replayed_at REAL NOT NULL,"
    " PRIMARY KEY (consumer, event_id)) WITHOUT ROWID"
)


@dataclass
class ReplayOutcome:
    replayed: list[int]
    failed: dict[int, str]
    skipped: list[int]


def _delivered_from_letter(letter: DeadLetter) -> Delivered:
    return parse_event(
        letter.original_subject, letter.headers, letter.data, stream_seq=letter.original_seq
    )


async def replay_dead_letters(
    js: JetStreamContext,
    store: EventStore,
    consumers: Mapping[str, Consumer],
    *,
    consumer: str | None = None,
    seq: int | None = None,
    registry: Registry | None = None,
) -> ReplayOutcome:
    """Run each dead letter through its consumer again; delete it once applied.

    The effects and a `replayed_dead_letters` row commit in one transaction, so a
    replay interrupted before the delete is not applied twice when run again.
    """
    letters = [await show_dead_letter(js, seq)] if seq else await list_dead_letters(js, consumer)
    async with store.transaction() as tx:
        await tx.execute(_REPLAYED_DDL)
    outcome = ReplayOutcome(replayed=[], failed={}, skipped=[])
    for letter in letters:
        handler = consumers.get(letter.consumer)
        if handler is None:
            outcome.failed[letter.seq] = f"no consumer named {letter.consumer!r} here"
            continue
        effects = Effects()
        try:
            event = admit(handler, _delivered_from_letter(letter), registry)
            await handler.handle(event, effects)
            async with store.transaction() as tx:
                fresh = await tx.execute(
                    "INSERT OR IGNORE INTO replayed_dead_letters VALUES (?, ?, julianday('now'))",
                    (letter.consumer, letter.event_id or f"dlq-{letter.seq}"),
                )
                if fresh:
                    for sql, params in effects.statements:
                        await tx.execute(sql, params)
        except (Exception, StoreError) as exc:
            outcome.failed[letter.seq] = f"{type(exc).__name__}: {exc}"
            continue
        (outcome.replayed if fresh else outcome.skipped).append(letter.seq)
        with contextlib.suppress(NotFoundError):
            await js.delete_msg(DLQ_STREAM, letter.seq)
    return outcome


# ---- kaya replay (rebuild a read model) -------------------------------------------------


@dataclass
class RebuildOutcome:
    events: int
    position: int
    identical_before_swap: bool | None
    swapped: bool


async def rebuild_projection(
    store: EventStore,
    consumer: Consumer,
    *,
    view: ViewReader | None = None,
    progress: Callable[[int, int], None] | None = None,
    swap: bool = True,
    batch: int = 1000,
    registry: Registry | None = None,
) -> RebuildOutcome:
    """Rebuild a read model from the event store, from scratch, then swap it in.

    The model is built in a scratch SQLite file from every stored event, with the
    consumer's own handler. Then, in one transaction on the live store, its tables
    are replaced, events committed meanwhile are applied too, and its checkpoint is
    set to the last of them: the live consumer skips what the rebuild already
    applied and carries on after it. With the `registry`, events reach the handler
    in their current shape, as the live consumer sees them.
    """
    if consumer.filter_subject.startswith("kaya.evt.") is False or not consumer.tables:
        raise ValueError(f"{consumer.name} has no read model to rebuild")
    total = await store.last_position()
    with tempfile.TemporaryDirectory(prefix="kaya-rebuild-") as scratch_dir:
        scratch_path = Path(scratch_dir) / "rebuild.db"
        async with open_event_store(scratch_path, synchronous="OFF") as scratch:
            await ensure_tables(scratch, consumer)
            position = events = 0
            while True:
                stored = await store.read_all(position, batch)
                if not stored:
                    break
                async with scratch.transaction() as tx:
                    for event in stored:
                        if subscribes(
                            consumer.filter_subject, event_subject(event.entity, event.entity_id)
                        ):
                            await _apply_stored(consumer, event, registry, tx)
                        events += 1
                    position = stored[-1].position
                    await tx.set_checkpoint(consumer.checkpoint_name(), position)
                if progress:
                    progress(position, max(total, position))
            identical = None
            if view is not None and await store.checkpoint(consumer.checkpoint_name()) == position:
                identical = _comparable(await view(scratch)) == _comparable(await view(store))
        if not swap:
            return RebuildOutcome(events, position, identical, False)
        position = await _swap_in(store, consumer, scratch_path, position, registry)
    return RebuildOutcome(events, position, identical, True)


async def _apply_stored(
    consumer: Consumer, stored: StoredEvent, registry: Registry | None, tx: Transaction
) -> None:
    """One stored event through the consumer as its live runner would take it."""
    try:
        event = admit(consumer, delivered_from_stored(stored), registry)
    except UnknownSchema:
        if consumer.unknown_event_policy == "stop":
            raise
        return  # the live consumer dead-letters or skips it: no effects here either
    effects = Effects()
    await consumer.handle(event, effects)
    for sql, params in effects.statements:
        await tx.execute(sql, params)


async def _swap_in(
    store: EventStore,
    consumer: Consumer,
    scratch: Path,
    position: int,
    registry: Registry | None = None,
) -> int:
    await ensure_tables(store, consumer)
    async with store.transaction(attach={"rebuilt": scratch}) as tx:
        for table in consumer.tables:
            await tx.execute(f"DELETE FROM main.{table}")
            await tx.execute(f"INSERT INTO main.{table} SELECT * FROM rebuilt.{table}")
        while True:  # what the node committed while we were rebuilding
            rows = await tx.fetchall(
                "SELECT position, event_id, entity, entity_id, version, type, schema_version,"
                " data, recorded_at, command_id, traceparent FROM main.events"
                " WHERE position > ? ORDER BY position LIMIT 1000",
                (position,),
            )
            if not rows:
                break
            for row in rows:
                event = StoredEvent(*row)
                if subscribes(
                    consumer.filter_subject, event_subject(event.entity, event.entity_id)
                ):
                    await _apply_stored(consumer, event, registry, tx)
                position = event.position
        await tx.set_checkpoint(consumer.checkpoint_name(), position)
    return position


def _comparable(view: Any) -> Any:
    if isinstance(view, dict):
        return {k: _comparable(v) for k, v in view.items() if k != "position"}
    return view


# ---- kaya tail --------------------------------------------------------------------------


async def tail_events(
    nc: NATS, subject: str = "kaya.evt.>", *, from_start: bool = False
) -> AsyncIterator[dict[str, Any]]:
    """Follow KAYA_EVENTS with an ordered consumer: nothing stored server-side."""
    js = nc.jetstream()
    sub = await js.subscribe(
        subject,
        stream=EVENTS_STREAM,
        ordered_consumer=True,
        deliver_policy=None if from_start else nats.js.api.DeliverPolicy.NEW,
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=3600)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            headers = msg.headers or {}
            yield {
                "subject": msg.subject,
                "seq": msg.metadata.sequence.stream,
                "type": headers.get(HEADER_EVENT_TYPE),
                "version": int(headers.get("Kaya-Entity-Version", "0")),
                "position": int(headers.get(HEADER_POSITION, "0")),
                "event_id": headers.get(HEADER_MSG_ID),
                "data": msg.data.decode(errors="replace"),
            }
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await sub.unsubscribe()
