"""Actors in-process: mailbox throughput against raw asyncio queues, memory per actor, passivation.

    python -m bench.actors [--quick] [--rounds N] [--sizes 1000,100000,1000000] [--no-write]

No NATS here: the `ActorRuntime` is driven directly, on uvloop through anyio as
`kaya run` does, with the reference `account` entity and a real SQLite event
store on a temp file. Three parts:

1. **Mailbox throughput** (in this process; odd rounds run `queue` first, even
   rounds last). K closed-loop senders (each sends, awaits its reply, sends
   again) to random ids among N entities, over a measured window after a warm-up:
   - `queue`: one `asyncio.Queue` and one consumer task per entity, answering a
     fixed reply: the least an actor-per-entity design can cost on this loop.
   - `query`: `runtime.query` to entities already active (opened first, not
     timed). An active actor answers a query from memory, so this is the
     runtime's mailbox, worker hand-off and reply encoding, with no store call.
   - `deposit NORMAL` / `deposit FULL`: `Deposit {amount: 1}` through
     `runtime.tell`; each turn appends to the store (group commit) and replies once
     durable. FULL is the node's default (an fsync per group commit: survives
     power loss); NORMAL (WAL) skips that fsync, so the gap between the two is the
     disk, and the gap between NORMAL and `query` is the store's CPU cost.
   All four use the same sender code and reply callback; ratios come from the
   same run.

2. **Memory and scaling** (a fresh child process per size, so RSS is clean).
   Each account stream first gets its `Opened` event by raw INSERTs into the
   store file (not timed; the version trigger is dropped for the load and put
   back by the store's own DDL when it opens). Every entity is then activated by
   a state query, as its first message in a node would: the actor is created,
   its stream read, `Opened` decoded and evolved into an open `AccountState`.
   Reading 1M streams through the store's reader connection runs at about 10k/s
   here (two aiosqlite round trips each: snapshot, then events), which alone
   would take the whole budget, so only the first `store_sample` activations
   read SQLite (their rate is reported); the rest read through a stand-in that
   returns the very same row from memory (same bytes, no SQLite). The actors
   and their states are identical either way; only where the row comes from
   differs. `max_active` is above the count, so all stay active. Then a fixed
   batch of queries and one of deposits (real appends, NORMAL) runs across them.

3. **Passivation** (a child process). `max_active` is capped and `idle_timeout`
   is short; many more distinct entities than the cap are touched by queries
   through the real store, while a sampler records RSS and
   `statistics().active`. The LRU cap and `passivate_idle` do the passivating,
   as in a node. Afterwards the benchmark waits for the idle ones to go.

A profile child (tracemalloc, `sys.getsizeof` of one actor's parts) explains
what each active actor costs.

Figures: `msg/s` = replies completed inside the window / window length;
`x queue` = scenario msg/s / queue msg/s of the same round; `CPU us/msg` = this
process's CPU time (all threads) over the window / replies, which holds up better
than msg/s when other processes take the cores (`others` says how much they
took); `B/actor` = (RSS after activation - RSS before) / entities, RSS from /proc
(VmRSS; at 1k it is dominated by page and arena granularity); `act/s` =
activations per second (first query of each entity, K at a time); `full GCs` =
generation-2 collections during activation and the longest, a pause the loop
feels. The machine is shared (2 noisy cores): medians over rounds with min-max,
and quote ratios rather than absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from bench import framework as fw
from bench.common import (
    BenchError,
    Child,
    cpu_seconds,
    fmt_spread,
    machine_busy_seconds,
    memory_kib,
    render_targets,
    spread,
    target,
    utc_now,
)
from kaya.actors.wire import Answer, ok_answer

TARGET_BYTES = 1.5e9
"""The issue's '1M active entities in under 1.5 GB RSS', read as 1.5e9 bytes (1430.5 MiB)."""
TARGET_ENTITIES = 1_000_000
MAX_MESSAGES = 20_000_000
"""Hard cap on messages per measured window, beside its duration: no loop is unbounded."""
SAMPLE_INTERVAL = 0.05
MAX_SAMPLES = 4000
OK_PREFIX = b'{"ok":true'
QUEUE_REPLY = ok_answer(b'{"ok":true,"entity":"account","id":"x","version":1,"state":{}}')
PLATEAU_GOAL = 1.25
"""Passivation: RSS growth at the end may be at most this times the growth when the cap filled."""

_T = TypeVar("_T")
ReplyFn = Callable[[Answer], Awaitable[None]]
Submit = Callable[[int, ReplyFn], None]
"""Sends message number `i` (an entity index) with a reply callback, without waiting."""


# ---- plumbing ------------------------------------------------------------------------------


