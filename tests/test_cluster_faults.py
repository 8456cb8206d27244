"""A 3-server, 3-node cluster under load while parts of it fail: nothing acknowledged is lost.

Every check is on outcomes: the shards' owners in KAYA_SHARDS, the sum of the balances
against every deposit and transfer that was acknowledged, versions without gaps.
Load is bounded in count and time; processes are stopped by PID (tests/cluster.py).
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from kaya import Client
from kaya.actors.errors import KayaError
from kaya.actors.wire import shard_of
from tests.cluster import DevCluster, start_dev_cluster
from tests.test_cluster import eventually, owners

pytestmark = pytest.mark.anyio
ACCOUNTS = [f"c{i}" for i in range(24)]
OPENING = 1000
FAST = '[cluster]\nlease_ttl = 5.0\nrenew_every = 1.0\n[log]\nlevel = "info"\n'


@dataclass
class Ledger:
    """What the clients were told, and what they still owe a retry."""

    deposited: int = 0
    transfers: list[str] = field(default_factory=list)
    unsure: list[tuple[str, str, dict[str, object]]] = field(default_factory=list)
    acked: int = 0


async def tick() -> None:
    """Nothing to read: `eventually` then waits on the ledger the load tasks fill."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def open_accounts(client: Client) -> None:
    for account in ACCOUNTS:
        await client.send(
            "account", account, {"type": "Open", "owner": "o", "currency": "EUR"},
            command_id=f"open-{account}",
        )  # fmt: skip
        await client.send(
            "account", account, {"type": "Deposit", "amount": OPENING},
            command_id=f"seed-{account}",
        )  # fmt: skip


async def load(client: Client, ledger: Ledger, stop: anyio.Event, worker: int) -> None:
    """Deposits and transfers until `stop`, each with its own command id."""
    rng = random.Random(worker)
    n = 0
    while not stop.is_set() and n < 400:
        n += 1
        if rng.random() < 0.5:
            body: dict[str, object] = {"type": "Deposit", "amount": 1}
            entity, entity_id = "account", rng.choice(ACCOUNTS)
        else:
            source, target = rng.sample(ACCOUNTS, 2)
            body = {"type": "Start", "source": source, "target": target, "amount": 3}
            entity, entity_id = "transfer", f"w{worker}-{n}"
        command_id = f"w{worker}-{n}"
        try:
            await client.send(entity, entity_id, body, command_id=command_id)
        except KayaError:
            ledger.unsure.append((entity, entity_id, {"id": command_id, **body}))
            continue
        ledger.acked += 1
        if entity == "account":
            ledger.deposited += 1
        else:
            ledger.transfers.append(entity_id)


async def settle(client: Client, ledger: Ledger) -> None:
    """Send again, same ids, what got no answer: now each is applied exactly once."""
    for entity, entity_id, tagged in ledger.unsure:
        body = {k: v for k, v in tagged.items() if k != "id"}
        await client.send(entity, entity_id, body, command_id=str(tagged["id"]))
        if entity == "account":
            ledger.deposited += 1
        else:
            ledger.transfers.append(entity_id)
    ledger.unsure.clear()


async def check_money(client: Client, ledger: Ledger) -> None:
    for transfer in ledger.transfers:
        try:
            await eventually(
                lambda t=transfer: client.get("transfer", t),  # type: ignore[misc]
                lambda reply: reply.state["status"] in ("completed", "failed"),
                timeout=60,
            )
        except TimeoutError:
            stuck = await client.get("transfer", transfer)
            raise AssertionError(f"transfer {transfer} never ended: {stuck}") from None
    total = 0
    for account in ACCOUNTS:
        state = await client.get("account", account)
        total += state.state["balance"]
        assert not state.state.get("outgoing"), state.state  # nothing left in flight
    assert total == OPENING * len(ACCOUNTS) + ledger.deposited


async def balanced(cluster: DevCluster) -> dict[int, str]:
    """Until every node holds its share: a fresh cluster starts with the first node's."""
    names = list(cluster.nodes)
    share = 16 // len(names)
    return await eventually(
        lambda: owners(cluster.urls[0]),
        lambda o: len(o) == 16 and all(list(o.values()).count(n) >= share for n in names),
        60,
    )


async def served_by_others(cluster: DevCluster, dead: str, shards: set[int]) -> float:
    started = time.monotonic()
    url = cluster.urls[0]

    async def table() -> dict[int, str]:
        return await owners(url)

    await eventually(table, lambda o: all(o.get(n) not in (None, dead) for n in shards), 30)
    return time.monotonic() - started


async def test_kill_9_of_a_node_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with start_dev_cluster(tmp_path, servers=3, nodes=3, extra_config=FAST) as cluster:
        async with Client.connect(cluster.urls, attempts=40, timeout=3.0) as client:
            await open_accounts(client)
            before = await balanced(cluster)
            victim = "kaya-2"
            its_shards = {n for n, node in before.items() if node == victim}
            assert its_shards
            ledger = Ledger()
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for worker in range(8):
                    tg.start_soon(load, client, ledger, stop, worker)
                await eventually(tick, lambda _: ledger.acked >= 50, 30)
                os.kill(cluster.nodes[victim][1], signal.SIGKILL)
                failover = await served_by_others(cluster, victim, its_shards)
                await eventually(tick, lambda _: ledger.acked >= 300, 60)
                stop.set()
            print(f"failover after kill -9: {failover:.1f}s for {len(its_shards)} shards")
            assert failover <= 10.0, failover
            await settle(client, ledger)
            await check_money(client, ledger)
            # transfers whose accounts live on different shards were part of the load
            assert any(
                shard_of(16, "account", a) != shard_of(16, "account", b)
                for a in ACCOUNTS
                for b in ACCOUNTS
            )


