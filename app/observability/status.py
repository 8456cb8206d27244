"""`kaya status`: a node's health snapshot as a compact terminal view.

A part that fails and retries (the relay, a consumer) says FAILING with for how long
and its last error, so an operator sees at a glance what `/readyz` lists as degraded.
Keys a node of an older version does not send are read with defaults.
"""

from __future__ import annotations

from typing import Any


def _rate(current: dict[str, Any], previous: dict[str, Any] | None, *path: str) -> float:
    if previous is None:
        return 0.0
    now, before = current, previous
    for key in path:
        now, before = now.get(key, {}), before.get(key, {})
    elapsed = current["time"] - previous["time"]
    if not isinstance(now, int | float) or not isinstance(before, int | float) or elapsed <= 0:
        return 0.0
    return max(0.0, (now - before) / elapsed)


def _health(part: dict[str, Any]) -> str:
    """`` (healthy or unknown), or `   FAILING 12s (3 errors): why`."""
    if part.get("healthy", True):
        return ""
    if part.get("stopped"):
        return f"   STOPPED: {part['stopped']}"
    return (
        f"   FAILING {part.get('failing_seconds', 0):.0f}s ({part.get('errors', 0)} errors):"
        f" {part.get('last_error', '')}"
    )


def _served(current: dict[str, Any]) -> str:
    cluster = current.get("cluster")
    if not cluster:
        return ""
    serving = cluster["serving"]
    return (
        f" ({cluster['durability']}; serving {len(serving)}: {','.join(map(str, serving))};"
        f" handed over {cluster['handovers']}, writes refused {cluster['writes_refused']})"
    )


def render_status(current: dict[str, Any], previous: dict[str, Any] | None, dlq: int | None) -> str:
    ready = "ready" if current["ready"] else "NOT READY: " + "; ".join(current["problems"])
    if not current.get("live", True):
        ready = "NOT LIVE: " + "; ".join(current.get("liveness", [])) + " / " + ready
    lines = [
        f"kaya node {current['node']} (pid {current['pid']}) on {current['nats']}: {ready}",
        f"uptime {current['uptime']:.0f}s  shards {current['shards']}{_served(current)}",
    ]
    broker = current.get("broker")
    if broker:
        down_for = broker["disconnected_seconds"]
        state = "connected" if broker["connected"] else f"DISCONNECTED for {down_for:.0f}s"
        server = ""
        if broker["embedded"]:
            down = broker["server_down_seconds"]
            state_of_server = f"DOWN {down:.0f}s" if down else "up"
            server = f"   embedded server {state_of_server}, restarts {broker['restarts']}"
        lines.append(f"nats      {state}{server}")
    lines += [
        "",
        f"commands  {_rate(current, previous, 'commands', 'total'):9.1f}/s"
        f"   total {current['commands']['total']}"
        f"   in flight {current['ingress']['inflight']}"
        f"   loop lag {current['ingress'].get('loop_lag_ms', 0.0):.1f} ms",
    ]
    outcomes = current["commands"]["by_outcome"]
    if outcomes:
        lines.append("          " + "  ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    for entity, latency in sorted(current["latency_seconds"].items()):
        lines.append(
            f"latency   {entity:<10} p50 <= {latency['p50'] * 1000:.1f} ms"
            f"   p99 <= {latency['p99'] * 1000:.1f} ms   ({latency['count']} requests)"
        )
    actors = current["actors"]
    lines += [
        f"actors    active {actors['active']}   busy {actors['busy']}"
        f"   mailboxes {actors['mailbox_depth']}   crashes {actors['crashes']}",
        f"store     position {current['store']['last_position']}"
        f"   {_rate(current, previous, 'store', 'events'):.1f} events/s"
        f"   queued {current['store']['queued_appends']}",
        f"relay     backlog {current['relay']['backlog']}"
        f"   {_rate(current, previous, 'relay', 'published'):.1f} published/s"
        f"{_health(current['relay'])}",
    ]
    for name, consumer in sorted(current["consumers"].items()):
        lines.append(
            f"consumer  {name:<14} lag {consumer['lag']:<7} retries {consumer['retries']}"
            f"   dead letters {consumer['dead_letters']}{_health(consumer)}"
        )
    lines.append(f"dlq       {'?' if dlq is None else dlq} messages in KAYA_DLQ")
    return "\n".join(lines)
