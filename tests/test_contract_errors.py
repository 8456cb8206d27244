"""Every reply on contract: decoder failures, unexpected exceptions, error headers, stats.

A request the node cannot decode (too deep, invalid UTF-8, a number no 64-bit reader
can hold, too large) is the caller's fault: `bad_request`, naming what was wrong, and
nothing changes. An exception nobody expected is `internal` with a generic message;
its text goes to the log, never on the wire. Every error reply carries the NATS micro
error headers, so `nats micro stats kaya` counts it on the endpoint it came in on.
Real nats-server, real SQLite, in-process node; requests sent as any NATS client would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import kaya
from examples.bank import Account
from examples.bank.analytics import Analytics, analytics_view
from kaya.actors.wire import header_block, service_error_headers
from kaya.app import node as app_node
from kaya.app.config import IngressConfig
from kaya.app.node import Node, open_node
from tests.conftest import node_config
from tests.servers import NatsServer
from tests.test_adapter import published_both_ways
from tests.test_lag import AlwaysBehind

pytestmark = pytest.mark.anyio

ERROR = "Nats-Service-Error"
ERROR_CODE = "Nats-Service-Error-Code"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
DEEP = 1000
BIG = 2**70


# ---- a test app: the account, a probe entity with plain `int` and `Any` fields, views --------


class Set(kaya.Command):
    n: int


class Note(kaya.Command):
    data: Any


class Explode(kaya.Command):
    """A command whose own validation has a bug: it raises something no one expected."""

    fuse: int = 0

    def __post_init__(self) -> None:
        if self.fuse:
            raise LookupError("secret-detail-42 in the command type's own code")


class Changed(kaya.Event):
    n: int


class Probed(msgspec.Struct, frozen=True):
    n: int = 0


class Probe(kaya.Entity[Probed, Any, Changed]):
    name = "probe"
    state_type = Probed
    command_types = (Set, Note, Explode)
    event_types = (Changed,)

    def decide(self, state: Probed, command: Any) -> list[Changed]:
        if isinstance(command, Set):
            return [Changed(n=command.n)]
        return [Changed(n=state.n)]

    def evolve(self, state: Probed, event: Changed) -> Probed:
        return Probed(n=event.n)


async def echo(context: kaya.Context, params: dict[str, Any]) -> dict[str, Any]:
    return {"params": params}


async def broken(context: kaya.Context, params: dict[str, Any]) -> dict[str, Any]:
    raise ZeroDivisionError("secret-detail-17 from a view")


def probe_app() -> kaya.App:
    return kaya.App(
        entities=[Account(), Probe()],
        consumers=[Analytics()],
        views={"echo": echo, "broken": broken, "analytics": analytics_view},
    )


@pytest.fixture
async def probe_node(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Node]:
    config = node_config(nats_server, tmp_path / "node", ingress=IngressConfig(max_body=8192))
    async with open_node(config, probe_app()) as running:
        yield running


async def ask(
    nc: NATS, subject: str, body: bytes | dict[str, Any] = b"", **headers: str
) -> tuple[Msg, dict[str, Any]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    msg = await nc.request(subject, data, timeout=10, headers=headers or None)
    reply: dict[str, Any] = orjson.loads(msg.data)
    return msg, reply


def assert_error(msg: Msg, reply: dict[str, Any], code: str, *words: str) -> str:
    """The contract's error body, exactly, and the micro error headers saying the same."""
    assert reply["ok"] is False, reply
    assert set(reply) == {"ok", "error"}, reply
    assert set(reply["error"]) == {"code", "message"}, reply
    assert reply["error"]["code"] == code, reply
    message: str = reply["error"]["message"]
    for word in words:
        assert word in message, reply
    headers = msg.headers or {}
    assert headers.get(ERROR_CODE) == code, headers
    assert headers.get(ERROR) == message, headers
    return message


def assert_no_python(message: str, *secrets: str) -> None:
    for text in ("Error(", "Traceback", "RecursionError", "LookupError", "ZeroDivision", *secrets):
        assert text not in message, message


