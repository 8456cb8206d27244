"""`kaya dev-cluster` for integration tests: a real cluster of processes, each known by PID.

    with start_dev_cluster(tmp_path, nodes=3) as cluster:
        url, pid = cluster.nodes["kaya-2"]
        os.kill(pid, signal.SIGKILL)
        cluster.wait_for_output("node kaya-2 exited")
        cluster.restart_node("kaya-2")        # `kaya run` with kaya-2's config, until ready
    # left: dev-cluster stopped by SIGTERM, every server and node PID checked gone

Start-up is read from the lines dev-cluster prints, with a deadline; nothing is slept for.
"""

from __future__ import annotations

import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.servers import VENV_BIN, drain, start_kaya, stop_pid, wait_for_line, wait_gone

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"^(server|node) (\S+) ready on (nats://\S+) \(pid (\d+)\)$")
ROUTE_OFFSET, MONITOR_OFFSET = 100, 200  # as app/cli/cluster.py lays its ports out


class Lines(deque[str]):
    """The lines a child printed so far, which a test can wait for (see `drain`)."""

    def __init__(self) -> None:
        super().__init__(maxlen=10_000)
        self.changed = threading.Condition()

    def append(self, line: str) -> None:
        with self.changed:
            super().append(line)
            self.changed.notify_all()

    def wait_for(self, needle: str, timeout: float) -> str:
        with self.changed:
            found = self.changed.wait_for(
                lambda: next((line for line in self if needle in line), None), timeout
            )
        if found is None:
            raise TimeoutError(f"no line with {needle!r} within {timeout}s: {list(self)[-20:]}")
        return found


@dataclass
class DevCluster:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    servers: dict[str, tuple[str, int]] = field(default_factory=dict)
    """name -> (client URL, pid), from the lines printed."""
    nodes: dict[str, tuple[str, int]] = field(default_factory=dict)
    """name -> (URL of the server it is pointed at first, pid); restart_node updates it."""
    output: Lines = field(default_factory=Lines)
    """What dev-cluster prints after `cluster ready` (e.g. `node kaya-2 exited ...`)."""
    stderr: Lines = field(default_factory=Lines)
    restarted: list[subprocess.Popen[bytes]] = field(default_factory=list)
    exit_code: int | None = None
    first_pids: list[int] = field(default_factory=list)
    """The PIDs dev-cluster printed, before any restart_node replaced one in `nodes`."""

    @property
    def urls(self) -> list[str]:
        return [url for url, _ in self.servers.values()]

    @property
    def pids(self) -> list[int]:
        """Every server and node process ever started, by dev-cluster or by restart_node."""
        printed = [pid for _, pid in (*self.servers.values(), *self.nodes.values())]
        return list(dict.fromkeys([*self.first_pids, *printed, *(p.pid for p in self.restarted)]))

    def node_config(self, name: str) -> Path:
        return self.data_dir / name / "config.toml"

    def wait_for_output(self, needle: str, timeout: float = 30) -> str:
        return self.output.wait_for(needle, timeout)

    def restart_node(self, name: str, timeout: float = 60) -> subprocess.Popen[bytes]:
        """`kaya run` with the node's config again (dev-cluster restarts nothing itself);
        returns once it printed `ready`. `stop` stops it too."""
        node = start_kaya(self.node_config(name), timeout=timeout, cwd=REPO)
        self.restarted.append(node.proc)
        self.nodes[name] = (self.nodes[name][0], node.proc.pid)
        return node.proc

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to dev-cluster (and to restarted nodes); every child must then be gone."""
        if self.exit_code is None:
            for proc in self.restarted:
                stop_pid(proc, timeout=timeout)
            self.exit_code = stop_pid(self.proc, timeout=timeout)
            left = [pid for pid in self.pids if not wait_gone(pid)]
            assert left == [], f"still running after dev-cluster stopped: {left}"
        return self.exit_code

    def __enter__(self) -> DevCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def ports_free(base: int, servers: int) -> bool:
    for offset in (0, ROUTE_OFFSET, MONITOR_OFFSET):
        for i in range(servers):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", base + offset + i))
                except OSError:
                    return False
    return True


def free_base_port(servers: int) -> int:
    """A base port whose three ranges are free now (tests run in parallel: pick at random)."""
    for _ in range(100):
        base = random.randrange(20_000, 60_000 - MONITOR_OFFSET - servers)
        if ports_free(base, servers):
            return base
    raise RuntimeError("no free range of ports for a dev-cluster")


def dev_cluster_argv(
    data_dir: Path,
    *,
    servers: int,
    nodes: int,
    base_port: int,
    app: str = "",
    config: Path | None = None,
) -> list[str]:
    argv = [str(VENV_BIN / "kaya"), "dev-cluster", "--servers", str(servers)]
    argv += ["--nodes", str(nodes), "--base-port", str(base_port), "--data-dir", str(data_dir)]
    if app:
        argv += ["--app", app]
    if config is not None:
        argv += ["--config", str(config)]
    return argv


def start_dev_cluster(
    tmp_path: Path,
    *,
    servers: int = 3,
    nodes: int = 3,
    app: str = "examples.bank:app",
    base_port: int | None = None,
    extra_config: str = "",
    timeout: float = 120,
) -> DevCluster:
    """`kaya dev-cluster` in the repository's root (where `examples` imports), until it
    printed `cluster ready`; `extra_config` is the TOML every node's config starts from."""
    config = None
    if extra_config:
        config = tmp_path / "dev-cluster-base.toml"
        config.write_text(extra_config)
    data_dir = tmp_path / "dev-cluster"
    argv = dev_cluster_argv(
        data_dir,
        servers=servers,
        nodes=nodes,
        base_port=base_port or free_base_port(servers),
        app=app,
        config=config,
    )
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        bufsize=0,  # unbuffered: select() and readline() must agree on what is unread
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    cluster = DevCluster(proc, data_dir)
    drain(proc, "stderr", cluster.stderr)
    deadline = time.monotonic() + timeout
    try:
        while (line := wait_for_line(proc, "stdout", b"ready", deadline - time.monotonic())) != (
            "cluster ready"
        ):
            match = READY.match(line)
            assert match, f"unexpected line from dev-cluster: {line!r}"
            kind, name, url, pid = match.groups()
            (cluster.servers if kind == "server" else cluster.nodes)[name] = (url, int(pid))
            cluster.first_pids.append(int(pid))
    except BaseException as exc:
        stop_pid(proc, signal.SIGTERM)  # it stops what it started
        exc.add_note(f"dev-cluster stderr: {list(cluster.stderr)[-20:]}")
        raise
    drain(proc, "stdout", cluster.output)
    return cluster
