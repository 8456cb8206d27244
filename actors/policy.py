"""Who may do what: the caller a verified token names, and the policy an app declares.

With `[security.jwt]` on, every command, query and view request must carry
`Authorization: Bearer <JWT>`; the node verifies it (app/security/tokens.py) and the
`Caller` it names travels with the request to where the answer is decided. The app's
`Policy` then says yes or no with the entity's current state at hand, inside the
actor's turn: "the owner of this account" is a question about state, and asking it
anywhere else would race the commands before it.

A policy only narrows: with JWT off there is no caller and nothing is checked (the
NATS permissions of 4/6 still decide who may send at all). Commands a saga sends to
its steps carry no caller: the saga was authorised when it started.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified subject (`sub`) of a request's token and all of its claims.

    `token` is the bearer token itself, kept to ask another node on the caller's behalf
    (an `ActsOn` decision there); it is left out of the repr so no log line shows it."""

    subject: str
    claims: dict[str, Any] = field(default_factory=dict)
    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class ActsOn:
    """A policy's answer meaning "allowed if the caller may query this other entity":
    a transfer acts on its source account, so the account's owner may start it."""

    entity: str
    id: str


Decision = bool | ActsOn

Lookup = Callable[[Caller, str, str], Awaitable[bool]]
"""(caller, entity, id) -> whether the caller may query that entity: how an `ActsOn`
decision is settled, here or, in a cluster, by the node serving that entity."""


class Policy:
    """Override what the app needs; the defaults allow every authenticated caller.

    `command` and `query` are called inside the entity's turn with its state (before
    the command is decided), `view` at the ingress with the request's parameters.
    Return True to allow, False to refuse with `forbidden`, or `ActsOn(entity, id)` to
    decide as `query` would for that entity (checked against its state, here or on
    the node serving it). Keep them pure and quick: they run on every request.
    """

    def command(self, caller: Caller, entity: str, state: Any, command: Any) -> Decision:
        return True

    def query(self, caller: Caller, entity: str, state: Any) -> Decision:
        return True

    def view(self, caller: Caller, name: str, params: dict[str, Any]) -> bool:
        return True
