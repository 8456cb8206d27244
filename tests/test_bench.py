"""The benchmark suite's own measuring parts: targets, and the open-loop generator.

A benchmark that miscounts is worse than none, so the parts every figure passes
through are checked against a real nats-server with a responder whose answers are
known.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench import e2e
from bench.common import percentile, target
from bench.openloop import OpenLoopSettings, generate
from bench.targets import JWT_AUDIENCE, JWT_ISSUER
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


def test_e2e_secure_runs_each_secure_scenario_beside_its_plain_twin() -> None:
    def scenarios(*argv: str) -> tuple[str, ...]:
        return e2e._resolve(e2e.build_parser().parse_args(list(argv))).scenarios

    assert scenarios("--quick") == e2e.QUICK_SCENARIOS
    assert not set(e2e.SECURE_SCENARIOS) & set(scenarios())  # not by default
    assert scenarios("--only", "echo,kaya", "--secure") == (
        "echo",
        "echo-tls",
        "kaya",
        "kaya-secure",
    )
    assert scenarios("--quick", "--secure")[:4] == ("echo", "echo-tls", "kaya", "kaya-secure")
    assert scenarios("--only", "kaya-secure,kaya") == ("kaya-secure", "kaya")
    assert scenarios("--only", "naive", "--secure") == ("naive", "echo-tls", "kaya-secure")
    with pytest.raises(SystemExit):
        scenarios("--only", "kaya-tls")


def test_e2e_tokens_name_each_accounts_owner_for_the_nodes_verifier(tmp_path: Path) -> None:
    from kaya.app.config import JwtConfig
    from kaya.app.security.tokens import PUBLIC_KEY, TokenVerifier, new_signing_key

    new_signing_key(tmp_path)  # what bench/targets.py makes before a secure node starts
    access = e2e.Access(tmp_path, tokens=True)
    headers = access.headers()
    assert headers is not None
    assert len(headers) == e2e.OWNERS
    settings = JwtConfig(
        enabled=True, issuer=JWT_ISSUER, audience=JWT_AUDIENCE, key_file=PUBLIC_KEY
    )  # as targets.SECURE_CONFIG
    verifier = TokenVerifier(settings, directory=tmp_path)
    for account in (0, 1, 99, 100, 1234):
        caller = verifier.verify(headers[account % e2e.OWNERS]["Authorization"])
        assert caller.subject == e2e.owner(account)
    # the generator process is told the same through its arguments
    args = e2e.build_parser().parse_args(["--generator", *access.argv()])
    assert (Path(args.security_dir), args.tokens) == (tmp_path, True)
    assert e2e.Access(tmp_path, tokens=False).headers() is None


# bench.common.Child leaves its stdout pipe for the garbage collector (ResourceWarning)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_secure_e2e_round_opens_loads_and_verifies_over_tls_with_tokens() -> None:
    """A real secure node (TLS, client certificates, JWT, the bank's policy): every deposit
    sent with its owner's token is accepted and found in the balances."""
    settings = e2e.Settings(
        accounts=20,
        inflight=5,
        duration=0.5,
        warmup=0.2,
        rounds=1,
        timeout=5.0,
        scenarios=("kaya-secure",),
        keep_data=False,
    )
    result = e2e.scenario_round(settings, "kaya-secure", 1)
    assert result["errors"] == {}
    assert result["ok"] > 0
    assert result["verification"]["verified"] is True
    assert result["verification"]["accounts_checked"] == 20
    assert result["node_exit_code"] == 0
