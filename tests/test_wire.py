"""The wire contract, end to end: a real nats-server, an in-process node, real SQLite.

Every request goes through `kaya.cmd.<entity>.<id>` / `kaya.qry.<entity>.<id>` as any
NATS client would send it; the server's shard mapping routes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import orjson
import pytest
from nats.aio.client import Client as NATS

from examples.bank import make_app
from kaya.actors import Command, Entity, Event
from kaya.app.config import ActorsConfig, IngressConfig
from kaya.app.node import Node, open_node
from tests.conftest import call, node_config
from tests.servers import NatsServer

pytestmark = pytest.mark.anyio

OPEN = {"type": "Open", "owner": "ann", "currency": "EUR"}


async def state(nc: NATS, entity_id: str) -> dict[str, Any]:
    reply = await call(nc, f"kaya.qry.account.{entity_id}")
    assert reply["ok"] is True, reply
    return reply


async def test_account_lifecycle_over_the_wire(node: Node, nc: NATS, uid: str) -> None:
    subject = f"kaya.cmd.account.{uid}"
    opened = await call(nc, subject, OPEN)
    assert opened == {
        "ok": True,
        "entity": "account",
        "id": uid,
        "version": 1,
        "events": [{"type": "Opened", "owner": "ann", "currency": "EUR", "kind": "personal"}],
    }
    assert (await call(nc, subject, {"type": "Deposit", "amount": 70}))["version"] == 2
    withdrawn = await call(nc, subject, {"type": "Withdraw", "amount": 70})
    assert withdrawn["events"] == [{"type": "Withdrawn", "amount": 70}]
    closed = await call(nc, subject, {"type": "Close"})
    assert closed["version"] == 4
    assert (await state(nc, uid))["state"] == {
        "owner": "ann",
        "currency": "EUR",
        "balance": 0,
        "status": "closed",
    }


async def test_unknown_entity_id_has_version_zero(node: Node, nc: NATS, uid: str) -> None:
    reply = await state(nc, uid)
    assert reply["version"] == 0
    assert reply["state"]["status"] == "new"


async def expect_error(
    nc: NATS, subject: str, body: dict[str, Any] | bytes, code: str, *words: str
) -> None:
    reply = await call(nc, subject, body)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    for word in words:
        assert word in reply["error"]["message"], reply


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"{not json", "bad_request", ("JSON",)),
        (b"[1, 2]", "bad_request", ("type",)),
        ({"amount": 5}, "bad_request", ("type",)),
        ({"type": "Deposit", "amount": 0}, "bad_request", ("amount",)),
        ({"type": "Deposit", "amount": -3}, "bad_request", ("amount",)),
        ({"type": "Deposit", "amount": "5"}, "bad_request", ("amount",)),
        ({"type": "Deposit", "amount": 1.5}, "bad_request", ("amount",)),
        ({"type": "Deposit"}, "bad_request", ("amount",)),
        ({"type": "Deposit", "amount": 1, "extra": True}, "bad_request", ("extra",)),
        ({"type": "Open", "owner": "x", "currency": "euro"}, "bad_request", ("currency",)),
        ({"type": "Teleport"}, "unknown_command", ("Teleport",)),
        ({"type": "Withdraw", "amount": 1000}, "rejected", ("insufficient",)),
        ({"type": "Close"}, "rejected", ("balance",)),
        (OPEN, "rejected", ("already",)),
    ],
)
async def test_a_refused_command_gets_its_code_and_changes_nothing(
    node: Node, nc: NATS, uid: str, body: dict[str, Any] | bytes, code: str, words: Sequence[str]
) -> None:
    subject = f"kaya.cmd.account.{uid}"
    await call(nc, subject, OPEN)
    await call(nc, subject, {"type": "Deposit", "amount": 10})
    before = await state(nc, uid)
    await expect_error(nc, subject, body, code, *words)
    assert await state(nc, uid) == before
    assert len(await node.store.read_stream("account", uid)) == 2


async def test_commands_to_an_account_that_is_not_open_are_rejected(
    node: Node, nc: NATS, uid: str
) -> None:
    await expect_error(nc, f"kaya.cmd.account.{uid}", {"type": "Deposit", "amount": 1}, "rejected")
    assert (await state(nc, uid))["version"] == 0


@pytest.mark.parametrize(
    ("subject", "code", "word"),
    [
        ("kaya.cmd.widget.w1", "unknown_entity", "widget"),
        ("kaya.cmd.Account.a1", "bad_request", "Account"),
        ("kaya.cmd.account.has!bang", "bad_request", "has!bang"),
        ("kaya.cmd.account." + "x" * 65, "bad_request", "1-64"),
        ("kaya.cmd.account", "bad_request", "kaya.cmd.<entity>.<id>"),
        ("kaya.cmd.account.a.b", "bad_request", "kaya.cmd.<entity>.<id>"),
        ("kaya.qry.widget.w1", "unknown_entity", "widget"),
        ("kaya.qry.account.bad*", "bad_request", "bad*"),
    ],
)
async def test_bad_names_are_refused(
    node: Node, nc: NATS, subject: str, code: str, word: str
) -> None:
    if "*" in subject:  # a wildcard cannot be published; use a character NATS allows
        subject = subject.replace("*", "%")
        word = word.replace("*", "%")
    await expect_error(nc, subject, OPEN, code, word)


async def test_a_body_over_the_limit_is_refused(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(nats_server, tmp_path, ingress=IngressConfig(max_body=100))
    async with open_node(config, make_app()):
        await call(nc, f"kaya.cmd.account.{uid}", OPEN)
        big = orjson.dumps({"type": "Deposit", "amount": 1, "pad": "x" * 200})
        await expect_error(nc, f"kaya.cmd.account.{uid}", big, "bad_request", "limit")
        assert (await state(nc, uid))["version"] == 1


async def test_a_thousand_concurrent_deposits_keep_order_and_count(
    node: Node, nc: NATS, uid: str
) -> None:
    subject = f"kaya.cmd.account.{uid}"
    await call(nc, subject, OPEN)
    versions: list[int] = []

    async def deposit() -> None:
        reply = await call(nc, subject, {"type": "Deposit", "amount": 3}, timeout=30)
        assert reply["ok"] is True, reply
        versions.append(reply["version"])

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(1000):
                tg.start_soon(deposit)
    assert sorted(versions) == list(range(2, 1002))
    stream = await node.store.read_stream("account", uid)
    assert [e.version for e in stream] == list(range(1, 1002))
    final = await state(nc, uid)
    assert final["version"] == 1001
    assert final["state"]["balance"] == 3000


async def test_a_repeated_command_id_is_applied_once(node: Node, nc: NATS, uid: str) -> None:
    subject = f"kaya.cmd.account.{uid}"
    await call(nc, subject, OPEN)
    deposit = {"type": "Deposit", "amount": 25}
    first = await nc.request(subject, orjson.dumps(deposit), headers={"Kaya-Command-Id": "c-1"})
    again = await nc.request(
        subject, b'{"amount": 25,  "type": "Deposit"}', headers={"Kaya-Command-Id": "c-1"}
    )
    assert again.data == first.data  # the first reply, byte for byte
    assert (await state(nc, uid))["state"]["balance"] == 25

    reused = await call(nc, subject, {"type": "Deposit", "amount": 26}, command_id="c-1")
    assert reused["ok"] is False
    assert reused["error"]["code"] == "conflict"
    assert "c-1" in reused["error"]["message"]
    after = await state(nc, uid)
    assert after["state"]["balance"] == 25
    assert after["version"] == 2


async def test_concurrent_repeats_of_one_command_id_apply_once(
    node: Node, nc: NATS, uid: str
) -> None:
    subject = f"kaya.cmd.account.{uid}"
    await call(nc, subject, OPEN)
    replies: list[dict[str, Any]] = []

    async def send() -> None:
        replies.append(await call(nc, subject, {"type": "Deposit", "amount": 5}, command_id="same"))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(send)
    assert all(r == replies[0] for r in replies)
    assert replies[0]["ok"] is True
    assert (await state(nc, uid))["state"]["balance"] == 5


async def test_a_bad_command_id_header_is_refused(node: Node, nc: NATS, uid: str) -> None:
    reply = await call(nc, f"kaya.cmd.account.{uid}", OPEN, command_id="x" * 129)
    assert reply["error"]["code"] == "bad_request"
    assert "Kaya-Command-Id" in reply["error"]["message"]
    assert (await state(nc, uid))["version"] == 0


async def test_state_survives_a_node_restart(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(nats_server, tmp_path)
    subject = f"kaya.cmd.account.{uid}"
    async with open_node(config, make_app()):
        await call(nc, subject, OPEN)
        for amount in range(1, 11):
            await call(nc, subject, {"type": "Deposit", "amount": amount}, command_id=f"d{amount}")
    async with open_node(config, make_app()):
        reply = await state(nc, uid)
        assert reply["version"] == 11
        assert reply["state"]["balance"] == 55
        # the idempotency records survived too
        again = await call(nc, subject, {"type": "Deposit", "amount": 10}, command_id="d10")
        assert again["version"] == 11
        assert (await state(nc, uid))["state"]["balance"] == 55


async def test_overload_is_refused_at_once_and_loses_nothing_accepted(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(
        nats_server,
        tmp_path,
        ingress=IngressConfig(max_inflight=8),
        actors=ActorsConfig(mailbox_size=4),
    )
    subject = f"kaya.cmd.account.{uid}"
    codes: list[str] = []
    async with open_node(config, make_app()):
        await call(nc, subject, OPEN)

        async def deposit() -> None:
            reply = await call(nc, subject, {"type": "Deposit", "amount": 1})
            codes.append("ok" if reply["ok"] else reply["error"]["code"])

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(300):
                    tg.start_soon(deposit)
        assert set(codes) <= {"ok", "overloaded"}
        assert "overloaded" in codes
        final = await state(nc, uid)
        assert final["state"]["balance"] == codes.count("ok")
        assert final["version"] == 1 + codes.count("ok")


# ---- a handler that crashes ---------------------------------------------------------------


class Poke(Command):
    pass


class Boom(Command):
    pass


class Poked(Event):
    pass


class FragileState(msgspec.Struct, frozen=True):
    pokes: int = 0


class Fragile(Entity[Any, Any, Any]):
    """Test-only entity whose handler has a bug on `Boom`."""

    name = "fragile"
    state_type = FragileState
    command_types = (Poke, Boom)
    event_types = (Poked,)

    def decide(self, state: Any, command: Any) -> list[Any]:
        if isinstance(command, Boom):
            raise RuntimeError("bug in the handler")
        return [Poked()]

    def evolve(self, state: Any, event: Any) -> Any:
        return FragileState(pokes=state.pokes + 1)


async def test_a_crashing_handler_answers_internal_and_the_node_keeps_serving(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(nats_server, tmp_path)
    async with open_node(config, make_app(Fragile())) as node:
        subject = f"kaya.cmd.fragile.{uid}"
        assert (await call(nc, subject, {"type": "Poke"}))["version"] == 1
        activations = node.runtime.statistics().activations
        crashed = await call(nc, subject, {"type": "Boom"})
        assert crashed["ok"] is False
        assert crashed["error"]["code"] == "internal"
        assert (await call(nc, subject, {"type": "Poke"}))["version"] == 2
        assert node.runtime.statistics().activations == activations + 1  # rebuilt from the store
        assert node.runtime.statistics().crashes == 1
        # other entities never noticed
        assert (await call(nc, f"kaya.cmd.account.{uid}", OPEN))["ok"] is True


async def test_the_node_is_visible_to_nats_micro(node: Node, nc: NATS) -> None:
    msg = await nc.request("$SRV.INFO.kaya", b"", timeout=5)
    info = orjson.loads(msg.data)
    assert info["name"] == "kaya"
    subjects = {e["subject"] for e in info["endpoints"]}
    assert {"kaya.shard.*.cmd.>", "kaya.shard.*.qry.>", "kaya.cmd.>", "kaya.qry.>"} <= subjects
