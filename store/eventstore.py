"""Event store: append with group commit, read streams, snapshots and replies.

Appends from many actors are queued and written by one writer task, many per
SQLite transaction and so per fsync; each caller is woken only after the
transaction holding its append has committed. A disk does a few thousand fsyncs
a second and every aiosqlite call is a hop to its thread and back, so the writer
hands the database whole batches (a handful of calls per batch, not per event).

Reads use a second connection: WAL lets them run beside the writer.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import anyio

from store.errors import StoreError, VersionConflict
from store.records import Append, Reply, Snapshot, StoredEvent
from store.schema import DDL, SCHEMA_VERSION

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

_INSERT_EVENT = (
    "INSERT INTO events (event_id, entity, entity_id, version, type, schema_version,"
    " data, recorded_at, command_id, traceparent) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_REPLY = (
    "INSERT INTO replies (entity, entity_id, command_id, request_hash, body, recorded_at)"
    " VALUES (?,?,?,?,?,?)"
)
_UPSERT_SNAPSHOT = (
    "INSERT INTO snapshots (entity, entity_id, version, state_schema, state)"
    " VALUES (?,?,?,?,?) ON CONFLICT (entity, entity_id) DO UPDATE SET"
    " version = excluded.version, state_schema = excluded.state_schema, state = excluded.state"
    " WHERE excluded.version > snapshots.version"
)
_EVENT_COLUMNS = (
    "position, event_id, entity, entity_id, version, type, schema_version, data,"
    " recorded_at, command_id, traceparent"
)


class Transaction:
    """One exclusive write transaction beside the group commit: projections, checkpoints.

    Only SQL goes through it, so callers above the store never hold a connection.
    """

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        cursor = await self._db.execute(sql, params)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self._db.executemany(sql, rows)

    async def execute_in_order(self, statements: Sequence[tuple[str, Sequence[object]]]) -> None:
        """Run statements in order; consecutive ones with the same SQL go as one executemany."""
        start = 0
        while start < len(statements):
            sql = statements[start][0]
            end = start + 1
            while end < len(statements) and statements[end][0] == sql:
                end += 1
            if end - start == 1:
                await self._db.execute(sql, statements[start][1])
            else:
                await self._db.executemany(sql, [params for _, params in statements[start:end]])
            start = end

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self._db.execute_fetchall(sql, params)]

    async def checkpoint(self, name: str) -> int:
        rows = await self.fetchall("SELECT position FROM checkpoints WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    async def set_checkpoint(self, name: str, position: int) -> None:
        await self._db.execute(
            "INSERT INTO checkpoints (name, position) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
            (name, position),
        )


class _Pending:
    """An append waiting for its transaction; `done` is set once it committed or failed."""

    __slots__ = ("append", "done", "error")

    def __init__(self, append: Append) -> None:
        self.append = append
        self.done = anyio.Event()
        self.error: StoreError | None = None


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
        writer: aiosqlite.Connection | None,
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
        self._appends = 0
        self._batches = 0
        self._events = 0

    # ---- writing -------------------------------------------------------------

    @property
    def _writer(self) -> aiosqlite.Connection:
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
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while self._queue:
                batch = self._take_batch()
                async with self._write_lock:
                    await self._write_batch(batch)
                for pending in batch:
                    pending.done.set()
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
        now = time.time()
        events = [row for p in batch for row in _event_rows(p.append, now)]
        replies = [row for p in batch for row in _reply_rows(p.append, now)]
        snapshots = [_snapshot_row(p.append) for p in batch if p.append.snapshot is not None]
        try:
            if events:
                await self._writer.executemany(_INSERT_EVENT, events)
            if replies:
                await self._writer.executemany(_INSERT_REPLY, replies)
            if snapshots:
                await self._writer.executemany(_UPSERT_SNAPSHOT, snapshots)
            await self._writer.commit()
        except sqlite3.IntegrityError:
            await self._rollback()
            await self._write_one_by_one(batch, now)
            return
        except sqlite3.Error as exc:
            await self._rollback()
            error = StoreError(f"append failed: {exc}")
            for pending in batch:
                pending.error = error
            return
        self._account(batch, len(events))

    async def _write_one_by_one(self, batch: list[_Pending], now: float) -> None:
        """Isolate the appends that conflict; the rest of the batch still commits together."""
        ok: list[_Pending] = []
        try:
            # without an enclosing transaction each RELEASE would commit on its own
            await self._writer.execute("BEGIN")
            for pending in batch:
                append = pending.append
                await self._writer.execute("SAVEPOINT append")
                try:
                    await self._writer.executemany(_INSERT_EVENT, _event_rows(append, now))
                    await self._writer.executemany(_INSERT_REPLY, _reply_rows(append, now))
                    if append.snapshot is not None:
                        await self._writer.execute(_UPSERT_SNAPSHOT, _snapshot_row(append))
                except sqlite3.IntegrityError as exc:
                    await self._writer.execute("ROLLBACK TO append")
                    pending.error = _integrity_error(append, exc)
                else:
                    ok.append(pending)
                await self._writer.execute("RELEASE append")
            await self._writer.commit()
        except sqlite3.Error as exc:
            await self._rollback()
            error = StoreError(f"append failed: {exc}")
            for pending in ok:
                pending.error = error
            return
        self._account(ok, sum(len(p.append.events) for p in ok))

    def _account(self, committed: Sequence[_Pending], events: int) -> None:
        self._commit_count += 1
        self._batches += 1
        self._appends += len(committed)
        self._events += events

    async def _rollback(self) -> None:
        try:
            await self._writer.rollback()
        except sqlite3.Error as exc:  # the connection is unusable: say so on the next write
            raise StoreError(f"rollback failed: {exc}") from exc

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

        `attach` names other SQLite files visible in it as `alias.table` (rebuilds).
        `durable=False` commits without an fsync: for state derived from events
        (read models, checkpoints) that a replay rebuilds. In WAL mode the log is
        sequential, so the next durable commit fsyncs it too, and a power loss can
        only lose a suffix of such commits, each with its checkpoint: never a gap.
        """
        async with self._write_lock:
            db = self._writer
            relaxed = not durable and self._synchronous in ("FULL", "EXTRA")
            if relaxed:
                await db.execute("PRAGMA synchronous = NORMAL")
            for alias, path in (attach or {}).items():
                await db.execute("ATTACH DATABASE ? AS " + alias, (str(path),))
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield Transaction(db)
            except sqlite3.Error as exc:
                await self._rollback()
                raise StoreError(f"transaction failed: {exc}") from exc
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._rollback()
                raise
            else:
                try:
                    await db.commit()
                except sqlite3.Error as exc:
                    await self._rollback()
                    raise StoreError(f"commit failed: {exc}") from exc
            finally:
                with anyio.CancelScope(shield=True):
                    for alias in attach or {}:
                        await db.execute("DETACH DATABASE " + alias)
                    if relaxed:
                        await db.execute(f"PRAGMA synchronous = {self._synchronous}")

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
            try:
                cursor = await self._writer.execute(
                    "DELETE FROM replies WHERE recorded_at < ?", (older_than,)
                )
                await self._writer.commit()
            except sqlite3.Error as exc:
                await self._rollback()
                raise StoreError(f"expiring replies failed: {exc}") from exc
            return cursor.rowcount

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


