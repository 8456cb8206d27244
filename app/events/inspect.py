"""`kaya streams` and `kaya tail`: look at the broker's side of events without a node.

    KAYA_EVENTS, KAYA_DLQ -> describe_streams: messages, sequences, each consumer's lag
    KAYA_EVENTS           -> tail_events: events as they are published (ordered consumer)

Both only read, straight from JetStream as the NATS CLI would, so they work whether
or not a node is up and change nothing a node relies on: the tail leaves no durable
consumer behind. Library functions first (tests call them); the CLI prints what
they return.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from kaya.actors.wire import (
    DLQ_STREAM,
    EVENTS_STREAM,
    HEADER_EVENT_TYPE,
    HEADER_MSG_ID,
    HEADER_POSITION,
)

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
        deliver_policy=None if from_start else DeliverPolicy.NEW,
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
