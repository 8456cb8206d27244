"""The shipped alerting rules and dashboard: in sync with config.toml, valid, and only
using metrics a node really exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((ROOT / DASHBOARD_PATH).read_bytes())
    return data


def test_each_panel_plots_what_its_title_says() -> None:
    panels = {p["title"]: p for p in _dashboard()["panels"]}
    for title, panel in panels.items():
        legends = [t["legendFormat"].split()[0].lower() for t in panel["targets"]]
        assert len(set(t["refId"] for t in panel["targets"])) == len(panel["targets"]), title
        # "A / B" in a title: a query for each, with it as the legend
        named = title.split(":")[0].split(" / ")
        if len(named) > 1:
            first, last = named[0].split()[-1].lower(), named[-1].split()[0].lower()
            assert [first, last] == legends, title

    def queries(title: str) -> dict[str, str]:
        return {t["legendFormat"].split()[0]: t["expr"] for t in panels[title]["targets"]}

    latency = queries("Command latency p50 / p99")
    assert latency["p50"].startswith("histogram_quantile(0.5, ")
    assert latency["p99"].startswith("histogram_quantile(0.99, ")
    assert all("kaya_command_duration_seconds_bucket" in q for q in latency.values())
    actors = queries("Active / busy actors")
    assert "kaya_actors_active{" in actors["active"]
    assert "kaya_actors_busy{" in actors["busy"]
    budget = panels["Latency budget: mean time per stage (stacked)"]
    assert budget["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    (expr,) = [t["expr"] for t in budget["targets"]]
    assert "sum by (stage) (rate(kaya_command_stage_seconds_sum{" in expr
    assert "sum by (stage) (rate(kaya_command_stage_seconds_count{" in expr


def test_the_dashboard_asks_for_a_datasource_and_filters_by_instance() -> None:
    board = _dashboard()
    (source,) = board["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    instance = variables["instance"]
    assert instance["query"]["query"] == "label_values(kaya_node_live, instance)"
    assert instance["datasource"]["uid"] == "${DS_PROMETHEUS}"
    selector = re.compile(r"\b((?:kaya|process)_[a-z0-9_]+)(\{[^}]*\})?")
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            for metric, labels in selector.findall(target["expr"]):
                assert 'instance=~"$instance"' in labels, (panel["title"], metric)
