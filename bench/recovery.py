"""Recovery: how long an entity takes to come back, and a node, as history and store grow.

    python -m bench.recovery [--quick] [--rounds N] [--only activation|restart] [--no-write]

Two parts, each on temp dirs removed afterwards.

**Activation** (in this process, uvloop). One store holds, for each history length
N (10, 1k, 100k; quick 10, 1k, 10k), three account streams written through the
store API (`Append`s of up to 5,000 events, the account entity's own encoding:
`Opened` then N-1 `Deposited {amount: 1}`):

- `none`: N events, no snapshot (as with `snapshot_every = 0`);
- `snapshot`: N events and the snapshot the runtime would have written, at version
  `(N // snapshot_every) * snapshot_every` (default every 100), committed in the
  same append as the event that reached it, with the state evolved through every
  event and encoded as the runtime encodes it (`msgspec.json`, `state_schema`). For
  N < snapshot_every there is none, as in the runtime;
- `snapshot+tail`: the worst case, the most events a stream can have after its
  snapshot: N rounded down to a multiple of snapshot_every, plus snapshot_every - 1
  (99, 1,099, 100,099), so 99 events are replayed on top of the snapshot (or of
  nothing, for 99).

Each measurement opens the store afresh (SQLite's page cache is cold; the OS's is
warm: the file was just written) and a fresh `ActorRuntime`, and times the first
`ask(account, id, None)` (a state query): that is the activation (load snapshot,
read and decode the events after it, evolve) plus one query. A second ask on the
now active actor is timed too: the query alone. Every reply is checked (version N,
balance N-1). Repetitions rotate the order of the streams; medians with min-max.
The chart is activation ms vs history length (log-log): with snapshots it must be
flat.

**Restart** (real processes). For each store size S (0, 100k, 1M events; quick 0,
10k, 100k), a data dir is filled by raw sqlite3 inserts into the store's own schema
(store/schema.py, through bench.store's `open_raw`, the trigger included) with the
account entity's encoding: S/10 accounts of 10 events each (no snapshots: with
10 events per stream the runtime would have written none), recorded a day ago.
Then `kaya run --data-dir D --nats-port P --config C --log-level warning` is
started as bench.e2e starts nodes, timing spawn -> `ready` line and spawn -> first
successful reply to `kaya.qry.account.<id>` (a populated account, so the reply
includes its activation); then the node is stopped by PID (SIGTERM) and its
nats-server checked gone. Two cases:

- `relayed` (the main figure): the relay checkpoint is set to the last position,
  as after a clean shutdown of a node that had published everything (the events
  are older than `relay_rewind`, so nothing is republished). The embedded
  JetStream starts empty: the cost of nats-server recovering a large stream of its
  own is not in the figure, only what store size costs the node. Several restarts
  of the same data dir.
- `unrelayed`: the checkpoint at 0, as after an import or a lost broker: the relay
  starts publishing the whole store at start-up, beside the query. One start per
  size, after the relayed ones; its stop waits (up to the node's 10 s) for the
  relay to catch up, reported as `stop_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench import framework as fw
from bench.common import (
    BenchError,
    fmt_spread,
    render_targets,
    spread,
    target,
    utc_now,
)
from bench.store import INSERT_EVENT, EventIds, open_raw
from bench.targets import running

PARTS = ("activation", "restart")
VARIANTS = ("none", "snapshot", "snapshot+tail")
FLAT_GOAL = 1.5
"""With snapshots, activation at the longest history within 1.5x of the shortest's: flat,
allowing for noise on a figure of about a millisecond (without them it grows with N)."""
CHUNK = 5000
"""Events per Append when building histories."""
EVENTS_PER_ACCOUNT = 10
POPULATE_BATCH = 100_000
ASK_TIMEOUT = 120.0
NODE_READY_TIMEOUT = 120.0
QUERY_TIMEOUT = 60.0


class _Reply(msgspec.Struct):
    ok: bool = False
    version: int = -1
    state: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


_decode_reply = msgspec.json.Decoder(_Reply).decode


# ---- activation ------------------------------------------------------------------------------


def stream_id(length: int, variant: str) -> str:
    return f"hist-{length}-{variant.replace('+', '-')}"


def history(length: int, variant: str, every: int) -> tuple[int, int]:
    """(events in the stream, version of its snapshot or 0) for a nominal length and variant.

    `snapshot+tail` rounds the length to the most events after a snapshot (every - 1):
    10 -> 99 (no snapshot yet), 1,000 -> 1,099, 100,000 -> 100,099. Every stream of that
    variant then replays the same tail, so only the history's length differs.
    """
    if variant == "none" or every <= 0:
        return length, 0
    events = (length // every) * every + every - 1 if variant == "snapshot+tail" else length
    return events, (events // every) * every


async def write_history(
    store: Any, entity_id: str, events: int, snapshot_at: int, ids: EventIds
) -> None:
    """Opened + Deposited x (events - 1), in Appends that end where the snapshot goes."""
    from examples.bank.account import Account, Deposited, Opened
    from kaya.store import Append, NewEvent, Snapshot

    account = Account()
    encoder = msgspec.json.Encoder()
    opened = Opened(owner=f"owner-{entity_id}", currency="EUR")
    deposited = Deposited(amount=1)
    opened_data, deposited_data = account.encode_event(opened), account.encode_event(deposited)
    state = account.initial
    version = 0
    while version < events:
        end = min(events, version + CHUNK)
        if version < snapshot_at < end:
            end = snapshot_at
        batch = []
        for v in range(version + 1, end + 1):
            event = opened if v == 1 else deposited
            batch.append(
                NewEvent(
                    event_id=ids.next(),
                    type=type(event).__name__,
                    schema_version=event.schema_version,
                    data=opened_data if v == 1 else deposited_data,
                )
            )
            if snapshot_at:
                state = account.evolve(state, event)
        snapshot = None
        if end == snapshot_at:  # as the runtime does: with the append that reached it
            snapshot = Snapshot(
                version=end, state=encoder.encode(state), schema=account.state_schema
            )
        await store.append(Append("account", entity_id, version, batch, snapshot=snapshot))
        version = end


async def build_histories(path: Path, lengths: tuple[int, ...], every: int) -> dict[str, Any]:
    from kaya.store import open_event_store

    t0 = time.monotonic()
    ids = EventIds()
    async with open_event_store(path, synchronous="NORMAL") as store:
        for length in lengths:
            for variant in VARIANTS:
                events, snap = history(length, variant, every)
                await write_history(store, stream_id(length, variant), events, snap, ids)
        total = await store.last_position()
    return {
        "events": total,
        "seconds": round(time.monotonic() - t0, 3),
    }


async def activate_once(path: Path, entity_id: str, every: int) -> dict[str, Any]:
    """Fresh store connection, fresh runtime: time the first query (activation) and a second."""
    import anyio

    from examples.bank.account import Account
    from kaya.actors import ActorRuntime, RuntimeSettings
    from kaya.store import open_event_store

    account = Account()
    clock = time.perf_counter_ns
    with anyio.fail_after(ASK_TIMEOUT):
        async with open_event_store(path) as store:
            runtime = ActorRuntime(store, RuntimeSettings(snapshot_every=every))
            async with anyio.create_task_group() as tg:
                await tg.start(runtime.run)
                t0 = clock()
                first = await runtime.ask(account, entity_id, None)
                t1 = clock()
                await runtime.ask(account, entity_id, None)
                t2 = clock()
                tg.cancel_scope.cancel()
    reply = _decode_reply(first)
    return {
        "activation_ms": (t1 - t0) / 1e6,
        "warm_query_ms": (t2 - t1) / 1e6,
        "version": reply.version,
        "balance": (reply.state or {}).get("balance", -1),
        "ok": reply.ok,
    }


async def activation_runs(
    path: Path, lengths: tuple[int, ...], every: int, repetitions: int
) -> list[dict[str, Any]]:
    cases = [(n, v) for n in lengths for v in VARIANTS]
    await activate_once(
        path, stream_id(lengths[0], "none"), every
    )  # imports, code paths: unmeasured
    out: list[dict[str, Any]] = []
    for rep in range(repetitions):
        shift = rep % len(cases)
        for length, variant in cases[shift:] + cases[:shift]:
            events, snap = history(length, variant, every)
            result = await activate_once(path, stream_id(length, variant), every)
            result.update(
                repetition=rep + 1,
                length=length,
                variant=variant,
                events=events,
                snapshot_version=snap,
                replayed=events - snap,
            )
            result["verified"] = bool(
                result["ok"] and result["version"] == events and result["balance"] == events - 1
            )
            out.append(result)
    return out


def activation_part(settings: Settings) -> dict[str, Any]:
    import uvloop

    with fw.scratch("activation") as workdir:
        path = workdir / "kaya.db"
        fw.say(f"activation: building histories {settings.lengths} ...")
        built = uvloop.run(build_histories(path, settings.lengths, settings.snapshot_every))
        built["bytes"] = path.stat().st_size
        fw.say("activation: measuring ...")
        runs = uvloop.run(
            activation_runs(path, settings.lengths, settings.snapshot_every, settings.repetitions)
        )
    return {"store": built, "runs": runs}


# ---- restart -----------------------------------------------------------------------------------


def account_rows(events: int, when: float, ids: EventIds) -> Iterator[tuple[Any, ...]]:
    """Rows of `events` account events: EVENTS_PER_ACCOUNT per account, the domain's encoding."""
    from examples.bank.account import Account, Deposited, Opened

    account = Account()
    deposited = account.encode_event(Deposited(amount=1))
    for index in range(math.ceil(events / EVENTS_PER_ACCOUNT)):
        name = f"acc-{index}"
        count = min(EVENTS_PER_ACCOUNT, events - index * EVENTS_PER_ACCOUNT)
        opened = account.encode_event(Opened(owner=f"owner-{index}", currency="EUR"))
        yield (
            ids.next(),
            "account",
            name,
            1,
            "Opened",
            Opened.schema_version,
            opened,
            when,
            None,
            None,
        )
        for version in range(2, count + 1):
            yield (
                ids.next(),
                "account",
                name,
                version,
                "Deposited",
                1,
                deposited,
                when,
                None,
                None,
            )


