"""Errors the runtime turns into contract replies. Each carries its wire `code`.

KayaError
├── BadRequest        malformed JSON, wrong field types, bad names, too large
├── UnknownEntity     no entity of that name is registered
├── UnknownCommand    the entity has no command of that type
├── Rejected          a domain rule said no (raised by `decide`)
├── Conflict          idempotency key reused with another body, or a stale version
├── Overloaded        a bounded queue is full: retry later
├── Unauthorized      no or bad credentials
├── Forbidden         the credentials do not allow this
├── Unavailable       the shard or the store cannot serve right now
├── Timeout           no answer in time, or the command reached its entity too late
└── Internal          a bug: the handler raised, the actor is rebuilt

`error_for(code, message)` gives the exception of a code read off the wire.
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
    """The request is malformed (JSON, field types or constraints, names, size): fix it."""

    code = "bad_request"


class UnknownEntity(KayaError):
    """No entity of that name is served here."""

    code = "unknown_entity"


class UnknownCommand(KayaError):
    """The entity has no command of that type."""

    code = "unknown_command"


class Rejected(KayaError):
    """Raised by an entity's `decide` when a domain rule refuses the command."""

    code = "rejected"


class Conflict(KayaError):
    """The command id was used with another command, or the entity changed under it."""

    code = "conflict"


class Overloaded(KayaError):
    """A bounded queue is full: nothing happened, retry later (with the same command id)."""

    code = "overloaded"


class Unauthorized(KayaError):
    """No credentials, or credentials that do not check out."""

    code = "unauthorized"


class Forbidden(KayaError):
    """The credentials do not allow this subject or command."""

    code = "forbidden"


class Unavailable(KayaError):
    """The store or the shard cannot serve right now: nothing happened, retry later."""

    code = "unavailable"


class Timeout(KayaError):
    """No answer in time, or the command reached its entity after its deadline (a definite no)."""

    code = "timeout"


class Internal(KayaError):
    """A bug: the handler raised; nothing changed and the actor is rebuilt."""

    code = "internal"


_BY_CODE: dict[str, type[KayaError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownEntity,
        UnknownCommand,
        Rejected,
        Conflict,
        Overloaded,
        Unauthorized,
        Forbidden,
        Unavailable,
        Timeout,
        Internal,
    )
}


def error_for(code: str, message: str) -> KayaError:
    """The exception for a contract error code (`Internal` for a code this version lacks)."""
    return _BY_CODE.get(code, Internal)(message)
