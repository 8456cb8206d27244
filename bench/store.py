"""Event store alone: appends/s through Kaya's group commit vs raw sqlite3 batches, same run.

    python -m bench.store [--quick] [--appenders N] [--duration S] [--rounds N] [--no-write]

No NATS, no actors, no node: only the store, in this process. Two scenarios, per
`synchronous` mode (FULL, then NORMAL), alternated round by round (raw, kaya,
raw, kaya, ...), each on a fresh temp dir removed afterwards:

- `kaya`: `open_event_store` on uvloop, and N coroutines (default 100), each owning
  one stream `account/acc-<i>`, appending one event at a time and awaiting its
  durability before the next: what N busy actors ask of the store. Each append is
  an `Append` with one `NewEvent` (a `Deposited {amount: 1}` encoded by the account
  entity, an increasing 32-hex event id as the runtime makes them), no replies, no
  snapshot. The store's writer takes whatever is queued as one group commit.
- `raw`: the floor for the same rows. One thread, no event loop: a plain sqlite3
  connection with the store's pragmas (WAL, `wal_autocheckpoint = 10000`, the same
  `synchronous`) on a file made with the store's own DDL (store/schema.py: the same
  unique indexes and the version trigger, so every row costs the same to insert),
  then `BEGIN IMMEDIATE; executemany(INSERT ..., B rows); COMMIT` in a loop. The
  rows go round-robin to the same N streams with correct versions and are built in
  the loop (ids, tuples), so the raw side also pays for making its rows. B is the
  mean group-commit size Kaya reached in its latest measured window in this run
  (a calibration window before the first round): a like-for-like batch. What raw
  does not do: queue appends from many tasks and wake each caller, open a SAVEPOINT
  per batch (the store's, so that a conflicting append can be retried alone), use
  multi-row INSERTs (the store's choice, against the GIL), hop to a thread for the
  commit. Neither side changes any other SQLite default (`temp_store` included).

Each round runs a warm-up then a measured window. Throughput counts appends (rows)
whose commit completed inside the window. For kaya, latency is the time from
calling `append` to its return (queueing + insert + commit), over appends
completed in the window; commits/s and mean batch come from `statistics()` deltas
over the window. For raw, the transaction time per batch is reported.

The process's switch interval is set to 0.5 ms for the whole run, as `kaya run`
does (it lets the writer's thread hand the GIL back sooner); the raw side is
single-threaded, so it is unaffected.

The machine is shared and noisy: quote the kaya/raw ratio per mode from the same
run, not the absolute figures. Target (from the issue): kaya >= 0.9 x raw.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import secrets
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import framework as fw
from bench.common import (
    cpu_seconds,
    fmt_spread,
    percentile,
    render_targets,
    spread,
    target,
    utc_now,
)

MODES = ("FULL", "NORMAL")
GOAL = 0.9
"""Group commit >= 90% of raw batched sqlite3 (the issue's target)."""
ENTITY = "account"
MAX_APPENDS_PER_APPENDER = 5_000_000
"""Hard cap beside the window's end: no loop is unbounded."""
SWITCH_INTERVAL = 0.0005
"""What `kaya run` sets (app/cli/node.py)."""
INSERT_EVENT = (
    "INSERT INTO events (event_id, entity, entity_id, version, type, schema_version,"
    " data, recorded_at, command_id, traceparent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def deposited_event() -> tuple[str, int, bytes]:
    """Type, schema version and body of `Deposited {amount: 1}` as the account entity encodes it."""
    from examples.bank.account import Account, Deposited

    event = Deposited(amount=1)
    return type(event).__name__, event.schema_version, Account().encode_event(event)


class EventIds:
    """Event ids shaped like the runtime's (actors/ids.py `EventIds`): 32 hex, increasing.

    The shape matters to the store's cost: increasing ids grow the unique index at
    its right edge. Both scenarios use the same generator, so they pay the same.
    """

    def __init__(self) -> None:
        self._prefix = f"{time.time_ns() // 1_000_000:012x}{secrets.randbits(32):08x}"
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


# ---- kaya: group commit -------------------------------------------------------------------


async def kaya_window(
    path: Path, mode: str, appenders: int, warmup: float, duration: float
) -> dict[str, Any]:
    """N appenders on one store; figures over [warm-up end, warm-up end + duration]."""
    from kaya.store import Append, NewEvent, open_event_store

    kind, schema_version, data = deposited_event()
    ids = EventIds()
    latencies: list[int] = []
    clock = time.perf_counter_ns
    start_ns = clock() + int(warmup * 1e9)
    end_ns = start_ns + int(duration * 1e9)
    marks: dict[str, Any] = {}

    async with open_event_store(path, synchronous=mode) as store:  # type: ignore[arg-type]

        async def appender(index: int) -> None:
            entity_id = f"acc-{index}"
            append = store.append
            record = latencies.append
            version = 0
            while version < MAX_APPENDS_PER_APPENDER:
                t0 = clock()
                if t0 >= end_ns:
                    return
                event = NewEvent(
                    event_id=ids.next(), type=kind, schema_version=schema_version, data=data
                )
                await append(Append(ENTITY, entity_id, version, [event]))
                version += 1
                t1 = clock()
                if start_ns <= t1 <= end_ns:
                    record(t1 - t0)

        async def window() -> None:
            await asyncio.sleep(max(0.0, (start_ns - clock()) / 1e9))
            marks["stats0"], marks["cpu0"] = store.statistics(), _cpu()
            await asyncio.sleep(max(0.0, (end_ns - clock()) / 1e9))
            marks["stats1"], marks["cpu1"] = store.statistics(), _cpu()

        hard_limit = warmup + duration + 30
        await asyncio.wait_for(
            asyncio.gather(window(), *(appender(i) for i in range(appenders))), hard_limit
        )
        last = await store.last_position()

    s0, s1 = marks["stats0"], marks["stats1"]
    commits = s1.batches - s0.batches
    events = s1.events - s0.events
    latencies.sort()
    ms = [x / 1e6 for x in latencies]
    return {
        "appends": len(latencies),
        "appends_per_s": len(latencies) / duration,
        "commits_per_s": commits / duration,
        "mean_batch": events / commits if commits else math.nan,
        "latency_ms": {
            "p50": percentile(ms, 50),
            "p99": percentile(ms, 99),
            "max": ms[-1] if ms else math.nan,
            "mean": sum(ms) / len(ms) if ms else math.nan,
        },
        "cpu": _cpu_share(marks["cpu0"], marks["cpu1"], duration),
        "events_in_store": last,
    }


def _cpu() -> tuple[float, float]:
    """(process CPU s, main thread CPU s): the main thread runs the loop and the inserts."""
    pid = os.getpid()
    return time.process_time(), cpu_seconds(pid, main_thread=True) or 0.0


def _cpu_share(a: tuple[float, float], b: tuple[float, float], seconds: float) -> dict[str, float]:
    return {
        "process": round((b[0] - a[0]) / seconds, 3),
        "main_thread": round((b[1] - a[1]) / seconds, 3),
    }


# ---- raw: sqlite3 executemany in batches --------------------------------------------------


def open_raw(path: Path, mode: str) -> sqlite3.Connection:
    """A connection set up as the store's writer is (store/sql.py `open_writer`)."""
    from kaya.store.schema import DDL, SCHEMA_VERSION

    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 10000")
    conn.execute(f"PRAGMA synchronous = {mode}")
    conn.executescript(DDL)
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )
    return conn


def raw_window(
    path: Path, mode: str, streams: int, batch: int, warmup: float, duration: float
) -> dict[str, Any]:
    """BEGIN; executemany(batch); COMMIT until the window closes; rows round-robin over streams."""
    kind, schema_version, data = deposited_event()
    ids = EventIds()
    names = [f"acc-{i}" for i in range(streams)]
    versions_ = [0] * streams
    clock = time.perf_counter_ns
    start_ns = clock() + int(warmup * 1e9)
    end_ns = start_ns + int(duration * 1e9)
    hard_end = end_ns + int(30e9)
    tx_ns: list[int] = []
    rows_in_window = 0
    stream = 0
    cpu0: tuple[float, float] | None = None
    conn = open_raw(path, mode)
    try:
        while True:
            t0 = clock()
            if t0 >= end_ns or t0 >= hard_end:
                break
            if cpu0 is None and t0 >= start_ns:
                cpu0 = _cpu()
            now = time.time()
            rows = []
            for _ in range(batch):
                versions_[stream] += 1
                rows.append(
                    (
                        ids.next(),
                        ENTITY,
                        names[stream],
                        versions_[stream],
                        kind,
                        schema_version,
                        data,
                        now,
                        None,
                        None,
                    )
                )
                stream = (stream + 1) % streams
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT_EVENT, rows)
            conn.execute("COMMIT")
            t1 = clock()
            if start_ns <= t1 <= end_ns:
                rows_in_window += batch
                tx_ns.append(t1 - t0)
        cpu1 = _cpu()
        last = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0]
    finally:
        conn.close()
    tx_ns.sort()
    tx_ms = [x / 1e6 for x in tx_ns]
    return {
        "batch": batch,
        "appends": rows_in_window,
        "appends_per_s": rows_in_window / duration,
        "commits_per_s": len(tx_ns) / duration,
        "transaction_ms": {
            "p50": percentile(tx_ms, 50),
            "p99": percentile(tx_ms, 99),
            "mean": sum(tx_ms) / len(tx_ms) if tx_ms else math.nan,
        },
        "cpu": _cpu_share(cpu0 or cpu1, cpu1, duration),
        "events_in_store": int(last),
    }