def populate(path: Path, events: int) -> dict[str, Any]:
    """Raw inserts on the store's schema, committed, checkpointed: as a cleanly stopped node."""
    t0 = time.monotonic()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = open_raw(path, "OFF")
    try:
        # A fill, not a measurement: no journal and a big cache halve its time. WAL is set
        # back before closing, so the node finds the file as its own store leaves it.
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA cache_size = -262144")
        rows = account_rows(events, time.time() - 86_400, EventIds())
        while chunk := list(itertools.islice(rows, POPULATE_BATCH)):
            conn.execute("BEGIN")
            conn.executemany(INSERT_EVENT, chunk)
            conn.execute("COMMIT")
        last = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0]
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    if last != events:
        raise BenchError(f"populated {last} events, wanted {events}")
    return {
        "events": events,
        "accounts": math.ceil(events / EVENTS_PER_ACCOUNT),
        "seconds": round(time.monotonic() - t0, 3),
        "bytes": path.stat().st_size,
    }


def set_relay_checkpoint(path: Path, relayed: bool) -> int:
    """The relay's checkpoint at the last position (everything relayed) or removed (nothing)."""
    from kaya.app.events.relay import CHECKPOINT

    conn = open_raw(path, "FULL")
    try:
        last = int(conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0])
        if relayed:
            conn.execute(
                "INSERT INTO checkpoints (name, position) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                (CHECKPOINT, last),
            )
        else:
            conn.execute("DELETE FROM checkpoints WHERE name = ?", (CHECKPOINT,))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return last if relayed else 0


