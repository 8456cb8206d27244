"""Kaya: an async, actor-based runtime for event-driven services on NATS JetStream and SQLite.

This module is the public API; every other module is internal and may change.
"""

from kaya.actors import (
    BadRequest,
    Command,
    Conflict,
    Entity,
    Event,
    Internal,
    KayaError,
    Overloaded,
    Rejected,
    Unavailable,
    UnknownCommand,
    UnknownEntity,
    Upcaster,
)

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "Command",
    "Conflict",
    "Entity",
    "Event",
    "Internal",
    "KayaError",
    "Overloaded",
    "Rejected",
    "Unavailable",
    "UnknownCommand",
    "UnknownEntity",
    "Upcaster",
    "__version__",
]
