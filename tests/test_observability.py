"""Metrics, health and status of a running node, scraped as Prometheus and orchestrators do."""

from __future__ import annotations

from pathlib import Path

import anyio
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from examples.bank import make_app
from kaya.actors.wire import remembered_answer
from kaya.app.config import MetricsConfig
from kaya.app.node import Node, open_node
from kaya.app.observability.metrics import Histogram
from tests.conftest import call, node_config
from tests.servers import NatsServer

pytestmark = pytest.mark.anyio


async def http_get(url: str) -> tuple[int, bytes]:
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    with anyio.fail_after(5):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            try:
                while True:
                    data += await stream.receive()
            except anyio.EndOfStream:
                pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture
async def observed(nats_server: NatsServer, tmp_path: Path) -> object:
    config = node_config(nats_server, tmp_path, metrics=MetricsConfig(address="127.0.0.1:0"))
    async with open_node(config, make_app()) as node:
        yield node


async def test_metrics_move_with_traffic(observed: Node, nc: NATS, uid: str) -> None:
    node = observed
    assert node.metrics_url is not None
    subject = f"kaya.cmd.account.{uid}"
    await call(nc, subject, {"type": "Open", "owner": "m", "currency": "EUR"})
    for _ in range(7):
        await call(nc, subject, {"type": "Deposit", "amount": 2})
    await call(nc, subject, {"type": "Withdraw", "amount": 1000})  # rejected
    await call(nc, subject, {"type": "Deposit", "amount": 0})  # bad_request
    await call(nc, f"kaya.qry.account.{uid}")

    status, body = await http_get(node.metrics_url)
    assert status == 200
    found = samples(body.decode())

    def commands(command: str, outcome: str) -> float:
        key = (
            "kaya_commands_total",
            (("command", command), ("entity", "account"), ("outcome", outcome)),
        )
        return found.get(key, 0.0)

    assert commands("Deposit", "ok") == 7
    assert commands("Open", "ok") == 1
    assert commands("Withdraw", "rejected") == 1
    assert commands("query", "ok") == 1
    refused = (
        "kaya_commands_total",
        (("command", "-"), ("entity", "account"), ("outcome", "bad_request")),
    )
    assert found[refused] == 1
    count = found[("kaya_command_duration_seconds_count", (("entity", "account"),))]
    assert count == 10
    assert found[("kaya_store_events_total", ())] >= 8
    assert found[("kaya_actors_active", ())] >= 1
    assert ("kaya_consumer_lag", (("consumer", "analytics"),)) in found
    assert ("kaya_relay_backlog", ()) in found


async def test_health_endpoints_and_status(observed: Node, nc: NATS, uid: str) -> None:
    node = observed
    assert node.metrics_url is not None
    base = node.metrics_url.removesuffix("/metrics")
    assert await http_get(f"{base}/healthz") == (200, b"ok\n")
    assert await http_get(f"{base}/readyz") == (200, b"ready\n")
    assert (await http_get(f"{base}/nope"))[0] == 404
    await call(nc, f"kaya.cmd.account.{uid}", {"type": "Open", "owner": "s", "currency": "EUR"})
    msg = await nc.request("kaya.health", b"", timeout=5)
    status = orjson.loads(msg.data)
    assert status["ready"] is True
    assert status["node"] == node.config.node.name
    assert status["commands"]["by_outcome"]["ok"] == 1
    assert set(status["consumers"]) == {"analytics", "notifications"}


def test_a_remembered_reply_gives_back_its_outcome() -> None:
    assert remembered_answer(b'{"ok":true,"entity":"a"}').outcome == "ok"
    rejected = b'{"ok":false,"error":{"code":"rejected","message":"x"}}'
    assert remembered_answer(rejected).outcome == "rejected"
    assert remembered_answer(b"garbage").outcome == "internal"


def test_histogram_quantiles() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for _ in range(98):
        h.observe(0.0005)
    h.observe(0.05)
    h.observe(5.0)
    assert h.snapshot().quantile(0.5) == 0.001
    assert h.snapshot().quantile(0.99) == 0.1
    assert h.snapshot().quantile(1.0) == float("inf")


def test_status_view_shows_rates_from_two_snapshots() -> None:
    from kaya.app.observability.status import render_status

    def snapshot(t: float, total: int) -> dict[str, object]:
        return {
            "node": "n1", "pid": 1, "nats": "nats://x", "ready": True, "problems": [],
            "uptime": t, "shards": 16, "time": t,
            "commands": {"total": total, "by_outcome": {"ok": total}},
            "ingress": {"inflight": 0},
            "latency_seconds": {"account": {"p50": 0.001, "p99": 0.01, "count": total}},
            "actors": {"active": 1, "busy": 0, "mailbox_depth": 0, "crashes": 0},
            "store": {"last_position": total, "events": total, "queued_appends": 0},
            "relay": {"backlog": 0, "published": total},
            "consumers": {"analytics": {"lag": 3, "retries": 0, "dead_letters": 1}},
        }  # fmt: skip

    view = render_status(snapshot(12.0, 300), snapshot(10.0, 100), dlq=1)
    assert "100.0/s" in view
    assert "p99 <= 10.0 ms" in view
    assert "analytics" in view
    assert "lag 3" in view
    assert "1 messages in KAYA_DLQ" in view


async def test_one_trace_spans_a_transfer_its_accounts_and_the_stream(
    node: Node, nc: NATS, uid: str
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    a, b, t = f"{uid}-a", f"{uid}-b", f"{uid}-t"
    for account in (a, b):
        await call(
            nc, f"kaya.cmd.account.{account}", {"type": "Open", "owner": "o", "currency": "EUR"}
        )
    await call(nc, f"kaya.cmd.account.{a}", {"type": "Deposit", "amount": 50})
    ended = anyio.Event()

    async def on_event(msg: Msg) -> None:
        if (msg.headers or {}).get("Kaya-Event-Type") in ("Completed", "Failed"):
            ended.set()

    await nc.subscribe(f"kaya.evt.transfer.{t}", cb=on_event)  # the relay publishes here
    start = {"type": "Start", "source": a, "target": b, "amount": 20}
    reply = await nc.request(
        f"kaya.cmd.transfer.{t}",
        orjson.dumps(start),
        headers={"traceparent": traceparent},
        timeout=5,
    )
    assert orjson.loads(reply.data)["ok"] is True
    assert (reply.headers or {})["traceparent"] == traceparent  # the reply names the trace
    with anyio.fail_after(10):
        await ended.wait()
    transfer = await node.store.read_stream("transfer", t)
    assert [e.type for e in transfer][-1] == "Completed"
    assert all(e.traceparent and trace_id in e.traceparent for e in transfer)
    debit = (await node.store.read_stream("account", a))[-1]
    credit = (await node.store.read_stream("account", b))[-1]
    assert (debit.type, credit.type) == ("Withdrawn", "Deposited")
    assert trace_id in (debit.traceparent or "")
    assert trace_id in (credit.traceparent or "")
    # and the same trace on the events as JetStream carries them
    with anyio.fail_after(10):
        await node.relay.wait_caught_up()
    js = nc.jetstream()
    sub = await js.subscribe(f"kaya.evt.account.{b}", ordered_consumer=True)
    seen = [await sub.next_msg(timeout=5) for _ in range(2)]
    assert trace_id in (seen[-1].headers or {}).get("traceparent", "")