async def first_reply(url: str, subject: str, expect_version: int) -> dict[str, Any]:
    """Connect, then query until the first ok reply (bounded); read the relay's backlog once."""
    import nats
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    nc = await nats.connect(url, name="bench-recovery", allow_reconnect=False)
    try:
        deadline = time.monotonic() + QUERY_TIMEOUT
        attempts = 0
        while True:
            attempts += 1
            t0 = time.monotonic()
            try:
                msg = await nc.request(subject, b"", timeout=10)
            except (NoRespondersError, NatsTimeout):
                if time.monotonic() > deadline:
                    raise BenchError(f"no reply on {subject} in {QUERY_TIMEOUT}s") from None
                await asyncio.sleep(0.01)
                continue
            t1 = time.monotonic()
            reply = _decode_reply(msg.data)
            if reply.ok or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        health = msgspec.json.decode((await nc.request("kaya.health", b"", timeout=10)).data)
    finally:
        await nc.close()
    if not reply.ok or reply.version != expect_version:
        raise BenchError(f"{subject}: unexpected reply {msg.data[:200]!r}")
    return {
        "reply_at": t1,
        "query_ms": (t1 - t0) * 1e3,
        "attempts": attempts,
        "relay_backlog_at_reply": health.get("relay", {}).get("backlog"),
    }


