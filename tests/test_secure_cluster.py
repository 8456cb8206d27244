"""Security on in a cluster (issue 14, item 1): routes are TLS both ways with the route
certificate, and `kaya dev-cluster --secure` runs servers and nodes on one shared PKI.

    3 nats-servers, client TLS + route TLS    -> one JetStream cluster; the admin makes R3
    a server without route TLS, with another  -> refused on the route port, never a peer
      CA's certificate, or with a role's
    dev-cluster with [security] enabled       -> a client's deposit through its context;
                                                 plaintext refused by every server

Real nats-server and `kaya` processes on 127.0.0.1, stopped by PID; every wait is on a
condition with a deadline, never a sleep.
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.js.errors
import orjson
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from kaya.app.broker.embedded import ServerSettings, TlsFiles, server_config
from kaya.app.cli import build_parser
from kaya.app.cli.cluster import plan, wait_for_jetstream
from kaya.app.security.permissions import authorization_block
from kaya.app.security.pki import (
    ROUTE_SUBJECT,
    Pki,
    _write_cert,
    _write_key,
    ensure_pki,
    issue,
    new_ca,
)
from kaya.app.security.tls import tls_url
from tests.cluster import MONITOR_OFFSET, REPO, DevCluster, Lines, start_dev_cluster
from tests.servers import VENV_BIN, drain, free_port, spawn_server, stop_pid

NAMES = ("nats-1", "nats-2", "nats-3")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the servers are processes: one client loop is enough


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    settings: ServerSettings
    log: Lines

    def get(self, endpoint: str) -> dict[str, Any]:
        return monitor(self.settings.monitor_port, endpoint)


def monitor(port: int, endpoint: str) -> dict[str, Any]:
    """A monitoring endpoint's JSON (plain HTTP on loopback, as the servers serve it)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{endpoint}", timeout=5) as response:
        found: dict[str, Any] = json.load(response)
        return found


def start_server(settings: ServerSettings) -> Server:
    """A nats-server with `settings`, once it logged that it is ready; its log kept."""
    proc = spawn_server(settings)
    log = Lines()
    drain(proc, "stderr", log)
    return Server(proc, settings, log)


