"""The node: wires config -> nats-server -> store -> actors -> ingress, and unwires in order.

Start-up: embedded server (unless `nats.url`), event store, actor runtime, NATS
connection, ingress. Shut-down is the reverse, each step waiting for the one
before: stop taking requests, answer those in flight, close NATS, commit what
the store has queued, stop the server.

While it runs, no part's failure is the node's: the relay and the consumers retry
what fails and report it (degraded, in `/readyz`, `kaya status` and metrics). The
one failure that ends the node is losing its embedded nats-server for good (it is
restarted first, see kaya.app.broker.embedded): then `open_node` raises its
ServerError, and `kaya run` exits with it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from kaya.actors import ActorRuntime, RuntimeSettings
from kaya.actors.errors import Unavailable
from kaya.actors.policy import Caller
from kaya.actors.retry import Backoff
from kaya.actors.saga import SagaDriver
from kaya.actors.sealing import Sealer
from kaya.actors.wire import EVENTS_STREAM, HEADER_AUTHORIZATION, HEALTH_SUBJECT
from kaya.app.application import App
from kaya.app.broker.adapter import connect, server_urls
from kaya.app.broker.embedded import (
    EmbeddedServer,
    ServerSettings,
    TlsFiles,
    run_embedded_server,
)
from kaya.app.broker.streams import ensure_streams
from kaya.app.broker.watchdog import watch_jetstream
from kaya.app.cluster.follower import Follower
from kaya.app.cluster.host import ShardHost
from kaya.app.cluster.journal import Journal
from kaya.app.cluster.leases import LeaseKeeper, LeaseSettings, ensure_bucket
from kaya.app.cluster.steps import STEP_TIMEOUT, remote_ask
from kaya.app.config import Config, ConfigError, metrics_address
from kaya.app.events.consumers import Context, Projection
from kaya.app.events.relay import Relay
from kaya.app.events.runner import ConsumerRunner
from kaya.app.ingress import Ingress
from kaya.app.observability.health import healthz, node_status, readyz, status_json
from kaya.app.observability.http import serve_http
from kaya.app.observability.lag import LoopLag
from kaya.app.observability.metrics import CONTENT_TYPE, Metrics
from kaya.app.observability.statistics import (
    BrokerStatistics,
    ClusterStatistics,
    NodeStatistics,
)
from kaya.app.schemas.registry import register_schemas
from kaya.app.security.keys import KeyVault, ensure_keys_bucket, master_key, pseudonym_key
from kaya.app.security.permissions import authorization_block
from kaya.app.security.pki import Pki, ensure_pki, store_key, write_contexts
from kaya.app.security.tls import tls_url
from kaya.store import EventStore, StoreError, open_event_store

T = TypeVar("T")

log = logging.getLogger("kaya.node")

STORE_FAILURE_HOLD = 10.0
"""Seconds a failed store write keeps the node unready unless appends commit again first:
with no commands coming (none are routed to an unready node) it clears by itself once
nothing has failed for this long, and a full disk keeps failing the consumers' retries."""
LIVENESS_GRACE = 30.0
"""Seconds without a NATS connection before the node counts as unable to serve (`/healthz`
503). A broker restart or a network blip takes less; a node cut off for longer serves
nothing, and a liveness probe's restart is the one remedy left that the node cannot
apply itself (a fresh process, a fresh connection, possibly elsewhere)."""
STREAMS_RETRY = Backoff(initial=0.2, cap=5.0)
STREAMS_ATTEMPTS = 8
"""Attempts to re-create the streams after a reconnect: JetStream may still be starting."""


CATCH_UP_GRACE = 60.0
"""Seconds a starting node may take to catch up the shards it took in its first round."""


class ClusterError(RuntimeError):
    """The node cannot take its place among the others (say, a second node with local
    durability): said at start-up, in one line, instead of serving half the shards."""