def node_start(workdir: Path, data_dir: Path, events: int, label: str) -> dict[str, Any]:
    """Start `kaya run` on the data dir; time `ready` and the first query reply; stop it."""
    accounts = math.ceil(events / EVENTS_PER_ACCOUNT)
    index = accounts // 2
    expect = min(EVENTS_PER_ACCOUNT, events - index * EVENTS_PER_ACCOUNT) if events else 0
    out: dict[str, Any] = {"case": label, "events": events}
    with running("kaya", workdir, data_dir=data_dir, ready_timeout=NODE_READY_TIMEOUT) as node:
        out["ready_s"] = node.info["startup_s"]
        reply = asyncio.run(first_reply(node.url, f"kaya.qry.account.acc-{index}", expect))
        out["first_reply_s"] = reply.pop("reply_at") - node.spawned
        out.update(reply)
    for key in ("node_exit_code", "stop_s", "node_stderr_tail", "server_left_behind"):
        if key in node.info:
            out[key] = node.info[key]
    return out


def restart_part(settings: Settings) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    populated: list[dict[str, Any]] = []
    for size in settings.sizes:
        with fw.scratch("restart") as workdir:
            data_dir = workdir / "data"
            store = data_dir / "kaya.db"
            fw.say(f"restart: populating {size:,} events ...")
            populated.append(populate(store, size))
            set_relay_checkpoint(store, relayed=True)
            for rep in range(1, settings.restarts + 1):
                fw.say(f"restart: {size:,} events, relayed {rep} ...")
                runs.append({**node_start(workdir, data_dir, size, "relayed"), "repetition": rep})
            if settings.unrelayed:
                set_relay_checkpoint(store, relayed=False)
                fw.say(f"restart: {size:,} events, unrelayed ...")
                runs.append({**node_start(workdir, data_dir, size, "unrelayed"), "repetition": 1})
    return {"populated": populated, "runs": runs}


