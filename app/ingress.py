"""Ingress: the wire contract's command and query endpoints, as a NATS micro service.

    kaya.cmd.<entity>.<id>  --server mapping-->  kaya.shard.<n>.cmd.<entity>.<id>
        -> decode, validate names, size and command (here)
        -> actor mailbox (actors)  -> reply once the append is durable

Every check that can refuse a request happens here, before anything is queued, so
a refused request changes nothing. NATS delivers a subscription's messages one at
a time and drops a consumer that falls behind, so the handler never waits for the
actor: it queues the command and returns, and the number of requests accepted but
not yet answered is bounded (`overloaded` beyond it) instead of buffering.

Subjects that the server did not map (an external server without the shard
mapping, or a malformed subject) arrive on `kaya.cmd.>` itself: a well-formed one
is served the same way, anything else is answered with `bad_request`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from kaya.actors import (
    ActorRuntime,
    BadRequest,
    Internal,
    KayaError,
    Overloaded,
    Registry,
    error_from,
    error_reply,
)
from kaya.actors.saga import Saga
from kaya.actors.wire import (
    HEADER_COMMAND_ID,
    HEADER_TRACEPARENT,
    TRACEPARENT,
    VIEW_PREFIX,
    Answer,
    check_command_id,
    parse_subject,
)
from kaya.app.broker.adapter import queued_messages, reply_subject
from kaya.app.config import IngressConfig
from kaya.app.observability.lag import LoopLag
from kaya.app.observability.metrics import CommandMetrics

if TYPE_CHECKING:
    from kaya.app.observability.tracing import Tracing

log = logging.getLogger("kaya.ingress")

VERSION = "0.1.0"

ViewFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""A read model's query: JSON parameters in, a JSON object out."""


BEHIND = error_reply(
    "overloaded",
    "node is behind (its event loop runs later than ingress.max_loop_lag); retry later",
)