# ---- rounds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    appenders: int
    duration: float
    warmup: float
    rounds: int
    calibration: float
    modes: tuple[str, ...]


def in_temp_dir(fn: Any, *args: Any) -> Any:
    """Run `fn(path, *args)` on a fresh store file in a temp dir that is removed afterwards."""
    with fw.scratch("store") as workdir:
        return fn(workdir / "kaya.db", *args)


def _kaya(path: Path, mode: str, s: Settings, warmup: float, duration: float) -> dict[str, Any]:
    import uvloop

    result: dict[str, Any] = uvloop.run(kaya_window(path, mode, s.appenders, warmup, duration))
    return result


def run_mode(settings: Settings, mode: str) -> list[dict[str, Any]]:
    """Calibrate the batch on kaya, then raw, kaya, raw, kaya ...: each raw at kaya's last batch."""
    rounds: list[dict[str, Any]] = []
    fw.say(f"{mode}: calibrating the batch size ...")
    calibration = in_temp_dir(_kaya, mode, settings, settings.calibration / 2, settings.calibration)
    batch = max(1, round(calibration["mean_batch"]))
    rounds.append({"mode": mode, "scenario": "kaya-calibration", "round": 0, **calibration})
    for number in range(1, settings.rounds + 1):
        fw.say(f"{mode} round {number}/{settings.rounds}: raw (batch {batch}), kaya ...")
        raw = in_temp_dir(
            raw_window, mode, settings.appenders, batch, settings.warmup, settings.duration
        )
        rounds.append({"mode": mode, "scenario": "raw", "round": number, **raw})
        kaya = in_temp_dir(_kaya, mode, settings, settings.warmup, settings.duration)
        rounds.append({"mode": mode, "scenario": "kaya", "round": number, **kaya})
        if not math.isnan(kaya["mean_batch"]):
            batch = max(1, round(kaya["mean_batch"]))
    return rounds


