"""Chaos: many concurrent transfers, a node killed with SIGKILL mid-way, a flaky handler.

A real child process (`tests.chaos_node`, with its embedded nats-server) whose
account handler fails at random serves 200 concurrent transfers between 20
accounts; it is killed while they run, restarted on the same data dir, and
left to finish. Afterwards every transfer has ended, no balance is negative, the
money across all accounts is what was deposited, and the event store shows each
transfer moved its amount exactly once (completed) or not at all (failed).
"""

from __future__ import annotations

import random
import signal
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from kaya.app.config import load_config
from tests.servers import (
    KayaProcess,
    free_port,
    start_kaya,
    stop_pid,
    wait_gone,
    write_config,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ACCOUNTS = 20
INITIAL = 1_000
TRANSFERS = 200
FAIL_RATE = 0.05
TRANSIENT = frozenset({"internal", "overloaded", "unavailable"})
ENDED = frozenset({"completed", "failed"})
BALANCE_SIGN = {
    "Deposited": 1,
    "Withdrawn": -1,
    "TransferDebited": -1,
    "TransferCredited": 1,
    "TransferRefunded": 1,
}
"""How each account event moves its balance (a TransferSettled does not)."""


@dataclass(frozen=True)
class Planned:
    transfer_id: str
    source: str
    target: str
    amount: int


def plan(rng: random.Random) -> list[Planned]:
    """Random pairs and amounts; every tenth transfer asks for more than any balance."""
    accounts = [f"acc-{i}" for i in range(ACCOUNTS)]
    planned = []
    for i in range(TRANSFERS):
        source, target = rng.sample(accounts, 2)
        amount = rng.randint(1, 300) if i % 10 else rng.randint(INITIAL + 1, 3 * INITIAL)
        planned.append(Planned(f"tr-{i}", source, target, amount))
    return planned


# ---- the node under test ---------------------------------------------------------------


def start_chaos_node(config: Path, seed: int, timeout: float = 30) -> KayaProcess:
    argv = [sys.executable, "-m", "tests.chaos_node", "--config", str(config),
            "--fail-rate", str(FAIL_RATE), "--seed", str(seed)]  # fmt: skip
    return start_kaya(config, timeout=timeout, argv=argv)


# ---- talking to it -------------------------------------------------------------------


async def request(nc: NATS, subject: str, body: bytes, command_id: str | None) -> dict[str, Any]:
    """One request, repeated (same Kaya-Command-Id) while the answer is transient."""
    headers = {"Kaya-Command-Id": command_id} if command_id else None
    while True:
        try:
            msg = await nc.request(subject, body, timeout=10, headers=headers)
        except NoRespondersError:  # a fresh node's first requests, now and then: retry
            await anyio.sleep(0.01)
            continue
        reply: dict[str, Any] = orjson.loads(msg.data)
        if reply["ok"] or reply["error"]["code"] not in TRANSIENT:
            return reply
        await anyio.sleep(0.01)


async def command(nc: NATS, subject: str, body: dict[str, Any], command_id: str) -> None:
    reply = await request(nc, subject, orjson.dumps(body), command_id)
    assert reply["ok"] is True, (subject, body, reply)


async def transfer_state(nc: NATS, transfer_id: str) -> dict[str, Any]:
    reply = await request(nc, f"kaya.qry.transfer.{transfer_id}", b"", None)
    assert reply["ok"] is True, reply
    state: dict[str, Any] = reply["state"]
    return state


async def seed_and_start(url: str, planned: list[Planned]) -> None:
    """Open and fund the accounts, start every transfer at once; return once some ended."""
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(ACCOUNTS):
                    tg.start_soon(open_account, nc, f"acc-{i}")
            async with anyio.create_task_group() as tg:
                for p in planned:
                    body = {
                        "type": "Start",
                        "source": p.source,
                        "target": p.target,
                        "amount": p.amount,
                    }
                    subject = f"kaya.cmd.transfer.{p.transfer_id}"
                    tg.start_soon(command, nc, subject, body, f"start-{p.transfer_id}")
        with anyio.fail_after(10):
            while True:  # poll an observable state: kill once some transfers have ended
                if await any_ended(nc, planned[:20]):
                    return
                await anyio.sleep(0.01)
    finally:
        await nc.close()


async def any_ended(nc: NATS, planned: list[Planned]) -> bool:
    for p in planned:
        if (await transfer_state(nc, p.transfer_id))["status"] in ENDED:
            return True
    return False


async def open_account(nc: NATS, account_id: str) -> None:
    subject = f"kaya.cmd.account.{account_id}"
    await command(nc, subject, {"type": "Open", "owner": account_id, "currency": "EUR"}, "open")
    await command(nc, subject, {"type": "Deposit", "amount": INITIAL}, "seed")


async def finish(url: str, planned: list[Planned]) -> tuple[dict[str, Any], dict[str, int]]:
    """Wait (bounded, polling the transfers' state) until every transfer has ended."""
    nc = await nats.connect(url)
    try:
        states: dict[str, Any] = {}
        with anyio.fail_after(25):
            for p in planned:
                while True:  # poll an observable state
                    state = await transfer_state(nc, p.transfer_id)
                    if state["status"] in ENDED:
                        states[p.transfer_id] = state
                        break
                    await anyio.sleep(0.02)
            balances = {}
            for i in range(ACCOUNTS):
                reply = await request(nc, f"kaya.qry.account.acc-{i}", b"", None)
                balances[f"acc-{i}"] = reply["state"]["balance"]
        return states, balances
    finally:
        await nc.close()


# ---- reading the store ---------------------------------------------------------------


def read_store(path: Path) -> list[tuple[str, str, str, dict[str, Any], str | None]]:
    """(entity, id, type, data, command id) of every event, in store order."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT entity, entity_id, type, data, command_id FROM events ORDER BY position"
        ).fetchall()
    finally:
        db.close()
    return [(e, i, t, orjson.loads(d), c) for e, i, t, d, c in rows]


def unfinished_transfers(path: Path) -> int:
    last: dict[str, str] = {}
    for entity, entity_id, type_, _, _ in read_store(path):
        if entity == "transfer":
            last[entity_id] = type_
    return sum(t not in ("Completed", "Failed") for t in last.values())


# ---- the test ------------------------------------------------------------------------


def test_transfers_survive_a_killed_node_and_a_flaky_handler(tmp_path: Path) -> None:
    config = write_config(tmp_path / "chaos.toml", tmp_path / "data", port=free_port())
    store_path = load_config(config).store_path
    planned = plan(random.Random(7))

    node = start_chaos_node(config, seed=1)
    try:
        servers = node.server_pids()
        assert len(servers) == 1, "the embedded nats-server is the node's child"
        anyio.run(seed_and_start, node.url, planned, backend="asyncio")
    finally:
        stop_pid(node.proc, signal.SIGKILL)
    logs = list(node.stderr)
    assert node.proc.returncode == -signal.SIGKILL
    assert wait_gone(servers[0]), "nats-server survived SIGKILL of its node"
    midway = unfinished_transfers(store_path)
    assert 0 < midway < TRANSFERS, "the kill must come while transfers are under way"

    node = start_chaos_node(config, seed=2)
    try:
        states, balances = anyio.run(finish, node.url, planned, backend="asyncio")
    finally:
        exit_code = stop_pid(node.proc)
    assert exit_code == 0, list(node.stderr)[-20:]
    crashes = sum("failed at random" in line for line in [*logs, *node.stderr])
    assert crashes > 0, "the flaky handler never failed: the test proves less than it says"

    # every transfer ended; money is conserved and never negative
    assert set(states) == {p.transfer_id for p in planned}
    assert all(b >= 0 for b in balances.values()), balances
    assert sum(balances.values()) == ACCOUNTS * INITIAL
    outcomes = Counter(s["status"] for s in states.values())
    assert outcomes["completed"] > 0
    assert outcomes["failed"] > 0

    # the store agrees with the state, and shows each step applied at most once
    events = read_store(store_path)
    from_events: Counter[str] = Counter()
    by_step: dict[str, list[tuple[str, str, int]]] = {}
    for entity, entity_id, type_, data, command_id in events:
        if entity != "account":
            continue
        sign = BALANCE_SIGN.get(type_, 0)
        from_events[entity_id] += sign * data.get("amount", 0)
        if command_id and command_id.startswith("transfer/"):
            by_step.setdefault(command_id, []).append((entity_id, type_, data["amount"]))
    assert dict(from_events) == balances
    assert all(len(v) == 1 for v in by_step.values()), "a step was applied twice"
    known = {p.transfer_id for p in planned}
    assert {cid.split("/")[1] for cid in by_step} <= known

    for p in planned:
        state = states[p.transfer_id]
        assert (state["source"], state["target"], state["amount"]) == (
            p.source,
            p.target,
            p.amount,
        )
        debit = by_step.get(f"transfer/{p.transfer_id}/debit")
        credit = by_step.get(f"transfer/{p.transfer_id}/credit")
        refund = by_step.get(f"transfer/{p.transfer_id}/refund")
        settle = by_step.get(f"transfer/{p.transfer_id}/settle")
        if state["status"] == "completed":
            assert state["reason"] == ""
            assert debit == [(p.source, "TransferDebited", p.amount)], p
            assert credit == [(p.target, "TransferCredited", p.amount)], p
            assert settle == [(p.source, "TransferSettled", p.amount)], p
            assert refund is None, p
        else:
            assert state["reason"], p
            assert credit is None, p
            assert settle is None, p
            # a handler failing at random is retried, never a reason for a transfer to fail
            assert state["reason"].startswith(
                ("debit refused: insufficient funds", "credit refused: timeout:")
            ), state
            if debit is None:
                assert refund is None, p
                assert state["reason"].startswith("debit refused"), state
            else:
                assert debit == [(p.source, "TransferDebited", p.amount)], p
                assert refund == [(p.source, "TransferRefunded", p.amount)], p
                assert state["reason"].startswith("credit refused"), state
