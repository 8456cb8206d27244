"""The node's /metrics exposition is valid Prometheus text: `promtool check metrics` accepts
it once two entities have handled commands (one family per metric, entities as labels),
and it carries the standard `process_*` and `python_*` families."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from examples.bank import make_app
from kaya.app.config import MetricsConfig
from kaya.app.node import open_node
from tests.conftest import call, node_config
from tests.servers import NatsServer
from tests.test_observability import http_get

PROMTOOL_MISSING = "promtool not on PATH: `apt-get install prometheus` (Debian) provides it"


@pytest.fixture
async def exposition(nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str) -> str:
    """/metrics of a node that answered commands for two entities, account and transfer."""
    config = node_config(nats_server, tmp_path, metrics=MetricsConfig(address="127.0.0.1:0"))
    async with open_node(config, make_app()) as node:
        for who in ("a", "b"):
            reply = await call(
                nc,
                f"kaya.cmd.account.{uid}{who}",
                {"type": "Open", "owner": who, "currency": "EUR"},
            )
            assert reply["ok"], reply
        await call(nc, f"kaya.cmd.account.{uid}a", {"type": "Deposit", "amount": 10})
        started = await call(
            nc,
            f"kaya.cmd.transfer.{uid}t",
            {"type": "Start", "source": f"{uid}a", "target": f"{uid}b", "amount": 5},
        )
        assert started["ok"], started
        await call(nc, f"kaya.qry.transfer.{uid}t")
        assert node.metrics_url is not None
        status, body = await http_get(node.metrics_url)
    assert status == 200
    return body.decode()


@pytest.mark.anyio
async def test_one_help_and_type_per_family(exposition: str) -> None:
    helps = Counter(
        line.split()[2] for line in exposition.splitlines() if line.startswith("# HELP ")
    )
    types = Counter(
        line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")
    )
    assert [name for name, n in helps.items() if n > 1] == []
    assert [name for name, n in types.items() if n > 1] == []
    assert set(helps) == set(types)
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    duration = families["kaya_command_duration_seconds"]
    entities = {s.labels["entity"] for s in duration.samples}
    assert {"account", "transfer"} <= entities
    commands = {
        (s.labels["entity"], s.labels["command"]) for s in families["kaya_commands"].samples
    }
    assert {("account", "Open"), ("transfer", "Start"), ("transfer", "query")} <= commands
    # the standard process and interpreter families sit beside the node's own
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        assert name in families, name
    assert "python_info" in families
    assert "python_gc_collections" in families


@pytest.mark.anyio
async def test_promtool_accepts_the_exposition(exposition: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(PROMTOOL_MISSING)
    with anyio.fail_after(30):
        result = await anyio.run_process(
            [promtool, "check", "metrics"], input=exposition.encode(), check=False
        )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
