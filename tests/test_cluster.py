"""Nodes sharing shards through one NATS: one owner per shard, writes fenced, no split brain.

Real processes: a nats-server and `kaya run` nodes, stopped by PID; every wait is on an
observable state with a deadline.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import anyio
import msgspec
import nats
import orjson
import pytest

from kaya import Client
from kaya.actors.errors import Unavailable
from kaya.actors.wire import EVENTS_STREAM, shard_of
from kaya.app.broker.streams import ensure_streams
from kaya.app.cluster.journal import Journal
from kaya.app.cluster.leases import BUCKET, read_table
from kaya.app.config import EventsConfig
from kaya.store import NewEvent
from tests.servers import (
    VENV_BIN,
    KayaProcess,
    NatsServer,
    start_kaya,
    start_nats_server,
    stop_pid,
    wait_for_line,
)
from tests.test_schemas import until

pytestmark = pytest.mark.anyio
T = TypeVar("T")

REPLICATED = '[cluster]\ndurability = "replicated"\nlease_ttl = 3.0\nrenew_every = 0.5\n'


def node_config(path: Path, name: str, server: NatsServer, extra: str = REPLICATED) -> Path:
    data = path / name
    data.mkdir(parents=True, exist_ok=True)
    config = data / "config.toml"
    config.write_text(
        f'[node]\nname = "{name}"\ndata_dir = "{data}"\napp = "examples.bank:app"\n'
        f'[nats]\nurl = "{server.url}"\n[metrics]\naddress = ""\n[log]\nlevel = "info"\n{extra}'
    )
    return config


@pytest.fixture
def anyio_backend() -> str:
    """The nodes here are processes (they run uvloop); the test's own loop only waits."""
    return "asyncio"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    server = start_nats_server(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


def stored_versions(data_dir: Path, entity_id: str) -> list[int]:
    db = sqlite3.connect(data_dir / "kaya.db")
    try:
        rows = db.execute(
            "SELECT version FROM events WHERE entity = 'account' AND entity_id = ?"
            " ORDER BY version",
            (entity_id,),
        ).fetchall()
    finally:
        db.close()
    return [int(r[0]) for r in rows]


async def owners(url: str) -> dict[int, str]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        table = await read_table(kv)
    finally:
        await nc.close()
    return {n: node for n, (node, _, _) in table.owners.items()}


async def until_owners(url: str, want: object, timeout: float = 30.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    seen: dict[int, str] = {}
    while time.monotonic() < deadline:
        seen = await owners(url)
        if callable(want) and want(seen):
            return seen
        await _pause()
    raise AssertionError(f"shard owners never matched: {seen}")


async def _pause() -> None:
    await anyio.sleep(0.2)  # polling an external state (the bucket), bounded by the deadline


async def eventually(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float
) -> T:
    """Read an outside state until `done` says so (bounded): what nothing signals."""
    with anyio.fail_after(timeout):
        while True:
            value = await read()
            if done(value):
                return value
            await _pause()


async def test_two_nodes_split_the_shards_and_agree_on_every_entity(
    tmp_path: Path, server: NatsServer
) -> None:
    """The split-brain report: 1 Open + 10 Deposits to m-1 through two nodes on one server."""
    first = start_kaya(node_config(tmp_path, "n1", server))
    second: KayaProcess | None = None
    try:
        second = start_kaya(node_config(tmp_path, "n2", server))
        split = await until_owners(
            server.url,
            lambda o: len(o) == 16 and sorted(o.values()).count("n1") == 8,
        )
        assert set(split.values()) == {"n1", "n2"}
        async with Client.connect(server.url, timeout=5.0, attempts=20) as client:
            await client.send("account", "m-1", {"type": "Open", "owner": "m", "currency": "EUR"})
            for i in range(10):
                await client.send("account", "m-1", {"type": "Deposit", "amount": 10 + i})
            state = await client.get("account", "m-1")
        assert state.version == 11
        assert state.state["balance"] == sum(10 + i for i in range(10))
        # both nodes' stores follow the log: the same 11 events on either side
        for node in ("n1", "n2"):
            deadline = time.monotonic() + 10
            while stored_versions(tmp_path / node, "m-1") != list(range(1, 12)):
                assert time.monotonic() < deadline, stored_versions(tmp_path / node, "m-1")
                await _pause()
    finally:
        if second is not None:
            stop_pid(second.proc)
        stop_pid(first.proc)


def test_a_second_local_node_is_refused_with_a_clear_message(
    tmp_path: Path, server: NatsServer
) -> None:
    first = start_kaya(node_config(tmp_path, "n1", server, extra=""))
    try:
        proc = subprocess.Popen(
            [str(VENV_BIN / "kaya"), "run", "--config",
             str(node_config(tmp_path, "n2", server, extra=""))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            line = wait_for_line(proc, "stderr", b"replicated", 30)
            proc.wait(timeout=30)
        finally:
            stop_pid(proc)
        assert proc.returncode == 2
        assert line.startswith("error: shards are held by n1")
        assert proc.stderr is not None
        assert 'durability = "replicated"' in line
    finally:
        stop_pid(first.proc)


async def test_a_write_from_a_stale_view_is_refused_by_jetstream(
    tmp_path: Path, server: NatsServer
) -> None:
    """Fencing by storage: whatever a node believes, the log refuses a write made on a
    view of the entity that another node's write has overtaken."""
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, EventsConfig())
        shard = shard_of(16, "account", "fenced-1")

        class Keeper:
            epoch: int | None = 7
            gave_up: list[int] = []

            def owned(self, n: int) -> int | None:
                return self.epoch if n == shard else None

            def give_up(self, n: int) -> None:
                self.gave_up.append(n)

        keeper = Keeper()
        journal = Journal(nc, keeper, shards=16, ack_timeout=5.0)  # type: ignore[arg-type]
        event = NewEvent(event_id="e-1", type="Opened", schema_version=1, data=b"{}")
        first = await journal.record("account", "fenced-1", 0, [event], {}, 0)
        # the shard's next owner writes the entity (this node was paused meanwhile)
        await js.publish(
            "kaya.evt.account.fenced-1",
            b"{}",
            headers={"Nats-Msg-Id": "other-2", "Nats-Expected-Last-Subject-Sequence": str(first)},
        )
        late = NewEvent(event_id="e-2", type="Deposited", schema_version=1, data=b"{}")
        with pytest.raises(Unavailable):
            await journal.record("account", "fenced-1", 1, [late], {}, first)
        assert keeper.gave_up == [shard]
        assert journal.refused == 1
        assert not journal.admits("account", "fenced-1")
        info = await js.stream_info(EVENTS_STREAM, subjects_filter="kaya.evt.account.fenced-1")
        assert sum((info.state.subjects or {}).values()) == 2  # e-1 and the other owner's
        msg = await js.get_last_msg(EVENTS_STREAM, "kaya.evt.account.fenced-1")
        assert msg.headers is not None
        assert msg.headers["Nats-Msg-Id"] == "other-2"
        # a lease that lapsed refuses before anything is sent
        keeper.epoch = None
        journal.acquired(shard)
        with pytest.raises(Unavailable):
            await journal.record("account", "fenced-1", 2, [late], {}, first + 1)
        info = await js.stream_info(EVENTS_STREAM, subjects_filter="kaya.evt.account.fenced-1")
        assert sum((info.state.subjects or {}).values()) == 2
    finally:
        await nc.close()


async def test_a_transfer_between_accounts_on_two_nodes_completes(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The saga's steps cross nodes over kaya.step; money is conserved."""
    from contextlib import AsyncExitStack

    from examples.bank import make_app
    from kaya.app.config import ClusterConfig
    from kaya.app.node import open_node
    from tests.conftest import node_config as in_process_config

    cluster = ClusterConfig(durability="replicated", lease_ttl=3.0, renew_every=0.5)
    async with AsyncExitStack() as stack:
        nodes = []
        for name in ("a", "b"):
            config = in_process_config(nats_server, tmp_path / name, cluster=cluster)
            config = msgspec.structs.replace(
                config,
                node=msgspec.structs.replace(config.node, name=name),
                ingress=msgspec.structs.replace(config.ingress, queue_group="kaya"),
            )
            nodes.append(await stack.enter_async_context(open_node(config, make_app())))
        await until(
            lambda: (
                sum(len(n.host.serving) for n in nodes) == 16 and all(n.host.serving for n in nodes)
            ),
            timeout=30,
        )
        # accounts on shards of different nodes
        a_shards, b_shards = nodes[0].host.serving, nodes[1].host.serving
        for running in nodes:  # what health, status and metrics show
            seen = (await running.statistics()).cluster
            assert seen.durability == "replicated"
            assert set(seen.serving) == running.host.serving
        source = next(f"s{i}" for i in range(100) if shard_of(16, "account", f"s{i}") in a_shards)
        target = next(f"t{i}" for i in range(100) if shard_of(16, "account", f"t{i}") in b_shards)
        async with Client.connect(nats_server.url, attempts=20) as client:
            for account in (source, target):
                await client.send(
                    "account", account, {"type": "Open", "owner": "o", "currency": "EUR"}
                )
            await client.send("account", source, {"type": "Deposit", "amount": 100})
            await client.send(
                "transfer",
                "x-1",
                {"type": "Start", "source": source, "target": target, "amount": 30},
            )
            done = await eventually(
                lambda: client.get("transfer", "x-1"),
                lambda reply: reply.state["status"] != "pending",
                timeout=20,
            )
            assert done.state["status"] == "completed", orjson.dumps(done.state)
            assert (await client.get("account", source)).state["balance"] == 70
            assert (await client.get("account", target)).state["balance"] == 30


async def test_kaya_shards_lists_owners_and_moves_one(tmp_path: Path, server: NatsServer) -> None:
    first = start_kaya(node_config(tmp_path, "n1", server))
    second: KayaProcess | None = None
    try:
        second = start_kaya(node_config(tmp_path, "n2", server))
        split = await until_owners(
            server.url, lambda o: len(o) == 16 and sorted(o.values()).count("n1") == 8
        )
        listed = await kaya("shards", "--url", server.url, "--json")
        table = orjson.loads(listed.stdout)
        assert {row["shard"]: row["owner"] for row in table["shards"]} == split
        assert table["nodes"] == ["n1", "n2"]
        shard = next(n for n, node in split.items() if node == "n1")
        moved = await kaya("shards", "move", str(shard), "--to", "n2", "--url", server.url)
        assert moved.returncode == 0, moved.stderr
        assert f"shard {shard} moved to n2" in moved.stdout.decode()
        refused = await kaya("shards", "move", "99", "--to", "n2", "--url", server.url)
        assert refused.returncode == 1
        assert b"not one of 0..15" in refused.stderr
        nobody = await kaya("shards", "move", "1", "--to", "zz", "--url", server.url)
        assert nobody.returncode == 1
        assert b"'zz' is not alive (live nodes: n1, n2)" in nobody.stderr
    finally:
        if second is not None:
            stop_pid(second.proc)
        stop_pid(first.proc)


async def kaya(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process([str(VENV_BIN / "kaya"), *argv], check=False)


async def test_a_blocked_event_loop_does_not_lose_the_leases(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """Renewal runs on its own thread: a main loop stuck for longer than the TTL (a long
    synchronous call in a handler, say) finds its shards still its own afterwards."""
    from examples.bank import make_app
    from kaya.app.config import ClusterConfig
    from kaya.app.node import open_node
    from tests.conftest import node_config as in_process_config

    cluster = ClusterConfig(lease_ttl=2.0, renew_every=0.5)
    config = in_process_config(nats_server, tmp_path / "n", cluster=cluster)
    async with open_node(config, make_app()) as node:
        assert node.keeper is not None
        held = {n: lease.revision for n, lease in node.keeper.leases.items()}
        assert len(held) == 16
        rounds = node.keeper.rounds
        time.sleep(3.0)  # noqa: ASYNC251 - the point: the loop is blocked, nothing async runs
        assert node.keeper.rounds >= rounds + 3
        assert set(node.keeper.leases) == set(held)
        assert all(node.keeper.leases[n].revision > rev for n, rev in held.items())
        assert all(node.keeper.owned(n) is not None for n in held)


async def test_a_late_write_imported_after_activation_fences_the_actor(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """An actor rebuilt at version 1, then an old owner's late version 2 arrives in the log
    (and the store): the actor's next write must be refused, not become a second v2."""
    from examples.bank import make_app
    from kaya.app.config import ClusterConfig
    from kaya.app.node import open_node
    from tests.conftest import node_config as in_process_config

    cluster = ClusterConfig(durability="replicated", lease_ttl=3.0, renew_every=0.5)
    config = in_process_config(nats_server, tmp_path / "n", cluster=cluster)
    async with open_node(config, make_app()) as node:
        async with Client.connect(nats_server.url, attempts=20) as client:
            await client.send(
                "account", "late-1", {"type": "Open", "owner": "o", "currency": "EUR"}
            )
            node.runtime.unload(lambda entity, entity_id: entity_id == "late-1")
            assert (await client.get("account", "late-1")).version == 1  # rebuilt at v1
            js = node.nc.jetstream()
            first = await js.get_last_msg(EVENTS_STREAM, "kaya.evt.account.late-1")
            await js.publish(
                "kaya.evt.account.late-1",
                b'{"type":"Deposited","amount":5}',
                headers={
                    "Nats-Msg-Id": "late-v2",
                    "Nats-Expected-Last-Subject-Sequence": str(first.seq),
                    "Kaya-Event-Type": "Deposited",
                    "Kaya-Schema-Version": "1",
                    "Kaya-Entity-Version": "2",
                },
            )
            follower = node.relay
            last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
            with anyio.fail_after(10):
                await follower.wait_for(last)  # type: ignore[union-attr]
            await client.send("account", "late-1", {"type": "Deposit", "amount": 7})
            state = await client.get("account", "late-1")
        versions = await stream_versions(nats_server.url, "late-1")
    assert versions == [1, 2, 3]  # never two events at one version
    assert state.version == 3
    assert state.state["balance"] == 12


async def stream_versions(url: str, account: str) -> list[int]:
    from tests.test_cluster_faults import stream_versions as read

    return await read(url, account)


async def test_a_retry_after_a_failover_gets_the_first_reply(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The new owner remembers the old owner's replies (rebuilt from the log): the same
    command id gets the first answer, a different body under it `conflict`."""
    from contextlib import AsyncExitStack

    from examples.bank import make_app
    from kaya.actors.errors import Conflict
    from kaya.app.config import ClusterConfig
    from kaya.app.node import open_node
    from tests.conftest import node_config as in_process_config

    cluster = ClusterConfig(durability="replicated", lease_ttl=3.0, renew_every=0.5)
    configs = []
    for name in ("a", "b"):
        config = in_process_config(nats_server, tmp_path / name, cluster=cluster)
        configs.append(
            msgspec.structs.replace(
                config,
                node=msgspec.structs.replace(config.node, name=name),
                ingress=msgspec.structs.replace(config.ingress, queue_group="kaya"),
            )
        )
    async with AsyncExitStack() as outer, Client.connect(nats_server.url, attempts=30) as client:
        b = await outer.enter_async_context(open_node(configs[1], make_app()))
        async with open_node(configs[0], make_app()) as a:
            await until(
                lambda: bool(a.host.serving) and len(a.host.serving) + len(b.host.serving) == 16,
                timeout=30,
            )
            account = next(
                f"r{i}" for i in range(200) if shard_of(16, "account", f"r{i}") in a.host.serving
            )
            await client.send("account", account, {"type": "Open", "owner": "o", "currency": "EUR"})
            first = await client.send(
                "account", account, {"type": "Deposit", "amount": 9}, command_id="dep-1"
            )
        # a stopped: its shards are b's now, b never saw the command come in
        await until(lambda: len(b.host.serving) == 16, timeout=30)
        again = await client.send(
            "account", account, {"type": "Deposit", "amount": 9}, command_id="dep-1"
        )
        assert again == first
        with pytest.raises(Conflict):
            await client.send(
                "account", account, {"type": "Deposit", "amount": 1}, command_id="dep-1"
            )
        state = await client.get("account", account)
    assert state.version == 2
    assert state.state["balance"] == 9


async def test_a_commands_events_reach_the_log_all_or_none(
    tmp_path: Path, server: NatsServer
) -> None:
    """A lease that lapses in the middle of a two-event command must not leave the first
    event in the log without the second (a saga would be stuck half-way for good)."""
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, EventsConfig())
        shard = shard_of(16, "transfer", "half-1")

        class Lapsing:
            """Holds the lease for the first `good` checks, then no more."""

            def __init__(self, good: int) -> None:
                self.good = good

            def owned(self, n: int) -> int | None:
                self.good -= 1
                return 7 if self.good >= 0 else None

            def give_up(self, n: int) -> None:
                pass

        def two(prefix: str) -> list[NewEvent]:
            return [
                NewEvent(event_id=f"{prefix}-{i}", type=t, schema_version=1, data=b"{}",
                         command_id=f"{prefix}-cmd")
                for i, t in enumerate(("Refunded", "Failed"))
            ]  # fmt: skip

        for checks in range(1, 5):  # the lease lapses after 1, 2, 3, 4 checks
            lapsing = Journal(nc, Lapsing(checks), shards=16, ack_timeout=5.0)  # type: ignore[arg-type]
            with contextlib.suppress(Unavailable):
                await lapsing.record("transfer", f"half-{checks}", 0, two(f"a{checks}"), {}, 0)
            subject = f"kaya.evt.transfer.half-{checks}"
            info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
            assert sum((info.state.subjects or {}).values()) in (0, 2), checks  # never one
        held = Journal(nc, Lapsing(100), shards=16, ack_timeout=5.0)  # type: ignore[arg-type]
        last = await held.record("transfer", "whole-1", 0, two("b"), {"b-cmd": b"h"}, 0)
        info = await js.stream_info(EVENTS_STREAM, subjects_filter="kaya.evt.transfer.whole-1")
        assert sum((info.state.subjects or {}).values()) == 2
        msg = await js.get_last_msg(EVENTS_STREAM, "kaya.evt.transfer.whole-1")
        assert msg.seq == last
        assert msg.headers is not None
        assert msg.headers["Nats-Msg-Id"] == "b-1"
        assert shard >= 0
    finally:
        await nc.close()
