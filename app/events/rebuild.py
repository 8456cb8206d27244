"""`kaya replay PROJECTION`: rebuild a read model from the event store, beside the live node.

    events table -> scratch SQLite file (the consumer's own handler, admit as live)
      -> compare with the live model (optional) -> swap in: one transaction on the live store

A projection's only effects are SQL on its own tables, so its history can be run
again: to fix a bug in a handler, or to add a read model to a running system. The
rebuild happens off to the side so the live model keeps answering meanwhile; the
swap also applies what the node committed during the rebuild and moves the
checkpoint with it, so the live consumer neither misses nor repeats an event.

Called by the CLI, which prints what it returns; it opens the node's SQLite file
directly (WAL lets it work beside a running node).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaya.actors import Registry, UnknownSchema
from kaya.actors.wire import delivered_from_stored, event_subject, subscribes
from kaya.app.events.admission import admit
from kaya.app.events.consumers import Consumer, Effects
from kaya.app.events.runner import ensure_tables
from kaya.store import EventStore, StoredEvent, Transaction, open_event_store

ViewReader = Callable[[EventStore], Any]


@dataclass
class RebuildOutcome:
    events: int
    position: int
    identical_before_swap: bool | None
    swapped: bool


async def rebuild_projection(
    store: EventStore,
    consumer: Consumer,
    *,
    view: ViewReader | None = None,
    progress: Callable[[int, int], None] | None = None,
    swap: bool = True,
    batch: int = 1000,
    registry: Registry | None = None,
) -> RebuildOutcome:
    """Rebuild a read model from the event store, from scratch, then swap it in.

    The model is built in a scratch SQLite file from every stored event, with the
    consumer's own handler. Then, in one transaction on the live store, its tables
    are replaced, events committed meanwhile are applied too, and its checkpoint is
    set to the last of them: the live consumer skips what the rebuild already
    applied and carries on after it. With the `registry`, events reach the handler
    in their current shape, as the live consumer sees them.
    """
    if consumer.filter_subject.startswith("kaya.evt.") is False or not consumer.tables:
        raise ValueError(f"{consumer.name} has no read model to rebuild")
    total = await store.last_position()
    with tempfile.TemporaryDirectory(prefix="kaya-rebuild-") as scratch_dir:
        scratch_path = Path(scratch_dir) / "rebuild.db"
        async with open_event_store(scratch_path, synchronous="OFF") as scratch:
            await ensure_tables(scratch, consumer)
            position = events = 0
            while True:
                stored = await store.read_all(position, batch)
                if not stored:
                    break
                async with scratch.transaction() as tx:
                    for event in stored:
                        if subscribes(
                            consumer.filter_subject, event_subject(event.entity, event.entity_id)
                        ):
                            await _apply_stored(consumer, event, registry, tx)
                        events += 1
                    position = stored[-1].position
                    await tx.set_checkpoint(consumer.checkpoint_name(), position)
                if progress:
                    progress(position, max(total, position))
            identical = None
            if view is not None and await store.checkpoint(consumer.checkpoint_name()) == position:
                identical = _comparable(await view(scratch)) == _comparable(await view(store))
        if not swap:
            return RebuildOutcome(events, position, identical, False)
        position = await _swap_in(store, consumer, scratch_path, position, registry)
    return RebuildOutcome(events, position, identical, True)


async def _apply_stored(
    consumer: Consumer, stored: StoredEvent, registry: Registry | None, tx: Transaction
) -> None:
    """One stored event through the consumer as its live runner would take it."""
    try:
        event = admit(consumer, delivered_from_stored(stored), registry)
    except UnknownSchema:
        if consumer.unknown_event_policy == "stop":
            raise
        return  # the live consumer dead-letters or skips it: no effects here either
    effects = Effects()
    await consumer.handle(event, effects)
    for sql, params in effects.statements:
        await tx.execute(sql, params)


async def _swap_in(
    store: EventStore,
    consumer: Consumer,
    scratch: Path,
    position: int,
    registry: Registry | None = None,
) -> int:
    await ensure_tables(store, consumer)
    async with store.transaction(attach={"rebuilt": scratch}) as tx:
        for table in consumer.tables:
            await tx.execute(f"DELETE FROM main.{table}")
            await tx.execute(f"INSERT INTO main.{table} SELECT * FROM rebuilt.{table}")
        while True:  # what the node committed while we were rebuilding
            rows = await tx.fetchall(
                "SELECT position, event_id, entity, entity_id, version, type, schema_version,"
                " data, recorded_at, command_id, traceparent FROM main.events"
                " WHERE position > ? ORDER BY position LIMIT 1000",
                (position,),
            )
            if not rows:
                break
            for row in rows:
                event = StoredEvent(*row)
                if subscribes(
                    consumer.filter_subject, event_subject(event.entity, event.entity_id)
                ):
                    await _apply_stored(consumer, event, registry, tx)
                position = event.position
        await tx.set_checkpoint(consumer.checkpoint_name(), position)
    return position


def _comparable(view: Any) -> Any:
    if isinstance(view, dict):
        return {k: _comparable(v) for k, v in view.items() if k != "position"}
    return view
