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
from kaya.actors import RuntimeStatistics
from kaya.actors.wire import remembered_answer
from kaya.app.config import MetricsConfig
from kaya.app.events.failing import Failing, PartHealth
from kaya.app.events.relay import RelayStatistics
from kaya.app.events.runner import ConsumerStatistics
from kaya.app.node import Node, open_node
from kaya.app.observability.health import healthz, node_status, readyz
from kaya.app.observability.metrics import Histogram, NodeCollector
from kaya.app.observability.statistics import BrokerStatistics, CommandStatistics, NodeStatistics
from kaya.app.observability.status import render_status
from kaya.store import StoreStatistics
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
    # the latency budget: the 9 commands that reached an actor passed through every stage
    for stage in ("ingress", "mailbox", "decide", "queue", "insert", "fsync", "wake", "reply"):
        assert found[("kaya_command_stage_seconds_count", (("stage", stage),))] >= 8, stage
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
    for account in (a, b):  # every event the transfer's steps caused on either account
        caused = [
            e
            for e in await node.store.read_stream("account", account)
            if (e.command_id or "").startswith(f"transfer/{t}/")
        ]
        assert caused, account
        assert all(trace_id in (e.traceparent or "") for e in caused), caused
    # and the same trace on the events as JetStream carries them
    with anyio.fail_after(10):
        await node.relay.wait_caught_up()
    js = nc.jetstream()
    sub = await js.subscribe(f"kaya.evt.account.{b}", ordered_consumer=True)
    seen = [await sub.next_msg(timeout=5) for _ in range(2)]
    assert trace_id in (seen[-1].headers or {}).get("traceparent", "")


# ---- liveness, readiness and degraded parts, from a snapshot ------------------------------


def snapshot(
    *,
    problems: tuple[str, ...] = (),
    liveness: tuple[str, ...] = (),
    relay: PartHealth | None = None,
    consumers: dict[str, ConsumerStatistics] | None = None,
    broker: BrokerStatistics | None = None,
) -> NodeStatistics:
    """A NodeStatistics as a node would build it, with the parts' health chosen."""
    return NodeStatistics(
        name="n1",
        url="nats://127.0.0.1:4222",
        shards=16,
        ready=not problems,
        problems=problems,
        inflight=0,
        loop_lag=0.0,
        commands=CommandStatistics(),
        runtime=RuntimeStatistics(0, 0, 0, 0, 0, 0, 0),
        store=StoreStatistics(appends=0, batches=0, events=0, queued=0),
        relay=RelayStatistics(0, 0, 0, 10, 10, health=relay or PartHealth()),
        consumers=consumers or {},
        live=not liveness,
        liveness=liveness,
        broker=broker or BrokerStatistics(),
    )


def consumer(health: PartHealth, stopped: str = "") -> ConsumerStatistics:
    return ConsumerStatistics(
        handled=1, skipped=0, retries=0, dead_lettered=0, checkpoint=10, unknown=0,
        stopped=stopped, health=health,
    )  # fmt: skip


def failing(error: str, times: int = 2) -> PartHealth:
    record = Failing()
    for _ in range(times):
        record.failed(RuntimeError(error))
    return record.snapshot()


def test_a_healthy_node_answers_ok_and_ready() -> None:
    stats = snapshot(consumers={"analytics": consumer(PartHealth())})
    assert healthz(stats) == (200, "text/plain", b"ok\n")
    assert readyz(stats) == (200, "text/plain", b"ready\n")
    assert node_status(stats)["degraded"] == []


def test_liveness_and_readiness_fail_with_their_reasons() -> None:
    down = "embedded nats-server down for 3s (restarting it; 0 restarts so far)"
    stats = snapshot(problems=(down, "not connected to NATS"), liveness=(down,))
    status, _, body = healthz(stats)
    assert (status, body) == (503, f"{down}\n".encode())
    status, _, body = readyz(stats)
    assert (status, body) == (503, f"{down}; not connected to NATS\n".encode())


