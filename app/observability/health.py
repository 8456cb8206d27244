"""Health and status: what `/healthz`, `/readyz`, `kaya.health` and `kaya status` report.

Liveness says the process works (its event loop answers); readiness says it can
take commands right now (NATS connected, ingress serving, store writable). Both
read a `NodeStatistics` snapshot, never the node itself.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from kaya.app.observability.statistics import NodeStatistics

STARTED = time.time()


def node_status(stats: NodeStatistics) -> dict[str, Any]:
    """One snapshot of the node: counters are totals, so a reader derives rates from two."""
    outcomes: dict[str, int] = {}
    for (_, _, outcome), n in stats.commands.outcomes.items():
        outcomes[outcome] = outcomes.get(outcome, 0) + n
    latency = {
        entity: {"p50": h.quantile(0.5), "p99": h.quantile(0.99), "count": h.count}
        for entity, h in stats.commands.latency.items()
    }
    runtime, store, last = stats.runtime, stats.store, stats.last_position
    return {
        "ok": True,
        "node": stats.name,
        "pid": os.getpid(),
        "time": time.time(),
        "uptime": time.time() - STARTED,
        "ready": stats.ready,
        "problems": list(stats.problems),
        "nats": stats.url,
        "shards": stats.shards,
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
        },
        "consumers": {
            name: {
                "lag": max(0, last - consumer.checkpoint),
                "handled": consumer.handled,
                "retries": consumer.retries,
                "dead_letters": consumer.dead_lettered,
            }
            for name, consumer in sorted(stats.consumers.items())
        },
    }


def status_json(status: dict[str, Any]) -> bytes:
    return orjson.dumps(status, option=orjson.OPT_NON_STR_KEYS)
