"""A Kaya cluster on one machine: throughput vs nodes, failover after kill -9, shard handoff.

    python -m bench.cluster [--quick] [--only throughput,handoff,failover] [--no-write]

Everything runs on 127.0.0.1, as `kaya dev-cluster` starts it (3 nats-servers in one
JetStream cluster, N `kaya run` nodes with `durability = "replicated"`, each its own
process), and every process is stopped by its PID.

1. **throughput**: deposits over `--accounts` accounts (opened first, not timed), K in
   flight, closed loop: bench.e2e's own generator, in its own process, given every
   server's URL. For `local` (one `kaya run` with its embedded server, local durability:
   bench.targets' node) and for dev-clusters of 1, 2 and 3 nodes on 3 servers, each once
   its 16 shards are served and balanced. Figures: req/s, p50/p99, and CPU per command:
   the CPU time (/proc/<pid>/stat utime+stime) of the node processes, and apart of the
   nats-servers, over the measured window ÷ the commands answered in it. Then every
   account is read back and checked against the acknowledged deposits (bench.e2e).
2. **handoff** (on the 3-node cluster, before its load): K events written to accounts of
   one shard (ids picked with `shard_of`), then `kaya shards move N --to NODE`, timed by
   the CLI's wall time and, from a watcher on KAYA_SHARDS, from the move request to the
   target's lease (the old owner drained and released) and to `serving` (caught up).
   The shard is taken from the node holding 6 of the 16 and given to one holding 5, so
   the cluster stays balanced and nothing moves it back.
3. **failover** (on the 3-node cluster, after its load): deposits at a constant rate
   (open loop, all accounts, so all shards), then SIGKILL of the node holding the most
   shards, by its PID. Measured: kill → each of its shards leased by another node and
   then `serving` (from the KAYA_SHARDS watcher), and the client-visible gap: the
   longest time without a successful reply for accounts on those shards. Afterwards
   every account is read: each balance must have grown by the deposits acknowledged to
   it (plus at most the requests whose outcome is unknown), so no acknowledged deposit
   is lost.

The node logs (warnings and errors) and the servers' [ERR]/[WRN] lines are counted and
quoted in the JSON. The exit status is 1 if a correctness check fails (a lost or
unexplained deposit), not because of a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import e2e
from bench import framework as fw
from bench.charts import bar_chart
from bench.common import (
    LOOPBACK,
    BenchError,
    Child,
    cpu_seconds,
    ensure_gone,
    machine_busy_seconds,
    percentile,
    utc_now,
)
from bench.targets import Proc, dev_cluster_argv, ready_children, running

SHARDS = 16
SERVERS = 3
FAILOVER_NODES = 3
SCENARIOS = ("throughput", "handoff", "failover")
CLUSTER_READY_TIMEOUT = 120.0
SETTLE_TIMEOUT = 60.0
"""All 16 shards served and balanced: a few lease rounds (1 s each) after `cluster ready`."""
MOVE_TIMEOUT = 90.0
FAILOVER_DEADLINE = 60.0
"""Kill -> every shard served again; past it the failover is reported as not done."""
LOCAL_NODE_CONFIG = '\n[metrics]\naddress = ""\n'
"""bench.targets' node already has a free port, `monitor_port = 0` and a temp data dir."""
"""Base ports for dev-cluster, below Linux's ephemeral range so no outgoing socket holds one."""
MAX_REQUESTS = 1_000_000
"""Hard cap on the failover load's requests, beside its deadline."""


# ---- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    accounts: int
    inflight: int
    warmup: float
    duration: float
    timeout: float
    nodes: tuple[int, ...]
    local: bool
    handoff_events: tuple[int, ...]
    failover_rate: float
    failover_before: float
    """Seconds of load before the kill."""
    failover_after: float
    """Seconds of load after every shard is served again."""
    idle: float
    """Seconds of no load before each throughput run, for the idle CPU."""
    scenarios: tuple[str, ...]
    keep_data: bool


# ---- dev-cluster --------------------------------------------------------------------------


@dataclass
class DevCluster:
    """A running `kaya dev-cluster`: its servers and nodes as it printed them."""

    child: Child
    data_dir: Path
    base_port: int
    servers: dict[str, Proc]
    nodes: dict[str, Proc]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers.values()]

    def jetstream(self) -> dict[str, Any]:
        """Streams and their consumers as the first server's /jsz shows them (the meta
        layer's view): consumers that pile up cost every server a Raft entry each."""
        from kaya.app.cli.cluster import MONITOR_OFFSET

        url = f"http://{LOOPBACK}:{self.base_port + MONITOR_OFFSET}/jsz?streams=true&consumers=true"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                jsz = json.load(response)
        except (OSError, ValueError) as exc:
            return {"error": repr(exc)}
        streams = {
            s["name"]: len(s.get("consumer_detail") or [])
            for a in jsz.get("account_details", [])
            for s in a.get("stream_detail", [])
        }
        api = jsz.get("api", {})
        return {
            "consumers": jsz.get("consumers"),
            "by_stream": streams,
            "api_calls": api.get("total"),
        }

    def pids(self) -> dict[str, dict[str, int]]:
        return {
            "nodes": {n.name: n.pid for n in self.nodes.values()},
            "servers": {s.name: s.pid for s in self.servers.values()},
        }


@contextlib.contextmanager
def dev_cluster(
    workdir: Path, nodes: int, info: dict[str, Any], servers: int = SERVERS
) -> Iterator[DevCluster]:
    """`kaya dev-cluster` until `cluster ready`; SIGTERM and every child checked gone after.

    `info` gets the start-up and stop times, what was left behind and the logs' warnings,
    also when the start fails."""
    data_dir = workdir / f"dev-cluster-{nodes}"
    argv = dev_cluster_argv(data_dir, servers=servers, nodes=nodes)
    base_port = int(argv[argv.index("--base-port") + 1])
    t0 = time.monotonic()
    child = Child("dev-cluster", argv, workdir / f"dev-cluster-{nodes}.log")
    cluster = DevCluster(child, data_dir, base_port, {}, {}, info)
    try:
        child.wait_for_line("cluster ready", timeout=CLUSTER_READY_TIMEOUT)
        cluster.info["startup_s"] = round(time.monotonic() - t0, 2)
        cluster.servers, cluster.nodes = ready_children(child.lines)
        yield cluster
    finally:
        t1 = time.monotonic()
        cluster.info["exit_code"] = child.stop(timeout=60)
        cluster.info["stop_s"] = round(time.monotonic() - t1, 2)
        everyone = [*cluster.nodes.values(), *cluster.servers.values()]
        cluster.info["left_behind"] = [p.name for p in everyone if ensure_gone(p.pid)]
        cluster.info["children_exited"] = [x for x in child.lines if " exited with code " in x]
        logs = scan_logs(data_dir)
        cluster.info["meta_consumers_at_stop"] = logs.pop("meta_consumers_at_stop", None)
        cluster.info["logs"] = logs


