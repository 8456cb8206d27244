"""Metrics: what the node counts, exposed in Prometheus format by prometheus_client.

The hot path only bumps plain integers (a dict entry per command, a bucket per
latency); the numbers become Prometheus metric families when someone scrapes,
in a custom collector that also reads the runtime's, store's, relay's and
consumers' own statistics. So metrics cost next to nothing when nobody looks,
and the exposition format is the library's, not ours.

Beside the node's own families the registry holds prometheus_client's standard
`process_*` and `python_*` collectors. The exposition passes `promtool check metrics`
(tests/test_promtool.py): one HELP and TYPE per family, entities and stages as labels.

Names follow Prometheus conventions: `kaya_` prefix, `_total` counters, `_seconds`
durations, labels from bounded sets (entity and command names come from the
registry, outcomes from the contract's error codes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kaya.app.events.failing import PartHealth
from kaya.app.observability.statistics import CommandStatistics, NodeStatistics
from kaya.store.timing import Histogram, LatencySnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class CommandMetrics:
    """Counted by the ingress as replies go out."""

    def __init__(self) -> None:
        self.outcomes: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.overloaded = 0

    def record(self, entity: str, command: str, outcome: str, seconds: float | None) -> None:
        """Count a reply by its outcome (`ok` or the error code). `seconds` None: refused
        before it was queued, so no latency worth measuring."""
        self.outcomes[(entity, command, outcome)] += 1
        if seconds is not None:
            self.latency[entity].observe(seconds)
        if outcome == "overloaded":
            self.overloaded += 1

    def statistics(self) -> CommandStatistics:
        return CommandStatistics(
            outcomes=dict(self.outcomes),
            latency={entity: h.snapshot() for entity, h in self.latency.items()},
            overloaded=self.overloaded,
        )

    def shed(self) -> None:
        """A command refused `overloaded` before it was looked at (the loop is behind)."""
        self.outcomes[("-", "-", "overloaded")] += 1
        self.overloaded += 1


def _histogram(name: str, doc: str, label: str, histograms: dict[str, LatencySnapshot]) -> Metric:
    """One family, one labelled series per key: a second HELP line is invalid exposition."""
    family = HistogramMetricFamily(name, doc, labels=[label])
    for key, h in sorted(histograms.items()):
        cumulative, buckets = 0, []
        for bound, n in zip((*h.bounds, float("inf")), h.counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric([key], buckets, h.total)
    return family


_HealthFamilies = tuple[GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily]


def _health(prefix: str, what: str, labels: list[str]) -> _HealthFamilies:
    """A part's `healthy` and `failing_seconds` gauges and its `errors` counter."""
    return (
        GaugeMetricFamily(
            f"{prefix}_healthy", f"1 while the {what} works, 0 while it fails and retries",
            labels=labels,
        ),
        GaugeMetricFamily(
            f"{prefix}_failing_seconds", f"How long the {what} has been failing (0: healthy)",
            labels=labels,
        ),
        CounterMetricFamily(
            f"{prefix}_errors", f"Failures of the {what}, each retried with backoff",
            labels=labels,
        ),
    )  # fmt: skip


def _add_health(families: _HealthFamilies, labels: list[str], health: PartHealth, ok: bool) -> None:
    healthy, failing, errors = families
    healthy.add_metric(labels, 1 if ok else 0)
    failing.add_metric(labels, health.failing_for())
    errors.add_metric(labels, health.errors)


