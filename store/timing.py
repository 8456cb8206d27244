"""Latency histograms cheap enough for the command path, and the stages a command spends.

    ingress -> mailbox -> decide -> (seal) -> queue -> insert -> fsync -> wake -> reply

A command's latency is the sum of these stages (`STAGES`); each part of the path
records its own into one `Stages`, and `kaya_command_stage_seconds{stage}` shows them,
so "where does a millisecond go" is read off the metrics, not guessed. They live in
the store, the lowest layer, because the store times its own stages (a group commit's
queue, inserts and fsync) and the actors and ingress above it time theirs.

An observation is a bisect and two additions; a whole batch is one observation with a
weight (`observe_n`): a turn of 40 commands that decided in 80 µs cost each of them
80 µs of waiting, and that is 40 observations of 80 µs, made at the cost of one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
STAGE_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
"""Finer at the bottom than LATENCY_BUCKETS: most stages take microseconds."""

STAGES = ("ingress", "mailbox", "decide", "seal", "queue", "insert", "fsync", "wake", "reply")
"""In the order a command goes through them:

    ingress  the request's handler: parse, decode, validate, verify a token, queue it
    mailbox  waiting in the actor's mailbox for its turn (behind the turn before, and
             the actor's activation when it was not in memory)
    decide   the turn deciding its commands, with reading the first replies of repeats
             (each command of a turn waits for the whole turn)
    seal     sealing sensitive fields (security on; a key made or fetched)
    queue    the append waiting for the group commit that takes it (the previous commit)
    insert   the batch's inserts, in the writer's open transaction
    fsync    the commit: SQLite's fsync of the WAL
    wake     from the commit to the actor running again (the event loop's turn)
    reply    publishing the replies of the turn, up to this command's
"""


@dataclass(frozen=True)
class LatencySnapshot:
    """A latency histogram's bucket counts (the last one past every bound) and sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def mean(self) -> float:
        count = self.count
        return self.total / count if count else 0.0

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile q (what Prometheus would estimate)."""
        count = self.count
        if count == 0:
            return 0.0
        rank, seen = q * count, 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")


class Histogram:
    """Bucket counts and a sum: an observation is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_n(self, value: float, n: int) -> None:
        """`n` observations of `value` (a batch's stage, as each of its members waited it)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.total += value * n

    def snapshot(self) -> LatencySnapshot:
        return LatencySnapshot(self.bounds, tuple(self.counts), self.total)


class Stages:
    """One histogram per stage of `STAGES`, shared by the parts of one node."""

    __slots__ = ("histograms",)

    def __init__(self) -> None:
        self.histograms = {stage: Histogram(STAGE_BUCKETS) for stage in STAGES}

    def observe(self, stage: str, seconds: float, n: int = 1) -> None:
        self.histograms[stage].observe_n(seconds, n)

    def snapshot(self) -> dict[str, LatencySnapshot]:
        """The stages observed so far (those never seen are left out)."""
        return {s: h.snapshot() for s, h in self.histograms.items() if h.total or any(h.counts)}
