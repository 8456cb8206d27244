"""Open-loop scenarios: latency versus offered load, and overload at 3x peak.

    python -m bench.load [--quick] [--only curve|overload] [--no-write]

`curve` (scenario 1's chart). For each target (the raw echo responder, then a
Kaya node), on one fresh instance: the closed-loop peak is measured first
(bench/e2e.py's generator, 100 in flight, then 1000 in flight: the saturation
peak, which for Kaya is higher since its turns and commits batch more), then
constant arrival rates at fractions of the saturation peak, up past it, each
from the open-loop generator (bench/openloop.py) in its own process. Latency is
measured from each request's due time, so a stall shows in the tail instead of
slowing the generator down.
The chart plots p50/p99 against the offered rate for both; where a curve turns
up is the knee a capacity plan should stay below.

`overload` (scenario 7). The curve's node (or, without a curve on kaya, a fresh one
with its saturation peak measured first), monitoring on, gets 3x its saturation
peak for 20 s (quick: 5 s). What must hold:

- accepted commands/s stays near the peak (the node keeps working at capacity
  instead of thrashing);
- the rest are refused with `overloaded`, quickly (the ingress bounds commands in
  flight, `[ingress] max_inflight`), not left to time out;
- the p99 of accepted commands stays bounded: by Little's law, at most about
  max_inflight / peak seconds of queue;
- the node's RSS stays flat (every queue is bounded);
- nats-server reports no new slow consumer (`/varz slow_consumers`);
- afterwards every acknowledged deposit is in the balances (sum check).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import e2e
from bench import framework as fw
from bench.charts import line_chart
from bench.common import (
    Child,
    memory_kib,
    render_targets,
    target,
    utc_now,
)
from bench.openloop import OpenLoopSettings, run_generator_argv
from bench.targets import STATEFUL, Running, running

CURVE_FRACTIONS = (0.1, 0.25, 0.5, 0.7, 0.85, 1.0, 1.15, 1.3)
QUICK_FRACTIONS = (0.25, 0.6, 0.9, 1.2)
PARTS = ("curve", "overload")
OVERLOAD_FACTOR = 3.0
INGRESS_MAX_INFLIGHT = 10_000
"""The node's default `[ingress] max_inflight`: the bound Little's law puts on queueing."""
RSS_SAMPLE = 0.25
SATURATION_INFLIGHT = 1000
"""Closed-loop requesters for the saturation peak the curve and the overload are scaled to."""


@dataclass(frozen=True)
class Settings:
    accounts: int
    peak_duration: float
    point_duration: float
    warmup: float
    fractions: tuple[float, ...]
    overload_duration: float
    timeout: float
    parts: tuple[str, ...]
    curve_targets: tuple[str, ...] = ("echo", "kaya")


# ---- running the generators ------------------------------------------------------------------


def closed_loop_peak(
    settings: Settings, target: Running, workdir: Path, inflight: int
) -> dict[str, Any]:
    """The target's req/s with `inflight` closed-loop requesters (bench/e2e.py's generator).

    Kaya decides a mailbox's queued commands in one turn and commits many turns in
    one transaction, so its throughput grows with concurrency: at 100 in flight it is
    latency-bound, at SATURATION_INFLIGHT it shows what the node can do at most.
    """
    e2e_settings = e2e.Settings(
        accounts=settings.accounts,
        inflight=inflight,
        duration=settings.peak_duration,
        warmup=settings.warmup,
        rounds=1,
        timeout=settings.timeout,
        scenarios=(target.name,),
        keep_data=False,
    )
    result = e2e.run_generator(e2e_settings, target.url, 1, workdir, target.cpu_pids)
    return {
        "inflight": inflight,
        "throughput": result["throughput"],
        "latency_ms": result["latency_ms"],
        "errors": result["errors"],
        "cpu_share": result["cpu_share"],
    }


class RssSampler:
    """RSS of one process every RSS_SAMPLE seconds on a thread, until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = memory_kib(self.pid).get("rss_kib")
            if rss is not None:
                self.samples.append((round(time.monotonic() - self._t0, 2), rss))
            self._stop.wait(RSS_SAMPLE)


