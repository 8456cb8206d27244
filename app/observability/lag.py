"""Event-loop lag: how far behind the node's loop is, the signal for shedding load.

A node on one event loop queues overload where it cannot see it: requests wait in
the socket and in nats-server's buffer for the loop to read them, so an ingress
that only counts what it has accepted refuses late, after the caller has already
waited seconds. How late a timer fires is the one measure that covers every queue
in front of the loop: while it exceeds a bound, the ingress refuses new work at
once, the loop catches up on what it took, and refusals stay fast.

A timer also fires late when other processes hold the cores (a shared machine, a
noisy neighbour). Refusing then would turn away work the node has time for, so the
lag only counts while the loop's own thread is busy: it is the node that is behind.
"""

from __future__ import annotations

import time

import anyio
from anyio.abc import TaskStatus

TICK = 0.01
"""How often the probe wakes (seconds): fine enough to react within a few ticks."""
DECAY = 0.5
"""Weight of the newest sample: lag must persist over a few ticks to count, not one GC."""
BUSY = 0.75
"""Share of wall time the loop's thread must spend on CPU for its lag to be its own."""


class LoopLag:
    """Measures how late a periodic timer fires, and how busy the loop's thread is."""

    def __init__(self) -> None:
        self.lag = 0.0
        """Smoothed lateness of the probe's timer, in seconds."""
        self.busy = 0.0
        """Smoothed share of wall time the loop's thread spent on CPU."""
        self.max_lag = 0.0
        """Largest single lateness seen since start (for metrics and the status view)."""

    def behind(self, max_lag: float) -> bool:
        """True while the loop runs more than `max_lag` late because of its own work."""
        return self.lag > max_lag and self.busy >= BUSY

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        clock, cpu = time.perf_counter, time.thread_time
        task_status.started()
        wall0, cpu0 = clock(), cpu()
        while True:
            due = wall0 + TICK
            await anyio.sleep(TICK)
            wall1, cpu1 = clock(), cpu()
            late = max(0.0, wall1 - due)
            share = min(1.0, (cpu1 - cpu0) / (wall1 - wall0)) if wall1 > wall0 else 0.0
            self.lag = DECAY * late + (1 - DECAY) * self.lag
            self.busy = DECAY * share + (1 - DECAY) * self.busy
            self.max_lag = max(self.max_lag, late)
            wall0, cpu0 = wall1, cpu1
