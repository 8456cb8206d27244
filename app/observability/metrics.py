"""Metrics: what the node counts, exposed in Prometheus format by prometheus_client.

The hot path only bumps plain integers (a dict entry per command, a bucket per
latency); the numbers become Prometheus metric families when someone scrapes,
in a custom collector that also reads the runtime's, store's, relay's and
consumers' own statistics. So metrics cost next to nothing when nobody looks,
and the exposition format is the library's, not ours.

Names follow Prometheus conventions: `kaya_` prefix, `_total` counters, `_seconds`
durations, labels from bounded sets (entity and command names come from the
registry, outcomes from the contract's error codes).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kaya.app.node import Node

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Bucket counts and a sum: an observation is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile q (what Prometheus would estimate)."""
        count = sum(self.counts)
        if count == 0:
            return 0.0
        rank, seen = q * count, 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")

    def family(self, name: str, doc: str, labels: dict[str, str] | None = None) -> Metric:
        keys = list(labels or {})
        family = HistogramMetricFamily(name, doc, labels=keys)
        cumulative, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(list((labels or {}).values()), buckets, self.total)
        return family


class CommandMetrics:
    """Counted by the ingress as replies go out."""

    def __init__(self) -> None:
        self.outcomes: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.overloaded = 0

    def record(self, entity: str, command: str, reply: bytes, seconds: float | None) -> str:
        """Count the reply; return its outcome. `seconds` None: refused before it was queued,
        so no latency worth measuring."""
        outcome = reply_outcome(reply)
        self.outcomes[(entity, command, outcome)] += 1
        if seconds is not None:
            self.latency[entity].observe(seconds)
        if outcome == "overloaded":
            self.overloaded += 1
        return outcome

    def shed(self) -> None:
        """A command refused `overloaded` before it was looked at (the loop is behind)."""
        self.outcomes[("-", "-", "overloaded")] += 1
        self.overloaded += 1


def reply_outcome(reply: bytes) -> str:
    """`ok` or the error code, read off the reply's fixed prefix without decoding it."""
    if reply.startswith(b'{"ok":true'):
        return "ok"
    start = reply.find(b'"code":"')
    if start < 0:
        return "internal"
    start += 8
    return reply[start : reply.find(b'"', start)].decode(errors="replace")


class NodeCollector(Collector):
    """Turns the node's statistics into metric families at scrape time."""

    def __init__(self, node: Node, commands: CommandMetrics) -> None:
        self._node = node
        self._commands = commands
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        node, commands = self._node, self._commands
        outcomes = CounterMetricFamily(
            "kaya_commands", "Commands answered, by entity, command and outcome",
            labels=["entity", "command", "outcome"],
        )  # fmt: skip
        for (entity, command, outcome), n in sorted(commands.outcomes.items()):
            outcomes.add_metric([entity, command, outcome], n)
        yield outcomes
        for entity, histogram in sorted(commands.latency.items()):
            yield histogram.family(
                "kaya_command_duration_seconds",
                "From request received to reply sent (end to end inside the node)",
                {"entity": entity},
            )
        yield CounterMetricFamily(
            "kaya_ingress_overloaded", "Requests refused with `overloaded`",
            value=commands.overloaded,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "kaya_ingress_inflight", "Requests accepted, not yet answered",
            value=node.ingress.inflight,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "kaya_event_loop_lag_seconds",
            "How late the node's event loop runs timers (smoothed); commands are refused "
            "above ingress.max_loop_lag",
            value=node.ingress.loop_lag,
        )
        runtime = node.runtime.statistics()
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
        store = node.store.statistics()
        yield CounterMetricFamily("kaya_store_appends", "Appends committed", value=store.appends)
        yield CounterMetricFamily("kaya_store_events", "Events committed", value=store.events)
        yield CounterMetricFamily(
            "kaya_store_commits", "Group-commit transactions", value=store.batches
        )
        yield GaugeMetricFamily(
            "kaya_store_queued_appends", "Appends waiting for the writer", value=store.queued
        )
        last = self.snapshot.get("last_position", 0)
        relay = node.relay
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
        for name, runner in sorted(node.consumers.items()):
            lag.add_metric([name], max(0, last - runner.stats.checkpoint))
            handled.add_metric([name], runner.stats.handled)
            retries.add_metric([name], runner.stats.retries)
            dead.add_metric([name], runner.stats.dead_lettered)
        yield from (lag, handled, retries, dead)


class Metrics:
    """The node's metrics registry; `render()` is the `/metrics` body."""

    def __init__(self, node: Node, commands: CommandMetrics) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = NodeCollector(node, commands)
        self.registry.register(self.collector)
        self._node = node

    async def render(self) -> bytes:
        # the one figure that needs the database, read before the synchronous collect
        self.collector.snapshot = {"last_position": await self._node.store.last_position()}
        return generate_latest(self.registry)
