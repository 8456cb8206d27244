"""Tracing: OpenTelemetry spans exported over OTLP/HTTP (Jaeger and collectors accept it).

Off unless `[tracing] otlp_endpoint` is set, and then the only cost on the command path
is one span per command and one per consumed event. The W3C `traceparent` is what
travels: the ingress starts a span as a child of the caller's traceparent (or a new
trace) and hands the *span's* traceparent to the actor, which stores it with the
events; the relay puts it on the JetStream messages; consumers and saga steps continue
from it. So a transfer, its steps, both accounts' events and the notifications share
one trace id, with the ingress and consumer spans exported.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()


class Tracing:
    """One node's tracer provider; `shutdown()` flushes what is batched."""

    def __init__(self, endpoint: str, *, node: str, sample_ratio: float = 0.01) -> None:
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": "kaya", "service.instance.id": node}),
            # sampling is decided before OpenTelemetry is asked (see `start`)
            sampler=ParentBased(ALWAYS_ON),
        )
        self._ratio = sample_ratio
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=5)
        self._provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self._tracer = self._provider.get_tracer("kaya")

    def start(
        self, name: str, traceparent: str | None, attributes: dict[str, Any], *, server: bool
    ) -> tuple[Span | None, str]:
        """A span continuing `traceparent`, and the traceparent that names the new span.

        Unsampled traces never reach OpenTelemetry: a recorded span costs this process
        ~100 µs and even a non-recording one ~15 µs, so a trace the caller did not sample
        passes through as it is, and a new trace is sampled at `sample_ratio` here, with
        an unsampled traceparent made up for the others (the trace id still travels).
        """
        if traceparent is not None:
            if not int(traceparent[-2:], 16) & 1:
                return None, traceparent
        elif random.random() >= self._ratio:
            return None, f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-00"
        parent = _propagator.extract({"traceparent": traceparent} if traceparent else {})
        span = self._tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER if server else SpanKind.CONSUMER,
            attributes=attributes,
        )
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=set_span_in_context(span))
        return span, carrier["traceparent"]

    @contextmanager
    def span(
        self, name: str, traceparent: str | None, attributes: dict[str, Any]
    ) -> Iterator[Span | None]:
        span, _ = self.start(name, traceparent, attributes, server=False)
        if span is None:
            yield None
            return
        try:
            yield span
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        finally:
            span.end()

    @contextmanager
    def saga_step(
        self, saga: str, saga_id: str, step: str, traceparent: str | None
    ) -> Iterator[str | None]:
        """A span around one saga step; its commands carry the span's traceparent."""
        attributes = {"kaya.saga": saga, "kaya.id": saga_id, "kaya.step": step}
        span, child = self.start(f"kaya.saga {saga} {step}", traceparent, attributes,
                                 server=False)  # fmt: skip
        try:
            yield child
        finally:
            if span is not None:
                span.end()

    def finish(self, span: Span | None, outcome: str) -> None:
        if span is None:
            return
        span.set_attribute("kaya.outcome", outcome)
        if outcome not in ("ok", "rejected"):
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    def force_flush(self) -> None:
        self._provider.force_flush(timeout_millis=5000)

    def shutdown(self) -> None:
        self._provider.shutdown()
