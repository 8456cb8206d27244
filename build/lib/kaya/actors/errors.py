"""Errors the runtime turns into contract replies. Each carries its wire `code`.

KayaError
├── BadRequest        malformed JSON, wrong field types, bad names, too large
├── UnknownEntity     no entity of that name is registered
├── UnknownCommand    the entity has no command of that type
├── Rejected          a domain rule said no (raised by `decide`)
├── Conflict          idempotency key reused with another body, or a stale version
├── Overloaded        a bounded queue is full: retry later
├── Unavailable       the shard or the store cannot serve right now
└── Internal          a bug: the handler raised, the actor is rebuilt
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorCode = Literal[
    "bad_request",
    "unknown_entity",
    "unknown_command",
    "rejected",
    "conflict",
    "overloaded",
    "unauthorized",
    "forbidden",
    "unavailable",
    "timeout",
    "internal",
]


class KayaError(Exception):
    """An error with a contract code; `str(error)` is the message sent to the caller."""

    code: ClassVar[ErrorCode] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(KayaError):
    code = "bad_request"


class UnknownEntity(KayaError):
    code = "unknown_entity"


class UnknownCommand(KayaError):
    code = "unknown_command"


class Rejected(KayaError):
    """Raised by an entity's `decide` when a domain rule refuses the command."""

    code = "rejected"


class Conflict(KayaError):
    code = "conflict"


class Overloaded(KayaError):
    code = "overloaded"


class Unavailable(KayaError):
    code = "unavailable"


class Internal(KayaError):
    code = "internal"
