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
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.common import (
    BenchError,
    Child,
    child_pids,
    cpu_seconds,
    ensure_gone,
    free_port,
    machine_info,
    memory_kib,
    nats_server_binary,
    percentile,
    spread,
    utc_now,
    versions,
    wait_for_port,
    write_results,
)

DEPOSIT = b'{"type":"Deposit","amount":1}'
RESULT_PREFIX = "RESULT "
WINDOW_START = "window start"
WINDOW_END = "window end"
VERIFY_ALL_UP_TO = 2000
"""Up to this many accounts every balance is checked; above it, a random sample of this size."""
QUERY_CONCURRENCY = 100
MAX_REQUESTS = 50_000_000
"""Hard cap on requests per generator run, beside the duration: no loop is unbounded."""


def account_id(index: int) -> str:
    return f"acc-{index}"


def command_subject(index: int) -> str:
    return f"kaya.cmd.account.{account_id(index)}"


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

    nc = await nats.connect(settings.url, name="bench-generator", allow_reconnect=False)
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
                msg = await nc.request(subjects_str[i], DEPOSIT, timeout=timeout)
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

    async def marks() -> tuple[float, float]:
        """Tell the parent when the window opens and closes, so it can sample CPU there."""
        await asyncio.sleep(max(0.0, (start_ns - clock()) / 1e9))
        cpu0 = time.process_time()
        print(WINDOW_START, flush=True)
        await asyncio.sleep(max(0.0, (end_ns - clock()) / 1e9))
        print(WINDOW_END, flush=True)
        return cpu0, time.process_time()

    try:
        hard_limit = settings.warmup + settings.duration + settings.timeout + 10
        window = asyncio.ensure_future(marks())
        workers = [worker(settings.seed * 100_003 + k) for k in range(settings.inflight)]
        await asyncio.wait_for(asyncio.gather(window, *workers), timeout=hard_limit)
        cpu0, cpu1 = window.result()
    finally:
        await nc.close()

    latencies.sort()
    ms = [x / 1e6 for x in latencies]
    ok = codes_in_window.get("ok", 0)
    errors = {c: n for c, n in sorted(codes_in_window.items()) if c != "ok"}
    result: dict[str, Any] = {
        "ok": ok,
        "throughput": ok / settings.duration,
        "latency_ms": {
            "p50": percentile(ms, 50),
            "p90": percentile(ms, 90),
            "p99": percentile(ms, 99),
            "p99.9": percentile(ms, 99.9),
            "max": ms[-1] if ms else math.nan,
            "mean": sum(ms) / len(ms) if ms else math.nan,
        },
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

    settings = GeneratorSettings(
        url=args.url,
        accounts=args.accounts,
        inflight=args.inflight,
        warmup=args.warmup,
        duration=args.duration,
        timeout=args.timeout,
        seed=args.seed,
        per_account=args.per_account,
    )
    result = uvloop.run(generate(settings))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
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
    settings: Settings, url: str, seed: int, workdir: Path, cpu_pids: dict[str, int]
) -> dict[str, Any]:
    """Run one generator process to the end; sample the others' CPU over its window."""
    argv = [
        sys.executable,
        "-m",
        "bench.e2e",
        "--generator",
        "--url",
        url,
        "--accounts",
        str(settings.accounts),
        "--inflight",
        str(settings.inflight),
        "--warmup",
        str(settings.warmup),
        "--duration",
        str(settings.duration),
        "--timeout",
        str(settings.timeout),
        "--seed",
        str(seed),
        "--per-account",
    ]
    generator = Child("generator", argv, workdir / "generator.log")
    try:
        generator.wait_for_line(WINDOW_START, timeout=settings.warmup + 30)
        before = _sample_cpu(cpu_pids)
        t0 = time.monotonic()
        generator.wait_for_line(WINDOW_END, timeout=settings.duration + 30)
        elapsed = time.monotonic() - t0
        after = _sample_cpu(cpu_pids)
        generator.wait(timeout=settings.timeout + 30)
        line = next((x for x in generator.lines if x.startswith(RESULT_PREFIX)), None)
        if generator.process.returncode != 0 or line is None:
            raise BenchError(
                f"generator exited with {generator.process.returncode}: {generator.stderr_tail()}"
            )
    finally:
        generator.stop()
    result: dict[str, Any] = json.loads(line.removeprefix(RESULT_PREFIX))
    cpu = {name: (after[name] - b) / elapsed for name, b in before.items() if name in after}
    cpu["generator"] = result.pop("generator_cpu_share")
    result["cpu_share"] = {k: round(v, 3) for k, v in cpu.items()}
    return result


