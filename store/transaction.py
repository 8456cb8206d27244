"""The handle a `store.transaction()` block writes through: projections, checkpoints.

Beside the appends on the command path, consumers' projections and checkpoints write
in blocks of `EventStore.transaction()`. Such a block runs in a savepoint of the
writer's open SQLite transaction, so it shares that transaction's group commit and
fsync instead of paying one of its own. This handle is all the block sees of it:
SQL in, rows out, never the connection, whose transaction the store alone opens,
commits and rolls back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from kaya.store.writer import Writer, waiting


class Transaction:
    """One exclusive write transaction beside the group commit: projections, checkpoints.

    Only SQL goes through it, so callers above the store never hold a connection.
    Statements run on the event loop's thread (a hop to a thread costs more than a
    small statement): keep them small, or open the transaction with `attach`, whose
    statements run on the writer's thread.
    """

    def __init__(self, writer: Writer, *, offload: bool = False) -> None:
        self._writer = writer
        self._conn = writer.conn
        self._offload = offload

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        if self._offload:
            return await self._writer.run(
                waiting, self._conn, execute_rowcount, self._conn, sql, params
            )
        return self._conn.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        if self._offload:
            await self._writer.run(waiting, self._conn, self._conn.executemany, sql, list(rows))
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
            return await self._writer.run(waiting, self._conn, _fetchall, self._conn, sql, params)
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


def execute_rowcount(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> int:
    return conn.execute(sql, params).rowcount


def _fetchall(
    conn: sqlite3.Connection, sql: str, params: Sequence[object]
) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in conn.execute(sql, params).fetchall()]
