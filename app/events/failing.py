"""A part that retries instead of raising: since when it fails, how often, and why.

The relay and every consumer runner keep going through what fails (a full disk, a
broker that refuses, a handler bug): they back off and try again, because one
failing part must never take the node's command serving down with it (an
exception out of a part would cancel the node's task group). What they must not
do is hide it: `Failing` is what they record, and `PartHealth`, a frozen copy of
it, is what health, `kaya status` and metrics show.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PartHealth:
    """A part's health at one moment: failing since when (unix time), errors so far."""

    failing_since: float | None = None
    errors: int = 0
    last_error: str = ""
    """The last failure, kept after recovery (what happened, for the operator)."""

    @property
    def healthy(self) -> bool:
        return self.failing_since is None

    def failing_for(self, now: float | None = None) -> float:
        """Seconds it has been failing, 0 while healthy."""
        if self.failing_since is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.failing_since)


class Failing:
    """The failure record of one part, updated by the part as it goes."""

    __slots__ = ("errors", "in_a_row", "last_error", "since")

    def __init__(self) -> None:
        self.since: float | None = None
        self.errors = 0
        self.in_a_row = 0
        self.last_error = ""

    def failed(self, error: BaseException | str) -> int:
        """Count a failure; return how many in a row (the attempt number for Backoff)."""
        if self.since is None:
            self.since = time.time()
        self.errors += 1
        self.in_a_row += 1
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        self.last_error = error[:500]
        return self.in_a_row

    def recovered(self) -> bool:
        """Record a success; True if the part was failing until now (worth a log line)."""
        was = self.since is not None
        self.since = None
        self.in_a_row = 0
        return was

    def snapshot(self) -> PartHealth:
        return PartHealth(failing_since=self.since, errors=self.errors, last_error=self.last_error)