def until(check: Any, timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


# ---- three servers, started here: the routes themselves ----------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return ensure_pki(tmp_path_factory.mktemp("pki") / "security", hosts=["127.0.0.1"])


@pytest.fixture(scope="module")
def secure_servers(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[list[Server]]:
    """Three servers as a secure node would embed them (client TLS mapped to the roles,
    the authorization block, encrypted JetStream) in one cluster. `route_tls` is left
    unset: the route certificate beside the server's is the default `kaya server-config`
    relies on."""
    root = tmp_path_factory.mktemp("secure-cluster")
    route_ports = [free_port() for _ in NAMES]
    servers: list[Server] = []
    try:
        for i, name in enumerate(NAMES):
            settings = ServerSettings(
                port=free_port(),
                monitor_port=free_port(),
                store_dir=root / name,
                name=name,
                cluster_name="kaya-secure",
                cluster_port=route_ports[i],
                routes=tuple(
                    f"nats-route://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i
                ),
                tls=TlsFiles(cert=pki.server_cert, key=pki.server_key, ca=pki.ca),
                authorization=tuple(authorization_block(("account", "transfer"))),
                store_key=uuid.uuid4().hex,
            )
            servers.append(start_server(settings))
        admin = pki.role("admin").ssl_context()
        anyio.run(
            functools.partial(wait_for_jetstream, [s.settings for s in servers], 20, tls=admin)
        )
        yield servers
    finally:
        for server in servers:
            stop_pid(server.proc)


@pytest.mark.slow
@pytest.mark.anyio
async def test_secure_servers_form_one_jetstream_cluster_over_tls_routes(
    secure_servers: list[Server], pki: Pki
) -> None:
    for server in secure_servers:
        cluster = server.get("varz")["cluster"]
        assert (cluster["tls_required"], cluster["tls_verify"]) == (True, True), server.settings
        peers = {route["remote_name"] for route in server.get("routez")["routes"]}
        assert peers == set(NAMES) - {server.settings.name}
        meta = server.get("jsz")["meta_cluster"]
        assert meta["cluster_size"] == 3
        assert meta["leader"] in NAMES
    urls = ",".join(tls_url(s.settings.url) for s in secure_servers)
    nc = await nats.connect(urls.split(","), tls=pki.role("admin").ssl_context())
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(name="SECURE_R3", subjects=["secure.>"], num_replicas=3)
        with anyio.fail_after(15):
            while True:  # a new R3 stream answers once its leader is elected
                try:
                    ack = await js.publish("secure.x", b"hello", headers={"Nats-Msg-Id": "1"})
                    break
                except nats.js.errors.NoStreamResponseError:
                    await anyio.sleep(0.05)
        assert ack.seq == 1
        with anyio.fail_after(15):
            while True:  # the followers' state is reported once they caught up (over TLS)
                info = await js.stream_info("SECURE_R3")
                assert info.cluster is not None
                replicas = info.cluster.replicas or []
                if len(replicas) == 2 and all(r.current for r in replicas):
                    break
                await anyio.sleep(0.05)
        assert {info.cluster.leader, *(r.name for r in replicas)} == set(NAMES)
    finally:
        await nc.close()


def _other_ca_route(directory: Path) -> TlsFiles:
    """A route certificate like Kaya's (CN=kaya-route, both usages), from another CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = new_ca("someone else's CA")
    cert, key = issue(ca, ca_key, "kaya-route", server_hosts=["127.0.0.1", "localhost"], peer=True)
    _write_cert(directory / "ca.pem", ca)
    _write_cert(directory / "route.pem", cert)
    _write_key(directory / "route.key", key)
    return TlsFiles(
        cert=directory / "route.pem", key=directory / "route.key", ca=directory / "ca.pem"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "refusal"),
    [
        # what the secure server it dials logs, about that connection
        ("no route TLS", "TLS route handshake error: tls: first record does not look like"),
        (
            "another CA's certificate",
            "TLS route handshake error: remote error: tls: bad certificate",
        ),
        ("a role's certificate", "authentication error"),  # same CA, but not CN=kaya-route
    ],
)
def test_a_server_without_the_route_certificate_never_joins(
    secure_servers: list[Server], pki: Pki, tmp_path: Path, variant: str, refusal: str
) -> None:
    client = pki.role("client")
    assert client.cert is not None
    assert client.key is not None
    route_tls = {
        "no route TLS": None,
        "another CA's certificate": _other_ca_route(tmp_path / "other"),
        "a role's certificate": TlsFiles(cert=client.cert, key=client.key, ca=client.ca),
    }[variant]
    target = secure_servers[0]
    seen = len(target.log)
    rogue = start_server(
        ServerSettings(
            port=free_port(),
            monitor_port=free_port(),
            store_dir=tmp_path / "rogue",
            name="rogue",
            cluster_name=target.settings.cluster_name,
            cluster_port=free_port(),
            routes=(f"nats-route://127.0.0.1:{target.settings.cluster_port}",),
            route_tls=route_tls,
        )
    )
    try:
        until(  # it dials at once, and again each second
            lambda: any(refusal in line for line in list(target.log)[seen:]),
            10,
            f"{target.settings.name} logging {refusal!r} for the rogue's route",
        )
        assert rogue.get("routez")["num_routes"] == 0
        for server in secure_servers:
            peers = {route["remote_name"] for route in server.get("routez")["routes"]}
            assert "rogue" not in peers
            assert server.get("jsz")["meta_cluster"]["cluster_size"] == 3
    finally:
        stop_pid(rogue.proc)


# ---- the route certificate, and the config that names it ----------------------------------


def test_the_route_certificate_is_both_server_and_client_for_the_servers_hosts(pki: Pki) -> None:
    """Each server dials its peers (a TLS client) and is dialed by them (a TLS server)."""
    route = x509.load_pem_x509_certificate(pki.route_cert.read_bytes())
    assert route.subject.rfc4514_string() == ROUTE_SUBJECT
    usages = route.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    for path in (pki.route_cert, pki.server_cert):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in names.get_values_for_type(x509.DNSName)
        assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert pki.route_key.stat().st_mode & 0o077 == 0


def test_an_older_pki_gets_a_route_certificate_and_keeps_the_rest(tmp_path: Path) -> None:
    pki = ensure_pki(tmp_path / "s", hosts=[])
    pki.route_cert.unlink()
    pki.route_key.unlink()
    before = {p.name: p.read_bytes() for p in pki.dir.iterdir() if p.is_file()}
    ensure_pki(pki.dir, hosts=[])
    after = {p.name: p.read_bytes() for p in pki.dir.iterdir() if p.is_file()}
    assert set(after) - set(before) == {"route.pem", "route.key"}
    assert {name: after[name] for name in before} == before


def test_the_cluster_block_has_route_tls_only_with_security_on(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    clustered = ServerSettings(store_dir=tmp_path, cluster_name="c", cluster_port=6222)
    assert "tls" not in server_config(clustered)
    tls = TlsFiles(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)
    text = server_config(replace(clustered, tls=tls))
    cluster = text[text.index("cluster {") : text.index("\n}\n", text.index("cluster {"))]
    assert cluster.endswith(
        "  tls {\n"
        f'    cert_file: "{pki.route_cert.resolve()}"\n'
        f'    key_file: "{pki.route_key.resolve()}"\n'
        f'    ca_file: "{pki.ca.resolve()}"\n'
        "    verify_and_map: true\n"
        "    timeout: 2\n"
        "  }\n"
        '  authorization { user: "CN=kaya-route" }'
    )
    assert "cluster {" not in server_config(replace(clustered, cluster_name="", tls=tls))


def test_server_config_for_a_secure_cluster_prints_the_route_tls(tmp_path: Path) -> None:
    def kaya(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "kaya"), *argv], capture_output=True, text=True,
                              timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)  # fmt: skip

    made = kaya("security", "init", "--data-dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    config = tmp_path / "kaya.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\n[security]\nenabled = true\n')
    printed = kaya(
        *("server-config", "--config", str(config), "--app", "examples.bank:app"),
        *("--server-name", "s1", "--cluster-name", "x", "--cluster-port", "6222"),
        *("--routes", "127.0.0.1:6223,127.0.0.1:6224"),
    )
    assert printed.returncode == 0, printed.stderr
    pki = Pki(tmp_path / "security")
    assert f'    cert_file: "{pki.route_cert}"\n' in printed.stdout
    assert '  authorization { user: "CN=kaya-route" }\n' in printed.stdout
    assert '    "nats-route://127.0.0.1:6223"\n' in printed.stdout  # the URLs stay route URLs
    client_tls = printed.stdout.rsplit("\ntls {\n", 1)[1]  # the clients' block, after the cluster's
    assert f'  cert_file: "{pki.server_cert}"\n' in client_tls
    assert "  verify_and_map: true\n" in client_tls
    assert pki.route_cert.exists()  # `kaya security init` made it


def test_dev_cluster_secure_shares_one_pki_between_servers_and_nodes(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            *("dev-cluster", "--secure", "--servers", "3", "--nodes", "2"),
            *("--base-port", "5000", "--data-dir", str(tmp_path / "dc")),
            *("--app", "examples.bank:app"),
        ]
    )
    the_plan = plan(args)
    security = tmp_path / "dc" / "security"
    assert the_plan.security == security
    for server in the_plan.servers:
        assert server.tls is not None
        assert server.tls.ca == security / "ca.pem"
        assert server.route_tls == TlsFiles(
            cert=security / "route.pem", key=security / "route.key", ca=security / "ca.pem"
        )
        assert any('user: "CN=kaya-node"' in line for line in server.authorization)
    for node in the_plan.nodes:
        assert node.config.security.enabled
        assert node.config.security_dir == security
    assert not security.exists()  # made after the ports are checked, not while planning


# ---- kaya dev-cluster with security on ----------------------------------------------------


@pytest.fixture(scope="module")
def secure_dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """`[security] enabled` in the config dev-cluster reads (what --secure also sets)."""
    root = tmp_path_factory.mktemp("secure-dev-cluster")
    with start_dev_cluster(
        root, servers=3, nodes=2, extra_config="[security]\nenabled = true\n"
    ) as running:
        yield running


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_client_deposits_through_its_context_on_a_secure_dev_cluster(
    secure_dev_cluster: DevCluster,
) -> None:
    from kaya import Client

    security = secure_dev_cluster.data_dir / "security"
    context = security / "contexts" / "kaya-client.json"
    async with Client.connect(tls=str(context), attempts=3) as client:
        await client.send("account", "sec-c1", {"type": "Open", "owner": "o", "currency": "EUR"})
        await client.send("account", "sec-c1", {"type": "Deposit", "amount": 25})
        state = await client.get("account", "sec-c1")
    assert state.version == 2


@pytest.mark.slow
def test_each_node_connects_with_the_node_role(secure_dev_cluster: DevCluster) -> None:
    users: dict[str, set[str]] = {}
    for url in secure_dev_cluster.urls:
        port = int(url.rsplit(":", 1)[1]) + MONITOR_OFFSET
        for conn in monitor(port, "connz?auth=true&limit=1024")["connections"]:
            users.setdefault(conn.get("name", ""), set()).add(conn.get("authorized_user", ""))
    assert users["kaya-1"] == users["kaya-2"] == {"CN=kaya-node"}, users


@pytest.mark.slow
def test_every_server_of_a_secure_dev_cluster_refuses_plaintext(
    secure_dev_cluster: DevCluster,
) -> None:
    for url in secure_dev_cluster.urls:
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.settimeout(5)
            info = conn.recv(4096)
            assert info.startswith(b"INFO ")
            assert json.loads(info[5:].strip())["tls_required"] is True
            conn.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
            answered = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # until the server hangs up
                try:
                    chunk = conn.recv(4096)
                except (ConnectionResetError, TimeoutError):
                    break
                if not chunk:
                    break
                answered += chunk
            else:
                pytest.fail(f"{url} kept a plaintext connection open: {answered!r}")
        assert b"PONG" not in answered


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_sealed_owner_opens_on_the_next_node_and_is_forgotten_on_all(
    secure_dev_cluster: DevCluster,
) -> None:
    """Keys live in KAYA_KEYS, not in a node: the node a shard moves to opens the owner
    sealed by the one before; `kaya forget` then redacts it whichever node serves it, and
    no node's files hold the name."""
    from kaya import Client
    from kaya.actors.wire import shard_of
    from tests.test_cluster import eventually

    security = secure_dev_cluster.data_dir / "security"
    admin = str(security / "contexts" / "kaya-admin.json")
    canary = "Sealed Canary 51e0a2"

    def kaya(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "kaya"), *argv, "--context", admin],
                              capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip

    async with Client.connect(tls=str(security / "contexts" / "kaya-client.json"),
                              attempts=20) as client:  # fmt: skip
        await client.send("account", "sec-f1", {"type": "Open", "owner": canary,
                                                "currency": "EUR"})  # fmt: skip
        table = orjson.loads(kaya("shards", "--json").stdout)
        owners = {row["shard"]: row["owner"] for row in table["shards"]}
        shard = shard_of(len(owners), "account", "sec-f1")
        other = next(n for n in table["nodes"] if n != owners[shard])
        moved = kaya("shards", "move", str(shard), "--to", other)
        assert moved.returncode == 0, moved.stderr
        state = await client.get("account", "sec-f1")  # served by `other` now
        assert state.state["owner"] == canary
        forgot = kaya("forget", "account", "sec-f1")
        assert forgot.returncode == 0, forgot.stderr
        await eventually(
            lambda: client.get("account", "sec-f1"), lambda s: s.state["owner"] == "***", 10
        )
    files = [p for p in secure_dev_cluster.data_dir.rglob("*") if p.is_file()]
    assert [p for p in files if canary.encode() in p.read_bytes()] == []
