"""End-to-end benchmark: deposits through a real node, against a raw NATS echo in the same run.

    python -m bench.e2e [--quick] [--accounts N] [--inflight N] [--duration S] [--rounds N]

Two scenarios, alternated round by round on the same machine:

- `echo`: a nats-server we start ourselves and a raw nats-py responder in its own
  process (bench/echo.py). It is the most a Kaya node could do over this transport,
  with this client, on these cores.
- `kaya`: a `kaya run` node (fresh data dir, its embedded nats-server). N accounts
  are opened first (not timed), then closed-loop `Deposit {amount: 1}` commands go
  to random accounts; at the end every account's balance is read back on
  `kaya.qry.account.<id>` and checked against the deposits that were acknowledged.
- `kaya-secure` (with `--secure`): the same workload on a node with `[security]`
  and `[security.jwt]` on. Every client connects over TLS with the `client` role's
  certificate, and every request carries `Authorization: Bearer <JWT>` for the
  account's owner (`owner-<i mod 100>`, one token each), as the bank's policy asks.
- `echo-tls` (with `--secure`): the echo over TLS with client certificates: the
  share of the secure node's cost that is the transport's.

Both are driven by the same load generator (`--generator`, a separate process on
uvloop): K worker coroutines, each sending one request and awaiting its reply
before the next (closed loop), timing each with perf_counter_ns. Throughput counts
successful replies completed inside the measured window; latency percentiles are
over those replies; error replies are counted by code.

The machine is noisy (2 shared cores), so absolute figures drift by ±10% between
runs: the figure to quote is the kaya/echo ratio from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import ssl
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from bench import framework as fw
from bench.charts import bar_chart
from bench.common import BenchError, Child, fmt_spread, render_targets, spread, target, utc_now
from bench.targets import JWT_AUDIENCE, JWT_ISSUER, STATEFUL, running
from kaya.store.timing import STAGES

DEPOSIT = b'{"type":"Deposit","amount":1}'
VERIFY_ALL_UP_TO = 2000
"""Up to this many accounts every balance is checked; above it, a random sample of this size."""
QUERY_CONCURRENCY = 100
MAX_REQUESTS = 50_000_000
"""Hard cap on requests per generator run, beside the duration: no loop is unbounded."""


def account_id(index: int) -> str:
    return f"acc-{index}"


def command_subject(index: int) -> str:
    return f"kaya.cmd.account.{account_id(index)}"


OWNERS = 100
"""Accounts are opened for owner-0 .. owner-99 (index mod 100): one bearer token each."""


def owner(index: int) -> str:
    return f"owner-{index % OWNERS}"


# ---- security: how a client reaches a secure target -------------------------------------------


@dataclass(frozen=True)
class Access:
    """TLS with the `client` role's certificate from `security_dir`; with `tokens`, a
    bearer token per owner, signed with the key `bench/targets.py` made for the node.

    Per owner, not one admin token: the bank's policy then compares the token's `sub`
    with the account's owner on every command, as it would for real callers.
    """

    security_dir: Path
    tokens: bool

    def tls(self) -> ssl.SSLContext:
        from kaya.app.security.pki import Pki

        return Pki(self.security_dir).role("client").ssl_context()

    def headers(self) -> list[dict[str, str]] | None:
        """Request headers per owner (`headers[i % OWNERS]` for account i), or None."""
        if not self.tokens:
            return None
        from kaya.app.security.tokens import SIGNING_KEY, mint

        key = (self.security_dir / SIGNING_KEY).read_bytes()
        return [
            {
                "Authorization": "Bearer "
                + mint(key, subject=owner(k), issuer=JWT_ISSUER, audience=JWT_AUDIENCE, ttl=3600)
            }
            for k in range(OWNERS)
        ]

    def argv(self) -> list[str]:
        return ["--security-dir", str(self.security_dir)] + (["--tokens"] if self.tokens else [])


# ---- replies -------------------------------------------------------------------------------


class _Error(msgspec.Struct):
    code: str = "internal"
    message: str = ""


class _Reply(msgspec.Struct):
    """The part of any contract reply the generator needs; other fields are skipped."""

    ok: bool = False
    version: int = 0
    state: dict[str, Any] | None = None
    error: _Error | None = None


_decode_reply = msgspec.json.Decoder(_Reply).decode


def reply_code(data: bytes) -> str:
    """ "ok", the contract's error code, or "undecodable" for a reply that is not one."""
    try:
        reply = _decode_reply(data)
    except msgspec.DecodeError:
        return "undecodable"
    if reply.ok:
        return "ok"
    return reply.error.code if reply.error is not None else "internal"


