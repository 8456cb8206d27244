"""What the gateway answers beyond the contract's replies: a page of an entity's history."""

from __future__ import annotations

from typing import Any

import msgspec


class HttpEvent(msgspec.Struct, kw_only=True):
    """A stored event as the history shows it; sealed values masked (`***`, `masked`)."""

    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    recorded_at: str
    """ISO 8601, UTC."""
    event_id: str
    position: int
    command_id: str | None = None
    traceparent: str | None = None
    masked: bool = False
    """Whether sensitive fields sealed at rest (`kaya:enc:v1:...`) are shown as `***`."""


class EventsPage(msgspec.Struct, kw_only=True):
    """`GET /v1/<entity>/<id>/events`: events with version > `after`, at most `limit`."""

    ok: bool = True
    entity: str
    id: str
    version: int
    """The entity's version when the page was read (its state's)."""
    after: int
    events: list[HttpEvent]
    next: int | None = None
    """`after` for the next page; null on the last page."""
