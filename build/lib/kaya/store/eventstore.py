"""Event store: append with group commit, read streams, snapshots and replies.

Appends from many actors are queued and written by one writer task, many per
SQLite transaction and so per fsync; each caller is woken only after the
transaction holding its append has committed. `transaction()` blocks (consumers'
projections, checkpoints) run in savepoints of that same open transaction and
share its fsync instead of paying one each.

Where the work runs matters more than how much there is. Every hop to a thread
and back costs about 100 µs of latency, so a batch's rows go in on the loop's
thread as a few multi-row INSERTs (a handful of prepared statements instead of
one step per row), and only the commit (the fsync) hops to the writer's thread:
one hop per group commit. A multi-row INSERT, like any statement inside a
savepoint, stages its rows in a temporary table: `temp_store = MEMORY` keeps
that off the disk, which was a third of an append's cost (bench.store).

Reads use a second connection: WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite
import anyio

from kaya.store.errors import StoreError, VersionConflict
from kaya.store.records import Append, Reply, Snapshot, StoredEvent
from kaya.store.schema import DDL, SCHEMA_VERSION

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
_T = TypeVar("_T")

_BUSY_TIMEOUT_MS = 5000
_MAX_CHUNK = 256
"""Most rows in one multi-row INSERT: 2,560 parameters, far below SQLite's 32,766."""

_INSERT_EVENT = (
    "INSERT INTO events (event_id, entity, entity_id, version, type, schema_version,"
    " data, recorded_at, command_id, traceparent)"
)
_INSERT_REPLY = (
    "INSERT INTO replies (entity, entity_id, command_id, request_hash, body, recorded_at)"
)
_UPSERT_SNAPSHOT = "INSERT INTO snapshots (entity, entity_id, version, state_schema, state)"
_UPSERT_SNAPSHOT_TAIL = (
    " ON CONFLICT (entity, entity_id) DO UPDATE SET"
    " version = excluded.version, state_schema = excluded.state_schema, state = excluded.state"
    " WHERE excluded.version > snapshots.version"
)
_EVENT_WIDTH, _REPLY_WIDTH, _SNAPSHOT_WIDTH = 10, 6, 5
_EVENT_COLUMNS = (
    "position, event_id, entity, entity_id, version, type, schema_version, data,"
    " recorded_at, command_id, traceparent"
)


@functools.cache
def _multi_row_sql(head: str, width: int, rows: int, tail: str) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([row] * rows)}{tail}"


