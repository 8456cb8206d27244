"""Dead letters (KAYA_DLQ): where a consumer puts an event it gave up on, and `kaya dlq`.

    runner: retries spent, an unknown schema, a malformed message
      -> publish_dead_letter / publish_malformed -> kaya.dlq.<consumer> on KAYA_DLQ
    kaya dlq list|show|purge -> DeadLetter (read back from the same headers)
    kaya dlq replay          -> the consumer again (admit, handle), then the letter is deleted
                                (a letter whose event the store does not back is refused)

A dead letter lets a consumer move on past an event it cannot apply without losing
the event: the checkpoint passes it, the letter keeps it with why (the headers below)
until an operator fixes the cause and replays it. The headers are written and read
in this one module, so the two sides cannot drift apart.

The operator side is a library first (tests call it), and the CLI prints what it
returns. It talks to JetStream like the NATS CLI would, and to the node's SQLite
file directly (WAL lets it work beside a running node).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from kaya.actors import Registry
from kaya.actors.retry import Backoff
from kaya.actors.wire import (
    DLQ_STREAM,
    HEADER_ATTEMPTS,
    HEADER_CONSUMER,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_LAST_ERROR,
    HEADER_MSG_ID,
    HEADER_ORIGINAL_SEQUENCE,
    HEADER_ORIGINAL_SUBJECT,
    Delivered,
    MalformedEvent,
    dlq_subject,
    parse_event,
)
from kaya.app.broker.pull import ack_tokens
from kaya.app.events.admission import admit
from kaya.app.events.consumers import Consumer, Effects
from kaya.app.events.envelopes import stored_envelopes, unbacked
from kaya.store import EventStore, StoreError

log = logging.getLogger("kaya.consumers")  # the runner's logger: these lines are about it

# ---- publishing one (the consumer runner) ---------------------------------------------


def _last_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:1000]


def dead_letter_headers(
    consumer: str, event: Delivered, attempts: int, error: BaseException
) -> dict[str, str]:
    """The event's own headers (not the server's `Nats-*`), and where it was and why."""
    headers = {k: v for k, v in event.headers.items() if not k.startswith("Nats-")}
    headers.update(
        {
            HEADER_MSG_ID: f"{consumer}:{event.event_id}",
            HEADER_EVENT_ID: event.event_id,
            HEADER_CONSUMER: consumer,
            HEADER_ORIGINAL_SUBJECT: event.subject,
            HEADER_ORIGINAL_SEQUENCE: str(event.stream_seq),
            HEADER_ATTEMPTS: str(attempts),
            HEADER_LAST_ERROR: _last_error(error),
        }
    )
    return headers


def malformed_headers(consumer: str, msg: Msg, error: BaseException) -> dict[str, str]:
    """A message that is no event: its headers as they came (no dedup id), and why."""
    headers = dict(msg.headers or {})
    headers.pop(HEADER_MSG_ID, None)
    headers.update(
        {
            HEADER_CONSUMER: consumer,
            HEADER_ORIGINAL_SUBJECT: msg.subject,
            HEADER_ORIGINAL_SEQUENCE: str(ack_tokens(msg.reply)[1]),
            HEADER_ATTEMPTS: "1",
            HEADER_LAST_ERROR: _last_error(error),
        }
    )
    return headers


PUBLISH_RETRY = Backoff(initial=0.2, cap=5.0)
"""Between attempts to put a dead letter on KAYA_DLQ (the broker may be restarting)."""


async def publish_dead_letter(
    js: JetStreamContext, consumer: str, event: Delivered, attempts: int, error: BaseException
) -> None:
    """Publish the event to KAYA_DLQ with why; until JetStream has it."""
    headers = dead_letter_headers(consumer, event, attempts, error)
    attempt = 0
    while True:
        try:
            await js.publish(dlq_subject(consumer), event.data, headers=headers, timeout=5)
            return
        except nats.errors.ConnectionClosedError:
            raise  # the node is stopping: the consumer starts from its checkpoint next time
        except nats.errors.Error as exc:  # the DLQ must not lose it either: keep trying
            attempt += 1
            log.warning("consumer %s: dead-lettering failed (%r); retrying", consumer, exc)
            await PUBLISH_RETRY.sleep(attempt)


async def publish_malformed(
    js: JetStreamContext, consumer: str, msg: Msg, error: BaseException
) -> None:
    """Publish a message that does not parse as an event to KAYA_DLQ, as it came."""
    await js.publish(
        dlq_subject(consumer), msg.data, headers=malformed_headers(consumer, msg, error)
    )


# ---- reading them back, replaying them (kaya dlq) -----------------------------------------


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
    backed = await _backed(store, letters)
    async with store.transaction() as tx:
        await tx.execute(_REPLAYED_DDL)
    outcome = ReplayOutcome(replayed=[], failed={}, skipped=[])
    for letter in letters:
        handler = consumers.get(letter.consumer)
        if handler is None:
            outcome.failed[letter.seq] = f"no consumer named {letter.consumer!r} here"
            continue
        effects = Effects()
        if letter.seq in backed:
            outcome.failed[letter.seq] = f"Untrusted: {backed[letter.seq]}"
            continue
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


async def _backed(store: EventStore, letters: list[DeadLetter]) -> dict[int, str]:
    """Letters whose event the store does not back, and why: a replay would apply what
    nobody committed (a consumer dead-letters such a message; it stays in the DLQ)."""
    events: dict[int, Delivered] = {}
    for letter in letters:
        with contextlib.suppress(MalformedEvent):  # replaying it fails on its own
            events[letter.seq] = _delivered_from_letter(letter)
    held = await stored_envelopes(store, {e.position for e in events.values()})
    last = await store.last_position() if len(held) < len(events) else 0
    why = {seq: unbacked(event, held.get(event.position), last) for seq, event in events.items()}
    return {seq: reason for seq, reason in why.items() if reason}