# ---- the load generator (its own process) --------------------------------------------------


@dataclass(frozen=True)
class GeneratorSettings:
    url: str
    accounts: int
    inflight: int
    warmup: float
    duration: float
    timeout: float
    seed: int
    per_account: bool
    access: Access | None = None


async def generate(settings: GeneratorSettings) -> dict[str, Any]:
    """Closed-loop load: each worker sends, awaits the reply, and only then sends again.

    Closed loop because that is how a caller waiting on a command behaves, and
    because it cannot overrun the node: throughput and latency are then two views
    of the same queue (Little's law: K = throughput x mean latency). Every request
    outcome is counted per account (for the correctness check), but only replies
    completed inside [warm-up end, warm-up end + duration] enter the figures.
    """
    import nats
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    access = settings.access
    nc = await nats.connect(
        settings.url,
        name="bench-generator",
        allow_reconnect=False,
        tls=access.tls() if access is not None else None,
    )
    headers = access.headers() if access is not None else None
    subjects = [command_subject(i).encode() for i in range(settings.accounts)]
    subjects_str = [s.decode() for s in subjects]
    ok_per_account = [0] * settings.accounts
    unknown_outcome: Counter[int] = Counter()  # requests whose reply never came
    codes_in_window: Counter[str] = Counter()
    codes_total: Counter[str] = Counter()
    latencies: list[int] = []
    sent = 0

    start_ns = time.perf_counter_ns() + int(settings.warmup * 1e9)
    end_ns = start_ns + int(settings.duration * 1e9)
    clock = time.perf_counter_ns

    async def worker(seed: int) -> None:
        nonlocal sent
        pick = random.Random(seed).randrange
        n = settings.accounts
        timeout = settings.timeout
        record = latencies.append
        while sent < MAX_REQUESTS:
            t0 = clock()
            if t0 >= end_ns:
                return
            i = pick(n)
            sent += 1
            try:
                if headers is None:
                    msg = await nc.request(subjects_str[i], DEPOSIT, timeout=timeout)
                else:
                    msg = await nc.request(
                        subjects_str[i], DEPOSIT, timeout=timeout, headers=headers[i % OWNERS]
                    )
            except NatsTimeout:
                code = "client_timeout"
                unknown_outcome[i] += 1
            except NoRespondersError:
                code = "no_responders"
            else:
                code = reply_code(msg.data)
            t1 = clock()
            codes_total[code] += 1
            if code == "ok":
                ok_per_account[i] += 1
            if start_ns <= t1 <= end_ns:
                codes_in_window[code] += 1
                if code == "ok":
                    record(t1 - t0)

    try:
        hard_limit = settings.warmup + settings.duration + settings.timeout + 10
        window = asyncio.ensure_future(fw.mark_window(start_ns, end_ns))
        workers = [worker(settings.seed * 100_003 + k) for k in range(settings.inflight)]
        await asyncio.wait_for(asyncio.gather(window, *workers), timeout=hard_limit)
        cpu0, cpu1 = window.result()
    finally:
        await nc.close()

    ok = codes_in_window.get("ok", 0)
    errors = {c: n for c, n in sorted(codes_in_window.items()) if c != "ok"}
    result: dict[str, Any] = {
        "ok": ok,
        "throughput": ok / settings.duration,
        "latency_ms": fw.latency_ms(latencies),
        "errors": errors,
        "error_count": sum(errors.values()),
        "sent_total": sent,
        "outcomes_total": dict(sorted(codes_total.items())),
        "generator_cpu_share": (cpu1 - cpu0) / settings.duration,
    }
    if settings.per_account:
        result["ok_per_account"] = ok_per_account
        result["unknown_outcome"] = {str(i): n for i, n in sorted(unknown_outcome.items())}
    return result


