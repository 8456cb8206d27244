"""Relay benchmark: how fast committed events reach JetStream, and how far the read model lags.

    python -m bench.relay [--quick] [--events N] [--rate R] [--duration S] [--rounds N]

Part 1, relay throughput. One SQLite event store is pre-filled with N `account`
events (Opened, then Deposited; not timed), then, round by round:

- `raw`: a nats-server started with the node's own generated config and a
  publisher process that sends the same N messages (subject, body and headers read
  from the pre-filled store before the clock starts) to a fresh KAYA_EVENTS created
  from the node's stream config (file storage, duplicate window 300 s), at most
  `--window` acks pending, with nats-py's stock `js.publish_async`.
- `raw-lean`: the same with plain `nc.publish`, one reply inbox, one wildcard ack
  subscription and a sliding window: the most this client, server and these cores
  allow (stock publish_async pays a future and a `json.loads` per ack).
- `relay`: `kaya run` on a copy of the pre-filled store: its outbox relay publishes
  all N. The node's consumers (analytics, notifications) run too, as in
  production, and compete with the relay for the node's event loop and its
  SQLite write lock.
- `relay-solo`: the same node with no consumers (`--solo-node`, a bench-side
  runner of `app.node.open_node`): the relay alone.

The benchmark polls `$JS.API.STREAM.INFO.KAYA_EVENTS` every 50 ms. events/s is
(N - 1) / (last_ts - first_ts) from the stream's own timestamps (the same clock for
both scenarios); the polled figure is beside it. For `relay` it then waits until
`kaya.view.analytics` reports position N and the notifications consumer's ack floor
reaches N: the consumers' catch-up.

Part 2, read-model lag under load. The peak of a fresh node is measured briefly
with bench/e2e.py's closed-loop generator (100 in flight), unless `--rate` is given;
then another fresh node gets an open-loop stream of deposits at half that rate
from a generator process that records the time of every successful reply. Every
100 ms the benchmark asks `kaya.view.analytics` for `operations.deposits` (and
KAYA_EVENTS for its message count). The lag of the k-th acknowledged deposit is
the time the view first showed >= k deposits minus the time of the k-th reply.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime as dt
import math
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import framework as fw
from bench.charts import bar_chart, line_chart
from bench.common import (
    BenchError,
    Child,
    child_pids,
    ensure_gone,
    free_port,
    percentile,
    render_targets,
    spread,
    target,
    utc_now,
    wait_for_port,
)
from bench.e2e import (
    DEPOSIT,
    account_id,
    command_subject,
    open_accounts,
    reply_code,
    run_generator,
)
from bench.e2e import Settings as E2ESettings
from bench.framework import RESULT_PREFIX, WINDOW_END, WINDOW_START
from bench.targets import nats_server, stderr_lines
from examples.bank import make_app
from kaya.actors.wire import EVENTS_STREAM

EVENTS_PER_ACCOUNT = 100
"""Pre-filled streams hold this many events each: one Opened, then Deposited."""
EVENTS_PER_APPEND = 10
VIEW_SUBJECT = "kaya.view.analytics"
CONSUMERS = ("analytics", "notifications")
STREAM_POLL = 0.05
MAX_PROGRESS_POINTS = 200
SYNC_ALWAYS = ["false"]
"""`--sync-always`: the node's embedded server fsyncs every JetStream write."""

NODE_CONFIG = """\
# Written by bench/relay.py: the defaults, except nothing that could clash with another process.
[node]
data_dir = "{data_dir}"

[nats]
port = {port}
monitor_port = 0
sync_always = {sync_always}

[log]
level = "warning"
"""


# ---- pre-fill (not timed) ------------------------------------------------------------------


def account_counts(events: int) -> list[int]:
    """Events per account stream: EVENTS_PER_ACCOUNT each, the total exactly `events`."""
    accounts = max(1, math.ceil(events / EVENTS_PER_ACCOUNT))
    base, extra = divmod(events, accounts)
    return [base + (1 if i < extra else 0) for i in range(accounts)]


async def prefill_store(path: Path, events: int) -> dict[str, Any]:
    """Append `events` account events through the store API: many streams, many appends at once.

    Bodies are encoded from the domain's own event types, so they are byte for byte
    what a node writes for `Open` and `Deposit {amount: 1}`.
    """
    import uuid

    import anyio
    import msgspec

    from examples.bank.account import Deposited, Opened
    from kaya.store import Append, NewEvent, open_event_store

    encode = msgspec.json.encode
    deposited = encode(Deposited(amount=1))
    counts = account_counts(events)

    def new_event(kind: str, data: bytes) -> NewEvent:
        return NewEvent(event_id=uuid.uuid4().hex, type=kind, schema_version=1, data=data)

    async def fill(store: Any, index: int, count: int) -> None:
        version = 0
        while version < count:
            batch = [
                new_event("Opened", encode(Opened(owner=f"owner-{index}", currency="EUR")))
                if v == 1
                else new_event("Deposited", deposited)
                for v in range(version + 1, min(count, version + EVENTS_PER_APPEND) + 1)
            ]
            await store.append(Append("account", account_id(index), version, batch))
            version += len(batch)

    t0 = time.monotonic()
    # NORMAL: nothing waits on these commits, and the file is closed cleanly before use
    async with open_event_store(path, synchronous="NORMAL") as store:
        async with anyio.create_task_group() as tg:
            for index, count in enumerate(counts):
                tg.start_soon(fill, store, index, count)
        last = await store.last_position()
        sample = await store.read_all(0, 2)
    if last != events:
        raise BenchError(f"pre-fill wrote {last} events, wanted {events}")
    size = await asyncio.to_thread(lambda: path.stat().st_size)
    return {
        "events": events,
        "accounts": len(counts),
        "events_per_append": EVENTS_PER_APPEND,
        "seconds": round(time.monotonic() - t0, 3),
        "bytes": size,
        "body_examples": [e.data.decode() for e in sample],
    }


# ---- probing a server from the benchmark ---------------------------------------------------


