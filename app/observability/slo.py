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


def dashboard(slo: SloConfig) -> dict[str, Any]:
    panels = [
        ("Commands/s by outcome", 'sum by (outcome) (rate(kaya_commands_total[1m]))', "reqps"),
        (
            "Command latency p50 / p99",
            "histogram_quantile(0.99, sum by (le)"
            " (rate(kaya_command_duration_seconds_bucket[1m])))",
            "s",
        ),
        ("Error ratio", f"sum(rate(kaya_commands_total{{{_ERRORS}}}[5m]))"
         " / clamp_min(sum(rate(kaya_commands_total[5m])), 1e-9)", "percentunit"),
        ("Overload refusals/s", "rate(kaya_ingress_overloaded_total[1m])", "reqps"),
        ("In flight", "kaya_ingress_inflight", "short"),
        ("Event loop lag (commands shed above ingress.max_loop_lag)",
         "kaya_event_loop_lag_seconds", "s"),
        ("Active / busy actors", "kaya_actors_active", "short"),
        ("Mailbox depth", "kaya_mailbox_depth", "short"),
        ("Events committed/s", "rate(kaya_store_events_total[1m])", "short"),
        (
            "Group commit: events per transaction",
            "rate(kaya_store_events_total[1m])"
            " / clamp_min(rate(kaya_store_commits_total[1m]), 1e-9)",
            "short",
        ),
        ("Relay backlog", "kaya_relay_backlog", "short"),
        ("Relay published/s", "rate(kaya_relay_published_total[1m])", "short"),
        ("Consumer lag", "kaya_consumer_lag", "short"),
        ("Consumer retries/s", "rate(kaya_consumer_retries_total[1m])", "short"),
        ("Dead letters", "kaya_consumer_dead_letters_total", "short"),
    ]  # fmt: skip
    return {
        "title": "Kaya node",
        "uid": "kaya-node",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "tags": ["kaya"],
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "gridPos": {"x": (i % 3) * 8, "y": (i // 3) * 8, "w": 8, "h": 8},
                "fieldConfig": {"defaults": {"unit": unit}},
                "targets": [{"expr": expr, "refId": "A"}],
            }
            for i, (title, expr, unit) in enumerate(panels)
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