def _insert_rows(
    conn: sqlite3.Connection, head: str, width: int, params: list[object], tail: str = ""
) -> None:
    """Insert rows given as one flat parameter list, many rows per statement.

    Fewer statement steps than executemany's one per row. Chunks of 1, 2, 4 ... 256
    rows keep a handful of prepared statements in the cache.
    """
    rows = len(params) // width
    done = 0
    while done < rows:
        chunk = min(_MAX_CHUNK, 1 << ((rows - done).bit_length() - 1))
        conn.execute(
            _multi_row_sql(head, width, chunk, tail),
            params[done * width : (done + chunk) * width],
        )
        done += chunk


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class _Writer:
    """The one write connection: short SQL on the event loop's thread, the rest on its own.

    Transactions are explicit (the connection is in autocommit mode) and it has no
    busy timeout, so nothing run on the loop's thread waits for a lock. Commits (an
    fsync) and waits for another process's write lock run on one dedicated thread,
    one hop each. Only the holder of the store's write lock uses the connection,
    one call at a time.
    """

    def __init__(self) -> None:
        self.conn: sqlite3.Connection
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs,), name="kaya-store-writer", daemon=True
        )
        self._thread.start()

    @classmethod
    async def open(cls, path: Path, synchronous: Synchronous) -> _Writer:
        writer = cls()
        try:
            writer.conn = await writer.run(_open_writer, path, synchronous)
        except BaseException:
            writer._jobs.put(None)
            raise
        return writer

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run `fn(*args)` on the writer's thread; it finishes even if the caller is cancelled."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        with anyio.CancelScope(shield=True):
            result = await future
        return result

    async def begin(self) -> None:
        """BEGIN IMMEDIATE here, or on the writer's thread if it must wait for a lock."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            await self.run(_waiting, self.conn, self.conn.execute, "BEGIN IMMEDIATE")

    async def commit(self) -> None:
        await self.run(self.conn.execute, "COMMIT")

    async def close(self) -> None:
        try:
            await self.run(self.conn.close)
        finally:
            self._jobs.put(None)


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """The writer's thread: run each job, hand its outcome back to the job's loop."""
    while (job := jobs.get()) is not None:
        loop, future, fn, args = job
        try:
            result = fn(*args)
        except BaseException as exc:  # the caller gets it, as with any awaited call
            _hand_back(loop, _set_exception, future, exc)
        else:
            _hand_back(loop, _set_result, future, result)


def _hand_back(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        loop.call_soon_threadsafe(fn, *args)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _waiting(conn: sqlite3.Connection, fn: Callable[..., _T], *args: Any) -> _T:
    """On the writer's thread: `fn(*args)`, allowed to wait for another process's lock."""
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    try:
        return fn(*args)
    finally:
        conn.execute("PRAGMA busy_timeout = 0")


class Transaction:
    """One exclusive write transaction beside the group commit: projections, checkpoints.

    Only SQL goes through it, so callers above the store never hold a connection.
    Statements run on the event loop's thread (a hop to a thread costs more than a
    small statement): keep them small, or open the transaction with `attach`, whose
    statements run on the writer's thread.
    """

    def __init__(self, writer: _Writer, *, offload: bool = False) -> None:
        self._writer = writer
        self._conn = writer.conn
        self._offload = offload

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        if self._offload:
            return await self._writer.run(
                _waiting, self._conn, _execute_rowcount, self._conn, sql, params
            )
        return self._conn.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        if self._offload:
            await self._writer.run(_waiting, self._conn, self._conn.executemany, sql, list(rows))
        else:
            self._conn.executemany(sql, rows)

    async def execute_in_order(self, statements: Sequence[tuple[str, Sequence[object]]]) -> None:
        """Run statements in order; consecutive ones with the same SQL go as one executemany."""
        start = 0
        while start < len(statements):
            sql = statements[start][0]
            end = start + 1
            while end < len(statements) and statements[end][0] == sql:
                end += 1
            if end - start == 1:
                await self.execute(sql, statements[start][1])
            else:
                await self.executemany(sql, [params for _, params in statements[start:end]])
            start = end

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        if self._offload:
            return await self._writer.run(_waiting, self._conn, _fetchall, self._conn, sql, params)
        return _fetchall(self._conn, sql, params)

    async def checkpoint(self, name: str) -> int:
        rows = await self.fetchall("SELECT position FROM checkpoints WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    async def set_checkpoint(self, name: str, position: int) -> None:
        await self.execute(
            "INSERT INTO checkpoints (name, position) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
            (name, position),
        )


def _execute_rowcount(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> int:
    return conn.execute(sql, params).rowcount


def _fetchall(
    conn: sqlite3.Connection, sql: str, params: Sequence[object]
) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in conn.execute(sql, params).fetchall()]


class _Waiter:
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


class _Pending(_Waiter):
    """An append waiting for its transaction."""

    __slots__ = ("append",)

    def __init__(self, append: Append) -> None:
        super().__init__()
        self.append = append


class StoreStatistics:
    """A frozen view of the writer's counters (for metrics and benchmarks)."""

    __slots__ = ("appends", "batches", "events", "queued")

    def __init__(self, *, appends: int, batches: int, events: int, queued: int) -> None:
        self.appends = appends
        self.batches = batches
        self.events = events
        self.queued = queued


