"""The shipped alerting rules and dashboard: in sync with config.toml, valid, and only
using metrics a node really exports."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from examples.bank import make_app
from kaya.app.config import MetricsConfig, load_config
from kaya.app.node import open_node
from kaya.app.observability.slo import DASHBOARD_PATH, RULES_PATH, metrics_used, render
from tests.conftest import call, node_config
from tests.servers import NatsServer
from tests.test_observability import http_get

ROOT = Path(__file__).resolve().parent.parent


def test_committed_files_match_the_config() -> None:
    for path, data in render(load_config(ROOT / "config.toml").slo).items():
        assert (ROOT / path).read_bytes() == data, f"{path} is stale: run `kaya slo export`"


def test_rules_are_well_formed() -> None:
    rules = orjson.loads((ROOT / RULES_PATH).read_bytes())  # JSON is YAML
    alerts = rules["groups"][0]["rules"]
    assert {a["alert"] for a in alerts} >= {"KayaCommandLatencyHigh", "KayaConsumerLagging"}
    for alert in alerts:
        assert alert["expr"].count("(") == alert["expr"].count(")")
        assert alert["labels"]["severity"] in {"page", "ticket"}
        assert alert["for"] == "5m"


@pytest.mark.anyio
async def test_every_metric_used_exists(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    used = metrics_used((ROOT / RULES_PATH).read_text() + (ROOT / DASHBOARD_PATH).read_text())
    assert len(used) >= 10
    config = node_config(nats_server, tmp_path, metrics=MetricsConfig(address="127.0.0.1:0"))
    async with open_node(config, make_app()) as node:
        await call(nc, f"kaya.cmd.account.{uid}", {"type": "Open", "owner": "o", "currency": "EUR"})
        assert node.metrics_url is not None
        status, body = await http_get(node.metrics_url)
    assert status == 200
    exported = {
        sample.name
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert used <= exported, f"unknown metrics: {sorted(used - exported)}"


def test_the_cli_writes_the_same_files(tmp_path: Path) -> None:
    import subprocess

    from tests.servers import VENV_BIN

    result = subprocess.run(
        [str(VENV_BIN / "kaya"), "slo", "export", "--config", str(ROOT / "config.toml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for path in (RULES_PATH, DASHBOARD_PATH):
        assert (tmp_path / path).read_bytes() == (ROOT / path).read_bytes()
