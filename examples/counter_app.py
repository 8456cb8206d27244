"""Your first Kaya app: a counter that may not pass 100, a read model of totals, a view.

Serve it from the folder that holds this file:  kaya run --app counter_app:app
(README, "Your first entity"; tests/test_user_app.py runs this very file.)
"""

from __future__ import annotations

from typing import Any

import msgspec

import kaya


class Add(kaya.Command):
    n: int


class Added(kaya.Event):
    n: int


class Tally(msgspec.Struct, frozen=True, kw_only=True):
    total: int = 0


class Counter(kaya.Entity[Tally, Add, Added]):
    name = "counter2"
    state_type = Tally
    command_types = (Add,)
    event_types = (Added,)

    def decide(self, state: Tally, command: Add) -> list[Added]:
        if state.total + command.n > 100:
            raise kaya.Rejected("the total may not pass 100")
        return [Added(n=command.n)]

    def evolve(self, state: Tally, event: Added) -> Tally:
        return Tally(total=state.total + event.n)


class Totals(kaya.Projection):
    """A read model: every counter's total, in a table of its own."""

    name = "totals"
    filter_subject = "kaya.evt.counter2.>"
    tables = ("counter_totals",)
    ddl = "CREATE TABLE IF NOT EXISTS counter_totals (id TEXT PRIMARY KEY, total INTEGER)"

    async def handle(self, event: kaya.Delivered, effects: kaya.Effects) -> None:
        effects.execute(
            "INSERT INTO counter_totals (id, total) VALUES (?, ?)"
            " ON CONFLICT (id) DO UPDATE SET total = total + excluded.total",
            (event.entity_id, event.decode()["n"]),
        )


async def totals(context: kaya.Context, params: dict[str, Any]) -> dict[str, Any]:
    """`kaya.view.totals`: the totals, all or `{"id": ...}`'s."""
    rows = await context.query("SELECT id, total FROM counter_totals ORDER BY id")
    wanted = params.get("id")
    return {"totals": {id_: total for id_, total in rows if wanted in (None, id_)}}


app = kaya.App(entities=[Counter()], consumers=[Totals()], views={"totals": totals})