class EventStore:
    """The node's event store. Create it with `open_event_store`."""

    def __init__(
        self,
        writer: _Writer | None,
        reader: aiosqlite.Connection,
        *,
        max_batch_events: int,
        synchronous: Synchronous = "FULL",
    ) -> None:
        self._synchronous = synchronous
        self._writer_connection = writer
        self._reader = reader
        self._max_batch_events = max_batch_events
        self._queue: deque[_Pending] = deque()
        self._wakeup = anyio.Event()
        self._write_lock = anyio.Lock()
        self._closing = False
        self._committed = anyio.Event()
        self._commit_count = 0
        self._epoch: list[_Waiter] = []
        """Transactions done and waiting for the group commit of the open SQLite one."""
        self._appends = 0
        self._batches = 0
        self._events = 0

    # ---- writing -------------------------------------------------------------

    @property
    def _writer(self) -> _Writer:
        if self._writer_connection is None:
            raise StoreError("the event store was opened read-only")
        return self._writer_connection

    async def append(self, append: Append) -> None:
        """Append atomically; return once durable. Raises VersionConflict or StoreError."""
        if self._closing:
            raise StoreError("event store is closed")
        pending = _Pending(append)
        self._queue.append(pending)
        self._wakeup.set()
        await pending.wait()
        if pending.error is not None:
            raise pending.error

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while self._queue or self._epoch:
                batch = self._take_batch()
                async with self._write_lock:
                    await self._write_batch(batch)
                for pending in batch:
                    pending.finish()
                if batch:
                    self._committed.set()
                    self._committed = anyio.Event()
            if self._closing:
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
        writer = self._writer
        conn = writer.conn
        waiters, self._epoch = self._epoch, []
        errors: _Errors | None = None
        try:
            if batch:
                if not conn.in_transaction:
                    await writer.begin()
                errors = _insert_appends(conn, [p.append for p in batch], time.time())
            await writer.commit()
        except sqlite3.Error as exc:
            try:
                _rollback_quietly(conn)
            finally:
                self._fail(batch, f"append failed: {exc}")
                self._fail(waiters, f"commit failed: {exc}")
            return
        for waiter in waiters:
            waiter.finish()
        if not batch:
            return
        committed = batch
        if errors is not None:
            committed = []
            for pending, conflict in zip(batch, errors, strict=True):
                if conflict is None:
                    committed.append(pending)
                else:
                    pending.error = _integrity_error(pending.append, conflict)
        self._account(committed, sum(len(p.append.events) for p in committed))

    @staticmethod
    def _fail(waiters: Sequence[_Waiter], message: str) -> None:
        error = StoreError(message)
        for waiter in waiters:
            waiter.error = error
            waiter.finish()

    def _account(self, committed: Sequence[_Pending], events: int) -> None:
        self._commit_count += 1
        self._batches += 1
        self._appends += len(committed)
        self._events += events

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def commit_count(self) -> int:
        """Increments after every group commit: pair it with `wait_for_commit`."""
        return self._commit_count

    async def wait_for_commit(self, seen: int) -> None:
        """Return once a commit happened after the one counted by `seen` (no missed wake-ups)."""
        while self._commit_count == seen:
            await self._committed.wait()

    @asynccontextmanager
    async def transaction(
        self, *, attach: dict[str, Path] | None = None, durable: bool = True
    ) -> AsyncIterator[Transaction]:
        """Exclusive write transaction; commits on exit, rolls back on any exception.

        Its statements run in a savepoint of the writer's open SQLite transaction, and
        exit waits for the group commit that makes them durable with the appends
        around them: one fsync for all. A failed group commit fails every transaction
        in it (StoreError).

        `durable=False` is for state derived from events (read models, checkpoints)
        that a replay rebuilds: with nothing else to commit it commits on its own
        without an fsync. In WAL mode the log is sequential, so the next durable
        commit fsyncs it too, and a power loss can only lose a suffix of such
        commits, each with its checkpoint: never a gap. Beside appends it simply
        shares their group commit.

        `attach` names other SQLite files visible in it as `alias.table` (rebuilds);
        such a transaction commits on its own, and its statements run on the
        writer's thread.
        """
        writer = self._writer
        if (
            attach
            or self._closing
            or (not durable and not self._queue and not writer.conn.in_transaction)
        ):
            async with self._own_transaction(attach or {}, durable=durable) as tx:
                yield tx
            return
        waiter = _Waiter()
        async with self._write_lock:
            writer = self._writer
            conn = writer.conn
            try:
                if not conn.in_transaction:
                    await writer.begin()
                conn.execute("SAVEPOINT tx")
            except sqlite3.Error as exc:
                raise StoreError(f"transaction failed: {exc}") from exc
            try:
                yield Transaction(writer)
                conn.execute("RELEASE tx")
            except BaseException as exc:
                self._undo_savepoint(conn)
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"transaction failed: {exc}") from exc
                raise
            if self._closing:  # the writer may be gone: commit here
                await self._commit_now()
                return
            self._epoch.append(waiter)
            self._wakeup.set()
        await waiter.wait()
        if waiter.error is not None:
            raise waiter.error

    def _undo_savepoint(self, conn: sqlite3.Connection) -> None:
        """Roll back to the savepoint `tx`; if SQLite lost the whole transaction, say so."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO tx")
                conn.execute("RELEASE tx")
                return
        except sqlite3.Error:
            pass
        try:  # the open transaction is gone or unusable: so is the work waiting in it
            _rollback_quietly(conn)
        finally:
            waiters, self._epoch = self._epoch, []
            self._fail(waiters, "commit failed: the transaction was rolled back")

    async def _commit_now(self) -> None:
        """Commit the open transaction (with the lock held) and wake those waiting for it."""
        waiters, self._epoch = self._epoch, []
        conn = self._writer.conn
        if not conn.in_transaction:
            self._fail(waiters, "commit failed: the transaction was rolled back")
            return
        try:
            await self._writer.commit()
        except sqlite3.Error as exc:
            try:
                _rollback_quietly(conn)
            finally:
                self._fail(waiters, f"commit failed: {exc}")
            raise StoreError(f"commit failed: {exc}") from exc
        for waiter in waiters:
            waiter.finish()

    @asynccontextmanager
    async def _own_transaction(
        self, attach: dict[str, Path], *, durable: bool
    ) -> AsyncIterator[Transaction]:
        async with self._write_lock:
            writer = self._writer
            conn = writer.conn
            if conn.in_transaction:  # ATTACH and PRAGMA synchronous are refused inside one
                await self._commit_now()
            relaxed = not durable and self._synchronous in ("FULL", "EXTRA")
            if relaxed:
                conn.execute("PRAGMA synchronous = NORMAL")
            attached: list[str] = []
            try:
                for alias, path in attach.items():
                    await writer.run(
                        _waiting, conn, conn.execute, "ATTACH DATABASE ? AS " + alias, (str(path),)
                    )
                    attached.append(alias)
                try:
                    await writer.begin()
                    yield Transaction(writer, offload=bool(attach))
                except sqlite3.Error as exc:
                    self._rollback()
                    raise StoreError(f"transaction failed: {exc}") from exc
                except BaseException:
                    self._rollback()
                    raise
                else:
                    try:
                        await writer.commit()
                    except sqlite3.Error as exc:
                        self._rollback()
                        raise StoreError(f"commit failed: {exc}") from exc
            finally:
                for alias in attached:
                    await writer.run(_waiting, conn, conn.execute, "DETACH DATABASE " + alias)
                if relaxed:
                    conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    def _rollback(self) -> None:
        try:
            _rollback_quietly(self._writer.conn)
        except sqlite3.Error as exc:  # the connection is unusable: say so on the next write
            raise StoreError(f"rollback failed: {exc}") from exc

    async def checkpoint(self, name: str) -> int:
        """The position a relay or consumer has durably handled (0: nothing yet)."""
        rows = await self._fetch("SELECT position FROM checkpoints WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    async def position_at(self, when: float) -> int:
        """The last position committed before unix time `when` (binary search, no index).

        Positions are assigned in commit order and stamped with the commit time, so the
        rowid order is time order (to within clock steps, which callers allow for).
        """
        low, high = 0, await self.last_position()
        while low < high:
            mid = (low + high + 1) // 2
            rows = await self._fetch(
                "SELECT recorded_at FROM events WHERE position >= ? ORDER BY position LIMIT 1",
                (mid,),
            )
            if rows and rows[0][0] < when:
                low = mid
            else:
                high = mid - 1
        return low

    async def expire_replies(self, older_than: float) -> int:
        """Forget idempotency replies recorded before `older_than` (unix time)."""
        async with self._write_lock:
            writer = self._writer
            if writer.conn.in_transaction:
                await self._commit_now()
            try:
                return await writer.run(
                    _waiting,
                    writer.conn,
                    _execute_rowcount,
                    writer.conn,
                    "DELETE FROM replies WHERE recorded_at < ?",
                    (older_than,),
                )
            except sqlite3.Error as exc:  # one statement in autocommit mode: nothing changed
                raise StoreError(f"expiring replies failed: {exc}") from exc

    # ---- reading -------------------------------------------------------------

    async def read_stream(
        self, entity: str, entity_id: str, after_version: int = 0
    ) -> list[StoredEvent]:
        """The stream's events with version > after_version, in version order."""
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE entity = ? AND entity_id = ?"
            " AND version > ? ORDER BY version",
            (entity, entity_id, after_version),
        )
        return [StoredEvent(*row) for row in rows]

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Events of every stream with position > after_position, in commit order."""
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
            (after_position, limit),
        )
        return [StoredEvent(*row) for row in rows]

    async def load_snapshot(self, entity: str, entity_id: str) -> Snapshot | None:
        rows = await self._fetch(
            "SELECT version, state, state_schema FROM snapshots WHERE entity = ? AND entity_id = ?",
            (entity, entity_id),
        )
        if not rows:
            return None
        version, state, schema = rows[0]
        return Snapshot(version=version, state=state, schema=schema)

    async def find_replies(
        self, entity: str, entity_id: str, command_ids: Iterable[str]
    ) -> dict[str, Reply]:
        """The remembered replies among `command_ids` for this stream."""
        ids = list(command_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = await self._fetch(
            "SELECT command_id, request_hash, body FROM replies"
            f" WHERE entity = ? AND entity_id = ? AND command_id IN ({marks})",
            (entity, entity_id, *ids),
        )
        return {row[0]: Reply(command_id=row[0], request_hash=row[1], body=row[2]) for row in rows}

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """A read on the reader connection: for read models that own their tables."""
        return [tuple(row) for row in await self._fetch(sql, params)]

    async def last_position(self) -> int:
        rows = await self._fetch("SELECT COALESCE(MAX(position), 0) FROM events", ())
        return int(rows[0][0])

    async def _fetch(self, sql: str, params: Sequence[object]) -> list[sqlite3.Row]:
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            appends=self._appends,
            batches=self._batches,
            events=self._events,
            queued=len(self._queue),
        )


def _add_rows(
    append: Append,
    now: float,
    events: list[object],
    replies: list[object],
    snapshots: list[object],
) -> None:
    """Append the append's rows, flattened, to the parameter lists of each table."""
    entity, entity_id = append.entity, append.entity_id
    version = append.expected_version
    for e in append.events:
        version += 1
        events += (
            e.event_id,
            entity,
            entity_id,
            version,
            e.type,
            e.schema_version,
            e.data,
            now,
            e.command_id,
            e.traceparent,
        )
    for r in append.replies:
        replies += (entity, entity_id, r.command_id, r.request_hash, r.body, now)
    snap = append.snapshot
    if snap is not None:
        snapshots += (entity, entity_id, snap.version, snap.schema, snap.state)


