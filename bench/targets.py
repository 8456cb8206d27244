"""The systems a benchmark drives, each started as real processes and stopped by PID.

Every scenario that sends commands over NATS needs the same few things from what it
measures: a URL to send to, the PIDs whose CPU and memory to sample, and a
guarantee that every process is gone afterwards, even when the round fails. The
targets:

- `kaya`: `kaya run` with a fresh data dir, its embedded nats-server, the defaults
  except a free port, the log level and monitoring (off unless asked for).
- `echo`: a nats-server and the raw nats-py echo responder (bench/echo.py): the
  transport's limit.
- `kaya-secure`, `echo-tls`: the same with security on. The node runs with
  `[security] enabled` (TLS with client certificates, role permissions, JetStream
  encryption, sealed fields) and `[security.jwt]` (a bearer token on every request,
  the bank's policy per command); the echo's nats-server requires TLS with a client
  certificate from a dev CA, and nothing more. `Running.security_dir` is where a
  client finds its certificate (and, for the node, the JWT signing key).
- `naive`, `faststream`, `eventsourcing`: a nats-server and one of the baseline
  responders in bench/baselines/, each with its own SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    BenchError,
    Child,
    child_pids,
    ensure_gone,
    free_port,
    memory_kib,
    nats_server_binary,
    wait_for_port,
)

BASELINES = ("naive", "faststream", "eventsourcing")
TARGETS = ("echo", "echo-tls", "kaya", "kaya-split", "kaya-secure", *BASELINES)
STATEFUL = ("kaya", "kaya-split", "kaya-secure", *BASELINES)
"""Targets that keep accounts: they need opening first and can be verified afterwards."""

NODE_CONFIG = """\
# Written by bench/targets.py: the defaults, except nothing that could clash with another process.
[nats]
monitor_port = {monitor_port}

[log]
level = "warning"
"""

JWT_ISSUER = "https://bench.kaya.test"
JWT_AUDIENCE = "kaya-bench"
SECURE_CONFIG = f"""
[security]
enabled = true

