"""Open-loop load generator: deposits at a constant arrival rate, its own process.

    python -m bench.openloop --url URL --accounts N --rate R --warmup S --duration S

A closed-loop generator slows down when the server does, so a stall delays the
requests that would have seen it and the tail looks better than users would find
it (coordinated omission). Here request k is *due* at start + k/R whatever the
replies do, and its latency is measured from that due time, not from when it
could be sent: if the generator has to hold a request back (it keeps at most
`--max-inflight` outstanding, which bounds its memory), the wait counts.

Only requests due inside the measured window (after the warm-up) enter the
figures. Rejections (`overloaded`) are counted apart, with their own latency: a
system under overload should say no at once rather than time out. The result is
one JSON line on stdout prefixed `RESULT `; `window start` / `window end` lines
tell the parent when to sample CPU and memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench import framework as fw
from bench.e2e import DEPOSIT, command_subject, reply_code

TICK = 0.001
"""How often the scheduler wakes to send what has come due (uvloop's timer resolution)."""
DRAIN_GRACE = 5.0
"""After the last due time, how long replies may still arrive before the rest are abandoned."""


@dataclass(frozen=True)
class OpenLoopSettings:
    url: str
    accounts: int
    rate: float
    warmup: float
    duration: float
    timeout: float
    max_inflight: int
    seed: int


async def generate(s: OpenLoopSettings) -> dict[str, Any]:
    """Send on schedule; match replies by inbox token; sweep for timeouts.

    The generator must outrun what it measures, on a machine whose other core is
    busy with the node: so no task, future or `wait_for` per request (nats-py's
    `request` makes all three). Each request is a plain publish with its own reply
    subject under one wildcard inbox subscription; the reply callback looks the
    request up by token. Requests unanswered after `--timeout` are swept as
    `client_timeout` (their outcome is unknown).
    """
    import nats

    nc = await nats.connect(
        s.url, name="bench-openloop", allow_reconnect=False, pending_size=256 * 1024 * 1024
    )
    subjects = [command_subject(i) for i in range(s.accounts)]
    pick = random.Random(s.seed).randrange
    clock = time.perf_counter_ns
    interval_ns = 1e9 / s.rate
    timeout_ns = int(s.timeout * 1e9)
    ok_ns: list[int] = []  # due -> reply, ok replies due in the window
    service_ns: list[int] = []  # sent -> reply, same replies: what the server alone took
    rejected_ns: list[int] = []  # sent -> `overloaded`, due in the window
    codes: Counter[str] = Counter()
    all_codes: Counter[str] = Counter()  # warm-up included: what the store must hold
    outstanding: dict[int, tuple[int, int]] = {}  # token -> (due, sent)
    sent = 0
    late_sends = 0  # sent over 2 ms after their due time: the wait is in their latency
    start = clock()
    window_start = start + int(s.warmup * 1e9)
    end = window_start + int(s.duration * 1e9)
    total = int((end - start) / interval_ns)
    inbox = nc.new_inbox()
    prefix_len = len(inbox) + 1
    drained = asyncio.Event()

    def settle(token: int, code: str, done: int) -> None:
        due, sent_at = outstanding.pop(token)
        all_codes[code] += 1
        if due >= window_start:
            codes[code] += 1
            if code == "ok":
                ok_ns.append(done - due)
                service_ns.append(done - sent_at)
            elif code == "overloaded":
                rejected_ns.append(done - sent_at)
        if sent == total and not outstanding:
            drained.set()

    async def on_reply(msg: Any) -> None:
        token = int(msg.subject[prefix_len:])
        if token in outstanding:  # else: already swept as a timeout
            if not msg.data and msg.headers and msg.headers.get("Status") == "503":
                settle(token, "no_responders", clock())
            else:
                settle(token, reply_code(msg.data), clock())

    def sweep(now: int) -> None:
        expired = [t for t, (_, sent_at) in outstanding.items() if now - sent_at > timeout_ns]
        for token in expired:
            settle(token, "client_timeout", now)

    await nc.subscribe(f"{inbox}.*", cb=on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.flush()
    marker = asyncio.ensure_future(fw.mark_window(window_start, end))
    hard_stop = end + int((s.timeout + DRAIN_GRACE) * 1e9)
    publish = nc.publish
    last_sweep = start
    try:
        while sent < total and (now := clock()) < hard_stop:
            due_count = min(total, int((now - start) / interval_ns) + 1)
            while sent < due_count and len(outstanding) < s.max_inflight:
                due = start + int(sent * interval_ns)
                if now - due > 2_000_000:
                    late_sends += 1
                outstanding[sent] = (due, now)
                await publish(subjects[pick(s.accounts)], DEPOSIT, reply=f"{inbox}.{sent}")
                sent += 1
            if now - last_sweep > 100_000_000:
                sweep(now)
                last_sweep = now
            await asyncio.sleep(TICK)
        await marker
        while outstanding and (now := clock()) < hard_stop:
            sweep(now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), 0.1)
    finally:
        abandoned = len(outstanding)
        marker.cancel()
        await nc.close()
    ok = codes.get("ok", 0)
    return {
        "offered_rate": s.rate,
        "due_in_window": int(s.duration * s.rate),
        "sent_total": sent,
        "unsent": total - sent,
        "late_sends": late_sends,
        "abandoned": abandoned,
        "ok": ok,
        "throughput": ok / s.duration,
        "outcomes": dict(sorted(codes.items())),
        "outcomes_all": dict(sorted(all_codes.items())),
        "latency_ms": fw.latency_ms(ok_ns),
        "service_ms": fw.latency_ms(service_ns),
        "rejected_ms": fw.latency_ms(rejected_ns),
    }


def run_generator_argv(s: OpenLoopSettings) -> list[str]:
    """The command line that runs this generator in its own process."""
    return fw.module_argv(
        "bench.openloop",
        url=s.url,
        accounts=s.accounts,
        rate=s.rate,
        warmup=s.warmup,
        duration=s.duration,
        timeout=s.timeout,
        max_inflight=s.max_inflight,
        seed=s.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--accounts", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--max-inflight", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.accounts < 1:
        raise SystemExit("--rate, --duration and --accounts must be positive")
    import uvloop

    settings = OpenLoopSettings(
        url=args.url,
        accounts=args.accounts,
        rate=args.rate,
        warmup=args.warmup,
        duration=args.duration,
        timeout=args.timeout,
        max_inflight=args.max_inflight,
        seed=args.seed,
    )
    t0 = time.process_time()
    result = uvloop.run(generate(settings))
    result["generator_cpu_s"] = time.process_time() - t0
    fw.emit_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
