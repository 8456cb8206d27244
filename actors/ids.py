"""The identifiers a command carries down the command path, and the one each event gets.

`request_hash` fingerprints a command when it is queued (`ActorRuntime.tell`), so a
repeated command id can be told apart from a reused one; `trace_id` pulls the W3C
trace id out of a traceparent for log lines; `event_ids` names each event a turn
decides (`actors/turn.py`) before it is appended.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import time

import msgspec

from kaya.actors.entity import Command

_encoder = msgspec.json.Encoder()


class EventIds:
    """Event ids: 32 hex characters, unique across processes and restarts, increasing.

    The process's start time in ms (12 hex), 32 random bits (8 hex), then a counter
    (12 hex). Ids of one process sort in the order they were made, and a later
    process's after them (clock steps aside), so the store's unique index on
    event_id grows at its right edge instead of at random pages as with uuid4; and
    no syscall per id. A forked child starts its own sequence.
    """

    def __init__(self) -> None:
        self._restart()
        os.register_at_fork(after_in_child=self._restart)

    def _restart(self) -> None:
        self._prefix = f"{time.time_ns() // 1_000_000:012x}{secrets.randbits(32):08x}"
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


event_ids = EventIds()
"""The process's one sequence: every actor's events are named from it."""


def trace_id(traceparent: str | None) -> str | None:
    """The W3C trace id inside a traceparent header: what log lines are joined on."""
    return traceparent.split("-")[1] if traceparent and traceparent.count("-") == 3 else None


def request_hash(command: Command) -> bytes:
    """Fingerprint of a command's canonical encoding: same command, same hash, any key order."""
    return hashlib.blake2b(_encoder.encode(command), digest_size=16).digest()