async def connect(url: str, name: str, timeout: float = 30.0) -> Any:
    """A nats-py connection, retried until the server accepts one (it may still be starting)."""
    import nats
    import nats.errors

    async def quiet(exc: Exception) -> None:
        pass

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await nats.connect(
                url, name=name, allow_reconnect=False, connect_timeout=2, error_cb=quiet
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise BenchError(f"cannot connect to {url}: {exc!r}") from None
            await asyncio.sleep(0.05)


class Probe:
    """Raw JetStream API and view requests: decoded once, with the fields nats-py's types drop
    (the stream's first_ts and last_ts, which time the publishing on the server's clock)."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc

    async def _request(self, subject: str, body: bytes = b"") -> dict[str, Any] | None:
        import nats.errors

        try:
            msg = await self._nc.request(subject, body, timeout=2.0)
        except (nats.errors.Error, TimeoutError):  # not up yet, busy, or no responders
            return None
        try:
            data = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or "error" in data:
            return None
        return data

    async def stream(self) -> dict[str, Any] | None:
        """KAYA_EVENTS's state (messages, first_ts, last_ts, ...); None before it exists."""
        info = await self._request(f"$JS.API.STREAM.INFO.{EVENTS_STREAM}")
        state = info.get("state") if info else None
        return state if isinstance(state, dict) else None

    async def ack_floor(self, consumer: str) -> int | None:
        """The stream sequence up to which a durable consumer has acknowledged everything."""
        info = await self._request(f"$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.{consumer}")
        if not info:
            return None
        return int(info.get("ack_floor", {}).get("stream_seq", 0))

    async def view(self) -> dict[str, Any] | None:
        data = await self._request(VIEW_SUBJECT, b"{}")
        return data if data and data.get("ok") else None


def parse_ts(text: str) -> float:
    """Unix seconds from JetStream's RFC 3339 UTC timestamps, which carry nanoseconds."""
    head, _, frac = text.removesuffix("Z").partition(".")
    base = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
    return base + (float(f"0.{frac}") if frac else 0.0)


def sample_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU per process and loop (`x_loop`), this process (`bench`), the machine (-> `foreign`)."""
    return fw.sample_cpu(pids, me=True, machine=True)


def cpu_share(a: dict[str, float], b: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores between two samples; `x_other` a process's threads other than its loop."""
    return fw.cpu_share(a, b, seconds, split=True)


# ---- part 1: watching KAYA_EVENTS fill ----------------------------------------------------


@dataclass
class Poll:
    t: float
    """time.monotonic() when the answers were in."""
    wall: float
    messages: int
    consumers: dict[str, int | None]
    cpu: dict[str, float]


@dataclass
class Watch:
    polls: list[Poll] = field(default_factory=list)
    done_state: dict[str, Any] | None = None
    stopped_because: str = ""


async def watch_stream(
    url: str,
    events: int,
    *,
    relay_timeout: float,
    total_timeout: float,
    cpu_pids: dict[str, int],
    consumers: bool,
    alive: Callable[[], bool],
) -> Watch:
    """Poll every 50 ms until KAYA_EVENTS holds `events` (and the consumers have them all)."""
    nc = await connect(url, "bench-relay-watch")
    probe = Probe(nc)
    watch = Watch()
    start = time.monotonic()
    exited = False
    try:
        while True:
            tick = time.monotonic()
            relay_done = watch.done_state is not None
            calls: list[Any] = [probe.stream()]
            if consumers:
                calls += [probe.view(), probe.ack_floor("notifications")]
            answers = await asyncio.gather(*calls)
            state = answers[0]
            progress: dict[str, int | None] = {}
            if consumers:
                view = answers[1]
                progress = {
                    "analytics": int(view["position"]) if view else None,
                    "notifications": answers[2],
                }
            poll = Poll(
                t=time.monotonic(),
                wall=time.time(),
                messages=int(state["messages"]) if state else 0,
                consumers=progress,
                cpu=sample_cpu(cpu_pids),
            )
            watch.polls.append(poll)
            if not relay_done and poll.messages >= events:
                watch.done_state = state
            consumers_done = all((v or 0) >= events for v in progress.values())
            if watch.done_state is not None and consumers_done:
                watch.stopped_because = "done"
                break
            elapsed = poll.t - start
            if watch.done_state is None and elapsed > relay_timeout:
                watch.stopped_because = f"relay timeout ({relay_timeout:g} s)"
                break
            if elapsed > total_timeout:
                watch.stopped_because = f"consumers timeout ({total_timeout:g} s)"
                break
            if not alive():  # one more poll: it may have exited right after its last ack
                if exited:
                    watch.stopped_because = "process exited"
                    break
                exited = True
            await asyncio.sleep(max(0.0, STREAM_POLL - (time.monotonic() - tick)))
    finally:
        await nc.close()
    return watch


def relay_figures(events: int, watch: Watch, spawn_wall: float) -> dict[str, Any]:
    """events/s on the server's clock and as polled, start-up, CPU and consumer catch-up."""
    polls = watch.polls
    out: dict[str, Any] = {
        "events": events,
        "completed": watch.done_state is not None,
        "stopped_because": watch.stopped_because,
        "reached": max((p.messages for p in polls), default=0),
        "polls": len(polls),
    }
    first = next((p for p in polls if p.messages > 0), None)
    done = next((p for p in polls if p.messages >= events), None)
    first_ts = math.nan
    if watch.done_state is not None:
        first_ts = parse_ts(watch.done_state["first_ts"])
        span = parse_ts(watch.done_state["last_ts"]) - first_ts
        out["server_span_s"] = round(span, 4)
        out["throughput"] = (events - 1) / span if span > 0 else math.nan
        out["spawn_to_first_event_s"] = round(first_ts - spawn_wall, 3)
        out["stream_bytes"] = watch.done_state.get("bytes")
    else:
        out["throughput"] = math.nan
    if first is not None and done is not None and done.t > first.t:
        out["throughput_polled"] = (events - first.messages) / (done.t - first.t)
        out["spawn_to_done_s"] = round(done.wall - spawn_wall, 3)
        out["cpu_share"] = cpu_share(first.cpu, done.cpu, done.t - first.t)
    else:
        out["throughput_polled"] = math.nan
        out["cpu_share"] = {}
    if polls and polls[0].consumers:
        out["consumers"] = {
            name: _catch_up(name, events, polls, done, first_ts) for name in polls[0].consumers
        }
        last = next((p for p in reversed(polls) if p.consumers), None)
        if done is not None and last is not None and last.t > done.t:
            out["cpu_share_after_relay"] = cpu_share(done.cpu, last.cpu, last.t - done.t)
    out["progress"] = _progress(polls, spawn_wall)
    return out


def _catch_up(
    name: str, events: int, polls: list[Poll], relay_done: Poll | None, first_ts: float
) -> dict[str, Any]:
    reached = next((p for p in polls if (p.consumers.get(name) or 0) >= events), None)
    out: dict[str, Any] = {
        "completed": reached is not None,
        "reached": max((p.consumers.get(name) or 0 for p in polls), default=0),
    }
    if reached is None or math.isnan(first_ts):
        return out
    seconds = reached.wall - first_ts
    out["seconds_from_first_event"] = round(seconds, 3)
    out["events_per_s"] = events / seconds if seconds > 0 else math.nan
    if relay_done is not None:
        behind = events - (relay_done.consumers.get(name) or 0)
        after = reached.t - relay_done.t
        out["behind_when_relay_done"] = behind
        out["seconds_after_relay_done"] = round(after, 3)
        if behind > 0 and after > 0:
            out["events_per_s_after_relay_done"] = behind / after
    return out


def _progress(polls: list[Poll], spawn_wall: float) -> list[list[Any]]:
    """[seconds since spawn, messages in the stream, consumer positions...], thinned out."""
    step = max(1, math.ceil(len(polls) / MAX_PROGRESS_POINTS))
    chosen = polls[::step] + ([polls[-1]] if polls and (len(polls) - 1) % step else [])
    return [[round(p.wall - spawn_wall, 3), p.messages, *p.consumers.values()] for p in chosen]


# ---- part 1: the raw baseline publisher (its own process) --------------------------------


async def publish_raw(
    url: str, store_path: Path, events: int, window: int, *, lean: bool
) -> dict[str, Any]:
    """Publish the store's first `events` events to a fresh KAYA_EVENTS, `window` acks pending.

    Subjects, bodies and headers are built before the clock starts, with the relay's own
    `event_headers`, so the messages are the ones the relay sends. Two ways:
    `lean` is plain `nc.publish` with a reply subject under one inbox, one wildcard
    subscription for every ack and a sliding window (the least work per message this
    client allows); otherwise nats-py's stock `js.publish_async` (a future per message,
    `json.loads` per ack).
    """
    from kaya.actors.wire import event_headers, event_subject
    from kaya.app.broker.streams import ensure_streams
    from kaya.app.config import EventsConfig
    from kaya.store import open_event_store

    messages: list[tuple[str, bytes, dict[str, str]]] = []
    async with open_event_store(store_path, readonly=True) as store:
        after = 0
        while len(messages) < events:
            page = await store.read_all(after, 10_000)
            if not page:
                break
            messages += [
                (event_subject(e.entity, e.entity_id), e.data, event_headers(e)) for e in page
            ]
            after = page[-1].position
    if len(messages) < events:
        raise BenchError(f"the store holds {len(messages)} events, wanted {events}")
    del messages[events:]
    nc = await connect(url, "bench-raw-publisher")
    try:
        js = nc.jetstream(publish_async_max_pending=window)
        await ensure_streams(js, EventsConfig())
        if lean:
            t0, t_sent, t1, errors, duplicates = await _publish_lean(nc, messages, window)
        else:
            t0 = time.perf_counter()
            futures = [await js.publish_async(s, d, headers=h) for s, d, h in messages]
            t_sent = time.perf_counter()
            acks = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), timeout=60 + events / 1000
            )
            t1 = time.perf_counter()
            errors = Counter(type(a).__name__ for a in acks if isinstance(a, BaseException))
            duplicates = sum(1 for a in acks if not isinstance(a, BaseException) and a.duplicate)
    finally:
        await nc.close()
    return {
        "mode": "lean" if lean else "publish_async",
        "published": events,
        "seconds": t1 - t0,
        "throughput_client": events / (t1 - t0),
        "last_publish_after_s": t_sent - t0,
        "ack_errors": dict(errors),
        "duplicates": duplicates,
        "mean_body_bytes": sum(len(d) for _, d, _ in messages) / events,
        "mean_header_count": sum(len(h) for _, _, h in messages) / events,
    }


