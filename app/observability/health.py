"""Health and status: what `/healthz`, `/readyz`, `kaya.health` and `kaya status` report.

Liveness says the process works (its event loop answers); readiness says it can
take commands right now (NATS connected, ingress serving, store writable).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from kaya.app.node import Node
    from kaya.app.observability.metrics import CommandMetrics

STARTED = time.time()


def readiness(node: Node) -> tuple[bool, list[str]]:
    problems = []
    if not node.nc.is_connected:
        problems.append("not connected to NATS")
    if not node.ingress.serving:
        problems.append("ingress not serving")
    if node.store.closing:
        problems.append("store closing")
    return not problems, problems


async def node_status(node: Node, commands: CommandMetrics) -> dict[str, Any]:
    """One snapshot of the node: counters are totals, so a reader derives rates from two."""
    ready, problems = readiness(node)
    runtime = node.runtime.statistics()
    store = node.store.statistics()
    last = await node.store.last_position()
    outcomes: dict[str, int] = {}
    for (_, _, outcome), n in commands.outcomes.items():
        outcomes[outcome] = outcomes.get(outcome, 0) + n
    latency = {
        entity: {"p50": h.quantile(0.5), "p99": h.quantile(0.99), "count": sum(h.counts)}
        for entity, h in commands.latency.items()
    }
    return {
        "ok": True,
        "node": node.config.node.name,
        "pid": os.getpid(),
        "time": time.time(),
        "uptime": time.time() - STARTED,
        "ready": ready,
        "problems": problems,
        "nats": node.url,
        "shards": node.config.shards.count,
        "commands": {"total": sum(outcomes.values()), "by_outcome": outcomes},
        "latency_seconds": latency,
        "actors": {
            "active": runtime.active,
            "busy": runtime.busy,
            "mailbox_depth": runtime.queued,
            "crashes": runtime.crashes,
        },
        "ingress": {
            "inflight": node.ingress.inflight,
            "loop_lag_ms": round(node.ingress.loop_lag * 1000, 1),
        },
        "store": {
            "last_position": last,
            "commits": store.batches,
            "events": store.events,
            "queued_appends": store.queued,
        },
        "relay": {
            "checkpoint": node.relay.checkpoint,
            "backlog": max(0, last - node.relay.checkpoint),
            "published": node.relay.published,
        },
        "consumers": {
            name: {
                "lag": max(0, last - runner.stats.checkpoint),
                "handled": runner.stats.handled,
                "retries": runner.stats.retries,
                "dead_letters": runner.stats.dead_lettered,
            }
            for name, runner in sorted(node.consumers.items())
        },
    }


def status_json(status: dict[str, Any]) -> bytes:
    return orjson.dumps(status, option=orjson.OPT_NON_STR_KEYS)
