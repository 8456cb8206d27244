"""NodeStatistics: one frozen snapshot of a node, what health, status and metrics read.

The node builds it on demand from each part's own `statistics()`; the readers format it
and never reach into the node's parts, so observability depends on data, not on the
node (and the node, which serves these endpoints, imports observability, not back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kaya.actors import RuntimeStatistics
from kaya.app.events.relay import RelayStatistics
from kaya.app.events.runner import ConsumerStatistics
from kaya.store import StoreStatistics
from kaya.store.timing import LatencySnapshot


@dataclass(frozen=True)
class CommandStatistics:
    """Replies counted by the ingress: by (entity, command, outcome), latency per entity."""

    outcomes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    latency: dict[str, LatencySnapshot] = field(default_factory=dict)
    overloaded: int = 0


@dataclass(frozen=True)
class BrokerStatistics:
    """The node's NATS connection and, when it runs one, its embedded nats-server."""

    connected: bool = True
    disconnected_for: float = 0.0
    """Seconds the connection has been down; 0 while connected."""
    embedded: bool = False
    server_pid: int | None = None
    server_down_for: float = 0.0
    """Seconds since the embedded server died; 0 while it runs (or when there is none)."""
    server_restarts: int = 0


@dataclass(frozen=True)
class ClusterStatistics:
    """This node's part of the shards (leases) and its writes to the shared log."""

    durability: str = "local"
    serving: tuple[int, ...] = ()
    handovers: int = 0
    refused: int = 0
    """Writes the log refused: another node had written the entity (a lost lease)."""
    unsure: int = 0
    """Writes whose outcome was unknown (no ack in time): each let its shard go."""


@dataclass(frozen=True)
class NodeStatistics:
    name: str
    url: str
    shards: int
    ready: bool
    problems: tuple[str, ...]
    """Why the node cannot take commands now (readiness); empty when ready."""
    inflight: int
    loop_lag: float
    commands: CommandStatistics
    runtime: RuntimeStatistics
    store: StoreStatistics
    relay: RelayStatistics
    consumers: dict[str, ConsumerStatistics]
    live: bool = True
    liveness: tuple[str, ...] = ()
    """Why the node cannot serve and will not recover on its own (liveness); empty when live."""
    broker: BrokerStatistics = field(default_factory=BrokerStatistics)
    cluster: ClusterStatistics = field(default_factory=lambda: ClusterStatistics())
    stages: dict[str, LatencySnapshot] = field(default_factory=dict)
    """Where commands spend their time, per stage (store/timing.py)."""

    @property
    def last_position(self) -> int:
        """The last event committed to the store."""
        return self.relay.committed