def run_async(fn: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> _T:
    """anyio on uvloop, as `kaya run` runs the node (app/cli/node.py)."""
    import anyio

    return anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": True})


def rss_kib() -> int:
    return memory_kib(os.getpid()).get("rss_kib", 0)


def peak_rss_kib() -> int:
    return memory_kib(os.getpid()).get("peak_rss_kib", 0)


def account_id(index: int) -> str:
    return f"acc-{index}"


def opened_data(index: int) -> bytes:
    """The `Opened` event body a node writes for `Open {owner: owner-i, currency: EUR}`."""
    return b'{"type":"Opened","owner":"owner-%d","currency":"EUR","kind":"personal"}' % index


def prefill_accounts(path: Path, count: int) -> dict[str, Any]:
    """Give accounts 0..count-1 their `Opened` event by raw INSERTs: not what is measured.

    The version trigger checks each row against its stream's MAX(version); every
    stream here gets exactly version 1, so it is dropped for the load and the
    store's DDL (CREATE TRIGGER IF NOT EXISTS) puts it back when the store opens.
    """
    from examples.bank.account import Opened
    from kaya.store.schema import DDL

    t0 = time.monotonic()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(DDL)
        conn.execute("DROP TRIGGER events_next_version")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO events (position, event_id, entity, entity_id, version, type,"
            " schema_version, data, recorded_at) VALUES (?, ?, 'account', ?, 1, 'Opened', ?, ?, 0)",
            (
                (i + 1, f"{i:032x}", account_id(i), Opened.schema_version, opened_data(i))
                for i in range(count)
            ),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return {"streams": count, "seconds": round(time.monotonic() - t0, 3)}


class ReadsFromMemory:
    """The store as the runtime sees it, with stream reads answered from memory when `on`.

    Answers exactly what the prefilled file holds (no snapshot; one `Opened` row at
    version 1), so the actors and states built are the same as through SQLite;
    appends and idempotency look-ups still go to the real store.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.on = False

    @property
    def stages(self) -> Any:
        """The real store's stage timings: the runtime observes its turns there."""
        return self.store.stages

    async def load_snapshot(self, entity: str, entity_id: str) -> Any:
        if self.on:
            return None
        return await self.store.load_snapshot(entity, entity_id)

    async def read_stream(self, entity: str, entity_id: str, after_version: int = 0) -> list[Any]:
        if not self.on:
            return cast(list[Any], await self.store.read_stream(entity, entity_id, after_version))
        from kaya.store.records import StoredEvent

        if after_version >= 1:
            return []
        i = int(entity_id.removeprefix("acc-"))
        row = (i + 1, f"{i:032x}", entity, entity_id, 1, "Opened", 2, opened_data(i), 0.0)
        return [StoredEvent(*row, None, None)]

    async def find_replies(self, entity: str, entity_id: str, command_ids: Iterable[str]) -> Any:
        return await self.store.find_replies(entity, entity_id, command_ids)

    async def append(self, append: Any) -> None:
        await self.store.append(append)


class FullCollections:
    """Times generation-2 collections (gc.callbacks): each walks every tracked object.

    With a million actors that is several million objects (actor, deque, tuple,
    state, ...), so a full collection is a pause the event loop feels.
    """

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.longest = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.count += 1
        self.seconds += took
        self.longest = max(self.longest, took)

    def figures(self) -> dict[str, float]:
        return {
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "longest_ms": round(self.longest * 1000, 1),
        }


def _replier(future: asyncio.Future[bytes]) -> ReplyFn:
    async def reply(data: Answer) -> None:
        if not future.done():
            future.set_result(data.body)

    return reply


async def drive_each(
    submit: Submit, indices: Iterable[int], senders: int, timeout: float
) -> dict[str, Any]:
    """Send one message per index, `senders` at a time, each awaiting its reply: count, rate."""
    import anyio

    loop = asyncio.get_running_loop()
    todo = iter(indices)
    tally = {"ok": 0, "errors": 0}
    examples: list[str] = []

    async def sender() -> None:
        for i in todo:
            future: asyncio.Future[bytes] = loop.create_future()
            submit(i, _replier(future))
            body = await future
            if body.startswith(OK_PREFIX):
                tally["ok"] += 1
            else:
                tally["errors"] += 1
                if len(examples) < 3:
                    examples.append(body[:200].decode(errors="replace"))

    t0 = time.perf_counter()
    with anyio.fail_after(timeout):
        await asyncio.gather(*(sender() for _ in range(senders)))
    seconds = time.perf_counter() - t0
    done = tally["ok"] + tally["errors"]
    return {
        **tally,
        "seconds": round(seconds, 3),
        "per_s": done / seconds if seconds > 0 else math.nan,
        "error_examples": examples,
    }


async def drive_window(
    submit: Submit, entities: int, senders: int, warmup: float, duration: float, seed: int
) -> dict[str, Any]:
    """Closed loop to random entities; count replies completed inside [warm-up, +duration]."""
    import anyio

    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration
    tally = {"ok": 0, "errors": 0, "sent": 0}
    examples: list[str] = []

    async def sender(k: int) -> None:
        pick = random.Random(seed * 100_003 + k).randrange
        while tally["sent"] < MAX_MESSAGES and loop.time() < end:
            future: asyncio.Future[bytes] = loop.create_future()
            tally["sent"] += 1
            submit(pick(entities), _replier(future))
            body = await future
            if start <= loop.time() <= end:
                if body.startswith(OK_PREFIX):
                    tally["ok"] += 1
                else:
                    tally["errors"] += 1
                    if len(examples) < 3:
                        examples.append(body[:200].decode(errors="replace"))

    async def cpu_marks() -> tuple[tuple[float, ...], tuple[float, ...]]:
        await asyncio.sleep(max(0.0, start - loop.time()))
        a = _cpu_now()
        await asyncio.sleep(max(0.0, end - loop.time()))
        return a, _cpu_now()

    with anyio.fail_after(warmup + duration + 30):
        marks, *_ = await asyncio.gather(cpu_marks(), *(sender(k) for k in range(senders)))
    (p0, m0, b0), (p1, m1, b1) = marks
    ok = tally["ok"]
    return {
        "ok": ok,
        "errors": tally["errors"],
        "throughput": ok / duration,
        "cpu_process": round((p1 - p0) / duration, 3),
        "cpu_loop": round((m1 - m0) / duration, 3),
        "cpu_others": round(max(0.0, (b1 - b0) - (p1 - p0)) / duration, 3),
        "cpu_us_per_msg": (p1 - p0) * 1e6 / ok if ok else math.nan,
        "error_examples": examples,
    }


def _cpu_now() -> tuple[float, float, float]:
    """This process's CPU, its main thread's (the loop), and the whole machine's busy time.

    On 2 shared cores the machine's busy time minus ours is what other processes
    took during the window: the noise the figures carry.
    """
    return (
        time.process_time(),
        cpu_seconds(os.getpid(), main_thread=True) or 0.0,
        machine_busy_seconds() or 0.0,
    )


# ---- part 1: mailbox throughput (in this process) ------------------------------------------


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    accounts: int
    """Entities the throughput scenarios spread their messages over."""
    senders: int
    """Concurrent closed-loop senders everywhere (activations included)."""
    warmup: float
    duration: float
    sizes: tuple[int, ...]
    """Entities activated per scaling child."""
    store_sample: int
    """Activations per scaling child that read their stream through SQLite."""
    batch_queries: int
    batch_deposits: int
    profile_entities: int
    passivation_cap: int
    passivation_touches: int
    idle_timeout: float


async def queue_round(s: Settings, seed: int) -> dict[str, Any]:
    """Raw baseline: one asyncio.Queue and one consumer task per entity, a fixed reply."""
    import anyio

    queues: list[asyncio.Queue[ReplyFn]] = [asyncio.Queue() for _ in range(s.accounts)]

    async def consume(q: asyncio.Queue[ReplyFn]) -> None:
        while True:
            reply = await q.get()
            await reply(QUEUE_REPLY)

    def submit(i: int, reply: ReplyFn) -> None:
        queues[i].put_nowait(reply)

    async with anyio.create_task_group() as tg:
        for q in queues:
            tg.start_soon(consume, q)
        result = await drive_window(submit, s.accounts, s.senders, s.warmup, s.duration, seed)
        tg.cancel_scope.cancel()
    return result


async def runtime_rounds(s: Settings, seed: int, synchronous: str, workdir: Path) -> dict[str, Any]:
    """A fresh store and runtime: open the accounts, then (NORMAL only) queries, then deposits."""
    import anyio

    from examples.bank.account import Account, Deposit, Open
    from kaya.actors import ActorRuntime, RuntimeSettings
    from kaya.store import open_event_store

    account = Account()
    deposit = Deposit(amount=1)
    ids = [account_id(i) for i in range(s.accounts)]
    path = workdir / f"throughput-{synchronous.lower()}-{seed}.db"
    out: dict[str, Any] = {}
    async with open_event_store(path, synchronous=synchronous) as store:  # type: ignore[arg-type]
        runtime = ActorRuntime(store, RuntimeSettings(max_active=s.accounts * 2 + 1000))
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)

            def open_one(i: int, reply: ReplyFn) -> None:
                runtime.tell(account, ids[i], Open(owner=f"owner-{i}", currency="EUR"), reply)

            opened = await drive_each(open_one, range(s.accounts), s.senders, 60)
            if opened["errors"]:
                raise BenchError(f"opening accounts failed: {opened['error_examples']}")

            if synchronous == "NORMAL":

                def query(i: int, reply: ReplyFn) -> None:
                    runtime.query(account, ids[i], reply)

                out["query"] = await drive_window(
                    query, s.accounts, s.senders, s.warmup, s.duration, seed
                )

            def tell(i: int, reply: ReplyFn) -> None:
                runtime.tell(account, ids[i], deposit, reply)

            before = store.statistics()
            result = await drive_window(tell, s.accounts, s.senders, s.warmup, s.duration, seed)
            after = store.statistics()
            batches = after.batches - before.batches
            result["appends_per_commit"] = round(
                (after.appends - before.appends) / batches if batches else math.nan, 1
            )
            out[f"deposit_{synchronous.lower()}"] = result
            tg.cancel_scope.cancel()
    return out


def throughput_round(s: Settings, number: int, workdir: Path) -> dict[str, Any]:
    """One round of all four scenarios; ratios to `queue` of this same round.

    Odd rounds run queue first, even rounds last, so drift within a round does not
    always favour the same side.
    """
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("queue", lambda: {"queue": run_async(queue_round, s, number)}),
        ("normal", lambda: run_async(runtime_rounds, s, number, "NORMAL", workdir)),
        ("full", lambda: run_async(runtime_rounds, s, number, "FULL", workdir)),
    ]
    if number % 2 == 0:
        steps.reverse()
    found: dict[str, Any] = {}
    for _, step in steps:
        found.update(step())
    order = ("queue", "query", "deposit_normal", "deposit_full")
    scenarios = {name: found[name] for name in order}
    base = scenarios["queue"]
    for result in scenarios.values():
        result["x_queue"] = result["throughput"] / base["throughput"]
        result["x_queue_cpu"] = result["cpu_us_per_msg"] / base["cpu_us_per_msg"]
    return {"round": number, "order": [name for name, _ in steps], "scenarios": scenarios}


