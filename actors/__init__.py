"""Kaya's actor runtime: entities as deciders, virtual actors with bounded mailboxes.

It knows nothing of NATS (replies are bytes handed to a callback) nor of any domain.
"""

from kaya.actors.entity import Command, Entity, Event, UnknownSchema, Upcaster
from kaya.actors.errors import (
    BadRequest,
    Conflict,
    ErrorCode,
    Forbidden,
    Internal,
    KayaError,
    Overloaded,
    Rejected,
    Timeout,
    Unauthorized,
    Unavailable,
    UnknownCommand,
    UnknownEntity,
    error_for,
)
from kaya.actors.registry import Registry
from kaya.actors.retry import Backoff
from kaya.actors.runtime import (
    ActorRuntime,
    ReplyFn,
    RuntimeSettings,
    RuntimeStatistics,
    TurnObserver,
)
from kaya.actors.wire import AnyReply, decode_reply, error_from, error_reply

__all__ = [
    "ActorRuntime",
    "AnyReply",
    "Backoff",
    "BadRequest",
    "Command",
    "Conflict",
    "Entity",
    "ErrorCode",
    "Event",
    "Forbidden",
    "Internal",
    "KayaError",
    "Overloaded",
    "Registry",
    "Rejected",
    "ReplyFn",
    "RuntimeSettings",
    "RuntimeStatistics",
    "Timeout",
    "TurnObserver",
    "Unauthorized",
    "Unavailable",
    "UnknownCommand",
    "UnknownEntity",
    "UnknownSchema",
    "Upcaster",
    "decode_reply",
    "error_for",
    "error_from",
    "error_reply",
]