def generator_main(args: argparse.Namespace) -> int:
    import uvloop

    security_dir = getattr(args, "security_dir", None)  # bench.cluster passes its own args
    settings = GeneratorSettings(
        url=args.url,
        accounts=args.accounts,
        inflight=args.inflight,
        warmup=args.warmup,
        duration=args.duration,
        timeout=args.timeout,
        seed=args.seed,
        per_account=args.per_account,
        access=Access(Path(security_dir), bool(args.tokens)) if security_dir else None,
    )
    result = uvloop.run(generate(settings))
    fw.emit_result(result)
    return 0


# ---- the parent: processes, rounds, checks ---------------------------------------------------


@dataclass(frozen=True)
class Settings:
    accounts: int
    inflight: int
    duration: float
    warmup: float
    rounds: int
    timeout: float
    scenarios: tuple[str, ...]
    keep_data: bool
    node_config: str = ""
    """Extra TOML for the node (e.g. `--no-consumers`), after the defaults."""


def run_generator(
    settings: Settings,
    url: str,
    seed: int,
    workdir: Path,
    cpu_pids: dict[str, int],
    *,
    accounts: int | None = None,
    access: Access | None = None,
    stages: Callable[[], dict[str, tuple[float, float]]] = dict,
) -> dict[str, Any]:
    """Run one generator process to the end; sample the others' CPU over its window, and
    a node's latency budget (`stages`: its stage sums and counts) at both ends of it."""
    argv = fw.module_argv(
        "bench.e2e",
        "--generator",
        *(access.argv() if access is not None else []),
        url=url,
        accounts=accounts or settings.accounts,
        inflight=settings.inflight,
        warmup=settings.warmup,
        duration=settings.duration,
        timeout=settings.timeout,
        seed=seed,
        per_account=True,
    )
    window = fw.run_windowed(
        Child("generator", argv, workdir / "generator.log"),
        lambda: (fw.sample_cpu(cpu_pids), stages()),
        warmup=settings.warmup,
        duration=settings.duration,
        drain=settings.timeout,
    )
    (cpu0, stages0), (cpu1, stages1) = window.before, window.after
    window.result["cpu_share"] = fw.generator_cpu(
        fw.Window(window.result, cpu0, cpu1, window.seconds)
    )
    window.result["stages_ms"] = stage_means(stages0, stages1)
    return window.result