# ---- part 2: scaling (one child per size) ----------------------------------------------------


async def scale_child(p: dict[str, Any]) -> dict[str, Any]:
    """Activate `entities` accounts, keep them all active, measure RSS and rates."""
    import anyio

    from examples.bank.account import Account, Deposit
    from kaya.actors import ActorRuntime, RuntimeSettings
    from kaya.store import EventStore, open_event_store

    n, senders = int(p["entities"]), int(p["senders"])
    sample = min(int(p["store_sample"]), n)
    out: dict[str, Any] = {"entities": n, "store_sample": sample}
    with tempfile.TemporaryDirectory(prefix="kaya-bench-actors-") as tmp:
        path = Path(tmp) / "store.db"
        out["prefill"] = prefill_accounts(path, n)
        account, deposit = Account(), Deposit(amount=1)
        async with open_event_store(path, synchronous="NORMAL") as store:
            reads = ReadsFromMemory(store)
            runtime = ActorRuntime(
                cast(EventStore, reads),
                RuntimeSettings(max_active=n + 10 * senders + 1000, idle_timeout=1e9),
            )
            async with anyio.create_task_group() as tg:
                await tg.start(runtime.run)

                def query(i: int, reply: ReplyFn) -> None:
                    runtime.query(account, account_id(i), reply)

                gc.collect()
                rss0 = rss_kib()
                timeout = 60 + n / 2000
                collections = FullCollections()
                gc.callbacks.append(collections)
                try:
                    via_store = await drive_each(query, range(sample), senders, timeout)
                    reads.on = True
                    from_memory = await drive_each(query, range(sample, n), senders, timeout)
                finally:
                    gc.callbacks.remove(collections)
                rss1 = rss_kib()
                stats = runtime.statistics()
                if stats.active != n or stats.activations != n:
                    raise BenchError(f"{stats.active} active, {stats.activations} activated of {n}")
                errors = via_store["errors"] + from_memory["errors"]
                if errors:
                    raise BenchError(f"{errors} activations failed: {via_store['error_examples']}")
                seconds = via_store["seconds"] + from_memory["seconds"]
                rng = random.Random(n)
                queries = await drive_each(
                    query, [rng.randrange(n) for _ in range(int(p["queries"]))], senders, timeout
                )

                def tell(i: int, reply: ReplyFn) -> None:
                    runtime.tell(account, account_id(i), deposit, reply)

                deposits = await drive_each(
                    tell, [rng.randrange(n) for _ in range(int(p["deposits"]))], senders, timeout
                )
                rss2 = rss_kib()
                tg.cancel_scope.cancel()
    out.update(
        {
            "rss_before_mib": rss0 / 1024,
            "rss_after_mib": rss1 / 1024,
            "rss_after_batches_mib": rss2 / 1024,
            "peak_rss_mib": peak_rss_kib() / 1024,
            "bytes_per_actor": (rss1 - rss0) * 1024 / n,
            "activation": {
                "all_per_s": n / seconds if seconds > 0 else math.nan,
                "seconds": round(seconds, 3),
                "via_store_per_s": via_store["per_s"],
                "from_memory_per_s": from_memory["per_s"] if n > sample else math.nan,
                "full_gc": collections.figures(),
            },
            "queries": {k: queries[k] for k in ("ok", "errors", "seconds", "per_s")},
            "deposits": {k: deposits[k] for k in ("ok", "errors", "seconds", "per_s")},
        }
    )
    return out


