"""Chaos runner: the bank under faults on one node, judged by an independent checker.

    python -m bench.chaos [--quick] [--only node-kill,node-stop] [--runs N] [--faults N]
                          [--duration S] [--clients N] [--seed N] [--output PATH] [--keep]

Each run of a scenario starts a fresh `kaya run --app examples.bank:app` node (embedded
nats-server on a free loopback port, a fresh data dir) and runs the bank workload
against it: a few client tasks (one NATS connection each) opening accounts in EUR and
USD, depositing, withdrawing, closing (emptying the account first, by a withdrawal or a
transfer of its whole balance, then Close), and starting transfers, some to accounts
that do not exist, to closed ones and across currencies, some for more than the
balance. Every command carries a Kaya-Command-Id; on a timeout, no responders,
`overloaded`, `unavailable` or `timeout` the client sends it again with the SAME id
until it gets a final reply or its deadline passes. Every command is recorded with its
final reply. Meanwhile faults are injected, one scenario at a time:

    node-kill   kill -9 of the node, restarted on the same data dir
    nats-kill   kill -9 of the embedded nats-server: the node must restart it, or exit
                non-zero (then the runner restarts the node); a node that does neither
                within --recover seconds is an incident (killed and restarted)
    node-stop   SIGSTOP of the node, SIGCONT after a pause
    nats-stop   SIGSTOP of the nats-server, SIGCONT after a pause
    disk-full   the data dir is a small tmpfs (needs root: mount -t tmpfs, unmounted
                after); it is filled to the last byte, held full for a pause, then freed

A node that exits when the runner did not kill it is restarted and counted (an
incident, except after its nats-server was killed). After the faults the clients stop,
commands left without a final reply are sent again (same id), every transfer is waited
for, then the relay and the analytics consumer; the runner records on the wire the state
of every account and transfer, all of KAYA_EVENTS (ordered consumer) and
kaya.view.analytics, stops the node with SIGTERM, runs `kaya replay analytics
--dry-run`, and hands the recording and the store file to `bench.chaos_check`, which
knows nothing of Kaya and reports every violation with its evidence.

Prints a table (scenario, runs, faults, commands acknowledged, node exits, incidents,
violations) and writes bench/results/chaos-<stamp>.json and chaos-latest.json (or
--output). The exit status is 1 when there is a violation or an incident. A run with
either keeps its work dir (recording.json, a copy of the store, the node's logs), so
`python -m bench.chaos_check DIR/recording.json DIR/kaya.db` re-checks it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.api import DeliverPolicy

from bench import chaos_check
from bench import framework as fw
from bench.common import (
    REPO_DIR,
    BenchError,
    Child,
    child_pids,
    ensure_gone,
    free_port,
    machine_info,
    pid_alive,
    utc_now,
    versions,
)

SCENARIOS = {
    "node-kill": "kill -9 of the node, restarted on the same data dir",
    "nats-kill": "kill -9 of the embedded nats-server",
    "node-stop": "SIGSTOP of the node, then SIGCONT",
    "nats-stop": "SIGSTOP of the nats-server, then SIGCONT",
    "disk-full": "the tmpfs data dir filled up, then freed",
}
RETRY_CODES = frozenset({"timeout", "overloaded", "unavailable"})
"""Reply codes a client sends again with the same command id (beside no reply at all)."""
CURRENCIES = ("EUR", "USD")
KAYA = Path(sys.executable).parent / "kaya"
MAX_OPS = 100_000
"""Operations per client at most, beside the time bound."""
MAX_ATTEMPTS = 10_000
"""Attempts per command at most, beside its deadline."""
MAX_ACCOUNTS = 400
"""Accounts one client opens at most."""
CHUNK = 64
"""Concurrent queries when the runner reads every entity's state."""


@dataclass(frozen=True)
class Settings:
    runs: int = 2
    faults: int = 3
    duration: float = 20.0
    clients: int = 4
    pause: float = 3.0
    """Seconds a process stays stopped, or the disk full."""
    request_timeout: float = 2.0
    command_deadline: float = 45.0
    """Seconds a client keeps sending one command before calling it unresolved."""
    recover: float = 15.0
    """Seconds a node has to serve again after a fault (or to react to a killed server)."""
    settle: float = 45.0
    """Seconds to wait for every transfer to end, and again for the relay and consumers."""
    tail: float = 3.0
    """Seconds of workload after the last fault has recovered."""
    think: float = 0.01
    """Each client pauses up to this long between operations (keeps the node responsive)."""
    tmpfs_mib: int = 64
    seed: int = 1
    budget: float = 560.0
    """Seconds for the whole run: a run that would not fit (judged by the longest so far)
    is skipped and reported, so `make chaos` stays under 10 minutes."""


QUICK = Settings(
    runs=1,
    faults=1,
    duration=3.0,
    clients=3,
    pause=1.0,
    request_timeout=1.0,
    command_deadline=20.0,
    recover=10.0,
    settle=25.0,
    tail=1.0,
    budget=300.0,
)


# ---- recording what the clients sent and got ---------------------------------------------