def stage_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean milliseconds per command in each stage over the window (store/timing.py)."""
    means = {}
    for stage, (total, count) in after.items():
        total0, count0 = before.get(stage, (0.0, 0.0))
        if count > count0:
            means[stage] = round((total - total0) / (count - count0) * 1000, 3)
    return means


def scenario_round(settings: Settings, scenario: str, number: int) -> dict[str, Any]:
    """One round of one scenario on a fresh target: open, load, verify, stop by PID.

    `hotkey` is the kaya target with every request on one account: per-key order
    serialises it through one mailbox, which is what it measures.
    """
    target_name = "kaya" if scenario == "hotkey" else scenario
    accounts = 1 if scenario == "hotkey" else settings.accounts
    out: dict[str, Any] = {"scenario": scenario, "round": number, "accounts": accounts}
    with fw.scratch(scenario, keep=settings.keep_data) as workdir:
        with running(target_name, workdir, node_config=settings.node_config) as target:
            out["startup_s"] = target.info.get("startup_s")
            stateful = target_name in STATEFUL
            access = None
            if target.security_dir is not None:
                access = Access(target.security_dir, tokens=target_name == "kaya-secure")
            if stateful:
                t0 = time.monotonic()
                asyncio.run(open_accounts(target.url, accounts, access=access))
                opened_in = time.monotonic() - t0
                out["open"] = {
                    "accounts": accounts,
                    "seconds": round(opened_in, 3),
                    "per_s": round(accounts / opened_in),
                }
            result = run_generator(
                settings,
                target.url,
                seed=number,
                workdir=workdir,
                cpu_pids=target.cpu_pids,
                accounts=accounts,
                access=access,
                stages=target.stages,
            )
            ok_per_account: list[int] = result.pop("ok_per_account")
            unknown: dict[str, int] = result.pop("unknown_outcome")
            out.update(result)
            if stateful:
                out["verification"] = asyncio.run(
                    verify_balances(target.url, ok_per_account, unknown, seed=number, access=access)
                )
            out["memory"] = target.memory()
        out.update(target.info)
        if settings.keep_data:
            out["workdir"] = str(workdir)
    return out


async def _connect(url: str, access: Access | None = None) -> Any:
    import nats

    tls = access.tls() if access is not None else None
    return await nats.connect(url, name="bench-setup", allow_reconnect=False, tls=tls)


async def open_accounts(
    url: str, count: int, concurrency: int = 100, *, access: Access | None = None
) -> None:
    """Open acc-0..acc-N-1; any refusal stops the round (the figures would be meaningless)."""
    nc = await _connect(url, access)
    headers = access.headers() if access is not None else None
    indices = iter(range(count))
    failures: list[str] = []

    async def worker() -> None:
        for i in indices:
            body = json.dumps({"type": "Open", "owner": owner(i), "currency": "EUR"})
            msg = await nc.request(
                command_subject(i),
                body.encode(),
                timeout=10,
                headers=headers[i % OWNERS] if headers is not None else None,
            )
            code = reply_code(msg.data)
            if code != "ok":
                failures.append(f"{account_id(i)}: {msg.data[:200]!r}")

    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(concurrency))), timeout=60 + count / 100
        )
    finally:
        await nc.close()
    if failures:
        raise BenchError(f"{len(failures)} accounts failed to open, e.g. {failures[:3]}")


async def request_all(
    url: str,
    subjects: list[str],
    body: bytes,
    *,
    timeout: float = 10.0,
    access: Access | None = None,
    headers: Sequence[dict[str, str] | None] | None = None,
) -> list[bytes]:
    """One request per subject, QUERY_CONCURRENCY at a time; replies in subject order.

    `headers`, if given, holds each request's headers, in subject order."""
    nc = await _connect(url, access)
    replies: list[bytes] = [b""] * len(subjects)
    todo = iter(range(len(subjects)))

    async def worker() -> None:
        for i in todo:
            hdr = headers[i] if headers is not None else None
            replies[i] = (await nc.request(subjects[i], body, timeout=timeout, headers=hdr)).data

    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(QUERY_CONCURRENCY))),
            timeout=60 + len(subjects) / 100,
        )
    finally:
        await nc.close()
    return replies


