"""Transfers benchmark: saga throughput and start-to-completion latency, beside deposits.

    python -m bench.transfers [--quick] [--accounts N] [--workers K] [--duration S] [--rounds N]

Each round starts a fresh `kaya run` node (embedded nats-server on a free port,
temp data dir), opens N accounts and funds each with `--initial` (not timed), then
runs two phases on the same node, in alternating order from round to round:

- `deposits`: the baseline. bench.e2e's own load generator, unchanged: closed-loop
  `Deposit {amount: 1}` to random accounts, `--inflight` requests in flight. This
  is the single-entity command path (one actor, one append per command).
- `transfers`: a load generator in its own process (`--generator`): K workers, each
  picks two distinct random accounts, sends `Start` to `kaya.cmd.transfer.<new id>`
  (the reply comes at once, status pending), then waits for that transfer's
  `Completed` or `Failed` event and only then starts the next one (closed loop).
  Completion is not polled: one ordered push consumer on KAYA_EVENTS,
  `kaya.evt.transfer.>` (deliver new, headers only), feeds every transfer event to
  the worker waiting on that id, keyed by the subject's last token.

Latency is completion-event arrival minus Start send time, so it includes the
relay hop (commit -> relay -> JetStream -> this consumer). The same subscription
gives a breakdown per transfer: Start reply, Started-event arrival (its lag behind
the reply is an estimate of the relay hop), Debited arrival, Credited arrival, terminal
arrival (a completed transfer settles its source's outgoing between the last two).

After each phase every account's balance is read on `kaya.qry.account.<id>` and
checked exactly: deposits add what was acknowledged, completed transfers move
money between their two accounts, failed ones none, and the sum of all balances
after the transfers equals the sum before them. At the end the sum must be
N x initial + acknowledged deposits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bench import e2e
from bench import framework as fw
from bench.common import (
    BenchError,
    Child,
    fmt_spread,
    spread,
)
from bench.e2e import (
    account_id,
    open_accounts,
    reply_code,
)
from bench.targets import Running, running

PHASES = ("deposits", "transfers")
EVENT_SUBJECTS = "kaya.evt.transfer.>"
TERMINAL = ("Completed", "Failed")
MAX_TRANSFERS = 10_000_000
"""Hard cap on transfers per generator run, beside the duration: no loop is unbounded."""
QUERY_CONCURRENCY = 100
RESOLVE_TIMEOUT = 30.0
"""Seconds the parent waits for a transfer the generator saw unfinished to end."""


def transfer_subject(transfer_id: str) -> str:
    return f"kaya.cmd.transfer.{transfer_id}"


# ---- the transfer load generator (its own process) --------------------------------------


@dataclass(frozen=True)
class GeneratorSettings:
    url: str
    accounts: int
    workers: int
    warmup: float
    duration: float
    timeout: float
    completion_timeout: float
    max_amount: int
    seed: int


@dataclass
class _Transfer:
    """One transfer in flight, and when each of its milestones reached this process."""

    source: int
    target: int
    amount: int
    sent_ns: int
    done: asyncio.Future[str]
    reply_ns: int = 0
    started_ns: int = 0
    debited_ns: int = 0
    credited_ns: int = 0
    done_ns: int = 0


@dataclass
class _Tally:
    in_window: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    latencies: list[int] = field(default_factory=list)
    reply: list[int] = field(default_factory=list)
    relay_lag: list[int] = field(default_factory=list)
    debit: list[int] = field(default_factory=list)
    credit: list[int] = field(default_factory=list)
    settle: list[int] = field(default_factory=list)


async def generate(settings: GeneratorSettings) -> dict[str, Any]:
    """Closed loop: each worker starts a transfer, waits for its terminal event, repeats.

    Only transfers whose terminal event arrived inside [warm-up end, warm-up end +
    duration] enter the figures; every outcome is counted, and the net money moved
    per account by completed transfers is returned for the parent's exact check.
    """
    import nats
    from nats.aio.msg import Msg
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import DeliverPolicy

    loop = asyncio.get_running_loop()
    clock = time.perf_counter_ns
    nc = await nats.connect(settings.url, name="bench-transfers", allow_reconnect=False)
    js = nc.jetstream()
    inflight: dict[str, _Transfer] = {}
    events_seen: Counter[str] = Counter()
    net = [0] * settings.accounts
    unfinished: list[list[Any]] = []  # [id, source, target, amount, why]
    tally = _Tally()
    started = 0

    async def on_event(msg: Msg) -> None:
        now = clock()
        kind = (msg.headers or {}).get("Kaya-Event-Type", "")
        events_seen[kind] += 1
        rec = inflight.get(msg.subject.rpartition(".")[2])
        if rec is None:
            return
        if kind == "Started":
            rec.started_ns = now
        elif kind == "Debited":
            rec.debited_ns = now
        elif kind == "Credited":
            rec.credited_ns = now
        elif kind in TERMINAL and not rec.done.done():
            rec.done_ns = now
            rec.done.set_result(kind)

    sub = await js.subscribe(
        EVENT_SUBJECTS,
        cb=on_event,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
        headers_only=True,
    )
    start_ns = clock() + int(settings.warmup * 1e9)
    end_ns = start_ns + int(settings.duration * 1e9)
    encode = msgspec.json.encode

    async def worker(k: int) -> None:
        nonlocal started
        rng = random.Random(settings.seed * 1_000_003 + k)
        n = settings.accounts
        seq = 0
        while started < MAX_TRANSFERS:
            t0 = clock()
            if t0 >= end_ns:
                return
            a = rng.randrange(n)
            b = rng.randrange(n - 1)
            b += b >= a
            amount = rng.randint(1, settings.max_amount)
            seq += 1
            started += 1
            tid = f"s{settings.seed}w{k}n{seq}"
            rec = _Transfer(a, b, amount, t0, loop.create_future())
            inflight[tid] = rec  # before sending: the terminal event may beat the reply
            body = encode(
                {
                    "type": "Start",
                    "source": account_id(a),
                    "target": account_id(b),
                    "amount": amount,
                }
            )
            try:
                msg = await nc.request(transfer_subject(tid), body, timeout=settings.timeout)
            except NatsTimeout:
                code = "client_timeout"  # unknown: it may still run; wait for its events
            except NoRespondersError:
                code = "no_responders"
            else:
                code = reply_code(msg.data)
                rec.reply_ns = clock()
            if code not in ("ok", "client_timeout"):  # refused: nothing was started
                del inflight[tid]
                tally.total[f"start_{code}"] += 1
                if start_ns <= clock() <= end_ns:
                    tally.in_window[f"start_{code}"] += 1
                continue
            try:
                outcome = await asyncio.wait_for(rec.done, settings.completion_timeout)
            except TimeoutError:
                outcome = "no_terminal_event"
                unfinished.append([tid, a, b, amount, code])
            del inflight[tid]
            tally.total[outcome] += 1
            if outcome == "Completed":
                net[a] -= amount
                net[b] += amount
            if outcome in TERMINAL and start_ns <= rec.done_ns <= end_ns:
                tally.in_window[outcome] += 1
                tally.latencies.append(rec.done_ns - t0)
                seen = rec.reply_ns and rec.started_ns and rec.debited_ns and rec.credited_ns
                if seen and outcome == "Completed":
                    tally.reply.append(rec.reply_ns - t0)
                    tally.relay_lag.append(rec.started_ns - rec.reply_ns)
                    tally.debit.append(rec.debited_ns - rec.started_ns)
                    tally.credit.append(rec.credited_ns - rec.debited_ns)
                    tally.settle.append(rec.done_ns - rec.credited_ns)

    try:
        hard_limit = (
            settings.warmup + settings.duration + settings.timeout + settings.completion_timeout
        ) + 10
        window = asyncio.ensure_future(fw.mark_window(start_ns, end_ns))
        workers = [worker(k) for k in range(settings.workers)]
        await asyncio.wait_for(asyncio.gather(window, *workers), timeout=hard_limit)
        cpu0, cpu1 = window.result()
    finally:
        try:
            await sub.unsubscribe()
        finally:
            await nc.close()

    completed = tally.in_window.get("Completed", 0)
    failed = tally.in_window.get("Failed", 0)
    return {
        "completed": completed,
        "failed": failed,
        "throughput": completed / settings.duration,
        "finished_per_s": (completed + failed) / settings.duration,
        "latency_ms": fw.latency_ms(tally.latencies),
        "stages_ms": {
            "start_reply": fw.latency_ms(tally.reply),
            "relay_lag_started": fw.latency_ms(tally.relay_lag),
            "debit": fw.latency_ms(tally.debit),
            "credit": fw.latency_ms(tally.credit),
            "settle": fw.latency_ms(tally.settle),
        },
        "outcomes_in_window": dict(sorted(tally.in_window.items())),
        "outcomes_total": dict(sorted(tally.total.items())),
        "started_total": started,
        "events_seen": dict(sorted(events_seen.items())),
        "generator_cpu_share": (cpu1 - cpu0) / settings.duration,
        "net_per_account": net,
        "unfinished": unfinished,
    }


def generator_main(args: argparse.Namespace) -> int:
    import uvloop

    settings = GeneratorSettings(
        url=args.url,
        accounts=args.accounts,
        workers=args.workers,
        warmup=args.warmup,
        duration=args.duration,
        timeout=args.timeout,
        completion_timeout=args.completion_timeout,
        max_amount=args.max_amount,
        seed=args.seed,
    )
    result = uvloop.run(generate(settings))
    fw.emit_result(result)
    return 0


# ---- the parent: node, phases, checks ------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    accounts: int
    inflight: int
    workers: int
    duration: float
    warmup: float
    rounds: int
    timeout: float
    completion_timeout: float
    initial: int
    max_amount: int
    phases: tuple[str, ...]
    keep_data: bool

    def deposit_settings(self) -> e2e.Settings:
        return e2e.Settings(
            accounts=self.accounts,
            inflight=self.inflight,
            duration=self.duration,
            warmup=self.warmup,
            rounds=self.rounds,
            timeout=self.timeout,
            scenarios=("kaya",),
            keep_data=self.keep_data,
        )


def fund_accounts(url: str, count: int, amount: int) -> None:
    body = json.dumps({"type": "Deposit", "amount": amount}).encode()
    subjects = [e2e.command_subject(i) for i in range(count)]
    bad = [
        f"{account_id(i)}: {r[:200]!r}"
        for i, r in enumerate(asyncio.run(e2e.request_all(url, subjects, body)))
        if reply_code(r) != "ok"
    ]
    if bad:
        raise BenchError(f"{len(bad)} accounts failed to fund, e.g. {bad[:3]}")


def read_balances(url: str, count: int) -> list[int]:
    subjects = [f"kaya.qry.account.{account_id(i)}" for i in range(count)]
    balances: list[int] = []
    for i, data in enumerate(asyncio.run(e2e.request_all(url, subjects, b""))):
        reply = e2e._decode_reply(data)
        if not reply.ok or reply.state is None:
            raise BenchError(f"query of {account_id(i)} failed: {data[:200]!r}")
        balances.append(int(reply.state.get("balance", -1)))
    return balances


def resolve_unfinished(url: str, unfinished: list[list[Any]]) -> dict[str, str]:
    """Status of transfers the generator saw no terminal event for (bounded wait)."""
    status: dict[str, str] = {}
    deadline = time.monotonic() + RESOLVE_TIMEOUT
    todo = [str(u[0]) for u in unfinished]
    while todo and time.monotonic() < deadline:
        subjects = [f"kaya.qry.transfer.{tid}" for tid in todo]
        for tid, data in zip(todo, asyncio.run(e2e.request_all(url, subjects, b"")), strict=True):
            reply = e2e._decode_reply(data)
            status[tid] = str((reply.state or {}).get("status", "unreadable"))
        todo = [tid for tid in todo if status[tid] == "pending"]
        if todo:
            time.sleep(0.5)
    return status


def _check(before: list[int], after: list[int], expected_delta: list[int]) -> dict[str, Any]:
    wrong = [
        f"{account_id(i)}: {b} -> {a}, expected {b + d}"
        for i, (b, a, d) in enumerate(zip(before, after, expected_delta, strict=True))
        if a != b + d
    ]
    return {
        "sum_before": sum(before),
        "sum_after": sum(after),
        "expected_change": sum(expected_delta),
        "mismatched_accounts": len(wrong),
        "examples": wrong[:5],
    }


def deposits_phase(settings: Settings, node: Running, workdir: Path, seed: int) -> dict[str, Any]:
    before = read_balances(node.url, settings.accounts)
    result = e2e.run_generator(
        settings.deposit_settings(),
        node.url,
        seed=seed,
        workdir=workdir,
        cpu_pids=node.cpu_pids,
    )
    ok_per_account: list[int] = result.pop("ok_per_account")
    unknown: dict[str, int] = result.pop("unknown_outcome")
    after = read_balances(node.url, settings.accounts)
    check = _check(before, after, ok_per_account)
    # a deposit that timed out at the client may or may not be in: allow it, but say so
    check["mismatched_accounts"] = sum(
        1
        for i, (b, a, d) in enumerate(zip(before, after, ok_per_account, strict=True))
        if not b + d <= a <= b + d + unknown.get(str(i), 0)
    )
    check["unknown_outcomes"] = sum(unknown.values())
    check["acknowledged"] = sum(ok_per_account)
    check["verified"] = check["mismatched_accounts"] == 0 and not unknown
    result["check"] = check
    result["balances_after"] = after
    return result


def transfers_phase(settings: Settings, node: Running, workdir: Path, seed: int) -> dict[str, Any]:
    before = read_balances(node.url, settings.accounts)
    argv = fw.module_argv(
        "bench.transfers",
        "--generator",
        url=node.url,
        accounts=settings.accounts,
        workers=settings.workers,
        warmup=settings.warmup,
        duration=settings.duration,
        timeout=settings.timeout,
        completion_timeout=settings.completion_timeout,
        max_amount=settings.max_amount,
        seed=seed,
    )
    window = fw.run_windowed(
        Child("transfers-generator", argv, workdir / "transfers-generator.log"),
        lambda: fw.sample_cpu(node.cpu_pids),
        warmup=settings.warmup,
        duration=settings.duration,
        drain=settings.timeout + settings.completion_timeout,
    )
    result = window.result
    result["cpu_share"] = fw.generator_cpu(window)

    net: list[int] = result.pop("net_per_account")
    unfinished: list[list[Any]] = result["unfinished"]
    status = resolve_unfinished(node.url, unfinished) if unfinished else {}
    still_pending = 0
    for tid, a, b, amount, _ in unfinished:
        if status.get(tid) == "completed":
            net[a] -= amount
            net[b] += amount
        elif status.get(tid) not in ("failed", "new"):
            still_pending += 1
    result["unfinished_resolved"] = dict(Counter(status.values()))
    after = read_balances(node.url, settings.accounts)
    check = _check(before, after, net)
    check["unfinished"] = len(unfinished)
    check["still_pending"] = still_pending
    check["verified"] = (
        check["mismatched_accounts"] == 0
        and check["sum_after"] == check["sum_before"]
        and still_pending == 0
    )
    result["check"] = check
    result["balances_after"] = after
    return result


def run_round(settings: Settings, number: int) -> dict[str, Any]:
    # alternate the order, so neither phase always runs on the node with more history
    order = settings.phases if number % 2 else tuple(reversed(settings.phases))
    fw.say(f"round {number}/{settings.rounds} ...")
    out: dict[str, Any] = {"round": number, "order": list(order)}
    with fw.scratch("transfers", keep=settings.keep_data) as workdir:
        if settings.keep_data:
            out["workdir"] = str(workdir)
        _run_round(settings, number, order, out, workdir)
    if "deposits" in out and "transfers" in out:
        out["ratio"] = out["transfers"]["throughput"] / out["deposits"]["throughput"]
    return out


def _run_round(
    settings: Settings, number: int, order: tuple[str, ...], out: dict[str, Any], workdir: Path
) -> None:
    with running("kaya", workdir) as node:
        out["startup_s"] = node.info.get("startup_s")
        t0 = time.monotonic()
        asyncio.run(open_accounts(node.url, settings.accounts))
        fund_accounts(node.url, settings.accounts, settings.initial)
        out["open_and_fund_s"] = round(time.monotonic() - t0, 3)
        funded = read_balances(node.url, settings.accounts)
        initial_total = settings.accounts * settings.initial
        funded_ok = all(b == settings.initial for b in funded)
        for phase in order:
            fw.say(f"  {phase} ...")
            run = deposits_phase if phase == "deposits" else transfers_phase
            out[phase] = run(settings, node, workdir, seed=number)
            # the 1-minute load at the end of a phase: others' work on a shared machine
            out[phase]["loadavg_after"] = round(os.getloadavg()[0], 2)
        final = out[order[-1]].pop("balances_after")
        for phase in order:
            out[phase].pop("balances_after", None)
        acknowledged = out["deposits"]["check"]["acknowledged"] if "deposits" in out else 0
        out["verification"] = {
            "initial_total": initial_total,
            "acknowledged_deposits": acknowledged,
            "sum_of_balances": sum(final),
            "accounts_checked": len(final),
            "funded_ok": funded_ok,
            "verified": funded_ok
            and sum(final) == initial_total + acknowledged
            and all(out[p]["check"]["verified"] for p in order),
        }
        out["memory"] = node.memory()
    out.update(node.info)


# ---- summary and output --------------------------------------------------------------------


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"verified": all(r["verification"]["verified"] for r in rounds)}
    dep = [r["deposits"] for r in rounds if "deposits" in r]
    xfer = [r["transfers"] for r in rounds if "transfers" in r]
    if dep:
        out["deposits"] = {
            "throughput": spread([d["throughput"] for d in dep]),
            "p50_ms": spread([d["latency_ms"]["p50"] for d in dep]),
            "p99_ms": spread([d["latency_ms"]["p99"] for d in dep]),
            "errors": dict(sum((Counter(d["errors"]) for d in dep), Counter())),
        }
    if xfer:
        out["transfers"] = {
            "throughput": spread([x["throughput"] for x in xfer]),
            "p50_ms": spread([x["latency_ms"]["p50"] for x in xfer]),
            "p99_ms": spread([x["latency_ms"]["p99"] for x in xfer]),
            "p99.9_ms": spread([x["latency_ms"]["p99.9"] for x in xfer]),
            "completed": sum(x["completed"] for x in xfer),
            "failed": sum(x["failed"] for x in xfer),
            "outcomes_total": dict(sum((Counter(x["outcomes_total"]) for x in xfer), Counter())),
            "stages_p50_ms": {
                stage: spread([x["stages_ms"][stage]["p50"] for x in xfer])
                for stage in xfer[0]["stages_ms"]
            },
            "stages_p99_ms": {
                stage: spread([x["stages_ms"][stage]["p99"] for x in xfer])
                for stage in xfer[0]["stages_ms"]
            },
        }
    if dep and xfer:
        per_round = [r["ratio"] for r in rounds if "ratio" in r]
        out["ratio"] = {
            "transfers_per_deposits": out["transfers"]["throughput"]["median"]
            / out["deposits"]["throughput"]["median"],
            "per_round": per_round,
        }
    return out


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"transfers: {m['nproc']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"{v['nats-server']}, nats-py {v['nats-py']}, msgspec {v['msgspec']}, git {v['git']}",
        f"{s['accounts']} accounts funded with {s['initial']:,} each; deposits {s['inflight']} "
        f"in flight, transfers {s['workers']} workers (amount 1-{s['max_amount']}); "
        f"{s['duration']:g} s measured after {s['warmup']:g} s warm-up; {s['rounds']} round(s)",
        "",
        f"{'round':<6}{'phase':<10}{'per s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
        f"  {'done/failed':<12}{'verified':<9}cpu, in cores (x_loop: its main thread)"
        "  (1-min loadavg after)",
    ]
    for r in results["rounds"]:
        for phase in r["order"]:
            x = r[phase]
            lat = x["latency_ms"]
            cpu = " ".join(f"{k}={val:.2f}" for k, val in x["cpu_share"].items())
            cpu += f"  (loadavg {x.get('loadavg_after', math.nan):.2f})"
            counts = f"{x['completed']}/{x['failed']}" if phase == "transfers" else f"{x['ok']}/-"
            lines.append(
                f"{r['round']:<6}{phase:<10}{x['throughput']:>9,.0f}{lat['p50']:>9.2f}"
                f"{lat['p99']:>9.2f}{lat['p99.9']:>10.2f}  {counts:<12}"
                f"{str(x['check']['verified']).lower():<9}{cpu}"
            )
    summary = results["summary"]
    lines += ["", "median (min-max) over rounds:"]
    if "deposits" in summary:
        d = summary["deposits"]
        lines.append(
            f"  deposits   {fmt_spread(d['throughput'], ',.0f')} commands/s   "
            f"p50 {fmt_spread(d['p50_ms'], '.2f')} ms   p99 {fmt_spread(d['p99_ms'], '.2f')} ms"
        )
    if "transfers" in summary:
        t = summary["transfers"]
        lines.append(
            f"  transfers  {fmt_spread(t['throughput'], ',.0f')} completed/s   start->completion "
            f"p50 {fmt_spread(t['p50_ms'], '.2f')} ms   p99 {fmt_spread(t['p99_ms'], '.2f')} ms   "
            f"p99.9 {fmt_spread(t['p99.9_ms'], '.2f')} ms"
        )
        lines.append(
            f"             completed {t['completed']:,}, failed {t['failed']:,} (in the windows); "
            f"all outcomes: {' '.join(f'{k}={n}' for k, n in t['outcomes_total'].items())}"
        )
        p50, p99 = t["stages_p50_ms"], t["stages_p99_ms"]
        stages = " | ".join(
            f"{name} {p50[name]['median']:.2f}/{p99[name]['median']:.2f}" for name in p50
        )
        lines.append(f"             stages p50/p99 ms: {stages}")
        lines.append(
            "             (latency = completion-event arrival - Start send: includes the relay hop)"
        )
    if "ratio" in summary:
        ratio = summary["ratio"]
        per = ratio["per_round"]
        lines.append(
            f"  transfers/s / deposits/s: {ratio['transfers_per_deposits']:.3f} "
            f"(per round {min(per):.3f}-{max(per):.3f})"
        )
    for r in results["rounds"]:
        ver = r["verification"]
        lines.append(
            f"  round {r['round']}: sum of {ver['accounts_checked']} balances "
            f"{ver['sum_of_balances']:,} = {ver['initial_total']:,} initial + "
            f"{ver['acknowledged_deposits']:,} deposits: "
            f"{'verified' if ver['verified'] else 'NOT VERIFIED'}"
        )
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transfers",
        description="Transfer sagas through a Kaya node: completions/s and latency, "
        "beside deposits/s in the same run.",
    )
    fw.add_options(
        parser,
        quick="500 accounts, 3 s, 1 round",
        rounds="rounds (default 3; quick 1)",
        duration="measured seconds per phase (default 10; quick 3)",
        warmup="unmeasured seconds first (default 2; quick 1)",
        only="run one phase, deposits or transfers (no ratio then)",
        keep_data="keep the nodes' data dirs",
    )
    parser.add_argument("--accounts", type=int, help="accounts opened (default 2000; quick 500)")
    parser.add_argument(
        "--inflight", type=int, default=100, help="deposit requests in flight (baseline)"
    )
    parser.add_argument("--workers", type=int, default=100, help="concurrent transfer workers")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds")
    parser.add_argument(
        "--completion-timeout",
        type=float,
        default=30.0,
        help="seconds a worker waits for a transfer's terminal event",
    )
    parser.add_argument("--initial", type=int, default=10**9, help="each account's opening balance")
    parser.add_argument("--max-amount", type=int, default=1000, help="transfer amounts 1..this")
    gen = parser.add_argument_group("generator process (internal)")
    gen.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    gen.add_argument("--url", help=argparse.SUPPRESS)
    gen.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def _resolve(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    settings = Settings(
        accounts=fw.pick(args.accounts, quick, 500, 2000),
        inflight=args.inflight,
        workers=args.workers,
        duration=fw.pick(args.duration, quick, 3.0, 10.0),
        warmup=fw.pick(args.warmup, quick, 1.0, 2.0),
        rounds=fw.pick(args.rounds, quick, 1, 3),
        timeout=args.timeout,
        completion_timeout=args.completion_timeout,
        initial=args.initial,
        max_amount=args.max_amount,
        phases=fw.parse_only(args.only, PHASES, PHASES),
        keep_data=args.keep_data,
    )
    if settings.accounts < 2 or settings.inflight < 1 or settings.workers < 1:
        raise SystemExit("--accounts must be at least 2, --inflight and --workers at least 1")
    if settings.rounds < 1 or settings.duration <= 0 or settings.warmup < 0:
        raise SystemExit("--rounds >= 1, --duration > 0 and --warmup >= 0, please")
    if not 0 < settings.max_amount <= settings.initial:
        raise SystemExit("--max-amount must be positive and at most --initial")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.generator:
        if args.accounts is None or args.duration is None or args.warmup is None or not args.url:
            raise SystemExit("--generator needs --url, --accounts, --duration and --warmup")
        return generator_main(args)

    settings = _resolve(args)
    fw.exit_on_sigterm()
    results = fw.new_results("transfers", settings, quick=bool(args.quick))
    # one node per round, both phases on it (their order alternates round by round)
    results["rounds"] = [run_round(settings, number) for number in range(1, settings.rounds + 1)]
    results["summary"] = summarize(results["rounds"])
    fw.finish(results, write=not args.no_write, render=render)
    return 0 if results["summary"]["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