# ---- summary, targets, charts ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...]
    repetitions: int
    snapshot_every: int
    sizes: tuple[int, ...]
    restarts: int
    unrelayed: bool
    parts: tuple[str, ...]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "activation" in results:
        runs = results["activation"]["runs"]
        table: dict[str, dict[str, Any]] = {}
        for variant in VARIANTS:
            rows: dict[str, Any] = {}
            for length in sorted({r["length"] for r in runs}):
                rs = [r for r in runs if r["variant"] == variant and r["length"] == length]
                rows[str(length)] = {
                    "events": rs[0]["events"],
                    "replayed": rs[0]["replayed"],
                    "activation_ms": spread([r["activation_ms"] for r in rs]),
                    "warm_query_ms": spread([r["warm_query_ms"] for r in rs]),
                }
            first, last = rows[min(rows, key=int)], rows[max(rows, key=int)]
            table[variant] = {
                "by_length": rows,
                "longest_over_shortest": last["activation_ms"]["median"]
                / first["activation_ms"]["median"],
            }
        out["activation"] = {
            "variants": table,
            "verified": all(r["verified"] for r in runs),
        }
    if "restart" in results:
        runs = results["restart"]["runs"]
        cases: dict[str, Any] = {}
        for case in ("relayed", "unrelayed"):
            rows = {}
            for size in sorted({r["events"] for r in runs}):
                rs = [r for r in runs if r["case"] == case and r["events"] == size]
                if rs:
                    rows[str(size)] = {
                        "ready_s": spread([r["ready_s"] for r in rs]),
                        "first_reply_s": spread([r["first_reply_s"] for r in rs]),
                        "stop_s": spread([r["stop_s"] for r in rs]),
                        "restarts": len(rs),
                    }
            if rows:
                cases[case] = rows
        out["restart"] = {
            "cases": cases,
            "clean_exits": all(r["node_exit_code"] == 0 for r in runs),
            "servers_left_behind": sum(len(r["server_left_behind"]) for r in runs),
        }
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    activation = summary.get("activation")
    if activation:
        for variant in ("snapshot", "snapshot+tail"):
            rows = activation["variants"][variant]["by_length"]
            longest, shortest = rows[max(rows, key=int)], rows[min(rows, key=int)]
            out.append(
                target(
                    f"activation with {variant}: longest/shortest history",
                    longest["activation_ms"]["median"],
                    shortest["activation_ms"]["median"],
                    FLAT_GOAL,
                    unit="x time",
                    lower_is_better=True,
                )
            )
    return out


def chart(results: dict[str, Any]) -> list[str]:
    from bench.charts import line_chart

    summary, m, v = results["summary"], results["machine"], results["versions"]
    s = results["settings"]
    paths = []
    if "activation" in summary:
        labels = {
            "none": "no snapshots",
            "snapshot": "with snapshots",
            "snapshot+tail": f"with snapshots, {s['snapshot_every'] - 1} events after the last",
        }
        series = {
            labels[variant]: [
                (row["events"], row["activation_ms"]["median"]) for row in x["by_length"].values()
            ]
            for variant, x in summary["activation"]["variants"].items()
        }
        paths.append(
            line_chart(
                "recovery-activation",
                "Cold activation (first query) vs history length",
                "events in the entity's history",
                "ms (median)",
                series,
                logx=True,
                logy=True,
                note=f"{m['nproc']} cores, snapshot every {s['snapshot_every']},"
                f" {s['repetitions']} repetitions, git {v['git']}",
            )
        )
    if "restart" in summary:
        series = {}
        for case, rows in summary["restart"]["cases"].items():
            for figure, label in (("ready_s", "ready"), ("first_reply_s", "first query reply")):
                series[f"{label} ({case})"] = [
                    (int(size), row[figure]["median"]) for size, row in rows.items()
                ]
        paths.append(
            line_chart(
                "recovery-restart",
                "Node start to ready / first reply vs events in the store",
                "events in the store",
                "seconds since spawn (median)",
                series,
                note=f"{m['nproc']} cores, {EVENTS_PER_ACCOUNT} events per account, git {v['git']}",
                hlines={"0 s": 0.0},  # keeps the y axis from zero: a flat line must look flat
            )
        )
    return [str(p) for p in paths if p is not None]


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    summary = results["summary"]
    lines = [
        f"recovery: {m['nproc']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"SQLite {v['sqlite']}, {v['nats-server']}, git {v['git']}",
    ]
    if "activation" in summary:
        built = results["activation"]["store"]
        lines += [
            "",
            f"activation: first query on a fresh runtime and store connection, "
            f"{s['repetitions']} repetitions, snapshot every {s['snapshot_every']} "
            f"(store of {built['events']:,} events built in {built['seconds']:.1f} s)",
            f"  {'history':>8}  {'variant':<14}{'replayed':>9}  {'activation ms':<26}"
            f"{'warm query ms':<22}",
        ]
        for variant, x in summary["activation"]["variants"].items():
            for row in x["by_length"].values():
                activation = fmt_spread(row["activation_ms"], ".2f")
                warm = fmt_spread(row["warm_query_ms"], ".3f")
                lines.append(
                    f"  {row['events']:>8,}  {variant:<14}{row['replayed']:>9,}  "
                    f"{activation:<26}{warm:<22}"
                )
        flat = {k: x["longest_over_shortest"] for k, x in summary["activation"]["variants"].items()}
        lines.append(
            "  longest/shortest history: "
            + ", ".join(f"{k} x{val:.2f}" for k, val in flat.items())
            + f"; verified: {str(summary['activation']['verified']).lower()}"
        )
    if "restart" in summary:
        lines += [
            "",
            f"restart: `kaya run` on a populated data dir, {s['restarts']} restart(s) relayed, "
            f"{'1 unrelayed' if s['unrelayed'] else 'no unrelayed'} per size",
            "  populated: "
            + ", ".join(
                f"{p['events']:,} events in {p['seconds']:.1f} s ({p['bytes'] / 1e6:.0f} MB)"
                for p in results["restart"]["populated"]
            ),
            f"  {'events':>10}  {'case':<10}{'ready s':<20}{'first reply s':<20}{'stop s':<20}",
        ]
        for case, rows in summary["restart"]["cases"].items():
            for size, row in rows.items():
                lines.append(
                    f"  {int(size):>10,}  {case:<10}{fmt_spread(row['ready_s'], '.2f'):<20}"
                    f"{fmt_spread(row['first_reply_s'], '.2f'):<20}"
                    f"{fmt_spread(row['stop_s'], '.2f'):<20}"
                )
        r = summary["restart"]
        lines.append(
            f"  clean exits: {str(r['clean_exits']).lower()}; "
            f"servers left behind: {r['servers_left_behind']}"
        )
    if results.get("targets"):
        lines += ["", "targets:", render_targets(results["targets"])]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.recovery",
        description="Entity activation vs history length (with/without snapshots); node restart "
        "time vs store size.",
    )
    fw.add_options(
        parser,
        quick="histories up to 10k, stores up to 100k events",
        rounds="activation repetitions (default 7; quick 5); restarts 3 / 2",
        only="run one part: activation or restart",
    )
    parser.add_argument(
        "--no-unrelayed", action="store_true", help="skip the restarts with the relay at 0"
    )
    return parser


