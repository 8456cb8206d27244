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

Every reply is on contract. A handler never lets an exception out: nats.micro would
answer it with an empty body and the exception's repr in a header. What the caller
got wrong is `bad_request`; anything else is `internal` with a generic message, the
detail in the log. Error replies carry NATS micro's `Nats-Service-Error` and
`Nats-Service-Error-Code` headers beside the contract's body, and are counted per
endpoint in the service's stats (`nats micro stats kaya`): nats.micro counts only
exceptions, and most errors here are replied later, by the runtime, after the
handler returned. Success replies get nothing more.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.micro.request import Request
from nats.micro.service import Service, ServiceConfig, ServiceStats

from kaya.actors import (
    ActorRuntime,
    BadRequest,
    Forbidden,
    Internal,
    KayaError,
    Overloaded,
    Registry,
    Unavailable,
    error_from,
    error_reply,
)
from kaya.actors.policy import Policy
from kaya.actors.saga import Saga
from kaya.actors.wire import (
    HEADER_AUTHORIZATION,
    HEADER_COMMAND_ID,
    HEADER_DEADLINE,
    HEADER_TRACEPARENT,
    TRACEPARENT,
    VIEW_PREFIX,
    Answer,
    check_command_id,
    decode_json_object,
    error_message,
    header_block,
    parse_shard,
    parse_subject,
    service_error_headers,
    shard_of,
)
from kaya.app.broker.adapter import HeaderPublisher, queued_messages, reply_subject
from kaya.app.config import IngressConfig
from kaya.app.observability.lag import LoopLag
from kaya.app.observability.metrics import CommandMetrics

if TYPE_CHECKING:
    from kaya.app.observability.tracing import Tracing
    from kaya.app.security.tokens import TokenVerifier

log = logging.getLogger("kaya.ingress")

VERSION = "0.1.0"

ViewFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""A read model's query: JSON parameters in, a JSON object out."""


_BEHIND_MESSAGE = (
    "node is behind (its event loop runs later than ingress.max_loop_lag); retry later"
)
BEHIND = error_reply("overloaded", _BEHIND_MESSAGE)
BEHIND_HEADERS = service_error_headers("overloaded", _BEHIND_MESSAGE)
BEHIND_BLOCK = header_block(BEHIND_HEADERS)
INTERNAL = "internal error: the request could not be handled; the node's log has the details"
"""What a caller is told of an exception nobody expected; its text stays in the log."""


class EndpointErrors:
    """Error replies sent for one endpoint, for the service's stats."""

    __slots__ = ("count", "last")

    def __init__(self) -> None:
        self.count = 0
        self.last = ""

    def add(self, code: str, message: str) -> None:
        self.count += 1
        self.last = f"{code}:{message}"[:256]