async def verify_balances(
    url: str,
    ok_per_account: list[int],
    unknown: dict[str, int],
    *,
    seed: int,
    access: Access | None = None,
) -> dict[str, Any]:
    """Every acknowledged deposit must be in the balance, and nothing else.

    Each account must read balance == acknowledged deposits and version ==
    1 + acknowledged deposits (Opened, then one Deposited each). A request that
    timed out at the client has an unknown outcome, so its account is allowed
    one more per timeout and the round is reported as not verified.
    """
    n = len(ok_per_account)
    if n <= VERIFY_ALL_UP_TO:
        sample = list(range(n))
    else:
        sample = sorted(random.Random(seed).sample(range(n), VERIFY_ALL_UP_TO))
    read: dict[int, tuple[int, int]] = {}
    problems: list[str] = []
    subjects = [f"kaya.qry.account.{account_id(i)}" for i in sample]
    tokens = access.headers() if access is not None else None
    headers = [tokens[i % OWNERS] for i in sample] if tokens is not None else None
    replies = await request_all(url, subjects, b"", access=access, headers=headers)
    for i, data in zip(sample, replies, strict=True):
        reply = _decode_reply(data)
        if not reply.ok or reply.state is None:
            problems.append(f"{account_id(i)}: {data[:200]!r}")
            continue
        read[i] = (int(reply.state.get("balance", -1)), reply.version)

    mismatched: list[str] = []
    for i, (balance, version) in sorted(read.items()):
        expected = ok_per_account[i]
        slack = unknown.get(str(i), 0)
        if not (expected <= balance <= expected + slack and version == 1 + balance):
            mismatched.append(
                f"{account_id(i)}: balance {balance}, version {version}, acknowledged {expected}"
            )
    balance_sum = sum(b for b, _ in read.values())
    acknowledged = sum(ok_per_account[i] for i in sample)
    verified = not problems and not mismatched and not unknown and balance_sum == acknowledged
    return {
        "verified": verified,
        "accounts_checked": len(sample),
        "all_accounts": len(sample) == n,
        "sum_of_balances": balance_sum,
        "acknowledged_deposits": acknowledged,
        "unknown_outcomes": sum(unknown.values()),
        "query_failures": len(problems),
        "mismatched_accounts": len(mismatched),
        "examples": (problems + mismatched)[:5],
    }


# ---- summary and output ------------------------------------------------------------------------


SCENARIOS = (
    "echo",
    "echo-tls",
    "kaya",
    "kaya-split",
    "kaya-secure",
    "hotkey",
    "naive",
    "faststream",
    "eventsourcing",
)
SECURE_SCENARIOS = ("echo-tls", "kaya-secure")
"""Run with `--secure` (or named in `--only`), not by default."""
DEFAULT_SCENARIOS = tuple(s for s in SCENARIOS if s not in SECURE_SCENARIOS)
QUICK_SCENARIOS = ("echo", "kaya", "kaya-split", "hotkey", "naive")
"""Quick runs leave out the two slowest baselines to stay under a minute."""
SECURE_PAIRS = (("kaya-secure", "kaya"), ("echo-tls", "echo"))
"""(secure, plain): the cost of security is their ratio, round by round."""

