"""Consumer benchmark: events/s through Kaya's consumers versus raw pull fetch + ack.

    python -m bench.consumers [--quick] [--events N] [--rounds N] [--profile S] [--no-write]

Target from the benchmark-suite issue: "consumers >= 80% of raw fetch+ack".

Built once, not timed: an SQLite event store pre-filled with N `account` events
(bench/relay.py's `prefill_store`: 100 per account, Opened then Deposited), then a
node (`kaya run`, both consumers disabled) on a copy of it until its relay has put
all N on KAYA_EVENTS; the node is stopped and its data dir (kaya.db and the
embedded server's JetStream under data/nats) is the template. Every round runs on
a fresh copy of it, so every scenario reads the same stream content.

Scenarios, alternated round by round:

- `raw`: a bare nats-server on the copy's JetStream dir, with the node's own
  generated server config, and a consumer process (nats-py on uvloop, like the
  node) that creates a durable pull consumer on KAYA_EVENTS and runs stock
  `psub.fetch(batch=B)` then `await msg.ack()` for each message (explicit acks) until
  it has all N. B is Kaya's `[consumers] fetch_batch` default; the fetch timeout (1 s)
  and max_ack_pending (B) are Kaya's too. Timed by the process itself, from the first
  fetch to the last ack flushed.
- `raw-ackall`: the same with AckPolicy.ALL and one ack, of the last message, per
  batch: what Kaya does, so the like-for-like baseline.
- `kaya`: `kaya run` on the copy with both consumers (analytics, notifications) and
  `[events] relay_rewind = 0`: the relay's checkpoint is already N, so it publishes
  nothing and the consumers run alone (checked: KAYA_EVENTS's message count is
  polled and must stay N). Each consumer does what it does in production: decode
  the headers, upcast (the pre-filled `Opened` events are v1), handle, one SQLite
  transaction per batch with the checkpoint, ack; notifications also publishes one
  message per event on `kaya.notify.<owner>`.
- `kaya-analytics-only`: the same with notifications disabled: one consumer alone.
- Not run unless asked for with `--scenarios`: `kaya-notifications-only`, and
  `raw-ackall-filtered`: `raw-ackall` with the analytics consumer's filter subject
  (`kaya.evt.account.>`, which matches every event here) instead of `kaya.evt.>`: what
  that filter costs nats-server (a stream with many subjects and a wildcard filter).

The benchmark polls every 50 ms: `$JS.API.STREAM.INFO.KAYA_EVENTS` (messages),
`$JS.API.CONSUMER.INFO.KAYA_EVENTS.<name>` (ack floor) and, for Kaya,
`kaya.view.analytics` (position). A consumer's events/s is (N - p0) / (t1 - t0),
from the first poll that saw progress (t0, ack floor p0 > 0) to the first that saw
it done (t1: ack floor N and, for analytics, the view at position N too). Start-up
(node, durable consumer creation) is not in it. Afterwards the view must count N
events' worth (accounts opened, deposits) and KAYA_DLQ must be empty.

Figures:

- `events/s` per scenario and consumer, median (min-max) over rounds. For `raw` the
  process's own timing; the polled figure (same method as Kaya's) is beside it.
- `kaya` `both`: N over the time until both consumers were done: how fast an event
  gets through both. `sum`: analytics' + notifications' events/s, the work the
  node's one event loop did.
- Ratios, of medians and per round (same run, same machine): analytics alone over
  `raw-ackall` (the target), the sum of both over `raw-ackall` (target too: the
  node's loop does both), each consumer of `kaya` over `raw-ackall`, and over `raw`.
- CPU in cores between t0 and t1 (`x_loop`: the process's main thread; `foreign`:
  processes this benchmark did not start: the machine is shared).

`--profile S` runs one more, untimed `kaya` round (or `--profile-scenario`) with
`py-spy record` on the node for S seconds once the consumers are busy (keep S below
that scenario's run time), and reports, for the node's main thread, the functions with
the most samples of their own and the inclusive share of the consumer path's stages,
beside the CPU /proc measured over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import framework as fw
from bench.common import (
    BenchError,
    Child,
    fmt_spread,
    render_targets,
    spread,
    target,
    utc_now,
)
from bench.relay import (
    EVENTS_PER_ACCOUNT,
    NodeHandle,
    Probe,
    connect,
    copy_store,
    cpu_share,
    prefill_store,
    running_node,
    sample_cpu,
    watch_stream,
)
from bench.targets import nats_server
from kaya.actors.wire import DLQ_STREAM, EVENT_SUBJECTS, EVENTS_STREAM
from kaya.app.config import ConsumersConfig, NodeConfig

CONSUMERS = ("analytics", "notifications")
RAW_SCENARIOS = ("raw", "raw-ackall", "raw-ackall-filtered")
KAYA_SCENARIOS: dict[str, tuple[str, ...]] = {
    "kaya": CONSUMERS,
    "kaya-analytics-only": ("analytics",),
    "kaya-notifications-only": ("notifications",),
}
"""Kaya scenarios and the consumers each runs (the others are disabled)."""
ALL_SCENARIOS = (*RAW_SCENARIOS, *KAYA_SCENARIOS)
DEFAULT_SCENARIOS = ("raw", "raw-ackall", "kaya", "kaya-analytics-only")
ANALYTICS_FILTER = "kaya.evt.account.>"
"""The analytics consumer's filter_subject (examples/bank/analytics.py), for raw-ackall-filtered."""
RAW_DURABLE = "bench-raw"
RESULT_PREFIX = "bench-consumers-result "
GOAL = 0.8
POLL = 0.05
FETCH_TIMEOUT = 1.0
"""Seconds a fetch waits for messages: ConsumerRunner's value."""

