"""Spans over OTLP/HTTP: one trace from the ingress through the saga to the consumers.

The collector is a real HTTP server (stdlib, in a thread: the exporter posts from its own
thread and must not wait on the event loop) decoding real OTLP protobuf requests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import anyio
import msgspec
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from examples.bank import make_app
from kaya.app.config import TracingConfig
from kaya.app.node import open_node
from tests.conftest import call, node_config
from tests.servers import NatsServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Collector(HTTPServer):
    spans: list[tuple[str, str, dict[str, str]]]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: a.value.string_value for a in span.attributes}
                    self.server.spans.append((span.name, span.trace_id.hex(), attributes))  # type: ignore[attr-defined]
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector(("127.0.0.1", 0), _Handler)
    server.spans = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.anyio
async def test_a_transfer_is_one_trace_across_ingress_and_consumers(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str, collector: Collector
) -> None:
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    config = node_config(nats_server, tmp_path)
    tracing = TracingConfig(otlp_endpoint=endpoint, sample_ratio=1.0)
    config = msgspec.structs.replace(config, tracing=tracing)
    a, b, t = f"{uid}-a", f"{uid}-b", f"{uid}-t"
    async with open_node(config, make_app()) as node:
        for account in (a, b):
            await call(nc, f"kaya.cmd.account.{account}",
                       {"type": "Open", "owner": "o", "currency": "EUR"})  # fmt: skip
        await call(nc, f"kaya.cmd.account.{a}", {"type": "Deposit", "amount": 50})
        ended = anyio.Event()

        async def on_event(msg: Msg) -> None:
            if (msg.headers or {}).get("Kaya-Event-Type") in ("Completed", "Failed"):
                ended.set()

        await nc.subscribe(f"kaya.evt.transfer.{t}", cb=on_event)
        start = {"type": "Start", "source": a, "target": b, "amount": 20}
        caller = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
        reply = await nc.request(
            f"kaya.cmd.transfer.{t}", orjson.dumps(start), headers={"traceparent": caller}
        )
        # with tracing on, the reply names the ingress span: same trace, a new span id
        returned = (reply.headers or {})["traceparent"]
        assert returned.split("-")[1] == TRACE_ID
        assert returned.split("-")[2] != "00f067aa0ba902b7"
        with anyio.fail_after(10):
            await ended.wait()
            await node.relay.wait_caught_up()
            last_credit = (await node.store.read_stream("account", b))[-1].position
            await node.consumers["analytics"].wait_for_position(last_credit)  # account events
            await node.consumers["notifications"].wait_for_position(
                await node.store.last_position()
            )
        stored = await node.store.read_stream("account", b)
        assert TRACE_ID in (stored[-1].traceparent or "")
    # leaving the node flushed its spans to the collector
    traced = [(name, attrs) for name, trace, attrs in collector.spans if trace == TRACE_ID]
    names = {name for name, _ in traced}
    assert "kaya.command" in names
    assert "kaya.consume analytics" in names
    assert "kaya.consume notifications" in names
    assert {"kaya.saga transfer debit", "kaya.saga transfer credit"} <= names
    commands = [attrs for name, attrs in traced if name == "kaya.command"]
    assert commands[0]["kaya.command"] == "Start"
    consumed = {attrs["kaya.id"] for name, attrs in traced if name == "kaya.consume analytics"}
    assert {a, b} <= consumed  # the debit and the credit, continued from the saga's trace
    # commands without a traceparent start traces of their own
    others = {trace for name, trace, _ in collector.spans if name == "kaya.command"}
    assert len(others) >= 4


@pytest.mark.anyio
async def test_unsampled_traces_export_nothing_but_still_propagate(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str, collector: Collector
) -> None:
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    tracing = TracingConfig(otlp_endpoint=endpoint, sample_ratio=0.0)
    config = msgspec.structs.replace(node_config(nats_server, tmp_path), tracing=tracing)
    async with open_node(config, make_app()) as node:
        # the caller asked not to sample (flags 00): followed, nothing exported
        await nc.request(
            f"kaya.cmd.account.{uid}",
            orjson.dumps({"type": "Open", "owner": "o", "currency": "EUR"}),
            headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-00"},
            timeout=5,
        )
        stored = await node.store.read_stream("account", uid)
    assert TRACE_ID in (stored[0].traceparent or "")  # the trace id still travels
    assert collector.spans == []