def open_loop(
    settings: Settings,
    target: Running,
    workdir: Path,
    rate: float,
    duration: float,
    seed: int,
) -> dict[str, Any]:
    """One open-loop run at `rate` in its own process; RSS of the target sampled throughout."""
    ol = OpenLoopSettings(
        url=target.url,
        accounts=settings.accounts,
        rate=rate,
        warmup=settings.warmup,
        duration=duration,
        timeout=settings.timeout,
        max_inflight=30_000,
        seed=seed,
    )
    generator = Child("openloop", run_generator_argv(ol), workdir / f"openloop-{seed}.log")
    with RssSampler(target.main_pid) as rss:
        window = fw.run_windowed(
            generator,
            lambda: len(rss.samples),
            warmup=settings.warmup,
            duration=duration,
            drain=settings.timeout,
        )
    result = window.result
    in_window = [kib for _, kib in rss.samples[window.before : window.after]]
    result["rss_kib"] = {
        "first": in_window[0] if in_window else None,
        "max": max(in_window) if in_window else None,
        "last": in_window[-1] if in_window else None,
    }
    result["rss_series"] = rss.samples
    result["generator_cpu_share"] = result["generator_cpu_s"] / (settings.warmup + duration)
    return result


# ---- the scenarios ---------------------------------------------------------------------------


