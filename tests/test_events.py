"""Events out: relay to KAYA_EVENTS, consumers, DLQ, read models, notifications.

Real nats-server (fresh per test), real SQLite, the node in-process.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import msgspec
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from examples.bank import make_app
from kaya.actors.wire import DLQ_STREAM, EVENTS_STREAM
from kaya.app.config import ConsumersConfig
from kaya.app.events.consumers import Consumer, Context, Delivered, Effects
from kaya.app.events.dlq import list_dead_letters, replay_dead_letters
from kaya.app.events.inspect import describe_streams
from kaya.app.events.rebuild import rebuild_projection
from kaya.app.node import Node, open_node
from kaya.store import Append, NewEvent, open_event_store
from tests.conftest import call, node_config
from tests.servers import NatsServer, start_nats_server

pytestmark = pytest.mark.anyio


def open_cmd(owner: str = "ann", currency: str = "EUR") -> dict[str, Any]:
    return {"type": "Open", "owner": owner, "currency": currency}


async def stream_messages(nc: NATS, subject: str = "kaya.evt.>") -> list[Msg]:
    """Every message of KAYA_EVENTS on `subject`, read with an ordered consumer."""
    js = nc.jetstream()
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    expected = sum((info.state.subjects or {}).values())
    sub = await js.subscribe(subject, stream=EVENTS_STREAM, ordered_consumer=True)
    msgs: list[Msg] = []
    with anyio.fail_after(10):
        while len(msgs) < expected:
            msgs.append(await sub.next_msg(timeout=5))
    await sub.unsubscribe()
    return msgs


async def caught_up(node: Node) -> None:
    """Until the relay published and every consumer applied everything committed."""
    last = await node.store.last_position()
    try:
        with anyio.fail_after(15):
            await node.relay.wait_caught_up()
            for runner in node.consumers.values():
                await runner.wait_for_position(last)
    except TimeoutError:
        relay = await node.relay.statistics()
        stats = {name: runner.statistics() for name, runner in node.consumers.items()}
        raise AssertionError(f"not caught up to {last}: relay {relay}, consumers {stats}") from None


async def test_events_reach_the_stream_with_the_contract_headers_in_order(
    node: Node, nc: NATS, uid: str
) -> None:
    subject = f"kaya.cmd.account.{uid}"
    await call(nc, subject, open_cmd(), command_id="open-1")
    async with anyio.create_task_group() as tg:
        for amount in range(1, 51):
            tg.start_soon(call, nc, subject, {"type": "Deposit", "amount": amount})
    await caught_up(node)
    msgs = await stream_messages(nc, f"kaya.evt.account.{uid}")
    assert len(msgs) == 51
    versions = [int(m.headers["Kaya-Entity-Version"]) for m in msgs if m.headers]
    assert versions == list(range(1, 52))
    stored = await node.store.read_stream("account", uid)
    first = msgs[0].headers or {}
    assert first["Nats-Msg-Id"] == stored[0].event_id
    assert first["Kaya-Event-Type"] == "Opened"
    assert first["Kaya-Schema-Version"] == "2"  # Opened v2
    assert first["Kaya-Position"] == str(stored[0].position)
    assert first["Kaya-Command-Id"] == "open-1"
    assert orjson.loads(msgs[0].data) == {
        "type": "Opened",
        "owner": "ann",
        "currency": "EUR",
        "kind": "personal",
    }
    assert sum(orjson.loads(m.data).get("amount", 0) for m in msgs) == sum(range(1, 51))


async def test_a_crash_between_commit_and_publish_loses_and_duplicates_nothing(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(nats_server, tmp_path)
    # 1. events committed while no relay ran (the node died right after the commit)
    async with open_event_store(config.store_path) as store:
        events = [
            NewEvent(
                event_id=uuid.uuid4().hex,
                type="Opened",
                schema_version=1,
                data=orjson.dumps(open_cmd() | {"type": "Opened"}),
            ),
            *[
                NewEvent(
                    event_id=uuid.uuid4().hex,
                    type="Deposited",
                    schema_version=1,
                    data=orjson.dumps({"type": "Deposited", "amount": 5}),
                )
                for _ in range(9)
            ],
        ]
        await store.append(Append("account", uid, 0, events))
    # 2. the next start publishes them
    async with open_node(config, make_app()) as node:
        await caught_up(node)
    # 3. published but the checkpoint was lost (crash after publish, before checkpoint)
    async with open_event_store(config.store_path) as store, store.transaction() as tx:
        await tx.set_checkpoint("relay", 0)
    async with open_node(config, make_app()) as node:
        await caught_up(node)
        stats = await node.relay.statistics()
        assert stats.duplicates == 10  # republished, dropped by the broker's dedup
        assert stats.published == 0
        msgs = await stream_messages(nc, f"kaya.evt.account.{uid}")
        assert [m.headers["Nats-Msg-Id"] for m in msgs if m.headers] == [e.event_id for e in events]
        view = await call(nc, "kaya.view.analytics")
        assert view["currencies"]["EUR"]["balance"] == 45  # the consumer counted once


async def test_a_broker_that_lost_its_data_gets_it_back_from_the_store(
    nats_server: NatsServer, tmp_path: Path, uid: str
) -> None:
    config = node_config(nats_server, tmp_path)
    revived: NatsServer | None = None
    try:
        async with open_node(config, make_app()) as node:
            nc = await nats.connect(nats_server.url)
            await call(nc, f"kaya.cmd.account.{uid}", open_cmd())
            await call(nc, f"kaya.cmd.account.{uid}", {"type": "Deposit", "amount": 9})
            await caught_up(node)
            await nc.close()
            # the broker dies and comes back without what it acknowledged but never synced
            nats_server.stop()
            shutil.rmtree(nats_server.store_dir / "jetstream")
            revived = start_nats_server(nats_server.store_dir, port=nats_server.port)
            nc = await nats.connect(revived.url)
            with anyio.fail_after(20):
                while True:  # the node reconnects, recreates its streams, rewinds its relay
                    try:
                        info = await nc.jetstream().stream_info(EVENTS_STREAM)
                        if info.state.messages == 2:
                            break
                    except nats.errors.Error:  # not there yet, or JetStream still starting
                        pass
                    await anyio.sleep(0.05)
            msgs = await stream_messages(nc, f"kaya.evt.account.{uid}")
            assert [orjson.loads(m.data)["type"] for m in msgs] == ["Opened", "Deposited"]
            # the consumers lost their durables with the data: they recreate them and go on,
            # counting the republished events once
            await call(nc, f"kaya.cmd.account.{uid}", {"type": "Deposit", "amount": 4})
            await caught_up(node)
            view = await call(nc, "kaya.view.analytics")
            assert view["currencies"]["EUR"]["balance"] == 13
            assert view["operations"]["deposits"] == 2
            await nc.close()
    finally:
        if revived is not None:
            revived.stop()


async def test_analytics_view_and_notifications(node: Node, nc: NATS, uid: str) -> None:
    notes: list[Msg] = []
    got_all = anyio.Event()

    async def on_note(msg: Msg) -> None:
        notes.append(msg)
        if len(notes) == 4:
            got_all.set()

    await nc.subscribe("kaya.notify.Ann_Lee", cb=on_note)
    subject = f"kaya.cmd.account.{uid}"
    await call(nc, subject, open_cmd(owner="Ann Lee", currency="USD"))
    await call(nc, subject, {"type": "Deposit", "amount": 100})
    await call(nc, subject, {"type": "Withdraw", "amount": 30})
    await call(nc, f"kaya.cmd.account.{uid}-b", open_cmd(owner="Bob", currency="USD"))
    await call(nc, subject, {"type": "Withdraw", "amount": 70})
    await caught_up(node)
    view = await call(nc, "kaya.view.analytics")
    assert view["ok"] is True
    assert view["currencies"]["USD"] == {
        "balance": 0,
        "deposited": 100,
        "withdrawn": 100,
        "deposits": 1,
        "withdrawals": 2,
        "accounts_opened": 2,
        "accounts_closed": 0,
    }
    assert view["operations"] == {"deposits": 1, "withdrawals": 2}
    with anyio.fail_after(10):
        await got_all.wait()
    keys = [m.headers["Kaya-Dedup-Key"] for m in notes if m.headers]
    stored = await node.store.read_stream("account", uid)
    assert keys == [e.event_id for e in stored]
    assert orjson.loads(notes[1].data)["event"] == {"type": "Deposited", "amount": 100}


async def test_an_unknown_view_is_a_bad_request(node: Node, nc: NATS) -> None:
    reply = await call(nc, "kaya.view.nope")
    assert reply["error"]["code"] == "bad_request"
    assert "nope" in reply["error"]["message"]
    bad = await call(nc, "kaya.view.analytics", b"[1]")
    assert bad["error"]["code"] == "bad_request"


async def test_a_rebuilt_read_model_equals_the_live_one(node: Node, nc: NATS, uid: str) -> None:
    for i, currency in enumerate(["EUR", "USD", "EUR", "JPY"]):
        subject = f"kaya.cmd.account.{uid}-{i}"
        await call(nc, subject, open_cmd(currency=currency))
        await call(nc, subject, {"type": "Deposit", "amount": 10 * (i + 1)})
        if i % 2:
            await call(nc, subject, {"type": "Withdraw", "amount": 10 * (i + 1)})
            await call(nc, subject, {"type": "Close"})
    await caught_up(node)
    live = await call(nc, "kaya.view.analytics")
    analytics = node.consumers["analytics"].consumer
    seen: list[tuple[int, int]] = []

    async def read_view(store: Any) -> Any:
        from examples.bank.analytics import analytics_view

        return await analytics_view(Context(store), {})

    outcome = await rebuild_projection(
        node.store, analytics, view=read_view, progress=lambda d, t: seen.append((d, t))
    )
    assert outcome.identical_before_swap is True
    assert outcome.swapped is True
    assert seen[-1][0] == seen[-1][1] == await node.store.last_position()
    assert await call(nc, "kaya.view.analytics") == live
    # the live consumer carries on from the rebuilt position, counting each event once
    await call(nc, f"kaya.cmd.account.{uid}-0", {"type": "Deposit", "amount": 1})
    await caught_up(node)
    after = await call(nc, "kaya.view.analytics")
    assert after["currencies"]["EUR"]["balance"] == live["currencies"]["EUR"]["balance"] + 1


async def test_a_restarted_consumer_neither_skips_nor_double_counts(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(nats_server, tmp_path)
    total = 0
    for round_ in range(3):
        async with open_node(config, make_app()) as node:
            if round_ == 0:
                await call(nc, f"kaya.cmd.account.{uid}", open_cmd())
            async with anyio.create_task_group() as tg:
                for amount in range(1, 31):
                    total += amount
                    tg.start_soon(
                        call, nc, f"kaya.cmd.account.{uid}", {"type": "Deposit", "amount": amount}
                    )
            if round_ == 1:
                # the broker forgets the consumer's progress: everything is redelivered
                await nc.jetstream().delete_consumer(EVENTS_STREAM, "analytics")
        # nodes stop without waiting for their consumers: the next start continues
    async with open_node(config, make_app()) as node:
        await caught_up(node)
        view = await call(nc, "kaya.view.analytics")
        assert view["currencies"]["EUR"]["balance"] == total
        assert view["operations"]["deposits"] == 90


# ---- consumers under test control --------------------------------------------------------


class Recorder(Consumer):
    """Records the order in which it sees each entity's events."""

    name = "recorder"
    seen: ClassVar[dict[str, list[int]]]

    def __init__(self) -> None:
        type(self).seen = defaultdict(list)

    async def handle(self, event: Delivered, effects: Effects) -> None:
        self.seen[event.entity_id].append(event.entity_version)
        await anyio.lowlevel.checkpoint()  # yield: other work interleaves, order must still hold


