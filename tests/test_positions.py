"""Consumers trust nothing a message says about positions: the store is the judge.

Anyone who can publish on `kaya.evt.>` can put a message on KAYA_EVENTS. A message
whose `Kaya-Position` is ahead of the store, whose envelope is missing, or whose
envelope differs from the event the store holds at that position must never move a
consumer's checkpoint (a checkpoint moved to 10^12 would make the consumer skip
every real event after it, for good): it is dead-lettered with the reason, and the
consumer goes on to apply the real events. The same holds on the path where a
consumer passes over events outside its `filter_subject`.

Real nats-server, real SQLite, the node in-process.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import orjson
import pytest
from nats.aio.client import Client as NATS

from examples.bank import make_app
from kaya.app.broker.streams import ensure_streams
from kaya.app.events.dlq import DeadLetter, list_dead_letters
from kaya.app.node import Node, open_node
from kaya.store import Append, NewEvent, open_event_store
from tests.conftest import call, node_config
from tests.servers import NatsServer
from tests.test_events import caught_up, open_cmd

pytestmark = pytest.mark.anyio

BOGUS = 10**12
CONSUMERS = ("analytics", "notifications")


def envelope(position: int, event_type: str, version: int = 1) -> dict[str, str]:
    """The contract's headers for an event that claims to be at `position`."""
    return {
        "Nats-Msg-Id": uuid.uuid4().hex,
        "Kaya-Event-Type": event_type,
        "Kaya-Schema-Version": "1",
        "Kaya-Entity-Version": str(version),
        "Kaya-Position": str(position),
    }


async def letters_of(nc: NATS, consumer: str, count: int) -> list[DeadLetter]:
    """The consumer's dead letters, once there are `count` (bounded poll: nothing signals it)."""
    js = nc.jetstream()
    with anyio.fail_after(10):
        while True:
            letters = await list_dead_letters(js, consumer)
            if len(letters) >= count:
                return letters
            await anyio.sleep(0.02)


@pytest.mark.parametrize(
    "entity",
    [
        pytest.param("account", id="handled-path"),
        # analytics reads only kaya.evt.account.>: it passes over this one unhandled
        pytest.param("transfer", id="filter-skip-path"),
    ],
)
async def test_a_position_ahead_of_the_store_moves_no_checkpoint(
    node: Node, nc: NATS, uid: str, entity: str
) -> None:
    subject = f"kaya.cmd.account.{uid}"
    await call(nc, subject, open_cmd())
    await caught_up(node)
    forged = await nc.jetstream().publish(
        f"kaya.evt.{entity}.{uid}",
        orjson.dumps({"type": "Deposited", "amount": 1000}),
        headers=envelope(BOGUS, "Deposited", version=2),
    )
    assert forged.seq > 0
    reply = await call(nc, subject, {"type": "Deposit", "amount": 7})
    assert reply["ok"] is True, reply
    last = await node.store.last_position()
    await caught_up(node)

    for name in CONSUMERS:
        assert node.consumers[name].statistics().checkpoint == last, name
        runner = node.consumers[name]
        assert await node.store.checkpoint(runner.consumer.checkpoint_name()) == last, name
        [letter] = await letters_of(nc, name, 1)
        assert letter.original_seq == forged.seq
        assert f"Kaya-Position {BOGUS} is ahead of the store" in letter.last_error
    view = await call(nc, "kaya.view.analytics")
    assert view["currencies"]["EUR"]["balance"] == 7  # the real deposit, not the forged one
    assert view["operations"]["deposits"] == 1
    # and later real events keep being applied
    await call(nc, subject, {"type": "Deposit", "amount": 3})
    await caught_up(node)
    view = await call(nc, "kaya.view.analytics")
    assert view["currencies"]["EUR"]["balance"] == 10


async def test_an_envelope_the_store_does_not_hold_moves_no_checkpoint(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(nats_server, tmp_path / "node")
    # position 1 in the store: an Opened, committed while no relay ran
    body = {"type": "Opened", "owner": "ann", "currency": "EUR"}
    opened = NewEvent(uuid.uuid4().hex, "Opened", 1, orjson.dumps(body))
    async with open_event_store(config.store_path) as store:
        await store.append(Append("account", uid, 0, [opened]))
    js = nc.jetstream()
    await ensure_streams(js, config.events)
    # ahead of it on the stream: a message claiming position 1 that is another event, and
    # one on an account subject with no envelope at all
    await js.publish(
        f"kaya.evt.account.{uid}",
        orjson.dumps({"type": "Deposited", "amount": 1000}),
        headers=envelope(1, "Deposited"),
    )
    await js.publish(f"kaya.evt.account.{uid}", b'{"type":"Deposited","amount":5}')
    async with open_node(config, make_app()) as node:
        await caught_up(node)  # the relay publishes the real position 1 after them
        for name in CONSUMERS:
            assert node.consumers[name].statistics().checkpoint == 1, name
            forged, bare = await letters_of(nc, name, 2)
            assert "position 1" in forged.last_error
            assert opened.event_id in forged.last_error  # what the store holds there
            assert "Kaya-Event-Type" in bare.last_error or "header" in bare.last_error
        view = await call(nc, "kaya.view.analytics")
        assert view["accounts"]["opened"] == 1  # the real event was applied
        assert view["operations"]["deposits"] == 0  # the forged one was not