class _Service(Service):
    """nats.micro's service, whose stats add the error replies the ingress counted.

    nats.micro counts an error only when a handler raises, and then it replies by itself
    with an empty body; the ingress replies on contract, often later from the runtime, so
    it counts its errors itself and they are added here, per endpoint.
    """

    def __init__(self, nc: NATS, config: ServiceConfig, errors: Mapping[str, EndpointErrors]):
        super().__init__(nc, config)
        self._errors = errors

    def stats(self) -> ServiceStats:
        stats = super().stats()
        for endpoint in stats.endpoints:
            counted = self._errors.get(endpoint.name)
            if counted is not None and counted.count:
                endpoint.num_errors += counted.count
                endpoint.last_error = counted.last
        return stats


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
        owns: Callable[[int], bool] | None = None,
        per_shard: bool = False,
        verifier: TokenVerifier | None = None,
        policy: Policy | None = None,
    ) -> None:
        """`owns(shard)`: whether this node serves a shard right now (leases); a request
        for another is refused `unavailable`. `per_shard`: subscribe to each served shard
        alone (`serve_shard`), as cluster nodes must: with one wildcard subscription the
        queue group would hand a shard's requests to any node. `verifier`: with JWT on,
        every command, query and view must carry a valid `Authorization: Bearer` token
        (a saga's steps between nodes do not: only nodes may send them); the caller it
        names goes with the request to the app's `policy` (views are judged here)."""
        self._owns = owns
        self._verifier = verifier
        self._policy = policy
        self._per_shard = per_shard
        self._shard_endpoints: dict[int, list[Any]] = {}
        self._tracing = tracing
        self._lag = lag
        self._views = dict(views or {})
        # step command ids of sagas are derived as "<saga>/<id>/<step>": a client must not
        # be able to take one (its command would stand in for the saga's step)
        self._reserved_ids = tuple(f"{e.name}/" for e in registry if isinstance(e, Saga))
        self.metrics = metrics or CommandMetrics()
        self._nc = nc
        # error replies carry headers; nats-py's encoding of them would triple a refusal's
        # cost, and refusals are most of the work while the node sheds load
        self._publisher = HeaderPublisher(nc)
        self._runtime = runtime
        self._stages = runtime.stages
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
        self.errors: dict[str, EndpointErrors] = {}
        """Error replies per endpoint name (what `nats micro stats` shows)."""

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
        config = ServiceConfig(
            name="kaya",
            version=VERSION,
            description="Kaya node: entity commands and state queries",
            metadata={"node": self._node_name},
            queue_group=self._config.queue_group,
        )
        self.errors = {}
        service = _Service(self._nc, config, self.errors)
        await service.start()
        endpoints: list[tuple[str, str, Any]] = []
        if not self._per_shard:
            endpoints += self._endpoints("*", "")
        endpoints += [
            ("commands-unmapped", "kaya.cmd.>", self._on_command),
            ("queries-unmapped", "kaya.qry.>", self._on_query),
            ("views", "kaya.view.>", self._on_view),
        ]
        for name, subject, handler in endpoints:
            errors = self.errors[name] = EndpointErrors()
            await service.add_endpoint(
                name=name, subject=subject, handler=functools.partial(handler, errors)
            )
        # nats-py's flush() can write its PING ahead of SUBs still queued in its buffer, so
        # one PONG does not prove the server has them; the second flush's PING goes after
        # them. Without it, the first request after `ready` may get "no responders".
        await self._nc.flush()
        await self._nc.flush()
        self._service = service

    def _endpoints(self, shard: str, suffix: str) -> list[tuple[str, str, Any]]:
        endpoints = [
            (f"commands{suffix}", f"kaya.shard.{shard}.cmd.>", self._on_command),
            (f"queries{suffix}", f"kaya.shard.{shard}.qry.>", self._on_query),
        ]
        if self._per_shard:  # a single node's sagas call their targets in-process
            endpoints.append((f"steps{suffix}", f"kaya.shard.{shard}.step.>", self._on_step))
        return endpoints

    async def serve_shard(self, shard: int) -> None:
        """Subscribe to one shard's subjects (per_shard nodes); once the server has the
        subscriptions, requests for the shard reach this node."""
        service = self._service
        if not self._per_shard or service is None or shard in self._shard_endpoints:
            return
        added = []
        for name, subject, handler in self._endpoints(str(shard), f"-{shard}"):
            errors = self.errors[name] = EndpointErrors()
            await service.add_endpoint(
                name=name, subject=subject, handler=functools.partial(handler, errors)
            )
            added.append(service._endpoints[-1])  # nats.micro has no public removal
        self._shard_endpoints[shard] = added
        await self._nc.flush()
        await self._nc.flush()  # see start(): the second PING follows the SUBs

    async def drop_shard(self, shard: int) -> None:
        """Stop taking the shard's requests (they go to its next owner, or get no
        responders until there is one); those in flight are still answered."""
        service = self._service
        for endpoint in self._shard_endpoints.pop(shard, []):
            with contextlib.suppress(nats.errors.Error, AssertionError):
                await endpoint._stop()
            if service is not None and endpoint in service._endpoints:
                service._endpoints.remove(endpoint)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, then wait (bounded) for those in flight to be answered."""
        if self._service is not None:
            try:
                await self._service.stop()
            except nats.errors.Error as exc:  # disconnected: the server dropped our subs anyway
                log.warning("stopping the service endpoints: %r", exc)
            self._service = None
            self._shard_endpoints.clear()
        with anyio.move_on_after(timeout):
            await self._idle.wait()
        if self._inflight:
            log.warning("stopped with %d requests unanswered", self._inflight)

    # ---- handlers --------------------------------------------------------------------

    async def _on_step(self, errors: EndpointErrors, request: Request) -> None:
        """A saga's step from another node: a command that may carry a step's reserved
        command id and its deadline (`Kaya-Deadline`, unix seconds)."""
        await self._on_command(errors, request, step=True)

    async def _on_command(
        self, errors: EndpointErrors, request: Request, *, step: bool = False
    ) -> None:
        received = time.perf_counter()
        reply_to = reply_subject(request)
        lag, max_lag = self._lag, self._config.max_loop_lag
        if lag is not None and max_lag and lag.behind(max_lag):
            # the cheapest answer there is: while shedding, refusals are most of the work
            self.refused += 1
            self.metrics.shed()
            errors.add("overloaded", _BEHIND_MESSAGE)
            if reply_to:
                await self._publisher.publish(
                    reply_to, BEHIND, reply="", header_block=BEHIND_BLOCK, headers=_behind
                )
            return
        span = None
        trace: str | None = None  # the traceparent a reply carries back
        try:
            self._admit(request)
            kind = "step" if step else "cmd"
            entity_name, entity_id = parse_subject(request.subject, kind, self._shards)
            self._check_owned(request.subject, entity_name, entity_id)
            entity = self._registry.get(entity_name)
            data = request.data
            if len(data) > self._config.max_body:
                raise BadRequest(
                    f"body of {len(data)} bytes exceeds the limit of {self._config.max_body}"
                )
            command = entity.decode_step(data) if step else entity.decode_command(data)
            headers = request.headers or {}
            caller = None
            if self._verifier is not None and not step:
                caller = self._verifier.verify(headers.get(HEADER_AUTHORIZATION))
            command_id = headers.get(HEADER_COMMAND_ID)
            deadline = None
            if step:
                deadline = _deadline(headers.get(HEADER_DEADLINE))
            if command_id is not None:
                check_command_id(command_id)
                if not step and command_id.startswith(self._reserved_ids):
                    raise BadRequest(
                        f"{HEADER_COMMAND_ID} {command_id!r}: ids starting with"
                        f" {' or '.join(self._reserved_ids)} are reserved for saga steps"
                    )
            traceparent = _caller_trace(request)
            asked = traceparent is not None
            if self._tracing is not None:
                span, traceparent = self._tracing.start(
                    "kaya.command",
                    traceparent,
                    {"kaya.entity": entity.name, "kaya.id": entity_id,
                     "kaya.command": type(command).__name__},
                    server=True,
                )  # fmt: skip
            # a caller that sent a trace, or a recorded span, gets it back
            trace = traceparent if asked or span is not None else None
            self._runtime.tell(
                entity,
                entity_id,
                command,
                self._replier(reply_to, entity.name, type(command).__name__, errors, span, trace),
                command_id=command_id,
                traceparent=traceparent,
                deadline=deadline,
                caller=caller,
            )
            self._stages.observe("ingress", time.perf_counter() - received)
        except Exception as exc:
            error = self._as_error(exc, "command", request)
            if span is not None and self._tracing is not None:
                self._tracing.finish(span, error.code)
            await self._refuse(request, reply_to, error, errors, trace or _caller_trace(request))
            return
        self._inflight += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle

    async def _on_query(self, errors: EndpointErrors, request: Request) -> None:
        reply_to = reply_subject(request)
        try:
            self._admit(request)
            entity_name, entity_id = parse_subject(request.subject, "qry", self._shards)
            self._check_owned(request.subject, entity_name, entity_id)
            entity = self._registry.get(entity_name)
            caller = None
            if self._verifier is not None:
                caller = self._verifier.verify(_authorization(request))
            self._runtime.query(
                entity,
                entity_id,
                self._replier(reply_to, entity.name, "query", errors),
                caller=caller,
            )
        except Exception as exc:
            error = self._as_error(exc, "query", request)
            await self._refuse(request, reply_to, error, errors)
            return
        self._inflight += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle

    async def _on_view(self, errors: EndpointErrors, request: Request) -> None:
        """Read models answer from SQLite directly: no actor, no mailbox."""
        reply_to = reply_subject(request)
        name = request.subject.removeprefix(VIEW_PREFIX)
        try:
            view = self._views.get(name)
            if view is None:
                known = ", ".join(sorted(self._views)) or "none"
                raise BadRequest(f"no view named {name!r} (known: {known})")
            data = request.data
            if len(data) > self._config.max_body:
                raise BadRequest(
                    f"view parameters of {len(data)} bytes exceed the limit of"
                    f" {self._config.max_body}"
                )
            params = decode_json_object(data, "view parameters")
            if self._verifier is not None:
                caller = self._verifier.verify(_authorization(request))
                if self._policy is not None and not self._policy.view(caller, name, params):
                    raise Forbidden(f"the caller may not read the view {name!r}")
            result = await view(params)
            body = orjson.dumps({"ok": True, "view": name, **result})
        except KayaError as exc:
            await self._refuse(request, reply_to, exc, errors)
            return
        except Exception:
            log.exception("view %s failed", name)
            failed = Internal(f"view {name} failed; the node's log has the details")
            await self._refuse(request, reply_to, failed, errors)
            return
        if reply_to:
            await self._nc.publish(reply_to, body)

    def _check_owned(self, subject: str, entity: str, entity_id: str) -> None:
        """Refuse (`unavailable`) a request for a shard this node does not serve now: a
        lease that lapsed, a shard being handed over, an unmapped subject of another's."""
        owns = self._owns
        if owns is None:
            return
        shard = shard_of(self._shards, entity, entity_id)
        token = parse_shard(subject)
        if token is not None and token != shard:  # sent to a shard subject by hand
            raise BadRequest(
                f"subject {subject!r}: {entity}/{entity_id} is in shard {shard}, not {token}"
            )
        if not owns(shard):
            raise Unavailable(f"shard {shard} is not served by this node right now; retry")

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
        errors: EndpointErrors,
        span: Any = None,
        traceparent: str | None = None,
    ) -> Any:
        """The reply callback; it carries the command's traceparent back to the caller.

        A success is published as it is; an error (the runtime's answer, encoded) also
        gets the micro error headers, its message read back from the body, and is counted.
        """
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
            outcome = answer.outcome
            if outcome == "ok":
                if reply_to:
                    await nc.publish(reply_to, answer.body, headers=headers)
            else:
                message = error_message(answer.body)
                errors.add(outcome, message)
                if reply_to:
                    await self._publish_error(
                        reply_to, answer.body, service_error_headers(outcome, message, traceparent)
                    )
            record(entity, command, outcome, time.perf_counter() - started)
            if span is not None and tracing is not None:
                tracing.finish(span, outcome)

        return reply

    def _as_error(self, exc: Exception, what: str, request: Request) -> KayaError:
        """A refusal for the caller: a KayaError as it is; anything else is a bug, so it is
        logged with its traceback and the caller gets a generic `internal`."""
        if isinstance(exc, KayaError):
            return exc
        log.error("%s on %s failed", what, request.subject, exc_info=exc)
        return Internal(INTERNAL)

    async def _refuse(
        self,
        request: Request,
        reply_to: str,
        exc: KayaError,
        errors: EndpointErrors,
        traceparent: str | None = None,
    ) -> None:
        self.refused += 1
        errors.add(exc.code, exc.message)
        subject = request.subject
        entity = subject.split(".")[-2] if subject.count(".") >= 3 else "-"
        self.metrics.record(entity if entity in self._registry else "-", "-", exc.code, None)
        if reply_to:
            await self._publish_error(
                reply_to, error_from(exc), service_error_headers(exc.code, exc.message, traceparent)
            )

    async def _publish_error(self, reply_to: str, body: bytes, headers: dict[str, str]) -> None:
        await self._publisher.publish(
            reply_to, body, reply="", header_block=header_block(headers), headers=lambda: headers
        )


def _deadline(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise BadRequest(f"{HEADER_DEADLINE} {value!r} is not a unix time in seconds") from None


def _behind() -> dict[str, str]:
    return BEHIND_HEADERS


def _caller_trace(request: Request) -> str | None:
    """The request's traceparent if it is valid (W3C: an invalid one is ignored, not refused)."""
    headers = request.headers
    traceparent = headers.get(HEADER_TRACEPARENT) if headers else None
    if traceparent is not None and TRACEPARENT.fullmatch(traceparent):
        return traceparent
    return None


def _authorization(request: Request) -> str | None:
    headers = request.headers
    return headers.get(HEADER_AUTHORIZATION) if headers else None
