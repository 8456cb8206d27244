"""Kaya's store: a SQLite event store with group commit, snapshots and idempotency replies.

It knows nothing of actors, domains or NATS: streams of opaque, typed JSON events.
"""

from kaya.store.errors import StoreError, VersionConflict
from kaya.store.eventstore import EventStore, open_event_store
from kaya.store.groupcommit import StoreStatistics
from kaya.store.records import Append, NewEvent, Reply, Snapshot, StoredEvent
from kaya.store.sql import Synchronous
from kaya.store.transaction import Transaction

__all__ = [
    "Append",
    "EventStore",
    "NewEvent",
    "Reply",
    "Snapshot",
    "StoreError",
    "StoreStatistics",
    "StoredEvent",
    "Synchronous",
    "Transaction",
    "VersionConflict",
    "open_event_store",
]
