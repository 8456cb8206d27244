"""Node configuration: `config.toml` decoded into msgspec Structs.

Unknown keys, wrong types and impossible values stop start-up with one message
that names the key, because a typo in a config file should never be silently
ignored in production. Values that are each fine but impossible together (see
`cross_check`) stop it too, naming both keys: they would otherwise fail later, far
from their cause, or quietly break a guarantee.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class NodeConfig(_Section):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "kaya-1"
    data_dir: str = "data"
    """Where the event store and the embedded server's JetStream live; relative to the cwd."""
    app: str = ""
    """The app to serve, as `module:attribute` (`kaya run --app` wins over it)."""
    role: Literal["all", "commands", "consumers"] = "all"
    """What this process runs (`kaya run --role`): `all` (one process), or the same node as
    two: `commands` (the server, actors, store writes, relay, sagas) and `consumers` (the
    app's consumers, beside it on the same data dir and NATS), so the consumers no longer
    share the command path's event loop."""


class NatsConfig(_Section):
    url: str = ""
    """Empty: start the embedded nats-server. Otherwise the server(s) to connect to."""
    host: str = "127.0.0.1"
    port: Port = 4222
    monitor_port: Port = 8222
    """Embedded server's HTTP monitoring port; 0 turns monitoring off."""
    max_payload: Positive = 1024 * 1024
    startup_timeout: Seconds = 10.0
    sync_always: bool = False
    """Embedded server fsyncs every JetStream write (`sync_interval: always`). Off by
    default: the relay's rewind covers a broker that lost unsynced writes, for far less."""


class StoreConfig(_Section):
    path: str = "kaya.db"
    """The SQLite file, relative to data_dir."""
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    max_batch_events: Positive = 2000
    snapshot_every: Annotated[int, msgspec.Meta(ge=0)] = 100
    """Write a snapshot every N events of a stream; 0 turns snapshots off."""
    reply_retention: Seconds = 24 * 3600.0
    """How long a Kaya-Command-Id is remembered (seconds)."""


class ActorsConfig(_Section):
    mailbox_size: Positive = 1024
    max_active: Positive = 100_000
    idle_timeout: Seconds = 300.0
    max_turn: Positive = 512


class IngressConfig(_Section):
    max_inflight: Positive = 10_000
    """Commands and queries accepted but not yet answered; beyond it: `overloaded`."""
    max_queued: Positive = 1000
    """Requests received but not yet looked at (the client's per-subscription buffer);
    beyond it a request is refused `overloaded` before it is decoded."""
    max_loop_lag: Annotated[float, msgspec.Meta(ge=0)] = 0.05
    """Seconds the event loop may run behind, while busy with its own work, before
    commands are refused `overloaded` (queries still served); 0 turns it off. Requests
    wait for a busy loop in the socket, where nothing else sees them: refusing while
    it is behind keeps refusals fast."""
    max_body: Positive = 64 * 1024
    """Largest command body (or view parameters) in bytes; beyond it: `bad_request`."""
    queue_group: str = "kaya"


