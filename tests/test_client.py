"""kaya.Client: commands, queries and views over a real nats-server, with retries.

Against a real node serving the example bank, and against responders written here on
plain nats-py subscriptions (to answer `overloaded`, or nothing, on purpose). Backoffs are
injected with a sleep that records its delay and returns at once: no test waits for one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from examples.bank.account import AccountState, Deposit, Open, Withdraw
from kaya.actors import (
    BadRequest,
    Conflict,
    Internal,
    KayaError,
    Overloaded,
    Rejected,
    Timeout,
    Unavailable,
    UnknownCommand,
    UnknownEntity,
)
from kaya.actors.retry import Backoff
from kaya.actors.wire import HEADER_COMMAND_ID
from kaya.app.client import Client, Reply, StateReply
from kaya.app.node import Node
from tests.conftest import call
from tests.servers import NatsServer, free_port

pytestmark = pytest.mark.anyio

COUNTER = "kaya.cmd.counter.x"
SERVED_COUNTER = "kaya.shard.*.cmd.counter.x"
"""Where a responder listens: the test server, as any Kaya deployment, maps
`kaya.cmd.<entity>.<id>` onto its shard's subject, `kaya.shard.<n>.cmd.<entity>.<id>`."""


class Sleeps:
    """A backoff sleep that records the delays asked for and does not wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def backoff(sleeps: Sleeps) -> Backoff:
    """Draws 0.5 of the ceiling: delays 0.05, 0.1, 0.2, ... are recorded, never slept."""
    return Backoff(initial=0.1, cap=2.0, random=lambda: 0.5, sleep=sleeps)


def ok_reply(version: int = 1) -> bytes:
    return orjson.dumps(
        {
            "ok": True,
            "entity": "counter",
            "id": "x",
            "version": version,
            "events": [{"type": "Added", "n": 1}],
        }
    )


def error_reply(code: str, message: str) -> bytes:
    return orjson.dumps({"ok": False, "error": {"code": code, "message": message}})


Answer = Callable[[int], bytes | None]
"""The reply to request number n (1, 2, ...), or None to stay silent."""


class Responder:
    """A plain nats-py subscription standing in for a node: records every request."""

    def __init__(self, nc: NATS, answer: Answer) -> None:
        self.nc = nc
        self.answer = answer
        self.requests: list[Msg] = []
        self._arrived = anyio.Event()

    async def handle(self, msg: Msg) -> None:
        self.requests.append(msg)
        self._arrived.set()
        self._arrived = anyio.Event()
        data = self.answer(len(self.requests))
        if data is not None:
            await self.nc.publish(msg.reply, data)

    async def received(self, count: int) -> None:
        """Until `count` requests have arrived."""
        with anyio.fail_after(10):
            while len(self.requests) < count:
                await self._arrived.wait()

    @property
    def command_ids(self) -> list[str | None]:
        return [(m.headers or {}).get(HEADER_COMMAND_ID) for m in self.requests]


async def respond(nc: NATS, subject: str, answer: Answer) -> Responder:
    responder = Responder(nc, answer)
    await nc.subscribe(subject, cb=responder.handle)
    await nc.flush()  # the server knows the subscription before any request is sent
    return responder


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    async with Client.connect(nats_server.url, timeout=10.0) as connected:
        yield connected


async def opened(client: Client, uid: str, currency: str = "EUR") -> Reply:
    return await client.send("account", uid, Open(owner="Ann", currency=currency))


async def caught_up(node: Node) -> None:
    """Until the relay published and every consumer applied everything committed."""
    last = await node.store.last_position()
    with anyio.fail_after(15):
        await node.relay.wait_caught_up()
        for runner in node.consumers.values():
            await runner.wait_for_position(last)


# ---- against a node ------------------------------------------------------------------


async def test_send_returns_the_version_and_events_of_the_command(
    node: Node, client: Client, uid: str
) -> None:
    open_reply = await client.send(
        "account", uid, {"type": "Open", "owner": "Ann", "currency": "EUR"}, command_id="open-1"
    )
    assert open_reply == Reply(
        entity="account",
        id=uid,
        version=1,
        events=[{"type": "Opened", "owner": "Ann", "currency": "EUR", "kind": "personal"}],
        command_id="open-1",
    )
    deposit = await client.send("account", uid, Deposit(amount=5))
    assert (deposit.entity, deposit.id, deposit.version) == ("account", uid, 2)
    assert deposit.events == [{"type": "Deposited", "amount": 5}]
    assert len(deposit.command_id) == 32
    int(deposit.command_id, 16)  # a generated uuid4 hex
    other = await client.send("account", uid, {"type": "Deposit", "amount": 7})
    assert other.version == 3
    assert other.command_id != deposit.command_id  # one fresh id per command


async def test_get_returns_the_state_as_json_or_as_the_given_type(
    node: Node, client: Client, uid: str
) -> None:
    await opened(client, uid)
    await client.send("account", uid, Deposit(amount=12))
    await client.send("account", uid, Withdraw(amount=2))
    plain = await client.get("account", uid)
    assert plain == StateReply(
        entity="account",
        id=uid,
        version=3,
        state={"owner": "Ann", "currency": "EUR", "balance": 10, "status": "open"},
    )
    typed = await client.get("account", uid, state_type=AccountState)
    assert typed.version == 3
    assert typed.state == AccountState(owner="Ann", currency="EUR", balance=10, status="open")
    fresh = await client.get("account", f"{uid}-new", state_type=AccountState)
    assert (fresh.version, fresh.state) == (0, AccountState())


async def test_view_returns_the_read_models_object(node: Node, client: Client, uid: str) -> None:
    await opened(client, uid, "EUR")
    await client.send("account", uid, Deposit(amount=30))
    await opened(client, f"{uid}-usd", "USD")
    await client.send("account", f"{uid}-usd", Deposit(amount=4))
    await caught_up(node)
    eur = await client.view("analytics", {"currency": "EUR"})
    assert eur["currencies"] == {
        "EUR": {
            "balance": 30,
            "deposited": 30,
            "withdrawn": 0,
            "deposits": 1,
            "withdrawals": 0,
            "accounts_opened": 1,
            "accounts_closed": 0,
        }
    }
    assert eur["operations"] == {"deposits": 1, "withdrawals": 0}
    assert "ok" not in eur
    assert "view" not in eur
    everything = await client.view("analytics")
    assert sorted(everything["currencies"]) == ["EUR", "USD"]
    assert everything["accounts"] == {"opened": 2, "closed": 0}
    with pytest.raises(BadRequest, match="no view named 'nope'"):
        await client.view("nope")


@pytest.mark.parametrize(
    ("entity", "body", "error"),
    [
        pytest.param("account", {"type": "Withdraw", "amount": 10}, Rejected, id="rejected"),
        pytest.param("account", {"type": "Deposit", "amount": 0}, BadRequest, id="bad_request"),
        pytest.param("account", {"type": "Deposit"}, BadRequest, id="missing_field"),
        pytest.param("account", {"type": "Fly"}, UnknownCommand, id="unknown_command"),
        pytest.param("nope", {"type": "Deposit", "amount": 1}, UnknownEntity, id="unknown_entity"),
    ],
)
async def test_a_failure_reply_raises_its_error_with_the_nodes_message(
    node: Node,
    client: Client,
    nc: NATS,
    uid: str,
    entity: str,
    body: dict[str, Any],
    error: type[KayaError],
) -> None:
    await opened(client, uid)
    await client.send("account", uid, Deposit(amount=5))
    # what the node says over the wire (a failed command changes nothing, so ask twice)
    raw = await call(nc, f"kaya.cmd.{entity}.{uid}", body)
    assert raw["ok"] is False
    assert raw["error"]["code"] == error.code
    with pytest.raises(error) as caught:
        await client.send(entity, uid, body)
    assert type(caught.value) is error
    assert caught.value.message == raw["error"]["message"]
    assert str(caught.value) == raw["error"]["message"]
    state = await client.get("account", uid)
    assert (state.version, state.state["balance"]) == (2, 5)


async def test_withdrawing_too_much_is_rejected_with_the_rule_that_refused(
    node: Node, client: Client, uid: str
) -> None:
    await opened(client, uid)
    await client.send("account", uid, Deposit(amount=5))
    with pytest.raises(Rejected, match=r"^insufficient funds: balance 5, withdrawal 10$"):
        await client.send("account", uid, Withdraw(amount=10))


async def test_a_query_failure_raises_too(node: Node, client: Client, uid: str) -> None:
    with pytest.raises(UnknownEntity):
        await client.get("nope", uid)


async def test_a_command_id_reused_with_another_body_is_a_conflict(
    node: Node, client: Client, uid: str
) -> None:
    await opened(client, uid)
    await client.send("account", uid, Deposit(amount=5), command_id="dep-1")
    with pytest.raises(Conflict) as caught:
        await client.send("account", uid, Deposit(amount=7), command_id="dep-1")
    assert caught.value.message  # the node's explanation, carried through
    state = await client.get("account", uid)
    assert (state.version, state.state["balance"]) == (2, 5)


async def test_the_same_command_id_sent_twice_is_applied_once(
    node: Node, client: Client, uid: str
) -> None:
    await opened(client, uid)
    first = await client.send("account", uid, Deposit(amount=5), command_id="dep-1")
    again = await client.send("account", uid, {"type": "Deposit", "amount": 5}, command_id="dep-1")
    assert again == first  # the first reply, remembered
    assert first.version == 2
    state = await client.get("account", uid, state_type=AccountState)
    assert state.version == 2
    assert state.state.balance == 5
    after = await client.send("account", uid, Deposit(amount=1))
    assert after.version == 3  # the repeat left no version behind


# ---- retries, against responders written here ----------------------------------------


async def test_overloaded_is_retried_with_the_same_command_id_until_ok(
    nats_server: NatsServer, nc: NATS
) -> None:
    def answer(n: int) -> bytes:
        return error_reply("overloaded", "100 requests in flight") if n <= 2 else ok_reply(7)

    responder = await respond(nc, SERVED_COUNTER, answer)
    sleeps = Sleeps()
    async with Client.connect(nats_server.url, attempts=5, backoff=backoff(sleeps)) as client:
        with anyio.fail_after(10):
            reply = await client.send("counter", "x", {"type": "Add", "n": 1})
    assert reply == Reply(
        entity="counter",
        id="x",
        version=7,
        events=[{"type": "Added", "n": 1}],
        command_id=reply.command_id,
    )
    assert len(responder.requests) == 3
    assert responder.command_ids == [reply.command_id] * 3
    assert [orjson.loads(m.data) for m in responder.requests] == [{"type": "Add", "n": 1}] * 3
    assert sleeps.delays == pytest.approx([0.05, 0.1])  # the backoff, attempt 1 then 2


async def test_a_retry_keeps_the_callers_command_id(nats_server: NatsServer, nc: NATS) -> None:
    def answer(n: int) -> bytes:
        return error_reply("unavailable", "store busy") if n == 1 else ok_reply()

    responder = await respond(nc, SERVED_COUNTER, answer)
    sleeps = Sleeps()
    async with Client.connect(nats_server.url, backoff=backoff(sleeps)) as client:
        reply = await client.send("counter", "x", {"type": "Add", "n": 1}, command_id="add-1")
    assert reply.command_id == "add-1"
    assert responder.command_ids == ["add-1", "add-1"]
    assert len(sleeps.delays) == 1


@pytest.mark.parametrize(
    ("code", "error"), [("overloaded", Overloaded), ("unavailable", Unavailable)]
)
async def test_a_transient_failure_that_lasts_is_raised_after_the_last_attempt(
    nats_server: NatsServer, nc: NATS, code: str, error: type[KayaError]
) -> None:
    responder = await respond(nc, SERVED_COUNTER, lambda n: error_reply(code, f"still busy ({n})"))
    sleeps = Sleeps()
    async with Client.connect(nats_server.url, attempts=4, backoff=backoff(sleeps)) as client:
        with anyio.fail_after(10), pytest.raises(error) as caught:
            await client.send("counter", "x", {"type": "Add", "n": 1})
    assert caught.value.message == "still busy (4)"  # the last try's answer, as said
    assert len(responder.requests) == 4
    assert len(set(responder.command_ids)) == 1
    assert sleeps.delays == pytest.approx([0.05, 0.1, 0.2])


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("rejected", Rejected),
        ("bad_request", BadRequest),
        ("conflict", Conflict),
        ("unknown_entity", UnknownEntity),
        ("unknown_command", UnknownCommand),
        ("timeout", Timeout),  # a remembered definite answer: the command is not applied
        ("internal", Internal),
        ("some_future_code", Internal),
    ],
)
async def test_a_definite_failure_is_raised_at_once(
    nats_server: NatsServer, nc: NATS, code: str, error: type[KayaError]
) -> None:
    responder = await respond(nc, SERVED_COUNTER, lambda n: error_reply(code, f"said {code}"))
    sleeps = Sleeps()
    async with Client.connect(nats_server.url, attempts=5, backoff=backoff(sleeps)) as client:
        with pytest.raises(error) as caught:
            await client.send("counter", "x", {"type": "Add", "n": 1})
    assert type(caught.value) is error
    assert caught.value.message == f"said {code}"
    assert len(responder.requests) == 1
    assert sleeps.delays == []


async def test_no_responders_is_unavailable_after_the_attempts(nats_server: NatsServer) -> None:
    sleeps = Sleeps()
    async with Client.connect(nats_server.url, attempts=3, backoff=backoff(sleeps)) as client:
        with anyio.fail_after(10):
            with pytest.raises(Unavailable, match=r"kaya\.cmd\.account\.acc-1"):
                await client.send("account", "acc-1", Deposit(amount=5))
            with pytest.raises(Unavailable, match=r"kaya\.qry\.account\.acc-1"):
                await client.get("account", "acc-1")
            with pytest.raises(Unavailable, match=r"kaya\.view\.analytics"):
                await client.view("analytics")
    assert sleeps.delays == pytest.approx([0.05, 0.1] * 3)  # 2 waits between 3 tries, each


async def test_no_reply_in_time_is_a_timeout_after_the_attempts(
    nats_server: NatsServer, nc: NATS
) -> None:
    silent = await respond(nc, SERVED_COUNTER, lambda n: None)
    sleeps = Sleeps()
    async with Client.connect(
        nats_server.url, timeout=0.2, attempts=3, backoff=backoff(sleeps)
    ) as client:
        with anyio.fail_after(10), pytest.raises(Timeout, match=r"kaya\.cmd\.counter\.x"):
            await client.send("counter", "x", {"type": "Add", "n": 1}, command_id="add-9")
    assert sleeps.delays == pytest.approx([0.05, 0.1])
    await silent.received(3)
    assert silent.command_ids == ["add-9"] * 3


async def test_a_reply_after_a_timeout_answers_the_retry(nats_server: NatsServer, nc: NATS) -> None:
    """The first try is lost (no reply in time); the second is answered: one Reply."""
    responder = await respond(nc, SERVED_COUNTER, lambda n: None if n == 1 else ok_reply(2))
    sleeps = Sleeps()
    async with Client.connect(
        nats_server.url, timeout=0.2, attempts=2, backoff=backoff(sleeps)
    ) as client:
        with anyio.fail_after(10):
            reply = await client.send("counter", "x", {"type": "Add", "n": 1})
    assert reply.version == 2
    assert responder.command_ids == [reply.command_id] * 2


# ---- local checks, connections ---------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda c: c.send("Account", "a", {"type": "Deposit"}), id="entity_name"),
        pytest.param(lambda c: c.send("account", "a.b", {"type": "Deposit"}), id="entity_id"),
        pytest.param(lambda c: c.send("account", "x" * 65, {"type": "Deposit"}), id="long_id"),
        pytest.param(
            lambda c: c.send("account", "a", {"type": "Deposit"}, command_id="has space"),
            id="command_id",
        ),
        pytest.param(lambda c: c.send("account", "a", {"amount": 5}), id="no_type"),
        pytest.param(lambda c: c.send("account", "a", {"type": 5}), id="type_not_str"),
        pytest.param(lambda c: c.send("account", "a", {"type": "D", "x": object()}), id="json"),
        pytest.param(lambda c: c.send("account", "a", [1, 2]), id="not_a_command"),
        pytest.param(lambda c: c.get("account", ""), id="get_empty_id"),
        pytest.param(lambda c: c.view("a.b"), id="view_name"),
    ],
)
async def test_a_bad_request_is_refused_before_anything_is_sent(
    nats_server: NatsServer, nc: NATS, bad: Callable[[Client], Awaitable[Any]]
) -> None:
    seen = await respond(nc, "kaya.>", lambda n: ok_reply())
    async with Client.connect(nats_server.url) as client:
        with pytest.raises(BadRequest):
            await bad(client)
        # requests from one connection arrive in order: had the bad one been sent, it
        # would be seen before this one
        await client.send("counter", "x", {"type": "Add", "n": 1})
    assert len(seen.requests) == 1
    assert seen.requests[0].subject.endswith(".cmd.counter.x")


async def test_connect_can_be_awaited_and_closed_twice(nats_server: NatsServer, nc: NATS) -> None:
    responder = await respond(nc, SERVED_COUNTER, lambda n: ok_reply())
    client = await Client.connect(nats_server.url, name="billing")
    try:
        await client.send("counter", "x", {"type": "Add", "n": 1})
    finally:
        await client.aclose()
    await client.aclose()
    assert len(responder.requests) == 1


async def test_connect_takes_a_list_of_servers(nats_server: NatsServer, nc: NATS) -> None:
    responder = await respond(nc, SERVED_COUNTER, lambda n: ok_reply())
    dead = f"nats://127.0.0.1:{free_port()}"
    with anyio.fail_after(10):
        async with Client.connect([dead, nats_server.url]) as client:
            reply = await client.send("counter", "x", {"type": "Add", "n": 1})
    assert reply.version == 1
    assert len(responder.requests) == 1


async def test_no_server_to_connect_to_is_unavailable_within_the_timeout() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with anyio.fail_after(10), pytest.raises(Unavailable, match="cannot connect to NATS at"):
        async with Client.connect(url, timeout=0.5):
            pass


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Client.connect("nats://127.0.0.1:4222", attempts=0)
    with pytest.raises(ValueError, match="server URL"):
        Client.connect([])