[security.jwt]
enabled = true
issuer = "{JWT_ISSUER}"
audience = "{JWT_AUDIENCE}"
key_file = "jwt-public.pem"
"""
"""What `kaya-secure` adds: the key pair is made beside the PKI before the node starts."""


@dataclass
class Running:
    """A started target: where to send, whom to sample, what was learnt on the way out."""

    name: str
    url: str
    main_pid: int
    """The process that does the work (the node, the responder): its RSS is reported."""
    cpu_pids: dict[str, int]
    monitor_url: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    spawned: float = 0.0
    """time.monotonic() just before the main process was spawned (start-up timings)."""
    security_dir: Path | None = None
    """With security on: the PKI (a client connects with its `client` role) and JWT keys."""
    metrics_url: str | None = None
    """A node's /metrics: the latency budget (`kaya_command_stage_seconds`) is read there."""

    def memory(self) -> dict[str, int]:
        return memory_kib(self.main_pid)

    def stages(self) -> dict[str, tuple[float, float]]:
        """The node's latency budget so far: stage -> (seconds summed, commands counted),
        from `kaya_command_stage_seconds`; empty for other targets or if unreachable."""
        if self.metrics_url is None:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        found: dict[str, list[float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "kaya_command_stage_seconds":
                continue
            for sample in family.samples:
                stage = sample.labels.get("stage", "")
                if sample.name.endswith("_sum"):
                    found.setdefault(stage, [0.0, 0.0])[0] = sample.value
                elif sample.name.endswith("_count"):
                    found.setdefault(stage, [0.0, 0.0])[1] = sample.value
        return {stage: (v[0], v[1]) for stage, v in found.items()}

    def wait_quiet(self, timeout: float = 60.0) -> float:
        """Until a node has caught up (relay and consumers) and its loop is idle; seconds taken.

        A load step right after a heavy one would otherwise measure the node still
        relaying and projecting the previous step's events. Other targets have no
        background work: 0 at once.
        """
        if self.name != "kaya":
            return 0.0
        return asyncio.run(_wait_quiet(self.url, timeout))

    def server_varz(self) -> dict[str, Any] | None:
        """nats-server's /varz (slow consumers, connections), when monitoring is on."""
        if self.monitor_url is None:
            return None
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/varz", timeout=5) as response:
                varz: dict[str, Any] = json.load(response)
        except OSError:
            return None
        return varz


QUIET_LOOP_LAG_MS = 5.0


async def _wait_quiet(url: str, timeout: float) -> float:
    import nats

    nc = await nats.connect(url, name="bench-wait-quiet", allow_reconnect=False)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            msg = await nc.request("kaya.health", b"", timeout=5)
            status = json.loads(msg.data)
            caught_up = status["relay"]["backlog"] == 0 and all(
                c["lag"] == 0 for c in status["consumers"].values()
            )
            if caught_up and status["ingress"]["loop_lag_ms"] < QUIET_LOOP_LAG_MS:
                break
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    return round(time.monotonic() - t0, 2)


def stderr_lines(log: Path, limit: int = 5) -> dict[str, Any]:
    """How many lines a process wrote on stderr (warnings and up, at this log level), first few."""
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return {"count": 0, "first": []}
    return {"count": len(lines), "first": [x[:300] for x in lines[:limit]]}


@contextlib.contextmanager
def running(
    name: str,
    workdir: Path,
    *,
    node_config: str = "",
    monitor: bool = False,
    data_dir: Path | None = None,
    ready_timeout: float = 60.0,
) -> Iterator[Running]:
    """Start target `name` under `workdir`; yield once it answers; stop everything after.

    A node gets a fresh data dir under `workdir` unless `data_dir` names one to start on.
    """
    if name in ("kaya", "kaya-split", "kaya-secure"):
        data_dir = data_dir or workdir / "data"
        with _running_kaya(
            workdir,
            node_config,
            monitor,
            data_dir,
            ready_timeout,
            secure=name == "kaya-secure",
            split=name == "kaya-split",
        ) as target:
            yield target
    elif name in ("echo", "echo-tls"):
        tls = workdir / "pki" if name == "echo-tls" else None
        with _running_responder(name, workdir, ["bench.echo"], monitor, tls=tls) as target:
            yield target
    elif name in BASELINES:
        from bench.baselines import RESPONDERS

        argv = [RESPONDERS[name], "--db", str(workdir / f"{name}.sqlite")]
        with _running_responder(name, workdir, argv, monitor) as target:
            yield target
    else:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")


@contextlib.contextmanager
def nats_server(rundir: Path, store_dir: Path, *, name: str | None = None) -> Iterator[Running]:
    """A JetStream nats-server configured as a node's embedded one, on a free port.

    The raw baselines run on it, so they pay what the node's server pays and no more.
    """
    from kaya.app.broker.embedded import ServerSettings, server_config

    port = free_port()
    extra = {"name": name} if name is not None else {}
    conf = rundir / "nats-server.conf"
    conf.write_text(
        server_config(ServerSettings(port=port, monitor_port=0, store_dir=store_dir, **extra))
    )
    server = Child("nats-server", [nats_server_binary(), "-c", str(conf)], rundir / "nats.log")
    try:
        wait_for_port(port, timeout=15, process=server.process)
        pids = {"nats_server": server.pid}
        yield Running("nats-server", f"nats://127.0.0.1:{port}", server.pid, pids)
    finally:
        server.stop()


BANK = "examples.bank:app"
"""The app every benchmark serves: the example bank, as any user app (cwd: the repo)."""


@contextlib.contextmanager
def _running_kaya(
    workdir: Path,
    node_config: str,
    monitor: bool,
    data_dir: Path,
    ready_timeout: float,
    *,
    secure: bool = False,
    split: bool = False,
) -> Iterator[Running]:
    """A node (`kaya run`); `split`: as two processes, `--role commands` and, beside it on
    the same config, `--role consumers` (its CPU is reported as `consumers`)."""
    port = free_port()
    metrics_port = free_port()
    monitor_port = free_port() if monitor else 0
    config = workdir / "bench.toml"
    security_dir = data_dir / "security" if secure else None
    if security_dir is not None:  # the node makes its PKI on start; the JWT keys are ours
        from kaya.app.security.tokens import new_signing_key

        new_signing_key(security_dir)
        node_config += SECURE_CONFIG
    metrics = f'\n[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    config.write_text(NODE_CONFIG.format(monitor_port=monitor_port) + node_config + metrics)
    kaya = Path(sys.executable).parent / "kaya"
    argv = [
        str(kaya),
        "run",
        "--app",
        BANK,
        "--data-dir",
        str(data_dir),
        "--nats-port",
        str(port),
        "--config",
        str(config),
        "--log-level",
        "warning",
    ]
    log = workdir / "node.log"
    t0 = time.monotonic()
    node = Child("kaya", [*argv, "--role", "commands"] if split else argv, log)
    consumers: Child | None = None
    server_pids: list[int] = []
    info: dict[str, Any] = {}
    try:
        node.wait_for_line("ready", timeout=ready_timeout)
        server_pids = child_pids(node.pid)
        cpu_pids = {"node": node.pid}
        if split:
            consumers = Child("kaya", [*argv, "--role", "consumers"], workdir / "consumers.log")
            consumers.wait_for_line("ready", timeout=ready_timeout)
            cpu_pids["consumers"] = consumers.pid
        info["startup_s"] = round(time.monotonic() - t0, 3)
        if len(server_pids) == 1:
            cpu_pids["nats_server"] = server_pids[0]
        yield Running(
            name="kaya-secure" if secure else "kaya-split" if split else "kaya",
            url=f"{'tls' if secure else 'nats'}://127.0.0.1:{port}",
            main_pid=node.pid,
            cpu_pids=cpu_pids,
            monitor_url=f"http://127.0.0.1:{monitor_port}" if monitor else None,
            info=info,
            spawned=t0,
            security_dir=security_dir,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        t1 = time.monotonic()
        if consumers is not None:
            info["consumers_exit_code"] = consumers.stop(timeout=30)
        info["node_exit_code"] = node.stop(timeout=30)
        info["stop_s"] = round(time.monotonic() - t1, 3)
        if info["node_exit_code"] != 0:
            info["node_stderr_tail"] = node.stderr_tail()
        info["node_stderr"] = stderr_lines(log)
        info["server_left_behind"] = [pid for pid in server_pids if ensure_gone(pid)]


@contextlib.contextmanager
def _running_responder(
    name: str, workdir: Path, module_argv: list[str], monitor: bool, *, tls: Path | None = None
) -> Iterator[Running]:
    """A nats-server of our own and a responder process on it.

    With `tls` (a directory): a dev PKI made there (Kaya's, app/security/pki.py), and the
    server requires TLS with a client certificate from its CA, as a secure node's does.
    """
    port = free_port()
    url = f"{'tls' if tls else 'nats'}://127.0.0.1:{port}"
    server_argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)]
    if tls is not None:
        from kaya.app.security.pki import ensure_pki

        pki = ensure_pki(tls, hosts=[])
        server_argv += ["--tlsverify", "--tlscert", str(pki.server_cert)]
        server_argv += ["--tlskey", str(pki.server_key), "--tlscacert", str(pki.ca)]
        module_argv = [*module_argv, "--security-dir", str(tls)]
    monitor_port = free_port() if monitor else 0
    if monitor:
        server_argv += ["-m", str(monitor_port)]
    server = Child("nats-server", server_argv, workdir / "nats-server.log")
    responder: Child | None = None
    info: dict[str, Any] = {}
    try:
        wait_for_port(port, timeout=10, process=server.process)
        t0 = time.monotonic()
        responder = Child(
            name,
            [sys.executable, "-m", module_argv[0], "--url", url, *module_argv[1:]],
            workdir / f"{name}.log",
        )
        responder.wait_for_line("ready", timeout=30)
        info["startup_s"] = round(time.monotonic() - t0, 3)
        yield Running(
            name=name,
            url=url,
            main_pid=responder.pid,
            cpu_pids={"responder": responder.pid, "nats_server": server.pid},
            monitor_url=f"http://127.0.0.1:{monitor_port}" if monitor else None,
            info=info,
            security_dir=tls,
        )
    finally:
        if responder is not None:
            info["responder_exit_code"] = responder.stop()
            if info["responder_exit_code"] != 0:
                info["responder_stderr_tail"] = responder.stderr_tail()
        server.stop()


# ---- a dev-cluster: `kaya dev-cluster` and the children it prints -------------------------------

KAYA = Path(sys.executable).parent / "kaya"
"""The venv's `kaya` command (run, dev-cluster, replay)."""
DEV_CLUSTER_READY = re.compile(r"^(server|node) (\S+) ready on (\S+) \(pid (\d+)\)$")
"""What `kaya dev-cluster` prints for each child once it answers."""
PORT_RANGE = (20_000, 32_000)
"""Below Linux's ephemeral ports (32768+), so an outgoing connection never takes one of ours."""


@dataclass
class Proc:
    """A server or node of a dev-cluster, as it printed itself: signalled by this PID only."""

    kind: str
    name: str
    url: str
    pid: int


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server binds
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_base_port(servers: int) -> int:
    """A base port P with P+i, P+100+i and P+200+i free (dev-cluster's three ranges)."""
    from kaya.app.cli.cluster import MONITOR_OFFSET, ROUTE_OFFSET

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - MONITOR_OFFSET - servers)
        ports = [
            base + off + i for off in (0, ROUTE_OFFSET, MONITOR_OFFSET) for i in range(servers)
        ]
        if all(_port_free(p) for p in ports):
            return base
    raise BenchError(f"no free base port for {servers} servers in {PORT_RANGE}")


def dev_cluster_argv(
    data_dir: Path, *, servers: int, nodes: int, config: Path | None = None
) -> list[str]:
    """`kaya dev-cluster` serving the bank on free ports, everything under `data_dir`."""
    argv = [str(KAYA), "dev-cluster", "--servers", str(servers), "--nodes", str(nodes)]
    argv += ["--base-port", str(free_base_port(servers)), "--data-dir", str(data_dir)]
    argv += ["--app", BANK]
    return argv + (["--config", str(config)] if config is not None else [])


def ready_children(lines: list[str]) -> tuple[dict[str, Proc], dict[str, Proc]]:
    """(servers, nodes) by name from a dev-cluster's `... ready on URL (pid N)` lines."""
    servers: dict[str, Proc] = {}
    nodes: dict[str, Proc] = {}
    for line in lines:
        if m := DEV_CLUSTER_READY.match(line):
            proc = Proc(m[1], m[2], m[3], int(m[4]))
            (servers if proc.kind == "server" else nodes)[proc.name] = proc
    return servers, nodes