# ---- profile child: what one active actor costs ----------------------------------------------


async def profile_child(p: dict[str, Any]) -> dict[str, Any]:
    """tracemalloc over activation (top allocation sites) and sizeof of one actor's parts."""
    import anyio

    from examples.bank.account import Account
    from kaya.actors import ActorRuntime, RuntimeSettings
    from kaya.store import EventStore, open_event_store

    n, senders = int(p["entities"]), int(p["senders"])
    account = Account()
    with tempfile.TemporaryDirectory(prefix="kaya-bench-actors-") as tmp:
        async with open_event_store(Path(tmp) / "store.db", synchronous="NORMAL") as store:
            reads = ReadsFromMemory(store)
            reads.on = True
            runtime = ActorRuntime(
                cast(EventStore, reads),
                RuntimeSettings(max_active=n + 10 * senders + 1000, idle_timeout=1e9),
            )
            async with anyio.create_task_group() as tg:
                await tg.start(runtime.run)

                def query(i: int, reply: ReplyFn) -> None:
                    runtime.query(account, account_id(i), reply)

                await drive_each(query, range(senders), senders, 30)  # warm every code path
                gc.collect()
                tracemalloc.start(1)
                before = tracemalloc.take_snapshot()
                traced0 = tracemalloc.get_traced_memory()[0]
                await drive_each(query, range(senders, n + senders), senders, 60 + n / 2000)
                gc.collect()
                traced1 = tracemalloc.get_traced_memory()[0]
                after = tracemalloc.take_snapshot()
                tracemalloc.stop()
                parts = actor_parts(runtime)
                tg.cancel_scope.cancel()
    top = []
    for stat in after.compare_to(before, "lineno")[:8]:
        frame = stat.traceback[0]
        top.append(
            {
                "where": f"{_short(frame.filename)}:{frame.lineno}",
                "bytes_per_actor": round(stat.size_diff / n, 1),
                "blocks_per_actor": round(stat.count_diff / n, 2),
            }
        )
    return {
        "entities": n,
        "traced_bytes_per_actor": round((traced1 - traced0) / n, 1),
        "top_allocations": top,
        "sizeof": parts,
    }


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/work/main/", "/lib/python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def actor_parts(runtime: Any) -> dict[str, Any]:
    """sys.getsizeof of what one active account actor holds, shared objects left out.

    Reads the runtime's private table on purpose: this is a profile of its layout.
    An object counts only if the next actor does not hold the very same one.
    """
    table = runtime._actors
    keys = list(table)[-2:]
    (key, actor), (_, other) = [(k, table[k]) for k in keys]
    state, other_state = actor.state, other.state
    parts: dict[str, int] = {
        "_Actor (9 slots)": sys.getsizeof(actor),
        "mailbox: empty deque": sys.getsizeof(actor.mailbox),
        "table key tuple (entity, id)": sys.getsizeof(key),
        "entity id str": sys.getsizeof(actor.entity_id),
        "table entry (dict slot + OrderedDict node)": round(sys.getsizeof(table) / len(table)),
        "last_used float": sys.getsizeof(actor.last_used),
        "state: AccountState": sys.getsizeof(state),
    }
    for field in ("owner", "currency", "status"):
        value = getattr(state, field)
        if value is not getattr(other_state, field):
            parts[f"state.{field} str"] = sys.getsizeof(value)
    return {"parts": parts, "total": sum(parts.values())}