async def test_a_consumer_sees_each_entitys_events_in_order(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(nats_server, tmp_path)
    recorder = Recorder()
    async with open_node(config, make_app(consumers=[recorder])) as node:
        ids = [f"{uid}-{i}" for i in range(8)]
        for entity_id in ids:
            await call(nc, f"kaya.cmd.account.{entity_id}", open_cmd())
        async with anyio.create_task_group() as tg:
            for n in range(400):
                tg.start_soon(
                    call, nc, f"kaya.cmd.account.{ids[n % 8]}", {"type": "Deposit", "amount": 1}
                )
        await caught_up(node)
    for entity_id in ids:
        assert recorder.seen[entity_id] == list(range(1, 52))


class Picky(Consumer):
    """Fails on deposits above a limit until the limit is raised: a poison event."""

    name = "picky"
    limit: ClassVar[int] = 100
    ddl = "CREATE TABLE IF NOT EXISTS picky_total (id INTEGER PRIMARY KEY, total INTEGER)"
    tables = ("picky_total",)

    async def handle(self, event: Delivered, effects: Effects) -> None:
        body = event.decode()
        amount = body.get("amount", 0)
        if amount > self.limit:
            raise ValueError(f"amount {amount} over the limit {self.limit}")
        effects.execute(
            "INSERT INTO picky_total (id, total) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET total = total + excluded.total",
            (amount,),
        )


async def picky_total(node: Node) -> int:
    rows = await node.store.query("SELECT total FROM picky_total WHERE id = 1")
    return int(rows[0][0]) if rows else 0


async def test_a_poison_event_is_dead_lettered_and_replayed_once_fixed(
    nats_server: NatsServer,
    tmp_path: Path,
    nc: NATS,
    uid: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kaya.consumers")
    config = node_config(
        nats_server,
        tmp_path,
        consumers=ConsumersConfig(max_attempts=3, backoff_initial=0.01, backoff_max=0.02),
    )
    Picky.limit = 100
    picky = Picky()
    bank = make_app()
    async with open_node(config, make_app(consumers=[*bank.consumers, picky])) as node:
        subject = f"kaya.cmd.account.{uid}"
        await call(nc, subject, open_cmd())
        await call(nc, subject, {"type": "Deposit", "amount": 50})
        trace = "0af7651916cd43dd8448eb211c80319c"
        reply = await nc.request(
            subject,
            orjson.dumps({"type": "Deposit", "amount": 500}),
            headers={"traceparent": f"00-{trace}-b7ad6b7169203331-01"},
            timeout=10,
        )
        poison = orjson.loads(reply.data)
        await call(nc, subject, {"type": "Deposit", "amount": 7})
        await caught_up(node)
        runner = node.consumers["picky"]
        stats = runner.statistics()
        assert stats.dead_lettered == 1
        assert stats.retries == 2
        assert await picky_total(node) == 57  # the consumer moved on past the poison
        # its log lines say which event, and which trace, so the request can be followed
        lines = [r for r in caplog.records if getattr(r, "consumer", None) == "picky"]
        assert len(lines) == 3  # two retries, one dead letter
        assert {getattr(r, "trace_id", None) for r in lines} == {trace}
        assert {getattr(r, "id", None) for r in lines} == {uid}

        js = nc.jetstream()
        letters = await list_dead_letters(js, "picky")
        assert len(letters) == 1
        letter = letters[0]
        assert letter.consumer == "picky"
        assert letter.original_subject == f"kaya.evt.account.{uid}"
        assert letter.attempts == 3
        assert "over the limit" in letter.last_error
        assert letter.original_seq > 0
        assert letter.headers["Kaya-Entity-Version"] == str(poison["version"])
        assert orjson.loads(letter.data) == {"type": "Deposited", "amount": 500}
        streams = {s["stream"]: s for s in await describe_streams(js)}
        assert streams[DLQ_STREAM]["messages"] == 1
        assert {c["name"] for c in streams[EVENTS_STREAM]["consumers"]} >= {"picky", "analytics"}

        # replay before the fix: still fails, nothing changes, the letter stays
        consumers = {"picky": picky}
        outcome = await replay_dead_letters(js, node.store, consumers, consumer="picky")
        assert list(outcome.failed) == [letter.seq]
        assert await picky_total(node) == 57
        # the fix, then the replay: applied once, the letter is gone
        Picky.limit = 1000
        outcome = await replay_dead_letters(js, node.store, consumers, consumer="picky")
        assert outcome.replayed == [letter.seq]
        assert await picky_total(node) == 557
        assert await list_dead_letters(js, "picky") == []
        # a second replay finds nothing to do
        outcome = await replay_dead_letters(js, node.store, consumers, consumer="picky")
        assert outcome.replayed == []
        assert outcome.failed == {}
        assert await picky_total(node) == 557


async def test_streams_are_created_with_the_configured_settings(node: Node, nc: NATS) -> None:
    js = nc.jetstream()
    events = await js.stream_info(EVENTS_STREAM)
    assert events.config.subjects == ["kaya.evt.>", "kaya.epoch.>"]
    assert events.config.storage == "file"
    assert events.config.duplicate_window == 300.0
    dlq = await js.stream_info(DLQ_STREAM)
    assert dlq.config.subjects == ["kaya.dlq.>"]


async def test_a_second_start_updates_rather_than_fails(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = node_config(nats_server, tmp_path)
    async with open_node(config, make_app()):
        pass
    changed = msgspec.structs.replace(
        config, events=msgspec.structs.replace(config.events, duplicate_window=200.0)
    )
    async with open_node(changed, make_app()):
        nc = await nats.connect(nats_server.url)
        info = await nc.jetstream().stream_info(EVENTS_STREAM)
        await nc.close()
    assert info.config.duplicate_window == 200.0