class NatsLink:
    """Since when the node's NATS connection has been down: what liveness allows a grace."""

    def __init__(self) -> None:
        self.down_since: float | None = None

    def disconnected(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()

    def reconnected(self) -> None:
        self.down_since = None

    def down_for(self, nc: NATS) -> float:
        """Seconds the connection has been down (0 while connected), by the client's state."""
        if nc.is_connected:
            self.down_since = None
            return 0.0
        self.disconnected()
        assert self.down_since is not None
        return time.monotonic() - self.down_since


@dataclass
class Node:
    config: Config
    url: str
    nc: NATS
    store: EventStore
    runtime: ActorRuntime
    ingress: Ingress
    app: App
    server: EmbeddedServer | None
    relay: Relay | Follower
    """Local durability: the outbox relay. Replicated: the follower (nothing to relay)."""
    consumers: dict[str, ConsumerRunner]
    keeper: LeaseKeeper | None = None
    host: ShardHost | None = None
    journal: Journal | None = None
    metrics_url: str | None = None
    http_url: str | None = None
    """The HTTP gateway's base URL (`http.address`), once it serves."""
    link: NatsLink = field(default_factory=NatsLink)

    def _server_down(self) -> str:
        server = self.server
        if server is None or server.down_since is None:
            return ""
        return (
            f"embedded nats-server down for {server.down_for:.0f}s"
            f" (restarting it; {server.restarts} restarts so far)"
        )

    def readiness(self) -> tuple[str, ...]:
        """What keeps the node from taking commands right now; empty when ready."""
        problems = []
        if down := self._server_down():
            problems.append(down)
        if not self.nc.is_connected:
            problems.append("not connected to NATS")
        if not self.ingress.serving and self.config.node.role != "consumers":
            problems.append("ingress not serving")
        if self.store.closing:
            problems.append("store closing")
        keeper = self.keeper
        if keeper is not None and keeper.conflict:
            problems.append(keeper.conflict)
        store = self.store.statistics()
        if (  # commands get `unavailable` meanwhile
            store.write_failing_since is not None
            and store.last_write_failure is not None
            and time.time() - store.last_write_failure < STORE_FAILURE_HOLD
        ):
            problems.append(f"store cannot write: {store.last_write_error}")
        return tuple(problems)

    def liveness(self) -> tuple[str, ...]:
        """Why the node cannot serve and a restart of the process is called for; empty
        while it can: its embedded server is down (being restarted, else the node
        exits), or NATS has been unreachable for longer than LIVENESS_GRACE."""
        problems = []
        if down := self._server_down():
            problems.append(down)
        away = self.link.down_for(self.nc)
        if away > LIVENESS_GRACE:
            problems.append(f"not connected to NATS for {away:.0f}s")
        return tuple(problems)

    def _broker(self) -> BrokerStatistics:
        server = self.server
        return BrokerStatistics(
            connected=self.nc.is_connected,
            disconnected_for=self.link.down_for(self.nc),
            embedded=server is not None,
            server_pid=server.pid if server is not None and server.process else None,
            server_down_for=server.down_for if server is not None else 0.0,
            server_restarts=server.restarts if server is not None else 0,
        )

    async def statistics(self) -> NodeStatistics:
        """A frozen snapshot of every part, for health, status and metrics."""
        problems = self.readiness()
        liveness = self.liveness()
        return NodeStatistics(
            name=self.config.node.name,
            url=self.url,
            shards=self.config.shards.count,
            ready=not problems,
            problems=problems,
            inflight=self.ingress.inflight,
            loop_lag=self.ingress.loop_lag,
            commands=self.ingress.metrics.statistics(),
            runtime=self.runtime.statistics(),
            store=self.store.statistics(),
            relay=await self.relay.statistics(),
            consumers={name: runner.statistics() for name, runner in self.consumers.items()},
            live=not liveness,
            liveness=liveness,
            broker=self._broker(),
            cluster=self._cluster(),
            stages=self.store.stages.snapshot(),
        )

    def _cluster(self) -> ClusterStatistics:
        host, journal = self.host, self.journal
        return ClusterStatistics(
            durability=self.config.cluster.durability,
            serving=tuple(sorted(host.serving)) if host is not None else (),
            handovers=host.handovers if host is not None else 0,
            refused=journal.refused if journal is not None else 0,
            unsure=journal.unsure if journal is not None else 0,
        )


def embedded_settings(config: Config, entities: tuple[str, ...] = ()) -> ServerSettings:
    """The embedded server's settings; with security on, `entities` (the app's) are what
    the node role may publish events for."""
    tls = None
    authorization: tuple[str, ...] = ()
    if config.security.enabled:
        pki = Pki(config.security_dir)
        tls = TlsFiles(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)
        authorization = tuple(authorization_block(entities))
    return ServerSettings(
        tls=tls,
        authorization=authorization,
        store_key=store_key(config.security_dir) if config.security.enabled else "",
        host=config.nats.host,
        port=config.nats.port,
        monitor_port=config.nats.monitor_port,
        store_dir=Path(config.node.data_dir) / "nats",
        shards=config.shards.count,
        max_payload=config.nats.max_payload,
        name=config.node.name,
        sync_always=config.nats.sync_always,
    )


async def _expire_replies(store: EventStore, retention: float) -> None:
    interval = min(retention / 4, 300.0)
    while True:
        await anyio.sleep(interval)
        try:
            removed = await store.expire_replies(time.time() - retention)
        except StoreError:
            log.exception("expiring idempotency replies failed")
        else:
            if removed:
                log.info("forgot %d idempotency replies", removed)


@asynccontextmanager
async def open_node(config: Config, app: App) -> AsyncIterator[Node]:
    """Run a node serving `app` for the duration of the block; leave nothing running behind.

    This is the one place the node's parts are wired together, in the order they depend
    on each other: where shard ownership and credentials will plug in too.

    `node.role` splits it into two processes on one data dir: `commands` runs everything
    but the consumers; `consumers` runs only them (and the consumer leases of a cluster),
    connecting to the server the `commands` process embeds, and writes their effects to
    the same SQLite file (its write lock is shared between processes).
    """
    registry = app.registry
    role = config.node.role
    commands = role != "consumers"  # serves commands: server, actors, relay, sagas, ingress
    async with AsyncExitStack() as stack:
        probes = _Probes()  # /healthz and /readyz from the first moment, not once NATS answers
        early = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(early.cancel_scope.cancel)
        metrics_url = await _serve_http_probes(config, probes, early)
        tls = None
        pki = None
        if config.security.enabled:  # made on first start, kept after (see app/security/pki.py)
            pki = await anyio.to_thread.run_sync(
                functools.partial(ensure_pki, config.security_dir, hosts=[config.nats.host])
            )
            tls = pki.role("node").ssl_context()
        server: EmbeddedServer | None = None
        if config.nats.url:
            url = config.nats.url
        elif not commands:  # the `commands` process beside it embeds the server
            url = f"nats://{config.nats.host}:{config.nats.port}"
        else:
            server = await stack.enter_async_context(
                run_embedded_server(
                    embedded_settings(config, tuple(e.name for e in registry)),
                    startup_timeout=config.nats.startup_timeout,
                )
            )
            url = server.url
        store = await stack.enter_async_context(
            open_event_store(
                config.store_path,
                synchronous=config.store.synchronous,
                max_batch_events=config.store.max_batch_events,
            )
        )
        reconnected = anyio.Event()
        link = NatsLink()

        vault: KeyVault | None = None

        def on_reconnect() -> None:
            link.reconnected()
            reconnected.set()
            if vault is not None:  # a key forgotten while cut off must not stay cached
                vault.clear()

        servers = server_urls(url)
        nc = await connect(
            servers,
            name=config.node.name,
            on_reconnect=on_reconnect,
            on_disconnect=link.disconnected,
            timeout=config.nats.startup_timeout,
            tls=tls,
        )
        if pki is not None and commands:
            write_contexts(pki, tls_url(url))
        stack.push_async_callback(_close, nc)  # runs after the tasks below are cancelled
        await _with_retries(
            "creating the streams", lambda: ensure_streams(nc.jetstream(), config.events)
        )
        if not config.security.enabled and commands:  # with security on, only admin does
            await _with_retries(
                "registering the schemas",
                lambda: register_schemas(nc.jetstream(), registry, replicas=config.events.replicas),
            )
        cluster = config.cluster
        replicated = cluster.durability == "replicated"

        async def lease_bucket() -> None:
            await ensure_bucket(nc, cluster.lease_ttl, config.events.replicas)

        await _with_retries("creating the lease bucket", lease_bucket)
        singletons = tuple(
            c.name
            for c in app.consumers
            if replicated
            and not isinstance(c, Projection)
            and c.name not in config.consumers.disabled
        )
        keeper = LeaseKeeper(
            LeaseSettings(
                node=config.node.name,
                shards=config.shards.count,
                ttl=cluster.lease_ttl,
                renew_every=cluster.renew_every,
                max_moves=cluster.max_moves,
                exclusive=not replicated,
                fenced=replicated,
                singletons=singletons if role != "commands" else (),
                serves_shards=commands,
            ),
            servers,
            connect_options={"tls": tls} if tls is not None else None,
        )
        journal = (
            Journal(nc, keeper, shards=config.shards.count, ack_timeout=config.events.ack_timeout)
            if replicated
            else None
        )
        sealer = None
        secret = None
        if config.security.enabled:  # sensitive fields sealed with a key per entity
            master = await anyio.to_thread.run_sync(master_key, config.security_dir)
            secret = pseudonym_key(master)
            keys = await _with_retries(
                "creating the key bucket", lambda: ensure_keys_bucket(nc, config.events.replicas)
            )
            vault = KeyVault(nc, keys, master)
            await vault.start()
            sealer = Sealer(vault)
        verifier = None
        if config.security.jwt.enabled:
            from kaya.app.security.tokens import TokenVerifier  # PyJWT only when it is on

            try:
                verifier = TokenVerifier.from_config(config)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

        async def may_query(caller: Caller, entity: str, entity_id: str) -> bool:
            """An `ActsOn` decision: may `caller` read that entity? Asked of its actor
            here, or of the node serving it, with the caller's own token."""
            if entity not in registry:
                return False
            if journal is None or journal.admits(entity, entity_id):
                body = await runtime.ask(registry.get(entity), entity_id, None, caller=caller)
            else:
                try:
                    reply = await nc.request(
                        f"kaya.qry.{entity}.{entity_id}", b"", timeout=STEP_TIMEOUT,
                        headers={HEADER_AUTHORIZATION: f"Bearer {caller.token}"},
                    )  # fmt: skip
                except nats.errors.Error as exc:
                    raise Unavailable(f"cannot check access to {entity}/{entity_id} now") from exc
                body = reply.data
            if body.startswith(b'{"ok":true'):
                return True
            if b'"code":"unavailable"' in body or b'"code":"overloaded"' in body:
                raise Unavailable(f"cannot check access to {entity}/{entity_id} now; retry")
            return False

        runtime = ActorRuntime(
            store,
            RuntimeSettings(
                mailbox_size=config.actors.mailbox_size,
                max_active=config.actors.max_active,
                idle_timeout=config.actors.idle_timeout,
                snapshot_every=config.store.snapshot_every,
                max_turn=config.actors.max_turn,
            ),
            journal=journal,
            sealer=sealer,
            policy=app.policy if verifier is not None else None,
            lookup=may_query,
        )
        if vault is not None:

            def reload(entity: str, entity_id: str) -> None:  # its state holds plaintext
                runtime.unload(lambda e, i: e == entity and i == entity_id)

            vault.on_forget = reload
        tracing = None
        if config.tracing.otlp_endpoint:
            from kaya.app.observability.tracing import Tracing  # imported only when tracing is on

            tracing = Tracing(
                config.tracing.otlp_endpoint,
                node=config.node.name,
                sample_ratio=config.tracing.sample_ratio,
            )
            stack.callback(tracing.shutdown)  # flushes batched spans, after the tasks stop
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        await tg.start(runtime.run)
        observe = tracing.saga_step if tracing is not None else None
        sagas = SagaDriver(
            runtime,
            store,
            registry,
            observe_step=observe,
            ask=remote_ask(nc) if replicated else None,
            admits=journal.admits if journal is not None else None,
            resume_on_start=not replicated,
        )
        if commands:
            await tg.start(sagas.run)
            tg.start_soon(_expire_replies, store, config.store.reply_retention)
        lag = LoopLag()
        await tg.start(lag.run)
        relay: Relay | Follower
        if journal is not None:
            relay = follower = Follower(nc, store)
            journal.follow(lambda: follower.applied, follower.wait_for)
        else:
            follower = None
            relay = Relay(
                nc,
                store,
                batch=config.events.relay_batch,
                ack_timeout=config.events.ack_timeout,
                rewind=config.events.relay_rewind,
            )
        if commands:
            await tg.start(relay.run)
        if follower is not None and commands:  # no shard before the store holds the log
            await _with_retries("reading the log's end", lambda: _catch_up(nc, follower))
        if server is not None:
            tg.start_soon(
                watch_jetstream,
                server,
                lambda: relay.health,
                lambda: nc.is_connected,
                server.settings.store_dir,
            )

        async def after_reconnects() -> None:
            """A server that restarted may have lost streams or unsynced events: restore."""
            nonlocal reconnected
            while True:
                await reconnected.wait()
                reconnected = anyio.Event()
                relay.request_rewind()
                for attempt in range(1, STREAMS_ATTEMPTS + 1):  # JetStream may be starting
                    try:
                        await ensure_streams(nc.jetstream(), config.events)
                        break
                    except Exception as exc:
                        log.warning(
                            "re-creating the streams after a reconnect failed (%r), attempt %d",
                            exc,
                            attempt,
                        )
                        await STREAMS_RETRY.sleep(attempt)

        tg.start_soon(after_reconnects)

        async def publish(subject: str, data: bytes, headers: Mapping[str, str] | None) -> None:
            await nc.publish(subject, data, headers=dict(headers) if headers else None)

        context = Context(store, publish, sealer=sealer, pseudonym_key=secret)
        runners: dict[str, ConsumerRunner] = {}
        for consumer in app.consumers:
            if consumer.name in config.consumers.disabled or role == "commands":
                continue
            consumer.bind(context)
            shared = replicated and not isinstance(consumer, Projection)
            runner = ConsumerRunner(
                nc,
                store,
                consumer,
                config.consumers,
                registry=registry,
                tracing=tracing,
                # a cluster: read models per node (each store has every event), reactions
                # once per cluster (they act on the world: a notification, an email)
                durable=f"{consumer.name}-{config.node.name}"
                if replicated and not shared
                else None,
                shared=shared,
                before_batch=follower.wait_for if follower is not None and commands else None,
            )
            if not shared:
                await tg.start(runner.run)
            runners[consumer.name] = runner
        serving: set[int] = set()

        def owns(shard: int) -> bool:
            return shard in serving and keeper.owned(shard) is not None

        ingress = Ingress(
            nc,
            runtime,
            registry,
            config.ingress,
            node_name=config.node.name,
            shards=config.shards.count,
            views={name: functools.partial(view, context) for name, view in app.views.items()},
            tracing=tracing,
            lag=lag,
            owns=owns,
            per_shard=replicated,
            verifier=verifier,
            policy=app.policy,
        )
        host = ShardHost(
            keeper,
            ingress,
            runtime,
            sagas,
            shards=config.shards.count,
            journal=journal,
            follower=follower,
            resume_sagas=replicated,
        )
        host.serving = serving
        for name, runner in runners.items():
            if name in singletons:
                host.once_per_cluster(name, runner.run)
        node = Node(
            config,
            url,
            nc,
            store,
            runtime,
            ingress,
            app,
            server,
            relay,
            runners,
            keeper=keeper,
            host=host,
            journal=journal,
            link=link,
        )
        node.metrics_url = metrics_url
        await _serve_health(node)
        probes.node, probes.metrics = node, Metrics(node.statistics)
        try:
            if commands:
                await ingress.start()
            await tg.start(host.run)
            keeper.notify = host.notify_from(asyncio.get_running_loop().call_soon_threadsafe)
            await anyio.to_thread.run_sync(keeper.start, config.nats.startup_timeout)
            stack.push_async_callback(_stop_keeper, keeper)
            if keeper.conflict:
                raise ClusterError(keeper.conflict)
            with anyio.fail_after(config.nats.startup_timeout + CATCH_UP_GRACE):
                await host.first_round_served(keeper.first_taken)
            if config.http.address and commands:  # the HTTP gateway (app/http), a NATS client
                from kaya.app.http import serve_gateway

                node.http_url = await tg.start(serve_gateway, node)
                log.info("HTTP gateway on %s (docs %s/docs)", node.http_url, node.http_url)
            yield node
        finally:
            probes.stopping = True
            with anyio.CancelScope(shield=True):
                await host.drain_all()
                await ingress.stop()
                if nc.is_connected and commands:  # without a broker nothing to wait for
                    with anyio.move_on_after(10):
                        await relay.wait_caught_up()


async def _serve_health(node: Node) -> None:
    """`kaya.health` over NATS (a `consumers` process answers none: the node is the
    `commands` one)."""

    async def on_health(msg: Msg) -> None:
        if msg.reply:
            status = node_status(await node.statistics())
            await node.nc.publish(msg.reply, status_json(status))

    if node.config.node.role != "consumers":
        await node.nc.subscribe(HEALTH_SUBJECT, cb=on_health)


@dataclass
class _Probes:
    """What the HTTP probes answer from: nothing while the node starts, then the node."""

    node: Node | None = None
    metrics: Metrics | None = None
    stopping: bool = False
    """Set once the node stops taking requests: not ready, whatever its parts say."""


STARTING = b"starting\n"


async def _serve_http_probes(config: Config, probes: _Probes, tg: TaskGroup) -> str | None:
    """/metrics, /healthz, /readyz over HTTP if configured, from the node's first moment:
    while it starts (waiting for NATS, catching up a store) it is live and not ready, so an
    orchestrator needs no start-up grace to tell "starting" from "dead". A `consumers`
    process serves them on the configured port + 1, so both run with one config.
    Returns the metrics URL."""
    address = config.metrics.address
    parsed = metrics_address(address)  # checked with the config
    if parsed is None:
        return None
    host, port = parsed
    if config.node.role == "consumers" and port:
        port += 1

    async def metrics_route() -> tuple[int, str, bytes]:
        metrics = probes.metrics
        if metrics is None or probes.stopping:
            return 503, "text/plain", b"stopping\n" if probes.stopping else STARTING
        return 200, CONTENT_TYPE, await metrics.render()

    async def liveness() -> tuple[int, str, bytes]:
        node = probes.node
        if node is None or probes.stopping:  # alive: starting, or finishing its work
            return 200, "text/plain", b"stopping\n" if probes.stopping else STARTING
        return healthz(await node.statistics())

    async def readiness() -> tuple[int, str, bytes]:
        node = probes.node
        if node is None or probes.stopping:
            return 503, "text/plain", b"stopping\n" if probes.stopping else STARTING
        return readyz(await node.statistics())

    routes = {"/metrics": metrics_route, "/healthz": liveness, "/readyz": readiness}
    try:
        bound = await tg.start(serve_http, host, port, routes)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    return f"http://{host}:{bound}/metrics"


async def _catch_up(nc: NATS, follower: Follower) -> None:
    """A node joining a cluster copies the log into its store before it takes shards: a
    shard taken first would go unserved for as long as the copy takes."""
    info = await nc.jetstream().stream_info(EVENTS_STREAM)
    target = info.state.last_seq
    if follower.applied >= target:
        return
    log.info("catching up the store to the log: %d -> %d", follower.applied, target)
    with anyio.move_on_after(CATCH_UP_GRACE):
        await follower.wait_for(target)
    if follower.applied < target:
        log.warning("store still behind the log (%d < %d): taking shards anyway",
                    follower.applied, target)  # fmt: skip


async def _with_retries(what: str, step: Callable[[], Awaitable[T]]) -> T:
    """A start-up step against JetStream, tried STREAMS_ATTEMPTS times: nodes of a new
    cluster starting together make the same stream changes at once, and all but one
    can time out while the first is applied (seen with 3 nodes, nats-server 2.15)."""
    for attempt in range(1, STREAMS_ATTEMPTS + 1):
        try:
            return await step()
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            # not 503 (that is "no JetStream here"): a new stream whose leader is not
            # elected yet, or a change another node makes at the same moment
            if attempt == STREAMS_ATTEMPTS:
                raise
            log.warning("%s: %r, attempt %d", what, exc, attempt)
            await STREAMS_RETRY.sleep(attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _stop_keeper(keeper: LeaseKeeper) -> None:
    """After the node stopped serving: delete its leases (the others take them at once)."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(keeper.stop)


async def _close(nc: NATS) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await nc.drain()
        except Exception:  # already closed, or the server is gone: nothing left to flush
            log.debug("nats: drain failed", exc_info=True)
            try:  # still reconnecting, say: stop that too, and let go of the socket
                await nc.close()
            except Exception:
                log.debug("nats: close failed", exc_info=True)
