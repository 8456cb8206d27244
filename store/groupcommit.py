"""Group commit: many appends, and the `transaction()` blocks beside them, per fsync.

The middle of the command path. An actor's `EventStore.append` queues its append
here and waits; one writer task takes the queue in batches, inserts each batch into
the writer's open SQLite transaction (kaya.store.sql) and commits it, many appends
per transaction and so per fsync. Each caller is woken only after the transaction
holding its append has committed. `transaction()` blocks (consumers' projections,
checkpoints) run in savepoints of that same open transaction and wait here, in the
current epoch, for the commit that makes them durable: they share its fsync instead
of paying one each.

The writer task never waits to fill a batch: it takes what queued while the last
commit ran (up to `max_batch_events`), so a lone append pays no delay and batches
grow with the load by themselves.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from kaya.store.errors import StoreError
from kaya.store.records import Append
from kaya.store.sql import Errors, insert_appends, integrity_error
from kaya.store.timing import Stages
from kaya.store.writer import Writer, rollback_quietly, waiting


class Waiter:
    """Waits for a group commit: `finish()` once it committed or failed (`error`).

    A bare future, not an anyio.Event: one is made per append, and an Event costs
    several times more to make.
    """

    __slots__ = ("_done", "error")

    def __init__(self) -> None:
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: StoreError | None = None

    def finish(self) -> None:
        if not self._done.done():  # the waiter may have been cancelled
            self._done.set_result(None)

    async def wait(self) -> None:
        await self._done


class _Pending(Waiter):
    """An append waiting for its transaction; `queued` and `done` for the stage timings."""

    __slots__ = ("append", "done", "queued")

    def __init__(self, append: Append) -> None:
        super().__init__()
        self.append = append
        self.queued = time.perf_counter()
        self.done = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStatistics:
    """A frozen view of the writer's counters (for metrics and benchmarks)."""

    appends: int
    batches: int
    events: int
    queued: int
    write_failing_since: float | None = None
    """Unix time of the first commit that failed since appends last committed: while set,
    commands get `unavailable` (a small checkpoint commit may still fit a full disk, so
    only appends clear it)."""
    last_write_error: str = ""
    last_write_failure: float | None = None
    """Unix time of the most recent failed commit (of any kind)."""