# ---- part 3: passivation child -------------------------------------------------------------


async def passivation_child(p: dict[str, Any]) -> dict[str, Any]:
    """Touch many more entities than `max_active`; sample RSS and active actors over time."""
    import anyio

    from examples.bank.account import Account
    from kaya.actors import ActorRuntime, RuntimeSettings
    from kaya.store import open_event_store

    cap, touches, senders = int(p["cap"]), int(p["touches"]), int(p["senders"])
    idle = float(p["idle_timeout"])
    account = Account()
    samples: list[list[float]] = []  # [seconds, touched, rss MiB, active, passivations]
    with tempfile.TemporaryDirectory(prefix="kaya-bench-actors-") as tmp:
        path = Path(tmp) / "store.db"
        prefill = prefill_accounts(path, touches)
        async with open_event_store(path, synchronous="NORMAL") as store:
            runtime = ActorRuntime(store, RuntimeSettings(max_active=cap, idle_timeout=idle))
            async with anyio.create_task_group() as tg:
                await tg.start(runtime.run)
                touched = [0]
                t0 = time.monotonic()

                def sample() -> None:
                    st = runtime.statistics()
                    samples.append(
                        [
                            round(time.monotonic() - t0, 3),
                            touched[0],
                            rss_kib() / 1024,
                            st.active,
                            st.passivations,
                        ]
                    )

                async def sampler() -> None:
                    while len(samples) < MAX_SAMPLES:
                        sample()
                        await anyio.sleep(SAMPLE_INTERVAL)

                def query(i: int, reply: ReplyFn) -> None:
                    async def counted(data: bytes) -> None:
                        touched[0] += 1
                        await reply(data)

                    runtime.query(account, account_id(i), counted)

                gc.collect()
                rss0 = rss_kib() / 1024
                tg.start_soon(sampler)
                result = await drive_each(query, range(touches), senders, 60 + touches / 1000)
                sample()
                touched_s = time.monotonic() - t0
                rss_touched = rss_kib() / 1024
                # passivate_idle drains the rest: wait for it, bounded
                for _ in range(int((idle * 2 + 2) / SAMPLE_INTERVAL)):
                    if not runtime.statistics().active:
                        break
                    await anyio.sleep(SAMPLE_INTERVAL)
                sample()
                stats = runtime.statistics()
                tg.cancel_scope.cancel()
    if result["errors"]:
        raise BenchError(f"{result['errors']} touches failed: {result['error_examples']}")
    filled = next((x for x in samples if x[3] >= cap), None)
    during = [x for x in samples if x[0] <= touched_s]
    return {
        "cap": cap,
        "touches": touches,
        "idle_timeout": idle,
        "prefill": prefill,
        "touch_per_s": result["per_s"],
        "touch_seconds": round(touched_s, 3),
        "rss_before_mib": rss0,
        "rss_at_cap_mib": filled[2] if filled else math.nan,
        "touched_at_cap": filled[1] if filled else math.nan,
        "rss_after_touches_mib": rss_touched,
        "rss_max_mib": max(x[2] for x in during) if during else math.nan,
        "peak_rss_mib": peak_rss_kib() / 1024,
        "max_active_seen": max(int(x[3]) for x in samples),
        "active_at_end": stats.active,
        "activations": stats.activations,
        "passivations": stats.passivations,
        "samples": samples,
    }


def child_main(kind: str, params: dict[str, Any]) -> int:
    fn = {"scale": scale_child, "profile": profile_child, "passivation": passivation_child}[kind]
    result = run_async(fn, params)
    fw.emit_result(result)
    return 0