def test_a_failing_part_is_degraded_not_unready() -> None:
    """Neither a restart nor unrouting fixes a full disk: both probes pass, and say so."""
    stats = snapshot(
        relay=failing("broker refused"),
        consumers={
            "gate": consumer(failing("database or disk is full", times=3)),
            "halt": consumer(PartHealth(), stopped="v9 is newer than this code"),
            "ok": consumer(PartHealth()),
        },
    )
    assert healthz(stats)[0] == 200
    status, _, body = readyz(stats)
    lines = body.decode().splitlines()
    assert status == 200
    assert lines[0] == "ready"
    assert lines[1].startswith("degraded: relay failing for 0s (2 errors): RuntimeError: broker")
    assert lines[2].startswith("degraded: consumer gate failing for 0s (3 errors): RuntimeError")
    assert lines[3] == "degraded: consumer halt stopped: v9 is newer than this code"
    assert len(lines) == 4

    json_status = node_status(stats)
    assert json_status["relay"]["healthy"] is False
    assert json_status["consumers"]["gate"]["errors"] == 3
    assert "disk is full" in json_status["consumers"]["gate"]["last_error"]
    assert json_status["consumers"]["halt"]["healthy"] is False
    assert json_status["consumers"]["ok"]["healthy"] is True

    view = render_status(json_status, None, dlq=0)
    assert "FAILING" in view
    assert "disk is full" in view
    assert "STOPPED: v9 is newer" in view

    collector = NodeCollector()
    collector.latest = stats
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }
    assert found[("kaya_relay_healthy", ())] == 0
    assert found[("kaya_relay_errors_total", ())] == 2
    assert found[("kaya_consumer_healthy", (("consumer", "gate"),))] == 0
    assert found[("kaya_consumer_errors_total", (("consumer", "gate"),))] == 3
    assert found[("kaya_consumer_healthy", (("consumer", "ok"),))] == 1
    assert found[("kaya_consumer_failing_seconds", (("consumer", "ok"),))] == 0
    assert found[("kaya_node_live", ())] == 1


def test_a_part_that_recovers_is_healthy_and_keeps_its_last_error() -> None:
    record = Failing()
    assert record.failed(OSError("no space")) == 1
    assert record.failed(OSError("no space")) == 2  # the backoff's attempt number
    assert record.recovered() is True
    assert record.recovered() is False
    health = record.snapshot()
    assert health.healthy
    assert health.failing_for() == 0
    assert (health.errors, health.last_error) == (2, "OSError: no space")


def test_the_probes_answer_while_the_node_waits_for_nats(tmp_path: Path) -> None:
    """From the process's first moments: live (200 `starting`), not ready (503), so an
    orchestrator needs no grace period to tell a starting node from a dead one."""
    import subprocess
    import time
    import urllib.error
    import urllib.request

    from tests.servers import VENV_BIN, free_port, stop_pid

    port, dead = free_port(), free_port()
    config = tmp_path / "kaya.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\napp = "examples.bank:app"\n'
        f'[nats]\nurl = "nats://127.0.0.1:{dead}"\nstartup_timeout = 30\n'
        f'[metrics]\naddress = "127.0.0.1:{port}"\n'
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "kaya"), "run", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    try:
        deadline = time.monotonic() + 20
        while True:  # until the probe port is open (the process imports first)
            try:
                live = get("/healthz")
                break
            except OSError:
                assert proc.poll() is None, "the node exited"
                assert time.monotonic() < deadline, "no probe port within 20 s"
                time.sleep(0.05)  # polling a port nothing signals
        assert live == (200, b"starting\n")
        assert get("/readyz") == (503, b"starting\n")
        assert get("/metrics")[0] == 503
        assert proc.poll() is None  # still waiting for NATS, as configured
    finally:
        stop_pid(proc)