async def _publish_lean(
    nc: Any, messages: list[tuple[str, bytes, dict[str, str]]], window: int
) -> tuple[float, float, float, Counter[str], int]:
    """Sliding window of plain publishes; an ack is only checked for an error, not decoded."""
    inbox = f"_INBOX.bench-lean.{nc._nuid.next().decode()}"
    slots = asyncio.Semaphore(window)
    errors: Counter[str] = Counter()
    duplicates = acked = 0
    all_acked = asyncio.Event()
    total = len(messages)

    async def on_ack(msg: Any) -> None:
        nonlocal acked, duplicates
        if msg.headers and msg.headers.get("Status"):
            errors[f"status {msg.headers.get('Status')}"] += 1
        elif b'"error"' in msg.data:
            errors["error"] += 1
        elif b'"duplicate"' in msg.data:
            duplicates += 1
        acked += 1
        slots.release()
        if acked == total:
            all_acked.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    publish = nc.publish
    t0 = time.perf_counter()
    for i, (subject, data, headers) in enumerate(messages):
        await slots.acquire()
        await publish(subject, data, reply=f"{inbox}.{i}", headers=headers)
    t_sent = time.perf_counter()
    await asyncio.wait_for(all_acked.wait(), timeout=60 + total / 1000)
    t1 = time.perf_counter()
    await sub.unsubscribe()
    return t0, t_sent, t1, errors, duplicates


def publisher_main(args: argparse.Namespace) -> int:
    import uvloop

    result = uvloop.run(
        publish_raw(args.url, Path(args.store), args.events, args.window, lean=args.lean)
    )
    fw.emit_result(result)
    return 0


# ---- part 1: a node without consumers (its own process) --------------------------------------