async def test_a_paused_owner_has_no_write_accepted_after_it_lost_its_lease(
    tmp_path: Path,
) -> None:
    with start_dev_cluster(tmp_path, servers=1, nodes=2, extra_config=FAST) as cluster:
        async with Client.connect(cluster.urls, attempts=40, timeout=3.0) as client:
            await open_accounts(client)
            table = await balanced(cluster)
            victim = table[shard_of(16, "account", ACCOUNTS[0])]
            pid = cluster.nodes[victim][1]
            its_shards = {n for n, node in table.items() if node == victim}
            os.kill(pid, signal.SIGSTOP)
            try:
                # requests reach the paused node's socket and wait there
                async with anyio.create_task_group() as tg:
                    for _ in range(5):
                        tg.start_soon(
                            client.send, "account", ACCOUNTS[0], {"type": "Deposit", "amount": 1}
                        )
                    await served_by_others(cluster, victim, its_shards)
                    # the new owner serves the account meanwhile
                    await client.send("account", ACCOUNTS[0], {"type": "Deposit", "amount": 1})
                    os.kill(pid, signal.SIGCONT)
            finally:
                os.kill(pid, signal.SIGCONT)
            state = await client.get("account", ACCOUNTS[0])
            # 1 Open, 1 seed, 5 + 1 deposits: each applied once, whoever answered
            assert state.version == 8
            assert state.state["balance"] == OPENING + 6
            # and the log holds exactly those versions, in order, once each
            versions = await stream_versions(cluster.urls[0], ACCOUNTS[0])
            assert versions == list(range(1, 9))


async def stream_versions(url: str, account: str) -> list[int]:
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(
            f"kaya.evt.account.{account}",
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        versions = []
        info = await js.stream_info("KAYA_EVENTS", subjects_filter=f"kaya.evt.account.{account}")
        for _ in range(sum((info.state.subjects or {}).values())):
            msg = await sub.next_msg(timeout=5)
            versions.append(int((msg.headers or {})["Kaya-Entity-Version"]))
        await sub.unsubscribe()
    finally:
        await nc.close()
    return versions


async def stop_node(cluster: DevCluster, name: str) -> None:
    """SIGTERM a node and wait (in a thread: the load goes on) until it has exited."""
    pid = cluster.nodes[name][1]
    os.kill(pid, signal.SIGTERM)
    restarted = next((p for p in cluster.restarted if p.pid == pid), None)
    if restarted is not None:
        await anyio.to_thread.run_sync(restarted.wait, 60)
    else:
        await anyio.to_thread.run_sync(cluster.wait_for_output, f"node {name} exited", 60)


async def test_a_rolling_restart_under_load_loses_and_doubles_nothing(tmp_path: Path) -> None:
    with start_dev_cluster(tmp_path, servers=3, nodes=3, extra_config=FAST) as cluster:
        async with Client.connect(cluster.urls, attempts=60, timeout=3.0) as client:
            await open_accounts(client)
            await balanced(cluster)
            ledger = Ledger()
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for worker in range(6):
                    tg.start_soon(load, client, ledger, stop, worker)
                for name in list(cluster.nodes):
                    before = ledger.acked
                    await stop_node(cluster, name)  # hands its shards over first
                    table = await owners(cluster.urls[0])
                    assert name not in table.values(), table  # nothing left for the TTL
                    await anyio.to_thread.run_sync(cluster.restart_node, name)
                    await balanced(cluster)
                    await eventually(tick, lambda _, b=before: ledger.acked > b + 20, 60)
                stop.set()
            await settle(client, ledger)
            await check_money(client, ledger)


async def test_kill_9_of_the_events_stream_leader_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    import nats

    with start_dev_cluster(tmp_path, servers=3, nodes=3, extra_config=FAST) as cluster:
        async with Client.connect(cluster.urls, attempts=60, timeout=3.0) as client:
            await open_accounts(client)
            await balanced(cluster)
            nc = await nats.connect(cluster.urls)
            try:
                info = await nc.jetstream().stream_info("KAYA_EVENTS")
            finally:
                await nc.close()
            assert info.cluster is not None
            leader = str(info.cluster.leader)
            ledger = Ledger()
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for worker in range(6):
                    tg.start_soon(load, client, ledger, stop, worker)
                await eventually(tick, lambda _: ledger.acked >= 50, 30)
                before = ledger.acked
                os.kill(cluster.servers[leader][1], signal.SIGKILL)
                await eventually(tick, lambda _: ledger.acked >= before + 150, 90)
                stop.set()
            await settle(client, ledger)
            await check_money(client, ledger)
