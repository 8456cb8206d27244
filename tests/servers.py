"""Real processes for integration tests: a nats-server and `kaya run`, stopped by PID.

Readiness is read from the process's output with a deadline, never slept for.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from kaya.app.broker.embedded import ServerSettings, find_binary, server_config

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_line(proc: subprocess.Popen[bytes], stream: str, needle: bytes, timeout: float) -> str:
    """Read `stream` ('stdout' or 'stderr') until a line contains `needle`; fail at the deadline."""
    pipe = getattr(proc, stream)
    seen: deque[str] = deque(maxlen=30)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            line = pipe.readline()
            if not line:
                proc.wait(timeout=5)
                raise RuntimeError(f"exited with {proc.returncode} before {needle!r}: {list(seen)}")
            seen.append(line.decode(errors="replace").rstrip())
            if needle in line:
                return seen[-1]
    raise TimeoutError(f"no {needle!r} within {timeout}s: {list(seen)}")


def drain(proc: subprocess.Popen[bytes], stream: str, into: deque[str]) -> None:
    """Keep reading a pipe so the child never blocks on a full one."""
    pipe = getattr(proc, stream)

    def run() -> None:
        for line in iter(pipe.readline, b""):
            into.append(line.decode(errors="replace").rstrip())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    proc._drains = [*getattr(proc, "_drains", []), thread]  # type: ignore[attr-defined]


def stop_pid(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    """Signal the process, wait (bounded), SIGKILL if it lingers; close its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for thread in getattr(proc, "_drains", []):
        thread.join(timeout=5)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return proc.returncode


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


@dataclass
class NatsServer:
    proc: subprocess.Popen[bytes]
    port: int
    store_dir: Path
    log: deque[str] = field(default_factory=lambda: deque(maxlen=200))

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_pid(self.proc)


def start_nats_server(store_dir: Path, *, shards: int = 16, port: int = 0) -> NatsServer:
    """A real nats-server with JetStream and Kaya's shard mapping on a (free) loopback port."""
    port = port or free_port()
    settings = ServerSettings(port=port, monitor_port=0, store_dir=store_dir, shards=shards)
    server = NatsServer(spawn_server(settings), port, store_dir)
    drain(server.proc, "stderr", server.log)
    return server


def spawn_server(settings: ServerSettings) -> subprocess.Popen[bytes]:
    """nats-server with `settings` (its config written in its store dir), once it logged
    that it is ready; its stderr is left for the caller to drain."""
    settings.store_dir.mkdir(parents=True, exist_ok=True)
    conf = settings.store_dir / "nats-server.conf"
    conf.write_text(server_config(settings))
    proc = subprocess.Popen(
        [find_binary(), "-c", str(conf)],
        bufsize=0,  # unbuffered: select() and readline() must agree on what is unread
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_line(proc, "stderr", b"Server is ready", 15)
    except BaseException:
        stop_pid(proc)
        raise
    return proc


@dataclass
class KayaProcess:
    proc: subprocess.Popen[bytes]
    url: str
    ready_line: str
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=500))

    def server_pids(self) -> list[int]:
        return children(self.proc.pid)


def write_config(path: Path, data_dir: Path, *, port: int, extra: str = "") -> Path:
    path.write_text(
        f'[node]\ndata_dir = "{data_dir}"\napp = "examples.bank:app"\n'
        f"[nats]\nport = {port}\nmonitor_port = 0\n"
        f'[log]\nlevel = "info"\n{extra}'
    )
    return path


def start_kaya(
    config: Path,
    *,
    timeout: float = 30,
    argv: list[str] | None = None,
    cwd: Path | None = None,
) -> KayaProcess:
    """`kaya run --config CONFIG` (or `argv`) as a child in `cwd` (the repository's root
    by default, where `examples.bank` is importable); returns once it printed `ready`."""
    proc = subprocess.Popen(
        argv or [str(VENV_BIN / "kaya"), "run", "--config", str(config)],
        cwd=cwd or Path(__file__).resolve().parent.parent,
        bufsize=0,  # unbuffered: select() and readline() must agree on what is unread
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    log: deque[str] = deque(maxlen=500)
    drain(proc, "stderr", log)
    try:
        line = wait_for_line(proc, "stdout", b"ready", timeout)
    except BaseException:
        stop_pid(proc, signal.SIGKILL)
        raise
    url = next(tok for tok in line.split() if tok.startswith("nats://"))
    drain(proc, "stdout", deque(maxlen=10))
    return KayaProcess(proc, url, line, log)


def wait_gone(pid: int, timeout: float = 15) -> bool:
    """Poll /proc for the process to disappear: a bounded wait on an observable state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False
