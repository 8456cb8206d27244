"""The benchmark suite's own measuring parts: targets, and the open-loop generator.

A benchmark that miscounts is worse than none, so the parts every figure passes
through are checked against a real nats-server with a responder whose answers are
known.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench import e2e
from bench import framework as fw
from bench.common import BenchError, Child, percentile, target
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


def test_rounds_alternate_every_scenario_within_a_round() -> None:
    # round-major: noise in one minute lands on one round of each, not on one scenario
    assert fw.alternate(2, ["echo", "kaya", "naive"]) == [
        (1, "echo"),
        (1, "kaya"),
        (1, "naive"),
        (2, "echo"),
        (2, "kaya"),
        (2, "naive"),
    ]
    seen: list[tuple[str, int]] = []
    rounds = fw.run_rounds(2, ["a", "b"], lambda s, n: seen.append((s, n)) or {"s": s, "n": n})
    assert seen == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert [r["s"] for r in rounds] == ["a", "b", "a", "b"]
    assert fw.by_scenario(rounds, "s") == {"a": [rounds[0], rounds[2]], "b": [rounds[1], rounds[3]]}


def test_shared_options_parse_alike_and_quick_defaults_yield_to_given_values() -> None:
    import argparse

    parser = fw.add_options(
        argparse.ArgumentParser(),
        quick="q",
        rounds="r",
        duration="d",
        warmup="w",
        only="o",
        keep_data="k",
    )
    args = parser.parse_args(["--quick", "--rounds", "2", "--warmup", "0", "--only", "b, a"])
    assert (args.quick, args.rounds, args.duration, args.warmup) == (True, 2, None, 0.0)
    assert (args.keep_data, args.no_write) == (False, False)
    assert fw.pick(args.rounds, args.quick, 1, 3) == 2
    assert fw.pick(args.duration, args.quick, 1.0, 5.0) == 1.0
    assert fw.pick(args.duration, False, 1.0, 5.0) == 5.0
    assert fw.pick(args.warmup, args.quick, 0.5, 2.0) == 0.0  # an explicit 0 is kept
    assert fw.parse_only(args.only, ("a", "b", "c"), ("c",)) == ("b", "a")
    assert fw.parse_only(None, ("a", "b", "c"), ("c",)) == ("c",)
    with pytest.raises(SystemExit, match="unknown x"):
        fw.parse_only("a,x", ("a", "b"), ())
    bare = fw.add_options(argparse.ArgumentParser(), quick="q").parse_args([])
    assert not hasattr(bare, "rounds")
    assert bare.no_write is False


def test_cpu_share_is_cores_per_window_with_loop_other_and_foreign() -> None:
    before = {"node": 10.0, "node_loop": 6.0, "nats_server": 2.0, "machine": 100.0}
    after = {"node": 11.0, "node_loop": 6.8, "nats_server": 2.4, "machine": 102.0}
    assert fw.cpu_share(before, after, 2.0) == {
        "node": 0.5,
        "node_loop": 0.4,
        "nats_server": 0.2,
        "foreign": 0.3,  # 1.0 core of the machine busy, 0.7 of it ours
    }
    split = fw.cpu_share(before, after, 2.0, split=True)
    assert split["node_other"] == pytest.approx(0.1)
    assert fw.cpu_share(before, after, 0.0) == {}
    assert "gone" not in fw.cpu_share({**before, "gone": 1.0}, after, 2.0)


def test_latency_summary_is_nearest_rank_in_ms() -> None:
    summary = fw.latency_ms([n * 1_000_000 for n in range(1, 101)])
    assert summary["count"] == 100
    assert (summary["p50"], summary["p99"], summary["max"]) == (50.0, 99.0, 100.0)
    assert summary["mean"] == pytest.approx(50.5)
    empty = fw.latency_ms([])
    assert empty["count"] == 0
    assert math.isnan(empty["p99"])
    assert math.isnan(empty["mean"])


def test_module_argv_spells_options_as_flags() -> None:
    argv = fw.module_argv("bench.x", "--generator", url="nats://h", per_account=True, seed=None)
    assert argv[1:] == ["-m", "bench.x", "--generator", "--url", "nats://h", "--per-account"]
    assert fw.module_argv("bench.x", max_inflight=5, tokens=False)[3:] == ["--max-inflight", "5"]


# bench.common.Child leaves its stdout pipe for the garbage collector (ResourceWarning)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_windowed_child_is_sampled_at_its_two_lines_and_its_result_read(tmp_path: Path) -> None:
    lines = [fw.WINDOW_START, fw.WINDOW_END, fw.RESULT_PREFIX + '{"ok": 3}']
    script = "".join(f"print({line!r}, flush=True);" for line in lines)
    samples = iter(["before", "after"])
    child = Child("child", [sys.executable, "-c", script], tmp_path / "child.log")
    window = fw.run_windowed(child, lambda: next(samples), warmup=1, duration=1, drain=5)
    assert (window.before, window.after, window.result) == ("before", "after", {"ok": 3})
    assert window.seconds >= 0
    failing = Child("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log")
    with pytest.raises(BenchError, match="exited with 3"):
        fw.read_result(failing, timeout=10)
    failing.stop()


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
