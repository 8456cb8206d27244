"""Health and status: what `/healthz`, `/readyz`, `kaya.health` and `kaya status` report.

Three questions, three answers, for whoever runs the node:

- liveness (`/healthz`): can this process still serve, or should it be restarted?
  503 while the embedded nats-server is down (the node is restarting it, or will
  exit), or while NATS has been unreachable for longer than the node's grace
  period; a restart is what an orchestrator does about it.
- readiness (`/readyz`): should commands be routed here now? 503 while NATS is
  disconnected, the ingress is not serving, the store is closing or cannot write.
- degraded parts: the relay or a consumer failing (and retrying) while commands
  are still served. They make neither probe fail (restarting or unrouting the node
  would not fix a full disk or a broken handler, and commands still work), but
  `/readyz`'s body, `kaya.health`, `kaya status` and the metrics name them.

All of it reads a `NodeStatistics` snapshot, never the node itself.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from kaya.app.events.failing import PartHealth
from kaya.app.observability.statistics import NodeStatistics

STARTED = time.time()


def _failing(what: str, health: PartHealth, now: float) -> str:
    return (
        f"{what} failing for {health.failing_for(now):.0f}s"
        f" ({health.errors} errors): {health.last_error}"
    )


def degraded(stats: NodeStatistics, now: float | None = None) -> list[str]:
    """The parts that fail (and retry) while commands are still served; empty when none."""
    now = time.time() if now is None else now
    found = []
    if not stats.relay.health.healthy:
        found.append(_failing("relay", stats.relay.health, now))
    for name, consumer in sorted(stats.consumers.items()):
        if consumer.stopped:
            found.append(f"consumer {name} stopped: {consumer.stopped}")
        elif not consumer.health.healthy:
            found.append(_failing(f"consumer {name}", consumer.health, now))
    return found


def healthz(stats: NodeStatistics) -> tuple[int, str, bytes]:
    """Liveness: 200 `ok`, or 503 with why the node cannot serve (restart it)."""
    if stats.live:
        return 200, "text/plain", b"ok\n"
    return 503, "text/plain", ("; ".join(stats.liveness) + "\n").encode()


def readyz(stats: NodeStatistics) -> tuple[int, str, bytes]:
    """Readiness: 200 `ready` or 503 with the reasons, then one line per degraded part."""
    lines = ["ready"] if stats.ready else ["; ".join(stats.problems)]
    lines += [f"degraded: {part}" for part in degraded(stats)]
    return (200 if stats.ready else 503), "text/plain", ("\n".join(lines) + "\n").encode()


def _part(health: PartHealth, now: float) -> dict[str, Any]:
    return {
        "healthy": health.healthy,
        "failing_seconds": round(health.failing_for(now), 1),
        "errors": health.errors,
        "last_error": health.last_error,
    }


def node_status(stats: NodeStatistics) -> dict[str, Any]:
    """One snapshot of the node: counters are totals, so a reader derives rates from two."""
    now = time.time()
    outcomes: dict[str, int] = {}
    for (_, _, outcome), n in stats.commands.outcomes.items():
        outcomes[outcome] = outcomes.get(outcome, 0) + n
    latency = {
        entity: {"p50": h.quantile(0.5), "p99": h.quantile(0.99), "count": h.count}
        for entity, h in stats.commands.latency.items()
    }
    runtime, store, last, broker = stats.runtime, stats.store, stats.last_position, stats.broker
    return {
        "ok": True,
        "node": stats.name,
        "pid": os.getpid(),
        "time": now,
        "uptime": now - STARTED,
        "live": stats.live,
        "liveness": list(stats.liveness),
        "ready": stats.ready,
        "problems": list(stats.problems),
        "degraded": degraded(stats, now),
        "nats": stats.url,
        "broker": {
            "connected": broker.connected,
            "disconnected_seconds": round(broker.disconnected_for, 1),
            "embedded": broker.embedded,
            "server_pid": broker.server_pid,
            "server_down_seconds": round(broker.server_down_for, 1),
            "restarts": broker.server_restarts,
        },
        "shards": stats.shards,
        "cluster": {
            "durability": stats.cluster.durability,
            "serving": list(stats.cluster.serving),
            "handovers": stats.cluster.handovers,
            "writes_refused": stats.cluster.refused,
            "writes_unsure": stats.cluster.unsure,
        },
        "commands": {"total": sum(outcomes.values()), "by_outcome": outcomes},
        "latency_seconds": latency,
        "actors": {
            "active": runtime.active,
            "busy": runtime.busy,
            "mailbox_depth": runtime.queued,
            "crashes": runtime.crashes,
        },
        "ingress": {"inflight": stats.inflight, "loop_lag_ms": round(stats.loop_lag * 1000, 1)},
        "store": {
            "last_position": last,
            "commits": store.batches,
            "events": store.events,
            "queued_appends": store.queued,
        },
        "relay": {
            "checkpoint": stats.relay.checkpoint,
            "backlog": max(0, last - stats.relay.checkpoint),
            "published": stats.relay.published,
            "failures": stats.relay.failures,
            **_part(stats.relay.health, now),
        },
        "consumers": {
            name: {
                "lag": max(0, last - consumer.checkpoint),
                "handled": consumer.handled,
                "retries": consumer.retries,
                "dead_letters": consumer.dead_lettered,
                "untrusted": consumer.untrusted,
                "stopped": consumer.stopped,
                **_part(consumer.health, now),
                "healthy": consumer.healthy,
            }
            for name, consumer in sorted(stats.consumers.items())
        },
    }


def status_json(status: dict[str, Any]) -> bytes:
    return orjson.dumps(status, option=orjson.OPT_NON_STR_KEYS)