def summarize(rounds: list[dict[str, Any]], modes: tuple[str, ...]) -> dict[str, Any]:
    """Per mode: medians with min-max over rounds, and kaya/raw (medians, and per round)."""
    out: dict[str, Any] = {}
    for mode in modes:
        raw = [r for r in rounds if r["mode"] == mode and r["scenario"] == "raw"]
        kaya = [r for r in rounds if r["mode"] == mode and r["scenario"] == "kaya"]
        if not raw or not kaya:
            continue
        k_rate = spread([r["appends_per_s"] for r in kaya])
        r_rate = spread([r["appends_per_s"] for r in raw])
        out[mode] = {
            "raw": {
                "appends_per_s": r_rate,
                "batch": spread([r["batch"] for r in raw]),
                "transaction_ms": spread([r["transaction_ms"]["mean"] for r in raw]),
            },
            "kaya": {
                "appends_per_s": k_rate,
                "commits_per_s": spread([r["commits_per_s"] for r in kaya]),
                "mean_batch": spread([r["mean_batch"] for r in kaya]),
                "p50_ms": spread([r["latency_ms"]["p50"] for r in kaya]),
                "p99_ms": spread([r["latency_ms"]["p99"] for r in kaya]),
                "main_thread_cpu": spread([r["cpu"]["main_thread"] for r in kaya]),
            },
            "ratio": k_rate["median"] / r_rate["median"],
            "ratio_per_round": [
                k["appends_per_s"] / r["appends_per_s"] for r, k in zip(raw, kaya, strict=False)
            ],
        }
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        target(
            f"store group commit / raw executemany ({mode})",
            x["kaya"]["appends_per_s"]["median"],
            x["raw"]["appends_per_s"]["median"],
            GOAL,
            unit="x",
        )
        for mode, x in summary.items()
    ]


def chart(results: dict[str, Any]) -> list[str]:
    """Appends/s per scenario and mode: medians, min-max over rounds as error bars."""
    from bench.charts import bar_chart

    bars = {
        f"{scenario} {mode}": x[scenario]["appends_per_s"]
        for mode, x in results["summary"].items()
        for scenario in ("raw", "kaya")
    }
    m, v, s = results["machine"], results["versions"], results["settings"]
    path = bar_chart(
        "store-appends",
        "Event store appends/s: group commit (kaya) vs raw sqlite3 executemany, same batch",
        "appends/s (median, min-max over rounds)",
        bars,
        note=f"{m['nproc']} cores, {s['appenders']} appenders, {s['rounds']} rounds,"
        f" SQLite {v['sqlite']}, git {v['git']}",
    )
    return [str(path)] if path is not None else []