PROFILE_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fetch (nats-py PullSubscription.fetch)", ("JetStreamContext.PullSubscription.fetch",)),
    ("  of which next_msg (a task + wait_for each)", ("Subscription.next_msg",)),
    ("ConsumerRunner._handle_batch", ("ConsumerRunner._handle_batch",)),
    ("  msg.metadata (reply subject parse)", ("Msg.metadata",)),
    ("  delivered_from (headers -> Delivered)", ("delivered_from",)),
    ("  admit (upcast, accepts)", ("admit",)),
    ("  Analytics.handle", ("Analytics.handle",)),
    ("  Notifications.handle", ("Notifications.handle",)),
    ("    of which nc.publish", ("Client.publish",)),
    ("  commit (apply_batch, awaits SQLite)", ("ConsumerRunner._commit",)),
    ("  ack", ("Msg.ack",)),
    ("nats-py read loop (parse, build Msg)", ("Client._read_loop",)),
    ("  of which header parsing", ("Client._process_headers",)),
    ("nats-py flusher (socket writes)", ("Client._flusher",)),
    ("ingress (view requests)", ("Ingress._on_request", "analytics_view")),
)
"""(label, qualified function names): the share of the main thread's samples with any of
them on the stack (inclusive, so nested stages overlap their parent)."""
PY_SPY_RATE = 100


# ---- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    events: int
    rounds: int
    scenarios: tuple[str, ...]
    fetch_batch: int
    """The raw consumer's batch: Kaya's `[consumers] fetch_batch` default."""
    timeout: float
    """Seconds a scenario may take once started, before it counts as incomplete."""
    profile_seconds: float
    profile_scenario: str
    keep_data: bool


