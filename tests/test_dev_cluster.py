"""`kaya dev-cluster` and the cluster block of `kaya server-config`.

Servers only (`--nodes 0`) for the processes: that S servers form one JetStream
cluster, that every child is a real process named by its PID, and that none outlives
dev-cluster, whether it is stopped, a child dies, or start-up fails halfway.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import nats.js.errors
import pytest

from kaya.app.broker.adapter import connect, server_urls
from kaya.app.broker.embedded import ServerSettings, server_config
from kaya.app.cli import build_parser
from kaya.app.cli.cluster import plan, toml
from kaya.app.config import Config, NodeConfig, parse_config
from tests.cluster import (
    READY,
    REPO,
    DevCluster,
    dev_cluster_argv,
    free_base_port,
    start_dev_cluster,
)
from tests.servers import VENV_BIN, children, pid_alive, wait_gone


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """Three servers, shared by the tests that only look (no test kills one of these)."""
    with start_dev_cluster(tmp_path_factory.mktemp("cluster"), nodes=0) as running:
        yield running


def kaya(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "kaya"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )


# ---- the processes ----------------------------------------------------------------------


@pytest.mark.slow
def test_each_server_is_printed_with_its_url_and_real_pid(cluster: DevCluster) -> None:
    assert list(cluster.servers) == ["nats-1", "nats-2", "nats-3"]
    ports = [int(url.rsplit(":", 1)[1]) for url in cluster.urls]
    assert ports == [ports[0], ports[0] + 1, ports[0] + 2]
    pids = [pid for _, pid in cluster.servers.values()]
    assert sorted(children(cluster.proc.pid)) == sorted(pids)
    for pid in pids:
        assert "nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert cluster.nodes == {}


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_servers_form_one_jetstream_cluster(cluster: DevCluster) -> None:
    nc = await nats.connect(cluster.urls[0])
    try:
        js = nc.jetstream(timeout=10)
        name = f"R3_{uuid.uuid4().hex[:8]}"  # a stream per run: the cluster is the module's
        await js.add_stream(name=name, subjects=[f"{name}.>"], num_replicas=3)
        with anyio.fail_after(15):
            while True:  # a new R3 stream answers once its leader is elected
                try:
                    ack = await js.publish(f"{name}.x", b"hello", headers={"Nats-Msg-Id": "1"})
                    break
                except nats.js.errors.NoStreamResponseError:
                    await anyio.sleep(0.05)
        assert ack.seq == 1
        with anyio.fail_after(15):
            while True:  # the followers' state is reported once they caught up
                info = await js.stream_info(name)
                assert info.cluster is not None
                replicas = info.cluster.replicas or []
                if len(replicas) == 2 and all(r.current for r in replicas):
                    break
                await anyio.sleep(0.05)
        assert {info.cluster.leader, *(r.name for r in replicas)} == set(cluster.servers)
        assert info.state.messages == 1
    finally:
        await nc.close()


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_comma_separated_url_connects(cluster: DevCluster) -> None:
    """`nats.url` lists every server of the cluster: nats-py takes a list, not the string."""
    assert server_urls(" nats://a:1, nats://b:2,") == ["nats://a:1", "nats://b:2"]
    nc = await connect(",".join(cluster.urls), name="test", timeout=10)
    try:
        assert nc.connected_url is not None
        assert f"nats://127.0.0.1:{nc.connected_url.port}" in cluster.urls
    finally:
        await nc.close()


@pytest.mark.slow
def test_a_dead_server_is_reported_and_sigterm_stops_the_rest(tmp_path: Path) -> None:
    running = start_dev_cluster(tmp_path, nodes=0)
    try:
        _, victim = running.servers["nats-2"]
        os.kill(victim, signal.SIGKILL)
        assert running.wait_for_output("server nats-2 exited") == (
            "server nats-2 exited with code -9"
        )
        assert wait_gone(victim)
        assert all(pid_alive(pid) for name, (_, pid) in running.servers.items() if name != "nats-2")
        assert running.proc.poll() is None  # not restarted, not stopped: the rest runs on
    finally:
        code = running.stop()  # also: every server PID is gone
    assert code == 0
    assert "dev-cluster stopping (SIGTERM)" in running.stderr


@pytest.mark.slow
def test_a_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    """Servers up, then a node that cannot start: one error line, exit 2, no server left."""
    argv = dev_cluster_argv(
        tmp_path / "dc", servers=2, nodes=1, base_port=free_base_port(2), app="no_such:app"
    )
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: node kaya-1 exited with code 2 before it was ready")
    assert "no module named 'no_such'" in lines[0]
    started = [READY.match(line) for line in out.stdout.splitlines()]
    pids = [int(m.group(4)) for m in started if m]
    assert len(pids) == 2, out.stdout
    assert [pid for pid in pids if not wait_gone(pid)] == []


@pytest.fixture
def held_port() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


@pytest.mark.slow
@pytest.mark.parametrize(
    ("offset", "what"),
    [(0, "client port of nats-1"), (101, "route port of nats-2"), (202, "monitoring port")],
)
def test_a_busy_port_is_named_before_anything_starts(
    tmp_path: Path, held_port: socket.socket, offset: int, what: str
) -> None:
    port = held_port.getsockname()[1]
    if port - offset < 1:
        pytest.skip("the held port is too low to be that offset into a range")
    out = kaya(*dev_cluster_argv(tmp_path / "dc", servers=3, nodes=0, base_port=port - offset)[1:])
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"error: port {port} ({what}")
    assert "in use" in out.stderr
    assert not (tmp_path / "dc").exists()  # checked before anything was written or started


# ---- what dev-cluster writes ---------------------------------------------------------------


def test_each_node_gets_its_own_config_pointed_at_its_own_server(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text('[log]\nlevel = "debug"\n[shards]\ncount = 8\n')
    args = build_parser().parse_args(
        [
            *("dev-cluster", "--servers", "3", "--nodes", "4", "--base-port", "5000"),
            *("--data-dir", str(tmp_path / "dc"), "--app", "examples.bank:app"),
            *("--config", str(base)),
        ]
    )
    nodes = plan(args).nodes
    assert [n.name for n in nodes] == ["kaya-1", "kaya-2", "kaya-3", "kaya-4"]
    assert [n.url for n in nodes] == [f"nats://127.0.0.1:{p}" for p in (5000, 5001, 5002, 5000)]
    second = nodes[1].config
    assert second.nats.url == "nats://127.0.0.1:5001,nats://127.0.0.1:5002,nats://127.0.0.1:5000"
    assert second.node.data_dir == str(tmp_path / "dc" / "kaya-2")
    assert second.node.app == "examples.bank:app"
    assert second.cluster.durability == "replicated"
    assert second.events.replicas == 3
    assert second.shards.count == 8  # the base config's, as the servers' mapping
    assert second.log.level == "debug"
    assert second.metrics.address == "127.0.0.1:0"
    assert nodes[1].path == tmp_path / "dc" / "kaya-2" / "config.toml"
    assert parse_config(toml(second)) == second


def test_the_config_writer_spells_any_string_toml_reads_back() -> None:
    config = Config(node=NodeConfig(data_dir='we"ird\\päth\t\x01\x7f', app="m:a"))
    assert parse_config(toml(config)) == config


# ---- kaya server-config ----------------------------------------------------------------------


def test_server_config_prints_the_cluster_block() -> None:
    out = kaya(
        *("server-config", "--server-name", "s1", "--cluster-name", "x"),
        *("--cluster-port", "6222", "--routes", "nats-route://127.0.0.1:6223,127.0.0.1:6224"),
    )
    assert out.returncode == 0, out.stderr
    assert 'server_name: "s1"\n' in out.stdout
    assert out.stdout.endswith(
        "cluster {\n"
        '  name: "x"\n'
        '  listen: "127.0.0.1:6222"\n'
        "  routes [\n"
        '    "nats-route://127.0.0.1:6223"\n'
        '    "nats-route://127.0.0.1:6224"\n'
        "  ]\n"
        "}\n"
    )
    assert "mappings {" in out.stdout  # each server of a cluster needs the mapping too


def test_server_config_without_cluster_flags_has_no_cluster_block() -> None:
    out = kaya("server-config")
    assert out.returncode == 0, out.stderr
    assert "cluster" not in out.stdout
    assert out.stdout == server_config(ServerSettings(name="kaya-1", store_dir=REPO / "data/nats"))


def test_routes_without_a_cluster_name_are_refused() -> None:
    out = kaya("server-config", "--routes", "127.0.0.1:6223")
    assert out.returncode == 2
    assert out.stderr.startswith("error: --cluster-port and --routes need --cluster-name")


def test_the_nodes_of_a_dev_cluster_on_the_repositorys_config_get_their_own_http_ports(
    tmp_path: Path,
) -> None:
    """config.toml turns the gateway on at 8080: three nodes on one machine take 8080-8082."""
    from kaya.app.cli import build_parser
    from kaya.app.cli.cluster import plan

    args = build_parser().parse_args(
        [
            *("dev-cluster", "--servers", "1", "--nodes", "3", "--base-port", "5100"),
            *("--data-dir", str(tmp_path / "dc")),
            *("--config", str(Path(__file__).resolve().parent.parent / "config.toml")),
        ]
    )
    addresses = [node.config.http.address for node in plan(args).nodes]
    assert addresses == ["127.0.0.1:8080", "127.0.0.1:8081", "127.0.0.1:8082"]
