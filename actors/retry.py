"""Backoff between retries: exponential growth, a cap, and full jitter.

Whatever retries in Kaya (a saga step whose target is overloaded, a consumer's
failing event, the relay when the broker does not ack) waits `Backoff.delay`
between attempts. The ceiling doubles with each attempt so a struggling peer gets
room; the cap keeps a long outage from growing the wait without end; and the
delay is drawn uniformly below the ceiling ("full jitter") so that many callers
that failed together do not retry together.

The random draw and the sleep are injected, so a test can check the delays without
waiting for them.
"""

from __future__ import annotations

import random as _random
from collections.abc import Awaitable, Callable

import anyio


class Backoff:
    """delay(attempt) = uniform(0, min(cap, initial * 2 ** (attempt - 1))), attempt >= 1."""

    __slots__ = ("_random", "_sleep", "cap", "initial")

    def __init__(
        self,
        *,
        initial: float,
        cap: float,
        random: Callable[[], float] = _random.random,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        """`random` returns a float in [0, 1) (as `random.random`); `sleep` waits seconds."""
        if initial < 0 or cap < 0:
            raise ValueError(f"backoff needs initial >= 0 and cap >= 0, not {initial}, {cap}")
        self.initial = initial
        self.cap = cap
        self._random = random
        self._sleep = sleep

    def ceiling(self, attempt: int) -> float:
        """The most the wait after failed attempt number `attempt` (1, 2, ...) can be."""
        if attempt < 1:
            raise ValueError(f"attempts count from 1, not {attempt}")
        try:
            return min(self.cap, self.initial * 2.0 ** (attempt - 1))
        except OverflowError:  # 2.0 ** 1024 and beyond: long past the cap
            return self.cap if self.initial > 0 else 0.0

    def delay(self, attempt: int) -> float:
        """How long to wait after failed attempt number `attempt`: jittered below the ceiling."""
        return self.ceiling(attempt) * self._random()

    async def sleep(self, attempt: int) -> float:
        """Wait `delay(attempt)` seconds; return the delay waited (for logs)."""
        delay = self.delay(attempt)
        await self._sleep(delay)
        return delay