def _insert_all(
    conn: sqlite3.Connection, events: list[object], replies: list[object], snapshots: list[object]
) -> None:
    if events:
        _insert_rows(conn, _INSERT_EVENT, _EVENT_WIDTH, events)
    if replies:
        _insert_rows(conn, _INSERT_REPLY, _REPLY_WIDTH, replies)
    if snapshots:
        _insert_rows(conn, _UPSERT_SNAPSHOT, _SNAPSHOT_WIDTH, snapshots, _UPSERT_SNAPSHOT_TAIL)


_Errors = list[sqlite3.IntegrityError | None]


def _insert_appends(conn: sqlite3.Connection, appends: list[Append], now: float) -> _Errors | None:
    """Insert all appends in the open transaction. None if all went in; else each
    append's integrity error (None for those inserted), having inserted the others."""
    events: list[object] = []
    replies: list[object] = []
    snapshots: list[object] = []
    for append in appends:
        _add_rows(append, now, events, replies, snapshots)
    conn.execute("SAVEPOINT appends")
    try:
        _insert_all(conn, events, replies, snapshots)
        return None
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK TO appends")
    finally:
        conn.execute("RELEASE appends")
    errors: _Errors = []
    for append in appends:
        events, replies, snapshots = [], [], []
        _add_rows(append, now, events, replies, snapshots)
        conn.execute("SAVEPOINT append")
        try:
            _insert_all(conn, events, replies, snapshots)
        except sqlite3.IntegrityError as exc:
            conn.execute("ROLLBACK TO append")
            errors.append(exc)
        else:
            errors.append(None)
        conn.execute("RELEASE append")
    return errors