GOALS: tuple[tuple[str, str, float, str], ...] = (
    # (baseline scenario, figure, goal, what the target says), kaya / baseline
    ("echo", "throughput", 0.5, "end-to-end peak vs raw echo responder"),
    ("echo", "p99", 2.0, "end-to-end p99 vs echo p99 at 100 in flight"),
    ("naive", "throughput", 10.0, "vs naive pipeline (one transaction per request)"),
    ("faststream", "throughput", 2.0, "vs FastStream NATS responder"),
    ("eventsourcing", "throughput", 10.0, "vs eventsourcing library (SQLite)"),
)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians with min-max per scenario, ratios against kaya from the same rounds."""
    out: dict[str, Any] = {}
    by = fw.by_scenario(rounds)
    for scenario, rs in by.items():
        out[scenario] = {
            "rounds": len(rs),
            "throughput": spread([r["throughput"] for r in rs]),
            "p50_ms": spread([r["latency_ms"]["p50"] for r in rs]),
            "p99_ms": spread([r["latency_ms"]["p99"] for r in rs]),
            "p99.9_ms": spread([r["latency_ms"]["p99.9"] for r in rs]),
            "errors": dict(sum((Counter(r["errors"]) for r in rs), Counter())),
            "cpu_us_per_request": {
                name: spread([r["cpu_share"][name] / r["throughput"] * 1e6 for r in rs])
                for name in rs[0]["cpu_share"]
                if all(name in r["cpu_share"] and r["throughput"] > 0 for r in rs)
            },
        }
        if any("verification" in r for r in rs):
            out[scenario]["verified"] = all(r["verification"]["verified"] for r in rs)
        stages = [r.get("stages_ms") or {} for r in rs]
        if all(stages):
            out[scenario]["stages_ms"] = {
                stage: statistics.median(x.get(stage, 0.0) for x in stages)
                for stage in STAGES
                if any(stage in x for x in stages)
            }
    if "kaya" in by:
        ratios: dict[str, Any] = {}
        for other, rs in by.items():
            if other in ("kaya", "kaya-split") or other in SECURE_SCENARIOS:
                continue
            pairs = list(zip(rs, by["kaya"], strict=False))
            ratios[other] = {
                "throughput": out["kaya"]["throughput"]["median"]
                / out[other]["throughput"]["median"],
                "p99": out["kaya"]["p99_ms"]["median"] / out[other]["p99_ms"]["median"],
                "throughput_per_round": [k["throughput"] / o["throughput"] for o, k in pairs],
                "p99_per_round": [
                    k["latency_ms"]["p99"] / o["latency_ms"]["p99"] for o, k in pairs
                ],
            }
        out["kaya_over"] = ratios
    secure: dict[str, Any] = {}
    for name, plain in SECURE_PAIRS:
        if name in by and plain in by:
            pairs = list(zip(by[name], by[plain], strict=False))
            secure[f"{name}/{plain}"] = {
                "throughput": out[name]["throughput"]["median"]
                / out[plain]["throughput"]["median"],
                "p50": out[name]["p50_ms"]["median"] / out[plain]["p50_ms"]["median"],
                "p99": out[name]["p99_ms"]["median"] / out[plain]["p99_ms"]["median"],
                "throughput_per_round": [x["throughput"] / y["throughput"] for x, y in pairs],
                "p99_per_round": [
                    x["latency_ms"]["p99"] / y["latency_ms"]["p99"] for x, y in pairs
                ],
            }
    if secure:
        out["secure_over_plain"] = secure
    if "kaya-split" in by and "echo" in by:
        pairs = list(zip(by["kaya-split"], by["echo"], strict=False))
        out["split_over_echo"] = {
            "throughput": out["kaya-split"]["throughput"]["median"]
            / out["echo"]["throughput"]["median"],
            "p99": out["kaya-split"]["p99_ms"]["median"] / out["echo"]["p99_ms"]["median"],
            "throughput_per_round": [x["throughput"] / y["throughput"] for x, y in pairs],
            "p99_per_round": [x["latency_ms"]["p99"] / y["latency_ms"]["p99"] for x, y in pairs],
        }
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's end-to-end targets, for the baselines that ran."""
    out = []
    kaya = summary.get("kaya")
    for baseline, figure, goal, what in GOALS:
        other = summary.get(baseline)
        if kaya is None or other is None:
            continue
        key = "throughput" if figure == "throughput" else "p99_ms"
        out.append(
            target(
                f"e2e {what}",
                kaya[key]["median"],
                other[key]["median"],
                goal,
                unit="x" if figure == "throughput" else "x p99",
                lower_is_better=figure == "p99",
            )
        )
    return out