def _resolve(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    settings = Settings(
        appenders=args.appenders,
        duration=fw.pick(args.duration, quick, 1.5, 3.0),
        warmup=fw.pick(args.warmup, quick, 0.5, 1.0),
        rounds=fw.pick(args.rounds, quick, 1, 3),
        calibration=1.0 if quick else 2.0,
        modes=tuple(args.modes.split(",")) if args.modes else MODES,
    )
    if settings.appenders < 1 or settings.rounds < 1 or settings.duration <= 0:
        raise SystemExit("--appenders and --rounds must be at least 1, --duration positive")
    if any(m not in ("OFF", "NORMAL", "FULL", "EXTRA") for m in settings.modes):
        raise SystemExit("--modes: comma-separated of FULL, NORMAL, OFF, EXTRA")
    return settings


def run(quick: bool, settings: Settings | None = None) -> dict[str, Any]:
    """Every mode's rounds, in this process; the results dict, nothing printed or written."""
    settings = settings or _resolve(build_parser().parse_args(["--quick"] if quick else []))
    chosen = {**asdict(settings), "switch_interval": SWITCH_INTERVAL}
    results = fw.new_results("store", chosen, quick=quick, packages=("msgspec", "anyio", "uvloop"))
    results["versions"]["sqlite"] = sqlite3.sqlite_version
    results["rounds"] = []
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        for mode in settings.modes:
            results["rounds"] += run_mode(settings, mode)
    finally:
        sys.setswitchinterval(previous)
    results["finished_at"] = utc_now().isoformat(timespec="seconds")
    results["summary"] = summarize(results["rounds"], settings.modes)
    results["targets"] = targets(results["summary"])
    return results


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"store: {m['nproc']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"SQLite {v['sqlite']}, uvloop {v['uvloop']}, git {v['git']}",
        f"{s['appenders']} appenders (one stream each, one event per append), "
        f"{s['duration']:g} s measured after {s['warmup']:g} s warm-up, {s['rounds']} round(s)",
        "",
        f"{'mode':<7}{'round':<6}{'scenario':<17}{'appends/s':>10}{'commits/s':>10}"
        f"{'batch':>7}{'p50 ms':>8}{'p99 ms':>8}{'tx ms':>7}  cpu (process/main thread)",
    ]
    for r in results["rounds"]:
        raw = r["scenario"] == "raw"
        lat = r.get("latency_ms", {})
        lines.append(
            f"{r['mode']:<7}{r['round']:<6}{r['scenario']:<17}{r['appends_per_s']:>10,.0f}"
            f"{r['commits_per_s']:>10,.0f}"
            f"{(r['batch'] if raw else r['mean_batch']):>7.1f}"
            f"{lat.get('p50', math.nan):>8.2f}{lat.get('p99', math.nan):>8.2f}"
            f"{r['transaction_ms']['mean'] if raw else math.nan:>7.2f}"
            f"  {r['cpu']['process']:.2f}/{r['cpu']['main_thread']:.2f}"
        )
    lines += ["", "median (min-max) over rounds:"]
    for mode, x in results["summary"].items():
        k, raw = x["kaya"], x["raw"]
        per = x["ratio_per_round"]
        lines += [
            f"  {mode:<7} raw  {fmt_spread(raw['appends_per_s'], ',.0f')} appends/s "
            f"(batch {fmt_spread(raw['batch'], '.0f')}, "
            f"tx {fmt_spread(raw['transaction_ms'], '.2f')} ms)",
            f"  {'':<7} kaya {fmt_spread(k['appends_per_s'], ',.0f')} appends/s, "
            f"{fmt_spread(k['commits_per_s'], ',.0f')} commits/s, "
            f"batch {fmt_spread(k['mean_batch'], '.1f')}, "
            f"p50 {fmt_spread(k['p50_ms'], '.2f')} ms, p99 {fmt_spread(k['p99_ms'], '.2f')} ms",
            f"  {'':<7} kaya/raw {x['ratio']:.2f} (per round {min(per):.2f}-{max(per):.2f})",
        ]
    if results.get("targets"):
        lines += ["", "targets:", render_targets(results["targets"])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.store",
        description="Event store appends/s: Kaya's group commit vs raw sqlite3 batches, same run.",
    )
    fw.add_options(
        parser,
        quick="1 round of 1.5 s per mode",
        rounds="rounds per mode (default 3; quick 1)",
        duration="measured seconds (default 3; quick 1.5)",
        warmup="unmeasured seconds (default 1; quick 0.5)",
    )
    parser.add_argument("--appenders", type=int, default=100, help="concurrent appenders/streams")
    parser.add_argument("--modes", help="comma-separated synchronous modes (default FULL,NORMAL)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _resolve(args)
    fw.exit_on_sigterm()
    results = run(bool(args.quick), settings)
    fw.finish(results, write=not args.no_write, render=render, chart=chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