def _integrity_error(append: Append, exc: sqlite3.IntegrityError) -> StoreError:
    text = str(exc)
    if "version conflict" in text or "events." in text:
        return VersionConflict(append.entity, append.entity_id, append.expected_version)
    return StoreError(f"{append.entity}/{append.entity_id}: {text}")


def _open_writer(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    """On the writer's thread: connect, set up WAL and create the schema."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=256
    )
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA wal_autocheckpoint = 10000")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA temp_store = MEMORY")  # statement staging: see the module doc
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.executescript(DDL)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        conn.execute("PRAGMA busy_timeout = 0")  # see _Writer
    except BaseException:
        conn.close()
        raise
    return conn


async def _connect(path: Path, synchronous: Synchronous) -> aiosqlite.Connection:
    """A read-only connection (the store's reader, or tools beside a running node)."""
    db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
    await db.execute("PRAGMA query_only = ON")
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    await db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    return db


@asynccontextmanager
async def open_event_store(
    path: str | Path,
    *,
    synchronous: Synchronous = "FULL",
    max_batch_events: int = 2000,
    readonly: bool = False,
) -> AsyncIterator[EventStore]:
    """Open (creating if needed) the store at `path` and run its writer until exit.

    On exit the writer commits everything already queued before the connections close.
    `readonly` opens an existing store for reading only (tools beside a running node).
    """
    path = Path(path)
    if readonly:
        if not path.exists():
            raise StoreError(f"no event store at {path}")
        try:
            reader = await _connect(path, synchronous)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open event store {path}: {exc}") from exc
        store = EventStore(None, reader, max_batch_events=max_batch_events)
        store._closing = True
        try:
            yield store
        finally:
            with anyio.CancelScope(shield=True):
                await reader.close()
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await _Writer.open(path, synchronous)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot initialise event store {path}: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"cannot open event store {path}: {exc}") from exc
    try:
        reader = await _connect(path, synchronous)
    except sqlite3.Error as exc:
        await writer.close()
        raise StoreError(f"cannot initialise event store {path}: {exc}") from exc
    store = EventStore(writer, reader, max_batch_events=max_batch_events, synchronous=synchronous)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store._write_loop)
            try:
                yield store
            finally:
                store._closing = True
                store._wakeup.set()
    finally:
        with anyio.CancelScope(shield=True):
            await reader.close()
            await writer.close()