# ---- commands --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entity", "body", "words"),
    [
        pytest.param(
            "account",
            b'{"type":"Deposit","amount":' + b"[" * DEEP + b"]" * DEEP + b"}",
            ("nested",),
            id="arrays-1000-deep",
        ),
        pytest.param(
            "account",
            b'{"type":"Deposit","amount":' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}",
            ("nested",),
            id="objects-1000-deep",
        ),
        pytest.param(
            "probe", b'{"x":' * DEEP + b"1" + b"}" * DEEP, ("nested",), id="deep-without-type"
        ),
        pytest.param(
            "probe",
            b'{"type":"Nope","junk":' + b"[" * DEEP + b"]" * DEEP + b"}",
            ("nested",),
            id="deep-unknown-field",
        ),
        pytest.param(
            "account",
            b'{"type":"Open","owner":"\xff\xfe","currency":"EUR"}',
            ("UTF-8",),
            id="invalid-utf8-value",
        ),
        pytest.param("probe", b'{"type":"\xc3\x28"}', ("UTF-8",), id="invalid-utf8-type"),
        pytest.param("probe", b'{"type":"Set","n":1e400}', ("out of range",), id="1e400"),
        pytest.param("probe", b'{"type":"Set","n":%d}' % BIG, ("out of range", "$.n"), id="2**70"),
        pytest.param(
            "probe", b'{"type":"Set","n":-%d}' % BIG, ("out of range", "$.n"), id="-2**70"
        ),
        pytest.param(
            "probe",
            b'{"type":"Note","data":{"x":[1,%d]}}' % 2**64,
            ("out of range", "$.data.x[1]"),
            id="2**64-nested",
        ),
        pytest.param("probe", b'{"type":"Note","data":1e999}', ("out of range",), id="1e999-any"),
    ],
)
async def test_a_body_the_decoder_refuses_is_bad_request_and_changes_nothing(
    probe_node: Node, nc: NATS, uid: str, entity: str, body: bytes, words: tuple[str, ...]
) -> None:
    msg, reply = await ask(nc, f"kaya.cmd.{entity}.{uid}", body)
    message = assert_error(msg, reply, "bad_request", *words)
    assert_no_python(message)
    assert await probe_node.store.read_stream(entity, uid) == []
    _, state = await ask(nc, f"kaya.qry.{entity}.{uid}")
    assert state["version"] == 0


async def test_the_largest_64_bit_integers_are_accepted(
    probe_node: Node, nc: NATS, uid: str
) -> None:
    for n in (2**63 - 1, -(2**63)):
        _, reply = await ask(nc, f"kaya.cmd.probe.{uid}", {"type": "Set", "n": n})
        assert reply["ok"] is True, reply
        assert reply["events"] == [{"type": "Changed", "n": n}]
    # a long digit string inside a string is text, not a number
    digits = "9" * 40
    _, reply = await ask(nc, f"kaya.cmd.probe.{uid}", {"type": "Note", "data": digits})
    assert reply["ok"] is True, reply


async def test_an_unexpected_exception_while_decoding_is_internal_without_its_text(
    probe_node: Node, nc: NATS, uid: str
) -> None:
    msg, reply = await ask(nc, f"kaya.cmd.probe.{uid}", {"type": "Explode", "fuse": 1})
    message = assert_error(msg, reply, "internal")
    assert_no_python(message, "secret-detail-42")
    assert await probe_node.store.read_stream("probe", uid) == []
    # the node keeps serving
    _, ok = await ask(nc, f"kaya.cmd.probe.{uid}", {"type": "Explode"})
    assert ok["ok"] is True, ok


# ---- queries and views ------------------------------------------------------------------------


