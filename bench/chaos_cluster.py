"""Cluster chaos: the bank on a `kaya dev-cluster` under faults, checked after every run.

    python -m bench.chaos_cluster [--quick] [--only kill-node,pause-node] [--runs N]
                                  [--seconds S] [--seed N] [--keep] [--output PATH]
                                  [--no-write]

Each run starts a fresh `kaya dev-cluster --servers 3 --nodes 3 --app examples.bank:app`
(a temp dir, a free random base port, lease_ttl 5 s, renew_every 1 s, all on 127.0.0.1),
waits until every node holds at least 16 // 3 shards, opens the accounts (each with an
opening deposit), then runs the load: a few tasks, one NATS connection each (entering
through different servers), sending deposits, small withdrawals and transfers (one
account in four is in USD, so a transfer between currencies is refunded; a few are over
the balance), every command with its own Kaya-Command-Id, re-sent with the SAME id on no
reply, no responders, `unavailable`, `overloaded` or `timeout` until its deadline
(bench.chaos's `deliver`). Mid-load one fault, by scenario:

    kill-node        SIGKILL of the node holding the most shards; timed until another node
                     serves each of its shards; then restarted (`kaya run --config`) and
                     the cluster rebalanced, under load
    pause-node       SIGSTOP of the owner of the first account's shard for lease_ttl + 3 s,
                     then SIGCONT: its stale writes must be refused (the checks below read
                     every entity's versions in KAYA_EVENTS)
    kill-leader      SIGKILL of the nats-server leading KAYA_EVENTS; timed until the stream
                     has another leader
    rolling-restart  SIGTERM of each node in turn: wait for its exit and for its shards to be
                     served elsewhere (timed), restart it, wait for balance, next node

The load goes on for --seconds (or until the fault has recovered, plus a tail). Then the
commands left without a final reply are sent again with their ids ("retried at end"),
every transfer is waited for, the state of every account and transfer is read, all of
KAYA_EVENTS is read (ordered consumer), every node's store is awaited until its follower
has the stream's last event, and the cluster is stopped (SIGTERM to the nodes this runner
restarted, then to dev-cluster; every PID checked gone).

Checks (bench.chaos_check's, on the events of KAYA_EVENTS, the log being the truth in a
cluster; each violation with its evidence):

    lost, applied twice, refused applied, state, money, transfers ended
                     bench.chaos_check's checks: each acknowledged command's events are in
                     the log at the versions its reply gave, once; the served states fold
                     from the log; sum of balances == opening deposits + deposits -
                     withdrawals applied; no account with `outgoing` left; every transfer
                     completed or failed
    stream           every entity's Kaya-Entity-Version in stream order is exactly 1..N
                     (a stale owner's accepted write shows as a duplicate or a gap), each
                     Nats-Msg-Id once, every message with the contract's headers
    replica          each node's store (its follower of the log) holds exactly the log's
                     events at the same positions
    unanswered       a command still without a final reply after the retries at the end
    replies          a final error no command of this load should get (anything but a
                     withdrawal `rejected`)
    node logs        a "Traceback" in a node's log (warning lines are counted by message)
    cluster          a child that exited when nobody stopped it, a failover or rebalance
                     not done within --recover seconds, a stopped node that kept leases,
                     a process left running, dev-cluster not exiting 0 on SIGTERM

Prints a table (scenario, runs, acknowledged commands, retried at end, failover/recovery
seconds, longest time without an acknowledgement, violations) and writes
bench/results/chaos-cluster-<stamp>.json and chaos-cluster-latest.json (not with
--no-write). A run with a violation keeps its work dir (the dev-cluster data dir with
every log and store, recording.json). The exit status is 1 when there is a violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from bench import chaos_check
from bench import framework as fw
from bench.chaos import (
    CHUNK,
    Sent,
    World,
    deliver,
    fault_results,
    query,
    run_budgeted,
    runs_text,
    store_figures,
    wait_transfers,
)
from bench.common import (
    BenchError,
    Child,
    ensure_gone,
    pid_alive,
    utc_now,
)
from bench.targets import KAYA, Proc, dev_cluster_argv, ready_children
from kaya.actors.wire import EVENTS_STREAM, shard_of
from kaya.app.cluster.leases import BUCKET, Table, read_table

SCENARIOS = {
    "kill-node": "SIGKILL of the node with the most shards, restarted after the failover",
    "pause-node": "SIGSTOP of a shard owner for lease_ttl + 3 s, then SIGCONT",
    "kill-leader": "SIGKILL of the nats-server leading KAYA_EVENTS",
    "rolling-restart": "SIGTERM of each node in turn, restarted with kaya run --config",
}
CHECKS = (
    *(c for c in chaos_check.CHECKS if c != "read model"),
    "replica",
    "unanswered",
    "replies",
    "node logs",
    "cluster",
)
SERVERS = 3
NODES = 3
SHARDS = 16
LEASE_TTL = 5.0
RENEW_EVERY = 1.0
BASE_CONFIG = (
    f"[cluster]\nlease_ttl = {LEASE_TTL}\nrenew_every = {RENEW_EVERY}\n"
    f'[shards]\ncount = {SHARDS}\n[log]\nlevel = "info"\n'
)
EXITED = re.compile(r"^(server|node) (\S+) exited with code (-?\d+)$")
MAX_OPS = 20_000
"""Commands per load task at most, beside the time bound."""
POLL = 0.2
"""Seconds between two reads of KAYA_SHARDS or of the stream's leader."""