class EventsConfig(_Section):
    """The KAYA_EVENTS stream and the outbox relay that fills it."""

    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    max_age: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Seconds JetStream keeps an event; 0 keeps them (the store keeps them anyway)."""
    max_bytes: Annotated[int, msgspec.Meta(ge=-1)] = -1
    duplicate_window: Seconds = 300.0
    """Broker-side dedup by Nats-Msg-Id; must exceed relay_rewind."""
    relay_batch: Positive = 1000
    """Events read from the store and in flight to JetStream at once."""
    relay_rewind: Annotated[float, msgspec.Meta(ge=0)] = 150.0
    """On start and reconnect, republish events committed this many seconds before the
    checkpoint: JetStream acknowledges before it fsyncs (every 2 min by default), so a
    broker that lost power may have lost acknowledged events; dedup drops the rest."""
    ack_timeout: Seconds = 5.0
    dlq_max_age: Annotated[float, msgspec.Meta(ge=0)] = 30 * 24 * 3600.0


class ConsumersConfig(_Section):
    """Every consumer: durable, ordered, bounded, retried with backoff, dead-lettered."""

    disabled: list[str] = []
    """Consumers this node does not run (e.g. ["notifications"]): another node may."""
    fetch_batch: Positive = 256
    max_attempts: Positive = 5
    backoff_initial: Seconds = 0.1
    backoff_max: Seconds = 5.0
    ack_wait: Seconds = 10.0
    """Seconds before JetStream redelivers an unacknowledged event, e.g. one that was in
    flight to a node that stopped. Long retries extend it with in-progress acks."""


class ShardsConfig(_Section):
    count: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    """Fixed when a cluster is created (the servers' `partition()` mapping uses it): choose
    a few times the most nodes you expect, since a shard is the unit that moves."""


class ClusterConfig(_Section):
    """How nodes share the shards: leases in the KAYA_SHARDS bucket, writes fenced by the log."""

    durability: Literal["local", "replicated"] = "local"
    """`local`: one node; a command is answered after its SQLite commit, the relay copies
    events to JetStream. `replicated`: any number of nodes; a command is answered once
    KAYA_EVENTS (at events.replicas) holds its events, each checked there against the
    entity's last one, and every node's SQLite follows the stream."""
    lease_ttl: Annotated[float, msgspec.Meta(ge=1)] = 5.0
    """Seconds a shard's lease lasts without renewal: how soon a dead node's shards move."""
    renew_every: Seconds = 1.0
    """Seconds between renewals of every lease the node holds."""
    max_moves: Positive = 2
    """Shards a node hands over or takes at once while rebalancing (a joining node does
    not move every shard at the same moment)."""


class JwtConfig(_Section):
    """Who the caller is, per request: with it on, every command, query and view request
    carries `Authorization: Bearer <JWT>`, verified by the node (app/security/tokens.py).
    Independent of `security.enabled`, which says who may connect to NATS at all."""

    enabled: bool = False
    """Off: no token is asked for and no policy is checked."""
    issuer: str = ""
    """The `iss` every token must carry (required when enabled)."""
    audience: str = ""
    """A value the token's `aud` must hold (required when enabled)."""
    key_file: str = ""
    """The issuer's public key (EC P-256 or RSA) or its X.509 certificate, PEM; a relative
    path is under the security dir (`security.dir`). Exactly one of key_file, jwks_file."""
    jwks_file: str = ""
    """The issuer's keys as a JWKS file (JSON), picked by the token's `kid`; a relative path
    is under the security dir. Read once at start: restart the node when keys rotate."""
    algorithms: Annotated[list[Literal["ES256", "RS256"]], msgspec.Meta(min_length=1)] = (
        msgspec.field(default_factory=lambda: ["ES256", "RS256"])
    )
    """The signature algorithms accepted. Asymmetric only: `none` and HS* are never, since
    with HS* the public key itself would be a valid signing secret."""
    leeway: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """Seconds of clock difference tolerated on `exp` and `nbf`."""


class SecurityConfig(_Section):
    """Zero trust (see README "Security"): with it on, every NATS connection is TLS with a
    client certificate from the node's CA, and the certificate says the caller's role."""

    enabled: bool = False
    """`kaya run --secure` turns it on too."""
    dir: str = ""
    """Where the CA, certificates and NATS CLI contexts live; empty: <data_dir>/security."""
    jwt: JwtConfig = JwtConfig()
    """`[security.jwt]`: a verified caller per request, for the app's policy."""


class MetricsConfig(_Section):
    address: str = ""
    """HOST:PORT of the HTTP endpoint (/metrics, /healthz, /readyz); empty: none.
    config.toml sets 127.0.0.1:9464; port 0 picks a free port (tests)."""


class HttpConfig(_Section):
    """The HTTP gateway (app/http/): the wire contract over HTTP, `/openapi.json` and `/docs`."""

    address: str = ""
    """HOST:PORT the gateway listens on (`POST /v1/<entity>/<id>`, `GET /v1/<entity>/<id>`,
    `/events`, `/v1/views/<name>`, `/openapi.json`, `/docs`); empty: no gateway (the
    default; config.toml sets 127.0.0.1:8080). Port 0 picks a free port (tests). Requests
    go to the node over NATS like any client's, so JWTs, the policy and sealing apply."""
    request_timeout: Seconds = 10.0
    """Seconds the gateway waits for the node's reply; then `504` with code `timeout`."""


class SloConfig(_Section):
    """Service level objectives: the alerting rules and dashboard are generated from these."""

    command_p99_seconds: Seconds = 0.05
    """99% of commands answered within this, over 5 minutes."""
    success_ratio: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.999
    """Share of commands not answered `internal`, `unavailable` or `timeout`."""
    consumer_lag_max: Positive = 10_000
    """Events a consumer may trail the store by, for 5 minutes, before it pages."""
    relay_backlog_max: Positive = 10_000
    overload_ratio_max: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.01


class TracingConfig(_Section):
    otlp_endpoint: str = ""
    """OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318); empty: no spans at all."""
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.01
    """Share of new traces recorded; a caller's sampled traceparent is always followed."""


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class Config(_Section):
    """Every section. Built only whole and consistent: `cross_check` runs on every
    construction (decoding a file, applying flags, a test's own Config)."""

    node: NodeConfig = NodeConfig()
    nats: NatsConfig = NatsConfig()
    store: StoreConfig = StoreConfig()
    actors: ActorsConfig = ActorsConfig()
    ingress: IngressConfig = IngressConfig()
    events: EventsConfig = EventsConfig()
    consumers: ConsumersConfig = ConsumersConfig()
    shards: ShardsConfig = ShardsConfig()
    cluster: ClusterConfig = ClusterConfig()
    security: SecurityConfig = SecurityConfig()
    metrics: MetricsConfig = MetricsConfig()
    http: HttpConfig = HttpConfig()
    slo: SloConfig = SloConfig()
    tracing: TracingConfig = TracingConfig()
    log: LogConfig = LogConfig()

    def __post_init__(self) -> None:
        problem = cross_check(self)
        if problem is not None:
            raise ValueError(problem)  # msgspec reports it as a ValidationError

    @property
    def data_path(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def store_path(self) -> Path:
        return self.data_path / self.store.path

    @property
    def security_dir(self) -> Path:
        return Path(self.security.dir) if self.security.dir else self.data_path / "security"


def jwt_key_paths(config: Config) -> tuple[Path | None, Path | None]:
    """(key_file, jwks_file) of `[security.jwt]`, a relative one under the security dir;
    None for the one not set."""
    jwt = config.security.jwt
    return (
        config.security_dir / jwt.key_file if jwt.key_file else None,
        config.security_dir / jwt.jwks_file if jwt.jwks_file else None,
    )


_ANY_HOST = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def _host(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


def _overlap(a: str, b: str) -> bool:
    """Whether two listen addresses' hosts can clash (the same, or either one all hosts)."""
    return a in _ANY_HOST or b in _ANY_HOST or _host(a) == _host(b)


def metrics_address(address: str, key: str = "metrics.address") -> tuple[str, int] | None:
    """(host, port) of `metrics.address` (or of `key`, e.g. `http.address`, read the same
    way); None for ""; ValueError naming the key if malformed."""
    if not address:
        return None
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise ValueError(
            f"{key} {address!r} must be HOST:PORT (port 0-65535; 0 picks a free one),"
            " or empty for no HTTP endpoint"
        )
    return host or "127.0.0.1", int(port)  # the node serves an empty host on loopback


def cross_check(config: Config) -> str | None:
    """The first combination of settings that cannot work, named by both keys; None if none.

    Only what is really impossible: each of these fails at start-up anyway (JetStream or a
    socket refusing), or breaks a documented guarantee without a word.
    """
    events, consumers, nats = config.events, config.consumers, config.nats
    window = events.duplicate_window
    if window <= events.relay_rewind:
        return (
            f"events.duplicate_window ({window:g}) must exceed events.relay_rewind"
            f" ({events.relay_rewind:g}): the relay republishes that many seconds of events on"
            " every start, and the broker drops only the copies it sees within its window"
        )
    for key, max_age in (
        ("events.max_age", events.max_age),
        ("events.dlq_max_age", events.dlq_max_age),
    ):
        if max_age and window > max_age:
            return (
                f"events.duplicate_window ({window:g}) may not exceed {key} ({max_age:g}):"
                " JetStream refuses a stream whose dedup window outlives its messages"
            )
    if events.ack_timeout >= window:
        return (
            f"events.ack_timeout ({events.ack_timeout:g}) must be shorter than"
            f" events.duplicate_window ({window:g}): the relay publishes again what was not"
            " acknowledged in time, and the broker must still recognise the copies"
        )
    if consumers.backoff_initial > consumers.backoff_max:
        return (
            f"consumers.backoff_initial ({consumers.backoff_initial:g}) may not exceed"
            f" consumers.backoff_max ({consumers.backoff_max:g}): the first retry would wait"
            " longer than the longest wait"
        )
    if consumers.backoff_max >= consumers.ack_wait:
        return (
            f"consumers.backoff_max ({consumers.backoff_max:g}) must be shorter than"
            f" consumers.ack_wait ({consumers.ack_wait:g}): JetStream would redeliver an event"
            " while its consumer still waits to retry it"
        )
    cluster = config.cluster
    if cluster.renew_every * 2 > cluster.lease_ttl:
        return (
            f"cluster.renew_every ({cluster.renew_every:g}) must be at most half of"
            f" cluster.lease_ttl ({cluster.lease_ttl:g}): one late renewal would lose the lease"
        )
    jwt = config.security.jwt
    if jwt.enabled:
        for key, value, why in (
            ("issuer", jwt.issuer, "a token from any issuer trusting the same key"),
            ("audience", jwt.audience, "a token the issuer made for another service"),
        ):
            if not value:
                return (
                    f"security.jwt.{key} is required when security.jwt.enabled is true:"
                    f" without it {why} would be accepted"
                )
        if bool(jwt.key_file) == bool(jwt.jwks_file):
            return (
                "security.jwt.enabled needs exactly one of security.jwt.key_file and"
                f" security.jwt.jwks_file ({'both are' if jwt.key_file else 'neither is'} set)"
            )
    try:
        metrics = metrics_address(config.metrics.address)
        http = metrics_address(config.http.address, "http.address")
    except ValueError as exc:
        return str(exc)
    if (
        http is not None
        and metrics is not None
        and http[1]
        and http[1] == metrics[1]
        and _overlap(http[0], metrics[0])
    ):
        return (
            f"http.address ({config.http.address}) and metrics.address"
            f" ({config.metrics.address}) are the same address: the gateway and the metrics"
            " endpoint would both listen there"
        )
    if nats.url:  # an external server: nats.port and nats.monitor_port are not used
        return None
    ports = [("nats.port", nats.port)]
    if nats.monitor_port:
        ports.append(("nats.monitor_port", nats.monitor_port))
    if nats.port and nats.port == nats.monitor_port:
        return (
            f"nats.port and nats.monitor_port are both {nats.port}: the embedded server"
            " cannot listen on one port twice (monitor_port = 0 turns monitoring off)"
        )
    if metrics is not None and metrics[1]:
        for key, port in ports:
            if port == metrics[1] and _overlap(metrics[0], nats.host):
                return (
                    f"metrics.address ({config.metrics.address}) and {key} ({port}) are the"
                    " same address: the node's HTTP endpoint and its embedded server would"
                    " both listen there"
                )
    if http is not None and http[1]:
        for key, port in ports:
            if port == http[1] and _overlap(http[0], nats.host):
                return (
                    f"http.address ({config.http.address}) and {key} ({port}) are the same"
                    " address: the HTTP gateway and the embedded server would both listen there"
                )
    return None


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


def load_config(path: str | Path | None) -> Config:
    """Read a TOML file (or the defaults when `path` is None)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: bytes | str, *, source: str = "<config>") -> Config:
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(str(exc))}") from None


def _explain(message: str) -> str:
    """Turn msgspec's "... - at `$.store.x`" into "store.x: ..." (operators think in keys)."""
    where = ""
    if " - at `$." in message:
        message, where = message.split(" - at `$.", 1)
        where = where.rstrip("`")
    if message.startswith("Object contains unknown field `"):
        field = message.removeprefix("Object contains unknown field `").rstrip("`")
        return f"unknown key {where + '.' if where else ''}{field}"
    return f"{where}: {message}" if where else message


def with_overrides(
    config: Config,
    *,
    data_dir: str | None = None,
    nats_port: int | None = None,
    monitor_port: int | None = None,
    metrics_address: str | None = None,
    http_address: str | None = None,
    app: str | None = None,
    secure: bool | None = None,
    role: str | None = None,
    node_name: str | None = None,
) -> Config:
    """Apply command-line flags, which win over the file (None: not given)."""
    node, nats, metrics, security = config.node, config.nats, config.metrics, config.security
    http = config.http
    if secure:
        security = msgspec.structs.replace(security, enabled=True)
    if data_dir is not None:
        node = msgspec.structs.replace(node, data_dir=data_dir)
    if app is not None:
        node = msgspec.structs.replace(node, app=app)
    if node_name is not None:  # a StatefulSet's pod name: one config for every node
        node = msgspec.structs.replace(node, name=node_name)
    if role is not None:
        node = msgspec.structs.replace(node, role=role)  # checked by the convert below
    if nats_port is not None:
        nats = msgspec.structs.replace(nats, port=nats_port)
    if monitor_port is not None:
        nats = msgspec.structs.replace(nats, monitor_port=monitor_port)
    if metrics_address is not None:
        metrics = msgspec.structs.replace(metrics, address=metrics_address)
    if http_address is not None:
        http = msgspec.structs.replace(http, address=http_address)
    # the flags go through the same checks as the file: a bad port is one line, not a crash
    try:
        changed = msgspec.structs.replace(
            config, node=node, nats=nats, metrics=metrics, security=security, http=http
        )
        return msgspec.convert(msgspec.to_builtins(changed), Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"command line: {_explain(str(exc))}") from None
    except ValueError as exc:  # cross_check, raised by the replace
        raise ConfigError(f"command line: {exc}") from None