async def test_a_refused_query_carries_the_error_headers(probe_node: Node, nc: NATS) -> None:
    msg, reply = await ask(nc, "kaya.qry.widget.w1")
    assert_error(msg, reply, "unknown_entity", "widget")
    msg, reply = await ask(nc, "kaya.qry.account.bad%id")
    assert_error(msg, reply, "bad_request", "bad%id")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        pytest.param(b"[" * DEEP + b"]" * DEEP, ("nested",), id="arrays-1000-deep"),
        pytest.param(b'{"a":' * DEEP + b"1" + b"}" * DEEP, ("nested",), id="objects-1000-deep"),
        pytest.param(b'{"currency":"\xff"}', ("UTF-8",), id="invalid-utf8"),
        pytest.param(b'{"n":1e400}', ("out of range",), id="1e400"),
        pytest.param(b'{"n":%d}' % BIG, ("out of range", "$.n"), id="2**70"),
        pytest.param(b'{"n":"' + b"x" * 9000 + b'"}', ("limit",), id="over-max-body"),
        pytest.param(b"{nope", ("JSON",), id="malformed"),
        pytest.param(b"[1, 2]", ("object",), id="not-an-object"),
    ],
)
async def test_view_parameters_the_decoder_refuses_are_bad_request(
    probe_node: Node, nc: NATS, body: bytes, words: tuple[str, ...]
) -> None:
    for view in ("echo", "analytics"):
        msg, reply = await ask(nc, f"kaya.view.{view}", body)
        message = assert_error(msg, reply, "bad_request", *words)
        assert_no_python(message)


async def test_view_parameters_within_the_rules_are_passed_as_decoded(
    probe_node: Node, nc: NATS
) -> None:
    params = {"n": 2**63 - 1, "s": "é", "deep": [[[[1]]]], "f": 1.5}
    _, reply = await ask(nc, "kaya.view.echo", params)
    assert reply == {"ok": True, "view": "echo", "params": params}
    _, empty = await ask(nc, "kaya.view.echo", b"  ")
    assert empty == {"ok": True, "view": "echo", "params": {}}


async def test_a_view_that_raises_is_internal_without_its_text(probe_node: Node, nc: NATS) -> None:
    msg, reply = await ask(nc, "kaya.view.broken", {})
    message = assert_error(msg, reply, "internal", "broken")
    assert_no_python(message, "secret-detail-17")
    msg, reply = await ask(nc, "kaya.view.nope", {})
    assert_error(msg, reply, "bad_request", "nope")


# ---- headers on replies made later, by the runtime ---------------------------------------------


async def test_replies_made_by_the_runtime_carry_the_error_headers_and_the_trace(
    probe_node: Node, nc: NATS, uid: str
) -> None:
    subject = f"kaya.cmd.account.{uid}"
    opened, reply = await ask(nc, subject, {"type": "Open", "owner": "a", "currency": "EUR"})
    assert reply["ok"] is True
    assert opened.headers is None  # success: no error headers, no trace unless asked

    withdraw = {"type": "Withdraw", "amount": 5}
    msg, reply = await ask(nc, subject, withdraw, traceparent=TRACEPARENT)
    assert_error(msg, reply, "rejected", "insufficient")
    assert (msg.headers or {}).get("traceparent") == TRACEPARENT

    # a repeat answered from the store's memory is an error reply like the first
    first, _ = await ask(nc, subject, withdraw, **{"Kaya-Command-Id": "w-1"})
    again, reply = await ask(nc, subject, withdraw, **{"Kaya-Command-Id": "w-1"})
    assert again.data == first.data
    assert_error(again, reply, "rejected", "insufficient")

    msg, reply = await ask(nc, subject, {"type": "Deposit", "amount": 5}, traceparent=TRACEPARENT)
    assert reply["ok"] is True
    assert msg.headers == {"traceparent": TRACEPARENT}  # success: nothing more

    # an immediate refusal keeps the caller's trace too
    msg, reply = await ask(nc, subject, b"{", traceparent=TRACEPARENT)
    assert_error(msg, reply, "bad_request")
    assert (msg.headers or {}).get("traceparent") == TRACEPARENT


