"""The NATS adapter: the relay's header block is byte for byte what nats-py would send.

A raw subscriber (the NATS protocol over a TCP socket, no client library) receives what
the server forwards, which is the publisher's header block unchanged; the same event is
published once through nats-py's own `publish(headers=...)` and once through the
adapter's fast path. Re-run this on any nats-py upgrade (pyproject pins the range).
"""

from __future__ import annotations

import uuid

import anyio
import nats
import orjson
import pytest
from anyio.abc import SocketStream
from nats.micro import add_service
from nats.micro.request import Request

from kaya.actors.wire import event_header_block, event_headers, event_subject
from kaya.app.broker.adapter import HeaderPublisher, queued_messages, reply_subject
from kaya.store import StoredEvent
from tests.servers import NatsServer

pytestmark = pytest.mark.anyio


async def raw_subscriber(url: str, subject: str) -> SocketStream:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    stream = await anyio.connect_tcp(host, int(port))
    options = {"verbose": False, "pedantic": False, "headers": True, "protocol": 1}
    await stream.send(
        b"CONNECT " + orjson.dumps(options) + f"\r\nSUB {subject} 1\r\nPING\r\n".encode()
    )
    seen = b""
    while b"PONG\r\n" not in seen:
        seen += await stream.receive()
    return stream


async def next_hmsg(stream: SocketStream, buffer: bytearray) -> tuple[str, bytes, bytes]:
    """(reply subject, header block, payload) of the next HMSG on the raw connection."""
    while True:
        end = buffer.find(b"\r\n")
        if end >= 0 and buffer.startswith(b"HMSG "):
            tokens = buffer[:end].decode().split()
            header_len, total = int(tokens[-2]), int(tokens[-1])
            if len(buffer) >= end + 2 + total + 2:
                body = bytes(buffer[end + 2 : end + 2 + total])
                del buffer[: end + 2 + total + 2]
                reply = tokens[3] if len(tokens) == 6 else ""
                return reply, body[:header_len], body[header_len:]
        elif end >= 0 and not buffer.startswith(b"HMSG "):
            del buffer[: end + 2]  # PING, +OK, INFO: not ours
            continue
        buffer.extend(await stream.receive())


async def published_both_ways(
    url: str, subject: str, data: bytes, headers: dict[str, str], block: bytes
) -> tuple[tuple[str, bytes, bytes], tuple[str, bytes, bytes]]:
    """The same message published by nats-py (reply `r.1`) and by the adapter's fast path
    with a prebuilt header `block` (reply `r.2`), each as a raw subscriber received it."""
    raw = await raw_subscriber(url, subject)
    nc = await nats.connect(url)
    try:
        publisher = HeaderPublisher(nc)
        assert publisher.fast  # the pinned nats-py has the internals the fast path needs
        await nc.publish(subject, data, reply="r.1", headers=headers)
        await publisher.publish(
            subject, data, reply="r.2", header_block=block, headers=lambda: headers
        )
        await nc.flush()
        buffer = bytearray()
        with anyio.fail_after(5):
            return await next_hmsg(raw, buffer), await next_hmsg(raw, buffer)
    finally:
        await nc.close()
        await raw.aclose()


@pytest.mark.parametrize(
    ("traceparent", "command_id"),
    [
        (None, None),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "dep-1"),
        ("  00-spaces-around  ", "a\r\nInjected: header"),
    ],
)
async def test_the_header_block_is_what_nats_py_writes(
    nats_server: NatsServer, traceparent: str | None, command_id: str | None
) -> None:
    event = StoredEvent(
        position=42,
        event_id=uuid.uuid4().hex,
        entity="account",
        entity_id="acc-1",
        version=7,
        type="Deposited",
        schema_version=1,
        data=b'{"type":"Deposited","amount":5}',
        recorded_at=0.0,
        command_id=command_id,
        traceparent=traceparent,
    )
    stock, fast = await published_both_ways(
        nats_server.url,
        event_subject(event.entity, event.entity_id),
        event.data,
        event_headers(event),
        event_header_block(event),
    )
    assert stock[0] == "r.1"
    assert fast[0] == "r.2"
    assert fast[1] == stock[1]  # the header block, byte for byte
    assert fast[2] == stock[2] == event.data


async def test_the_ingress_reads_a_requests_reply_subject_and_queue_depth(
    nats_server: NatsServer,
) -> None:
    seen: list[tuple[str, int | None]] = []
    nc = await nats.connect(nats_server.url)
    try:
        service = await add_service(nc, name="probe", version="0.0.1")

        async def handler(request: Request) -> None:
            seen.append((reply_subject(request), queued_messages(nc, request)))
            await request.respond(b"ok")

        await service.add_endpoint(name="probe", subject="probe.x", handler=handler)
        with anyio.fail_after(5):
            reply = await nc.request("probe.x", b"", timeout=5)
        assert reply.data == b"ok"
        await service.stop()
    finally:
        await nc.close()
    ((reply_to, queued),) = seen
    assert reply_to.startswith("_INBOX.")
    assert queued == 0  # the one request was taken off the buffer already