def curve(
    settings: Settings, name: str, *, then_overload: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Peak, then the offered-load sweep, on one fresh instance of target `name`.

    With `then_overload` (kaya), the overload runs on the same node afterwards: it has
    its accounts open and its saturation peak measured already, and a node that has
    been working is what meets an overload in production anyway.
    """
    out: dict[str, Any] = {"target": name, "points": []}
    over: dict[str, Any] | None = None
    with fw.scratch(f"curve-{name}") as workdir:
        with running(name, workdir, monitor=then_overload) as target:
            if name in STATEFUL:
                asyncio.run(e2e.open_accounts(target.url, settings.accounts))
            out["peak"] = closed_loop_peak(settings, target, workdir, 100)
            out["saturation"] = closed_loop_peak(settings, target, workdir, SATURATION_INFLIGHT)
            peak = out["saturation"]["throughput"]
            for i, fraction in enumerate(settings.fractions):
                quiet_s = target.wait_quiet()
                rate = max(1.0, fraction * peak)
                fw.say(f"  {name} at {rate:,.0f}/s ({fraction:.0%} of saturation)")
                point = open_loop(settings, target, workdir, rate, settings.point_duration, i + 1)
                point.pop("rss_series")
                out["points"].append({"fraction": fraction, "waited_quiet_s": quiet_s, **point})
            if then_overload:
                over = overload_on(settings, target, workdir, {"throughput": peak, "from": "curve"})
        out.update(target.info)
    return out, over


def overload(settings: Settings) -> dict[str, Any]:
    """3x the saturation peak on a fresh node with monitoring (when no curve ran on kaya)."""
    with fw.scratch("overload") as workdir:
        with running("kaya", workdir, monitor=True) as node:
            asyncio.run(e2e.open_accounts(node.url, settings.accounts))
            peak = closed_loop_peak(settings, node, workdir, SATURATION_INFLIGHT)
            out = overload_on(settings, node, workdir, peak)
        out.update(node.info)
    return out


def overload_on(
    settings: Settings, node: Running, workdir: Path, peak: dict[str, Any]
) -> dict[str, Any]:
    """3x `peak` on a node whose accounts are open; then the sum of balances is checked."""
    out: dict[str, Any] = {"peak": peak}
    out["waited_quiet_s"] = node.wait_quiet()
    before = asyncio.run(sum_of_balances(node.url, settings.accounts))
    varz_before = node.server_varz() or {}
    rate = OVERLOAD_FACTOR * peak["throughput"]
    fw.say(f"  kaya at {rate:,.0f}/s (3x peak) ...")
    run = open_loop(settings, node, workdir, rate, settings.overload_duration, 99)
    varz_after = node.server_varz() or {}
    out["run"] = run
    out["slow_consumers"] = {
        "before": varz_before.get("slow_consumers"),
        "after": varz_after.get("slow_consumers"),
    }
    after = asyncio.run(sum_of_balances(node.url, settings.accounts))
    out["balances"] = check_sum(before, after, run)
    out["memory"] = node.memory()
    return out


async def sum_of_balances(url: str, accounts: int) -> tuple[int, int]:
    """(sum of balances, accounts that could not be read) over acc-0..acc-N-1."""
    subjects = [f"kaya.qry.account.{e2e.account_id(i)}" for i in range(accounts)]
    total = failures = 0
    for data in await e2e.request_all(url, subjects, b""):
        reply = e2e._decode_reply(data)
        if reply.ok and reply.state is not None:
            total += int(reply.state.get("balance", 0))
        else:
            failures += 1
    return total, failures


def check_sum(
    before: tuple[int, int], after: tuple[int, int], run: dict[str, Any]
) -> dict[str, Any]:
    """Every deposit acknowledged in the run (warm-up included) is in the balances, and
    nothing refused is: the sum grew by the acknowledged count, plus at most the unknown."""
    outcomes = run["outcomes_all"]
    acknowledged = outcomes.get("ok", 0)
    unknown = outcomes.get("client_timeout", 0) + run["abandoned"]
    grew = after[0] - before[0]
    return {
        "sum_grew_by": grew,
        "acknowledged": acknowledged,
        "refused": outcomes.get("overloaded", 0),
        "unknown_outcomes": unknown,
        "query_failures": before[1] + after[1],
        "verified": before[1] + after[1] == 0 and acknowledged <= grew <= acknowledged + unknown,
    }


# ---- summary ---------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    over = results.get("overload")
    if not over:
        return out
    run, peak = over["run"], over["peak"]["throughput"]
    out.append(target("overload: accepted/s vs saturation peak", run["throughput"], peak, 0.8))
    out.append(
        target(
            "overload: refusals answered, p99 ms",
            run["rejected_ms"]["p99"] if run["rejected_ms"]["count"] else 0.0,
            1.0,
            100.0,
            unit="ms",
            lower_is_better=True,
        )
    )
    bound_ms = INGRESS_MAX_INFLIGHT / peak * 1000
    out.append(
        target(
            "overload: accepted p99 vs Little's-law bound",
            run["service_ms"]["p99"],
            bound_ms,
            1.5,
            unit="x bound",
            lower_is_better=True,
        )
    )
    series = [kib for _, kib in run["rss_series"]]
    if len(series) >= 8:
        # bounded means it levels off: the last quarter of the run against the second
        mid, end = series[len(series) // 2], max(series[-len(series) // 4 :])
        out.append(
            target(
                "overload: node RSS, last quarter max vs half-way",
                end,
                mid,
                1.15,
                unit="x",
                lower_is_better=True,
            )
        )
    slow = over["slow_consumers"]
    if slow["before"] is not None and slow["after"] is not None:
        out.append(
            target(
                "overload: new slow consumers on nats-server",
                float(slow["after"] - slow["before"]),
                1.0,
                0.0,
                unit="count",
                lower_is_better=True,
            )
        )
    return out


def chart(results: dict[str, Any]) -> list[str]:
    paths = []
    curves = results.get("curves", {})
    m, v = results["machine"], results["versions"]
    note = f"open loop, latency from due time; {m['nproc']} cores, git {v['git']}"
    if curves:
        series: dict[str, list[tuple[float, float]]] = {}
        achieved: dict[str, list[tuple[float, float]]] = {}
        for name, c in curves.items():
            pts = c["points"]
            series[f"{name} p50"] = [(p["offered_rate"], p["latency_ms"]["p50"]) for p in pts]
            series[f"{name} p99"] = [(p["offered_rate"], p["latency_ms"]["p99"]) for p in pts]
            achieved[name] = [(p["offered_rate"], p["throughput"]) for p in pts]
        paths.append(
            line_chart(
                "load-latency-vs-offered",
                "Latency vs offered load",
                "offered req/s",
                "ms (log)",
                series,
                logy=True,
                note=note,
            )
        )
        paths.append(
            line_chart(
                "load-achieved-vs-offered",
                "Achieved vs offered load",
                "offered req/s",
                "ok replies/s",
                achieved,
                note=note,
            )
        )
    over = results.get("overload")
    if over:
        rss = over["run"]["rss_series"]
        paths.append(
            line_chart(
                "load-overload-rss",
                f"Node RSS at {OVERLOAD_FACTOR:g}x peak",
                "seconds since the generator started",
                "RSS MiB",
                {"node RSS": [(t, kib / 1024) for t, kib in rss]},
                note=f"{m['nproc']} cores, git {v['git']}",
            )
        )
    return [str(p) for p in paths if p is not None]


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"load: {m['nproc']} cores, Python {m['python']}, {v['nats-server']}, git {v['git']}",
        f"{s['accounts']} accounts; open loop, latency from each request's due time",
    ]
    for name, c in results.get("curves", {}).items():
        peak, sat = c["peak"], c["saturation"]
        lines += [
            "",
            f"{name}: closed loop, 100 in flight {peak['throughput']:,.0f} req/s "
            f"(p99 {peak['latency_ms']['p99']:.1f} ms); {sat['inflight']} in flight "
            f"{sat['throughput']:,.0f} req/s (p99 {sat['latency_ms']['p99']:.1f} ms)",
            f"  {'offered/s':>10}{'ok/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
            f"{'late':>7}  {'gen cpu':>7}  other outcomes",
        ]
        for p in c["points"]:
            lat = p["latency_ms"]
            other = " ".join(f"{k}={n}" for k, n in p["outcomes"].items() if k != "ok") or "-"
            lines.append(
                f"  {p['offered_rate']:>10,.0f}{p['throughput']:>9,.0f}{lat['p50']:>9.1f}"
                f"{lat['p99']:>9.1f}{lat['p99.9']:>10.1f}{p['late_sends']:>7}"
                f"  {p['generator_cpu_share']:>7.2f}  {other}"
            )
    over = results.get("overload")
    if over:
        run = over["run"]
        rss = run["rss_kib"]
        lines += [
            "",
            f"overload: offered {run['offered_rate']:,.0f}/s = {OVERLOAD_FACTOR:g}x peak "
            f"{over['peak']['throughput']:,.0f}/s for {s['overload_duration']:g} s",
            f"  accepted {run['throughput']:,.0f}/s, outcomes {run['outcomes']}",
            f"  accepted: service p50 {run['service_ms']['p50']:.0f} ms, "
            f"p99 {run['service_ms']['p99']:.0f} ms (from due time p99 "
            f"{run['latency_ms']['p99']:.0f} ms); refused: p50 {run['rejected_ms']['p50']:.1f} ms, "
            f"p99 {run['rejected_ms']['p99']:.1f} ms",
            f"  node RSS MiB: start {(rss['first'] or 0) / 1024:.0f}, "
            f"max {(rss['max'] or 0) / 1024:.0f}, end {(rss['last'] or 0) / 1024:.0f}; "
            f"slow consumers {over['slow_consumers']}",
            f"  balances: {over['balances']}",
        ]
    if results.get("targets"):
        lines += ["", "targets:", render_targets(results["targets"])]
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------


def resolve(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    fractions = QUICK_FRACTIONS if quick else CURVE_FRACTIONS
    if args.points:
        fractions = fractions[:: max(1, len(fractions) // args.points)][: args.points]
    return Settings(
        accounts=500 if quick else 10_000,
        peak_duration=args.duration or (2.0 if quick else 4.0),
        point_duration=args.duration or (2.0 if quick else 4.0),
        warmup=0.5 if quick else 1.0,
        fractions=fractions,
        overload_duration=args.overload_duration or (5.0 if quick else 20.0),
        timeout=5.0,
        parts=fw.parse_only(args.only, PARTS, PARTS),
        curve_targets=tuple(args.curve.split(",")) if args.curve else ("echo", "kaya"),
    )


def run(settings: Settings, quick: bool = False) -> dict[str, Any]:
    results = fw.new_results("load", settings, quick=quick)
    want_overload = "overload" in settings.parts
    if "curve" in settings.parts:
        results["curves"] = {}
        for name in settings.curve_targets:
            fw.say(f"curve: {name} ...")
            then = want_overload and name == "kaya"
            results["curves"][name], over = curve(settings, name, then_overload=then)
            if over is not None:
                results["overload"] = over
    if want_overload and "overload" not in results:
        fw.say("overload ...")
        results["overload"] = overload(settings)
    results["finished_at"] = utc_now().isoformat(timespec="seconds")
    results["targets"] = targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description="Latency vs offered load (open loop) and overload at 3x peak.",
    )
    fw.add_options(
        parser,
        quick="500 accounts, 4 points, 5 s overload",
        duration="seconds per curve point and peak",
        only="run one part: curve or overload",
    )
    parser.add_argument(
        "--curve", help="targets for the curve, comma-separated (default echo,kaya)"
    )
    parser.add_argument(
        "--points", type=int, help="offered loads on the curve (default 8; quick 4)"
    )
    parser.add_argument(
        "--overload-duration", type=float, help="seconds at 3x (default 20; quick 5)"
    )
    args = parser.parse_args(argv)
    if args.curve and set(args.curve.split(",")) - {"echo", "kaya"}:
        raise SystemExit("--curve takes echo, kaya or both")
    fw.exit_on_sigterm()
    results = run(resolve(args), quick=bool(args.quick))
    fw.finish(results, write=not args.no_write, render=render, chart=chart)
    over = results.get("overload")
    return 1 if over and not over["balances"]["verified"] else 0


if __name__ == "__main__":
    sys.exit(main())
