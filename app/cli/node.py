"""`kaya run` and `kaya server-config`: the commands that are, or configure, a node.

    kaya run -> config + app -> logging, GC and GIL settings -> open_node -> until a signal

`kaya run` is the process a deployment starts: it tunes the interpreter for a busy
node (the reasons are beside each setting), prints one `ready` line once the node
serves, and stops cleanly on SIGINT or SIGTERM. `kaya server-config` prints the
nats-server config that node would embed, for running that server separately, and
with the cluster flags the config of each server of a JetStream cluster.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys

import anyio

from kaya.app.cli import common
from kaya.app.cli.common import CliError

DEFAULT_CLUSTER_PORT = 6222
"""nats-server's own default for routes."""

GC_THRESHOLDS = (50_000, 20, 20)
"""Allocations before a young collection, and young/middle collections before the next
generation's: far fewer full scans of the many long-lived objects a busy node holds."""


def register(sub: common.Subcommands) -> None:
    """`kaya run` (first in `kaya --help`; `register_server_config` adds the other)."""
    run = sub.add_parser("run", help="start a node and serve until SIGINT/SIGTERM")
    common.common(run, node=True)
    common.with_app(run)
    run.add_argument(
        "--monitor-port", type=int, metavar="N", help="overrides nats.monitor_port (0: off)"
    )
    run.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="overrides metrics.address (port 0 picks a free one; empty: off)",
    )
    run.add_argument(
        "--http-address",
        metavar="HOST:PORT",
        help="overrides http.address: the HTTP gateway, /openapi.json and /docs (port 0 picks"
        " a free one; empty: off)",
    )
    run.add_argument(
        "--secure",
        action="store_true",
        default=None,
        help="security on (overrides security.enabled): TLS with a client certificate per role",
    )
    run.add_argument(
        "--node-name",
        metavar="NAME",
        help="overrides node.name (default: $KAYA_NODE_NAME, then the config): one config"
        " for every node of a cluster, each started with its own name",
    )
    run.add_argument(
        "--role",
        choices=["all", "commands", "consumers"],
        help="overrides node.role: all (default), or the node as two processes: commands"
        " and consumers, started with the same config",
    )
    run.add_argument("--log-format", choices=["json", "text"], help="overrides log.format")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(handler=_run)


def register_security(sub: common.Subcommands) -> common.Subcommands:
    """`kaya security init`: the PKI and contexts for a server the node does not embed.
    Returns the `security` actions, for the others (`token`: app/cli/token.py)."""
    actions = sub.add_parser(
        "security", help="make the CA, certificates and NATS contexts, or a development JWT"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    security = actions.add_parser(
        "init",
        help="make the CA, certificates and NATS contexts (security on)",
        description="`kaya security init` makes under security.dir (default"
        " <data_dir>/security) what a node with an embedded server makes on its first secure"
        " start: a development CA, the server's certificate, one certificate per role (admin,"
        " node, client, reader) and a NATS CLI context per role. For your own nats-server:"
        " then `kaya server-config --app M:A` prints its tls and authorization blocks.",
    )
    common.common(security, node=True)
    security.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address the server is reached by (repeat); always: localhost,"
        " 127.0.0.1 and nats.host",
    )
    security.set_defaults(handler=_security)
    return actions


async def _security(args: argparse.Namespace) -> int:
    import functools

    from kaya.app.security.pki import ensure_pki, write_contexts
    from kaya.app.security.tls import tls_url

    config = common.config(args)
    hosts = [config.nats.host, *args.host]
    pki = await anyio.to_thread.run_sync(
        functools.partial(ensure_pki, config.security_dir, hosts=hosts)
    )
    url = config.nats.url or f"nats://{config.nats.host}:{config.nats.port}"
    for path in write_contexts(pki, tls_url(url)):
        print(f"wrote {path}")
    print(f"CA, certificates and keys in {pki.dir} (kept if they were there)")
    return 0


