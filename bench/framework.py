"""The small framework every benchmark scenario stands on.

A scenario is a workload, the targets it runs against and its own correctness
check; everything else is the same in each and lives here, so that a figure is
measured, summarised and written the same way whichever scenario produced it:

- **options** every scenario shares (`add_options`: --quick, --rounds, --duration,
  --warmup, --only, --keep-data, --no-write) and how a quick default is picked
  (`pick`) and `--only` is read (`parse_only`);
- **rounds alternated** across targets (`alternate`, `run_rounds`): on a shared
  2-core machine the noise drifts by the minute, so round 1 runs every target
  once, then round 2, and drift hits them all alike;
- **a measured window** in a load-generator process (`run_windowed`): the
  generator prints `window start` / `window end`, and the CPU of every process
  that matters (`sample_cpu`, `cpu_share`) is read from /proc at those two lines,
  so warm-up and drain never count;
- **results** (`new_results`, `finish`): the JSON header (machine, versions,
  settings), the chart hook, the printed table, the files under bench/results/;
- **scratch dirs** (`scratch`) removed afterwards unless kept for a post-mortem,
  and SIGTERM turned into an exit (`exit_on_sigterm`) so every `finally` that
  stops a child by its PID runs.

Processes and the systems under test are started by bench.common (`Child`) and
bench.targets (`running`, the dev-cluster helpers). "Writing a scenario" in
bench/README.md shows a minimal scenario on these parts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from bench.common import (
    BenchError,
    Child,
    cpu_seconds,
    machine_busy_seconds,
    machine_info,
    percentile,
    print_written,
    utc_now,
    versions,
    write_results,
)

_T = TypeVar("_T")

RESULT_PREFIX = "RESULT "
"""A child process prints its figures as one JSON line after this prefix."""
WINDOW_START = "window start"
WINDOW_END = "window end"
"""A load generator prints these two lines around its measured window."""
PACKAGES = ("nats-py", "msgspec", "anyio", "uvloop")
"""Packages on the measured path whose versions every result records."""


def say(text: str) -> None:
    """Progress on stderr: stdout carries the table (and a child's RESULT line)."""
    print(text, file=sys.stderr, flush=True)


# ---- command line --------------------------------------------------------------------------


def add_options(
    parser: argparse.ArgumentParser,
    *,
    quick: str,
    rounds: str | None = None,
    duration: str | None = None,
    warmup: str | None = None,
    only: str | None = None,
    keep_data: str | None = None,
) -> argparse.ArgumentParser:
    """The options every scenario shares, with its own help text; None leaves one out.

    The names and types are the same in every scenario so `bench.suite` and a user
    can pass `--quick --rounds 2 --no-write` to any of them. Defaults stay None: the
    scenario picks its quick or full default (`pick`) once it knows `--quick`.
    """
    parser.add_argument("--quick", action="store_true", help=quick)
    if rounds is not None:
        parser.add_argument("--rounds", type=int, help=rounds)
    if duration is not None:
        parser.add_argument("--duration", type=float, help=duration)
    if warmup is not None:
        parser.add_argument("--warmup", type=float, help=warmup)
    if only is not None:
        parser.add_argument("--only", help=only)
    if keep_data is not None:
        parser.add_argument("--keep-data", action="store_true", help=keep_data)
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    return parser


def pick(value: _T | None, quick: bool, quick_default: _T, full_default: _T) -> _T:
    """`value` when given on the command line (0 included), else the mode's default."""
    if value is not None:
        return value
    return quick_default if quick else full_default


def parse_only(text: str | None, known: Sequence[str], default: Sequence[str]) -> tuple[str, ...]:
    """`--only a,b` as a tuple in the order given; `default` without it; exit on a typo."""
    if not text:
        return tuple(default)
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in chosen if x not in known]
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return chosen


def exit_on_sigterm() -> None:
    """SIGTERM (the suite's time limit, a CI cancel) unwinds like an exception, so the
    `finally` blocks that stop children by PID and remove scratch dirs still run."""

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)


# ---- rounds ----------------------------------------------------------------------------------