def _resolve(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    rounds = args.rounds
    if rounds is not None and rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    return Settings(
        lengths=(10, 1_000, 10_000) if quick else (10, 1_000, 100_000),
        repetitions=rounds or (5 if quick else 7),
        snapshot_every=100,
        sizes=(0, 10_000, 100_000) if quick else (0, 100_000, 1_000_000),
        restarts=min(rounds, 3) if rounds else (2 if quick else 3),
        unrelayed=not args.no_unrelayed,
        parts=fw.parse_only(args.only, PARTS, PARTS),
    )


def run(quick: bool, settings: Settings | None = None) -> dict[str, Any]:
    """Both parts (or `settings.parts`); the results dict, nothing printed or written."""
    settings = settings or _resolve(build_parser().parse_args(["--quick"] if quick else []))
    chosen = {**asdict(settings), "events_per_account": EVENTS_PER_ACCOUNT}
    results = fw.new_results("recovery", chosen, quick=quick)
    results["versions"]["sqlite"] = _sqlite_version()
    if "activation" in settings.parts:
        results["activation"] = activation_part(settings)
    if "restart" in settings.parts:
        results["restart"] = restart_part(settings)
    results["finished_at"] = utc_now().isoformat(timespec="seconds")
    results["summary"] = summarize(results)
    results["targets"] = targets(results["summary"])
    return results


def _sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _resolve(args)
    fw.exit_on_sigterm()
    results = run(bool(args.quick), settings)
    fw.finish(results, write=not args.no_write, render=render, chart=chart)
    summary = results["summary"]
    failed = summary.get("activation", {}).get("verified") is False or (
        "restart" in summary and not summary["restart"]["clean_exits"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
