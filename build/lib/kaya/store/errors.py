"""Errors raised by the store. Callers above never see sqlite3 exceptions.

StoreError              the database failed (I/O, corruption, closed store)
└── VersionConflict     an append's expected version is not the stream's version
"""

from __future__ import annotations


class StoreError(Exception):
    """The event store could not do what was asked; nothing was changed."""


class VersionConflict(StoreError):
    """Another writer appended to the stream first (optimistic concurrency)."""

    def __init__(self, entity: str, entity_id: str, expected: int) -> None:
        super().__init__(f"{entity}/{entity_id}: expected version {expected} is stale")
        self.entity = entity
        self.entity_id = entity_id
        self.expected = expected
