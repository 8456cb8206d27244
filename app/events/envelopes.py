"""Which messages on KAYA_EVENTS the store backs: the judge of every position a consumer keeps.

A consumer's checkpoint is a store position, and the position comes in a message
header (`Kaya-Position`). Anyone who can publish on `kaya.evt.>` can write that
header, and one message claiming position 10^12 would move a checkpoint there and
make the consumer skip every real event after it, for good. So a position counts
only when the store holds, at that position, the very event the message carries:
same event id, entity, id, version, type, schema version and body. The runner
checks each batch with one read (`stored_envelopes`), and `kaya dlq replay` checks
a dead letter the same way before it runs it through its consumer again.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from kaya.actors.wire import Delivered
from kaya.store import EventStore


class Untrusted(Exception):
    """A message on KAYA_EVENTS the store does not back; the message says why."""


_ENVELOPES = (
    "SELECT position, event_id, entity, entity_id, version, type, schema_version, data"
    " FROM events WHERE position IN ({})"
)
_CHUNK = 500
"""Positions per query: well under SQLite's limit on host parameters."""


async def stored_envelopes(
    store: EventStore, positions: Collection[int]
) -> dict[int, tuple[Any, ...]]:
    """The store's envelope (and body) of the events at `positions`: one read a chunk."""
    found: dict[int, tuple[Any, ...]] = {}
    ordered = sorted(positions)
    for start in range(0, len(ordered), _CHUNK):
        chunk = ordered[start : start + _CHUNK]
        rows = await store.query(_ENVELOPES.format(",".join("?" * len(chunk))), chunk)
        found.update((int(row[0]), row) for row in rows)
    return found


def unbacked(event: Delivered, held: tuple[Any, ...] | None, last_position: int) -> str:
    """Why the store does not back `event` as delivered; empty when it does.

    `held` is the store's row at the event's position (None: there is none), and
    `last_position` the store's last position (read only when a row is missing).
    """
    position = event.position
    if held is None:
        if position > last_position:
            return (
                f"Kaya-Position {position} is ahead of the store"
                f" (its last position is {last_position})"
            )
        return f"the store has no event at position {position}"
    _, event_id, entity, entity_id, version, type_, schema_version, data = held
    said = (
        event.event_id,
        event.entity,
        event.entity_id,
        event.entity_version,
        event.type,
        event.schema_version,
    )
    if said != (event_id, entity, entity_id, version, type_, schema_version):
        return (
            f"the store holds another event at position {position}: {event_id}"
            f" ({entity}.{entity_id} v{version} {type_}/{schema_version}); the message says"
            f" {event.event_id} ({event.entity}.{event.entity_id} v{event.entity_version}"
            f" {event.type}/{event.schema_version})"
        )
    if bytes(data) != event.data:
        return f"the body at position {position} is not that of the store's event {event_id}"
    return ""