def _sample_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds per process, and of the main thread of the Python ones (event loop)."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        total = cpu_seconds(pid)
        if total is not None:
            out[name] = total
        if name != "nats_server":
            main = cpu_seconds(pid, main_thread=True)
            if main is not None:
                out[f"{name}_loop"] = main
    return out


def echo_round(settings: Settings, number: int) -> dict[str, Any]:
    """nats-server + raw echo responder, each its own process, stopped in finally blocks."""
    workdir = Path(tempfile.mkdtemp(prefix="kaya-bench-echo-"))
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = responder = None
    try:
        server = Child(
            "nats-server",
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
            workdir / "nats-server.log",
        )
        wait_for_port(port, timeout=10, process=server.process)
        responder = Child(
            "echo", [sys.executable, "-m", "bench.echo", "--url", url], workdir / "echo.log"
        )
        responder.wait_for_line("ready", timeout=20)
        result = run_generator(
            settings,
            url,
            seed=number,
            workdir=workdir,
            cpu_pids={"responder": responder.pid, "nats_server": server.pid},
        )
        result.pop("ok_per_account", None)
        result.pop("unknown_outcome", None)
    finally:
        if responder is not None:
            responder.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"scenario": "echo", "round": number, **result}


NODE_CONFIG = """\
# Written by bench/e2e.py: the defaults, except nothing that could clash with another process.
[nats]
monitor_port = 0

[log]
level = "warning"
"""


