"""A saga's steps between nodes: the target entity may live on any node's shard.

    saga driver -> kaya.step.<entity>.<id> (request) --server mapping--> its owner's ingress

`kaya.step.*` is mapped to shards like commands, and only nodes use it: it carries the
step's reserved command id (`<saga>/<id>/<step>`, refused on `kaya.cmd.*`) and its
deadline (`Kaya-Deadline`). A step that gets no reply, or finds no node serving the
shard, raises Unavailable: the driver retries it with the same command id, so the
target applies it at most once whatever happened to the first try.
"""

from __future__ import annotations

from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from kaya.actors.errors import Unavailable
from kaya.actors.saga import AskFn
from kaya.actors.wire import HEADER_COMMAND_ID, HEADER_DEADLINE, HEADER_TRACEPARENT

STEP_TIMEOUT = 5.0
"""Seconds a step waits for its target's reply before it is retried."""

_encoder = msgspec.json.Encoder()


def remote_ask(nc: NATS, *, timeout: float = STEP_TIMEOUT) -> AskFn:
    async def ask(
        entity: Any,
        entity_id: str,
        command: Any,
        *,
        command_id: str | None = None,
        deadline: float | None = None,
        traceparent: str | None = None,
    ) -> bytes:
        headers: dict[str, str] = {}
        if command_id is not None:
            headers[HEADER_COMMAND_ID] = command_id
        if deadline is not None:
            headers[HEADER_DEADLINE] = repr(deadline)
        if traceparent is not None:
            headers[HEADER_TRACEPARENT] = traceparent
        subject = f"kaya.step.{entity.name}.{entity_id}"
        try:
            reply = await nc.request(
                subject, _encoder.encode(command), timeout=timeout, headers=headers
            )
        except nats.errors.NoRespondersError:
            raise Unavailable(f"{subject}: no node serves its shard right now") from None
        except (nats.errors.TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(f"{subject}: no reply ({exc!r})") from None
        return reply.data

    return ask