def solo_node_main(config_path: str) -> int:
    """`kaya run` minus the consumers: what the relay does with the event loop to itself.

    It mirrors app/cli/node.py's `kaya run` (uvloop, the switch interval, the ready line,
    SIGTERM handling) and passes `consumers=` to `open_node`, an extension point
    the node already has. Diagnostic only: the figure to quote is the `relay` one.
    """
    import anyio

    async def run() -> None:
        from kaya.app.config import load_config
        from kaya.app.node import open_node
        from kaya.app.observability.logs import configure_logging

        config = load_config(config_path)
        configure_logging(level=config.log.level, fmt=config.log.format, node=config.node.name)
        sys.setswitchinterval(0.0005)  # as `kaya run` does
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_node(config, make_app(consumers=[])) as node:
                print(f"bench solo node ready on {node.url}", flush=True)
                async for _ in signals:
                    break

    anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


# ---- processes -----------------------------------------------------------------------------


@dataclass
class NodeHandle:
    child: Child
    url: str
    spawn_wall: float
    server_pids: list[int]
    info: dict[str, Any]

    def cpu_pids(self) -> dict[str, int]:
        pids = {"node": self.child.pid}
        if len(self.server_pids) == 1:
            pids["nats_server"] = self.server_pids[0]
        return pids


@contextlib.contextmanager
def running_node(
    workdir: Path, data_dir: Path, name: str, *, solo: bool, extra_config: str = ""
) -> Iterator[NodeHandle]:
    """A node (`kaya run`, or the solo runner) on a free port; stopped by PID on the way out.

    Yields once its nats-server accepts connections, which is before `ready`: the relay
    starts publishing before the ingress is up, so part 1 must not wait for `ready`.
    """
    port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(
        NODE_CONFIG.format(data_dir=data_dir, port=port, sync_always=SYNC_ALWAYS[0]) + extra_config
    )
    if solo:
        argv = [sys.executable, "-m", "bench.relay", "--solo-node", str(config)]
    else:
        kaya = str(Path(sys.executable).parent / "kaya")
        argv = [kaya, "run", "--config", str(config), "--app", "examples.bank:app"]
    log = workdir / f"{name}.log"
    info: dict[str, Any] = {}
    spawn_wall = time.time()
    child = Child(name, argv, log)
    handle = NodeHandle(child, f"nats://127.0.0.1:{port}", spawn_wall, [], info)
    try:
        wait_for_port(port, timeout=60, process=child.process)
        handle.server_pids = child_pids(child.pid)
        yield handle
    finally:
        pids = handle.server_pids or child_pids(child.pid)
        t0 = time.monotonic()
        info["node_exit_code"] = child.stop(timeout=30)
        info["stop_s"] = round(time.monotonic() - t0, 3)
        if info["node_exit_code"] != 0:
            info["node_stderr_tail"] = child.stderr_tail()
        info["node_stderr"] = stderr_lines(log)
        info["server_left_behind"] = [pid for pid in pids if ensure_gone(pid)]