def register_server_config(sub: common.Subcommands) -> None:
    """`kaya server-config`, apart from `run` so `kaya --help` keeps its place after status."""
    server = sub.add_parser(
        "server-config",
        help="print the nats-server config a node uses",
        description="Print the nats-server config a node embeds: JetStream, the shard"
        " mappings and, with --cluster-name, the cluster block. For a cluster, print one per"
        " server, each with its own --server-name and --cluster-port, --routes naming the"
        " others, and the same --cluster-name and [shards] count.",
    )
    common.common(server, node=True)
    common.with_app(server)
    server.add_argument(
        "--server-name",
        metavar="NAME",
        help="the server's name, unique in a cluster (JetStream tells its peers apart by it);"
        " default: node.name",
    )
    server.add_argument(
        "--cluster-name",
        metavar="NAME",
        help="add a cluster block: the servers sharing this name form one JetStream cluster",
    )
    server.add_argument(
        "--cluster-port",
        type=common.positive_int,
        metavar="N",
        help=f"port this server listens on for its peers' routes (default {DEFAULT_CLUSTER_PORT})",
    )
    server.add_argument(
        "--routes",
        metavar="URL[,URL...]",
        help="the other servers' routes, comma-separated, each HOST:PORT (or a full route URL)",
    )
    server.set_defaults(handler=_server_config)


async def _run(args: argparse.Namespace) -> int:
    from kaya.app.node import open_node
    from kaya.app.observability.logs import configure_logging

    config = common.config(args)
    app = common.app(config)
    configure_logging(
        level=args.log_level or config.log.level,
        fmt=args.log_format or config.log.format,
        node=config.node.name,
    )
    sys.setswitchinterval(0.0005)  # the SQLite thread hands the GIL back sooner: lower p99
    # A busy node keeps tens of thousands of requests, replies and actors alive; with the
    # default thresholds (700, 10, 10) the cyclic GC re-scans them every few hundred
    # allocations. At 3x peak: 5.0k -> 7.7k accepted/s, refusals p99 352 -> 253 ms (bench.load).
    gc.set_threshold(*GC_THRESHOLDS)
    server = config.nats.url or "the embedded nats-server"
    ready = anyio.Event()
    stop = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                async for signum in signals:
                    print(
                        f"kaya node {config.node.name} stopping ({signal.Signals(signum).name})",
                        file=sys.stderr,
                        flush=True,
                    )
                    if not ready.is_set():  # still starting (e.g. waiting for NATS): give up
                        tg.cancel_scope.cancel()
                    stop.set()
                    return

            tg.start_soon(on_signal)
            try:
                async with open_node(config, app) as node:
                    ready.set()
                    gc.freeze()  # what start-up built lives as long as the node: never scan it
                    where = "embedded" if node.server else "external"
                    if node.metrics_url:
                        print(
                            f"kaya node {config.node.name} metrics on {node.metrics_url}",
                            flush=True,
                        )
                    http = f", http {node.http_url}" if node.http_url else ""
                    role = "" if config.node.role == "all" else f" ({config.node.role})"
                    print(
                        f"kaya node {config.node.name}{role} ready on {node.url} ({where}"
                        f" nats-server, store {config.store_path}, app {config.node.app}{http})",
                        flush=True,
                    )
                    await stop.wait()
            except Exception as exc:  # NATS or JetStream refusing at start-up: one line
                from kaya.app.node import ClusterError

                inner = common.innermost(exc)
                if isinstance(inner, ClusterError):
                    raise CliError(str(inner)) from None
                failure = common.nats_failure(exc, server)
                if failure is None:
                    raise
                raise failure from None
            tg.cancel_scope.cancel()
    return 0


async def _server_config(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kaya.app.broker.embedded import server_config
    from kaya.app.node import embedded_settings

    config = common.config(args)
    entities: tuple[str, ...] = ()
    if config.security.enabled:  # the node role may publish the events of the app's entities
        entities = tuple(entity.name for entity in common.app(config).registry)
    settings = embedded_settings(config, entities)
    if args.server_name:
        settings = replace(settings, name=args.server_name)
    if args.cluster_name:
        settings = replace(
            settings,
            cluster_name=args.cluster_name,
            cluster_port=args.cluster_port or DEFAULT_CLUSTER_PORT,
            routes=route_urls(args.routes or ""),
        )
    elif args.cluster_port or args.routes:
        raise common.CliError(
            "--cluster-port and --routes need --cluster-name (the cluster the routes join)"
        )
    print(server_config(settings), end="")
    return 0


def route_urls(routes: str) -> tuple[str, ...]:
    """`--routes` as the server wants them: a bare HOST:PORT is read as a route URL."""
    return tuple(
        route if "://" in route else f"nats-route://{route}"
        for route in (part.strip() for part in routes.split(","))
        if route
    )