def kaya_round(settings: Settings, number: int) -> dict[str, Any]:
    """A fresh node: open the accounts, load it, verify every acknowledged deposit is there."""
    workdir = Path(tempfile.mkdtemp(prefix="kaya-bench-node-"))
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    config = workdir / "bench.toml"
    config.write_text(NODE_CONFIG + settings.node_config)
    kaya = Path(sys.executable).parent / "kaya"
    node: Child | None = None
    server_pids: list[int] = []
    out: dict[str, Any] = {"scenario": "kaya", "round": number}
    try:
        node = Child(
            "kaya",
            [
                str(kaya),
                "run",
                "--data-dir",
                str(workdir / "data"),
                "--nats-port",
                str(port),
                "--config",
                str(config),
                "--log-level",
                "warning",
            ],
            workdir / "node.log",
        )
        t0 = time.monotonic()
        node.wait_for_line("ready", timeout=60)
        out["startup_s"] = round(time.monotonic() - t0, 3)
        server_pids = child_pids(node.pid)
        t0 = time.monotonic()
        asyncio.run(open_accounts(url, settings.accounts))
        opened_in = time.monotonic() - t0
        out["open"] = {
            "accounts": settings.accounts,
            "seconds": round(opened_in, 3),
            "per_s": round(settings.accounts / opened_in),
        }
        cpu_pids = {"node": node.pid}
        if len(server_pids) == 1:
            cpu_pids["nats_server"] = server_pids[0]
        result = run_generator(settings, url, seed=number, workdir=workdir, cpu_pids=cpu_pids)
        ok_per_account: list[int] = result.pop("ok_per_account")
        unknown: dict[str, int] = result.pop("unknown_outcome")
        out.update(result)
        out["verification"] = asyncio.run(
            verify_balances(url, ok_per_account, unknown, seed=number)
        )
        out["memory"] = memory_kib(node.pid)
    finally:
        if node is not None:
            t0 = time.monotonic()
            out["node_exit_code"] = node.stop(timeout=30)
            out["stop_s"] = round(time.monotonic() - t0, 3)
            if out["node_exit_code"] != 0:
                out["node_stderr_tail"] = node.stderr_tail()
            out["node_stderr"] = _stderr_lines(workdir / "node.log")
        out["server_left_behind"] = [pid for pid in server_pids if ensure_gone(pid)]
        if settings.keep_data:
            out["workdir"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def _stderr_lines(log: Path, limit: int = 5) -> dict[str, Any]:
    """How many lines the node wrote on stderr (warnings and up, at this log level), first few."""
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return {"count": 0, "first": []}
    return {"count": len(lines), "first": [x[:300] for x in lines[:limit]]}


async def _connect(url: str) -> Any:
    import nats

    return await nats.connect(url, name="bench-setup", allow_reconnect=False)


async def open_accounts(url: str, count: int, concurrency: int = 100) -> None:
    """Open acc-0..acc-N-1; any refusal stops the round (the figures would be meaningless)."""
    nc = await _connect(url)
    indices = iter(range(count))
    failures: list[str] = []

    async def worker() -> None:
        for i in indices:
            body = json.dumps({"type": "Open", "owner": f"owner-{i}", "currency": "EUR"})
            msg = await nc.request(command_subject(i), body.encode(), timeout=10)
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


async def verify_balances(
    url: str, ok_per_account: list[int], unknown: dict[str, int], *, seed: int
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
    nc = await _connect(url)
    read: dict[int, tuple[int, int]] = {}
    problems: list[str] = []
    todo = iter(sample)

    async def worker() -> None:
        for i in todo:
            msg = await nc.request(f"kaya.qry.account.{account_id(i)}", b"", timeout=10)
            reply = _decode_reply(msg.data)
            if not reply.ok or reply.state is None:
                problems.append(f"{account_id(i)}: {msg.data[:200]!r}")
                continue
            read[i] = (int(reply.state.get("balance", -1)), reply.version)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(QUERY_CONCURRENCY))),
            timeout=60 + len(sample) / 100,
        )
    finally:
        await nc.close()

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


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians with min-max per scenario, and the kaya/echo ratios: the figure to quote."""
    out: dict[str, Any] = {}
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rounds:
        by.setdefault(r["scenario"], []).append(r)
    for scenario, rs in by.items():
        out[scenario] = {
            "rounds": len(rs),
            "throughput": spread([r["throughput"] for r in rs]),
            "p50_ms": spread([r["latency_ms"]["p50"] for r in rs]),
            "p99_ms": spread([r["latency_ms"]["p99"] for r in rs]),
            "p99.9_ms": spread([r["latency_ms"]["p99.9"] for r in rs]),
            "errors": dict(sum((Counter(r["errors"]) for r in rs), Counter())),
        }
        if scenario == "kaya":
            out[scenario]["verified"] = all(r["verification"]["verified"] for r in rs)
    if "echo" in by and "kaya" in by:
        pairs = list(zip(by["echo"], by["kaya"], strict=False))
        med = {s: out[s] for s in ("echo", "kaya")}
        out["ratio"] = {
            "throughput": med["kaya"]["throughput"]["median"] / med["echo"]["throughput"]["median"],
            "p99": med["kaya"]["p99_ms"]["median"] / med["echo"]["p99_ms"]["median"],
            "throughput_per_round": [k["throughput"] / e["throughput"] for e, k in pairs],
            "p99_per_round": [k["latency_ms"]["p99"] / e["latency_ms"]["p99"] for e, k in pairs],
        }
    return out


def _fmt_spread(s: dict[str, float], fmt: str) -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"e2e: {m['nproc']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"{v['nats-server']}, nats-py {v['nats-py']}, msgspec {v['msgspec']}, git {v['git']}",
        f"{s['accounts']} accounts, {s['inflight']} in flight, {s['duration']:g} s measured "
        f"after {s['warmup']:g} s warm-up, {s['rounds']} round(s) each",
        "",
        f"{'round':<6}{'scenario':<9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
        f"  {'verified':<9}{'errors':<16}cpu, in cores (x_loop: its main thread)",
    ]
    for r in results["rounds"]:
        lat = r["latency_ms"]
        cpu = " ".join(f"{k}={val:.2f}" for k, val in r["cpu_share"].items())
        verified = "-" if "verification" not in r else str(r["verification"]["verified"]).lower()
        errors = " ".join(f"{k}={n}" for k, n in r["errors"].items()) or "-"
        lines.append(
            f"{r['round']:<6}{r['scenario']:<9}{r['throughput']:>9,.0f}{lat['p50']:>9.2f}"
            f"{lat['p99']:>9.2f}{lat['p99.9']:>10.2f}  {verified:<9}{errors:<16}{cpu}"
        )
    summary = results["summary"]
    lines += ["", "median (min-max) over rounds:"]
    for scenario in ("echo", "kaya"):
        if scenario in summary:
            x = summary[scenario]
            lines.append(
                f"  {scenario:<5} {_fmt_spread(x['throughput'], ',.0f')} req/s   "
                f"p50 {_fmt_spread(x['p50_ms'], '.2f')} ms   "
                f"p99 {_fmt_spread(x['p99_ms'], '.2f')} ms"
            )
    if "ratio" in summary:
        ratio = summary["ratio"]
        tp, p99 = ratio["throughput_per_round"], ratio["p99_per_round"]
        lines.append(
            f"  kaya/echo: throughput {ratio['throughput']:.2f} "
            f"(per round {min(tp):.2f}-{max(tp):.2f}), "
            f"p99 x{ratio['p99']:.1f} (per round {min(p99):.1f}-{max(p99):.1f})"
        )
    if "kaya" in summary:
        lines.append(f"  kaya verified: {str(summary['kaya']['verified']).lower()}")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description="End-to-end deposits through a Kaya node vs a raw NATS echo, same run.",
    )
    parser.add_argument("--quick", action="store_true", help="500 accounts, 3 s, 1 round each")
    parser.add_argument("--accounts", type=int, help="accounts opened (default 2000; quick 500)")
    parser.add_argument("--inflight", type=int, default=100, help="concurrent requesters")
    parser.add_argument("--duration", type=float, help="measured seconds (default 10; quick 3)")
    parser.add_argument(
        "--warmup", type=float, help="unmeasured seconds first (default 2; quick 1)"
    )
    parser.add_argument("--rounds", type=int, help="rounds of each scenario (default 3; quick 1)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds")
    parser.add_argument(
        "--only", choices=["echo", "kaya"], help="run one scenario (no ratio is reported)"
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the nodes' data dirs")
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
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    gen = parser.add_argument_group("generator process (internal)")
    gen.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    gen.add_argument("--url", help=argparse.SUPPRESS)
    gen.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    gen.add_argument("--per-account", action="store_true", help=argparse.SUPPRESS)
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
        accounts=args.accounts or (500 if quick else 2000),
        inflight=args.inflight,
        duration=args.duration or (3.0 if quick else 10.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if quick else 2.0),
        rounds=args.rounds or (1 if quick else 3),
        timeout=args.timeout,
        scenarios=(args.only,) if args.only else ("echo", "kaya"),
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


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.generator:
        if args.accounts is None or args.duration is None or args.warmup is None or not args.url:
            raise SystemExit("--generator needs --url, --accounts, --duration and --warmup")
        return generator_main(args)

    settings = _resolve(args)
    signal.signal(signal.SIGTERM, _terminate)
    started = utc_now()
    results: dict[str, Any] = {
        "benchmark": "e2e",
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {**asdict(settings), "quick": bool(args.quick)},
        "rounds": [],
    }
    rounds: list[dict[str, Any]] = results["rounds"]
    for number in range(1, settings.rounds + 1):
        for scenario in settings.scenarios:
            run = echo_round if scenario == "echo" else kaya_round
            print(f"round {number}/{settings.rounds}: {scenario} ...", file=sys.stderr, flush=True)
            rounds.append(run(settings, number))
    results["finished_at"] = utc_now().isoformat(timespec="seconds")
    results["summary"] = summarize(rounds)
    print(render(results))
    if not args.no_write:
        for path in write_results("e2e", results, started):
            print(
                f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
            )
    kaya = results["summary"].get("kaya")
    return 1 if kaya is not None and not kaya["verified"] else 0


if __name__ == "__main__":
    sys.exit(main())