@dataclass
class Sent:
    """One command as a client sent it, and its final reply."""

    command_id: str
    entity: str
    id: str
    body: dict[str, Any]
    status: str = "pending"  # ok | error | unresolved
    reply: dict[str, Any] | None = None
    attempts: int = 0
    transient: Counter[str] = field(default_factory=Counter)
    late: bool = False
    """Resolved only after the workload, by sending it again."""

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["transient"] = dict(self.transient)
        return out


async def deliver(nc: NATS, sent: Sent, timeout: float, deadline: float) -> None:
    """Send until a final reply (ok, or an error not in RETRY_CODES) or the deadline."""
    subject = f"kaya.cmd.{sent.entity}.{sent.id}"
    payload = json.dumps(sent.body).encode()
    headers = {"Kaya-Command-Id": sent.command_id}
    backoff = 0.05
    while sent.attempts < MAX_ATTEMPTS and time.monotonic() < deadline:
        sent.attempts += 1
        try:
            msg = await nc.request(subject, payload, timeout=timeout, headers=headers)
        except NoRespondersError:
            code = "no responders"
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            code = "no reply" if isinstance(exc, TimeoutError) else type(exc).__name__
        else:
            reply: dict[str, Any] = json.loads(msg.data)
            if reply.get("ok"):
                sent.status, sent.reply = "ok", reply
                return
            code = str((reply.get("error") or {}).get("code", "?"))
            if code not in RETRY_CODES:
                sent.status, sent.reply = "error", reply
                return
        sent.transient[code] += 1
        await asyncio.sleep(random.uniform(0, backoff))  # backoff with full jitter
        backoff = min(1.0, backoff * 2)
    sent.status = "unresolved"


async def query(
    nc: NATS, subject: str, body: bytes = b"", timeout: float = 1.0, attempts: int = 3
) -> dict[str, Any] | None:
    """A query or view request; None when no ok reply came in `attempts` tries."""
    for _ in range(attempts):
        try:
            msg = await nc.request(subject, body, timeout=timeout)
        except (TimeoutError, nats.errors.Error, OSError):
            await asyncio.sleep(0.05)
            continue
        reply: dict[str, Any] = json.loads(msg.data)
        if reply.get("ok"):
            return reply
        await asyncio.sleep(0.05)
    return None


@dataclass
class World:
    """What the clients know from acknowledged replies; shared by all of them."""

    currency: dict[str, str] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)
    accounts: list[str] = field(default_factory=list)
    """Every account id a command was sent to (opened or not, missing ones too)."""
    transfers: list[str] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)

    def open_accounts(self) -> list[str]:
        return [a for a in self.currency if a not in self.closed]

    def touch(self, account: str) -> str:
        if account not in self.accounts:
            self.accounts.append(account)
        return account


