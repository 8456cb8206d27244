"""The store's one write connection and the thread its slow calls run on.

On the command path this is the last step of an append: the group commit inserts a
batch's rows on the event loop's thread (kaya.store.sql), then hands the commit, an
fsync, to this thread and waits for it. Every hop to a thread and back costs about
100 µs of latency, so short statements stay on the loop's thread and only what may
block goes here: the commit (one hop per group commit), waits for another process's
write lock, and statements of transactions that ask for it (`attach`).

One dedicated thread fed by a queue, not a pool: calls on the connection run one at
a time, in order. Its awaiter waits for a call even when cancelled, so the store's
write lock is never let go while this thread still uses the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from kaya.store.sql import BUSY_TIMEOUT_MS, Synchronous, open_writer

_T = TypeVar("_T")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY


def rollback_quietly(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class Writer:
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
    async def open(cls, path: Path, synchronous: Synchronous) -> Writer:
        writer = cls()
        try:
            writer.conn = await writer.run(open_writer, path, synchronous)
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
            await self.run(waiting, self.conn, self.conn.execute, "BEGIN IMMEDIATE")

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


def waiting(conn: sqlite3.Connection, fn: Callable[..., _T], *args: Any) -> _T:
    """On the writer's thread: `fn(*args)`, allowed to wait for another process's lock."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        return fn(*args)
    finally:
        conn.execute("PRAGMA busy_timeout = 0")