@dataclass(frozen=True)
class Settings:
    runs: int = 1
    seconds: float = 20.0
    """Seconds of load per run, at least (longer while the fault has not recovered)."""
    workers: int = 6
    accounts: int = 24
    opening: int = 1000
    fault_at: float = 0.3
    """When the fault starts, as a fraction of --seconds."""
    tail: float = 4.0
    """Seconds of load after the fault has recovered."""
    request_timeout: float = 2.0
    command_deadline: float = 12.0
    """Seconds a load task keeps sending one command before leaving it to the end."""
    settle: float = 60.0
    """Seconds for the retries at the end, again for the transfers, and for the stores."""
    recover: float = 30.0
    """Seconds a takeover, a new leader, a restart or a rebalance may take."""
    start_timeout: float = 120.0
    seed: int = 1
    budget: float = 600.0
    """Seconds for the whole run: a run that would not fit (judged by the longest so far)
    is skipped and reported."""


QUICK = Settings(seconds=8.0, workers=4, accounts=16, tail=2.0, settle=45.0, budget=300.0)


# ---- the report: bench.chaos_check's, with this runner's checks beside ----------------------


class Report(chaos_check.Report):
    """chaos_check.Report, knowing the checks of CHECKS (the cluster's among them)."""

    def add(self, check: str, message: str, evidence: Any) -> None:
        assert check in CHECKS, check
        self.counts[check] += 1
        if self.counts[check] <= chaos_check.MAX_PER_CHECK:
            self.violations.append(chaos_check.Violation(check, message, evidence))

    def render(self, limit: int = 40) -> str:
        first, _, rest = super().render(limit).partition("\n")
        mine = [n for n in CHECKS if n not in chaos_check.CHECKS and self.counts[n]]
        return "\n".join(
            [first, *(f"  {n}: {self.counts[n]}" for n in mine), *([rest] if rest else [])]
        )

    def as_json(self) -> dict[str, Any]:
        out = super().as_json()
        out["violations_per_check"] = {name: self.counts[name] for name in CHECKS}
        return out


# ---- the cluster: dev-cluster and the nodes restarted here, each known by PID ----------------