def chart(results: dict[str, Any]) -> list[str]:
    """Throughput and p99 per scenario, medians with the rounds' range as error bars."""
    summary = results["summary"]
    names = [s for s in SCENARIOS if s in summary]
    m, v, s = results["machine"], results["versions"], results["settings"]
    note = (
        f"{m['nproc']} cores, {s['accounts']} accounts, {s['inflight']} in flight, git {v['git']}"
    )
    paths = [
        bar_chart(
            "e2e-throughput",
            "End-to-end commands/s (median, min-max over rounds)",
            "req/s",
            {n: summary[n]["throughput"] for n in names},
            note=note,
        ),
        bar_chart(
            "e2e-p99",
            "End-to-end p99 latency (median, min-max over rounds)",
            "ms",
            {n: summary[n]["p99_ms"] for n in names},
            note=note,
            logy=True,
        ),
    ]
    return [str(p) for p in paths if p is not None]


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"e2e: {m['nproc']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"{v['nats-server']}, nats-py {v['nats-py']}, msgspec {v['msgspec']}, git {v['git']}",
        f"{s['accounts']} accounts, {s['inflight']} in flight, {s['duration']:g} s measured "
        f"after {s['warmup']:g} s warm-up, {s['rounds']} round(s) each",
        "",
        f"{'round':<6}{'scenario':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
        f"  {'verified':<9}{'errors':<16}cpu, in cores (x_loop: its main thread)",
    ]
    for r in results["rounds"]:
        lat = r["latency_ms"]
        cpu = " ".join(f"{k}={val:.2f}" for k, val in r["cpu_share"].items())
        checked = "-" if "verification" not in r else str(r["verification"]["verified"]).lower()
        errors = " ".join(f"{k}={n}" for k, n in r["errors"].items()) or "-"
        lines.append(
            f"{r['round']:<6}{r['scenario']:<14}{r['throughput']:>9,.0f}{lat['p50']:>9.2f}"
            f"{lat['p99']:>9.2f}{lat['p99.9']:>10.2f}  {checked:<9}{errors:<16}{cpu}"
        )
    summary = results["summary"]
    lines += ["", "median (min-max) over rounds:"]
    for scenario in SCENARIOS:
        if scenario in summary:
            x = summary[scenario]
            lines.append(
                f"  {scenario:<13} {fmt_spread(x['throughput'], ',.0f'):>24} req/s   "
                f"p50 {fmt_spread(x['p50_ms'], '.2f')} ms   "
                f"p99 {fmt_spread(x['p99_ms'], '.2f')} ms"
            )
    ratios = [(f"kaya/{other}", r) for other, r in summary.get("kaya_over", {}).items()]
    if "split_over_echo" in summary:
        ratios.append(("kaya-split/echo", summary["split_over_echo"]))
    ratios += list(summary.get("secure_over_plain", {}).items())
    for label, ratio in ratios:
        tp, p99 = ratio["throughput_per_round"], ratio["p99_per_round"]
        p50 = f", p50 x{ratio['p50']:.2f}" if "p50" in ratio else ""
        lines.append(
            f"  {label:<18} throughput {ratio['throughput']:6.2f} "
            f"(per round {min(tp):.2f}-{max(tp):.2f}){p50}, "
            f"p99 x{ratio['p99']:.2f} (per round {min(p99):.2f}-{max(p99):.2f})"
        )
    cpu_lines = [
        f"  {scenario:<13} "
        + "  ".join(
            f"{name} {fmt_spread(us, ',.0f')}"
            for name, us in summary[scenario].get("cpu_us_per_request", {}).items()
        )
        for scenario in SCENARIOS
        if scenario in summary
    ]
    lines += ["", "cpu per successful request, us (median (min-max) over rounds):", *cpu_lines]
    budget = [
        f"  {scenario:<13} "
        + "  ".join(f"{stage} {ms:.3f}" for stage, ms in summary[scenario]["stages_ms"].items())
        + f"  = {sum(summary[scenario]['stages_ms'].values()):.2f} (p50 "
        f"{summary[scenario]['p50_ms']['median']:.2f})"
        for scenario in SCENARIOS
        if scenario in summary and summary[scenario].get("stages_ms")
    ]
    if budget:
        lines += ["", "latency budget, mean ms per command in each stage (median over rounds):"]
        lines += budget
    verified = {
        k: x["verified"] for k, x in summary.items() if isinstance(x, dict) and "verified" in x
    }
    if verified:
        lines.append(
            "  verified: " + " ".join(f"{k}={str(ok).lower()}" for k, ok in verified.items())
        )
    if results.get("targets"):
        lines += ["", "targets:", render_targets(results["targets"])]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description="End-to-end deposits through a Kaya node vs a raw NATS echo, same run.",
    )
    fw.add_options(
        parser,
        quick="500 accounts, 3 s, 1 round, fewer baselines",
        rounds="rounds of each scenario (default 3; quick 1)",
        duration="measured seconds (default 5; quick 3)",
        warmup="unmeasured seconds first (default 2; quick 1)",
        only=f"comma-separated scenarios to run, of {','.join(SCENARIOS)} "
        f"(default {','.join(DEFAULT_SCENARIOS)}; quick {','.join(QUICK_SCENARIOS)})",
        keep_data="keep the nodes' data dirs",
    )
    parser.add_argument("--accounts", type=int, help="accounts opened (default 10000; quick 500)")
    parser.add_argument("--inflight", type=int, default=100, help="concurrent requesters")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="also run echo-tls and kaya-secure (TLS, client certificates, JWT, sealed "
        "fields), each beside its plain twin in every round: the cost of security",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="export OpenTelemetry spans to a sink collector in this process: their cost",
    )
    parser.add_argument(
        "--no-consumers",
        action="store_true",
        help="run the node without its consumers (analytics, notifications): their cost",
    )
    gen = parser.add_argument_group("generator process (internal)")
    gen.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    gen.add_argument("--url", help=argparse.SUPPRESS)
    gen.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    gen.add_argument("--per-account", action="store_true", help=argparse.SUPPRESS)
    gen.add_argument("--security-dir", help=argparse.SUPPRESS)
    gen.add_argument("--tokens", action="store_true", help=argparse.SUPPRESS)
    return parser