def _event_rows(append: Append, now: float) -> list[tuple[object, ...]]:
    base = append.expected_version
    return [
        (
            e.event_id,
            append.entity,
            append.entity_id,
            base + i,
            e.type,
            e.schema_version,
            e.data,
            now,
            e.command_id,
            e.traceparent,
        )
        for i, e in enumerate(append.events, start=1)
    ]


def _reply_rows(append: Append, now: float) -> list[tuple[object, ...]]:
    return [
        (append.entity, append.entity_id, r.command_id, r.request_hash, r.body, now)
        for r in append.replies
    ]


def _snapshot_row(append: Append) -> tuple[object, ...]:
    snap = append.snapshot
    assert snap is not None
    return (append.entity, append.entity_id, snap.version, snap.schema, snap.state)


def _integrity_error(append: Append, exc: sqlite3.IntegrityError) -> StoreError:
    text = str(exc)
    if "version conflict" in text or "events." in text:
        return VersionConflict(append.entity, append.entity_id, append.expected_version)
    return StoreError(f"{append.entity}/{append.entity_id}: {text}")


async def _connect(path: Path, synchronous: Synchronous, *, readonly: bool) -> aiosqlite.Connection:
    if readonly:
        db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
        await db.execute("PRAGMA query_only = ON")
    else:
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA wal_autocheckpoint = 10000")
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    await db.execute("PRAGMA busy_timeout = 5000")
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
            reader = await _connect(path, synchronous, readonly=True)
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
        writer = await _connect(path, synchronous, readonly=False)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open event store {path}: {exc}") from exc
    try:
        await writer.executescript(DDL)
        await writer.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        await writer.commit()
        reader = await _connect(path, synchronous, readonly=True)
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
