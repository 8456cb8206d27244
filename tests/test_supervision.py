"""Supervision of the embedded nats-server: a node whose server dies restarts it, or exits.

A node that keeps running without its broker is useless and, worse, looks alive:
the server is killed with SIGKILL here and the node must bring it back on the same
port and JetStream directory (the relay rewinds and republishes, consumers resume,
commands work again) while `/healthz` and `/readyz` say 503; or, when it cannot
(its port taken meanwhile), exit non-zero with one `error:` line on stderr, so
whatever supervises the process restarts it.

While the node restarts its server, the test keeps the port taken by a socket of
its own: the kill and the bind happen without yielding to the event loop (in
process), or while the node is stopped with SIGSTOP (a child process), so the
node cannot win that race.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from examples.bank import make_app
from kaya.app.config import Config, IngressConfig, MetricsConfig, NatsConfig, NodeConfig
from kaya.app.node import LIVENESS_GRACE, open_node
from tests.conftest import call, node_config
from tests.servers import (
    NatsServer,
    free_port,
    pid_alive,
    start_kaya,
    start_nats_server,
    stop_pid,
    wait_gone,
    write_config,
)
from tests.test_events import caught_up, open_cmd
from tests.test_observability import http_get

pytestmark = pytest.mark.slow


def embedded_config(data_dir: Path) -> Config:
    return Config(
        node=NodeConfig(name="supervised", data_dir=str(data_dir)),
        nats=NatsConfig(port=free_port(), monitor_port=0),
        ingress=IngressConfig(queue_group="supervised"),
        metrics=MetricsConfig(address="127.0.0.1:0"),
    )


def take_port(port: int, timeout: float = 10) -> socket.socket:
    """Listen on `port` as soon as a dying process lets it go (a bounded poll; it blocks
    the caller's event loop on purpose, so nothing in this process runs meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server does
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


@contextlib.contextmanager
def killed_and_port_taken(pid: int, port: int) -> Iterator[None]:
    """SIGKILL `pid` and keep its port taken for the block; no await in between."""
    os.kill(pid, signal.SIGKILL)
    sock = take_port(port)
    try:
        yield
    finally:
        sock.close()


async def until_status(url: str, code: int, timeout: float = 30) -> bytes:
    """Poll an HTTP endpoint (bounded) until it answers `code`; return the body."""
    seen: tuple[int, bytes] = (0, b"")
    try:
        with anyio.fail_after(timeout):
            while True:
                seen = await http_get(url)
                if seen[0] == code:
                    return seen[1]
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{url} never answered {code}; last {seen}") from None


async def command(nc: NATS, subject: str, body: dict[str, object]) -> dict[str, object]:
    """A command, repeated (bounded) while nobody answers yet: subscriptions come back
    with the reconnection, a moment after the node reports ready."""
    with anyio.fail_after(20):
        while True:
            try:
                return await call(nc, subject, body, timeout=2)
            except (NoRespondersError, NatsTimeout):
                await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_a_killed_embedded_server_is_restarted_and_the_node_serves_again(
    tmp_path: Path, uid: str
) -> None:
    config = embedded_config(tmp_path / "data")
    async with open_node(config, make_app()) as node:
        server = node.server
        assert server is not None
        assert node.metrics_url is not None
        base = node.metrics_url.removesuffix("/metrics")
        subject = f"kaya.cmd.account.{uid}"
        nc = await nats.connect(node.url)
        try:
            await call(nc, subject, open_cmd())
            await call(nc, subject, {"type": "Deposit", "amount": 10})
            await caught_up(node)
        finally:
            await nc.close()
        duplicates = (await node.relay.statistics()).duplicates
        killed = server.pid

        with killed_and_port_taken(killed, server.settings.port):
            body = await until_status(f"{base}/healthz", 503)
            assert b"nats-server" in body, body
            status, body = await http_get(f"{base}/readyz")
            assert status == 503
            assert b"nats-server" in body, body
        # the port is free again: the node's next attempt brings the server back
        await until_status(f"{base}/healthz", 200)
        await until_status(f"{base}/readyz", 200)
        assert server.pid != killed
        assert not pid_alive(killed)
        assert server.restarts == 1

        nc = await nats.connect(node.url)
        try:
            reply = await command(nc, subject, {"type": "Deposit", "amount": 5})
            assert reply["ok"] is True, reply
            await caught_up(node)  # the relay publishes, the consumers resume
            view = await call(nc, "kaya.view.analytics")
            assert view["currencies"]["EUR"]["balance"] == 15
            assert view["operations"]["deposits"] == 2
            health = await nc.request("kaya.health", b"", timeout=5)
            assert b'"restarts":1' in health.data
        finally:
            await nc.close()
        # the relay rewound on reconnect: what the broker kept came back as duplicates
        assert (await node.relay.statistics()).duplicates > duplicates


@pytest.mark.anyio
async def test_an_external_broker_away_makes_the_node_unready_but_not_dead(
    nats_server: NatsServer, tmp_path: Path, uid: str
) -> None:
    """Readiness drops at once; liveness allows LIVENESS_GRACE, since a restarted node would
    find the same broker away (and a broker restart or a blip takes less)."""
    config = node_config(
        nats_server, tmp_path / "node", metrics=MetricsConfig(address="127.0.0.1:0")
    )
    revived: NatsServer | None = None
    try:
        async with open_node(config, make_app()) as node:
            assert node.metrics_url is not None
            base = node.metrics_url.removesuffix("/metrics")
            nats_server.stop()
            body = await until_status(f"{base}/readyz", 503)
            assert b"not connected to NATS" in body, body
            assert node.link.down_for(node.nc) < LIVENESS_GRACE
            assert await http_get(f"{base}/healthz") == (200, b"ok\n")
            revived = start_nats_server(nats_server.store_dir, port=nats_server.port)
            await until_status(f"{base}/readyz", 200)
            nc = await nats.connect(revived.url)
            try:
                reply = await command(nc, f"kaya.cmd.account.{uid}", open_cmd())
                assert reply["ok"] is True, reply
            finally:
                await nc.close()
    finally:
        if revived is not None:
            revived.stop()


def test_a_node_whose_server_cannot_come_back_exits_with_one_error_line(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "kaya.toml", tmp_path / "data", port=port)
    node = start_kaya(config)
    try:
        [server] = node.server_pids()
        os.kill(node.proc.pid, signal.SIGSTOP)  # the node must not restart it before we bind
        try:
            os.kill(server, signal.SIGKILL)
            assert wait_gone(server)
            sock = take_port(port)
        finally:
            os.kill(node.proc.pid, signal.SIGCONT)
        with sock:
            try:
                code = node.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"the node outlived its server: {list(node.stderr)[-5:]}"
                ) from None
    finally:
        stop_pid(node.proc, signal.SIGKILL)
    lines = list(node.stderr)
    assert code == 2, lines[-10:]
    assert lines[-1].startswith("error: embedded nats-server"), lines[-10:]
    assert "could not be restarted" in lines[-1]
    assert "address already in use" in lines[-1]
    assert not any("Traceback" in line for line in lines)