def run_child(kind: str, params: dict[str, Any], timeout: float, workdir: Path) -> dict[str, Any]:
    """`python -m bench.actors --child KIND`: a fresh process, stopped by PID in any case."""
    argv = [sys.executable, "-m", "bench.actors", "--child", kind, "--params", json.dumps(params)]
    name = f"actors-{kind}-{params.get('entities', params.get('touches', ''))}"
    child = Child(name, argv, workdir / f"{name}.log")
    try:
        child.wait_for_line(fw.RESULT_PREFIX, timeout=timeout)
        return fw.read_result(child, timeout=30)
    finally:
        child.stop()


# ---- the whole run ---------------------------------------------------------------------------


def settings_for(
    quick: bool,
    rounds: int | None = None,
    sizes: str | None = None,
    *,
    duration: float | None = None,
    warmup: float | None = None,
) -> Settings:
    return Settings(
        quick=quick,
        rounds=fw.pick(rounds, quick, 1, 5),
        accounts=1000,
        senders=100,
        warmup=fw.pick(warmup, quick, 0.2, 0.3),
        duration=fw.pick(duration, quick, 0.4, 1.0),
        sizes=tuple(int(x) for x in sizes.split(","))
        if sizes
        else ((1000, 10_000, 100_000) if quick else (1000, 100_000, 1_000_000)),
        store_sample=2000 if quick else 20_000,
        batch_queries=10_000 if quick else 50_000,
        batch_deposits=2000 if quick else 20_000,
        profile_entities=3000 if quick else 20_000,
        passivation_cap=5000 if quick else 10_000,
        passivation_touches=20_000 if quick else 100_000,
        idle_timeout=0.5 if quick else 1.0,
    )