class Client:
    """One client task: random bank operations, every command recorded."""

    def __init__(
        self, number: int, nc: NATS, world: World, settings: Settings, stop: asyncio.Event
    ) -> None:
        self.number = number
        self.nc = nc
        self.world = world
        self.settings = settings
        self.stop = stop
        self.rng = random.Random(settings.seed * 1000 + number)
        self.seq = 0
        self.opened = 0
        self.own: list[str] = []

    async def command(self, entity: str, entity_id: str, body: dict[str, Any]) -> Sent:
        self.seq += 1
        sent = Sent(f"c{self.number}-{self.seq:06d}", entity, entity_id, body)
        self.world.sent.append(sent)
        if entity == "account":
            self.world.touch(entity_id)
        deadline = time.monotonic() + self.settings.command_deadline
        await deliver(self.nc, sent, self.settings.request_timeout, deadline)
        return sent

    async def run(self) -> None:
        for _ in range(MAX_OPS):
            if self.stop.is_set():
                return
            await self.operation()
            await asyncio.sleep(self.rng.uniform(0, self.settings.think))  # pacing, not sync

    def mine(self) -> list[str]:
        return [a for a in self.own if a in self.world.currency and a not in self.world.closed]

    async def operation(self) -> None:
        r = self.rng.random()
        if (len(self.mine()) < 3 or r < 0.05) and self.opened < MAX_ACCOUNTS:
            await self.open()
        elif not self.world.open_accounts():
            return
        elif r < 0.36:
            account = self.rng.choice(self.world.open_accounts())
            await self.command("account", account, {"type": "Deposit", "amount": self.amount()})
        elif r < 0.50 and self.mine():
            account = self.rng.choice(self.mine())
            await self.command("account", account, {"type": "Withdraw", "amount": self.amount()})
        elif r < 0.86:
            await self.transfer(self.rng.choice(self.world.open_accounts()))
        elif r < 0.92 and self.mine():
            await self.empty_and_close(self.rng.choice(self.mine()))
        else:
            await self.mistake()

    def amount(self) -> int:
        return self.rng.randint(1, 300) if self.rng.random() > 0.1 else self.rng.randint(1, 5000)

    async def open(self) -> None:
        account = f"a{self.number}-{self.opened}"
        currency = CURRENCIES[self.opened % len(CURRENCIES)]
        self.opened += 1
        self.own.append(account)
        body = {"type": "Open", "owner": f"client-{self.number}", "currency": currency}
        sent = await self.command("account", account, body)
        if sent.status == "ok":
            self.world.currency[account] = currency

    async def transfer(self, source: str, amount: int | None = None) -> Sent:
        """A transfer from `source`: to another open account (any currency), or now and
        then to an account that does not exist or is closed."""
        r = self.rng.random()
        others = [a for a in self.world.open_accounts() if a != source]
        if r < 0.15 or not others:
            target = f"missing-{self.number}-{self.seq}"
        elif r < 0.25 and self.world.closed:
            target = self.rng.choice(sorted(self.world.closed))
        else:
            currency = self.world.currency.get(source)
            same = [a for a in others if self.world.currency.get(a) == currency]
            target = self.rng.choice(same if same and self.rng.random() < 0.7 else others)
        self.world.touch(target)
        self.world.touch(source)
        transfer_id = f"t{self.number}-{self.seq + 1}"
        self.world.transfers.append(transfer_id)
        body = {"type": "Start", "source": source, "target": target}
        return await self.command(
            "transfer", transfer_id, {**body, "amount": amount or self.amount()}
        )

    async def empty_and_close(self, account: str) -> None:
        """Read the balance, move all of it out (a withdrawal or a transfer), then Close: a
        transfer of the whole balance whose credit fails races its refund with the Close."""
        reply = await query(
            self.nc, f"kaya.qry.account.{account}", timeout=self.settings.request_timeout
        )
        if reply is None:
            return
        balance = int(reply["state"].get("balance", 0))
        if balance > 0 and not self.stop.is_set():
            if self.rng.random() < 0.5:
                await self.transfer(account, balance)
            else:
                await self.command("account", account, {"type": "Withdraw", "amount": balance})
        for attempt in range(3):
            if self.stop.is_set():
                return
            sent = await self.command("account", account, {"type": "Close"})
            if sent.status == "ok":
                self.world.closed.add(account)
                return
            if sent.status != "error":
                return
            await asyncio.sleep(0.005 * (attempt + 1))  # a customer trying again, soon

    async def mistake(self) -> None:
        """Commands the bank refuses: each must change nothing."""
        choice = self.rng.randrange(4)
        if choice == 0 and self.world.closed:
            account = self.rng.choice(sorted(self.world.closed))
            await self.command("account", account, {"type": "Deposit", "amount": 5})
        elif choice == 1 and self.own:
            account = self.rng.choice(self.own)
            await self.command("account", account, {"type": "Withdraw", "amount": 10**12})
        elif choice == 2 and self.own:
            body = {"type": "Open", "owner": "again", "currency": "EUR"}
            await self.command("account", self.rng.choice(self.own), body)
        else:
            account = self.rng.choice(self.world.open_accounts())
            await self.command("account", account, {"type": "Deposit", "amount": 0})


# ---- the node under test -----------------------------------------------------------------


