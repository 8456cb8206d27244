"""`kaya dev-cluster`: a whole Kaya cluster on one machine, each part its own process.

    kaya dev-cluster -> ports free? -> S nats-servers (one JetStream cluster, fsync always)
      -> JetStream has a meta leader and every peer -> N `kaya run` nodes (replicated)
      -> `cluster ready` -> until SIGINT/SIGTERM -> nodes stopped, then servers

For trying a cluster out, and for the chaos tests, which kill its children by PID: a
child that exits is reported in one line and left dead (the test decides what comes
back), the others keep running. Every child is a real process, started as a deployment
starts it, with its config, data and log under --data-dir. They stop in the order a
deployment stops them: nodes first, so what they still publish reaches brokers that
are up. None is ever left behind: a start-up that fails stops what it started, and
each child gets SIGTERM if dev-cluster dies by any means (PR_SET_PDEATHSIG).

What it prints on stdout, one line each, flushed (tests parse them):

    server nats-1 ready on nats://127.0.0.1:4222 (pid 1234)
    node kaya-1 ready on nats://127.0.0.1:4222 (pid 1240)
    cluster ready
    node kaya-2 exited with code -9

With security on (`--secure` or `[security] enabled`), as issue 14 item 1 asks of a
cluster: every server requires TLS with a verified client certificate mapped to its
role's permissions, encrypts its JetStream files, and talks to its peers over routes
that are TLS both ways with the route certificate; every node connects with the node
role's certificate. One security dir serves them all (one CA, one JetStream key, one
master key; `<data-dir>/security` unless `[security] dir` says otherwise), so a role's
context works against any server. Before `cluster ready` it prints where they are:

    security on: TLS with a client certificate from the CA in DIR, on every server
    contexts: DIR/contexts/kaya-{admin,node,client,reader}.json
    e.g. nats --context DIR/contexts/kaya-admin.json stream ls
    e.g. kaya get account a-1 --context DIR/contexts/kaya-client.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import socket
import ssl
import sys
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from kaya.app.cli import common

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from kaya.app.broker.embedded import ServerSettings
    from kaya.app.config import Config

CLUSTER_NAME = "kaya-dev"
HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 4222
ROUTE_OFFSET = 100
"""Server i (from 0) takes the client port P+i, the route port P+100+i and the monitoring
port P+200+i: three ranges that cannot overlap while there are fewer than 100 servers."""
MONITOR_OFFSET = 200
MAX_SERVERS = ROUTE_OFFSET - 1

SERVER_READY_TIMEOUT = 15.0
JETSTREAM_TIMEOUT = 30.0
"""A JetStream cluster serves nothing before its servers elect a meta leader, which waits
for their routes: usually a second or two."""
NODE_READY_TIMEOUT = 60.0
NODE_STOP_TIMEOUT = 30.0
"""A node answers what it has in flight and commits before it exits: give it time."""
SERVER_STOP_TIMEOUT = 15.0
LINE_LIMIT = 1 << 20
"""Longest log line read from a child in one piece (asyncio's default is 64 KiB)."""


class StartFailed(Exception):
    """The cluster could not start; the message is the one line to print."""


def register(sub: common.Subcommands) -> None:
    p = sub.add_parser(
        "dev-cluster",
        help="run a local cluster (nats-servers and nodes) until SIGINT/SIGTERM",
        description="Start S nats-servers forming one JetStream cluster and N `kaya run`"
        " nodes using it, all on 127.0.0.1, each its own process with its config, data and"
        " log under --data-dir. Server i (from 0) listens on P+i for clients, P+100+i for"
        " routes, P+200+i for monitoring. A child that exits is reported and not restarted."
        " Delete --data-dir for a fresh cluster. With --secure (or security.enabled) all"
        " share one CA under --data-dir/security (or security.dir), whose contexts/ hold a"
        " NATS context per role.",
    )
    common.common(p, node=False)
    common.with_app(p)
    p.add_argument(
        "--servers",
        type=common.positive_int,
        default=3,
        metavar="S",
        help=f"nats-servers, named nats-1..S (default 3, at most {MAX_SERVERS})",
    )
    p.add_argument(
        "--nodes",
        type=common.count,
        default=3,
        metavar="N",
        help="Kaya nodes, named kaya-1..N (default 3; 0: servers only)",
    )
    p.add_argument(
        "--base-port",
        type=common.positive_int,
        default=DEFAULT_BASE_PORT,
        metavar="P",
        help=f"the first server's client port (default {DEFAULT_BASE_PORT})",
    )
    p.add_argument(
        "--data-dir",
        default="dev-cluster",
        metavar="DIR",
        help="where each server and node keeps its data, config and log (default dev-cluster)",
    )
    p.add_argument(
        "--shards",
        type=common.positive_int,
        metavar="N",
        help="shards the servers map keys onto (default: the config's shards.count)",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        default=None,
        help="security on (overrides security.enabled): client TLS with a certificate per"
        " role, TLS routes, encrypted JetStream; one CA for all, in <data-dir>/security",
    )
    p.set_defaults(handler=_dev_cluster)


# ---- the plan: every port, config and command, decided before anything starts ------------


@dataclass(frozen=True)
class NodePlan:
    name: str
    config: Config
    path: Path
    url: str
    """The server this node is pointed at first (its nats.url lists them all)."""


@dataclass(frozen=True)
class Plan:
    servers: list[ServerSettings]
    nodes: list[NodePlan]
    security: Path | None = None
    """Security on: the one PKI every server and node uses (see `secure`)."""


def plan(args: argparse.Namespace) -> Plan:
    import msgspec

    from kaya.app.broker.embedded import ServerSettings
    from kaya.app.config import Config, ConfigError, load_config, with_overrides

    count, base = args.servers, args.base_port
    if count > MAX_SERVERS:
        raise common.CliError(f"--servers {count}: at most {MAX_SERVERS}")
    if base + MONITOR_OFFSET + count - 1 > 65535:
        raise common.CliError(
            f"--base-port {base}: the monitoring ports would end at"
            f" {base + MONITOR_OFFSET + count - 1}, beyond 65535"
        )
    base_config = with_overrides(
        load_config(args.config), app=args.app, secure=getattr(args, "secure", None)
    )
    shards = args.shards or base_config.shards.count
    data_dir = Path(args.data_dir).resolve()
    security = _security_dir(base_config, data_dir)
    route_ports = [base + ROUTE_OFFSET + i for i in range(count)]
    servers = [
        ServerSettings(
            host=HOST,
            port=base + i,
            monitor_port=base + MONITOR_OFFSET + i,
            store_dir=data_dir / f"nats-{i + 1}",
            shards=shards,
            max_payload=base_config.nats.max_payload,
            name=f"nats-{i + 1}",
            sync_always=True,
            cluster_name=CLUSTER_NAME if count > 1 else "",
            cluster_port=route_ports[i] if count > 1 else 0,
            routes=tuple(f"nats-route://{HOST}:{p}" for p in route_ports if p != route_ports[i])
            if count > 1
            else (),
        )
        for i in range(count)
    ]
    if args.nodes and not base_config.node.app:
        raise common.CliError(
            "no app for the nodes to serve: pass --app module:attr (e.g. --app"
            " examples.bank:app), set `app` in the config's [node] section, or --nodes 0"
        )
    if security is not None:
        servers = _secured(servers, security, base_config)
    nodes = []
    for i in range(args.nodes):
        name = f"kaya-{i + 1}"
        urls = [s.url for s in servers]
        first = i % count  # node i on server i: the load spreads over the servers
        urls = urls[first:] + urls[:first]
        replace = msgspec.structs.replace
        try:
            config = msgspec.convert(  # through Config's checks, as a file would be
                msgspec.to_builtins(
                    replace(
                        base_config,
                        node=replace(base_config.node, name=name, data_dir=str(data_dir / name)),
                        nats=replace(base_config.nats, url=",".join(urls)),
                        security=replace(
                            base_config.security,
                            enabled=security is not None,
                            dir=str(security) if security is not None else "",
                        ),
                        cluster=replace(base_config.cluster, durability="replicated"),
                        events=replace(base_config.events, replicas=min(3, count)),
                        shards=replace(base_config.shards, count=shards),
                        metrics=replace(base_config.metrics, address=f"{HOST}:0"),
                        http=replace(base_config.http, address=_http_address(base_config, i)),
                    )
                ),
                Config,
            )
        except (ValueError, msgspec.ValidationError) as exc:
            raise ConfigError(f"{args.config or 'the defaults'}, for {name}: {exc}") from None
        nodes.append(NodePlan(name, config, data_dir / name / "config.toml", urls[0]))
    return Plan(servers, nodes, security)


def _http_address(config: Config, index: int) -> str:
    """Node `index`'s gateway: the config's port + index (8080, 8081, ... for config.toml),
    so the nodes of one machine do not all ask for the same port; none if it has none."""
    from kaya.app.config import metrics_address

    parsed = metrics_address(config.http.address, "http.address")  # checked with the config
    if parsed is None:
        return ""
    host, port = parsed
    return f"{host}:{port + index if port else 0}"


def _security_dir(config: Config, data_dir: Path) -> Path | None:
    """The PKI the whole cluster shares, None with security off: `[security] dir` if the
    config names one, else one under --data-dir (not each node's `<data_dir>/security`,
    which would be a CA per node that no other server trusts)."""
    if not config.security.enabled:
        return None
    return Path(config.security.dir).resolve() if config.security.dir else data_dir / "security"


def _secured(servers: list[ServerSettings], security: Path, config: Config) -> list[ServerSettings]:
    """The servers with security on: what a node's embedded server has (client TLS mapped
    to the roles, the authorization block), and routes over TLS with the route
    certificate. Only paths here: the files are made by `secure`, after the ports are
    checked, and the JetStream key with them."""
    from dataclasses import replace

    from kaya.app.broker.embedded import TlsFiles
    from kaya.app.security.permissions import authorization_block
    from kaya.app.security.pki import Pki

    entities: tuple[str, ...] = ()
    if config.node.app:  # the node role may publish the events of the app's entities only
        entities = tuple(entity.name for entity in common.app(config).registry)
    pki = Pki(security)
    tls = TlsFiles(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)
    routes = TlsFiles(cert=pki.route_cert, key=pki.route_key, ca=pki.ca)
    authorization = tuple(authorization_block(entities))
    return [
        replace(
            server,
            tls=tls,
            route_tls=routes if server.cluster_name else None,
            authorization=authorization,
        )
        for server in servers
    ]


def secure(the_plan: Plan) -> Plan:
    """Make the shared PKI (kept if there), a NATS context per role naming every server,
    and the JetStream key, which every server gets: a stream's replicas are the same
    files on each, and one key to keep is one fewer to lose. A no-op with security off."""
    from dataclasses import replace

    from kaya.app.security.pki import ensure_pki, store_key, write_contexts
    from kaya.app.security.tls import tls_url

    if the_plan.security is None:
        return the_plan
    pki = ensure_pki(the_plan.security, hosts=[HOST])
    write_contexts(pki, tls_url(",".join(server.url for server in the_plan.servers)))
    key = store_key(the_plan.security)
    servers = [replace(server, store_key=key) for server in the_plan.servers]
    return replace(the_plan, servers=servers)


def security_lines(security: Path) -> list[str]:
    """What to connect with, printed before `cluster ready` (none contains "ready": the
    tests read lines up to that one)."""
    from kaya.app.security.pki import ROLES, Pki

    pki = Pki(security)
    roles = ",".join(ROLES)
    return [
        f"security on: TLS with a client certificate from the CA in {security}, on every server",
        f"contexts: {pki.dir / 'contexts'}/kaya-{{{roles}}}.json",
        f"e.g. nats --context {pki.context_file('admin')} stream ls",
        f"e.g. kaya get account a-1 --context {pki.context_file('client')}",
    ]


def toml(config: Config) -> str:
    """The config as TOML that `kaya run --config` reads back to the same Config.

    By hand: a section holds strings, numbers, booleans, lists of strings and sections of
    its own (`[security.jwt]`), and a TOML writer would be one more dependency for these
    few lines.
    """
    import msgspec

    from kaya.app.config import parse_config

    sections: dict[str, dict[str, Any]] = msgspec.to_builtins(config)
    lines: list[str] = []
    for section, values in sections.items():
        _toml_table(section, values, lines)
    text = "\n".join(lines)
    if parse_config(text) != config:  # a value this writer cannot spell: say so, not differ
        raise common.CliError(f"cannot write the config as TOML: {config!r}")
    return text


def _toml_table(name: str, values: dict[str, Any], lines: list[str]) -> None:
    """`[name]` with its values, then each table inside it as `[name.key]`: TOML puts a
    table's own keys before its subtables, or they would belong to the last subtable."""
    lines.append(f"[{name}]")
    lines.extend(
        f"{key} = {_toml_value(value)}"
        for key, value in values.items()
        if not isinstance(value, dict)
    )
    lines.append("")
    for key, value in values.items():
        if isinstance(value, dict):
            _toml_table(f"{name}.{key}", value, lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's escapes are TOML's, but TOML wants DEL escaped too
        return json.dumps(value).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def check_ports(servers: Sequence[ServerSettings]) -> None:
    """Name the first busy port now: once the servers start, a clash is a line in one log."""
    for server in servers:
        wanted = [("client port", server.port), ("monitoring port", server.monitor_port)]
        if server.cluster_port:
            wanted.insert(1, ("route port", server.cluster_port))
        for what, port in wanted:
            with socket.socket() as s:
                # as nats-server binds: a port whose last connection lingers is free
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((HOST, port))
                except OSError:
                    raise common.CliError(
                        f"port {port} ({what} of {server.name}) is in use on {HOST}: stop what"
                        " holds it or pick another --base-port"
                    ) from None


# ---- the children -------------------------------------------------------------------------


@dataclass(eq=False)
class Child:
    """One server or node process: its output copied to its log, its exit reported."""

    kind: str  # "server" or "node", as the printed lines name it
    name: str
    url: str
    ready_line: bytes
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    stopping: bool = False
    settled: anyio.Event = field(default_factory=anyio.Event)
    """Set once the child printed its ready line, or exited."""
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def spawn(self, argv: list[str], tg: TaskGroup) -> None:
        from kaya.app.broker.embedded import _die_with_parent

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with anyio.CancelScope(shield=True):  # a process started is a process `stop` knows
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                limit=LINE_LIMIT,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # a terminal's Ctrl-C reaches dev-cluster: it stops all
            )
        tg.start_soon(self._pump)

    async def _pump(self) -> None:
        """Until the child's output closes, which is when it exits; then report the exit."""
        process = self.process
        assert process is not None
        assert process.stdout is not None
        with self.log_path.open("ab") as log:
            while True:
                try:
                    line = await process.stdout.readline()
                except ValueError:  # longer than LINE_LIMIT: asyncio dropped it
                    continue
                if not line:
                    break
                log.write(line)
                log.flush()
                self.tail.append(line.decode(errors="replace").rstrip())
                if not self.ready and self.ready_line in line:
                    self.ready = True
                    self.settled.set()
        code = await process.wait()
        self.settled.set()
        if self.ready and not self.stopping:
            print(f"{self.kind} {self.name} exited with code {code}", flush=True)

    async def wait_ready(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self.settled.wait()
        if self.ready:
            return
        process = self.process
        assert process is not None
        why = self.last_error()
        if process.returncode is not None:
            raise StartFailed(
                f"{self.kind} {self.name} exited with code {process.returncode} before it was"
                f" ready: {why} (see {self.log_path})"
            )
        raise StartFailed(
            f"{self.kind} {self.name} not ready after {timeout:g}s: {why} (see {self.log_path})"
        )

    def last_error(self) -> str:
        """Its last error line (or last line): why it failed, in a few words."""
        marks = ("[FTL]", "[ERR]", "error:", '"level":"error"', '"level": "error"')
        errors = [line for line in self.tail if any(mark in line for mark in marks)]
        line = (errors or list(self.tail) or ["no output"])[-1]
        for level in ("[FTL] ", "[ERR] "):  # nats-server's `[pid] date time [FTL] what`
            line = line.split(level, 1)[-1]
        return line.removeprefix("error: ")  # `kaya run`'s: the line printed has its own

    async def stop(self, timeout: float) -> None:
        """SIGTERM, wait, then SIGKILL: the child is gone when this returns."""
        from kaya.app.broker.embedded import stop_process

        self.stopping = True
        if self.process is not None:
            await stop_process(self.process, timeout)


class Cluster:
    def __init__(self, tg: TaskGroup) -> None:
        self._tg = tg
        self.servers: list[Child] = []
        self.nodes: list[Child] = []

    async def start(self, plan: Plan) -> None:
        """Servers, JetStream, nodes; raises StartFailed (`stop` then stops what started)."""
        from kaya.app.broker.embedded import READY_LINE, find_binary, server_config

        binary = find_binary()
        for settings in plan.servers:
            settings.store_dir.mkdir(parents=True, exist_ok=True)
            conf = settings.store_dir / "nats-server.conf"
            conf.write_text(server_config(settings))
            child = Child(
                "server", settings.name, settings.url, READY_LINE, settings.store_dir / "server.log"
            )
            self.servers.append(child)
            await child.spawn([binary, "-c", str(conf)], self._tg)
        for child in self.servers:  # they start together: each one's routes need the others
            await child.wait_ready(SERVER_READY_TIMEOUT)
            print(f"server {child.name} ready on {child.url} (pid {child.pid})", flush=True)
        admin = None
        if plan.security is not None:  # JetStream's state is asked for as the admin
            from kaya.app.security.pki import Pki

            admin = Pki(plan.security).role("admin").ssl_context()
        await wait_for_jetstream(plan.servers, JETSTREAM_TIMEOUT, tls=admin)

        command = kaya_command()
        for node in plan.nodes:
            node.path.parent.mkdir(parents=True, exist_ok=True)
            node.path.write_text(toml(node.config))
            ready = f"kaya node {node.name} ready on ".encode()
            child = Child("node", node.name, node.url, ready, node.path.parent / "node.log")
            self.nodes.append(child)
            await child.spawn([*command, "run", "--config", str(node.path)], self._tg)
            # One at a time, as a rolling start: nodes that create the streams together on
            # a fresh JetStream cluster wait out their 5 s timeouts (nats-server 2.15).
            await child.wait_ready(NODE_READY_TIMEOUT)
            print(f"node {child.name} ready on {child.url} (pid {child.pid})", flush=True)
        if plan.security is not None:
            for line in security_lines(plan.security):
                print(line, flush=True)

    async def stop(self) -> None:
        """Nodes first, then servers: a node stopping still publishes and commits."""
        for children, timeout in (
            (self.nodes, NODE_STOP_TIMEOUT),
            (self.servers, SERVER_STOP_TIMEOUT),
        ):
            for child in children:  # none of them is reported as "exited" from here on
                child.stopping = True
            async with anyio.create_task_group() as tg:
                for child in children:
                    tg.start_soon(child.stop, timeout)


def kaya_command() -> list[str]:
    """How to start `kaya` with this interpreter: its console script, else the CLI's main."""
    script = Path(sys.executable).parent / "kaya"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from kaya.app.cli import main; sys.exit(main())"]


async def wait_for_jetstream(
    servers: Sequence[ServerSettings], timeout: float, *, tls: ssl.SSLContext | None = None
) -> None:
    """Until JetStream answers and, in a cluster, its meta leader counts every server as a
    current peer: before that a stream with more replicas than known peers is refused.
    `tls`: security on, the admin's certificate (JetStream's API is the admin's)."""
    missing = "no answer"
    with anyio.move_on_after(timeout):
        while True:  # polled: the servers announce none of this
            missing = await _jetstream_missing(servers, tls)
            if not missing:
                return
            await anyio.sleep(0.1)
    raise StartFailed(f"JetStream not usable after {timeout:g}s: {missing}")


async def _jetstream_missing(servers: Sequence[ServerSettings], tls: ssl.SSLContext | None) -> str:
    """What the cluster's JetStream still lacks ("" for nothing)."""
    import nats
    import nats.errors

    async def quiet(exc: Exception) -> None:
        pass

    try:
        nc = await nats.connect(
            [s.url for s in servers],
            connect_timeout=2,
            allow_reconnect=False,
            error_cb=quiet,
            tls=tls,
        )
    except (nats.errors.Error, OSError) as exc:
        return f"cannot connect: {exc!r}"
    try:
        await nc.jetstream(timeout=2).account_info()
    except (nats.errors.Error, OSError) as exc:
        return f"no JetStream account info: {exc!r}"
    finally:
        await nc.close()
    if len(servers) == 1:
        return ""
    leaders = set()
    for server in servers:
        meta = (await anyio.to_thread.run_sync(_jsz, server.monitor_port)).get("meta_cluster", {})
        leaders.add(meta.get("leader") or "")
        if meta.get("cluster_size") != len(servers):
            return f"{server.name} knows {meta.get('cluster_size')} of {len(servers)} servers"
    if len(leaders) != 1 or "" in leaders:
        return f"no meta leader all servers agree on: {sorted(leaders)}"
    leader = next(s for s in servers if s.name in leaders)
    peers = (await anyio.to_thread.run_sync(_jsz, leader.monitor_port))["meta_cluster"]
    current = [r["name"] for r in peers.get("replicas", []) if r.get("current")]
    if len(current) != len(servers) - 1:
        return f"meta leader {leader.name} has {len(current)} current peers: {current}"
    return ""


def _jsz(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/jsz", timeout=2) as response:
            found: dict[str, Any] = json.load(response)
            return found
    except (OSError, ValueError):
        return {}


# ---- the command -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_cluster() -> AsyncIterator[Cluster]:
    """A Cluster whose children are all stopped when the block ends, however it ends."""
    async with anyio.create_task_group() as tg:
        cluster = Cluster(tg)
        try:
            yield cluster
        finally:
            with anyio.CancelScope(shield=True):
                await cluster.stop()
            tg.cancel_scope.cancel()


async def _dev_cluster(args: argparse.Namespace) -> int:
    the_plan = plan(args)
    check_ports(the_plan.servers)
    the_plan = await anyio.to_thread.run_sync(secure, the_plan)
    failure = ""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_cluster() as cluster, anyio.create_task_group() as tg:

            async def on_signal() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    print(f"dev-cluster stopping ({name})", file=sys.stderr, flush=True)
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(on_signal)
            try:
                await cluster.start(the_plan)
            except (StartFailed, common.CliError, OSError) as exc:
                failure = str(exc)
                tg.cancel_scope.cancel()
            else:
                print("cluster ready", flush=True)
                await anyio.sleep_forever()
    if failure:
        raise common.CliError(failure)
    return 0