STARTUP_NOISE = (
    "Error trying to connect to route",
    "Waiting for routing to be established",
    "JetStream has not established contact with a meta leader",
)
"""Server lines of servers starting together (each dials routes to the others): expected."""
STOP_NOISE = ("Metalayer blocking snapshot", "Error flushing", "store is closed")
"""Server lines of a cluster stopping (the nodes first, then the servers): expected."""
META_CONSUMERS = re.compile(r"Metalayer blocking snapshot took .*consumers: (\d+)")


def scan_logs(data_dir: Path, keep: int = 4) -> dict[str, Any]:
    """Warnings and errors in each node's JSON log and each server's log: findings."""
    out: dict[str, Any] = {}
    for log in sorted(data_dir.glob("*/*.log")):
        levels: Counter[str] = Counter()
        first: list[str] = []
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        meta_consumers = None
        for line in lines:
            if m := META_CONSUMERS.search(line):
                meta_consumers = max(meta_consumers or 0, int(m[1]))
            if any(noise in line for noise in STARTUP_NOISE):
                levels["startup_noise"] += 1
                continue
            if any(noise in line for noise in STOP_NOISE):
                levels["stop_noise"] += 1
                continue
            level = ""
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    level = str(json.loads(line).get("level", ""))
                if level not in ("warning", "error", "critical"):
                    level = "traceback" if "Traceback" in line else ""
            elif "[ERR]" in line or "[WRN]" in line or "[FTL]" in line:
                level = line.split("[", 2)[-1][:3]
            elif "Traceback" in line or line.startswith("error"):
                level = "error"
            if level:
                levels[level] += 1
                if len(first) < keep:
                    first.append(line[:400])
        if meta_consumers is not None:  # the meta layer's count when the servers stopped
            out.setdefault("meta_consumers_at_stop", meta_consumers)
        if set(levels) - {"startup_noise", "stop_noise"}:
            out[log.parent.name] = {"lines": len(lines), "levels": dict(levels), "first": first}
    return out


async def _connect(urls: Sequence[str], name: str) -> Any:
    import nats

    return await nats.connect(list(urls), name=name, connect_timeout=3, max_reconnect_attempts=20)


async def _bucket(nc: Any) -> Any:
    from kaya.app.cluster.leases import BUCKET

    return await nc.jetstream().key_value(BUCKET)


def owners_by_node(table: Any) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for shard, (node, _, _) in sorted(table.owners.items()):
        out.setdefault(node, []).append(shard)
    return out


async def wait_settled(urls: Sequence[str], nodes: set[str], timeout: float) -> dict[str, Any]:
    """Until all 16 shards are `serving`, none is moving, and the live nodes share them
    evenly (16 over 3: 6, 5, 5): a measurement during rebalancing would measure it."""
    from kaya.app.cluster.leases import read_table

    t0 = time.monotonic()
    floor, ceiling = SHARDS // len(nodes), -(-SHARDS // len(nodes))
    last = "no table read"
    nc = await _connect(urls, "bench-cluster-settle")
    try:
        while time.monotonic() - t0 < timeout:
            try:
                table = await read_table(await _bucket(nc))
            except Exception as exc:  # the bucket may not exist a moment after start-up
                last = repr(exc)
                await asyncio.sleep(0.2)
                continue
            by_node = owners_by_node(table)
            states = Counter(state for _, _, state in table.owners.values())
            counts = [len(by_node.get(n, [])) for n in nodes]
            if (
                len(table.owners) == SHARDS
                and states.get("serving", 0) == SHARDS
                and not table.moves
                and set(by_node) <= nodes
                and all(floor <= c <= ceiling for c in counts)
            ):
                return {"seconds": round(time.monotonic() - t0, 2), "owners": by_node}
            last = f"states {dict(states)}, moves {table.moves}, owners {by_node}"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    raise BenchError(f"shards not settled after {timeout:g}s: {last}")


async def wait_answering(urls: Sequence[str], timeout: float) -> dict[str, Any]:
    """Until a query on every shard, sent through every server, gets an answer.

    The bucket saying `serving` is not enough for a client: the subscription must also
    have reached the server the client is connected to. What did not answer on the way
    (no responders, a timeout) is counted: after `serving` it should be nothing.
    """
    import nats
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from kaya.actors.wire import shard_of

    probes: dict[int, str] = {}
    i = 0
    while len(probes) < SHARDS:
        account = e2e.account_id(i)
        probes.setdefault(shard_of(SHARDS, "account", account), account)
        i += 1
    t0 = time.monotonic()
    misses: Counter[str] = Counter()
    for url in urls:
        nc = await nats.connect(url, name="bench-cluster-probe", allow_reconnect=False)
        try:
            todo = dict(probes)
            while todo and time.monotonic() - t0 < timeout:
                for shard, account in list(todo.items()):
                    try:
                        msg = await nc.request(f"kaya.qry.account.{account}", b"", timeout=2)
                    except NoRespondersError:
                        misses[f"{url} no_responders"] += 1
                        continue
                    except NatsTimeout:
                        misses[f"{url} timeout"] += 1
                        continue
                    if e2e.reply_code(msg.data) == "ok":
                        del todo[shard]
                    else:
                        misses[f"{url} {e2e.reply_code(msg.data)}"] += 1
                if todo:
                    await asyncio.sleep(0.05)
            if todo:
                raise BenchError(f"shards {sorted(todo)} not answering through {url}: {misses}")
        finally:
            await nc.close()
    return {"seconds": round(time.monotonic() - t0, 3), "misses": dict(misses)}