def ours(pid: int, data_dir: Path) -> bool:
    """True while `pid` runs a command naming `data_dir`: never signal a reused PID."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(data_dir).encode() in cmdline and pid_alive(pid)


class Cluster:
    """A `kaya dev-cluster` run: its children as printed, the nodes restarted by this runner."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.data_dir = work / "dev-cluster"
        self.child: Child | None = None
        self.servers: dict[str, Proc] = {}
        self.nodes: dict[str, Proc] = {}
        self.restarted: dict[str, Child] = {}
        """The node now running under each name, when this runner (re)started it."""
        self.started: list[Child] = []
        self.pids: list[int] = []
        """Every server and node PID ever seen, to check each is gone at the end."""
        self.expected: set[str] = set()
        """Children this runner killed or stopped: their exit lines are no incident."""
        self.signalled: set[int] = set()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers.values()]

    def config(self, name: str) -> Path:
        return self.data_dir / name / "config.toml"

    def store(self, name: str) -> Path:
        return self.data_dir / name / "kaya.db"

    async def start(self, timeout: float) -> None:
        base_config = self.work / "base.toml"
        base_config.write_text(BASE_CONFIG)
        argv = dev_cluster_argv(self.data_dir, servers=SERVERS, nodes=NODES, config=base_config)
        # Spawned from the main thread: PR_SET_PDEATHSIG follows the spawning thread.
        self.child = Child("dev-cluster", argv, self.work / "dev-cluster.stderr.log")
        await asyncio.to_thread(self.child.wait_for_line, "cluster ready", timeout)
        self.servers, self.nodes = ready_children(self.child.lines)
        self.pids += [p.pid for p in (*self.servers.values(), *self.nodes.values())]

    def exits(self) -> list[tuple[str, str, int]]:
        """(kind, name, code) of each child dev-cluster said exited."""
        lines = self.child.lines if self.child else []
        return [(m[1], m[2], int(m[3])) for line in lines if (m := EXITED.match(line))]

    async def wait_exit(self, name: str, timeout: float) -> int:
        """Until node `name` (signalled by this runner) has exited; its exit code."""
        if name in self.restarted:
            return await asyncio.to_thread(self.restarted[name].wait, timeout)
        assert self.child is not None
        line = await asyncio.to_thread(self.child.wait_for_line, f"node {name} exited", timeout)
        match = EXITED.match(line)
        return int(match[3]) if match else -1

    async def restart_node(self, name: str, timeout: float) -> float:
        """`kaya run --config` with the node's config, until it prints `ready`; seconds."""
        began = time.monotonic()
        log = self.data_dir / name / f"node-restart-{len(self.started) + 1}.log"
        child = Child(
            f"{name}-restart", [str(KAYA), "run", "--config", str(self.config(name))], log
        )
        self.started.append(child)
        self.restarted[name] = child
        self.nodes[name] = replace(self.nodes[name], pid=child.pid)
        self.pids.append(child.pid)
        await asyncio.to_thread(child.wait_for_line, "ready", timeout)
        return round(time.monotonic() - began, 2)

    def signal(self, name: str, sig: int) -> int:
        """`sig` to server or node `name`, by its PID; the PID."""
        proc = self.nodes.get(name) or self.servers[name]
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.expected.add(name)
            self.signalled.add(proc.pid)
        os.kill(proc.pid, sig)
        return proc.pid

    def stop(self, report: Report) -> dict[str, Any]:
        """Restarted nodes, then dev-cluster (which stops its own), by SIGTERM to their PIDs;
        then every PID ever seen must be gone. Blocking: run it in a thread."""
        out: dict[str, Any] = {}
        for proc in (*self.nodes.values(), *self.servers.values()):  # a stopped one cannot stop
            if ours(proc.pid, self.data_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
        codes = {}
        for child in self.started:
            running = child.process.poll() is None
            code = child.stop(timeout=45)
            with contextlib.suppress(OSError):
                child.log_path.with_suffix(".stdout.log").write_text("\n".join(child.lines) + "\n")
            if running:
                codes[child.name] = code
                if code != 0:
                    report.add("cluster", f"{child.name} exited {code} on SIGTERM", {})
            elif child.pid not in self.signalled:
                report.add("cluster", f"{child.name} exited {code}, stopped by nobody", {})
        out["restarted nodes' exit codes"] = codes
        if self.child is not None:
            code = self.child.stop(timeout=90)
            out["dev-cluster exit code"] = code
            if code != 0:
                tail = self.child.stderr_tail(12)
                report.add("cluster", f"dev-cluster exited {code} on SIGTERM", {"stderr": tail})
        left = []
        for pid in self.pids:
            if ours(pid, self.data_dir) and ensure_gone(pid, timeout=10):
                left.append(pid)
        if left:
            report.add("cluster", f"processes left running, stopped by the runner: {left}", {})
        out["left running"] = left
        return out


# ---- KAYA_SHARDS and the stream's leader --------------------------------------------------


async def _quiet(*_: Any) -> None:
    """nats-py's callbacks: a server killed on purpose is not worth a traceback."""


async def connect(urls: list[str], name: str) -> NATS:
    return await nats.connect(
        urls,
        name=name,
        error_cb=_quiet,
        disconnected_cb=_quiet,
        reconnected_cb=_quiet,
        connect_timeout=2,
        reconnect_time_wait=0.25,
        max_reconnect_attempts=-1,
        dont_randomize=True,  # each connection enters through the first URL it is given
    )


async def read_shards(nc: NATS) -> Table | None:
    try:
        return await read_table(await nc.jetstream(timeout=2).key_value(BUCKET))
    except Exception:  # a bucket briefly unreadable (a leader election)
        return None


def owned(table: Table) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for shard, (node, _, _) in sorted(table.owners.items()):
        out[node].append(shard)
    return dict(out)


def balanced(table: Table, live: set[str]) -> bool:
    """Every shard served by a live node, nothing moving, each live node its share."""
    holds = owned(table)
    return (
        len(table.owners) == SHARDS
        and all(state == "serving" for _, _, state in table.owners.values())
        and not table.moves
        and set(holds) <= live
        and all(len(holds.get(n, [])) >= SHARDS // len(live) for n in live)
    )


def served_elsewhere(table: Table, node: str, shards: list[int]) -> bool:
    return all(
        table.owners.get(n, (node, 0, ""))[0] != node and table.owners[n][2] == "serving"
        for n in shards
    )


async def until_table(
    nc: NATS, want: Callable[[Table], bool], timeout: float
) -> tuple[float | None, Table | None]:
    """Seconds until KAYA_SHARDS satisfies `want` (None on timeout), and the last table."""
    began = time.monotonic()
    last = None
    while time.monotonic() - began < timeout:
        table = await read_shards(nc)
        if table is not None:
            last = table
            if want(table):
                return round(time.monotonic() - began, 2), table
        await asyncio.sleep(POLL)  # the bucket is polled: nothing announces a change here
    return None, last


async def stream_leader(nc: NATS, stream: str = EVENTS_STREAM) -> str | None:
    try:
        info = await nc.jetstream(timeout=2).stream_info(stream)
    except (TimeoutError, nats.errors.Error, OSError):
        return None
    return info.cluster.leader if info.cluster else None


def summary(table: Table | None) -> dict[str, Any]:
    if table is None:
        return {"table": None}
    return {
        "owners": owned(table),
        "states": dict(Counter(s for _, _, s in table.owners.values())),
        "moves": table.moves,
        "nodes": sorted(table.nodes),
    }


# ---- the load ----------------------------------------------------------------------------


def currency(account: str) -> str:
    """One account in four is in USD: a transfer between currencies is refunded."""
    return "USD" if int(account.rsplit("-", 1)[1]) % 4 == 3 else "EUR"


@dataclass
class Load:
    accounts: list[str]
    settings: Settings
    world: World = field(default_factory=World)
    acks: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, nc: NATS, sent: Sent, deadline: float) -> Sent:
        self.world.sent.append(sent)
        await deliver(nc, sent, self.settings.request_timeout, deadline)
        if sent.status == "ok":
            self.acks.append(time.monotonic())
        return sent

    async def open_accounts(self, nc: NATS) -> None:
        deadline = time.monotonic() + self.settings.settle

        async def one(account: str) -> None:
            body = {"type": "Open", "owner": "chaos", "currency": currency(account)}
            for sent in (
                Sent(f"open-{account}", "account", account, body),
                Sent(
                    f"seed-{account}",
                    "account",
                    account,
                    {"type": "Deposit", "amount": self.settings.opening},
                ),
            ):
                if (await self.send(nc, sent, deadline)).status != "ok":
                    raise BenchError(f"{sent.command_id}: {sent.status} {sent.reply}")

        self.world.accounts = list(self.accounts)
        await asyncio.gather(*(one(a) for a in self.accounts))

    async def worker(self, number: int, nc: NATS) -> None:
        """Deposits, transfers and small withdrawals. Transfers go between accounts on any
        shards; some are refunded (between currencies), some refused (over the balance)."""
        rng = random.Random(self.settings.seed * 1000 + number)
        for n in range(1, MAX_OPS + 1):
            if self.stop.is_set():
                return
            command_id = f"w{number}-{n}"
            r = rng.random()
            if r < 0.45:
                body: dict[str, Any] = {"type": "Deposit", "amount": rng.randint(1, 20)}
                sent = Sent(command_id, "account", rng.choice(self.accounts), body)
            elif r < 0.55:
                body = {"type": "Withdraw", "amount": rng.randint(1, 20)}
                sent = Sent(command_id, "account", rng.choice(self.accounts), body)
            else:
                source, target = rng.sample(self.accounts, 2)
                amount = rng.randint(1, 50) if rng.random() > 0.05 else 10 * self.settings.opening
                body = {"type": "Start", "source": source, "target": target, "amount": amount}
                sent = Sent(command_id, "transfer", f"t{number}-{n}", body)
                self.world.transfers.append(sent.id)
            await self.send(nc, sent, time.monotonic() + self.settings.command_deadline)

    def longest_gap(self, start: float, end: float) -> float:
        times = sorted(t for t in self.acks if start <= t <= end)
        edges = [start, *times, end]
        return round(max(b - a for a, b in itertools.pairwise(edges)), 2)


# ---- the faults --------------------------------------------------------------------------


@dataclass
class Fault:
    """What one fault did and how long the cluster took to get over it."""

    cluster: Cluster
    mon: NATS
    settings: Settings
    report: Report
    record: dict[str, Any] = field(default_factory=dict)

    def note(self, text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    async def rebalance(self, key: str) -> None:
        """Until every node is back to its share (none is missing at the end of a fault)."""
        live = set(self.cluster.nodes)
        seconds, table = await until_table(
            self.mon, lambda t: balanced(t, live), self.settings.recover
        )
        self.record[key] = seconds
        if seconds is None:
            self.report.add(
                "cluster",
                f"not rebalanced over {sorted(live)} within {self.settings.recover:g}s",
                summary(table),
            )

    async def takeover(self, victim: str, shards: list[int], timeout: float) -> float | None:
        seconds, table = await until_table(
            self.mon, lambda t: served_elsewhere(t, victim, shards), timeout
        )
        if seconds is None:
            self.report.add(
                "cluster",
                f"shards {shards} of {victim} not served by another node within {timeout:g}s",
                summary(table),
            )
        return seconds

    async def victim(self, choose: Callable[[dict[str, list[int]]], str]) -> tuple[str, list[int]]:
        table = await read_shards(self.mon)
        if table is None:
            raise BenchError("KAYA_SHARDS unreadable before the fault")
        holds = owned(table)
        name = choose(holds)
        self.record["shards before"] = summary(table)
        return name, holds.get(name, [])

    async def kill_node(self) -> None:
        name, shards = await self.victim(lambda h: max(sorted(h), key=lambda n: len(h[n])))
        pid = self.cluster.signal(name, signal.SIGKILL)
        self.note(f"kill -9 {name} (pid {pid}), owner of shards {shards}")
        self.record.update(victim=name, pid=pid, shards=shards)
        self.record["recovery_s"] = await self.takeover(name, shards, self.settings.recover)
        self.record["exit_code"] = await self.cluster.wait_exit(name, self.settings.recover)
        self.record["restart_s"] = await self.cluster.restart_node(name, self.settings.recover * 2)
        await self.rebalance("rebalanced_after_restart_s")

    async def pause_node(self, first_account: str) -> None:
        shard = shard_of(SHARDS, "account", first_account)
        name, shards = await self.victim(lambda h: next(n for n in h if shard in h[n]))
        pause = LEASE_TTL + 3.0
        pid = self.cluster.signal(name, signal.SIGSTOP)
        began = time.monotonic()
        self.note(f"SIGSTOP {name} (pid {pid}) for {pause:g}s, owner of shards {shards}")
        self.record.update(victim=name, pid=pid, shards=shards, paused_s=pause)
        try:
            seconds, _ = await until_table(
                self.mon, lambda t: served_elsewhere(t, name, shards), pause
            )
            await asyncio.sleep(max(0.0, began + pause - time.monotonic()))  # the fault's length
        finally:
            os.kill(pid, signal.SIGCONT)
        self.record["recovery_s"] = seconds
        if seconds is None:
            self.report.add(
                "cluster",
                f"shards {shards} of the paused {name} not served by another node while it"
                f" was stopped {pause:g}s (lease_ttl {LEASE_TTL:g}s)",
                summary(await read_shards(self.mon)),
            )
        await self.rebalance("rebalanced_after_continue_s")

    async def kill_leader(self) -> None:
        leader = await stream_leader(self.mon)
        if leader is None or leader not in self.cluster.servers:
            raise BenchError(f"no leader of {EVENTS_STREAM} among the servers: {leader}")
        shards_leader = await stream_leader(self.mon, f"KV_{BUCKET}")
        pid = self.cluster.signal(leader, signal.SIGKILL)
        began = time.monotonic()
        self.note(f"kill -9 {leader} (pid {pid}), leader of {EVENTS_STREAM}")
        self.record.update(victim=leader, pid=pid, shards_bucket_leader=shards_leader)
        new = None
        while time.monotonic() - began < self.settings.recover:
            new = await stream_leader(self.mon)
            if new is not None and new != leader:
                break
            await asyncio.sleep(POLL)  # polled: the election is announced to no client
        else:
            new = None
        self.record["new_leader"] = new
        self.record["recovery_s"] = None if new is None else round(time.monotonic() - began, 2)
        if new is None:
            self.report.add(
                "cluster",
                f"{EVENTS_STREAM} has no new leader {self.settings.recover:g}s after {leader}"
                " was killed",
                {},
            )
        await self.rebalance("balanced_after_s")

    async def rolling_restart(self) -> None:
        steps = []
        for name in sorted(self.cluster.nodes):
            table = await read_shards(self.mon)
            shards = owned(table).get(name, []) if table else []
            pid = self.cluster.signal(name, signal.SIGTERM)
            began = time.monotonic()
            self.note(f"SIGTERM {name} (pid {pid}), owner of shards {shards}")
            step: dict[str, Any] = {"node": name, "pid": pid, "shards": shards}
            step["shards before"] = summary(table)
            step["exit_code"] = await self.cluster.wait_exit(name, self.settings.recover * 2)
            step["exit_s"] = round(time.monotonic() - began, 2)
            if step["exit_code"] != 0:
                self.report.add("cluster", f"{name} exited {step['exit_code']} on SIGTERM", step)
            table = await read_shards(self.mon)
            kept = sorted(
                n for n, (o, _, _) in (table.owners if table else {}).items() if o == name
            )
            if kept:  # a node stopped gracefully hands its shards over before it exits
                self.report.add(
                    "cluster",
                    f"{name} exited still holding the leases of shards {kept}",
                    summary(table),
                )
            handoff = await self.takeover(name, shards, self.settings.recover)
            step["handoff_s"] = None if handoff is None else round(time.monotonic() - began, 2)
            step["restart_s"] = await self.cluster.restart_node(name, self.settings.recover * 2)
            seconds, table = await until_table(
                self.mon, lambda t: balanced(t, set(self.cluster.nodes)), self.settings.recover
            )
            step["rebalanced_s"] = seconds
            if seconds is None:
                self.report.add("cluster", f"not rebalanced after {name} restarted", summary(table))
            steps.append(step)
        self.record["steps"] = steps
        handoffs = [s["handoff_s"] for s in steps]
        self.record["recovery_s"] = None if None in handoffs else max(handoffs)


# ---- after the load: reading the outcome -------------------------------------------------


async def read_stream(nc: NATS, seconds: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every event of KAYA_EVENTS (kaya.evt.>, not the epoch markers), ordered consumer."""
    js = nc.jetstream(timeout=10)
    info = await js.stream_info(EVENTS_STREAM, subjects_filter="kaya.evt.>")
    expected = sum((info.state.subjects or {}).values())
    about = {
        "events": expected,
        "messages": info.state.messages,
        "last_seq": info.state.last_seq,
        "leader": info.cluster.leader if info.cluster else None,
    }
    messages: list[dict[str, Any]] = []
    if not expected:
        return messages, about
    done = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        messages.append(
            {
                "seq": msg.metadata.sequence.stream,
                "time": str(msg.metadata.timestamp),
                "subject": msg.subject,
                "headers": dict(msg.headers or {}),
                "data": msg.data.decode(errors="replace"),
            }
        )
        if msg.metadata.num_pending == 0 or len(messages) >= expected:
            done.set()

    sub = await js.subscribe(
        "kaya.evt.>",
        stream=EVENTS_STREAM,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=on_message,
        pending_msgs_limit=1_000_000,
        pending_bytes_limit=1 << 30,
    )
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), seconds)
    finally:
        await sub.unsubscribe()
    return messages, about


def rows_from_stream(messages: list[dict[str, Any]], report: Report) -> list[chaos_check.Row]:
    """The log's events as chaos_check rows (position = stream sequence, as on every node)."""
    rows = []
    for message in messages:
        headers = message["headers"]
        parts = message["subject"].split(".", 3)
        try:
            data = json.loads(message["data"])
            rows.append(
                chaos_check.Row(
                    position=int(message["seq"]),
                    event_id=headers["Nats-Msg-Id"],
                    entity=parts[2],
                    entity_id=parts[3],
                    version=int(headers["Kaya-Entity-Version"]),
                    type=headers["Kaya-Event-Type"],
                    schema_version=int(headers["Kaya-Schema-Version"]),
                    data=data if isinstance(data, dict) else {"value": data},
                    command_id=headers.get("Kaya-Command-Id"),
                )
            )
        except (KeyError, IndexError, ValueError) as exc:
            report.add("stream", f"message {message['seq']}: not an event ({exc!r})", message)
    return rows


def check_stream(rows: list[chaos_check.Row], about: dict[str, Any], report: Report) -> None:
    """Each entity's versions in stream order exactly 1..N; each event id once."""
    if len(rows) != about.get("events"):
        report.add("stream", f"read {len(rows)} of the {about.get('events')} events", about)
    by_id: dict[str, list[int]] = defaultdict(list)
    per_entity: dict[tuple[str, str], list[chaos_check.Row]] = defaultdict(list)
    for row in rows:
        by_id[row.event_id].append(row.position)
        per_entity[(row.entity, row.entity_id)].append(row)
    for event_id, seqs in by_id.items():
        if len(seqs) > 1:
            report.add("stream", f"event {event_id} is in {EVENTS_STREAM} at seq {seqs}", {})
    for (entity, entity_id), mine in per_entity.items():
        got = [r.version for r in mine]
        if got == list(range(1, len(got) + 1)):
            continue
        at = next((i for i, v in enumerate(got) if v != i + 1), len(got))
        near = mine[max(0, at - 3) : at + 3]
        repeated = sorted(v for v, k in Counter(got).items() if k > 1)
        report.add(
            "stream",
            f"{entity}.{entity_id}: versions in stream order are not 1..{len(got)}"
            f" (first break at event #{at + 1}; repeated versions {repeated[:10]})",
            {"around the break": [r.brief() for r in near]},
        )


def check_replicas(
    rows: list[chaos_check.Row], stores: dict[str, list[chaos_check.Row]], report: Report
) -> dict[str, Any]:
    """Each node's store == the log's events (same ids, positions, versions, data)."""
    by_id = {r.event_id: r for r in rows}
    figures = {}
    for node, stored in sorted(stores.items()):
        differ = [r for r in stored if by_id.get(r.event_id) != r]
        have = {r.event_id for r in stored}
        missing = [r for r in rows if r.event_id not in have]
        figures[node] = {"events": len(stored), "differ": len(differ), "missing": len(missing)}
        for row in differ[:5]:
            log_row = by_id.get(row.event_id)
            report.add(
                "replica",
                f"{node}'s store has {row.entity}.{row.entity_id} v{row.version} at position"
                f" {row.position}, the log "
                + (f"at {log_row.position} v{log_row.version}" if log_row else "not at all"),
                {"store": row.brief(), "log": log_row and log_row.brief()},
            )
        if len(differ) > 5:
            report.add("replica", f"{node}: {len(differ) - 5} more events differ from the log", {})
        if missing:
            report.add(
                "replica",
                f"{node}'s store lacks {len(missing)} events of the log (first at position"
                f" {missing[0].position})",
                {"first": missing[0].brief(), "last": missing[-1].brief()},
            )
    return figures


def check_replies(world: World, report: Report) -> None:
    for sent in world.sent:
        if sent.status == "unresolved":
            report.add(
                "unanswered",
                f"{sent.command_id} on {sent.entity}.{sent.id}: no final reply after"
                f" {sent.attempts} tries, also at the end",
                sent.as_json(),
            )
        elif sent.status == "error":
            code = str(((sent.reply or {}).get("error") or {}).get("code"))
            if not (sent.body.get("type") == "Withdraw" and code == "rejected"):
                report.add(
                    "replies",
                    f"{sent.command_id} on {sent.entity}.{sent.id} ({sent.body.get('type')})"
                    f" answered {code}",
                    sent.as_json(),
                )


NUMBER = re.compile(r"\d+(\.\d+)?")
HEXISH = re.compile(r"\b[0-9a-f]{12,}\b")


def shape(text: str) -> str:
    """A log message with its numbers and ids replaced: lines counted by what they say."""
    return NUMBER.sub("N", HEXISH.sub("X", text)).strip()[:160]


def scan_logs(data_dir: Path, report: Report) -> dict[str, Any]:
    """Node logs: warnings and errors counted by message, Tracebacks as violations with
    the lines around; servers' [WRN]/[ERR] lines counted by message."""
    nodes: Counter[str] = Counter()
    servers: Counter[str] = Counter()
    tracebacks: dict[str, int] = {}
    for log in sorted(data_dir.glob("*/*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        where = f"{log.parent.name}/{log.name}"
        if log.parent.name.startswith("nats-"):
            for line in lines:
                for level in ("[WRN]", "[ERR]", "[FTL]"):
                    if level in line:
                        servers[f"{level} {shape(line.split(level, 1)[1])}"] += 1
            continue
        hits = [i for i, line in enumerate(lines) if "Traceback" in line]
        if hits:
            tracebacks[where] = len(hits)
            for i in hits[:3]:
                report.add(
                    "node logs",
                    f"Traceback in {where} (line {i + 1})",
                    {"lines": [x[:2000] for x in lines[max(0, i - 2) : i + 3]]},
                )
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            level = str(entry.get("level", ""))
            if level in ("warning", "error", "critical"):
                nodes[f"{level}: [{entry.get('logger')}] {shape(str(entry.get('msg')))}"] += 1
    return {
        "tracebacks": tracebacks,
        "node warnings by message": dict(nodes.most_common()),
        "server warnings by message": dict(servers.most_common(30)),
    }


async def wait_stores(cluster: Cluster, last_seq: int, seconds: float) -> dict[str, Any]:
    """Until every node's store (its follower) has reached the log's last sequence."""
    deadline = time.monotonic() + seconds
    seen: dict[str, Any] = {}
    while True:
        for name in cluster.nodes:
            try:
                seen[name] = (await asyncio.to_thread(store_figures, cluster.store(name)))[1]
            except Exception as exc:  # a store mid-checkpoint: read it again
                seen[name] = repr(exc)
        if all(isinstance(p, int) and p >= last_seq for p in seen.values()):
            return {"positions": seen, "caught up": True}
        if time.monotonic() > deadline:
            return {"positions": seen, "caught up": False}
        await asyncio.sleep(0.25)  # polling interval: the follower announces nothing


async def read_states(nc: NATS, world: World) -> dict[str, dict[str, Any]]:
    states: dict[str, dict[str, Any]] = {"account": {}, "transfer": {}}
    for entity, ids in (("account", world.accounts), ("transfer", world.transfers)):
        for i in range(0, len(ids), CHUNK):
            chunk = ids[i : i + CHUNK]
            replies = await asyncio.gather(
                *(query(nc, f"kaya.qry.{entity}.{x}", timeout=3.0, attempts=10) for x in chunk)
            )
            states[entity].update(zip(chunk, replies, strict=True))
    return states


# ---- one run -----------------------------------------------------------------------------


async def run_once(scenario: str, number: int, settings: Settings, work: Path) -> dict[str, Any]:
    await asyncio.to_thread(work.mkdir, parents=True)
    report = Report()
    cluster = Cluster(work)
    result: dict[str, Any] = {"scenario": scenario, "run": number, "work_dir": str(work)}
    accounts = [f"acc-{i}" for i in range(settings.accounts)]
    load = Load(accounts, settings)
    conns: list[NATS] = []
    tasks: list[asyncio.Task[None]] = []
    recording: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        await cluster.start(settings.start_timeout)
        result["startup_s"] = round(time.monotonic() - t0, 2)
        urls = cluster.urls
        mon = await connect(urls, "chaos-cluster-monitor")
        conns.append(mon)
        seconds, table = await until_table(
            mon, lambda t: balanced(t, set(cluster.nodes)), settings.recover * 2
        )
        if seconds is None:
            raise BenchError(f"the fresh cluster never balanced: {summary(table)}")
        result["balanced_s"] = seconds
        result["shards before"] = owned(table) if table else {}
        await load.open_accounts(mon)
        fault = Fault(cluster, mon, settings, report, {"scenario": scenario})
        for k in range(settings.workers):
            nc = await connect(urls[k % len(urls) :] + urls[: k % len(urls)], f"chaos-load-{k}")
            conns.append(nc)
            tasks.append(asyncio.create_task(load.worker(k, nc)))
        begin = time.monotonic()
        await asyncio.sleep(settings.seconds * settings.fault_at)  # load before the fault
        fault.record["at_s"] = round(time.monotonic() - begin, 2)
        action: dict[str, Callable[[], Awaitable[None]]] = {
            "kill-node": fault.kill_node,
            "pause-node": lambda: fault.pause_node(accounts[0]),
            "kill-leader": fault.kill_leader,
            "rolling-restart": fault.rolling_restart,
        }
        await action[scenario]()
        fault.record["done_s"] = round(time.monotonic() - begin, 2)
        end = max(begin + settings.seconds, time.monotonic() + settings.tail)
        await asyncio.sleep(max(0.0, end - time.monotonic()))  # the load's length
        load.stop.set()
        _, late = await asyncio.wait(tasks, timeout=settings.command_deadline + 15)
        for task in late:
            task.cancel()
        result["load_s"] = round(time.monotonic() - begin, 2)
        result["fault"] = fault.record
        result["longest_ack_gap_s"] = load.longest_gap(begin, begin + result["load_s"])

        # What got no final reply: again, same command ids, until answered.
        unresolved = [s for s in load.world.sent if s.status in ("pending", "unresolved")]
        for sent in unresolved:
            sent.late = True
        deadline = time.monotonic() + settings.settle
        for i in range(0, len(unresolved), CHUNK):
            await asyncio.gather(
                *(deliver(mon, s, 3.0, deadline) for s in unresolved[i : i + CHUNK])
            )
        result["retried_at_end"] = len(unresolved)
        result["transfers unfinished"] = await wait_transfers(mon, load.world, settings.settle)
        states = await read_states(mon, load.world)
        messages, about = await read_stream(mon, settings.settle)
        result["stream"] = about
        result["stores"] = await wait_stores(cluster, about["last_seq"], settings.settle)
        recording = {"states": states, "stream": messages, "stream_info": about}
    except (BenchError, nats.errors.Error, OSError, TimeoutError) as exc:
        report.add("cluster", f"run aborted: {str(exc)[:1000] or repr(exc)}", {})
        print(f"  run aborted: {exc}", file=sys.stderr, flush=True)
    finally:
        load.stop.set()
        for task in tasks:
            task.cancel()
        for nc in conns:
            with contextlib.suppress(Exception):
                await nc.close()
        result["stop"] = await asyncio.to_thread(cluster.stop, report)
    for _, name, code in cluster.exits():
        if name not in cluster.expected:
            report.add("cluster", f"{name} exited with code {code}, stopped by nobody", {})
    result["logs"] = scan_logs(cluster.data_dir, report)
    if recording:
        recording["commands"] = [s.as_json() for s in load.world.sent]
        judge(recording, cluster, load, report)
    statuses = Counter(s.status for s in load.world.sent)
    result.update(
        {
            "seconds": round(time.monotonic() - t0, 1),
            "commands": dict(statuses),
            "acknowledged": statuses.get("ok", 0),
            "acknowledged late": sum(s.late and s.status == "ok" for s in load.world.sent),
            "transient replies": dict(sum((s.transient for s in load.world.sent), Counter())),
            "check": report.as_json(),
        }
    )
    if report.total:
        with contextlib.suppress(OSError):
            (work / "recording.json").write_text(json.dumps(recording, default=str) + "\n")
        print(report.render(limit=12), file=sys.stderr, flush=True)
    return result


def judge(recording: dict[str, Any], cluster: Cluster, load: Load, report: Report) -> None:
    """chaos_check's checks on the log's events, then the cluster's own."""
    rows = rows_from_stream(recording["stream"], report)
    check_stream(rows, recording["stream_info"], report)
    inputs = chaos_check.Inputs.build(recording, rows)
    for check in (
        chaos_check.check_lost,
        chaos_check.check_applied_twice,
        chaos_check.check_refused_applied,
        chaos_check.check_state,
        chaos_check.check_money,
        chaos_check.check_transfers_ended,
    ):
        check(inputs, report)
    check_replies(load.world, report)
    stores = {}
    for name in sorted(cluster.nodes):
        try:
            stores[name] = chaos_check.read_store(cluster.store(name))
        except Exception as exc:  # a store that cannot be read is the finding
            report.add("replica", f"{name}'s store unreadable: {exc!r}", {})
    report.figures["replicas"] = check_replicas(rows, stores, report)
    opening = load.settings.opening * len(load.accounts)
    applied = [s for s in load.world.sent if s.status == "ok" and s.body.get("type") == "Deposit"]
    balances = [
        int(((r or {}).get("state") or {}).get("balance") or 0)
        for r in recording["states"]["account"].values()
    ]
    withdrawn = [
        s for s in load.world.sent if s.status == "ok" and s.body.get("type") == "Withdraw"
    ]
    report.figures["ledger"] = {
        "sum of balances": sum(balances),
        "opening total": opening,
        "deposits applied (beyond the opening ones)": sum(int(s.body["amount"]) for s in applied)
        - opening,
        "withdrawals applied": sum(int(s.body["amount"]) for s in withdrawn),
    }


# ---- the whole thing ---------------------------------------------------------------------


def aborted(scenario: str, number: int, why: str, work: Path) -> dict[str, Any]:
    report = Report()
    report.add("cluster", f"run aborted: {why[:1000]}", {})
    return {"scenario": scenario, "run": number, "check": report.as_json(), "work_dir": str(work)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for scenario in SCENARIOS:
        mine = [r for r in runs if r["scenario"] == scenario]
        if not mine:
            continue
        per_check: Counter[str] = Counter()
        for r in mine:
            per_check.update(r["check"]["violations_per_check"])
        rows.append(
            {
                "scenario": scenario,
                "runs": len(mine),
                "acknowledged": sum(r.get("acknowledged", 0) for r in mine),
                "retried at end": sum(r.get("retried_at_end", 0) for r in mine),
                "recovery_s": [r.get("fault", {}).get("recovery_s") for r in mine],
                "longest ack gap_s": [r.get("longest_ack_gap_s") for r in mine],
                "violations": sum(r["check"]["violations_total"] for r in mine),
                "violations per check": {k: v for k, v in per_check.items() if v},
            }
        )
    return rows


RECOVERY = {
    "kill-node": "its shards served by others",
    "pause-node": "its shards served by others",
    "kill-leader": "new KAYA_EVENTS leader",
    "rolling-restart": "slowest SIGTERM to shards served elsewhere",
}


def render(rows: list[dict[str, Any]]) -> str:
    def secs(values: list[Any]) -> str:
        return ", ".join("-" if v is None else f"{v:.1f}" for v in values)

    head = ("scenario", "runs", "acknowledged", "retried at end", "failover/recovery s")
    lines = [
        "| " + " | ".join((*head, "longest ack gap s", "violations")) + " |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for row in rows:
        checks = ", ".join(f"{k} {v}" for k, v in row["violations per check"].items())
        lines.append(
            f"| {row['scenario']} | {row['runs']} | {row['acknowledged']:,}"
            f" | {row['retried at end']} | {secs(row['recovery_s'])}"
            f" ({RECOVERY[row['scenario']]}) | {secs(row['longest ack gap_s'])}"
            f" | {row['violations']}{f' ({checks})' if checks else ''} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos_cluster",
        description="The bank on a 3-server, 3-node dev-cluster under faults, checked after"
        " each run.",
    )
    fw.add_options(
        parser,
        quick="8 s of load per run",
        only=f"comma-separated scenarios (default all: {', '.join(SCENARIOS)})",
    )
    parser.add_argument("--runs", type=int, help="runs per scenario, each on a fresh cluster")
    parser.add_argument("--seconds", type=float, help="seconds of load per run (at least)")
    parser.add_argument("--seed", type=int, help="load seed")
    parser.add_argument("--keep", action="store_true", help="keep every run's work dir")
    parser.add_argument("--output", type=Path, help="write the JSON here instead of bench/results/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenarios = list(fw.parse_only(args.only, list(SCENARIOS), list(SCENARIOS)))
    settings = QUICK if args.quick else Settings()
    overrides = {
        name: getattr(args, name)
        for name in ("runs", "seconds", "seed")
        if getattr(args, name) is not None
    }
    settings = replace(settings, **overrides)
    fw.exit_on_sigterm()
    started = utc_now()
    t0 = time.monotonic()
    errors = (BenchError, OSError, nats.errors.Error, TimeoutError)
    outcome = asyncio.run(
        run_budgeted(
            "chaos-cluster", scenarios, settings, args.keep, run_once, aborted, errors=errors
        )
    )
    outcome.pop("skipped")
    rows = summarize(outcome["runs"])
    chosen = {
        **asdict(settings),
        "quick": bool(args.quick),
        "scenarios": scenarios,
        "servers": SERVERS,
        "nodes": NODES,
        "shards": SHARDS,
        "lease_ttl": LEASE_TTL,
        "renew_every": RENEW_EVERY,
    }
    seconds = time.monotonic() - t0
    results = fault_results(
        "chaos-cluster", "bench.chaos_cluster", argv, chosen, rows, outcome, started, seconds
    )
    text = [render(rows), f"({seconds:.0f} s)", runs_text(outcome, 8)]
    fw.finish(
        results,
        write=not args.no_write,
        render=lambda _: "\n".join(filter(None, text)),
        output=args.output,
    )
    bad = sum(r["violations"] for r in rows)
    return 1 if bad or outcome["over_budget"] else 0


if __name__ == "__main__":
    sys.exit(main())