class Ingress:
    """Serves `kaya.cmd.*` and `kaya.qry.*` for a node until `stop()`."""

    def __init__(
        self,
        nc: NATS,
        runtime: ActorRuntime,
        registry: Registry,
        config: IngressConfig,
        *,
        node_name: str,
        shards: int = 1,
        views: Mapping[str, ViewFn] | None = None,
        metrics: CommandMetrics | None = None,
        tracing: Tracing | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        self._tracing = tracing
        self._lag = lag
        self._views = dict(views or {})
        # step command ids of sagas are derived as "<saga>/<id>/<step>": a client must not
        # be able to take one (its command would stand in for the saga's step)
        self._reserved_ids = tuple(f"{e.name}/" for e in registry if isinstance(e, Saga))
        self.metrics = metrics or CommandMetrics()
        self._nc = nc
        self._runtime = runtime
        self._registry = registry
        self._config = config
        self._node_name = node_name
        self._shards = shards
        self._service: Service | None = None
        self._inflight = 0
        self._idle = anyio.Event()
        self._idle.set()
        self.accepted = 0
        self.refused = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def loop_lag(self) -> float:
        """Seconds the event loop runs behind (smoothed); 0 when not measured."""
        return self._lag.lag if self._lag is not None else 0.0

    @property
    def serving(self) -> bool:
        return self._service is not None

    async def start(self) -> None:
        service = await add_service(
            self._nc,
            name="kaya",
            version=VERSION,
            description="Kaya node: entity commands and state queries",
            metadata={"node": self._node_name},
            queue_group=self._config.queue_group,
        )
        for name, subject, handler in (
            ("commands", "kaya.shard.*.cmd.>", self._on_command),
            ("queries", "kaya.shard.*.qry.>", self._on_query),
            ("commands-unmapped", "kaya.cmd.>", self._on_command),
            ("queries-unmapped", "kaya.qry.>", self._on_query),
            ("views", "kaya.view.>", self._on_view),
        ):
            await service.add_endpoint(name=name, subject=subject, handler=handler)
        # nats-py's flush() can write its PING ahead of SUBs still queued in its buffer, so
        # one PONG does not prove the server has them; the second flush's PING goes after
        # them. Without it, the first request after `ready` may get "no responders".
        await self._nc.flush()
        await self._nc.flush()
        self._service = service

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, then wait (bounded) for those in flight to be answered."""
        if self._service is not None:
            try:
                await self._service.stop()
            except nats.errors.Error as exc:  # disconnected: the server dropped our subs anyway
                log.warning("stopping the service endpoints: %r", exc)
            self._service = None
        with anyio.move_on_after(timeout):
            await self._idle.wait()
        if self._inflight:
            log.warning("stopped with %d requests unanswered", self._inflight)

    # ---- handlers --------------------------------------------------------------------

    async def _on_command(self, request: Request) -> None:
        reply_to = reply_subject(request)
        lag, max_lag = self._lag, self._config.max_loop_lag
        if lag is not None and max_lag and lag.behind(max_lag):
            # the cheapest answer there is: while shedding, refusals are most of the work
            self.refused += 1
            self.metrics.shed()
            if reply_to:
                await self._nc.publish(reply_to, BEHIND)
            return
        span = None
        try:
            self._admit(request)
            entity_name, entity_id = parse_subject(request.subject, "cmd", self._shards)
            entity = self._registry.get(entity_name)
            data = request.data
            if len(data) > self._config.max_body:
                raise BadRequest(
                    f"body of {len(data)} bytes exceeds the limit of {self._config.max_body}"
                )
            command = entity.decode_command(data)
            headers = request.headers or {}
            command_id = headers.get(HEADER_COMMAND_ID)
            if command_id is not None:
                check_command_id(command_id)
                if command_id.startswith(self._reserved_ids):
                    raise BadRequest(
                        f"{HEADER_COMMAND_ID} {command_id!r}: ids starting with"
                        f" {' or '.join(self._reserved_ids)} are reserved for saga steps"
                    )
            traceparent = headers.get(HEADER_TRACEPARENT)
            if traceparent is not None and not TRACEPARENT.fullmatch(traceparent):
                traceparent = None  # W3C: an invalid traceparent is ignored, not an error
            asked = traceparent is not None
            if self._tracing is not None:
                span, traceparent = self._tracing.start(
                    "kaya.command",
                    traceparent,
                    {"kaya.entity": entity.name, "kaya.id": entity_id,
                     "kaya.command": type(command).__name__},
                    server=True,
                )  # fmt: skip
            self._runtime.tell(
                entity,
                entity_id,
                command,
                self._replier(
                    reply_to,
                    entity.name,
                    type(command).__name__,
                    span,
                    # a caller that sent a trace, or a recorded span, gets it back
                    traceparent if asked or span is not None else None,
                ),
                command_id=command_id,
                traceparent=traceparent,
            )
        except KayaError as exc:
            if span is not None and self._tracing is not None:
                self._tracing.finish(span, exc.code)
            await self._refuse(request, reply_to, exc)
            return
        self._inflight += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle

    async def _on_query(self, request: Request) -> None:
        reply_to = reply_subject(request)
        try:
            self._admit(request)
            entity_name, entity_id = parse_subject(request.subject, "qry", self._shards)
            entity = self._registry.get(entity_name)
            self._runtime.query(entity, entity_id, self._replier(reply_to, entity.name, "query"))
        except KayaError as exc:
            await self._refuse(request, reply_to, exc)
            return
        self._inflight += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle

    async def _on_view(self, request: Request) -> None:
        """Read models answer from SQLite directly: no actor, no mailbox."""
        reply_to = reply_subject(request)
        name = request.subject.removeprefix(VIEW_PREFIX)
        try:
            view = self._views.get(name)
            if view is None:
                known = ", ".join(sorted(self._views)) or "none"
                raise BadRequest(f"no view named {name!r} (known: {known})")
            try:
                params = orjson.loads(request.data) if request.data.strip() else {}
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"view parameters are not valid JSON: {exc}") from None
            if not isinstance(params, dict):
                raise BadRequest("view parameters must be a JSON object")
            result = await view(params)
        except KayaError as exc:
            await self._refuse(request, reply_to, exc)
            return
        except Exception as exc:
            log.exception("view %s failed", name)
            await self._refuse(
                request, reply_to, Internal(f"view {name} failed: {type(exc).__name__}")
            )
            return
        if reply_to:
            await self._nc.publish(reply_to, orjson.dumps({"ok": True, "view": name, **result}))

    def _admit(self, request: Request) -> None:
        """Refuse early, before any decoding, while the node is behind.

        Two bounds: requests accepted and not yet answered (the work queued in actors
        and the store), and requests received but not yet handled, which wait in
        nats-py's subscription buffer where nothing else bounds them short of its
        512k-message limit (at which it drops them silently). Past the second, the node
        sheds the backlog cheaply so refusals come back in milliseconds, not after the
        seconds it took to reach them.
        """
        if self._inflight >= self._config.max_inflight:
            raise Overloaded(f"{self._inflight} requests in flight; retry later")
        # the depth of nats-py's buffer is only reachable through its internals (the adapter):
        # without them (another nats-py), this check is skipped, not fatal
        queued = queued_messages(self._nc, request)
        if queued is not None and queued > self._config.max_queued:
            raise Overloaded(f"{queued} requests queued at this node; retry later")

    def _replier(
        self,
        reply_to: str,
        entity: str,
        command: str,
        span: Any = None,
        traceparent: str | None = None,
    ) -> Any:
        """The reply callback; it carries the command's traceparent back to the caller."""
        nc = self._nc
        headers = {HEADER_TRACEPARENT: traceparent} if traceparent else None
        record = self.metrics.record
        tracing = self._tracing
        started = time.perf_counter()

        async def reply(answer: Answer) -> None:
            self._inflight -= 1
            self.accepted += 1
            if self._inflight == 0:
                self._idle.set()
            if reply_to:
                await nc.publish(reply_to, answer.body, headers=headers)
            record(entity, command, answer.outcome, time.perf_counter() - started)
            if span is not None and tracing is not None:
                tracing.finish(span, answer.outcome)

        return reply

    async def _refuse(self, request: Request, reply_to: str, exc: KayaError) -> None:
        self.refused += 1
        subject = request.subject
        entity = subject.split(".")[-2] if subject.count(".") >= 3 else "-"
        self.metrics.record(entity if entity in self._registry else "-", "-", exc.code, None)
        if reply_to:
            await self._nc.publish(reply_to, error_from(exc))
