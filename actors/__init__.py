"""Kaya's actor runtime: entities as deciders, virtual actors with bounded mailboxes.

It knows nothing of NATS (replies are bytes handed to a callback) nor of any domain.
"""

from kaya.actors.entity import Command, Entity, Event, UnknownSchema, Upcaster
from kaya.actors.errors import (
    BadRequest,
    Conflict,
    ErrorCode,
    Internal,
    KayaError,
    Overloaded,
    Rejected,
    Unavailable,
    UnknownCommand,
    UnknownEntity,
)
from kaya.actors.registry import Registry
from kaya.actors.replies import AnyReply, decode_reply, error_from, error_reply
from kaya.actors.runtime import ActorRuntime, ReplyFn, RuntimeSettings, RuntimeStatistics

__all__ = [
    "ActorRuntime",
    "AnyReply",
    "BadRequest",
    "Command",
    "Conflict",
    "Entity",
    "ErrorCode",
    "Event",
    "Internal",
    "KayaError",
    "Overloaded",
    "Registry",
    "Rejected",
    "ReplyFn",
    "RuntimeSettings",
    "RuntimeStatistics",
    "Unavailable",
    "UnknownCommand",
    "UnknownEntity",
    "UnknownSchema",
    "Upcaster",
    "decode_reply",
    "error_from",
    "error_reply",
]