def measure(s: Settings) -> dict[str, Any]:
    """All three parts and the profile; no file written."""
    packages = ("msgspec", "anyio", "uvloop", "aiosqlite")
    results = fw.new_results("actors", s, quick=s.quick, packages=packages)
    results["versions"]["sqlite"] = sqlite3.sqlite_version
    seconds: dict[str, float] = {}
    results["seconds"] = seconds
    with fw.scratch("actors") as workdir:
        t0 = time.monotonic()
        rounds: list[dict[str, Any]] = []
        for number in range(1, s.rounds + 1):
            fw.say(f"round {number}/{s.rounds}: queue, query, deposit NORMAL, deposit FULL ...")
            rounds.append(throughput_round(s, number, workdir))
        results["rounds"] = rounds
        seconds["throughput"] = round(time.monotonic() - t0, 1)
        scaling = []
        for n in s.sizes:
            fw.say(f"scaling: {n:,} entities in a fresh process ...")
            t0 = time.monotonic()
            params = {
                "entities": n,
                "senders": s.senders,
                "store_sample": s.store_sample,
                "queries": s.batch_queries,
                "deposits": s.batch_deposits,
            }
            scaling.append(run_child("scale", params, 120 + n / 5000, workdir))
            seconds[f"scale_{n}"] = round(time.monotonic() - t0, 1)
        results["scaling"] = scaling
        fw.say(f"profile: {s.profile_entities:,} entities under tracemalloc ...")
        t0 = time.monotonic()
        results["profile"] = run_child(
            "profile", {"entities": s.profile_entities, "senders": s.senders}, 120, workdir
        )
        seconds["profile"] = round(time.monotonic() - t0, 1)
        fw.say(f"passivation: {s.passivation_touches:,} entities, cap {s.passivation_cap:,} ...")
        t0 = time.monotonic()
        params = {
            "cap": s.passivation_cap,
            "touches": s.passivation_touches,
            "senders": s.senders,
            "idle_timeout": s.idle_timeout,
        }
        results["passivation"] = run_child(
            "passivation", params, 120 + s.passivation_touches / 1000, workdir
        )
        seconds["passivation"] = round(time.monotonic() - t0, 1)
    results["finished_at"] = utc_now().isoformat(timespec="seconds")
    results["summary"] = summarize(results)
    results["targets"] = targets(results)
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians (min-max) per scenario, ratios to `queue` per round, scaling fit, plateau."""
    rounds = results["rounds"]
    names = list(rounds[0]["scenarios"]) if rounds else []
    throughput = {
        name: {
            "throughput": spread([r["scenarios"][name]["throughput"] for r in rounds]),
            "x_queue": spread([r["scenarios"][name]["x_queue"] for r in rounds]),
            "cpu_us_per_msg": spread([r["scenarios"][name]["cpu_us_per_msg"] for r in rounds]),
            "x_queue_cpu": spread([r["scenarios"][name]["x_queue_cpu"] for r in rounds]),
            "cpu_loop": spread([r["scenarios"][name]["cpu_loop"] for r in rounds]),
            "cpu_others": spread([r["scenarios"][name]["cpu_others"] for r in rounds]),
            "errors": sum(r["scenarios"][name]["errors"] for r in rounds),
        }
        for name in names
    }
    scaling = results["scaling"]
    largest = max(scaling, key=lambda x: x["entities"]) if scaling else None
    projected = math.nan
    if largest is not None:
        projected = (
            largest["rss_before_mib"] + largest["bytes_per_actor"] * TARGET_ENTITIES / 2**20
            if largest["entities"] < TARGET_ENTITIES
            else largest["rss_after_mib"]
        )
    pas = results["passivation"]
    grown_at_cap = pas["rss_at_cap_mib"] - pas["rss_before_mib"]
    grown_at_end = pas["rss_max_mib"] - pas["rss_before_mib"]
    per_actor = largest["bytes_per_actor"] if largest else math.nan

    def per_round(a: str, b: str) -> dict[str, float]:
        return spread(
            [r["scenarios"][a]["throughput"] / r["scenarios"][b]["throughput"] for r in rounds]
        )

    ratios = {
        "query_over_queue": per_round("query", "queue"),
        "deposit_normal_over_query": per_round("deposit_normal", "query"),
        "deposit_full_over_normal": per_round("deposit_full", "deposit_normal"),
    }
    return {
        "throughput": throughput,
        "ratios": ratios,
        "largest_entities": largest["entities"] if largest else 0,
        "rss_at_1m_mib": projected,
        "rss_at_1m_measured": bool(largest and largest["entities"] >= TARGET_ENTITIES),
        "bytes_per_actor": per_actor,
        "passivation": {
            "rss_growth_at_cap_mib": grown_at_cap,
            "rss_growth_max_mib": grown_at_end,
            "plateau_ratio": grown_at_end / grown_at_cap if grown_at_cap > 0 else math.nan,
            "without_passivation_mib": pas["touches"] * per_actor / 2**20,
        },
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    summary = results["summary"]
    pas = results["passivation"]
    how = (
        "measured"
        if summary["rss_at_1m_measured"]
        else (f"projected from {summary['largest_entities']:,}")
    )
    return [
        target(
            f"RSS with 1M active entities, MiB ({how})",
            summary["rss_at_1m_mib"],
            1.0,
            TARGET_BYTES / 2**20,
            unit="MiB",
            lower_is_better=True,
        ),
        target(
            "passivation: most active actors seen / max_active",
            pas["max_active_seen"],
            pas["cap"],
            1.0,
            lower_is_better=True,
        ),
        target(
            "passivation: RSS growth, max / when the cap filled",
            summary["passivation"]["rss_growth_max_mib"],
            summary["passivation"]["rss_growth_at_cap_mib"],
            PLATEAU_GOAL,
            lower_is_better=True,
        ),
    ]


def draw_charts(results: dict[str, Any]) -> list[str]:
    """RSS and rates against entities (log x), and RSS while passivating."""
    from bench import charts

    m, v = results["machine"], results["versions"]
    note = (
        f"{m['nproc']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"git {v['git']}, {results['started_at']}"
    )
    scaling = results["scaling"]
    paths = [
        charts.line_chart(
            "actors-rss",
            "RSS with N account actors active (fresh process each)",
            "entities activated",
            "RSS, MiB",
            {
                "RSS after activation": [(x["entities"], x["rss_after_mib"]) for x in scaling],
                "RSS before activation": [(x["entities"], x["rss_before_mib"]) for x in scaling],
            },
            logx=True,
            note=note,
            hlines={"target: 1M in 1.5 GB": TARGET_BYTES / 2**20},
        ),
        charts.line_chart(
            "actors-rate",
            "Activations and messages per second with N actors active",
            "entities activated",
            "per second",
            {
                "activations (stream row from memory)": [
                    (x["entities"], x["activation"]["from_memory_per_s"])
                    for x in scaling
                    if not math.isnan(x["activation"]["from_memory_per_s"])
                ],
                "activations (stream read from SQLite)": [
                    (x["entities"], x["activation"]["via_store_per_s"]) for x in scaling
                ],
                "queries after activation": [
                    (x["entities"], x["queries"]["per_s"]) for x in scaling
                ],
                "deposits after activation (NORMAL)": [
                    (x["entities"], x["deposits"]["per_s"]) for x in scaling
                ],
            },
            logx=True,
            note=note,
        ),
    ]
    pas = results["passivation"]
    per_actor = results["summary"]["bytes_per_actor"]
    rss0 = pas["rss_before_mib"]
    samples = [x for x in pas["samples"] if x[1] <= pas["touches"]]
    paths.append(
        charts.line_chart(
            "actors-passivation",
            f"RSS while touching {pas['touches']:,} entities, max_active {pas['cap']:,}",
            "distinct entities touched",
            "RSS, MiB  /  active actors, thousands",
            {
                "RSS with passivation": [(x[1], x[2]) for x in samples],
                "active actors, thousands": [(x[1], x[3] / 1000) for x in samples],
                "projected without passivation": [
                    (0, rss0),
                    (pas["touches"], rss0 + pas["touches"] * per_actor / 2**20),
                ],
            },
            note=note,
        )
    )
    return [str(p) for p in paths if p is not None]


# ---- output ----------------------------------------------------------------------------------


def _num(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    summary = results["summary"]
    lines = [
        f"actors: {m['nproc']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"uvloop {v['uvloop']}, msgspec {v['msgspec']}, SQLite {v['sqlite']}, git {v['git']}",
        f"mailbox throughput: {s['accounts']:,} entities, {s['senders']} closed-loop senders, "
        f"{s['duration']:g} s measured after {s['warmup']:g} s, {s['rounds']} round(s)",
        "median (min-max) over rounds; x queue: per-round ratio to the raw queues; CPU: of this"
        " process per message; loop/others: cores used by the event loop / other processes",
        f"  {'scenario':<15}{'msg/s':>26}{'x queue':>20}{'CPU us/msg':>20}{'x queue':>20}"
        f"{'loop':>6}{'others':>7}",
    ]
    for name, x in summary["throughput"].items():
        lines.append(
            f"  {name:<15}{fmt_spread(x['throughput'], ',.0f'):>26}"
            f"{fmt_spread(x['x_queue'], '.2f'):>20}"
            f"{fmt_spread(x['cpu_us_per_msg'], '.1f'):>20}"
            f"{fmt_spread(x['x_queue_cpu'], '.2f'):>20}"
            f"{x['cpu_loop']['median']:>6.2f}{x['cpu_others']['median']:>7.2f}"
        )
    apc = [
        r["scenarios"][k].get("appends_per_commit")
        for r in results["rounds"]
        for k in ("deposit_normal", "deposit_full")
    ]
    lines.append(f"  appends per group commit (NORMAL, FULL by round): {apc}")
    ratios = summary["ratios"]
    lines.append(
        f"  per-round ratios: query/queue {fmt_spread(ratios['query_over_queue'], '.2f')}, "
        f"deposit NORMAL/query {fmt_spread(ratios['deposit_normal_over_query'], '.3f')}, "
        f"FULL/NORMAL {fmt_spread(ratios['deposit_full_over_normal'], '.2f')}"
    )
    errors = {k: x["errors"] for k, x in summary["throughput"].items() if x["errors"]}
    lines.append(f"  error replies: {errors or 'none'}")
    lines += [
        "",
        "scaling (fresh process per size; all entities stay active):",
        f"  {'entities':>10}{'RSS before':>11}{'after':>9}{'B/actor':>9}{'act/s':>9}"
        f"{'act/s sql':>10}{'act/s mem':>10}{'query/s':>9}{'deposit/s':>10}"
        f"{'full GCs (longest)':>20}",
    ]
    for x in results["scaling"]:
        a = x["activation"]
        lines.append(
            f"  {x['entities']:>10,}{x['rss_before_mib']:>11.1f}{x['rss_after_mib']:>9.1f}"
            f"{x['bytes_per_actor']:>9,.0f}{a['all_per_s']:>9,.0f}{a['via_store_per_s']:>10,.0f}"
            f"{_num(a['from_memory_per_s']):>10}{x['queries']['per_s']:>9,.0f}"
            f"{x['deposits']['per_s']:>10,.0f}"
            f"{a['full_gc']['count']:>10} ({a['full_gc']['longest_ms']:,.0f} ms)"
        )
    prof = results["profile"]
    lines += [
        "",
        f"profile ({prof['entities']:,} actors): tracemalloc "
        f"{prof['traced_bytes_per_actor']:,.0f} B/actor; top allocation sites, B/actor:",
    ]
    for t in prof["top_allocations"][:6]:
        lines.append(f"  {t['bytes_per_actor']:>8,.0f}  {t['where']}")
    parts = prof["sizeof"]
    lines.append(f"  sys.getsizeof of one actor's own objects: {parts['total']:,} B")
    lines += [f"    {b:>6,}  {name}" for name, b in parts["parts"].items()]
    pas, ps = results["passivation"], summary["passivation"]
    lines += [
        "",
        f"passivation: {pas['touches']:,} distinct entities touched through SQLite at "
        f"{pas['touch_per_s']:,.0f}/s, max_active {pas['cap']:,}, idle_timeout "
        f"{pas['idle_timeout']:g} s",
        f"  RSS before {pas['rss_before_mib']:.1f} MiB, when the cap filled "
        f"{pas['rss_at_cap_mib']:.1f}, max while touching {pas['rss_max_mib']:.1f}, after "
        f"{pas['rss_after_touches_mib']:.1f} (without passivation: +"
        f"{ps['without_passivation_mib']:.0f} MiB projected)",
        f"  most active seen {pas['max_active_seen']:,} (cap {pas['cap']:,}); active "
        f"{pas['active_at_end']:,} after {pas['idle_timeout']:g} s idle; "
        f"{pas['passivations']:,} passivations, {pas['activations']:,} activations",
        "",
        "seconds: " + ", ".join(f"{k} {v:g}" for k, v in results["seconds"].items()),
        "targets:",
        render_targets(results["targets"]),
    ]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.actors",
        description="Actor runtime in-process: mailboxes vs raw queues, memory, passivation.",
    )
    fw.add_options(
        parser,
        quick="sizes 1k-100k, 1 round (~15 s)",
        rounds="throughput rounds (default 5; quick 1)",
        duration="measured seconds per throughput window (default 1; quick 0.4)",
        warmup="unmeasured seconds before each window (default 0.3; quick 0.2)",
    )
    parser.add_argument(
        "--sizes", help="entities per scaling child, comma-separated (default 1000,100000,1000000)"
    )
    child = parser.add_argument_group("child process (internal)")
    child.add_argument(
        "--child", choices=["scale", "profile", "passivation"], help=argparse.SUPPRESS
    )
    child.add_argument("--params", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fw.exit_on_sigterm()
    if args.child:
        return child_main(args.child, json.loads(args.params or "{}"))
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    settings = settings_for(
        bool(args.quick), args.rounds, args.sizes, duration=args.duration, warmup=args.warmup
    )
    results = measure(settings)
    fw.finish(results, write=not args.no_write, render=render, chart=draw_charts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
