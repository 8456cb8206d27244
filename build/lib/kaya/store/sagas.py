"""What the store keeps for sagas: their durable step deadlines, and which are unfinished.

A saga's progress itself is its event stream; these queries only let the runtime
find the sagas to resume after a restart and keep a step's deadline fixed across
restarts (a deadline that moved on every restart would never pass).
"""

from __future__ import annotations

from collections.abc import Sequence

from kaya.store.eventstore import EventStore

DEADLINES_DDL = (
    "CREATE TABLE IF NOT EXISTS saga_deadlines ("
    " entity TEXT NOT NULL, entity_id TEXT NOT NULL, step TEXT NOT NULL,"
    " due_at REAL NOT NULL, PRIMARY KEY (entity, entity_id, step)) WITHOUT ROWID"
)


async def ensure_saga_tables(store: EventStore) -> None:
    async with store.transaction() as tx:
        await tx.execute(DEADLINES_DDL)


async def step_deadline(
    store: EventStore, entity: str, entity_id: str, step: str, due_at: float
) -> float:
    """The step's deadline: `due_at` the first time it is asked for, the stored one after."""
    async with store.transaction() as tx:
        await tx.execute(
            "INSERT OR IGNORE INTO saga_deadlines (entity, entity_id, step, due_at)"
            " VALUES (?, ?, ?, ?)",
            (entity, entity_id, step, due_at),
        )
        rows = await tx.fetchall(
            "SELECT due_at FROM saga_deadlines WHERE entity = ? AND entity_id = ? AND step = ?",
            (entity, entity_id, step),
        )
    return float(rows[0][0])


async def forget_deadline(store: EventStore, entity: str, entity_id: str, step: str) -> None:
    """Once the saga recorded the step's outcome, its deadline has no more use."""
    async with store.transaction() as tx:
        await tx.execute(
            "DELETE FROM saga_deadlines WHERE entity = ? AND entity_id = ? AND step = ?",
            (entity, entity_id, step),
        )


async def unfinished(store: EventStore, entity: str, terminal: Sequence[str]) -> list[str]:
    """Ids of `entity` streams whose last event is not one of the `terminal` types."""
    marks = ",".join("?" * len(terminal)) or "''"
    rows = await store.query(
        "SELECT e.entity_id FROM events e JOIN ("
        "  SELECT entity_id, MAX(version) AS v FROM events WHERE entity = ? GROUP BY entity_id"
        ") last ON e.entity_id = last.entity_id AND e.version = last.v"
        f" WHERE e.entity = ? AND e.type NOT IN ({marks})",
        (entity, entity, *terminal),
    )
    return [str(row[0]) for row in rows]