def copy_store(prefill: Path, data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    for suffix in ("", "-wal", "-shm"):
        source = prefill.with_name(prefill.name + suffix)
        if source.exists():
            shutil.copy2(source, data_dir / f"kaya.db{suffix}")


# ---- part 1: rounds --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    events: int
    window: int
    rounds: int
    scenarios: tuple[str, ...]
    relay_timeout: float
    catchup_timeout: float
    lag: bool
    rate: float | None
    peak_fraction: float
    peak_duration: float
    duration: float
    warmup: float
    accounts: int
    sample_interval: float
    drain_timeout: float
    request_timeout: float
    max_inflight: int
    keep_data: bool


def raw_round(
    settings: Settings, prefill: Path, workdir: Path, number: int, *, lean: bool
) -> dict[str, Any]:
    """nats-server (the node's config) + the raw publisher, each its own process."""
    scenario = "raw-lean" if lean else "raw"
    rundir = workdir / f"{scenario}-{number}"
    rundir.mkdir()
    out: dict[str, Any] = {"scenario": scenario, "round": number}
    with nats_server(rundir, rundir / "nats") as server:
        spawn_wall = time.time()
        argv = fw.module_argv(
            "bench.relay",
            "--publisher",
            url=server.url,
            store=prefill,
            events=settings.events,
            window=settings.window,
            lean=lean,
        )
        publisher = Child("publisher", argv, rundir / "publisher.log")
        try:
            proc = publisher.process
            watch = asyncio.run(
                watch_stream(
                    server.url,
                    settings.events,
                    relay_timeout=settings.relay_timeout,
                    total_timeout=settings.relay_timeout,
                    cpu_pids={"publisher": publisher.pid, **server.cpu_pids},
                    consumers=False,
                    alive=lambda: proc.poll() is None,
                )
            )
            out.update(relay_figures(settings.events, watch, spawn_wall))
            out["publisher"] = fw.read_result(publisher, timeout=60)
        finally:
            publisher.stop()
    return out


def relay_round(
    settings: Settings, prefill: Path, workdir: Path, number: int, *, solo: bool
) -> dict[str, Any]:
    """A node on a copy of the pre-filled store: time the relay, then the consumers' catch-up."""
    scenario = "relay-solo" if solo else "relay"
    rundir = workdir / f"{scenario}-{number}"
    rundir.mkdir()
    data_dir = rundir / "data"
    copy_store(prefill, data_dir)
    out: dict[str, Any] = {"scenario": scenario, "round": number}
    with running_node(rundir, data_dir, "node", solo=solo) as node:
        proc = node.child.process
        watch = asyncio.run(
            watch_stream(
                node.url,
                settings.events,
                relay_timeout=settings.relay_timeout,
                total_timeout=settings.relay_timeout + settings.catchup_timeout,
                cpu_pids=node.cpu_pids(),
                consumers=not solo,
                alive=lambda: proc.poll() is None,
            )
        )
        out.update(relay_figures(settings.events, watch, node.spawn_wall))
    out.update(node.info)
    return out


# ---- part 2: the open-loop generator (its own process) ----------------------------------------


@dataclass(frozen=True)
class OpenLoopSettings:
    url: str
    accounts: int
    rate: float
    duration: float
    timeout: float
    max_inflight: int
    seed: int
    out: Path


async def generate_open_loop(s: OpenLoopSettings) -> dict[str, Any]:
    """Deposits at a constant rate, whatever the replies do (open loop), up to a bounded
    number in flight; the time of every successful reply is kept (CLOCK_MONOTONIC, which
    the benchmark process shares) so the lag of each acknowledged deposit can be found."""
    import nats.errors

    nc = await connect(s.url, "bench-relay-generator")
    subjects = [command_subject(i) for i in range(s.accounts)]
    pick = random.Random(s.seed).randrange
    clock = time.monotonic_ns
    reply_ns: list[int] = []
    latencies: list[int] = []
    codes: Counter[str] = Counter()
    inflight = 0
    scheduled = skipped = 0
    tasks: set[asyncio.Future[None]] = set()

    async def one(subject: str) -> None:
        nonlocal inflight
        t0 = clock()
        try:
            msg = await nc.request(subject, DEPOSIT, timeout=s.timeout)
        except nats.errors.NoRespondersError:
            code = "no_responders"
        except (nats.errors.TimeoutError, TimeoutError):
            code = "client_timeout"
        except nats.errors.Error as exc:
            code = type(exc).__name__
        else:
            code = reply_code(msg.data)
        finally:
            inflight -= 1
        t1 = clock()
        codes[code] += 1
        if code == "ok":
            reply_ns.append(t1)
            latencies.append(t1 - t0)

    start = clock()
    end = start + int(s.duration * 1e9)
    print(f"{WINDOW_START} {start}", flush=True)
    try:
        while (now := clock()) < end:
            due = int((now - start) * s.rate / 1e9)
            while scheduled + skipped < due:
                if inflight >= s.max_inflight:  # the node is far behind: count, do not queue
                    skipped += due - scheduled - skipped
                    break
                inflight += 1
                scheduled += 1
                task = asyncio.ensure_future(one(subjects[pick(s.accounts)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.002)
        print(WINDOW_END, flush=True)
        if tasks:
            await asyncio.wait(set(tasks), timeout=s.timeout + 5)
    finally:
        unanswered = len(tasks)
        for pending in list(tasks):
            pending.cancel()
        await nc.close()
    reply_ns.sort()
    ms = sorted(x / 1e6 for x in latencies)
    result: dict[str, Any] = {
        "start_ns": start,
        "end_ns": end,
        "rate": s.rate,
        "scheduled": scheduled,
        "skipped_inflight_cap": skipped,
        "ok": codes.get("ok", 0),
        "achieved_rate": codes.get("ok", 0) / s.duration,
        "errors": {c: n for c, n in sorted(codes.items()) if c != "ok"},
        "unanswered": unanswered,
        "command_latency_ms": {
            "p50": percentile(ms, 50),
            "p99": percentile(ms, 99),
            "max": ms[-1] if ms else math.nan,
        },
        "reply_ns": reply_ns,
    }
    s.out.write_bytes(orjson.dumps(result))
    return result


def generator_main(args: argparse.Namespace) -> int:
    import uvloop

    settings = OpenLoopSettings(
        url=args.url,
        accounts=args.accounts,
        rate=args.rate,
        duration=args.duration,
        timeout=args.request_timeout,
        max_inflight=args.max_inflight,
        seed=args.seed,
        out=Path(args.out),
    )
    result = uvloop.run(generate_open_loop(settings))
    print(f"{RESULT_PREFIX}ok={result['ok']}", flush=True)
    return 0


# ---- part 2: peak, then lag ------------------------------------------------------------------


def peak_run(settings: Settings, workdir: Path) -> dict[str, Any]:
    """A fresh node's closed-loop peak, with bench/e2e.py's generator (100 in flight)."""
    rundir = workdir / "peak"
    rundir.mkdir()
    e2e = E2ESettings(
        accounts=settings.accounts,
        inflight=100,
        duration=settings.peak_duration,
        warmup=1.0,
        rounds=1,
        timeout=settings.request_timeout,
        scenarios=("kaya",),
        keep_data=False,
    )
    out: dict[str, Any] = {"inflight": e2e.inflight, "duration": e2e.duration}
    with running_node(rundir, rundir / "data", "node", solo=False) as node:
        node.child.wait_for_line("ready", timeout=60)
        asyncio.run(open_accounts(node.url, settings.accounts))
        result = run_generator(e2e, node.url, seed=1, workdir=rundir, cpu_pids=node.cpu_pids())
    out.update(
        throughput=result["throughput"],
        latency_ms=result["latency_ms"],
        errors=result["errors"],
        cpu_share=result["cpu_share"],
        **node.info,
    )
    return out


@dataclass
class LagSample:
    t_ns: int
    deposits: int | None
    messages: int | None
    cpu: dict[str, float]


async def sample_lag(
    settings: Settings, node: NodeHandle, rate: float, rundir: Path
) -> tuple[list[LagSample], dict[str, Any], int, int]:
    """Start the generator, then sample the view and the stream until they show every deposit."""
    nc = await connect(node.url, "bench-relay-lag")
    probe = Probe(nc)
    cpu_pids = node.cpu_pids()  # the generator joins once it runs

    async def take() -> LagSample:
        view, state = await asyncio.gather(probe.view(), probe.stream())
        return LagSample(
            t_ns=time.monotonic_ns(),
            deposits=int(view["operations"]["deposits"]) if view else None,
            messages=int(state["messages"]) if state else None,
            cpu=sample_cpu(cpu_pids),
        )

    samples: list[LagSample] = []
    generator: Child | None = None
    result: dict[str, Any] | None = None
    out_path = rundir / "generator.json"
    try:
        base = await take()
        if base.deposits is None or base.messages is None:
            raise BenchError("kaya.view.analytics or KAYA_EVENTS did not answer before the load")
        generator = Child(
            "generator",
            [
                sys.executable,
                "-m",
                "bench.relay",
                "--generator",
                "--url",
                node.url,
                "--accounts",
                str(settings.accounts),
                "--rate",
                str(rate),
                "--duration",
                str(settings.duration),
                "--request-timeout",
                str(settings.request_timeout),
                "--max-inflight",
                str(settings.max_inflight),
                "--out",
                str(out_path),
            ],
            rundir / "generator.log",
        )
        cpu_pids["generator"] = generator.pid
        hard_stop = time.monotonic() + settings.duration + settings.request_timeout + 60
        drain_until = math.inf
        while time.monotonic() < min(hard_stop, drain_until):
            tick = time.monotonic()
            sample = await take()
            samples.append(sample)
            if result is None and generator.process.poll() is not None:
                generator.wait(timeout=5)
                if generator.process.returncode != 0 or not out_path.exists():
                    raise BenchError(
                        f"generator exited with {generator.process.returncode}: "
                        f"{generator.stderr_tail()}"
                    )
                result = orjson.loads(out_path.read_bytes())
                drain_until = time.monotonic() + settings.drain_timeout
            if result is not None:
                target_d = base.deposits + result["ok"]
                target_m = base.messages + result["ok"]
                if (sample.deposits or 0) >= target_d and (sample.messages or 0) >= target_m:
                    break
            await asyncio.sleep(max(0.0, settings.sample_interval - (time.monotonic() - tick)))
        if result is None:
            raise BenchError(f"generator did not finish: {generator.stderr_tail()}")
    finally:
        if generator is not None:
            generator.stop()
        await nc.close()
    return samples, result, base.deposits, base.messages


def lag_figures(
    reply_ns: Sequence[int],
    samples: Sequence[LagSample],
    attr: str,
    base: int,
    from_ns: int,
) -> dict[str, Any]:
    """For the k-th acknowledged deposit (reply at t_k): the first sample at or after t_k that
    shows >= base + k; its time minus t_k is the lag (an upper bound, within one sampling
    interval); the sample before it had not shown it yet, which gives a lower bound."""
    seen = [(s.t_ns, getattr(s, attr)) for s in samples if getattr(s, attr) is not None]
    times = [t for t, _ in seen]
    shown: list[int] = []
    for _, value in seen:  # never decreases; a running max guards the bisect anyway
        shown.append(max(value, shown[-1]) if shown else value)
    upper: list[float] = []
    lower: list[float] = []
    unresolved = 0
    for k, t in enumerate(reply_ns, start=1):
        if t < from_ns:
            continue
        i = max(bisect.bisect_left(times, t), bisect.bisect_left(shown, base + k))
        if i >= len(times):
            unresolved += 1
            continue
        upper.append((times[i] - t) / 1e6)
        lower.append(max(0, times[i - 1] - t) / 1e6 if i > 0 else 0.0)
    upper.sort()
    lower.sort()
    return {
        "deposits": len(upper),
        "unresolved": unresolved,
        "p50": percentile(upper, 50),
        "p90": percentile(upper, 90),
        "p99": percentile(upper, 99),
        "max": upper[-1] if upper else math.nan,
        "mean": sum(upper) / len(upper) if upper else math.nan,
        "lower_bound_p50": percentile(lower, 50),
        "lower_bound_p99": percentile(lower, 99),
    }


def lag_run(settings: Settings, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rate = settings.rate
    if rate is None:
        fw.say("lag: measuring the peak ...")
        out["peak"] = peak_run(settings, workdir)
        rate = max(1.0, round(out["peak"]["throughput"] * settings.peak_fraction))
    out["rate"] = rate
    fw.say(f"lag: {rate:,.0f} deposits/s for {settings.duration:g} s ...")
    rundir = workdir / "lag"
    rundir.mkdir()
    with running_node(rundir, rundir / "data", "node", solo=False) as node:
        node.child.wait_for_line("ready", timeout=60)
        t0 = time.monotonic()
        asyncio.run(open_accounts(node.url, settings.accounts))
        asyncio.run(wait_for_view(node.url, settings.accounts, timeout=60))
        out["open_and_project_s"] = round(time.monotonic() - t0, 3)
        samples, result, base_deposits, base_messages = asyncio.run(
            sample_lag(settings, node, rate, rundir)
        )
    out.update(node.info)
    reply_ns: list[int] = result.pop("reply_ns")
    from_ns = result["start_ns"] + int(settings.warmup * 1e9)
    out["generator"] = result
    out["samples"] = len(samples)
    out["sample_interval_s"] = settings.sample_interval
    out["view_lag_ms"] = lag_figures(reply_ns, samples, "deposits", base_deposits, from_ns)
    out["relay_lag_ms"] = lag_figures(reply_ns, samples, "messages", base_messages, from_ns)
    out["view_failures"] = sum(1 for s in samples if s.deposits is None)
    window = [s for s in samples if result["start_ns"] <= s.t_ns <= result["end_ns"]]
    if len(window) >= 2:
        a, b = window[0], window[-1]
        out["cpu_share"] = cpu_share(a.cpu, b.cpu, (b.t_ns - a.t_ns) / 1e9)
    last = samples[-1] if samples else None
    out["caught_up"] = bool(
        last is not None
        and (last.deposits or 0) >= base_deposits + result["ok"]
        and (last.messages or 0) >= base_messages + result["ok"]
    )
    return out


async def wait_for_view(url: str, accounts: int, timeout: float) -> None:
    """Until the analytics view has counted every opened account (consumers idle again)."""
    nc = await connect(url, "bench-relay-setup")
    probe = Probe(nc)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            view = await probe.view()
            if view and int(view["accounts"]["opened"]) >= accounts:
                return
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    raise BenchError(f"analytics did not count {accounts} opened accounts in {timeout:g} s")


# ---- summary and output ------------------------------------------------------------------------


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rounds:
        by.setdefault(r["scenario"], []).append(r)
    out: dict[str, Any] = {
        name: {
            "rounds": len(rs),
            "completed": all(r["completed"] for r in rs),
            "throughput": spread([r["throughput"] for r in rs]),
            "throughput_polled": spread([r["throughput_polled"] for r in rs]),
        }
        for name, rs in by.items()
    }
    if "relay" in by:
        for consumer in CONSUMERS:
            rates = [r["consumers"][consumer].get("events_per_s", math.nan) for r in by["relay"]]
            out["relay"][f"{consumer}_catch_up_per_s"] = spread(rates)
    for name in ("relay", "relay-solo"):
        for baseline in ("raw", "raw-lean"):
            if baseline in by and name in by:
                pairs = list(zip(by[baseline], by[name], strict=False))
                raw = out[baseline]["throughput"]["median"]
                out[f"{name}/{baseline}"] = {
                    "throughput": out[name]["throughput"]["median"] / raw,
                    "per_round": [b["throughput"] / a["throughput"] for a, b in pairs],
                }
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's relay target: the relay at >= 80% of raw `publish_async`, same run."""
    summary = results.get("summary", {})
    out = []
    for name, what in (("relay-solo", "relay alone"), ("relay", "relay beside both consumers")):
        if name in summary and "raw" in summary:
            out.append(
                target(
                    f"relay: {what} vs raw publish_async",
                    summary[name]["throughput"]["median"],
                    summary["raw"]["throughput"]["median"],
                    0.8,
                )
            )
    return out


def chart(results: dict[str, Any]) -> list[str]:
    summary = results.get("summary", {})
    m, v = results["machine"], results["versions"]
    note = f"{results['settings']['events']:,} events; {m['nproc']} cores, git {v['git']}"
    paths = []
    bars = {
        name: summary[name]["throughput"]
        for name in ("raw", "raw-lean", "relay-solo", "relay")
        if name in summary
    }
    if bars:
        paths.append(
            bar_chart("relay-throughput", "Events/s into KAYA_EVENTS", "events/s", bars, note=note)
        )
    lag = results.get("lag")
    if lag:
        series = {
            f"{what} lag": [(q, lag[key][f"p{q}"]) for q in (50, 90, 99)]
            for what, key in (("read model", "view_lag_ms"), ("relay", "relay_lag_ms"))
        }
        paths.append(
            line_chart(
                "relay-lag",
                f"Lag behind the reply at {lag['rate']:,.0f} deposits/s",
                "percentile",
                "ms",
                series,
                note=f"{m['nproc']} cores, git {v['git']}",
            )
        )
    return [str(p) for p in paths if p is not None]


def _cpu_text(cpu: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in cpu.items()) or "-"


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"relay: {m['nproc']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"{v['nats-server']}, nats-py {v['nats-py']}, msgspec {v['msgspec']}, git {v['git']}",
    ]
    rounds = results.get("rounds", [])
    if rounds:
        pre = results["prefill"]
        lines += [
            f"part 1: {pre['events']:,} account events in {pre['accounts']:,} streams, "
            f"pre-filled in {pre['seconds']:.1f} s; raw window {s['window']}, node defaults "
            f"(relay batch 1000)",
            "",
            f"{'round':<6}{'scenario':<12}{'events/s':>10}{'polled/s':>10}{'span s':>8}"
            f"{'start s':>9}  cpu in cores over the publishing (x_loop: main thread)",
        ]
        for r in rounds:
            start = r.get("spawn_to_first_event_s", math.nan)
            lines.append(
                f"{r['round']:<6}{r['scenario']:<12}{r['throughput']:>10,.0f}"
                f"{r['throughput_polled']:>10,.0f}{r.get('server_span_s', math.nan):>8.2f}"
                f"{start:>9.2f}  {_cpu_text(r['cpu_share'])}"
                + ("" if r["completed"] else f"  INCOMPLETE: {r['stopped_because']}")
            )
        summary = results["summary"]
        lines += ["", "median (min-max) over rounds, events/s on the stream's clock:"]
        for name in ("raw", "raw-lean", "relay", "relay-solo"):
            if name in summary:
                t = summary[name]["throughput"]
                lines.append(f"  {name:<11} {t['median']:,.0f} ({t['min']:,.0f}-{t['max']:,.0f})")
        for name in ("relay", "relay-solo"):
            for baseline in ("raw", "raw-lean"):
                key = f"{name}/{baseline}"
                if key in summary:
                    ratio = summary[key]
                    per = ", ".join(f"{x:.2f}" for x in ratio["per_round"])
                    target = " (target >= 0.80)" if name == "relay" else ""
                    lines.append(
                        f"  {key + ':':<21} {ratio['throughput']:.2f}{target}; per round {per}"
                    )
        for r in (r for r in rounds if r["scenario"] == "relay"):
            parts = []
            for name, c in r.get("consumers", {}).items():
                if c.get("completed"):
                    after = c.get("events_per_s_after_relay_done")
                    parts.append(
                        f"{name} {c['seconds_from_first_event']:.1f} s "
                        f"({c['events_per_s']:,.0f}/s"
                        + (f"; {after:,.0f}/s after the relay finished" if after else "")
                        + ")"
                    )
                else:
                    parts.append(f"{name} INCOMPLETE at {c['reached']:,}")
            lines.append(f"  catch-up round {r['round']}, from the first event: {', '.join(parts)}")
            if r.get("cpu_share_after_relay"):
                lines.append(
                    f"    cpu while only consumers ran: {_cpu_text(r['cpu_share_after_relay'])}"
                )
    lag = results.get("lag")
    if lag:
        g = lag["generator"]
        lines += [""]
        if "peak" in lag:
            p = lag["peak"]
            lines.append(
                f"part 2: peak {p['throughput']:,.0f} req/s (closed loop, {p['inflight']} in "
                f"flight, {p['duration']:g} s, p99 {p['latency_ms']['p99']:.1f} ms); "
                f"load {s['peak_fraction']:.0%} of it"
            )
        errors = " ".join(f"{k}={n}" for k, n in g["errors"].items()) or "none"
        lines.append(
            f"part 2: open loop {lag['rate']:,.0f} deposits/s for {s['duration']:g} s to "
            f"{s['accounts']} accounts: {g['achieved_rate']:,.0f}/s acknowledged, "
            f"errors {errors}, skipped {g['skipped_inflight_cap']}; command p50 "
            f"{g['command_latency_ms']['p50']:.2f} ms, p99 {g['command_latency_ms']['p99']:.2f} ms"
        )
        for key, what in (
            ("view_lag_ms", "reply -> kaya.view.analytics shows it"),
            ("relay_lag_ms", "reply -> KAYA_EVENTS holds it"),
        ):
            x = lag[key]
            lines.append(
                f"  {what}: p50 {x['p50']:.0f} ms, p90 {x['p90']:.0f}, p99 {x['p99']:.0f}, "
                f"max {x['max']:.0f} (lower bounds p50 {x['lower_bound_p50']:.0f}, "
                f"p99 {x['lower_bound_p99']:.0f}; {x['deposits']:,} deposits"
                + (f", {x['unresolved']} never shown" if x["unresolved"] else "")
                + ")"
            )
        lines.append(
            f"  sampled every {lag['sample_interval_s'] * 1000:.0f} ms ({lag['samples']} "
            f"samples, first {s['warmup']:g} s excluded); caught up: "
            f"{str(lag['caught_up']).lower()}; cpu {_cpu_text(lag.get('cpu_share', {}))}"
        )
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def render_with_targets(results: dict[str, Any]) -> str:
    text = render(results)
    if results["targets"]:
        text += "\n\ntargets:\n" + render_targets(results["targets"])
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.relay",
        description="Outbox relay vs raw publish_async, consumers' catch-up, read-model lag.",
    )
    fw.add_options(
        parser,
        quick="50k events, 5 s of load",
        rounds="rounds of each part-1 scenario (default 1)",
        duration="part 2 load seconds (default 15; quick 5)",
        warmup="seconds left out of the lag (default 1)",
        only="run one part: relay or lag",
        keep_data="keep the work directory",
    )
    parser.add_argument("--events", type=int, help="pre-filled events (default 200k; quick 50k)")
    parser.add_argument("--window", type=int, default=1000, help="raw publisher's acks pending")
    parser.add_argument(
        "--no-solo", action="store_true", help="skip the relay-solo scenario (consumers off)"
    )
    parser.add_argument("--timeout", type=float, help="relay timeout, s (default 60 + N/2000)")
    parser.add_argument(
        "--catchup-timeout", type=float, help="consumers' timeout after it (default 60 + N/1000)"
    )
    parser.add_argument("--rate", type=float, help="deposits/s for part 2 (default: half the peak)")
    parser.add_argument("--peak-fraction", type=float, default=0.5, help="of the peak, as load")
    parser.add_argument("--accounts", type=int, default=1000, help="accounts in part 2")
    parser.add_argument(
        "--sample-interval", type=float, default=0.1, help="view sampling period, s"
    )
    parser.add_argument("--max-inflight", type=int, default=5000, help="open-loop in-flight cap")
    parser.add_argument(
        "--sync-always",
        action="store_true",
        help="the node's nats-server fsyncs every write (sync_interval: always)",
    )
    internal = parser.add_argument_group("child processes (internal)")
    internal.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--lean", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--solo-node", metavar="CONFIG", help=argparse.SUPPRESS)
    internal.add_argument("--url", help=argparse.SUPPRESS)
    internal.add_argument("--store", help=argparse.SUPPRESS)
    internal.add_argument("--out", help=argparse.SUPPRESS)
    internal.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    internal.add_argument("--request-timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    return parser


def _resolve(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    events = fw.pick(args.events, quick, 50_000, 200_000)
    parts = fw.parse_only(args.only, ("relay", "lag"), ("relay", "lag"))
    scenarios = ("raw", "raw-lean", "relay") + (() if args.no_solo else ("relay-solo",))
    settings = Settings(
        events=events,
        window=args.window,
        rounds=fw.pick(args.rounds, quick, 1, 1),
        scenarios=scenarios if "relay" in parts else (),
        relay_timeout=args.timeout or 60 + events / 2000,
        catchup_timeout=args.catchup_timeout or 60 + events / 1000,
        lag="lag" in parts,
        rate=args.rate,
        peak_fraction=args.peak_fraction,
        peak_duration=2.0 if quick else 3.0,
        duration=fw.pick(args.duration, quick, 5.0, 15.0),
        warmup=fw.pick(args.warmup, quick, 1.0, 1.0),
        accounts=args.accounts,
        sample_interval=args.sample_interval,
        drain_timeout=30.0,
        request_timeout=args.request_timeout,
        max_inflight=args.max_inflight,
        keep_data=args.keep_data,
    )
    if settings.events < 2 or settings.window < 1 or settings.rounds < 1:
        raise SystemExit("--events must be at least 2, --window and --rounds at least 1")
    if settings.duration <= settings.warmup or settings.sample_interval <= 0:
        raise SystemExit("--duration must exceed --warmup; --sample-interval must be positive")
    if settings.rate is not None and settings.rate <= 0:
        raise SystemExit("--rate must be positive")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "sync_always", False):
        SYNC_ALWAYS[0] = "true"
    if args.solo_node:
        return solo_node_main(args.solo_node)
    if args.publisher:
        if not (args.url and args.store and args.events):
            raise SystemExit("--publisher needs --url, --store and --events")
        return publisher_main(args)
    if args.generator:
        if not (args.url and args.out and args.rate and args.duration):
            raise SystemExit("--generator needs --url, --out, --rate and --duration")
        return generator_main(args)

    settings = _resolve(args)
    fw.exit_on_sigterm()
    results = fw.new_results("relay", settings, quick=bool(args.quick))
    with fw.scratch("relay", keep=settings.keep_data) as workdir:
        if settings.scenarios:
            prefill = workdir / "prefill" / "kaya.db"
            fw.say(f"pre-filling {settings.events:,} events ...")
            results["prefill"] = asyncio.run(prefill_store(prefill, settings.events))

            def one(scenario: str, number: int) -> dict[str, Any]:
                if scenario in ("raw", "raw-lean"):
                    lean = scenario == "raw-lean"
                    return raw_round(settings, prefill, workdir, number, lean=lean)
                solo = scenario == "relay-solo"
                return relay_round(settings, prefill, workdir, number, solo=solo)

            results["rounds"] = fw.run_rounds(settings.rounds, settings.scenarios, one)
            results["summary"] = summarize(results["rounds"])
        if settings.lag:
            results["lag"] = lag_run(settings, workdir)
    results["finished_at"] = utc_now().isoformat(timespec="seconds")
    results["targets"] = targets(results)
    fw.finish(results, write=not args.no_write, render=render_with_targets, chart=chart)
    incomplete = [r for r in results.get("rounds", []) if not r["completed"]]
    lag = results.get("lag")
    return 1 if incomplete or (lag is not None and not lag["caught_up"]) else 0


if __name__ == "__main__":
    sys.exit(main())