def alternate(rounds: int, scenarios: Sequence[_T]) -> list[tuple[int, _T]]:
    """(round, scenario) in the order to run them: every scenario once per round.

    Round-major, never scenario-major: a minute of noise on the machine then lands
    on one round of each scenario rather than on every round of one.
    """
    return [(number, s) for number in range(1, rounds + 1) for s in scenarios]


def run_rounds(
    rounds: int, scenarios: Sequence[str], one: Callable[[str, int], dict[str, Any]]
) -> list[dict[str, Any]]:
    """`one(scenario, round)` for every pair of `alternate`, saying each on stderr."""
    out = []
    for number, scenario in alternate(rounds, scenarios):
        say(f"round {number}/{rounds}: {scenario} ...")
        out.append(one(scenario, number))
    return out


@contextlib.contextmanager
def scratch(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh temp dir for one run; removed afterwards unless `keep` (then said on stderr)."""
    path = Path(tempfile.mkdtemp(prefix=f"kaya-bench-{prefix}-"))
    try:
        yield path
    finally:
        if keep:
            say(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# ---- CPU over a window -----------------------------------------------------------------------


def sample_cpu(
    pids: Mapping[str, int],
    *,
    no_loop: Sequence[str] = ("nats_server",),
    me: bool = False,
    machine: bool = False,
) -> dict[str, float]:
    """CPU seconds so far per process, and `<name>_loop` for the main thread of each one
    not in `no_loop` (a Python process's event loop: near a whole core, it is the limit).

    `me` adds this process as `bench`; `machine` every core's busy time, from which
    `cpu_share` tells what processes this benchmark did not start took (the noise).
    """
    out: dict[str, float] = {}
    for name, pid in {**pids, **({"bench": os.getpid()} if me else {})}.items():
        total = cpu_seconds(pid)
        if total is not None:
            out[name] = total
        if name not in no_loop and name != "bench":
            loop = cpu_seconds(pid, main_thread=True)
            if loop is not None:
                out[f"{name}_loop"] = loop
    busy = machine_busy_seconds() if machine else None
    if busy is not None:
        out["machine"] = busy
    return out


def cpu_share(
    before: Mapping[str, float],
    after: Mapping[str, float],
    seconds: float,
    *,
    split: bool = False,
) -> dict[str, float]:
    """Cores used between two `sample_cpu` samples (1.0 = one core busy throughout).

    With `split`, `<name>_other` is a process's threads other than its loop (SQLite
    threads). A `machine` sample becomes `foreign`: busy time no process of ours spent.
    """
    if seconds <= 0:
        return {}
    out = {k: round((after[k] - v) / seconds, 3) for k, v in before.items() if k in after}
    if split:
        for name in [k for k in out if f"{k}_loop" in out]:
            out[f"{name}_other"] = round(out[name] - out[f"{name}_loop"], 3)
    if "machine" in out:
        ours = sum(
            v for k, v in out.items() if k != "machine" and not k.endswith(("_loop", "_other"))
        )
        out["foreign"] = round(max(0.0, out.pop("machine") - ours), 3)
    return out


# ---- a child process with a measured window ---------------------------------------------------


def module_argv(module: str, *args: str, **options: Any) -> list[str]:
    """`python -m <module> *args --an-option value ...` for a child process of this venv.

    `an_option=` becomes `--an-option`; True a bare flag; None and False are left out.
    """
    out = [sys.executable, "-m", module, *args]
    for name, value in options.items():
        if value is None or value is False:
            continue
        out.append("--" + name.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out


async def mark_window(start_ns: int, end_ns: int) -> tuple[float, float]:
    """The generator side: print the window's two lines at perf_counter_ns `start_ns` and
    `end_ns` (the parent samples CPU there); this process's CPU seconds at both."""
    import asyncio

    await asyncio.sleep(max(0.0, (start_ns - time.perf_counter_ns()) / 1e9))
    cpu0 = time.process_time()
    print(WINDOW_START, flush=True)
    await asyncio.sleep(max(0.0, (end_ns - time.perf_counter_ns()) / 1e9))
    print(WINDOW_END, flush=True)
    return cpu0, time.process_time()


def emit_result(result: Mapping[str, Any], prefix: str = RESULT_PREFIX) -> None:
    """The child side: its figures as one stdout line for `read_result`."""
    print(prefix + json.dumps(result), flush=True)


def read_result(child: Child, timeout: float, prefix: str = RESULT_PREFIX) -> dict[str, Any]:
    """Wait (bounded) for `child` to exit 0 and return the JSON of its RESULT line."""
    code = child.wait(timeout)
    line = next((x for x in child.lines if x.startswith(prefix)), None)
    if code != 0 or line is None:
        raise BenchError(f"{child.name} exited with {code}: {child.stderr_tail()}")
    result: dict[str, Any] = json.loads(line.removeprefix(prefix))
    return result


@dataclass
class Window(Generic[_T]):
    """What a generator reported, and `sample()` taken at its window's two edges."""

    result: dict[str, Any]
    before: _T
    after: _T
    seconds: float
    """Wall time between the two samples, as this process saw it."""


def run_windowed(
    child: Child,
    sample: Callable[[], _T],
    *,
    warmup: float,
    duration: float,
    drain: float,
    prefix: str = RESULT_PREFIX,
) -> Window[_T]:
    """Sample at the child's `window start` and `window end`, then read its result.

    The child is stopped by its PID whatever happens. `drain` bounds the wait for its
    exit after the window (outstanding requests time out in that time).
    """
    try:
        child.wait_for_line(WINDOW_START, timeout=warmup + 30)
        before = sample()
        t0 = time.monotonic()
        child.wait_for_line(WINDOW_END, timeout=duration + 30)
        seconds = time.monotonic() - t0
        after = sample()
        result = read_result(child, drain + 30, prefix)
    finally:
        child.stop()
    return Window(result, before, after, seconds)


def generator_cpu(window: Window[dict[str, float]]) -> dict[str, float]:
    """Cores per process over a generator's window, the generator's own as it measured it."""
    cpu = cpu_share(window.before, window.after, window.seconds)
    cpu["generator"] = round(window.result.pop("generator_cpu_share"), 3)
    return cpu


# ---- results ---------------------------------------------------------------------------------


def new_results(
    name: str,
    settings: Any,
    *,
    quick: bool,
    packages: Sequence[str] = PACKAGES,
    **extra: Any,
) -> dict[str, Any]:
    """The head of every result file: what ran, when, on what machine, with which settings.

    A figure means little without the machine and versions it came from; `settings`
    is a dataclass or a dict, recorded with `quick`.
    """
    started = utc_now()
    fields = asdict(settings) if is_dataclass(settings) else dict(settings)
    return {
        "benchmark": name,
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(packages),
        "settings": {**fields, "quick": quick},
        **extra,
    }


def finish(
    results: dict[str, Any],
    *,
    write: bool,
    render: Callable[[dict[str, Any]], str],
    chart: Callable[[dict[str, Any]], list[str]] | None = None,
    output: Path | None = None,
) -> None:
    """Close a run: charts (when writing), the printed table, the JSON files.

    JSON goes to `bench/results/<benchmark>-<stamp>.json` and `-latest.json` (what the
    suite and the docs read), or to `output` alone when a run names its own file.
    """
    results.setdefault("finished_at", utc_now().isoformat(timespec="seconds"))
    results["charts"] = chart(results) if write and chart is not None else []
    print(render(results))
    if not write:
        return
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print_written([output])
        return
    started = dt.datetime.fromisoformat(results["started_at"])
    paths = write_results(results["benchmark"], results, started)
    print_written([*paths, *map(Path, results["charts"])])


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How this run was started, for the result file: enough to run it again."""
    return f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])


# ---- summary maths ---------------------------------------------------------------------------


def latency_ms(values_ns: Sequence[int]) -> dict[str, float]:
    """Latencies in ns as count, nearest-rank p50/p90/p99/p99.9, max and mean, in ms."""
    ms = sorted(x / 1e6 for x in values_ns)
    return {
        "count": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "p99.9": percentile(ms, 99.9),
        "max": ms[-1] if ms else math.nan,
        "mean": sum(ms) / len(ms) if ms else math.nan,
    }


def by_scenario(rounds: Sequence[Mapping[str, Any]], key: str = "scenario") -> dict[str, list[Any]]:
    """Rounds grouped by scenario, in the order each first ran (for per-scenario spreads)."""
    out: dict[str, list[Any]] = {}
    for r in rounds:
        out.setdefault(r[key], []).append(r)
    return out
