"""The store's SQL: its connections' setup and the multi-row INSERTs of a group commit.

Bottom of the command path: a batch of appends, taken by the group commit, becomes
rows here, inserted into the writer's open transaction on the event loop's thread.
They go in as a few multi-row INSERTs (a handful of prepared statements instead of
one step per row) because where the work runs matters more than how much there is:
every hop to a thread and back costs about 100 µs, so only the commit (the fsync)
hops to the writer's thread. A multi-row INSERT, like any statement inside a
savepoint, stages its rows in a temporary table: `temp_store = MEMORY` keeps that
off the disk, which was a third of an append's cost (bench.store).

Nothing here knows of threads, queues or waiters: plain functions of a connection.
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from typing import Literal

import aiosqlite

from kaya.store.errors import StoreError, VersionConflict
from kaya.store.records import Append
from kaya.store.schema import DDL, SCHEMA_VERSION

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

BUSY_TIMEOUT_MS = 5000
_MAX_CHUNK = 256
"""Most rows in one multi-row INSERT: 2,560 parameters, far below SQLite's 32,766."""

_INSERT_EVENT = (
    "INSERT INTO events (event_id, entity, entity_id, version, type, schema_version,"
    " data, recorded_at, command_id, traceparent)"
)
_INSERT_REPLY = (
    "INSERT OR IGNORE INTO replies (entity, entity_id, command_id, request_hash, body, recorded_at)"
)
_UPSERT_SNAPSHOT = "INSERT INTO snapshots (entity, entity_id, version, state_schema, state)"
_UPSERT_SNAPSHOT_TAIL = (
    " ON CONFLICT (entity, entity_id) DO UPDATE SET"
    " version = excluded.version, state_schema = excluded.state_schema, state = excluded.state"
    " WHERE excluded.version > snapshots.version"
)
_EVENT_WIDTH, _REPLY_WIDTH, _SNAPSHOT_WIDTH = 10, 6, 5
EVENT_COLUMNS = (
    "position, event_id, entity, entity_id, version, type, schema_version, data,"
    " recorded_at, command_id, traceparent"
)
"""The `events` columns in `StoredEvent`'s field order: `StoredEvent(*row)`."""


# ---- multi-row INSERTs ---------------------------------------------------------------


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


Errors = list[sqlite3.IntegrityError | None]


def insert_appends(conn: sqlite3.Connection, appends: list[Append], now: float) -> Errors | None:
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
    errors: Errors = []
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


def integrity_error(append: Append, exc: sqlite3.IntegrityError) -> StoreError:
    text = str(exc)
    if "version conflict" in text or "events." in text:
        return VersionConflict(append.entity, append.entity_id, append.expected_version)
    return StoreError(f"{append.entity}/{append.entity_id}: {text}")


# ---- connections ---------------------------------------------------------------------


def open_writer(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    """On the writer's thread: connect, set up WAL and create the schema."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=256
    )
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA wal_autocheckpoint = 10000")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA temp_store = MEMORY")  # statement staging: see the module doc
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.executescript(DDL)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        conn.execute("PRAGMA busy_timeout = 0")  # see writer.Writer
    except BaseException:
        conn.close()
        raise
    return conn


async def connect_reader(path: Path, synchronous: Synchronous) -> aiosqlite.Connection:
    """A read-only connection (the store's reader, or tools beside a running node).

    Reads use this second connection: WAL lets them run beside the writer.
    """
    db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
    await db.execute("PRAGMA query_only = ON")
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db
