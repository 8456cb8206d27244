"""Records that cross the store boundary: what is appended and what is read back.

The store keeps events as opaque JSON bytes tagged with their type and schema
version; decoding them into domain types is the caller's job, so the store never
imports a domain.
"""

from __future__ import annotations

import msgspec


class NewEvent(msgspec.Struct, frozen=True):
    """An event about to be appended; `data` is its JSON encoding."""

    event_id: str
    type: str
    schema_version: int
    data: bytes
    command_id: str | None = None
    traceparent: str | None = None


class StoredEvent(msgspec.Struct, frozen=True):
    """An event as committed: `position` orders the whole store, `version` one stream."""

    position: int
    event_id: str
    entity: str
    entity_id: str
    version: int
    type: str
    schema_version: int
    data: bytes
    recorded_at: float
    command_id: str | None
    traceparent: str | None


class Reply(msgspec.Struct, frozen=True):
    """The first reply to an idempotent command, kept to answer its repeats."""

    command_id: str
    request_hash: bytes
    body: bytes


class Snapshot(msgspec.Struct, frozen=True):
    """A stream's state at `version`; `schema` lets a changed state type ignore old ones."""

    version: int
    state: bytes
    schema: int = 1


class Append(msgspec.Struct, frozen=True):
    """One atomic write to one stream: its new events, the replies to remember, a snapshot.

    `expected_version` is the stream's version the events were decided against;
    the store refuses the whole append with `VersionConflict` when it is stale.
    """

    entity: str
    entity_id: str
    expected_version: int
    events: list[NewEvent]
    replies: list[Reply] = []
    snapshot: Snapshot | None = None