def start_span_sink() -> str:
    """An OTLP/HTTP endpoint that accepts and discards spans (a collector at zero cost)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def _resolve(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    settings = Settings(
        accounts=fw.pick(args.accounts, quick, 500, 10_000),
        inflight=args.inflight,
        duration=fw.pick(args.duration, quick, 3.0, 5.0),
        warmup=fw.pick(args.warmup, quick, 1.0, 2.0),
        rounds=fw.pick(args.rounds, quick, 1, 3),
        timeout=args.timeout,
        scenarios=_scenarios(args.only, quick, secure=bool(args.secure)),
        keep_data=args.keep_data,
        node_config=(
            '\n[consumers]\ndisabled = ["analytics", "notifications"]\n'
            if args.no_consumers
            else ""
        )
        + (f'\n[tracing]\notlp_endpoint = "{start_span_sink()}"\n' if args.tracing else ""),
    )
    if settings.accounts < 1 or settings.inflight < 1 or settings.rounds < 1:
        raise SystemExit("--accounts, --inflight and --rounds must be at least 1")
    if settings.duration <= 0 or settings.warmup < 0:
        raise SystemExit("--duration must be positive and --warmup not negative")
    return settings


def _scenarios(only: str | None, quick: bool, *, secure: bool = False) -> tuple[str, ...]:
    """The scenarios of one round, in order; `secure` adds each secure one after its twin."""
    chosen = fw.parse_only(only, SCENARIOS, QUICK_SCENARIOS if quick else DEFAULT_SCENARIOS)
    if not secure:
        return chosen
    out: list[str] = []
    for scenario in chosen:
        out += [
            scenario,
            *(s for s, plain in SECURE_PAIRS if plain == scenario and s not in chosen),
        ]
    return tuple(out + [s for s in SECURE_SCENARIOS if s not in out])


def run(settings: Settings, quick: bool = False) -> dict[str, Any]:
    """Every round of every scenario, alternated so drift on the machine hits all alike."""
    packages = (*fw.PACKAGES, "faststream", "eventsourcing")
    results = fw.new_results("e2e", settings, quick=quick, packages=packages)
    one = partial(scenario_round, settings)
    results["rounds"] = fw.run_rounds(settings.rounds, settings.scenarios, one)
    results["finished_at"] = utc_now().isoformat(timespec="seconds")
    results["summary"] = summarize(results["rounds"])
    results["targets"] = targets(results["summary"])
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.generator:
        if args.accounts is None or args.duration is None or args.warmup is None or not args.url:
            raise SystemExit("--generator needs --url, --accounts, --duration and --warmup")
        return generator_main(args)

    settings = _resolve(args)
    fw.exit_on_sigterm()
    results = run(settings, quick=bool(args.quick))
    fw.finish(results, write=not args.no_write, render=render, chart=chart)
    failed = [
        k
        for k, x in results["summary"].items()
        if isinstance(x, dict) and x.get("verified") is False
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
