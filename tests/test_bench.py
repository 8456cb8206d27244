"""The benchmark suite's own measuring parts: targets, and the open-loop generator.

A benchmark that miscounts is worse than none, so the parts every figure passes
through are checked against a real nats-server with a responder whose answers are
known.
"""

from __future__ import annotations

import math

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench.common import percentile, target
from bench.openloop import OpenLoopSettings, generate
from tests.servers import NatsServer

pytestmark = pytest.mark.anyio

OK = b'{"ok":true,"entity":"account","id":"x","version":2,"events":[]}'
COMMANDS = ("kaya.cmd.>", "kaya.shard.*.cmd.>")
"""The test server maps commands to shards, as a node's does."""
OVERLOADED = b'{"ok":false,"error":{"code":"overloaded","message":"retry later"}}'


def test_a_target_compares_the_ratio_with_its_goal() -> None:
    met = target("throughput", 600.0, 1000.0, 0.5)
    assert met["ratio"] == pytest.approx(0.6)
    assert met["met"] is True
    assert target("throughput", 400.0, 1000.0, 0.5)["met"] is False
    latency = target("p99", 30.0, 10.0, 2.0, lower_is_better=True)
    assert latency["ratio"] == pytest.approx(3.0)
    assert latency["met"] is False
    assert target("no baseline", 1.0, 0.0, 1.0)["met"] is False  # NaN never meets a goal


def test_percentile_is_nearest_rank() -> None:
    values = [float(x) for x in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert math.isnan(percentile([], 50))


async def test_open_loop_sends_on_schedule_and_counts_every_outcome(
    nats_server: NatsServer, nc: NATS
) -> None:
    answered = 0

    async def respond(msg: Msg) -> None:
        nonlocal answered
        answered += 1
        await nc.publish(msg.reply, OVERLOADED if answered % 4 == 0 else OK)

    for subject in COMMANDS:
        await nc.subscribe(subject, cb=respond)
    await nc.flush()
    settings = OpenLoopSettings(
        url=nats_server.url,
        accounts=10,
        rate=400.0,
        warmup=0.25,
        duration=1.0,
        timeout=2.0,
        max_inflight=1000,
        seed=1,
    )
    result = await generate(settings)
    # every request due was sent and answered; none in the window was lost or invented
    assert result["unsent"] == 0
    assert result["abandoned"] == 0
    assert result["sent_total"] == answered
    assert sum(result["outcomes_all"].values()) == answered
    in_window = sum(result["outcomes"].values())
    assert abs(in_window - result["due_in_window"]) <= 1
    refused = result["outcomes"]["overloaded"]
    assert refused == pytest.approx(in_window / 4, abs=2)
    assert result["rejected_ms"]["count"] == refused
    assert result["latency_ms"]["count"] == result["outcomes"]["ok"]
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] < 2000
    assert result["throughput"] == pytest.approx(result["outcomes"]["ok"] / settings.duration)


async def test_open_loop_counts_silence_as_client_timeouts(
    nats_server: NatsServer, nc: NATS
) -> None:
    async def ignore(msg: Msg) -> None:  # takes requests, never answers
        pass

    for subject in COMMANDS:
        await nc.subscribe(subject, cb=ignore)
    await nc.flush()
    settings = OpenLoopSettings(
        url=nats_server.url,
        accounts=3,
        rate=50.0,
        warmup=0.0,
        duration=0.5,
        timeout=0.3,
        max_inflight=1000,
        seed=2,
    )
    result = await generate(settings)
    assert result["ok"] == 0
    assert result["outcomes_all"] == {"client_timeout": result["sent_total"]}
    assert result["sent_total"] >= 24


async def test_open_loop_tells_no_responders_apart(nats_server: NatsServer) -> None:
    settings = OpenLoopSettings(
        url=nats_server.url,
        accounts=3,
        rate=50.0,
        warmup=0.0,
        duration=0.3,
        timeout=1.0,
        max_inflight=1000,
        seed=3,
    )
    result = await generate(settings)
    assert result["outcomes_all"] == {"no_responders": result["sent_total"]}
