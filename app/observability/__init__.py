"""Observability: metrics, health, the HTTP endpoints, tracing, logs, loop lag, SLOs, status."""