def settings_for(
    quick: bool,
    *,
    events: int | None = None,
    rounds: int | None = None,
    scenarios: Sequence[str] | None = None,
    profile: float = 0.0,
    profile_scenario: str = "kaya",
    keep_data: bool = False,
) -> Settings:
    n = events or (20_000 if quick else 100_000)
    chosen = tuple(scenarios) if scenarios else DEFAULT_SCENARIOS
    unknown = [s for s in (*chosen, profile_scenario) if s not in ALL_SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; known: {ALL_SCENARIOS}")
    if profile_scenario not in KAYA_SCENARIOS:
        raise SystemExit("--profile-scenario must be a kaya scenario")
    settings = Settings(
        events=n,
        rounds=rounds or (1 if quick else 3),
        scenarios=chosen,
        fetch_batch=ConsumersConfig().fetch_batch,
        timeout=60 + n / 500,
        profile_seconds=profile,
        profile_scenario=profile_scenario,
        keep_data=keep_data,
    )
    if settings.events < EVENTS_PER_ACCOUNT or settings.rounds < 1 or profile < 0:
        raise SystemExit(f"--events must be at least {EVENTS_PER_ACCOUNT}, --rounds at least 1")
    return settings


# ---- polling -----------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    """time.monotonic() when the answers were in."""
    messages: int | None
    acked: dict[str, int | None]
    """Each consumer's ack floor (stream sequence)."""
    view: int | None
    """kaya.view.analytics's position, when polled and answered."""
    cpu: dict[str, float]


@dataclass
class Watch:
    samples: list[Sample] = field(default_factory=list)
    stopped_because: str = ""


async def watch_consumers(
    url: str,
    events: int,
    consumers: Sequence[str],
    *,
    view: bool,
    timeout: float,
    cpu_pids: dict[str, int],
    alive: Callable[[], bool],
    on_progress: Callable[[], None] | None = None,
) -> Watch:
    """Poll every 50 ms until every consumer's ack floor (and the view) reach `events`."""
    nc = await connect(url, "bench-consumers-watch")
    probe = Probe(nc)
    watch = Watch()
    start = time.monotonic()
    exited = False
    try:
        while True:
            tick = time.monotonic()
            calls: list[Any] = [probe.stream(), *(probe.ack_floor(c) for c in consumers)]
            if view:
                calls.append(probe.view())
            answers = await asyncio.gather(*calls)
            state = answers[0]
            answer = answers[-1] if view else None
            sample = Sample(
                t=time.monotonic(),
                messages=int(state["messages"]) if state else None,
                acked=dict(zip(consumers, answers[1 : 1 + len(consumers)], strict=True)),
                view=int(answer["position"]) if answer else None,
                cpu=sample_cpu(cpu_pids),
            )
            watch.samples.append(sample)
            if on_progress is not None and any(v for v in sample.acked.values()):
                on_progress()
                on_progress = None
            if _done(sample, events, view):
                watch.stopped_because = "done"
                break
            if sample.t - start > timeout:
                watch.stopped_because = f"timeout ({timeout:g} s)"
                break
            if not alive():  # one more poll: it may have exited right after its last ack
                if exited:
                    watch.stopped_because = "process exited"
                    break
                exited = True
            await asyncio.sleep(max(0.0, POLL - (time.monotonic() - tick)))
    finally:
        await nc.close()
    return watch


def _done(sample: Sample, events: int, view: bool) -> bool:
    acked = all((v or 0) >= events for v in sample.acked.values())
    return acked and (not view or (sample.view or 0) >= events)


def consumer_figures(
    events: int, samples: list[Sample], name: str, *, view: bool
) -> dict[str, Any]:
    """events/s of one consumer: from the first poll with progress to the first with all."""
    first = next((s for s in samples if (s.acked.get(name) or 0) > 0), None)
    done = next(
        (
            s
            for s in samples
            if (s.acked.get(name) or 0) >= events and (not view or (s.view or 0) >= events)
        ),
        None,
    )
    out: dict[str, Any] = {
        "completed": done is not None,
        "reached": max((s.acked.get(name) or 0 for s in samples), default=0),
    }
    if first is None or done is None or done.t <= first.t:
        out["events_per_s"] = math.nan
        return out
    p0 = first.acked[name] or 0
    out.update(
        first_seen_at=p0,
        seconds=round(done.t - first.t, 3),
        events_per_s=(events - p0) / (done.t - first.t),
        cpu_share=cpu_share(first.cpu, done.cpu, done.t - first.t),
    )
    return out


# ---- the template: a node's data dir whose KAYA_EVENTS holds the N events ----------------


@contextlib.contextmanager
def consumer_node(
    rundir: Path, data_dir: Path, *, rewind: float, disabled: Sequence[str]
) -> Iterator[NodeHandle]:
    """`kaya run` (bench/relay.py's `running_node`) with the relay's rewind and the
    disabled consumers set; yields once its nats-server accepts connections (the
    consumers start before the node prints `ready`)."""
    names = ", ".join(f'"{name}"' for name in disabled)
    extra = f"\n[events]\nrelay_rewind = {rewind}\n\n[consumers]\ndisabled = [{names}]\n"
    with running_node(rundir, data_dir, "node", solo=False, extra_config=extra) as handle:
        yield handle


async def _relay_checkpoint(store_path: Path) -> int:
    from kaya.store import open_event_store

    async with open_event_store(store_path, readonly=True) as store:
        return await store.checkpoint("relay")


def build_template(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Pre-fill a store, let a node without consumers publish it all; keep its data dir."""
    prefill = workdir / "prefill" / "kaya.db"
    out: dict[str, Any] = {"prefill": asyncio.run(prefill_store(prefill, settings.events))}
    rundir = workdir / "template"
    rundir.mkdir()
    data_dir = rundir / "data"
    copy_store(prefill, data_dir)
    t0 = time.monotonic()
    with consumer_node(rundir, data_dir, rewind=0.0, disabled=CONSUMERS) as node:
        proc = node.child.process
        watch = asyncio.run(
            watch_stream(
                node.url,
                settings.events,
                relay_timeout=settings.timeout,
                total_timeout=settings.timeout,
                cpu_pids={},
                consumers=False,
                alive=lambda: proc.poll() is None,
            )
        )
    if watch.done_state is None:
        raise BenchError(f"template: KAYA_EVENTS did not fill ({watch.stopped_because})")
    messages = int(watch.done_state["messages"])
    checkpoint = asyncio.run(_relay_checkpoint(data_dir / "kaya.db"))
    if messages != settings.events or checkpoint != settings.events:
        raise BenchError(
            f"template: stream holds {messages}, relay checkpoint {checkpoint}, "
            f"wanted {settings.events} (node: {node.info})"
        )
    shutil.rmtree(prefill.parent)
    out["template"] = {
        "seconds": round(time.monotonic() - t0, 3),
        "stream_messages": messages,
        "stream_bytes": watch.done_state.get("bytes"),
        "relay_checkpoint": checkpoint,
        "node_exit_code": node.info.get("node_exit_code"),
    }
    return out


def copy_template(workdir: Path, rundir: Path) -> Path:
    data_dir = rundir / "data"
    shutil.copytree(workdir / "template" / "data", data_dir)
    return data_dir


# ---- raw: stock nats-py fetch + ack in its own process ------------------------------------


async def consume_raw(
    url: str,
    events: int,
    batch: int,
    *,
    ack_all: bool,
    timeout: float,
    filter_subject: str = EVENT_SUBJECTS,
) -> dict[str, Any]:
    """A durable pull consumer on KAYA_EVENTS, fetched and acked until it has `events`."""
    import nats.errors
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await connect(url, "bench-raw-consumer")
    try:
        js = nc.jetstream()
        config = ConsumerConfig(
            durable_name=RAW_DURABLE,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.ALL if ack_all else AckPolicy.EXPLICIT,
            ack_wait=ConsumersConfig().ack_wait,
            max_ack_pending=batch,
            filter_subject=filter_subject,
        )
        psub = await js.pull_subscribe(
            filter_subject, durable=RAW_DURABLE, stream=EVENTS_STREAM, config=config
        )
        received = fetches = timeouts = last_seq = 0
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        while last_seq < events and time.monotonic() < deadline:
            try:
                msgs = await psub.fetch(batch, timeout=FETCH_TIMEOUT)
            except (nats.errors.TimeoutError, TimeoutError):
                timeouts += 1
                continue
            fetches += 1
            received += len(msgs)
            if ack_all:
                await msgs[-1].ack()
            else:
                for msg in msgs:
                    await msg.ack()
            last_seq = msgs[-1].metadata.sequence.stream
        await nc.flush()
        t1 = time.perf_counter()
    finally:
        await nc.close()
    return {
        "mode": "ack-all" if ack_all else "explicit",
        "filter_subject": filter_subject,
        "received": received,
        "last_stream_seq": last_seq,
        "fetches": fetches,
        "fetch_timeouts": timeouts,
        "seconds": t1 - t0,
        "events_per_s": received / (t1 - t0),
    }


def raw_consumer_main(args: argparse.Namespace) -> int:
    import uvloop

    result = uvloop.run(
        consume_raw(
            args.url,
            args.events,
            args.batch,
            ack_all=args.ack_all,
            timeout=args.timeout,
            filter_subject=args.filter or EVENT_SUBJECTS,
        )
    )
    fw.emit_result(result, RESULT_PREFIX)
    return 0 if result["last_stream_seq"] >= args.events else 1


def raw_round(settings: Settings, workdir: Path, scenario: str, number: int) -> dict[str, Any]:
    """A bare nats-server (the node's config) on a copy of the template's JetStream, and
    the raw consumer process."""
    rundir = workdir / f"{scenario}-{number}"
    rundir.mkdir()
    data_dir = copy_template(workdir, rundir)
    out: dict[str, Any] = {"scenario": scenario, "round": number}
    with nats_server(rundir, data_dir / "nats", name=NodeConfig().name) as server:
        messages = asyncio.run(_stream_messages(server.url))
        if messages != settings.events:
            raise BenchError(f"{scenario}: the copied stream holds {messages} messages")
        argv = fw.module_argv(
            "bench.consumers",
            "--raw-consumer",
            url=server.url,
            events=settings.events,
            batch=settings.fetch_batch,
            timeout=settings.timeout,
            ack_all=scenario != "raw",
            filter=ANALYTICS_FILTER if scenario == "raw-ackall-filtered" else None,
        )
        consumer = Child("raw-consumer", argv, rundir / "raw-consumer.log")
        try:
            proc = consumer.process
            watch = asyncio.run(
                watch_consumers(
                    server.url,
                    settings.events,
                    [RAW_DURABLE],
                    view=False,
                    timeout=settings.timeout + 30,
                    cpu_pids={"consumer": consumer.pid, **server.cpu_pids},
                    alive=lambda: proc.poll() is None,
                )
            )
            consumer.wait(timeout=60)
        finally:
            consumer.stop()
        line = next((x for x in consumer.lines if x.startswith(RESULT_PREFIX)), None)
        if line is None:
            raise BenchError(
                f"raw consumer exited with {proc.returncode}: {consumer.stderr_tail()}"
            )
        own = json.loads(line.removeprefix(RESULT_PREFIX))
        polled = consumer_figures(settings.events, watch.samples, RAW_DURABLE, view=False)
        out.update(
            completed=proc.returncode == 0 and own["last_stream_seq"] >= settings.events,
            stopped_because=watch.stopped_because,
            events_per_s=own["events_per_s"],
            events_per_s_polled=polled["events_per_s"],
            seconds=round(own["seconds"], 3),
            cpu_share=polled.get("cpu_share", {}),
            consumer=own,
            stream_messages_max=max((s.messages or 0 for s in watch.samples), default=0),
        )
    return out


async def _stream_messages(url: str) -> int:
    nc = await connect(url, "bench-consumers-check")
    try:
        state = await Probe(nc).stream()
    finally:
        await nc.close()
    return int(state["messages"]) if state else -1


# ---- kaya: a node whose consumers catch up on the whole stream -----------------------------


async def _final_checks(url: str) -> dict[str, Any]:
    """The view's figures and KAYA_DLQ's size once the consumers are done."""
    import nats.errors

    nc = await connect(url, "bench-consumers-check")
    try:
        view = await Probe(nc).view()
        try:
            msg = await nc.request(f"$JS.API.STREAM.INFO.{DLQ_STREAM}", b"", timeout=2.0)
            dlq = json.loads(msg.data).get("state", {}).get("messages")
        except (nats.errors.Error, TimeoutError, ValueError) as exc:
            dlq = f"unknown: {exc!r}"
    finally:
        await nc.close()
    return {"view": view, "dlq_messages": dlq}


def kaya_round(
    settings: Settings,
    workdir: Path,
    scenario: str,
    number: int | str,
    *,
    profile_seconds: float = 0.0,
) -> dict[str, Any]:
    """`kaya run` on a copy of the template, nothing to relay: time its consumers."""
    running = KAYA_SCENARIOS[scenario]
    rundir = workdir / f"{scenario}-{number}"
    rundir.mkdir()
    data_dir = copy_template(workdir, rundir)
    disabled = [c for c in CONSUMERS if c not in running]
    view = "analytics" in running
    out: dict[str, Any] = {"scenario": scenario, "round": number, "consumers_run": list(running)}
    profiler: list[Child] = []
    profile_path = rundir / "py-spy.txt"
    with consumer_node(rundir, data_dir, rewind=0.0, disabled=disabled) as node:
        proc = node.child.process

        def start_profiler() -> None:
            if profile_seconds > 0:
                profiler.append(start_py_spy(node.child.pid, profile_seconds, profile_path))

        try:
            watch = asyncio.run(
                watch_consumers(
                    node.url,
                    settings.events,
                    running,
                    view=view,
                    timeout=settings.timeout,
                    cpu_pids=node.cpu_pids(),
                    alive=lambda: proc.poll() is None,
                    on_progress=start_profiler,
                )
            )
            if profiler:
                profiler[0].wait(timeout=profile_seconds + 30)
            checks = asyncio.run(_final_checks(node.url)) if proc.poll() is None else {}
        finally:
            for child in profiler:
                child.stop()
    samples = watch.samples
    figures = {
        c: consumer_figures(settings.events, samples, c, view=c == "analytics") for c in running
    }
    messages = [s.messages for s in samples if s.messages is not None]
    out.update(
        completed=watch.stopped_because == "done",
        stopped_because=watch.stopped_because,
        consumers=figures,
        stream_messages_min=min(messages, default=0),
        stream_messages_max=max(messages, default=0),
        polls=len(samples),
    )
    starts = [s.t for s in samples if any(v for v in s.acked.values())]
    ends = [s.t for s in samples if _done(s, settings.events, view)]
    if starts and ends and ends[0] > starts[0]:
        first = next(s for s in samples if s.t == starts[0])
        last = next(s for s in samples if s.t == ends[0])
        p0 = min(v or 0 for v in first.acked.values())
        out["both_seconds"] = round(last.t - first.t, 3)
        out["both_events_per_s"] = (settings.events - p0) / (last.t - first.t)
        out["cpu_share"] = cpu_share(first.cpu, last.cpu, last.t - first.t)
    else:
        out["both_events_per_s"] = math.nan
    out["sum_events_per_s"] = sum(f["events_per_s"] for f in figures.values())
    out.update(verify(settings, running, checks, out))
    out.update(node.info)
    if profiler:
        out["profile"] = summarize_profile(profile_path, profile_seconds)
    return out


def verify(
    settings: Settings, running: Sequence[str], checks: dict[str, Any], out: dict[str, Any]
) -> dict[str, Any]:
    """Nothing republished, nothing dead-lettered, and the view counts every event once."""
    problems = []
    if out["stream_messages_max"] != settings.events:
        problems.append(f"KAYA_EVENTS grew to {out['stream_messages_max']}")
    if checks.get("dlq_messages"):
        problems.append(f"{checks['dlq_messages']} events dead-lettered")
    if "analytics" in running:
        view = checks.get("view") or {}
        accounts = math.ceil(settings.events / EVENTS_PER_ACCOUNT)
        seen = (
            view.get("position"),
            view.get("accounts", {}).get("opened"),
            view.get("operations", {}).get("deposits"),
        )
        wanted = (settings.events, accounts, settings.events - accounts)
        if seen != wanted:
            problems.append(f"view (position, opened, deposits) {seen}, wanted {wanted}")
    return {"verified": not problems and out["completed"], "problems": problems}


# ---- profiling (py-spy) ------------------------------------------------------------------


def start_py_spy(pid: int, seconds: float, path: Path) -> Child:
    """`py-spy record` in raw (collapsed) format, per thread, active samples only: a
    thread's samples over rate x seconds is the share of the time it was busy."""
    spy = Path(sys.executable).parent / "py-spy"
    argv = [
        str(spy),
        "record",
        "-p",
        str(pid),
        "-d",
        str(max(1, round(seconds))),
        "-r",
        str(PY_SPY_RATE),
        "-f",
        "raw",
        "--threads",
        "-o",
        str(path),
    ]
    return Child("py-spy", argv, path.with_suffix(".log"))


def _function(frame: str) -> str:
    """`name (path:line)` -> `name`."""
    return frame.split(" (", 1)[0]


def _where(frame: str) -> str:
    """`name (path:line)` -> `name (file)`: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{name} ({file})"


def summarize_profile(path: Path, seconds: float, top: int = 15) -> dict[str, Any]:
    """The main thread's busy share, its top functions by own samples, the stages' shares."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return {"error": f"no profile: {exc}"}
    threads: dict[str, list[tuple[list[str], int]]] = {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[-1]  # "thread (tid): name"
        threads.setdefault(name, []).append((frames[1:], int(count)))
    stacks = threads.get("MainThread")
    if not stacks:
        return {"error": "no samples of the main thread"}
    expected = PY_SPY_RATE * max(1, round(seconds))
    total = sum(c for _, c in stacks)
    own: Counter[str] = Counter()
    for frames, c in stacks:
        if frames:
            own[_where(frames[-1])] += c
    functions = [({_function(f) for f in frames}, c) for frames, c in stacks]
    stages = {
        label: round(sum(c for names, c in functions if names.intersection(wanted)) / total, 3)
        for label, wanted in PROFILE_STAGES
    }
    return {
        "seconds": seconds,
        "rate_hz": PY_SPY_RATE,
        "samples_main_thread": total,
        "main_thread_busy": round(min(1.0, total / expected), 3),
        "other_threads_sample_share": {
            k: round(sum(c for _, c in v) / expected, 3)
            for k, v in threads.items()
            if k != "MainThread"
        },
        "top_self": [[name, round(c / total, 3)] for name, c in own.most_common(top)],
        "stages_inclusive": stages,
    }


# ---- summary, targets, charts --------------------------------------------------------------


def _pairs(by: dict[str, list[dict[str, Any]]], a: str, b: str) -> list[tuple[Any, Any]]:
    return list(zip(by.get(a, []), by.get(b, []), strict=False))


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rounds:
        by.setdefault(r["scenario"], []).append(r)
    out: dict[str, Any] = {}
    for name in RAW_SCENARIOS:
        if name in by:
            rs = by[name]
            out[name] = {
                "rounds": len(rs),
                "completed": all(r["completed"] for r in rs),
                "events_per_s": spread([r["events_per_s"] for r in rs]),
                "events_per_s_polled": spread([r["events_per_s_polled"] for r in rs]),
            }
    for name, running in KAYA_SCENARIOS.items():
        if name not in by:
            continue
        rs = by[name]
        entry: dict[str, Any] = {
            "rounds": len(rs),
            "completed": all(r["completed"] for r in rs),
            "verified": all(r["verified"] for r in rs),
            "relay_republished": any(
                r["stream_messages_max"] != r["stream_messages_min"] for r in rs
            )
            or any(r["problems"] for r in rs if "KAYA_EVENTS" in " ".join(r["problems"])),
        }
        for c in running:
            entry[c] = spread([r["consumers"][c]["events_per_s"] for r in rs])
        if len(running) > 1:
            entry["both"] = spread([r["both_events_per_s"] for r in rs])
            entry["sum"] = spread([r["sum_events_per_s"] for r in rs])
        out[name] = entry
    ratios: dict[str, Any] = {}
    for baseline in RAW_SCENARIOS:
        if baseline not in out:
            continue
        raw = out[baseline]["events_per_s"]["median"]
        for name, running in KAYA_SCENARIOS.items():
            if name not in out:
                continue
            figures = [*running, *(("sum",) if len(running) > 1 else ())]
            for figure in figures:
                per_round = [
                    (
                        k["sum_events_per_s"]
                        if figure == "sum"
                        else k["consumers"][figure]["events_per_s"]
                    )
                    / r["events_per_s"]
                    for r, k in _pairs(by, baseline, name)
                ]
                ratios[f"{name}.{figure}/{baseline}"] = {
                    "of_medians": out[name][figure]["median"] / raw,
                    "per_round": [round(x, 3) for x in per_round],
                }
    out["ratios"] = ratios
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """consumers >= 80% of raw fetch+ack: analytics alone, and both on one node summed,
    against the like-for-like raw (ack-all) when it ran, else the explicit-ack one."""
    baseline = next((b for b in ("raw-ackall", "raw") if b in summary), None)
    if baseline is None:
        return []
    raw = summary[baseline]["events_per_s"]["median"]
    out = []
    for name, figure, what in (
        ("kaya-analytics-only", "analytics", "analytics alone"),
        ("kaya-notifications-only", "notifications", "notifications alone"),
        ("kaya", "sum", "analytics + notifications, summed"),
    ):
        if name in summary:
            out.append(
                target(
                    f"consumers: {what} / {baseline}",
                    summary[name][figure]["median"],
                    raw,
                    GOAL,
                    unit="x",
                )
            )
    return out


def chart_bars(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    bars: dict[str, dict[str, float]] = {}
    for name in RAW_SCENARIOS:
        if name in summary:
            bars[name.replace("-filtered", "\nfiltered")] = summary[name]["events_per_s"]
    for name, running in KAYA_SCENARIOS.items():
        if name not in summary:
            continue
        if len(running) == 1:
            bars[f"{running[0]}\nalone"] = summary[name][running[0]]
        else:
            for c in running:
                bars[f"{c}\n(both run)"] = summary[name][c]
            bars["both run:\nsum"] = summary[name]["sum"]
    return bars


def draw_charts(results: dict[str, Any]) -> list[str]:
    from bench.charts import bar_chart

    m, v, s = results["machine"], results["versions"], results["settings"]
    note = (
        f"{s['events']:,} events, fetch batch {s['fetch_batch']}, {s['rounds']} round(s), "
        f"{m['nproc']} cores, git {v['git']}"
    )
    path = bar_chart(
        "consumers-throughput",
        "Consumers vs raw nats-py fetch+ack: events/s (median, min-max over rounds)",
        "events/s",
        chart_bars(results["summary"]),
        note=note,
    )
    return [str(path)] if path is not None else []


# ---- measuring ---------------------------------------------------------------------------


def measure(settings: Settings, quick: bool = False) -> dict[str, Any]:
    """The template, then every round of every scenario, alternated; the optional profile."""
    results = fw.new_results("consumers", settings, quick=quick)
    rounds: list[dict[str, Any]] = []
    with fw.scratch("consumers", keep=settings.keep_data) as workdir:
        fw.say(f"building the template: {settings.events:,} events ...")
        results.update(build_template(settings, workdir))

        def one(scenario: str, number: int) -> dict[str, Any]:
            run = raw_round if scenario in RAW_SCENARIOS else kaya_round
            try:
                return run(settings, workdir, scenario, number)
            finally:
                shutil.rmtree(workdir / f"{scenario}-{number}", ignore_errors=True)

        results["rounds"] = rounds = fw.run_rounds(settings.rounds, settings.scenarios, one)
        if settings.profile_seconds > 0:
            fw.say(f"profiling {settings.profile_scenario} ({settings.profile_seconds:g} s) ...")
            profiled = kaya_round(
                settings,
                workdir,
                settings.profile_scenario,
                "profile",
                profile_seconds=settings.profile_seconds,
            )
            results["profile"] = {
                "scenario": settings.profile_scenario,
                "events_per_s_while_profiled": {
                    c: f["events_per_s"] for c, f in profiled["consumers"].items()
                },
                "cpu_share": profiled.get("cpu_share", {}),
                **profiled.get("profile", {}),
            }
    results["finished_at"] = utc_now().isoformat(timespec="seconds")
    results["summary"] = summarize(rounds)
    results["targets"] = targets(results["summary"])
    return results


# ---- output ------------------------------------------------------------------------------


def _cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in cpu.items()) or "-"


def render(results: dict[str, Any]) -> str:
    m, v, s = results["machine"], results["versions"], results["settings"]
    lines = [
        f"consumers: {m['nproc']} cores ({m['cpu_model']}), load {m['loadavg_at_start']}, "
        f"Python {m['python']}, {v['nats-server']}, nats-py {v['nats-py']}, git {v['git']}",
    ]
    if "prefill" in results:
        t = results["template"]
        lines.append(
            f"{s['events']:,} account events on KAYA_EVENTS ({t['stream_bytes'] or 0:,} bytes); "
            f"fetch batch {s['fetch_batch']}; template built in {t['seconds']:.1f} s"
        )
    lines += [
        "",
        f"{'round':<6}{'scenario':<24}{'consumer':<14}{'events/s':>10}{'seconds':>9}"
        "  cpu in cores (x_loop: main thread)",
    ]
    for r in results.get("rounds", []):
        flag = "" if r["completed"] else f"  INCOMPLETE: {r['stopped_because']}"
        if r["scenario"] in RAW_SCENARIOS:
            lines.append(
                f"{r['round']:<6}{r['scenario']:<24}{'(own clock)':<14}{r['events_per_s']:>10,.0f}"
                f"{r['seconds']:>9.2f}  {_cpu(r['cpu_share'])}{flag}"
            )
            lines.append(f"{'':<6}{'':<24}{'(polled)':<14}{r['events_per_s_polled']:>10,.0f}")
            continue
        for c, f in r["consumers"].items():
            lines.append(
                f"{r['round']:<6}{r['scenario']:<24}{c:<14}{f['events_per_s']:>10,.0f}"
                f"{f.get('seconds', math.nan):>9.2f}  {_cpu(f.get('cpu_share', {}))}{flag}"
            )
        if len(r["consumers"]) > 1:
            lines.append(
                f"{'':<6}{'':<24}{'both':<14}{r['both_events_per_s']:>10,.0f}"
                f"{r.get('both_seconds', math.nan):>9.2f}"
            )
        if r["problems"]:
            lines.append(f"{'':<6}PROBLEMS: {'; '.join(r['problems'])}")
    summary = results.get("summary", {})
    lines += ["", "median (min-max) over rounds, events/s:"]
    for name in RAW_SCENARIOS:
        if name in summary:
            lines.append(
                f"  {name:<40}{fmt_spread(summary[name]['events_per_s'])}"
                f"   polled {fmt_spread(summary[name]['events_per_s_polled'])}"
            )
    for name, running in KAYA_SCENARIOS.items():
        if name not in summary:
            continue
        e = summary[name]
        figures = [*running, *(("both", "sum") if len(running) > 1 else ())]
        for f in figures:
            lines.append(f"  {name + ' ' + f:<40}{fmt_spread(e[f])}")
        lines.append(
            f"  {'':<40}verified: {str(e['verified']).lower()}; stream grew (relay "
            f"republished): {str(e['relay_republished']).lower()}"
        )
    if summary.get("ratios"):
        lines += ["", "ratios (of medians; per round):"]
        for key, x in summary["ratios"].items():
            per = ", ".join(f"{y:.2f}" for y in x["per_round"])
            lines.append(f"  {key:<58}{x['of_medians']:.2f}; {per}")
    profile = results.get("profile")
    if profile and "top_self" in profile:
        lines += [
            "",
            f"profile of {profile['scenario']} (py-spy {profile['rate_hz']} Hz for "
            f"{profile['seconds']:g} s, not in the figures): main thread in "
            f"{profile['main_thread_busy']:.0%} of the samples (uvloop's waits count, as "
            f"Runner.run); from /proc over the run: "
            f"{_cpu(profile.get('cpu_share', {}))}",
            "  share of the main thread's samples with it on the stack:",
            *(f"    {x:6.1%}  {k}" for k, x in profile["stages_inclusive"].items()),
            "  most samples of their own (leaf function):",
            *(f"    {share:6.1%}  {name}" for name, share in profile["top_self"]),
        ]
        if profile["main_thread_busy"] < 0.5:
            lines.append(
                "  (few samples: the consumers finished before or soon after py-spy attached;"
                " use a shorter --profile or more --events)"
            )
    elif profile:
        lines += ["", f"profile: {profile.get('error')}"]
    if results.get("targets"):
        lines += ["", "targets:", render_targets(results["targets"])]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.consumers",
        description="Kaya's consumers (events/s) vs raw nats-py pull fetch + ack.",
    )
    fw.add_options(
        parser,
        quick="20k events, 1 round",
        rounds="rounds of each scenario (default 3; quick 1)",
        only=f"comma-separated, from {', '.join(ALL_SCENARIOS)} "
        f"(default {','.join(DEFAULT_SCENARIOS)})",
        keep_data="keep the work directory",
    )
    parser.add_argument("--scenarios", help="the same as --only (its older name)")
    parser.add_argument("--events", type=int, help="events on the stream (default 100k; quick 20k)")
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="S",
        help="one more round with py-spy on the node for S seconds (not in the figures)",
    )
    parser.add_argument("--profile-scenario", default="kaya", help="kaya scenario to profile")
    internal = parser.add_argument_group("child processes (internal)")
    internal.add_argument("--raw-consumer", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--url", help=argparse.SUPPRESS)
    internal.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    internal.add_argument("--ack-all", action="store_true", help=argparse.SUPPRESS)
    internal.add_argument("--filter", help=argparse.SUPPRESS)
    internal.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fw.exit_on_sigterm()
    if args.raw_consumer:
        if not (args.url and args.events and args.batch):
            raise SystemExit("--raw-consumer needs --url, --events and --batch")
        return raw_consumer_main(args)
    only = args.only or args.scenarios
    settings = settings_for(
        bool(args.quick),
        events=args.events,
        rounds=args.rounds,
        scenarios=fw.parse_only(only, ALL_SCENARIOS, DEFAULT_SCENARIOS),
        profile=args.profile,
        profile_scenario=args.profile_scenario,
        keep_data=args.keep_data,
    )
    results = measure(settings, quick=bool(args.quick))
    fw.finish(results, write=not args.no_write, render=render, chart=draw_charts)
    ok = all(r.get("verified", r["completed"]) for r in results.get("rounds", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
