"""Failure isolation: a failing consumer, relay or read-model write never stops command serving.

The disk is really full: the node's data dir is a small tmpfs (mounting one needs
root, which CI has), filled to the last byte. Each failing part backs off, retries,
shows as unhealthy in `kaya.health` (what `kaya status` renders), in `/readyz` and in
`/metrics`, and resumes by itself once the cause is gone; commands meanwhile get
`unavailable` (the store cannot write) and work again as soon as it can.

Real nats-server (its JetStream outside the full disk), real SQLite, the node in-process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy

from examples.bank import make_app
from kaya.actors.wire import EVENTS_STREAM, Delivered
from kaya.app.broker.streams import ensure_streams
from kaya.app.config import ConsumersConfig, MetricsConfig
from kaya.app.events.consumers import Consumer, Effects
from kaya.app.events.dlq import list_dead_letters
from kaya.app.node import Node, open_node
from tests.conftest import call, node_config
from tests.servers import NatsServer
from tests.test_events import caught_up, open_cmd
from tests.test_observability import http_get, samples
from tests.test_schemas import until

pytestmark = pytest.mark.anyio


# ---- a disk that really fills up -----------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "32m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`, unmounted afterwards (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, and mounting needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield path
    finally:
        result = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if result.returncode != 0:  # something still holds a file there: detach it anyway
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(disk: Path) -> Path:
    """Write one file until the disk refuses another byte; return it (delete it to free)."""
    filler = disk / "filler"
    chunk = 1 << 20
    with filler.open("wb", buffering=0) as f:
        while chunk:  # bounded: each round halves the chunk after a refusal, down to 0
            try:
                f.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    return filler


# ---- observing the node -----------------------------------------------------------------


async def health(nc: NATS) -> dict[str, Any]:
    msg = await nc.request("kaya.health", b"", timeout=5)
    status: dict[str, Any] = orjson.loads(msg.data)
    return status


async def until_health(nc: NATS, predicate: Any, timeout: float = 15) -> dict[str, Any]:
    """Poll `kaya.health` (bounded) until `predicate(status)` holds."""
    status: dict[str, Any] = {}
    try:
        with anyio.fail_after(timeout):
            while True:
                status = await health(nc)
                if predicate(status):
                    return status
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"health never matched: {status}") from None


async def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert node.metrics_url is not None
    status, body = await http_get(node.metrics_url)
    assert status == 200
    return samples(body.decode())


async def readyz(node: Node) -> tuple[int, bytes]:
    assert node.metrics_url is not None
    return await http_get(node.metrics_url.removesuffix("/metrics") + "/readyz")


# ---- a consumer the test holds at its door ---------------------------------------------------


class Gate(Consumer):
    """Holds each event until the test opens the gate: the disk fills meanwhile."""

    name = "gate"
    filter_subject = "kaya.evt.account.>"
    tables = ("gate_seen",)
    ddl = "CREATE TABLE IF NOT EXISTS gate_seen (event_id TEXT PRIMARY KEY, type TEXT)"

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.opened = anyio.Event()

    async def handle(self, event: Delivered, effects: Effects) -> None:
        self.entered.set()
        await self.opened.wait()
        effects.execute(
            "INSERT OR IGNORE INTO gate_seen (event_id, type) VALUES (?, ?)",
            (event.event_id, event.type),
        )


def consumer_samples(found: dict[Any, float], name: str) -> tuple[float, float]:
    """(healthy, errors) of consumer `name` in a scrape."""
    labels = (("consumer", name),)
    return found[("kaya_consumer_healthy", labels)], found[("kaya_consumer_errors_total", labels)]


async def test_a_full_disk_at_a_consumers_commit_leaves_commands_served(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        config = node_config(
            nats_server,
            disk / "node",
            metrics=MetricsConfig(address="127.0.0.1:0"),
            consumers=ConsumersConfig(backoff_initial=0.05, backoff_max=0.5),
        )
        gate = Gate()
        bank = make_app()
        async with open_node(config, make_app(consumers=[*bank.consumers, gate])) as node:
            subject = f"kaya.cmd.account.{uid}"
            assert (await call(nc, subject, open_cmd()))["ok"] is True
            with anyio.fail_after(10):
                await gate.entered.wait()
            filler = fill(disk)
            gate.opened.set()  # its checkpoint commit now meets a full disk

            status = await until_health(nc, lambda s: not s["consumers"]["gate"]["healthy"])
            gate_status = status["consumers"]["gate"]
            assert "full" in gate_status["last_error"], gate_status
            assert gate_status["errors"] >= 1
            assert gate_status["failing_seconds"] >= 0
            # commands are still answered: the store cannot write, so `unavailable`...
            refused = await call(nc, subject, {"type": "Deposit", "amount": 5})
            assert refused["error"]["code"] == "unavailable", refused
            # ...and reads go on
            state = await call(nc, f"kaya.qry.account.{uid}")
            assert (state["ok"], state["version"]) == (True, 1)
            healthy, errors = consumer_samples(await scrape(node), "gate")
            assert healthy == 0
            assert errors >= 1
            code, body = await readyz(node)
            assert code == 503  # every command gets `unavailable`: route them elsewhere
            assert b"store cannot write" in body, body
            assert b"degraded: consumer gate" in body, body  # and which part fails, and why
            assert b"full" in body, body

            filler.unlink()  # the cause goes away: everything resumes without a restart
            await until_health(nc, lambda s: s["consumers"]["gate"]["healthy"])
            reply = await call(nc, subject, {"type": "Deposit", "amount": 5})
            assert reply["ok"] is True, reply
            await caught_up(node)
            seen = await node.store.query("SELECT type FROM gate_seen ORDER BY type")
            assert seen == [("Deposited",), ("Opened",)]
            view = await call(nc, "kaya.view.analytics")
            assert view["currencies"]["EUR"]["balance"] == 5
            healthy, _ = consumer_samples(await scrape(node), "gate")
            assert healthy == 1
            assert await readyz(node) == (200, b"ready\n")


async def test_while_the_disk_is_full_commands_get_unavailable_and_work_again_after(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        config = node_config(nats_server, disk / "node")
        async with open_node(config, make_app()) as node:
            subject = f"kaya.cmd.account.{uid}"
            assert (await call(nc, subject, open_cmd()))["ok"] is True
            await caught_up(node)
            filler = fill(disk)
            for amount in (1, 2, 3):  # each one refused, the node still there
                refused = await call(nc, subject, {"type": "Deposit", "amount": amount})
                assert refused["error"]["code"] == "unavailable", refused
                assert refused["error"]["message"] == "the store cannot write now; retry later"
            # not ready (don't route commands here), with the reason for the operator
            assert any("store cannot write" in p and "full" in p for p in node.readiness())
            filler.unlink()
            reply = await call(nc, subject, {"type": "Deposit", "amount": 4})
            assert (reply["ok"], reply["version"]) == (True, 2)  # the refused ones left nothing
            assert node.readiness() == ()
            await caught_up(node)
            view = await call(nc, "kaya.view.analytics")
            assert view["currencies"]["EUR"]["balance"] == 4


async def test_a_relay_that_cannot_publish_shows_unhealthy_and_resumes(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(
        nats_server, tmp_path / "node", metrics=MetricsConfig(address="127.0.0.1:0")
    )
    async with open_node(config, make_app()) as node:
        subject = f"kaya.cmd.account.{uid}"
        await call(nc, subject, open_cmd())
        await caught_up(node)
        js = nc.jetstream()
        info = await js.stream_info(EVENTS_STREAM)
        # the stream takes no more messages: the broker now refuses every event
        limited = replace(info.config, max_msgs=info.state.messages, discard=DiscardPolicy.NEW)
        await js.update_stream(limited)
        reply = await call(nc, subject, {"type": "Deposit", "amount": 5})
        assert reply["ok"] is True, reply  # commands do not wait for the relay

        status = await until_health(nc, lambda s: not s["relay"]["healthy"])
        assert status["relay"]["errors"] >= 1
        assert "maximum messages" in status["relay"]["last_error"], status["relay"]
        found = await scrape(node)
        assert found[("kaya_relay_healthy", ())] == 0
        assert found[("kaya_relay_errors_total", ())] >= 1
        code, body = await readyz(node)
        assert code == 200, body
        assert b"relay" in body, body
        reply = await call(nc, subject, {"type": "Deposit", "amount": 6})
        assert reply["ok"] is True, reply

        await ensure_streams(js, config.events)  # the limit is gone: the relay goes on
        await caught_up(node)
        status = await until_health(
            nc,
            lambda s: s["relay"]["healthy"] and all(c["healthy"] for c in s["consumers"].values()),
        )
        assert status["relay"]["backlog"] == 0
        view = await call(nc, "kaya.view.analytics")
        assert view["currencies"]["EUR"]["balance"] == 11
        assert (await scrape(node))[("kaya_relay_healthy", ())] == 1


class Strict(Consumer):
    """A read model whose SQL refuses some events (a CHECK): the handler's bug, not the store's."""

    name = "strict"
    filter_subject = "kaya.evt.account.>"
    tables = ("strict_amounts",)
    ddl = (
        "CREATE TABLE IF NOT EXISTS strict_amounts"
        " (event_id TEXT PRIMARY KEY, amount INTEGER CHECK (amount < 100))"
    )

    async def handle(self, event: Delivered, effects: Effects) -> None:
        effects.execute(
            "INSERT INTO strict_amounts (event_id, amount) VALUES (?, ?)",
            (event.event_id, event.decode().get("amount", 0)),
        )


async def test_a_read_model_write_that_fails_dead_letters_that_event_only(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    config = node_config(nats_server, tmp_path / "node")
    bank = make_app()
    async with open_node(config, make_app(consumers=[*bank.consumers, Strict()])) as node:
        subject = f"kaya.cmd.account.{uid}"
        await call(nc, subject, open_cmd())
        for amount in (5, 500, 7):  # 500 breaks the CHECK
            assert (await call(nc, subject, {"type": "Deposit", "amount": amount}))["ok"]
        await caught_up(node)
        rows = await node.store.query("SELECT amount FROM strict_amounts ORDER BY amount")
        assert rows == [(0,), (5,), (7,)]
        [letter] = await list_dead_letters(nc.jetstream(), "strict")
        assert "CHECK constraint failed" in letter.last_error
        assert orjson.loads(letter.data) == {"type": "Deposited", "amount": 500}
        stats = node.consumers["strict"].statistics()
        assert stats.healthy
        assert stats.checkpoint == await node.store.last_position()


async def test_a_jetstream_wedged_by_a_full_disk_is_healed_by_restarting_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-server leaves a stream that hit `no space` refusing writes even once space is
    back; the node restarts its embedded server and the relay republishes."""
    from kaya.app.broker import watchdog
    from kaya.app.config import Config, NatsConfig, NodeConfig
    from tests.servers import free_port

    monkeypatch.setattr(watchdog, "WEDGED_AFTER", 3.0)
    monkeypatch.setattr(watchdog, "CHECK_EVERY", 0.2)
    with small_disk(tmp_path / "disk", "48m") as disk:
        config = Config(
            node=NodeConfig(name="wedge", data_dir=str(disk / "data")),
            nats=NatsConfig(port=free_port(), monitor_port=0),
        )
        async with open_node(config, make_app(consumers=[])) as node:
            import nats

            nc = await nats.connect(node.url)
            try:
                subject = "kaya.cmd.account.w-1"
                assert (await call(nc, subject, open_cmd()))["ok"]
                js = nc.jetstream()
                filler = fill(disk)
                with pytest.raises(Exception):  # noqa: B017, PT011 - a timeout or an error
                    await js.publish("kaya.evt.account.w-x", b"x" * 200_000, timeout=2)
                filler.unlink()
                reply = await call(nc, subject, {"type": "Deposit", "amount": 5}, timeout=30)
                assert reply["ok"] is True
                assert node.server is not None
                with anyio.fail_after(60):
                    while True:
                        try:
                            info = await js.stream_info(
                                EVENTS_STREAM, subjects_filter="kaya.evt.account.w-1"
                            )
                            if sum((info.state.subjects or {}).values()) >= 2:
                                break
                        except Exception:  # the server restarting: ask again
                            pass
                        await anyio.sleep(0.2)
                assert node.server.restarts >= 1
            finally:
                await nc.close()


async def test_an_unready_store_clears_by_itself_without_commands(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unready node gets no commands routed to it: once the disk has room and nothing
    has failed for a while, readiness must come back without one."""
    from kaya.app import node as app_node

    monkeypatch.setattr(app_node, "STORE_FAILURE_HOLD", 0.5)
    with small_disk(tmp_path / "disk") as disk:
        config = node_config(nats_server, disk / "node")
        async with open_node(config, make_app(consumers=[])) as node:
            subject = f"kaya.cmd.account.{uid}"
            assert (await call(nc, subject, open_cmd()))["ok"] is True
            filler = fill(disk)
            refused = await call(nc, subject, {"type": "Deposit", "amount": 1})
            assert refused["error"]["code"] == "unavailable"
            assert any("store cannot write" in p for p in node.readiness())
            filler.unlink()
            await until(lambda: not node.readiness())