class BucketLog:
    """Every update of KAYA_SHARDS as it arrives, with its arrival time (monotonic)."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, str, dict[str, Any] | None]] = []

    async def run(self, kv: Any) -> None:
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # the end of the current values
                    continue
                value: dict[str, Any] | None = None
                if entry.value and entry.operation is None:
                    with contextlib.suppress(ValueError):
                        value = json.loads(entry.value)
                self.entries.append((time.monotonic(), entry.key, value))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def first(self, key: str, after: float, node: str | None = None, **want: str) -> float | None:
        """When `key` first got a value (held by `node`, with `want`'s fields) after `after`."""
        for t, k, value in self.entries:
            if t < after or k != key or value is None:
                continue
            if node is not None and value.get("node") != node:
                continue
            if all(value.get(f) == v for f, v in want.items()):
                return t
        return None

    def first_other(self, key: str, after: float, not_node: str, state: str = "") -> float | None:
        for t, k, value in self.entries:
            if t < after or k != key or value is None or value.get("node") in (None, not_node):
                continue
            if not state or value.get("state") == state:
                return t
        return None


# ---- load: bench.e2e's closed-loop generator, given every server ----------------------------


def generator_main(args: argparse.Namespace) -> int:
    """bench.e2e's generator with the servers as a list: nats-py takes a list, not a comma list."""
    args.url = args.urls.split(",")
    return e2e.generator_main(args)


def _cpu(pids: dict[str, dict[str, int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for group, members in pids.items():
        for name, pid in members.items():
            total = cpu_seconds(pid)
            if total is not None:
                out[f"{group}/{name}"] = total
            if group == "nodes" and (loop := cpu_seconds(pid, main_thread=True)) is not None:
                out[f"loops/{name}"] = loop
    busy = machine_busy_seconds()
    if busy is not None:
        out["machine"] = busy
    return out


def idle_cpu(pids: dict[str, dict[str, int]], seconds: float) -> dict[str, float]:
    """Cores the nodes and the servers use with no load at all: lease rounds, heartbeats,
    pulls that find nothing. Paid whatever the traffic."""
    before = _cpu(pids)
    t0 = time.monotonic()
    time.sleep(seconds)
    after = _cpu(pids)
    elapsed = time.monotonic() - t0
    spent = {k: after[k] - v for k, v in before.items() if k in after}
    return {
        group: round(sum(v for k, v in spent.items() if k.startswith(group + "/")) / elapsed, 3)
        for group in ("nodes", "servers")
    }


def run_load(
    settings: Settings, urls: Sequence[str], pids: dict[str, dict[str, int]], workdir: Path
) -> dict[str, Any]:
    """One generator run; the CPU of every process in `pids` sampled over its window."""
    argv = fw.module_argv(
        "bench.cluster",
        "--generator",
        urls=",".join(urls),
        accounts=settings.accounts,
        inflight=settings.inflight,
        warmup=settings.warmup,
        duration=settings.duration,
        timeout=settings.timeout,
        per_account=True,
    )
    generator = Child("generator", argv, workdir / "generator.log")
    watched = {**pids, "generator": {"generator": generator.pid}}
    window = fw.run_windowed(
        generator,
        lambda: _cpu(watched),
        warmup=settings.warmup,
        duration=settings.duration,
        drain=settings.timeout,
    )
    result, before, after, elapsed = window.result, window.before, window.after, window.seconds
    spent = {k: after[k] - v for k, v in before.items() if k in after}
    ok = max(1, result["ok"])

    def total(group: str) -> float:
        return sum(v for k, v in spent.items() if k.startswith(group + "/"))

    ours = total("nodes") + total("servers") + total("generator")
    loops = [v for k, v in spent.items() if k.startswith("loops/")]
    result["cpu"] = {
        "window_s": round(elapsed, 3),
        "seconds": {k: round(v, 3) for k, v in spent.items()},
        "node_cores": round(total("nodes") / elapsed, 3),
        "server_cores": round(total("servers") / elapsed, 3),
        "generator_cores": round(total("generator") / elapsed, 3),
        "busiest_loop_cores": round(max(loops, default=0.0) / elapsed, 3),
        "other_cores": round((spent.get("machine", ours) - ours) / elapsed, 3),
        "node_us_per_cmd": round(total("nodes") / ok * 1e6, 1),
        "node_us_per_cmd_per_node": round(total("nodes") / len(pids["nodes"]) / ok * 1e6, 1),
        "busiest_loop_us_per_cmd": round(max(loops, default=0.0) / ok * 1e6, 1),
        "server_us_per_cmd": round(total("servers") / ok * 1e6, 1),
    }
    return result


def throughput_variant(
    settings: Settings,
    variant: str,
    urls: Sequence[str],
    pids: dict[str, dict[str, int]],
    workdir: Path,
    idle: dict[str, float],
) -> dict[str, Any]:
    """Open the accounts, run the load, read every balance back."""
    print(f"throughput: {variant} ...", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"variant": variant, "loadavg_before": os.getloadavg()[0]}
    out["idle_cores"] = idle
    t0 = time.monotonic()
    asyncio.run(e2e.open_accounts(urls[0], settings.accounts))
    out["open_s"] = round(time.monotonic() - t0, 2)
    result = run_load(settings, urls, pids, workdir)
    ok_per_account: list[int] = result.pop("ok_per_account")
    unknown: dict[str, int] = result.pop("unknown_outcome")
    out.update(result)
    out["verification"] = asyncio.run(e2e.verify_balances(urls[0], ok_per_account, unknown, seed=1))
    return out


def local_variant(settings: Settings, workdir: Path) -> dict[str, Any]:
    """The baseline: one `kaya run`, local durability, its embedded server."""
    node_dir = workdir / "local"
    node_dir.mkdir()
    with running("kaya", node_dir, node_config=LOCAL_NODE_CONFIG) as target:
        pids = {
            "nodes": {"local": target.cpu_pids["node"]},
            "servers": {"embedded": target.cpu_pids["nats_server"]}
            if "nats_server" in target.cpu_pids
            else {},
        }
        idle = idle_cpu(pids, settings.idle)
        out = throughput_variant(settings, "local", [target.url], pids, node_dir, idle)
    out["node"] = dict(target.info)
    return out


# ---- handoff ------------------------------------------------------------------------------------


CAUGHT_UP = re.compile(r"shard (\d+): serving \(epoch \d+, caught up in ([0-9.]+)s\)")


def caught_up(data_dir: Path, node: str, shard: int) -> float | None:
    """The node's own figure for its last take of `shard`: acquired -> serving, seconds
    (the follower past the epoch marker, then subscribed). From its log (info level)."""
    found = None
    with contextlib.suppress(OSError):
        for line in (data_dir / node / "node.log").read_text(errors="replace").splitlines():
            if (m := CAUGHT_UP.search(line)) and int(m[1]) == shard:
                found = float(m[2])
    return found


def ids_on_shard(shard: int, count: int, prefix: str) -> list[str]:
    from kaya.actors.wire import shard_of

    out: list[str] = []
    j = 0
    while len(out) < count and j < 1000 * count:  # about 1 in 16 lands on the shard
        candidate = f"{prefix}-{j}"
        if shard_of(SHARDS, "account", candidate) == shard:
            out.append(candidate)
        j += 1
    return out


async def write_events(
    urls: Sequence[str], ids: list[str], events: int, concurrency: int = 100
) -> dict[str, Any]:
    """`events` events on `ids`: an Opened each, then Deposits round-robin; errors counted."""
    nc = await _connect(urls, "bench-cluster-writer")
    codes: Counter[str] = Counter()
    t0 = time.monotonic()
    try:

        async def send(pending: Iterator[tuple[str, bytes]]) -> None:
            for account, body in pending:
                try:
                    msg = await nc.request(f"kaya.cmd.account.{account}", body, timeout=10)
                    codes[e2e.reply_code(msg.data)] += 1
                except Exception as exc:
                    codes[type(exc).__name__] += 1

        opens = iter(
            (i, json.dumps({"type": "Open", "owner": "bench", "currency": "EUR"}).encode())
            for i in ids
        )
        await asyncio.gather(*(send(opens) for _ in range(min(concurrency, len(ids)))))
        deposits = iter((ids[k % len(ids)], e2e.DEPOSIT) for k in range(max(0, events - len(ids))))
        await asyncio.gather(*(send(deposits) for _ in range(concurrency)))
    finally:
        await nc.close()
    seconds = time.monotonic() - t0
    return {
        "accounts": len(ids),
        "events": events,
        "seconds": round(seconds, 2),
        "per_s": round(events / seconds),
        "outcomes": dict(codes),
    }


async def handoff(
    urls: Sequence[str], data_dir: Path, events: int, used: set[int], previous_source: str | None
) -> dict[str, Any]:
    """K events into a shard of the node with the most shards, then `kaya shards move`."""
    from kaya.app.cluster.leases import read_table

    nc = await _connect(urls, "bench-cluster-handoff")
    log = BucketLog()
    watch: asyncio.Task[None] | None = None
    probe: asyncio.Task[list[tuple[float, str]]] | None = None
    try:
        kv = await _bucket(nc)
        by_node = owners_by_node(await read_table(kv))
        source = max(sorted(by_node), key=lambda n: len(by_node[n]))
        targets = sorted(
            (n for n in by_node if n != source),
            key=lambda n: (len(by_node[n]), n == previous_source),
        )
        target = targets[0]
        shard = min(s for s in by_node[source] if s not in used)
        used.add(shard)
        ids = ids_on_shard(shard, max(1, events // 100), f"ho{events}")
        print(
            f"handoff: {events} events into shard {shard}, {source} -> {target} ...",
            file=sys.stderr,
            flush=True,
        )
        written = await write_events(urls, ids, events)
        watch = asyncio.create_task(log.run(kv))
        stop = asyncio.Event()
        probe = asyncio.create_task(probe_queries(nc, f"kaya.qry.account.{ids[0]}", stop))
        await asyncio.sleep(0.3)  # the watcher is past the current values
        kaya = Path(sys.executable).parent / "kaya"
        argv = [str(kaya), "shards", "move", str(shard), "--to", target, "--url", ",".join(urls)]
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout=MOVE_TIMEOUT)
        except TimeoutError:
            proc.kill()
            output, _ = await proc.communicate()
        cli_s = time.monotonic() - t0
        await asyncio.sleep(0.2)
        stop.set()
        probed = await probe
        key = f"shard.{shard}"
        requested = log.first(f"move.{shard}", t0)
        acquired = log.first(key, t0, node=target)
        serving = log.first(key, t0, node=target, state="serving")
        released = None
        if requested is not None:  # the old owner's lease deleted: the drain is done
            released = next(
                (t for t, k, v in log.entries if k == key and t >= requested and v is None), None
            )
    finally:
        for task in (watch, probe):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await nc.close()

    def since(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 3)

    ok_times = [t for t, code in probed if code == "ok"]
    return {
        "events": events,
        "shard": shard,
        "from": source,
        "to": target,
        "write": written,
        "cli_exit_code": proc.returncode,
        "cli_output": output.decode(errors="replace").strip()[-300:],
        "cli_s": round(cli_s, 3),
        "request_to_released_s": since(requested, released),
        "request_to_acquired_s": since(requested, acquired),
        "request_to_serving_s": since(requested, serving),
        "bucket_serving_lag_s": since(acquired, serving),
        "node_caught_up_s": caught_up(data_dir, target, shard),
        "client_gap_s": round(longest_gap(ok_times, t0, t0 + cli_s), 3),
        "probe_outcomes": dict(Counter(code for _, code in probed)),
    }


async def probe_queries(
    nc: Any, subject: str, stop: asyncio.Event, every: float = 0.01
) -> list[tuple[float, str]]:
    """A query every `every` seconds until `stop`, none waiting for another (a query that
    hangs must not hide the ones after it): (when it ended, how) for each."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    out: list[tuple[float, str]] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        try:
            msg = await nc.request(subject, b"", timeout=2)
            code = e2e.reply_code(msg.data)
        except NoRespondersError:
            code = "no_responders"
        except NatsTimeout:
            code = "client_timeout"
        out.append((time.monotonic(), code))

    sent = 0
    while not stop.is_set() and sent < MAX_REQUESTS:
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    if tasks:
        await asyncio.wait(set(tasks), timeout=5)
    return out


# ---- failover -----------------------------------------------------------------------------------


async def read_balances(url: str, accounts: int) -> list[int | None]:
    subjects = [f"kaya.qry.account.{e2e.account_id(i)}" for i in range(accounts)]
    out: list[int | None] = []
    for data in await e2e.request_all(url, subjects, b""):
        try:
            reply = json.loads(data)
            out.append(int(reply["state"]["balance"]) if reply.get("ok") else None)
        except (ValueError, KeyError, TypeError):
            out.append(None)
    return out


@dataclass
class Outcome:
    sent: float
    done: float
    account: int
    code: str


async def open_loop(
    nc: Any, accounts: int, rate: float, timeout: float, stop: asyncio.Event
) -> list[Outcome]:
    """Deposits due at a constant rate whatever the replies do; one try each, no retry."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    outcomes: list[Outcome] = []
    subjects = [e2e.command_subject(i) for i in range(accounts)]
    pick = random.Random(7).randrange
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        sent = time.monotonic()
        try:
            msg = await nc.request(subjects[i], e2e.DEPOSIT, timeout=timeout)
            code = e2e.reply_code(msg.data)
        except NatsTimeout:
            code = "client_timeout"
        except NoRespondersError:
            code = "no_responders"
        except Exception as exc:
            code = type(exc).__name__
        outcomes.append(Outcome(sent, time.monotonic(), i, code))

    t0 = time.monotonic()
    k = 0
    while not stop.is_set() and k < MAX_REQUESTS:
        delay = t0 + k / rate - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        task = asyncio.create_task(one(pick(accounts)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        k += 1
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout + 5)
    return outcomes


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest interval in [start, end] without any of `times`."""
    points = [start, *sorted(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(points))


async def failover(settings: Settings, cluster: DevCluster) -> dict[str, Any]:
    from kaya.actors.wire import shard_of
    from kaya.app.cluster.leases import read_table

    urls = cluster.urls
    accounts = settings.accounts
    shard = [shard_of(SHARDS, "account", e2e.account_id(i)) for i in range(accounts)]
    nc = await _connect(urls, "bench-cluster-failover")
    log = BucketLog()
    watch: asyncio.Task[None] | None = None
    load: asyncio.Task[list[Outcome]] | None = None
    stop = asyncio.Event()
    try:
        kv = await _bucket(nc)
        by_node = owners_by_node(await read_table(kv))
        victim = max(sorted(by_node), key=lambda n: len(by_node[n]))
        lost = by_node[victim]
        print(
            f"failover: kill -9 {victim} (shards {lost}), {settings.failover_rate:g} req/s ...",
            file=sys.stderr,
            flush=True,
        )
        before = await read_balances(urls[0], accounts)
        watch = asyncio.create_task(log.run(kv))
        load = asyncio.create_task(
            open_loop(nc, accounts, settings.failover_rate, settings.timeout, stop)
        )
        load_t0 = time.monotonic()
        await asyncio.sleep(settings.failover_before)
        killed = time.monotonic()
        os.kill(cluster.nodes[victim].pid, signal.SIGKILL)
        served: dict[int, float] = {}
        while len(served) < len(lost) and time.monotonic() - killed < FAILOVER_DEADLINE:
            for n in lost:
                if n not in served:
                    t = log.first_other(f"shard.{n}", killed, victim, state="serving")
                    if t is not None:
                        served[n] = t
            await asyncio.sleep(0.02)
        all_served = time.monotonic()
        await asyncio.sleep(settings.failover_after)
        stop.set()
        outcomes = await load
        load_t1 = time.monotonic()
        after = await read_balances(urls[0], accounts)
    finally:
        stop.set()
        for task in (watch, load):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await nc.close()

    acquired = {n: log.first_other(f"shard.{n}", killed, victim) for n in lost}
    new_owner = {
        n: next(
            (
                v.get("node")
                for t, k, v in log.entries
                if k == f"shard.{n}" and t >= killed and v and v.get("node") != victim
            ),
            None,
        )
        for n in lost
    }
    lost_set = set(lost)
    ok_on = [o.done for o in outcomes if o.code == "ok" and shard[o.account] in lost_set]
    ok_off = [o.done for o in outcomes if o.code == "ok" and shard[o.account] not in lost_set]
    first_ok: dict[int, float | None] = {}
    for n in lost:
        # sent after the kill: a reply the victim sent just before it died is no answer
        after_kill = [
            o.done for o in outcomes if o.code == "ok" and shard[o.account] == n and o.sent > killed
        ]
        first_ok[n] = min(after_kill, default=None)
    codes_on = Counter(o.code for o in outcomes if shard[o.account] in lost_set)
    codes_off = Counter(o.code for o in outcomes if shard[o.account] not in lost_set)

    # correctness: each balance grew by what was acknowledged to it, plus at most the unknown
    acked = [0] * accounts
    unknown = [0] * accounts
    for o in outcomes:
        if o.code == "ok":
            acked[o.account] += 1
        elif o.code == "client_timeout":
            unknown[o.account] += 1
    missing = extra = unreadable = 0
    examples: list[str] = []
    for i in range(accounts):
        b0, b1 = before[i], after[i]
        if b0 is None or b1 is None:
            unreadable += 1
            continue
        grown = b1 - b0
        if grown < acked[i]:
            missing += acked[i] - grown
            examples.append(f"{e2e.account_id(i)}: +{grown}, acknowledged {acked[i]}")
        elif grown > acked[i] + unknown[i]:
            extra += grown - acked[i] - unknown[i]
            examples.append(f"{e2e.account_id(i)}: +{grown}, acked {acked[i]} unknown {unknown[i]}")
    sum_grown = sum(
        b1 - b0 for b0, b1 in zip(before, after, strict=True) if b0 is not None and b1 is not None
    )

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - killed, 3)

    per_shard = {
        str(n): {
            "new_owner": new_owner[n],
            "acquired_s": rel(acquired[n]),
            "serving_s": rel(served.get(n)),
            "first_ok_s": rel(first_ok[n]),
            "node_caught_up_s": caught_up(cluster.data_dir, str(new_owner[n]), n)
            if new_owner[n]
            else None,
        }
        for n in lost
    }
    serving_all = [served[n] - killed for n in lost if n in served]
    return {
        "victim": victim,
        "victim_shards": lost,
        "rate": settings.failover_rate,
        "load_s": round(load_t1 - load_t0, 2),
        "all_served": len(served) == len(lost),
        "kill_to_all_serving_s": round(max(serving_all), 3) if serving_all else None,
        "kill_to_all_acquired_s": round(
            max((t - killed for t in acquired.values() if t is not None), default=float("nan")), 3
        ),
        "poll_end_s": round(all_served - killed, 3),
        "per_shard": per_shard,
        "client_gap_s": round(longest_gap(ok_on, load_t0, load_t1), 3),
        "client_gap_other_shards_s": round(longest_gap(ok_off, load_t0, load_t1), 3),
        "kill_to_first_ok_max_s": round(
            max((t - killed for t in first_ok.values() if t is not None), default=float("nan")),
            3,
        ),
        "requests": len(outcomes),
        "outcomes_lost_shards": dict(codes_on),
        "outcomes_other_shards": dict(codes_off),
        "acknowledged": sum(acked),
        "failed": sum(1 for o in outcomes if o.code not in ("ok", "client_timeout")),
        "unknown": sum(unknown),
        "latency_ok_ms": {
            "p50": percentile(
                sorted((o.done - o.sent) * 1e3 for o in outcomes if o.code == "ok"), 50
            ),
            "p99": percentile(
                sorted((o.done - o.sent) * 1e3 for o in outcomes if o.code == "ok"), 99
            ),
        },
        "verification": {
            "verified": missing == 0 and extra == 0 and unreadable == 0,
            "sum_of_growth": sum_grown,
            "acknowledged": sum(acked),
            "unknown_outcomes": sum(unknown),
            "missing_acknowledged": missing,
            "unexplained_extra": extra,
            "unreadable_accounts": unreadable,
            "examples": examples[:5],
        },
    }


# ---- the run ------------------------------------------------------------------------------------


def cluster_run(settings: Settings, nodes: int, workdir: Path, results: dict[str, Any]) -> None:
    """One dev-cluster: settle, then the scenarios that run on it, in the order that keeps
    each clean (handoff before the load, failover last since it kills a node)."""
    on_this = nodes == FAILOVER_NODES
    entry: dict[str, Any] = {"nodes": nodes, "servers": SERVERS}
    results["clusters"].append(entry)
    with dev_cluster(workdir, nodes, entry) as cluster:
        names = set(cluster.nodes)
        entry["settle"] = asyncio.run(wait_settled(cluster.urls, names, SETTLE_TIMEOUT))
        entry["answering"] = asyncio.run(wait_answering(cluster.urls, SETTLE_TIMEOUT))
        entry["idle_cores"] = idle_cpu(cluster.pids(), settings.idle)
        entry["jetstream_start"] = cluster.jetstream()
        started = time.monotonic()
        if on_this and "handoff" in settings.scenarios:
            used: set[int] = set()
            source: str | None = None
            for events in settings.handoff_events:
                row = asyncio.run(handoff(cluster.urls, cluster.data_dir, events, used, source))
                source = row["from"]
                results["handoff"].append(row)
                entry["settle_after_handoff"] = asyncio.run(
                    wait_settled(cluster.urls, names, SETTLE_TIMEOUT)
                )
        opened = False
        if "throughput" in settings.scenarios and nodes in settings.nodes:
            row = throughput_variant(
                settings,
                f"{nodes} node{'s' if nodes > 1 else ''}",
                cluster.urls,
                cluster.pids(),
                workdir,
                entry["idle_cores"],
            )
            row["nodes"] = nodes
            results["throughput"].append(row)
            opened = True
        if on_this and "failover" in settings.scenarios:
            if not opened:
                asyncio.run(e2e.open_accounts(cluster.urls[0], settings.accounts))
            results["failover"] = asyncio.run(failover(settings, cluster))
        entry["jetstream_end"] = cluster.jetstream()
        entry["jetstream_seconds"] = round(time.monotonic() - started, 1)


def run(settings: Settings, quick: bool) -> dict[str, Any]:
    results = fw.new_results(
        "cluster",
        settings,
        quick=quick,
        clusters=[],
        throughput=[],
        handoff=[],
        failover=None,
        errors=[],
    )
    t0 = time.monotonic()
    with fw.scratch("cluster", keep=settings.keep_data) as workdir:
        if settings.keep_data:
            results["workdir"] = str(workdir)
        if "throughput" in settings.scenarios and settings.local:
            try:
                results["throughput"].append(local_variant(settings, workdir))
            except Exception as exc:  # reported; the clusters still run
                results["errors"].append(f"local: {exc!r}"[:1000])
        counts = set(settings.nodes) if "throughput" in settings.scenarios else set()
        if {"handoff", "failover"} & set(settings.scenarios):
            counts.add(FAILOVER_NODES)
        for nodes in sorted(counts):
            try:
                cluster_run(settings, nodes, workdir, results)
            except Exception as exc:  # its processes are stopped; the next cluster runs
                results["errors"].append(f"{nodes}-node cluster: {exc!r}"[:1000])
    results["seconds"] = round(time.monotonic() - t0, 1)
    results["finished_at"] = utc_now().isoformat(timespec="seconds")
    results["summary"] = summarize(results)
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    rows = {r["variant"]: r for r in results["throughput"]}
    out: dict[str, Any] = {"throughput": {}}
    local = rows.get("local")
    for name, r in rows.items():
        x = {
            "req_s": round(r["throughput"]),
            "p50_ms": round(r["latency_ms"]["p50"], 2),
            "p99_ms": round(r["latency_ms"]["p99"], 2),
            "node_us_per_cmd": r["cpu"]["node_us_per_cmd"],
            "server_us_per_cmd": r["cpu"]["server_us_per_cmd"],
            "verified": r["verification"]["verified"],
        }
        if local is not None and name != "local":
            lc = local["cpu"]
            x["over_local"] = {
                "req_s": round(r["throughput"] / local["throughput"], 3),
                "p99": round(r["latency_ms"]["p99"] / local["latency_ms"]["p99"], 2),
                "node_cpu_per_cmd": round(r["cpu"]["node_us_per_cmd"] / lc["node_us_per_cmd"], 2),
                "all_cpu_per_cmd": round(
                    (r["cpu"]["node_us_per_cmd"] + r["cpu"]["server_us_per_cmd"])
                    / (lc["node_us_per_cmd"] + lc["server_us_per_cmd"]),
                    2,
                ),
            }
        out["throughput"][name] = x
    f = results.get("failover")
    if f:
        out["failover"] = {
            k: f[k]
            for k in (
                "kill_to_all_acquired_s",
                "kill_to_all_serving_s",
                "client_gap_s",
                "acknowledged",
                "failed",
                "unknown",
            )
        }
        out["failover"]["verified"] = f["verification"]["verified"]
    out["handoff"] = {
        str(h["events"]): {"cli_s": h["cli_s"], "request_to_serving_s": h["request_to_serving_s"]}
        for h in results["handoff"]
    }
    return out


# ---- output ---------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or x != x else f"{x:{fmt}}"


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"cluster: {m['nproc']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"{v['nats-server']}, nats-py {v['nats-py']}, git {v['git']}, "
        f"load average at start {m['loadavg_at_start'][0]}",
    ]
    if results["throughput"]:
        lines += [
            "",
            f"throughput: {s['accounts']} accounts, {s['inflight']} in flight (closed loop), "
            f"{s['duration']:g} s after {s['warmup']:g} s warm-up; clusters: {SERVERS} servers, "
            "replicated",
            f"{'variant':<9}{'req/s':>7}{'p50 ms':>8}{'p99 ms':>8}  {'CPU us per command:':<20}"
            f"{'':>22}{'cores in the window:':<22}{'':>8}{'idle cores':>11}  verified errors",
            f"{'':<31}{'nodes':>7}{'per node':>9}{'loop':>6}{'servers':>8}"
            f"{'nodes':>7}{'servers':>8}{'loop':>6}{'other':>7}{'nodes':>8}{'servers':>8}",
        ]
        for r in results["throughput"]:
            c, idle = r["cpu"], r["idle_cores"]
            errors = " ".join(f"{k}={n}" for k, n in r["errors"].items()) or "-"
            lines.append(
                f"{r['variant']:<9}{r['throughput']:>7,.0f}{r['latency_ms']['p50']:>8.1f}"
                f"{r['latency_ms']['p99']:>8.1f}{c['node_us_per_cmd']:>9,.0f}"
                f"{c['node_us_per_cmd_per_node']:>9,.0f}{c['busiest_loop_us_per_cmd']:>6,.0f}"
                f"{c['server_us_per_cmd']:>8,.0f}{c['node_cores']:>7.2f}{c['server_cores']:>8.2f}"
                f"{c['busiest_loop_cores']:>6.2f}{c['other_cores']:>7.2f}"
                f"{idle['nodes']:>8.2f}{idle['servers']:>8.2f}"
                f"  {str(r['verification']['verified']).lower():<9}{errors}"
            )
        for name, x in results["summary"]["throughput"].items():
            if "over_local" in x:
                o = x["over_local"]
                lines.append(
                    f"  {name}/local: req/s {o['req_s']:.2f}, p99 x{o['p99']:.2f}, node CPU per"
                    f" command x{o['node_cpu_per_cmd']:.2f},"
                    f" node+servers x{o['all_cpu_per_cmd']:.2f}"
                )
        lines.append(
            "  (nodes: all node processes; per node: that / nodes; loop: the busiest node's"
            " event-loop thread; other: processes not in this benchmark; idle: before the load)"
        )
    if results["handoff"]:
        lines += [
            "",
            "handoff: K events into one shard, then `kaya shards move N --to NODE`",
            f"{'K':>7}  {'shard':>5}  {'from -> to':<17}{'write/s':>8}{'CLI s':>7}"
            f"{'released':>9}{'leased':>8}{'serving':>8}{'caught up':>10}{'client gap':>11}",
        ]
        for h in results["handoff"]:
            lines.append(
                f"{h['events']:>7,}  {h['shard']:>5}  {h['from'] + ' -> ' + h['to']:<17}"
                f"{h['write']['per_s']:>8,}{h['cli_s']:>7.2f}{_f(h['request_to_released_s']):>9}"
                f"{_f(h['request_to_acquired_s']):>8}{_f(h['request_to_serving_s']):>8}"
                f"{_f(h['node_caught_up_s'], '.3f'):>10}{h['client_gap_s']:>11.2f}"
            )
        lines.append(
            "  (seconds from the move request in KAYA_SHARDS: the old owner's lease deleted, the"
            " target's lease, `serving` in the bucket; caught up: the target's own acquired ->"
            " serving; client gap: longest time without an answer to a query every 10 ms)"
        )
        for h in results["handoff"]:
            lines.append(
                f"  K={h['events']:,}: writes {h['write']['outcomes']} in"
                f" {h['write']['seconds']} s; queries during the move {h['probe_outcomes']}"
            )
    f = results.get("failover")
    if f:
        ver = f["verification"]
        lines += [
            "",
            f"failover: kill -9 {f['victim']} holding shards {f['victim_shards']}, "
            f"{f['rate']:g} req/s open loop over all accounts, {f['load_s']:.1f} s of load",
            f"  kill -> every shard leased by another node {_f(f['kill_to_all_acquired_s'])} s,"
            f" answering again (first ok) {_f(f['kill_to_first_ok_max_s'])} s, `serving` in the"
            f" bucket {_f(f['kill_to_all_serving_s'])} s"
            + ("" if f["all_served"] else f"  NOT ALL SERVED after {FAILOVER_DEADLINE:g} s"),
            "  per shard, s after the kill (leased/first ok/`serving` in the bucket; the new"
            " owner's own catch-up):",
            "    "
            + ", ".join(
                f"{n}->{p['new_owner']} {_f(p['acquired_s'], '.1f')}/{_f(p['first_ok_s'], '.1f')}"
                f"/{_f(p['serving_s'], '.1f')} ({_f(p['node_caught_up_s'], '.3f')})"
                for n, p in f["per_shard"].items()
            ),
            f"  client-visible gap on those shards {f['client_gap_s']:.2f} s "
            f"(on the other shards {f['client_gap_other_shards_s']:.2f} s)",
            f"  commands: {f['acknowledged']:,} acknowledged, {f['failed']:,} failed, "
            f"{f['unknown']:,} unknown (timeout); on the lost shards {f['outcomes_lost_shards']},"
            f" on the others {f['outcomes_other_shards']}",
            f"  balances: grew by {ver['sum_of_growth']:,} for {ver['acknowledged']:,} acknowledged"
            f" (+{ver['unknown_outcomes']} unknown): missing {ver['missing_acknowledged']},"
            f" unexplained {ver['unexplained_extra']}, unreadable {ver['unreadable_accounts']}"
            f" -> verified {str(ver['verified']).lower()}",
        ]
    if results["clusters"]:
        lines += ["", "clusters (3 servers each):"]
    for c in results["clusters"]:
        js0, js1 = c.get("jetstream_start", {}), c.get("jetstream_end", {})
        kv0 = js0.get("by_stream", {}).get("KV_KAYA_SHARDS")
        kv1 = js1.get("by_stream", {}).get("KV_KAYA_SHARDS")
        answering = c.get("answering", {})
        lines.append(
            f"  {c['nodes']} node(s): ready in {_f(c.get('startup_s'), '.1f')} s, settled"
            f" {_f(c.get('settle', {}).get('seconds'), '.1f')} s later, answering through every"
            f" server {_f(answering.get('seconds'), '.2f')} s after that"
            f" (misses {answering.get('misses') or 0}); consumers on KV_KAYA_SHARDS {kv0} ->"
            f" {kv1} in {c.get('jetstream_seconds', '-')} s (all: {js0.get('consumers')} ->"
            f" {js1.get('consumers')}; the meta layer's at stop"
            f" {c.get('meta_consumers_at_stop')}); stopped in {c.get('stop_s')} s,"
            f" exit {c.get('exit_code')}, left behind {c.get('left_behind')}"
        )
    logs = [
        (c["nodes"], name, x) for c in results["clusters"] for name, x in c.get("logs", {}).items()
    ]
    if logs:
        lines += ["", "warnings and errors in the dev-clusters' logs:"]
        for nodes, name, x in logs:
            levels = " ".join(f"{k}={n}" for k, n in x["levels"].items())
            lines.append(f"  {nodes}-node cluster, {name}: {levels}; first: {x['first'][0][:160]}")
    for error in results["errors"]:
        lines.append(f"FAILED: {error}")
    lines.append(f"\ntotal {results['seconds']:.0f} s")
    return "\n".join(lines)


def chart(results: dict[str, Any]) -> list[str]:
    rows = results["throughput"]
    if not rows:
        return []
    note = f"{results['machine']['nproc']} cores, git {results['versions']['git']}"

    def one(x: float) -> dict[str, float]:
        return {"median": x, "min": x, "max": x}

    paths = [
        bar_chart(
            "cluster-throughput",
            "Deposits/s, 100 in flight: local vs replicated clusters",
            "req/s",
            {r["variant"]: one(r["throughput"]) for r in rows},
            note=note,
        ),
        bar_chart(
            "cluster-cpu",
            "Node CPU per command (all node processes)",
            "µs",
            {r["variant"]: one(r["cpu"]["node_us_per_cmd"]) for r in rows},
            note=note,
        ),
    ]
    return [str(p) for p in paths if p is not None]


# ---- command line -----------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description="Throughput vs nodes, failover after kill -9, shard handoff: a local "
        "dev-cluster beside a single local-durability node, same run.",
    )
    fw.add_options(
        p,
        quick="2 s windows, clusters of 1 and 3 nodes, a handoff of 100 events (under a minute)",
        duration="measured seconds (default 5; quick 2)",
        warmup="unmeasured seconds first (default 2; quick 1)",
        only=f"comma-separated, of {','.join(SCENARIOS)} (default all)",
        keep_data="keep the data dirs and logs",
    )
    p.add_argument("--accounts", type=int, default=2000, help="accounts opened (default 2000)")
    p.add_argument("--inflight", type=int, default=100, help="closed-loop requesters")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds")
    p.add_argument(
        "--nodes", type=_ints, help="cluster sizes for throughput (default 1,2,3; quick 1,3)"
    )
    p.add_argument("--no-local", action="store_true", help="skip the local-durability baseline")
    p.add_argument(
        "--handoff-events", type=_ints, help="events per handoff (default 1000,10000; quick 100)"
    )
    p.add_argument(
        "--failover-rate", type=float, default=200.0, help="open-loop req/s (default 200)"
    )
    gen = p.add_argument_group("generator process (internal)")
    gen.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    gen.add_argument("--urls", help=argparse.SUPPRESS)
    gen.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    gen.add_argument("--per-account", action="store_true", help=argparse.SUPPRESS)
    return p


def _resolve(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    scenarios = fw.parse_only(args.only, SCENARIOS, SCENARIOS)
    settings = Settings(
        accounts=args.accounts,
        inflight=args.inflight,
        warmup=fw.pick(args.warmup, quick, 1.0, 2.0),
        duration=fw.pick(args.duration, quick, 2.0, 5.0),
        timeout=args.timeout,
        nodes=args.nodes or ((1, 3) if quick else (1, 2, 3)),
        local=not args.no_local,
        handoff_events=args.handoff_events or ((100,) if quick else (1000, 10_000)),
        failover_rate=args.failover_rate,
        failover_before=1.0 if quick else 2.0,
        failover_after=1.0 if quick else 2.0,
        idle=0.5 if quick else 2.0,
        scenarios=scenarios,
        keep_data=args.keep_data,
    )
    if settings.accounts < SHARDS or settings.inflight < 1 or settings.duration <= 0:
        raise SystemExit(f"--accounts must be at least {SHARDS}, --inflight and --duration > 0")
    if any(n < 1 for n in settings.nodes) or any(k < 1 for k in settings.handoff_events):
        raise SystemExit("--nodes and --handoff-events must be positive")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.generator:
        if not args.urls or args.duration is None or args.warmup is None:
            raise SystemExit("--generator needs --urls, --duration and --warmup")
        return generator_main(args)
    settings = _resolve(args)
    fw.exit_on_sigterm()
    results = run(settings, quick=bool(args.quick))
    fw.finish(results, write=not args.no_write, render=render, chart=chart)
    checks = [r["verification"]["verified"] for r in results["throughput"]]
    if results["failover"]:
        checks.append(results["failover"]["verification"]["verified"])
    return 0 if all(checks) and not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