class GroupCommit:
    """The queue of appends, the writer task that commits them, and who waits for what.

    `write_lock` is the store's write lock: only its holder uses the writer's
    connection. The open SQLite transaction may hold the work of `transaction()`
    blocks done since the last commit (the epoch); whoever commits it wakes them.
    """

    def __init__(self, writer: Writer | None, *, max_batch_events: int) -> None:
        self._writer_connection = writer
        self._max_batch_events = max_batch_events
        self._queue: deque[_Pending] = deque()
        self._wakeup = anyio.Event()
        self.write_lock = anyio.Lock()
        self.closing = False
        self._committed = anyio.Event()
        self.commit_count = 0
        """Increments after every group commit: pair it with `wait_for_commit`."""
        self._epoch: list[Waiter] = []
        """Transactions done and waiting for the group commit of the open SQLite one."""
        self._appends = 0
        self._batches = 0
        self._events = 0
        self._failing_since: float | None = None
        self._last_failure: float | None = None
        self._last_error = ""
        self.stages = Stages()
        """Where appends spend their time (queue, insert, fsync, wake): see store/timing.py.
        The node hands the same object to the actors and the ingress for their stages."""

    @property
    def writer(self) -> Writer:
        if self._writer_connection is None:
            raise StoreError("the event store was opened read-only")
        return self._writer_connection

    @property
    def queued(self) -> bool:
        return bool(self._queue)

    async def append(self, append: Append) -> None:
        """Queue the append; return once committed. Raises VersionConflict or StoreError."""
        if self.closing:
            raise StoreError("event store is closed")
        pending = _Pending(append)
        self._queue.append(pending)
        self._wakeup.set()
        await pending.wait()
        if pending.error is not None:
            raise pending.error
        self.stages.observe("wake", time.perf_counter() - pending.done)

    def enlist(self, waiter: Waiter) -> None:
        """Have `waiter` (its work done in the open transaction) woken by the next commit."""
        self._epoch.append(waiter)
        self._wakeup.set()

    def close(self) -> None:
        """Refuse new appends; the writer task commits what is queued, then returns."""
        self.closing = True
        self._wakeup.set()

    async def wait_for_commit(self, seen: int) -> None:
        """Return once a commit happened after the one counted by `seen` (no missed wake-ups)."""
        while self.commit_count == seen:
            await self._committed.wait()

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            appends=self._appends,
            batches=self._batches,
            events=self._events,
            queued=len(self._queue),
            write_failing_since=self._failing_since,
            last_write_error=self._last_error,
            last_write_failure=self._last_failure,
        )

    # ---- the writer task -----------------------------------------------------------

    async def run(self) -> None:
        """The writer task: commit batches until closed and nothing is left."""
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while self._queue or self._epoch:
                batch = self._take_batch()
                taken = time.perf_counter()
                for pending in batch:
                    self.stages.observe("queue", taken - pending.queued)
                async with self.write_lock:
                    await self._write_batch(batch)
                done = time.perf_counter()
                for pending in batch:
                    pending.done = done
                    pending.finish()
                if batch:
                    self._committed.set()
                    self._committed = anyio.Event()
            if self.closing:
                return

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and (not batch or size < self._max_batch_events):
            pending = self._queue.popleft()
            batch.append(pending)
            size += max(1, len(pending.append.events))
        return batch

    async def _write_batch(self, batch: list[_Pending]) -> None:
        """Insert the batch into the open transaction (or a new one) and commit it all.

        The open transaction may hold the work of `transaction()` blocks done since the
        last commit: they share this commit's fsync. If an append conflicts, the appends
        are inserted again one per savepoint, so only the conflicting ones fail.
        """
        writer = self.writer
        conn = writer.conn
        waiters, self._epoch = self._epoch, []
        errors: Errors | None = None
        if not batch and not conn.in_transaction:
            # SQLite rolled the open transaction back when one of its statements failed (a
            # full disk) and took these waiters' work with it: they fail and retry. Not a
            # new write failure, so readiness is not told of one (the disk may be fine now).
            self._fail(waiters, "commit failed: rolled back by an earlier failure")
            return
        try:
            if batch:
                # one hop to the writer's thread for BEGIN, the inserts and the COMMIT: the
                # event loop goes on meanwhile (sqlite3 lets go of the GIL while it steps)
                appends = [p.append for p in batch]
                errors, insert_s, commit_s = await writer.run(
                    waiting, conn, _insert_and_commit, conn, appends
                )
                self.stages.observe("insert", insert_s, len(batch))
                self.stages.observe("fsync", commit_s, len(batch))
            else:
                await writer.commit()
        except sqlite3.Error as exc:
            try:
                rollback_quietly(conn)
            finally:
                self._failed(exc)
                self._fail(batch, f"append failed: {exc}")
                self._fail(waiters, f"commit failed: {exc}")
            return
        for waiter in waiters:
            waiter.finish()
        if not batch:
            return
        self._failing_since = None  # appends commit again (a checkpoint alone may fit a full disk)
        committed = batch
        if errors is not None:
            committed = []
            for pending, conflict in zip(batch, errors, strict=True):
                if conflict is None:
                    committed.append(pending)
                else:
                    pending.error = integrity_error(pending.append, conflict)
        self._account(committed, sum(len(p.append.events) for p in committed))

    def _failed(self, exc: sqlite3.Error) -> None:
        """Remember that writing fails (readiness shows it) until a commit works again."""
        now = time.time()
        if self._failing_since is None:
            self._failing_since = now
        self._last_failure = now
        self._last_error = str(exc)

    @staticmethod
    def _fail(waiters: Sequence[Waiter], message: str) -> None:
        error = StoreError(message)
        for waiter in waiters:
            waiter.error = error
            waiter.finish()

    def _account(self, committed: Sequence[_Pending], events: int) -> None:
        self.commit_count += 1
        self._batches += 1
        self._appends += len(committed)
        self._events += events

    # ---- the open transaction, outside the writer task (with the lock held) ----------

    async def commit_now(self) -> None:
        """Commit the open transaction (with the lock held) and wake those waiting for it."""
        waiters, self._epoch = self._epoch, []
        conn = self.writer.conn
        if not conn.in_transaction:
            self._fail(waiters, "commit failed: the transaction was rolled back")
            return
        try:
            await self.writer.commit()
        except sqlite3.Error as exc:
            try:
                rollback_quietly(conn)
            finally:
                self._failed(exc)
                self._fail(waiters, f"commit failed: {exc}")
            raise StoreError(f"commit failed: {exc}") from exc
        for waiter in waiters:
            waiter.finish()

    def abandon(self) -> None:
        """The open transaction is gone or unusable: so is the work waiting in it."""
        try:
            rollback_quietly(self.writer.conn)
        finally:
            waiters, self._epoch = self._epoch, []
            self._fail(waiters, "commit failed: the transaction was rolled back")


def _insert_and_commit(
    conn: sqlite3.Connection, appends: list[Append]
) -> tuple[Errors | None, float, float]:
    """On the writer's thread: the batch in the open transaction (or a new one), then
    COMMIT; the integrity errors (see insert_appends) and the seconds each part took."""
    began = time.perf_counter()
    if not conn.in_transaction:
        conn.execute("BEGIN IMMEDIATE")  # waits for another process's lock (`waiting`)
    errors = insert_appends(conn, appends, time.time())
    inserted = time.perf_counter()
    conn.execute("COMMIT")
    return errors, inserted - began, time.perf_counter() - inserted