class NodeCollector(Collector):
    """Turns the node's latest statistics snapshot into metric families at scrape time."""

    def __init__(self) -> None:
        self.latest: NodeStatistics | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.latest
        if stats is None:
            return
        yield GaugeMetricFamily(
            "kaya_node_live", "1 while the node can serve (/healthz 200)", value=int(stats.live)
        )
        yield GaugeMetricFamily(
            "kaya_node_ready", "1 while the node takes commands (/readyz 200)",
            value=int(stats.ready),
        )  # fmt: skip
        broker = stats.broker
        yield GaugeMetricFamily(
            "kaya_nats_connected", "1 while the node is connected to NATS",
            value=int(broker.connected),
        )  # fmt: skip
        yield CounterMetricFamily(
            "kaya_nats_server_restarts", "Times the node restarted its embedded nats-server",
            value=broker.server_restarts,
        )  # fmt: skip
        commands = stats.commands
        outcomes = CounterMetricFamily(
            "kaya_commands", "Commands answered, by entity, command and outcome",
            labels=["entity", "command", "outcome"],
        )  # fmt: skip
        for (entity, command, outcome), n in sorted(commands.outcomes.items()):
            outcomes.add_metric([entity, command, outcome], n)
        yield outcomes
        yield _histogram(
            "kaya_command_duration_seconds",
            "From request received to reply sent (end to end inside the node)",
            "entity",
            commands.latency,
        )
        yield _histogram(
            "kaya_command_stage_seconds",
            "Time a command spends in each stage of the path (store/timing.py: ingress,"
            " mailbox, decide, seal, queue, insert, fsync, wake, reply)",
            "stage",
            stats.stages,
        )
        yield CounterMetricFamily(
            "kaya_ingress_overloaded", "Requests refused with `overloaded`",
            value=commands.overloaded,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "kaya_ingress_inflight", "Requests accepted, not yet answered", value=stats.inflight
        )
        yield GaugeMetricFamily(
            "kaya_event_loop_lag_seconds",
            "How late the node's event loop runs timers (smoothed); commands are refused "
            "above ingress.max_loop_lag",
            value=stats.loop_lag,
        )
        runtime = stats.runtime
        cluster = stats.cluster
        yield GaugeMetricFamily(
            "kaya_shards_served", "Shards this node serves now", value=len(cluster.serving)
        )
        yield CounterMetricFamily(
            "kaya_shard_handovers", "Shards this node handed over", value=cluster.handovers
        )
        yield CounterMetricFamily(
            "kaya_log_writes_refused",
            "Writes the shared log refused (another node wrote the entity: a lost lease)",
            value=cluster.refused,
        )
        yield CounterMetricFamily(
            "kaya_log_writes_unsure",
            "Writes to the shared log with no answer in time (each let its shard go)",
            value=cluster.unsure,
        )
        yield GaugeMetricFamily("kaya_actors_active", "Actors in memory", value=runtime.active)
        yield GaugeMetricFamily(
            "kaya_actors_busy", "Actors with a turn running", value=runtime.busy
        )
        yield GaugeMetricFamily(
            "kaya_mailbox_depth", "Messages waiting in mailboxes", value=runtime.queued
        )
        yield CounterMetricFamily(
            "kaya_actor_activations", "Actors rebuilt from the store", value=runtime.activations
        )
        yield CounterMetricFamily(
            "kaya_actor_passivations", "Idle actors dropped", value=runtime.passivations
        )
        yield CounterMetricFamily(
            "kaya_handler_crashes", "Handlers that raised (answered `internal`)",
            value=runtime.crashes,
        )  # fmt: skip
        store = stats.store
        yield CounterMetricFamily("kaya_store_appends", "Appends committed", value=store.appends)
        yield CounterMetricFamily("kaya_store_events", "Events committed", value=store.events)
        yield CounterMetricFamily(
            "kaya_store_commits", "Group-commit transactions", value=store.batches
        )
        yield GaugeMetricFamily(
            "kaya_store_queued_appends", "Appends waiting for the writer", value=store.queued
        )
        last, relay = stats.last_position, stats.relay
        yield CounterMetricFamily(
            "kaya_relay_published", "Events acknowledged by JetStream", value=relay.published
        )
        yield CounterMetricFamily(
            "kaya_relay_duplicates", "Republished events JetStream already had",
            value=relay.duplicates,
        )  # fmt: skip
        yield CounterMetricFamily(
            "kaya_relay_failures", "Relay batches not fully acknowledged", value=relay.failures
        )
        yield GaugeMetricFamily(
            "kaya_relay_backlog", "Committed events not yet acknowledged by JetStream",
            value=max(0, last - relay.checkpoint),
        )  # fmt: skip
        relay_health = _health("kaya_relay", "relay", [])
        _add_health(relay_health, [], relay.health, relay.health.healthy)
        yield from relay_health
        lag = GaugeMetricFamily(
            "kaya_consumer_lag", "Committed events a consumer has not applied yet",
            labels=["consumer"],
        )  # fmt: skip
        handled = CounterMetricFamily(
            "kaya_consumer_handled", "Events handled", labels=["consumer"]
        )
        retries = CounterMetricFamily(
            "kaya_consumer_retries", "Handler retries", labels=["consumer"]
        )
        dead = CounterMetricFamily(
            "kaya_consumer_dead_letters", "Events sent to KAYA_DLQ", labels=["consumer"]
        )
        untrusted = CounterMetricFamily(
            "kaya_consumer_untrusted",
            "Messages whose position or envelope the store did not back (dead-lettered)",
            labels=["consumer"],
        )
        consumer_health = _health("kaya_consumer", "consumer", ["consumer"])
        for name, consumer in sorted(stats.consumers.items()):
            lag.add_metric([name], max(0, last - consumer.checkpoint))
            handled.add_metric([name], consumer.handled)
            retries.add_metric([name], consumer.retries)
            dead.add_metric([name], consumer.dead_lettered)
            untrusted.add_metric([name], consumer.untrusted)
            _add_health(consumer_health, [name], consumer.health, consumer.healthy)
        yield from (lag, handled, retries, dead, untrusted, *consumer_health)


class Metrics:
    """The node's metrics registry; `render()` is the `/metrics` body."""

    def __init__(self, statistics: Callable[[], Awaitable[NodeStatistics]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = NodeCollector()
        self.registry.register(self.collector)
        # process_* (CPU, memory, file descriptors, start time) and python_* (GC, version):
        # the library's standard collectors, read from /proc at scrape time like ours
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)
        self._statistics = statistics

    async def render(self) -> bytes:
        # the snapshot needs the database (the last position): taken before the sync collect
        self.collector.latest = await self._statistics()
        return generate_latest(self.registry)
