"""Mailboxes: where a command waits between `tell` and its actor's turn.

Every message lands in its actor's bounded mailbox; a full one refuses it at once
with `Overloaded` (the caller retries later) rather than queueing without end, so
overload shows as fast refusals at the edge instead of as memory and latency. An
actor drains its mailbox in turns: a state query alone, or up to `max_turn`
commands in a row, decided together and committed in one append (`actors/turn.py`).

`Message` and `Actor` are plain slotted records: a node may hold a million idle
actors, so what one costs matters more here than anywhere else.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from kaya.actors.entity import Command, Entity
from kaya.actors.errors import Overloaded
from kaya.actors.policy import Caller
from kaya.actors.wire import Answer

log = logging.getLogger("kaya.actors")

ReplyFn = Callable[[Answer], Awaitable[None]]
"""Sends one encoded reply to the caller. The runtime calls it exactly once per message."""

AnyEntity = Entity[Any, Any, Any]


class Message:
    __slots__ = (
        "allowed",
        "caller",
        "command",
        "command_id",
        "deadline",
        "enqueued",
        "reply",
        "request_hash",
        "traceparent",
    )

    def __init__(
        self,
        command: Command | None,
        command_id: str | None,
        request_hash: bytes,
        traceparent: str | None,
        reply: ReplyFn,
    ) -> None:
        self.command = command  # None: a state query
        self.command_id = command_id
        self.request_hash = request_hash
        self.traceparent = traceparent
        self.reply = reply
        self.deadline: float | None = None  # unix time; decided after it: `timeout`
        self.caller: Caller | None = None  # JWT on: who asked, for the app's policy
        self.allowed: bool | None = None  # an `ActsOn` decision, settled before the turn
        self.enqueued = time.perf_counter()  # for the `mailbox` stage (store/timing.py)


class Actor:
    __slots__ = (
        "entity",
        "entity_id",
        "last_used",
        "loaded",
        "log_seq",
        "mailbox",
        "running",
        "state",
        "traceparent",
        "version",
    )

    def __init__(self, entity: AnyEntity, entity_id: str) -> None:
        self.entity = entity
        self.entity_id = entity_id
        self.state: Any = None
        self.version = 0
        self.loaded = False
        self.log_seq = -1  # cluster: stream sequence of its last event; -1 unknown
        self.running = False
        # None while idle: an empty deque is ~760 bytes, over half of an idle actor,
        # and most actors are idle most of the time (1M active ones: 1.3 GB -> 0.6 GB)
        self.mailbox: deque[Message] | None = None
        self.last_used = 0.0
        self.traceparent: str | None = None  # of the last command: sagas carry it on


def deliver(actor: Actor, message: Message, capacity: int) -> bool:
    """Queue `message`; True when the actor was idle and now needs a worker.

    Raises Overloaded, queueing nothing, when the mailbox already holds `capacity`.
    """
    mailbox = actor.mailbox
    if mailbox is None:
        mailbox = actor.mailbox = deque()
    elif len(mailbox) >= capacity:
        entity = actor.entity.name
        raise Overloaded(f"mailbox of {entity}/{actor.entity_id} is full; retry later")
    mailbox.append(message)
    if actor.running:
        return False
    actor.running = True
    return True


def take_commands(mailbox: deque[Message], most: int) -> list[Message]:
    """The commands at the head of the mailbox, up to `most`: one turn's worth.

    Stops at a query, which must see the state those commands leave behind.
    """
    turn: list[Message] = []
    while mailbox and mailbox[0].command is not None and len(turn) < most:
        turn.append(mailbox.popleft())
    return turn


async def answer(message: Message, reply: Answer) -> None:
    """Hand the reply to the message's sender; a sender gone away is logged, never raised."""
    try:
        await message.reply(reply)
    except Exception:
        log.exception("could not deliver a reply")