@dataclass
class RunLog:
    scenario: str
    started: float = field(default_factory=time.monotonic)
    faults: list[dict[str, Any]] = field(default_factory=list)
    exits: list[dict[str, Any]] = field(default_factory=list)
    """Node exits the runner did not cause (each was restarted)."""
    incidents: list[str] = field(default_factory=list)
    start_failures: list[str] = field(default_factory=list)

    def at(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def incident(self, text: str) -> None:
        self.incidents.append(f"t={self.at()}s: {text}")
        print(f"  incident: {text}", file=sys.stderr, flush=True)


def exit_cause(log: Path) -> str:
    """The last exception line of a node's log (`StoreError: commit failed: ...`), else its
    last line: what an incident quotes."""
    try:
        lines = [line.strip(" |+-\t") for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line):
            return line[:300]
    return next((line[:300] for line in reversed(lines) if line), "")


class Supervisor:
    """The node process: started, killed, reaped and restarted by PID, watched for exits."""

    def __init__(self, config: Path, logs: Path, run: RunLog, start_timeout: float) -> None:
        self.config = config
        self.logs = logs
        self.run = run
        self.start_timeout = start_timeout
        self.child: Child | None = None
        self.server: int | None = None
        self.url = ""
        self.starts = 0
        self.lock = asyncio.Lock()
        """Held by whoever acts on the node; the watcher keeps out meanwhile."""

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def alive(self) -> bool:
        return self.child is not None and self.child.process.poll() is None

    def refresh(self) -> int | None:
        """The node's nats-server PID (its only child), remembered for after the node died."""
        if self.alive():
            kids = [pid for pid in child_pids(self.pid) if pid_alive(pid)]
            if kids:
                self.server = kids[0]
                return kids[0]
        return None

    async def start(self) -> None:
        """Start the node and wait for `ready`; retried (bounded) while it fails, e.g. on a
        full disk or while the old server still holds the port."""
        deadline = time.monotonic() + self.start_timeout
        last = ""
        for _ in range(100):
            if time.monotonic() >= deadline:
                break
            self.starts += 1
            child = Child(
                f"node-{self.starts}",
                [str(KAYA), "run", "--config", str(self.config)],
                self.logs / f"node-{self.starts}.log",
            )
            try:
                left = max(1.0, deadline - time.monotonic())
                line = await asyncio.to_thread(child.wait_for_line, "ready", left)
            except BenchError as exc:
                last = str(exc)
                await asyncio.to_thread(child.stop, 10)
                self.run.start_failures.append(f"t={self.run.at()}s: {last[:300]}")
                await asyncio.sleep(1.0)  # bounded retry pacing
                continue
            self.child = child
            self.url = next(t for t in line.split() if t.startswith("nats://"))
            self.refresh()
            return
        raise BenchError(f"the node did not start in {self.start_timeout}s: {last}")

    async def reap(self) -> tuple[int, str]:
        """Collect an exited (or killed) node: its exit code and why, from its log."""
        assert self.child is not None
        tail = exit_cause(self.child.log_path)
        code = await asyncio.to_thread(self.child.stop, 15)
        self.child = None
        if self.server is not None:
            server, self.server = self.server, None
            if await asyncio.to_thread(ensure_gone, server, 10):
                self.run.incident(f"nats-server {server} outlived its node: stopped by the runner")
        return code, tail

    async def exited(self, context: str, *, expected: bool) -> str:
        """The node exited by itself: count it, restart it."""
        code, tail = await self.reap()
        self.run.exits.append({"at_s": self.run.at(), "code": code, "after": context, "log": tail})
        if not expected or code == 0:
            self.run.incident(f"node exited with {code} ({context}); restarted. log: {tail}")
        await self.start()
        return f"node exited with {code}, restarted by the runner"

    async def watch(self, done: asyncio.Event) -> None:
        """Poll for a node that exited while nobody acted on it; restart it."""
        while not done.is_set():
            await asyncio.sleep(0.2)  # polling interval of an observable state
            if self.lock.locked():
                continue
            async with self.lock:
                if self.child is not None and not self.alive():
                    await self.exited("by itself", expected=False)
                else:
                    self.refresh()

    def signal_all(self, sig: int) -> None:
        for pid in (self.child.pid if self.child else None, self.server):
            if pid is not None and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    async def shutdown(self) -> int | None:
        """SIGCONT (a stopped process cannot act on SIGTERM), then SIGTERM, bounded waits."""
        self.signal_all(signal.SIGCONT)
        if self.child is None:
            return None
        code = await asyncio.to_thread(self.child.stop, 20)
        self.child = None
        if self.server is not None:
            await asyncio.to_thread(ensure_gone, self.server, 10)
        return code


class Probe:
    """The runner's own connection: does the node answer a query?"""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc

    async def served(self, timeout: float = 0.5) -> bool:
        return (
            await query(self.nc, "kaya.qry.account.chaos-probe", timeout=timeout, attempts=1)
            is not None
        )

    async def until_served(self, seconds: float) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if await self.served():
                return round(time.monotonic() - started, 2)
            await asyncio.sleep(0.1)  # polling interval
        return None


def fill(path: Path, limit: int) -> int:
    """Write `path` until the file system is full (ENOSPC), to the last byte; bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            for _ in range(limit // size + 1):
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


class Faults:
    """One scenario's fault, injected on demand; each returns what was seen."""

    def __init__(
        self, scenario: str, sup: Supervisor, probe: Probe, settings: Settings, mount: Path | None
    ) -> None:
        self.scenario = scenario
        self.sup = sup
        self.probe = probe
        self.settings = settings
        self.mount = mount

    async def inject(self, number: int) -> dict[str, Any]:
        run = self.sup.run
        record: dict[str, Any] = {"fault": number, "at_s": run.at()}
        began = time.monotonic()
        actions: dict[str, Callable[[], Awaitable[str]]] = {
            "node-kill": self.node_kill,
            "nats-kill": self.nats_kill,
            "node-stop": lambda: self.stop_cont(server=False),
            "nats-stop": lambda: self.stop_cont(server=True),
            "disk-full": lambda: self.disk_full(record),
        }
        record["outcome"] = await actions[self.scenario]()
        served = await self.probe.until_served(self.settings.recover)
        record["served_again_after_s"] = (
            None if served is None else round(time.monotonic() - began, 2)
        )
        if served is None:
            run.incident(f"fault {number}: the node did not serve within {self.settings.recover}s")
        print(f"  fault {number} at {record['at_s']}s: {record['outcome']}", file=sys.stderr)
        return record

    async def node_kill(self) -> str:
        async with self.sup.lock:
            self.sup.refresh()
            os.kill(self.sup.pid, signal.SIGKILL)
            code, _ = await self.sup.reap()
            await self.sup.start()
        return f"node killed -9 (exit {code}), restarted"

    async def nats_kill(self) -> str:
        sup = self.sup
        async with sup.lock:
            server = sup.refresh()
            if server is None:
                sup.run.incident("the node has no nats-server child to kill")
                return "no nats-server"
            os.kill(server, signal.SIGKILL)
            deadline = time.monotonic() + self.settings.recover
            while time.monotonic() < deadline:
                if not sup.alive():
                    return await sup.exited("its nats-server was killed -9", expected=True)
                new = sup.refresh()
                if new is not None and new != server and await self.probe.served():
                    return f"the node restarted its nats-server (pid {new})"
                await asyncio.sleep(0.2)  # polling interval of an observable state
            sup.run.incident(
                f"the node neither restarted its nats-server nor exited within"
                f" {self.settings.recover}s of the server's kill -9: killed -9, restarted"
            )
            sup.server = None  # dead already
            os.kill(sup.pid, signal.SIGKILL)
            await sup.reap()
            await sup.start()
        return "node stuck without its nats-server: killed -9 and restarted by the runner"

    async def stop_cont(self, *, server: bool) -> str:
        async with self.sup.lock:
            pid = self.sup.refresh() if server else self.sup.pid
            if pid is None:
                self.sup.run.incident("the node has no nats-server child to stop")
                return "no nats-server"
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(self.settings.pause)  # the fault's length
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        what = "nats-server" if server else "node"
        return f"{what} stopped {self.settings.pause}s, continued"

    async def disk_full(self, record: dict[str, Any]) -> str:
        assert self.mount is not None
        filler = self.mount / "chaos-fill.bin"
        limit = self.settings.tmpfs_mib << 20
        async with self.sup.lock:
            try:
                record["filled_bytes"] = await asyncio.to_thread(fill, filler, limit)
                await asyncio.sleep(self.settings.pause)  # the fault's length
                record["served_while_full"] = await self.probe.served(1.0)
                record["node_alive_while_full"] = self.sup.alive()
            finally:
                filler.unlink(missing_ok=True)
        # A node that died on the full disk is restarted by the watcher, now it is freed.
        return f"disk full {self.settings.pause}s, freed"


# ---- one run -----------------------------------------------------------------------------


def node_config(path: Path, data_dir: Path, port: int) -> Path:
    path.write_text(
        f'[node]\nname = "chaos"\ndata_dir = "{data_dir}"\napp = "examples.bank:app"\n'
        f"[nats]\nport = {port}\nmonitor_port = 0\n"
        '[log]\nlevel = "info"\n'
    )
    return path


def store_figures(store: Path) -> tuple[int, int]:
    """(events, last position) in the store, read-only: is everything relayed and consumed?"""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        count, last = db.execute(
            "SELECT COUNT(*), COALESCE(MAX(position), 0) FROM events"
        ).fetchone()
    finally:
        db.close()
    return int(count), int(last)


async def _quiet(*_: Any) -> None:
    """nats-py's callbacks: a refused reconnect is expected here, not worth a traceback."""


async def connect(url: str, name: str) -> NATS:
    return await nats.connect(
        url,
        name=name,
        error_cb=_quiet,
        disconnected_cb=_quiet,
        reconnected_cb=_quiet,
        connect_timeout=2,
        reconnect_time_wait=0.25,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
    )


async def wait_transfers(nc: NATS, world: World, seconds: float) -> list[str]:
    """Poll each transfer's state until it completed or failed; the ids still unfinished."""
    waiting = list(world.transfers)
    deadline = time.monotonic() + seconds
    while waiting and time.monotonic() < deadline:
        still = []
        for i in range(0, len(waiting), CHUNK):
            chunk = waiting[i : i + CHUNK]
            replies = await asyncio.gather(*(query(nc, f"kaya.qry.transfer.{t}") for t in chunk))
            for transfer_id, reply in zip(chunk, replies, strict=True):
                status = reply["state"].get("status") if reply else None
                if status not in ("completed", "failed", "new"):  # new: its Start was refused
                    still.append(transfer_id)
        waiting = still
        if waiting:
            await asyncio.sleep(0.25)  # polling interval
    return waiting


async def wait_caught_up(nc: NATS, store: Path, seconds: float) -> dict[str, Any]:
    """Poll until KAYA_EVENTS holds every stored event and analytics is at the last one."""
    js = nc.jetstream()
    deadline = time.monotonic() + seconds
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        count, last = await asyncio.to_thread(store_figures, store)
        try:
            messages = (await js.stream_info("KAYA_EVENTS")).state.messages
        except (TimeoutError, nats.errors.Error, OSError):
            messages = -1
        view = await query(nc, "kaya.view.analytics", b"{}", attempts=1)
        position = int(view["position"] or 0) if view else -1
        seen = {"store events": count, "stream messages": messages, "analytics position": position}
        if messages >= count and position >= last:
            return {**seen, "caught up": True}
        await asyncio.sleep(0.25)  # polling interval
    return {**seen, "caught up": False}


async def read_stream(nc: NATS, seconds: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every message of KAYA_EVENTS, through a plain ordered consumer from the first."""
    js = nc.jetstream()
    state = (await js.stream_info("KAYA_EVENTS")).state
    info = {"messages": state.messages, "first_seq": state.first_seq, "last_seq": state.last_seq}
    messages: list[dict[str, Any]] = []
    if not state.messages:
        return messages, info
    done = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        messages.append(
            {
                "seq": seq,
                "subject": msg.subject,
                "headers": dict(msg.headers or {}),
                "data": msg.data.decode(errors="replace"),
            }
        )
        if seq >= state.last_seq:
            done.set()

    sub = await js.subscribe(
        "kaya.evt.>",
        stream="KAYA_EVENTS",
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=on_message,
        pending_msgs_limit=1_000_000,
        pending_bytes_limit=1 << 30,
    )
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), seconds)
    finally:
        await sub.unsubscribe()
    return messages, info


async def capture(nc: NATS, world: World, store: Path, settings: Settings) -> dict[str, Any]:
    """The wire's side of the recording: states, the stream, the view."""
    states: dict[str, dict[str, Any]] = {"account": {}, "transfer": {}}
    for entity, ids in (("account", world.accounts), ("transfer", world.transfers)):
        for i in range(0, len(ids), CHUNK):
            chunk = ids[i : i + CHUNK]
            replies = await asyncio.gather(*(query(nc, f"kaya.qry.{entity}.{x}") for x in chunk))
            states[entity].update(zip(chunk, replies, strict=True))
    view = await query(nc, "kaya.view.analytics", b"{}")
    try:
        stream, info = await read_stream(nc, settings.settle)
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        stream, info = [], {"error": repr(exc)}
    return {"states": states, "view": view, "stream": stream, "stream_info": info}


def replay_dry_run(data_dir: Path) -> dict[str, Any]:
    """`kaya replay analytics --dry-run` on the stopped node's data dir."""
    argv = [str(KAYA), "replay", "analytics", "--dry-run", "--app", "examples.bank:app"]
    try:
        done = subprocess.run(
            [*argv, "--data-dir", str(data_dir)],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"exit_code": None, "output": "timed out after 120 s"}
    errors = [line for line in done.stderr.replace("\r", "\n").splitlines() if "[" not in line]
    return {
        "exit_code": done.returncode,
        "output": (done.stdout.strip() + " " + " ".join(errors[-3:])).strip(),
    }


@contextlib.contextmanager
def tmpfs(path: Path, mib: int) -> Any:
    """Mount a tmpfs of `mib` MiB at `path` for the block; unmount after, whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        raise Skipped(f"mount -t tmpfs failed: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        for _ in range(10):
            if (
                subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode
                == 0
            ):
                break
            time.sleep(0.5)  # a process may still be closing files: bounded retry
        else:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def disk_full_unavailable() -> str | None:
    """Why the disk-full scenario cannot run here, or None."""
    if os.geteuid() != 0:
        return f"needs root to mount a tmpfs as the data dir (running as uid {os.geteuid()})"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount command"
    return None


async def run_once(scenario: str, number: int, settings: Settings, work: Path) -> dict[str, Any]:
    """One run of one scenario on a fresh node; the checker's verdict and what was seen."""
    await asyncio.to_thread((work / "logs").mkdir, parents=True)
    data_dir = work / "data"
    with contextlib.ExitStack() as stack:
        if scenario == "disk-full":
            stack.enter_context(tmpfs(data_dir, settings.tmpfs_mib))
        return await _run_on(scenario, number, settings, work, data_dir)


async def _run_on(
    scenario: str, number: int, settings: Settings, work: Path, data_dir: Path
) -> dict[str, Any]:
    run = RunLog(scenario)
    config = node_config(work / "node.toml", data_dir, free_port())
    store = data_dir / "kaya.db"
    sup = Supervisor(config, work / "logs", run, start_timeout=max(30.0, settings.recover * 2))
    world = World()
    stop = asyncio.Event()
    done = asyncio.Event()
    conns: list[NATS] = []
    tasks: list[asyncio.Task[None]] = []
    result: dict[str, Any] = {"scenario": scenario, "run": number}
    try:
        await sup.start()
        url = sup.url
        probe_nc = await connect(url, "chaos-probe")
        conns.append(probe_nc)
        probe = Probe(probe_nc)
        faults = Faults(
            scenario, sup, probe, settings, data_dir if scenario == "disk-full" else None
        )
        watcher = asyncio.create_task(sup.watch(done))
        clients = []
        for k in range(settings.clients):
            nc = await connect(url, f"chaos-client-{k}")
            conns.append(nc)
            clients.append(Client(k, nc, world, settings, stop))
        tasks = [asyncio.create_task(c.run()) for c in clients]

        # Faults spread over the workload, each after the previous one has recovered.
        begin = time.monotonic()
        for i in range(settings.faults):
            due = begin + settings.duration * (i + 1) / (settings.faults + 1)
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # the schedule
            run.faults.append(await faults.inject(i + 1))
        end = max(begin + settings.duration, time.monotonic() + settings.tail)
        await asyncio.sleep(max(0.0, end - time.monotonic()))  # the workload's length
        stop.set()
        _, late = await asyncio.wait(tasks, timeout=settings.command_deadline * 2 + 10)
        for task in late:
            task.cancel()
        for sent in world.sent:
            if sent.status == "pending":
                sent.status = "unresolved"

        # Commands with no final reply: send them again, same id, until answered.
        unresolved = [s for s in world.sent if s.status == "unresolved"]
        for sent in unresolved:
            sent.late = True
        deadline = time.monotonic() + settings.settle
        for i in range(0, len(unresolved), CHUNK):
            await asyncio.gather(
                *(
                    deliver(probe_nc, s, settings.request_timeout, deadline)
                    for s in unresolved[i : i + CHUNK]
                )
            )
        result["resent after the workload"] = len(unresolved)
        result["still unresolved"] = sum(s.status == "unresolved" for s in world.sent)
        waiting = await wait_transfers(probe_nc, world, settings.settle)
        result["transfers unfinished at the deadline"] = waiting
        result["catch-up"] = await wait_caught_up(probe_nc, store, settings.settle)
        done.set()
        await watcher
        recording = await capture(probe_nc, world, store, settings)
    finally:
        stop.set()
        done.set()
        for task in tasks:
            task.cancel()
        for nc in conns:
            with contextlib.suppress(Exception):
                await nc.close()
        code = await sup.shutdown()
    if code is not None and code != 0:
        run.incident(f"node exited with {code} on SIGTERM")
    recording["commands"] = [s.as_json() for s in world.sent]
    recording["replay"] = await asyncio.to_thread(replay_dry_run, data_dir)
    report = await asyncio.to_thread(chaos_check.check, recording, store)
    (work / "recording.json").write_text(json.dumps(recording, default=str) + "\n")
    if report.total or run.incidents:  # keep the evidence, out of a tmpfs about to go
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                shutil.copy2(f"{store}{suffix}", work / f"kaya.db{suffix}")
    transient: Counter[str] = Counter()
    for sent in world.sent:
        transient.update(sent.transient)
    result.update(
        {
            "seconds": run.at(),
            "faults": run.faults,
            "faults_injected": len(run.faults),
            "commands": dict(Counter(s.status for s in world.sent)),
            "acknowledged": sum(s.status == "ok" for s in world.sent),
            "refusals": dict(
                Counter(
                    str((s.reply or {}).get("error", {}).get("code"))
                    for s in world.sent
                    if s.status == "error"
                )
            ),
            "transient replies": dict(transient),
            "node starts": sup.starts,
            "node exits": run.exits,
            "start failures": run.start_failures,
            "incidents": run.incidents,
            "check": report.as_json(),
            "work_dir": str(work),
        }
    )
    print(report.render(limit=12), file=sys.stderr, flush=True)
    return result


# ---- the whole thing ---------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], skipped: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for scenario in SCENARIOS:
        mine = [r for r in runs if r["scenario"] == scenario]
        if not mine and scenario not in skipped:
            continue
        per_check: Counter[str] = Counter()
        for r in mine:
            per_check.update(r["check"]["violations_per_check"])
        rows.append(
            {
                "scenario": scenario,
                "runs": len(mine),
                "faults": sum(r["faults_injected"] for r in mine),
                "acknowledged": sum(r["acknowledged"] for r in mine),
                "node exits": sum(len(r["node exits"]) for r in mine),
                "incidents": sum(len(r["incidents"]) for r in mine),
                "violations": sum(r["check"]["violations_total"] for r in mine),
                "violations per check": {k: v for k, v in per_check.items() if v},
                "skipped": skipped.get(scenario),
            }
        )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    head = ("scenario", "runs", "faults injected", "commands acknowledged", "node exits")
    lines = [
        "| " + " | ".join((*head, "incidents", "violations")) + " |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row["skipped"]:
            lines.append(f"| {row['scenario']} | skipped: {row['skipped']} | | | | | |")
            continue
        checks = ", ".join(f"{k} {v}" for k, v in row["violations per check"].items())
        lines.append(
            f"| {row['scenario']} | {row['runs']} | {row['faults']} | {row['acknowledged']:,}"
            f" | {row['node exits']} | {row['incidents']} | {row['violations']}"
            f"{f' ({checks})' if checks else ''} |"
        )
    return "\n".join(lines)


class Skipped(BenchError):
    """A scenario this machine cannot run (no tmpfs for disk-full): reported, not failed."""


RunOnce = Callable[[str, int, Any, Path], Awaitable[dict[str, Any]]]


async def run_budgeted(
    name: str,
    scenarios: list[str],
    settings: Any,
    keep: bool,
    once: RunOnce,
    aborted: Callable[[str, int, str, Path], dict[str, Any]],
    *,
    errors: tuple[type[BaseException], ...] = (BenchError,),
    unavailable: Callable[[str], str | None] = lambda scenario: None,
) -> dict[str, Any]:
    """Every run of every scenario, each in its own work dir, within `settings.budget`.

    Shared by bench.chaos and bench.chaos_cluster. A run that would not fit the budget
    (judged by the longest so far) is skipped and listed; one that fails in `errors`
    becomes `aborted(...)` (an incident) and the next starts afresh; a run with
    nothing to report has its work dir removed unless `keep`: the evidence stays.
    """
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    over_budget: list[str] = []
    root = Path(tempfile.mkdtemp(prefix=f"kaya-{name}-"))
    budget_end = time.monotonic() + settings.budget
    longest = 0.0
    for scenario in scenarios:
        if why := unavailable(scenario):
            print(f"{scenario}: skipped: {why}", flush=True)
            skipped[scenario] = why
            continue
        for number in range(1, settings.runs + 1):
            if time.monotonic() + longest > budget_end:
                over_budget.append(f"{scenario} run {number}")
                print(f"{scenario} run {number}: skipped, over the {settings.budget:.0f} s budget")
                continue
            fw.say(f"{scenario} run {number}/{settings.runs} ...")
            work = root / f"{scenario}-{number}"
            began = time.monotonic()
            try:
                result = await once(
                    scenario, number, replace(settings, seed=settings.seed + number), work
                )
            except Skipped as exc:
                print(f"{scenario}: skipped: {exc}", flush=True)
                skipped[scenario] = str(exc)
                break
            except errors as exc:
                # The node could not be (re)started: an incident; the next run starts afresh.
                why = str(exc) or repr(exc)
                fw.say(f"  incident: run aborted: {why}")
                result = aborted(scenario, number, why, work)
            runs.append(result)
            longest = max(longest, time.monotonic() - began)
            if not keep and not result.get("incidents") and not result["check"]["violations_total"]:
                shutil.rmtree(work, ignore_errors=True)
                result["work_dir"] = None
    with contextlib.suppress(OSError):
        await asyncio.to_thread(root.rmdir)  # only if nothing was kept
    return {"runs": runs, "skipped": skipped, "over_budget": over_budget, "work_root": str(root)}


def fault_results(
    name: str,
    module: str,
    argv: list[str] | None,
    settings: dict[str, Any],
    rows: list[dict[str, Any]],
    outcome: dict[str, Any],
    started: Any,
    seconds: float,
) -> dict[str, Any]:
    """The result file of a fault run: what ran, on what, the summary rows, every run."""
    return {
        "benchmark": name,
        "command": fw.command_line(module, argv),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": utc_now().isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "machine": machine_info(),
        "versions": versions(fw.PACKAGES),
        "settings": settings,
        "summary": rows,
        **outcome,
    }


def runs_text(outcome: dict[str, Any], limit: int) -> str:
    """What a reader must see under the table: skipped runs, incidents, the first
    violations of each run, and where the evidence of a failed run was kept."""
    lines = [f"{name}: not run, over the time budget" for name in outcome["over_budget"]]
    for run in outcome["runs"]:
        where = f"{run['scenario']} run {run['run']}"
        lines += [f"{where}: incident: {text}" for text in run.get("incidents", [])]
        lines += [
            f"{where}: [{v['check']}] {v['message']}" for v in run["check"]["violations"][:limit]
        ]
        if run["work_dir"]:
            lines.append(f"{where}: evidence kept in {run['work_dir']}")
    return "\n".join(lines)


def aborted(scenario: str, number: int, why: str, work: Path) -> dict[str, Any]:
    """The result of a run that could not finish: counted as an incident, nothing checked."""
    return {
        "scenario": scenario,
        "run": number,
        "faults": [],
        "faults_injected": 0,
        "acknowledged": 0,
        "node exits": [],
        "incidents": [f"run aborted: {why[:500]}"],
        "check": chaos_check.Report().as_json(),
        "work_dir": str(work),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="The bank under faults on one node, judged by an independent checker.",
    )
    fw.add_options(
        parser,
        quick="1 run, 1 fault, 3 s per scenario",
        duration="seconds of workload per run (at least)",
        only=f"comma-separated scenarios (default all: {', '.join(SCENARIOS)})",
    )
    parser.add_argument("--runs", type=int, help="runs per scenario, each on a fresh node")
    parser.add_argument("--faults", type=int, help="faults per run")
    parser.add_argument("--clients", type=int, help="client tasks")
    parser.add_argument("--pause", type=float, help="seconds stopped, or the disk full")
    parser.add_argument("--seed", type=int, help="workload seed")
    parser.add_argument("--output", type=Path, help="write the JSON here instead of bench/results/")
    parser.add_argument("--keep", action="store_true", help="keep every run's work dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenarios = list(fw.parse_only(args.only, list(SCENARIOS), list(SCENARIOS)))
    settings = QUICK if args.quick else Settings()
    overrides = {
        name: getattr(args, name)
        for name in ("runs", "faults", "duration", "clients", "pause", "seed")
        if getattr(args, name) is not None
    }
    settings = replace(settings, **overrides)
    fw.exit_on_sigterm()
    started = utc_now()
    t0 = time.monotonic()
    outcome = asyncio.run(
        run_budgeted(
            "chaos",
            scenarios,
            settings,
            args.keep,
            run_once,
            aborted,
            unavailable=lambda s: disk_full_unavailable() if s == "disk-full" else None,
        )
    )
    rows = summarize(outcome["runs"], outcome["skipped"])
    chosen = {**asdict(settings), "quick": bool(args.quick), "scenarios": scenarios}
    results = fault_results(
        "chaos", "bench.chaos", argv, chosen, rows, outcome, started, time.monotonic() - t0
    )
    fw.finish(
        results,
        write=not args.no_write,
        render=lambda _: "\n".join(filter(None, [render(rows), runs_text(outcome, 5)])),
        output=args.output,
    )
    bad = sum(r["violations"] + r["incidents"] for r in rows)
    return 1 if bad or outcome["over_budget"] else 0


if __name__ == "__main__":
    sys.exit(main())