async def test_commands_shed_while_behind_carry_the_error_headers(
    nats_server: NatsServer,
    tmp_path: Path,
    nc: NATS,
    uid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app_node, "LoopLag", AlwaysBehind)
    async with open_node(node_config(nats_server, tmp_path), probe_app()):
        msg, reply = await ask(nc, f"kaya.cmd.probe.{uid}", {"type": "Set", "n": 1})
        assert_error(msg, reply, "overloaded", "behind")
        stats = await endpoint_stats(nc)
        assert stats["commands"]["num_errors"] == 1


# ---- nats micro stats -------------------------------------------------------------------------


async def endpoint_stats(nc: NATS) -> dict[str, dict[str, Any]]:
    msg = await nc.request("$SRV.STATS.kaya", b"", timeout=5)
    stats = orjson.loads(msg.data)
    return {e["name"]: e for e in stats["endpoints"]}


async def test_every_error_reply_is_counted_on_its_endpoint(
    probe_node: Node, nc: NATS, uid: str
) -> None:
    subject = f"kaya.cmd.account.{uid}"
    await ask(nc, subject, {"type": "Open", "owner": "a", "currency": "EUR"})
    await ask(nc, subject, {"type": "Deposit", "amount": 5})
    failures: list[tuple[str, bytes | dict[str, Any]]] = [
        (subject, {"type": "Withdraw", "amount": 50}),  # rejected, by the runtime
        (subject, {"type": "Close"}),  # rejected
        (subject, {"type": "Teleport"}),  # unknown_command, at once
        (subject, b"{"),  # bad_request
        (subject, b'{"type":"Deposit","amount":' + b"[" * DEEP + b"]" * DEEP + b"}"),
        ("kaya.cmd.widget.w", {"type": "X"}),  # unknown_entity
        (f"kaya.cmd.probe.{uid}", {"type": "Explode", "fuse": 1}),  # internal
    ]
    for failed, body in failures:
        _, reply = await ask(nc, failed, body)
        assert reply["ok"] is False, reply
    _, reply = await ask(nc, "kaya.cmd.account", b"{}")  # unmapped: a malformed subject
    assert reply["ok"] is False
    for view in ("broken", "nope", "echo"):
        await ask(nc, f"kaya.view.{view}", b"[" if view == "echo" else b"{}")
    await ask(nc, "kaya.qry.widget.w")
    await ask(nc, f"kaya.qry.account.{uid}")

    stats = await endpoint_stats(nc)
    assert stats["commands"]["num_requests"] == 2 + len(failures)
    assert stats["commands"]["num_errors"] == len(failures)
    assert stats["commands"]["last_error"].startswith("internal:")
    assert stats["commands-unmapped"]["num_errors"] == 1
    assert stats["views"]["num_requests"] == 3
    assert stats["views"]["num_errors"] == 3
    assert stats["queries"]["num_requests"] == 2
    assert stats["queries"]["num_errors"] == 1
    assert stats["queries"]["last_error"].startswith("unknown_entity:")
    assert stats["queries-unmapped"]["num_errors"] == 0


# ---- the headers themselves -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "traceparent"),
    [
        ("insufficient funds: balance 0", None),
        ("id 'a\u00e9\x00b' must be 1-64 characters\r\nInjected: yes", TRACEPARENT),
        ("x" * 1000, None),
    ],
)
async def test_error_headers_are_one_printable_line_as_nats_py_writes_them(
    nats_server: NatsServer, message: str, traceparent: str | None
) -> None:
    """Error replies go out on the adapter's fast path with a prebuilt header block: it
    must be what nats-py's own publish writes, and the message must fit on one line."""
    headers = service_error_headers("rejected", message, traceparent)
    description = headers[ERROR]
    assert description.isascii()
    assert description.isprintable()
    assert len(description) <= 256
    if message.isascii() and message.isprintable() and len(message) <= 256:
        assert description == message
    stock, fast = await published_both_ways(
        nats_server.url, "reply.x", b"{}", headers, header_block(headers)
    )
    assert fast[1] == stock[1]  # the header block, byte for byte
