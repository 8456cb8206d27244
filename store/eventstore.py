"""Event store: append with group commit, read streams, snapshots and replies.

The store's façade, and the top of its part of the command path: an actor's append
enters here and returns once durable. The work is done below, one job a module:

- kaya.store.groupcommit   queues appends and commits them, many per fsync; each
                           caller is woken only after its transaction committed
- kaya.store.sql           the SQL: multi-row INSERTs on the loop's thread, and the
                           connections' setup
- kaya.store.writer        the one write connection and the thread that commits
- kaya.store.transaction   the handle `transaction()` blocks write through

`transaction()` blocks (consumers' projections, checkpoints) run in savepoints of
the group commit's open transaction and share its fsync instead of paying one each.

Reads use a second connection: WAL lets them run beside the writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from kaya.store.errors import StoreError
from kaya.store.groupcommit import GroupCommit, StoreStatistics, Waiter
from kaya.store.records import Append, Reply, Snapshot, StoredEvent
from kaya.store.sql import EVENT_COLUMNS, Synchronous, connect_reader
from kaya.store.timing import Stages
from kaya.store.transaction import Transaction, execute_rowcount
from kaya.store.writer import Writer, rollback_quietly, waiting

__all__ = ["EventStore", "StoreStatistics", "Synchronous", "Transaction", "open_event_store"]


class EventStore:
    """The node's event store. Create it with `open_event_store`."""

    def __init__(
        self,
        writer: Writer | None,
        reader: aiosqlite.Connection,
        *,
        max_batch_events: int,
        synchronous: Synchronous = "FULL",
    ) -> None:
        self._synchronous = synchronous
        self._reader = reader
        self._commits = GroupCommit(writer, max_batch_events=max_batch_events)

    # ---- writing -------------------------------------------------------------

    @property
    def _writer(self) -> Writer:
        return self._commits.writer

    async def append(self, append: Append) -> None:
        """Append atomically; return once durable. Raises VersionConflict or StoreError."""
        await self._commits.append(append)

    @property
    def closing(self) -> bool:
        return self._commits.closing

    @property
    def stages(self) -> Stages:
        """The command path's stage timings (store/timing.py): the store's own, and a
        place for the actors' and the ingress's."""
        return self._commits.stages

    @property
    def commit_count(self) -> int:
        """Increments after every group commit: pair it with `wait_for_commit`."""
        return self._commits.commit_count

    async def wait_for_commit(self, seen: int) -> None:
        """Return once a commit happened after the one counted by `seen` (no missed wake-ups)."""
        await self._commits.wait_for_commit(seen)

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
        commits = self._commits
        writer = self._writer
        if (
            attach
            or commits.closing
            or (not durable and not commits.queued and not writer.conn.in_transaction)
        ):
            async with self._own_transaction(attach or {}, durable=durable) as tx:
                yield tx
            return
        waiter = Waiter()
        async with commits.write_lock:
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
            if commits.closing:  # the writer may be gone: commit here
                await commits.commit_now()
                return
            commits.enlist(waiter)
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
        self._commits.abandon()

    @asynccontextmanager
    async def _own_transaction(
        self, attach: dict[str, Path], *, durable: bool
    ) -> AsyncIterator[Transaction]:
        async with self._commits.write_lock:
            writer = self._writer
            conn = writer.conn
            if conn.in_transaction:  # ATTACH and PRAGMA synchronous are refused inside one
                await self._commits.commit_now()
            relaxed = not durable and self._synchronous in ("FULL", "EXTRA")
            if relaxed:
                conn.execute("PRAGMA synchronous = NORMAL")
            attached: list[str] = []
            try:
                for alias, path in attach.items():
                    await writer.run(
                        waiting, conn, conn.execute, "ATTACH DATABASE ? AS " + alias, (str(path),)
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
                    await writer.run(waiting, conn, conn.execute, "DETACH DATABASE " + alias)
                if relaxed:
                    conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    def _rollback(self) -> None:
        try:
            rollback_quietly(self._writer.conn)
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
        async with self._commits.write_lock:
            writer = self._writer
            if writer.conn.in_transaction:
                await self._commits.commit_now()
            try:
                return await writer.run(
                    waiting,
                    writer.conn,
                    execute_rowcount,
                    writer.conn,
                    "DELETE FROM replies WHERE recorded_at < ?",
                    (older_than,),
                )
            except sqlite3.Error as exc:  # one statement in autocommit mode: nothing changed
                raise StoreError(f"expiring replies failed: {exc}") from exc

    # ---- reading -------------------------------------------------------------

    async def read_stream(
        self, entity: str, entity_id: str, after_version: int = 0, limit: int = -1
    ) -> list[StoredEvent]:
        """The stream's events with version > after_version, in version order; at most
        `limit` of them (-1: all), so a page of a long history reads only that page."""
        rows = await self._fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE entity = ? AND entity_id = ?"
            " AND version > ? ORDER BY version LIMIT ?",
            (entity, entity_id, after_version, limit),
        )
        return [StoredEvent(*row) for row in rows]

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Events of every stream with position > after_position, in commit order."""
        rows = await self._fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
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

    async def position_of(self, entity: str, entity_id: str, version: int) -> int:
        """The position of the stream's event `version` (0 for version 0, or if absent).

        In a cluster: its sequence in KAYA_EVENTS, which the next write is checked
        against. It must be the version an actor was built from, never simply the
        latest the store holds: a later event imported meanwhile (an old owner's late
        write) would otherwise let the actor write its own next version beside it."""
        if version == 0:
            return 0
        rows = await self._fetch(
            "SELECT position FROM events WHERE entity = ? AND entity_id = ? AND version = ?",
            (entity, entity_id, version),
        )
        return int(rows[0][0]) if rows else 0

    async def _fetch(self, sql: str, params: Sequence[object]) -> list[sqlite3.Row]:
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc

    def statistics(self) -> StoreStatistics:
        return self._commits.statistics()


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
            reader = await connect_reader(path, synchronous)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open event store {path}: {exc}") from exc
        store = EventStore(None, reader, max_batch_events=max_batch_events)
        store._commits.closing = True
        try:
            yield store
        finally:
            with anyio.CancelScope(shield=True):
                await reader.close()
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await Writer.open(path, synchronous)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot initialise event store {path}: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"cannot open event store {path}: {exc}") from exc
    try:
        reader = await connect_reader(path, synchronous)
    except sqlite3.Error as exc:
        await writer.close()
        raise StoreError(f"cannot initialise event store {path}: {exc}") from exc
    store = EventStore(writer, reader, max_batch_events=max_batch_events, synchronous=synchronous)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store._commits.run)
            try:
                yield store
            finally:
                store._commits.close()
    finally:
        with anyio.CancelScope(shield=True):
            await reader.close()
            await writer.close()
