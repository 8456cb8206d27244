"""SLOs as code: Prometheus alerting rules and a Grafana dashboard, generated from config.

`kaya slo export` writes deploy/prometheus/kaya-rules.yml and
deploy/grafana/kaya-dashboard.json; a test regenerates them from config.toml and
checks that the committed files match and that every metric they use exists. The
rules file is JSON, which is valid YAML, so no YAML library is needed to write it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from kaya.app.config import SloConfig

RULES_PATH = Path("deploy/prometheus/kaya-rules.yml")
DASHBOARD_PATH = Path("deploy/grafana/kaya-dashboard.json")
METRIC = re.compile(r"\bkaya_[a-z0-9_]+")

_ERRORS = 'outcome=~"internal|unavailable|timeout"'


def alerting_rules(slo: SloConfig) -> dict[str, Any]:
    p99 = (
        "histogram_quantile(0.99, sum by (le, entity)"
        " (rate(kaya_command_duration_seconds_bucket[5m])))"
    )
    error_ratio = (
        f"sum(rate(kaya_commands_total{{{_ERRORS}}}[5m]))"
        " / clamp_min(sum(rate(kaya_commands_total[5m])), 1e-9)"
    )
    overload_ratio = (
        "sum(rate(kaya_ingress_overloaded_total[5m]))"
        " / clamp_min(sum(rate(kaya_commands_total[5m])), 1e-9)"
    )
    rules = [
        _rule(
            "KayaCommandLatencyHigh",
            f"{p99} > {slo.command_p99_seconds}",
            "page",
            f"p99 command latency of {{{{ $labels.entity }}}} above {slo.command_p99_seconds}s",
        ),
        _rule(
            "KayaCommandErrorBudgetBurn",
            f"{error_ratio} > {1 - slo.success_ratio:.6g}",
            "page",
            f"more than {(1 - slo.success_ratio) * 100:.3g}% of commands fail"
            " (internal, unavailable or timeout)",
        ),
        _rule(
            "KayaOverloaded",
            f"{overload_ratio} > {slo.overload_ratio_max}",
            "ticket",
            f"more than {slo.overload_ratio_max * 100:.3g}% of requests refused as overloaded",
        ),
        _rule(
            "KayaConsumerLagging",
            f"max by (consumer) (kaya_consumer_lag) > {slo.consumer_lag_max}",
            "page",
            "consumer {{ $labels.consumer }} trails the store by more than"
            f" {slo.consumer_lag_max} events",
        ),
        _rule(
            "KayaRelayBacklog",
            f"kaya_relay_backlog > {slo.relay_backlog_max}",
            "page",
            f"more than {slo.relay_backlog_max} committed events not yet in JetStream",
        ),
        _rule(
            "KayaDeadLetters",
            "increase(kaya_consumer_dead_letters_total[15m]) > 0",
            "ticket",
            "consumer {{ $labels.consumer }} dead-lettered events: see `kaya dlq list`",
        ),
        _rule(
            "KayaHandlerCrashes",
            "increase(kaya_handler_crashes_total[15m]) > 0",
            "ticket",
            "a handler raised (answered `internal`): see the node's error log",
        ),
    ]
    return {"groups": [{"name": "kaya-slo", "rules": rules}]}


def _rule(name: str, expr: str, severity: str, summary: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": "5m",
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "runbook": "README.md#operations-playbook"},
    }


DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
"""Every panel's and query's datasource: the `DS_PROMETHEUS` input Grafana asks for on
import, also a datasource variable so a provisioned copy (no import step) resolves it."""

INSTANCE = 'instance=~"$instance"'
"""In every selector: the `instance` variable picks which nodes the dashboard shows."""


def _q(metric: str, *matchers: str) -> str:
    """`metric{instance=~"$instance", ...}`."""
    return f"{metric}{{{', '.join((INSTANCE, *matchers))}}}"


def _quantile(q: float) -> str:
    return (
        f"histogram_quantile({q}, sum by (le, entity)"
        f" (rate({_q('kaya_command_duration_seconds_bucket')}[1m])))"
    )


Query = tuple[str, str]
"""(PromQL, legend)."""


def _panels() -> list[tuple[str, list[Query], str, bool]]:
    """(title, queries, unit, stacked); a title naming two series ("p50 / p99") has a
    query with each as its legend (tests/test_slo.py checks titles against queries)."""
    stage_sum = f"sum by (stage) (rate({_q('kaya_command_stage_seconds_sum')}[5m]))"
    stage_count = f"sum by (stage) (rate({_q('kaya_command_stage_seconds_count')}[5m]))"
    return [
        ("Commands/s by outcome",
         [(f"sum by (outcome) (rate({_q('kaya_commands_total')}[1m]))", "{{outcome}}")],
         "reqps", False),
        ("Command latency p50 / p99",
         [(_quantile(0.5), "p50 {{entity}}"), (_quantile(0.99), "p99 {{entity}}")], "s", False),
        ("Latency budget: mean time per stage (stacked)",
         [(f"{stage_sum} / clamp_min({stage_count}, 1e-9)", "{{stage}}")], "s", True),
        ("Error ratio",
         [(f"sum(rate({_q('kaya_commands_total', _ERRORS)}[5m]))"
           f" / clamp_min(sum(rate({_q('kaya_commands_total')}[5m])), 1e-9)", "errors")],
         "percentunit", False),
        ("Overload refusals/s",
         [(f"rate({_q('kaya_ingress_overloaded_total')}[1m])", "{{instance}}")], "reqps", False),
        ("In flight", [(_q("kaya_ingress_inflight"), "{{instance}}")], "short", False),
        ("Event loop lag (commands shed above ingress.max_loop_lag)",
         [(_q("kaya_event_loop_lag_seconds"), "{{instance}}")], "s", False),
        ("Active / busy actors",
         [(_q("kaya_actors_active"), "active {{instance}}"),
          (_q("kaya_actors_busy"), "busy {{instance}}")], "short", False),
        ("Mailbox depth", [(_q("kaya_mailbox_depth"), "{{instance}}")], "short", False),
        ("Events committed/s",
         [(f"rate({_q('kaya_store_events_total')}[1m])", "{{instance}}")], "short", False),
        ("Group commit: events per transaction",
         [(f"rate({_q('kaya_store_events_total')}[1m])"
           f" / clamp_min(rate({_q('kaya_store_commits_total')}[1m]), 1e-9)", "{{instance}}")],
         "short", False),
        ("Relay backlog", [(_q("kaya_relay_backlog"), "{{instance}}")], "short", False),
        ("Relay published/s",
         [(f"rate({_q('kaya_relay_published_total')}[1m])", "{{instance}}")], "short", False),
        ("Consumer lag", [(_q("kaya_consumer_lag"), "{{consumer}}")], "short", False),
        ("Consumer retries/s",
         [(f"rate({_q('kaya_consumer_retries_total')}[1m])", "{{consumer}}")], "short", False),
        ("Dead letters", [(_q("kaya_consumer_dead_letters_total"), "{{consumer}}")], "short",
         False),
        ("Process CPU (cores)",
         [(f"rate({_q('process_cpu_seconds_total')}[1m])", "{{instance}}")], "short", False),
        ("Process resident memory",
         [(_q("process_resident_memory_bytes"), "{{instance}}")], "bytes", False),
    ]  # fmt: skip


def _panel(i: int, title: str, queries: list[Query], unit: str, stacked: bool) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if stacked:
        defaults["custom"] = {"stacking": {"group": "A", "mode": "normal"}, "fillOpacity": 60}
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"x": (i % 3) * 8, "y": (i // 3) * 8, "w": 8, "h": 8},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [
            {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(65 + n)}
            for n, (expr, legend) in enumerate(queries)
        ],
    }


def dashboard(slo: SloConfig) -> dict[str, Any]:
    """Importable (`__inputs`: pick a Prometheus datasource) and provisionable (the same
    name is a datasource variable); `instance` selects the nodes shown."""
    instances = "label_values(kaya_node_live, instance)"
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "the Prometheus that scrapes the Kaya nodes' /metrics",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "title": "Kaya node",
        "uid": "kaya-node",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "tags": ["kaya"],
        "templating": {
            "list": [
                {
                    "name": "DS_PROMETHEUS",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "hide": 0,
                    "current": {},
                },
                {
                    "name": "instance",
                    "label": "node",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": instances,
                    "query": {"query": instances, "refId": "instances"},
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "sort": 1,
                },
            ]
        },
        "panels": [
            _panel(i, title, queries, unit, stacked)
            for i, (title, queries, unit, stacked) in enumerate(_panels())
        ],
        "description": f"SLO: p99 <= {slo.command_p99_seconds}s, success >= {slo.success_ratio}",
    }


def render(slo: SloConfig) -> dict[Path, bytes]:
    option = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
    return {
        RULES_PATH: orjson.dumps(alerting_rules(slo), option=option) + b"\n",
        DASHBOARD_PATH: orjson.dumps(dashboard(slo), option=option) + b"\n",
    }


def metrics_used(text: str) -> set[str]:
    return set(METRIC.findall(text))
