"""The whole benchmark suite: every scenario, one table of targets, one summary file.

    python -m bench.suite [--quick] [--only e2e,load,...]      (make bench / make bench-quick)

Each benchmark runs as its own process (`python -m bench.<name>`, with `--quick`
for the quick suite), one after the other so they never compete for the two
cores, each under a time limit. Each writes its JSON and PNG charts under
bench/results/ and prints its own table; the suite then reads the JSON each
wrote and prints every target from the issue in one table: the figure, its
same-run baseline, the ratio, the goal, met or missed. The summary goes to
bench/results/suite-latest.json (and a stamped copy) with the machine and
versions.

A benchmark that fails or overruns is reported as such; the others still run.
The exit status is 1 if any benchmark failed (a failed correctness check
included), not if a performance target was missed: targets are what the
numbers are compared to, a run that measured them honestly succeeded.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    machine_info,
    print_written,
    render_targets,
    utc_now,
    versions,
    write_results,
)
from bench.framework import exit_on_sigterm


@dataclass(frozen=True)
class Benchmark:
    name: str
    what: str
    quick_args: tuple[str, ...]
    full_args: tuple[str, ...] = ()
    limit_s: float = 600.0
    quick: bool = True
    """Part of the quick suite too (the full suite runs everything)."""


BENCHMARKS: tuple[Benchmark, ...] = (
    # quick: the least that still measures each scenario beside its baseline (under a minute);
    # full: every scenario at its size, 2-3 rounds (~9-10 min in all)
    Benchmark(
        "e2e",
        "1-2 end-to-end commands, hot key, baselines",
        ("--quick", "--only", "echo,kaya,kaya-split,naive", "--duration", "1", "--warmup", "0.5"),
        ("--rounds", "2"),
    ),
    Benchmark(
        "load",
        "1, 7 latency vs offered load; overload at 3x peak",
        (
            "--quick",
            "--curve",
            "kaya",
            "--points",
            "2",
            "--duration",
            "1",
            "--overload-duration",
            "2",
        ),
        ("--duration", "3"),
    ),
    Benchmark(
        "store",
        "3 event store alone: group commit vs raw sqlite3",
        ("--quick", "--duration", "0.5", "--warmup", "0.3"),
        ("--rounds", "2"),
    ),
    Benchmark(
        "relay",
        "4 relay vs raw publish; read-model lag",
        ("--quick", "--events", "10000", "--duration", "2", "--no-solo"),
        ("--events", "100000", "--rounds", "2"),
    ),
    Benchmark(
        "consumers",
        "4 consumers vs raw fetch+ack",
        ("--quick", "--events", "10000"),
        ("--rounds", "2"),
    ),
    Benchmark(
        "actors",
        "5 actors in-process: mailboxes, memory, 1M entities",
        ("--quick", "--sizes", "1000,50000"),
        ("--rounds", "3"),
    ),
    Benchmark(
        "recovery",
        "6 activation vs history, restart vs store size",
        ("--quick", "--rounds", "2", "--no-unrelayed"),
    ),
    Benchmark(
        "transfers", "sagas: transfers vs deposits", ("--quick",), ("--rounds", "2"), quick=False
    ),
)


def _available(name: str) -> bool:
    return (Path(__file__).parent / f"{name}.py").exists()


def run_one(bench: Benchmark, quick: bool, write: bool = True) -> dict[str, Any]:
    """Run one benchmark process to the end (bounded); its output streams to our terminal."""
    argv = [
        sys.executable,
        "-m",
        f"bench.{bench.name}",
        *(bench.quick_args if quick else bench.full_args),
        *([] if write else ["--no-write"]),
    ]
    latest = RESULTS_DIR / f"{bench.name}-latest.json"
    before = latest.stat().st_mtime if latest.exists() else 0.0
    print(f"\n=== {bench.name}: {bench.what} ({' '.join(argv[2:])}) ===", flush=True)
    t0 = time.monotonic()
    process = subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent)
    try:
        code = process.wait(timeout=bench.limit_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the benchmark stops its children on SIGTERM
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        code = None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    out: dict[str, Any] = {
        "name": bench.name,
        "seconds": round(time.monotonic() - t0, 1),
        "exit_code": code,
        "timed_out": code is None,
    }
    if latest.exists() and latest.stat().st_mtime > before:
        results = json.loads(latest.read_text())
        out["results_file"] = str(latest.relative_to(RESULTS_DIR.parent.parent))
        out["targets"] = results.get("targets", [])
        out["charts"] = results.get("charts", [])
    else:
        out["targets"] = []
        out["charts"] = []
        out["note"] = "wrote no results"
    return out


def render(summary: dict[str, Any]) -> str:
    m, v = summary["machine"], summary["versions"]
    lines = [
        "",
        f"=== suite ({'quick' if summary['quick'] else 'full'}): {m['nproc']} cores "
        f"({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}, "
        f"{v['nats-server']}, git {v['git']} ===",
        f"{'benchmark':<11}{'seconds':>8}  status",
    ]
    for b in summary["benchmarks"]:
        status = (
            "skipped (not built)"
            if b.get("skipped")
            else "timed out"
            if b["timed_out"]
            else "ok"
            if b["exit_code"] == 0
            else f"FAILED (exit {b['exit_code']})"
        )
        lines.append(f"{b['name']:<11}{b.get('seconds', 0):>8.1f}  {status}")
    targets = [t for b in summary["benchmarks"] for t in b.get("targets", [])]
    if targets:
        met = sum(t["met"] for t in targets)
        lines += ["", f"targets ({met} of {len(targets)} met):", render_targets(targets)]
    lines.append(f"\ntotal {summary['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every benchmark in its quick mode")
    parser.add_argument("--only", help="comma-separated benchmarks to run (default all)")
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="each benchmark prints only; no JSON, no charts (and so no table of targets)",
    )
    args = parser.parse_args(argv)
    chosen = {x.strip() for x in args.only.split(",")} if args.only else None
    known = {b.name for b in BENCHMARKS}
    if chosen and chosen - known:
        unknown = ", ".join(sorted(chosen - known))
        raise SystemExit(f"--only: unknown {unknown}; known: {', '.join(sorted(known))}")
    exit_on_sigterm()
    started = utc_now()
    t0 = time.monotonic()
    summary: dict[str, Any] = {
        "benchmark": "suite",
        "quick": bool(args.quick),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "benchmarks": [],
    }
    for bench in BENCHMARKS:
        if chosen is not None and bench.name not in chosen:
            continue
        if args.quick and not bench.quick and chosen is None:
            print(f"\n=== {bench.name}: not in the quick suite (slow); --only {bench.name} runs it")
            continue
        if not _available(bench.name):
            summary["benchmarks"].append({"name": bench.name, "skipped": True})
            continue
        summary["benchmarks"].append(run_one(bench, bool(args.quick), not args.no_write))
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["finished_at"] = utc_now().isoformat(timespec="seconds")
    print(render(summary))
    if not args.no_write:
        print_written(write_results("suite", summary, started))
    failed = [b for b in summary["benchmarks"] if not b.get("skipped") and b["exit_code"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
