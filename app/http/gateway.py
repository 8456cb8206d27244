"""The HTTP gateway: the wire contract (v1) over HTTP, served inside the node.

    POST /v1/<entity>/<id>            a command (JSON body)  -> kaya.cmd.<entity>.<id>
    GET  /v1/<entity>/<id>            the state              -> kaya.qry.<entity>.<id>
    GET  /v1/<entity>/<id>/events     the history, paged     -> kaya.qry (access), the store
    GET  /v1/views/<name>?k=v         a view                 -> kaya.view.<name>
    GET  /openapi.json, /docs         the app's operations, from its schemas
    GET  /console, /v1/admin/...      the web console and its JSON (app/http/admin.py)

It is a NATS client like any other: each request becomes a NATS request on the node's own
connection (a `client` certificate's with security on, since the node's role may not send
commands), so shard routing, JWTs and the policy, sealing, overload shedding and metrics
apply unchanged, and a gateway on any node reaches every shard of a cluster. The reply's
body is the contract's as it is; its code picks the HTTP status (`STATUS`).

Headers: `Idempotency-Key` (or `Kaya-Command-Id`) is the command id; `traceparent` and
`Authorization` pass through; a reply's `traceparent` comes back. A body over
`ingress.max_body` is refused 413 with the contract's `bad_request` body before it is read
whole (the node would refuse it `bad_request`; 413 is what HTTP clients and proxies know).

Starlette on uvicorn, in the node's event loop: uvicorn's signal handling is off (the node
owns SIGINT/SIGTERM), its access log too, and the socket is bound here so a port in use is
an OSError naming `http.address` rather than uvicorn's `sys.exit`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import msgspec
import nats.errors
import orjson
import uvicorn
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from kaya.actors.errors import BadRequest, KayaError
from kaya.actors.registry import Registry
from kaya.actors.sealing import PREFIX as SEALED_PREFIX
from kaya.actors.wire import (
    HEADER_AUTHORIZATION,
    HEADER_COMMAND_ID,
    HEADER_TRACEPARENT,
    TOKEN,
    check_entity_id,
    check_entity_name,
    command_subject,
    error_reply,
    iso_utc,
    query_subject,
    remembered_answer,
    view_subject,
)
from kaya.app.config import metrics_address
from kaya.app.http.admin import Admin, Administered
from kaya.app.http.openapi import docs_html, openapi_document
from kaya.app.http.pages import EventsPage, HttpEvent
from kaya.app.schemas.catalog import build_catalog, render_asyncapi
from kaya.store import EventStore

if TYPE_CHECKING:
    from kaya.app.application import App

log = logging.getLogger("kaya.gateway")

STATUS: Final[Mapping[str, int]] = {
    "ok": 200,
    "bad_request": 400,
    "unknown_entity": 404,
    "unknown_command": 404,
    "conflict": 409,
    "rejected": 422,
    "unauthorized": 401,
    "forbidden": 403,
    "overloaded": 429,
    "unavailable": 503,
    "timeout": 504,
    "internal": 500,
}
"""The HTTP status of each contract code."""

HEADER_IDEMPOTENCY_KEY = "Idempotency-Key"
MASK = "***"
"""What a sealed value (`kaya:enc:v1:...`) of a stored event is shown as."""
DEFAULT_PAGE = 100
MAX_PAGE = 1000
JSON = "application/json"


class TooLarge(BadRequest):
    """A body over `ingress.max_body`: `bad_request` in the body, 413 on HTTP."""


def status_for(code: str) -> int:
    """The HTTP status of a contract code (`ok` included); 500 for a code not in v1."""
    return STATUS.get(code, 500)


def _error(exc: KayaError, status: int | None = None) -> Response:
    return _reply(error_reply(exc.code, exc.message), exc.code, status=status)


def _reply(
    body: bytes, code: str, *, status: int | None = None, traceparent: str | None = None
) -> Response:
    headers: dict[str, str] = {}
    if traceparent:
        headers[HEADER_TRACEPARENT] = traceparent
    if code in ("overloaded", "unavailable"):
        headers["Retry-After"] = "1"
    elif code == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return Response(body, status or status_for(code), headers=headers, media_type=JSON)


_page_encoder = msgspec.json.Encoder()


def _mask(value: Any) -> tuple[Any, bool]:
    """`value` with every sealed string replaced by MASK, and whether any was."""
    if isinstance(value, str):
        return (MASK, True) if value.startswith(SEALED_PREFIX) else (value, False)
    if isinstance(value, dict):
        masked = False
        out = {}
        for key, item in value.items():
            out[key], hit = _mask(item)
            masked |= hit
        return out, masked
    if isinstance(value, list):
        pairs = [_mask(item) for item in value]
        return [p[0] for p in pairs], any(p[1] for p in pairs)
    return value, False


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise BadRequest(f"query parameter {name}={text!r} must be an integer {low}-{high}")
    return int(text)


class Gateway:
    """The Starlette app of one node: `Gateway(...).app`."""

    def __init__(
        self,
        nc: NATS,
        app: App,
        store: EventStore,
        *,
        max_body: int,
        timeout: float,
        title: str = "Kaya",
        node: Administered | None = None,
    ) -> None:
        self._nc = nc
        self._registry: Registry = app.registry
        self._store = store
        self._max_body = max_body
        self._timeout = timeout
        self._openapi = orjson.dumps(openapi_document(app, title=title))
        self._docs = docs_html(openapi_document(app, title=title))
        catalog = build_catalog(app.registry, [type(c) for c in app.consumers])
        self._asyncapi = orjson.dumps(render_asyncapi(catalog))
        console = Admin(node).routes() if node is not None else []
        self.app = Starlette(
            routes=[
                *console,
                Route("/openapi.json", self._openapi_json, methods=["GET"]),
                Route("/docs", self._docs_page, methods=["GET"]),
                Route("/asyncapi.json", self._asyncapi_json, methods=["GET"]),
                Route("/v1/views/{name}", self._view, methods=["GET"]),
                Route("/v1/{entity}/{id}", self._command, methods=["POST"]),
                Route("/v1/{entity}/{id}", self._state, methods=["GET"]),
                Route("/v1/{entity}/{id}/events", self._events, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error},
        )

    # ---- endpoints ------------------------------------------------------------------------

    async def _command(self, request: Request) -> Response:
        try:
            entity, entity_id = _names(request)
            body = await self._body(request)
        except KayaError as exc:
            return _error(exc, 413 if isinstance(exc, TooLarge) else None)
        headers = _pass_through(request)
        command_id = request.headers.get(HEADER_IDEMPOTENCY_KEY) or request.headers.get(
            HEADER_COMMAND_ID
        )
        if command_id is not None:
            headers[HEADER_COMMAND_ID] = command_id
        return await self._request(command_subject(entity, entity_id), body, headers)

    async def _state(self, request: Request) -> Response:
        try:
            entity, entity_id = _names(request)
        except KayaError as exc:
            return _error(exc)
        return await self._request(query_subject(entity, entity_id), b"", _pass_through(request))

    async def _events(self, request: Request) -> Response:
        """The history: access is a query's (JWT, policy, unknown entity), read from the
        node's store after it, so the page holds at least the version the query saw."""
        try:
            entity, entity_id = _names(request)
            after = _query_int(request, "after", 0, 0, 2**63 - 1)
            limit = _query_int(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        except KayaError as exc:
            return _error(exc)
        headers = _pass_through(request)
        headers.pop(HEADER_TRACEPARENT, None)
        state = await self._request(query_subject(entity, entity_id), b"", headers)
        if state.status_code != 200:
            return state
        version = orjson.loads(state.body)["version"]
        stored = await self._store.read_stream(entity, entity_id, after, limit + 1)  # +1: more?
        events = []
        for event in stored[:limit]:
            data, masked = _mask(orjson.loads(event.data))
            events.append(
                HttpEvent(
                    version=event.version,
                    type=event.type,
                    schema_version=event.schema_version,
                    data=data,
                    recorded_at=iso_utc(event.recorded_at),
                    event_id=event.event_id,
                    position=event.position,
                    command_id=event.command_id,
                    traceparent=event.traceparent,
                    masked=masked,
                )
            )
        page = EventsPage(
            entity=entity,
            id=entity_id,
            version=max(version, stored[-1].version if stored else 0),
            after=after,
            events=events,
            next=events[-1].version if len(stored) > limit else None,
        )
        return Response(_page_encoder.encode(page), 200, media_type=JSON)

    async def _view(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not TOKEN.fullmatch(name):
            why = f"view name {name!r} must be 1-64 characters of [A-Za-z0-9_-]"
            return _error(BadRequest(why))
        params: dict[str, Any] = {}
        for key in request.query_params:
            values = request.query_params.getlist(key)
            params[key] = values[0] if len(values) == 1 else values
        headers = _pass_through(request)
        return await self._request(view_subject(name), orjson.dumps(params), headers)

    async def _openapi_json(self, request: Request) -> Response:
        return Response(self._openapi, 200, media_type=JSON)

    async def _asyncapi_json(self, request: Request) -> Response:
        """What `kaya catalog --format asyncapi` writes: the app's channels on NATS."""
        return Response(self._asyncapi, 200, media_type=JSON)

    async def _docs_page(self, request: Request) -> Response:
        return HTMLResponse(self._docs)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's 404 / 405 (no such route or method), with a contract body."""
        assert isinstance(exc, HTTPException)
        message = f"no route {request.method} {request.url.path}: see /docs"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: see /docs"
        return _reply(error_reply("bad_request", message), "bad_request", status=exc.status_code)

    # ---- the NATS side ----------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        """The body, refused (BadRequest, 413) as soon as it is known to exceed max_body."""
        limit = self._max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
        chunks = bytearray()
        async for chunk in request.stream():
            chunks += chunk
            if len(chunks) > limit:
                raise TooLarge(f"body of more than {limit} bytes exceeds the limit of {limit}")
        return bytes(chunks)

    async def _request(self, subject: str, body: bytes, headers: dict[str, str]) -> Response:
        try:
            msg = await self._nc.request(
                subject, body, timeout=self._timeout, headers=headers or None
            )
        except nats.errors.NoRespondersError:
            return _reply(
                error_reply("unavailable", f"no node serves {subject} right now; retry"),
                "unavailable",
            )
        except nats.errors.TimeoutError:
            return _reply(
                error_reply("timeout", f"no reply from the node within {self._timeout:g}s"),
                "timeout",
            )
        except nats.errors.Error as exc:  # connection closed, draining, reconnecting
            log.warning("gateway request on %s failed: %r", subject, exc)
            return _reply(
                error_reply("unavailable", "the gateway cannot reach NATS right now; retry"),
                "unavailable",
            )
        reply_headers = msg.headers or {}
        code = remembered_answer(msg.data).outcome
        return _reply(msg.data, code, traceparent=reply_headers.get(HEADER_TRACEPARENT))


def _names(request: Request) -> tuple[str, str]:
    params = request.path_params
    return check_entity_name(params["entity"]), check_entity_id(params["id"])


def _pass_through(request: Request) -> dict[str, str]:
    headers = {}
    for name in (HEADER_TRACEPARENT, HEADER_AUTHORIZATION):
        value = request.headers.get(name)
        if value is not None:
            headers[name] = value
    return headers


class Served(Administered, Protocol):
    """What the gateway needs of a running node (kaya.app.node.Node has it)."""

    @property
    def url(self) -> str: ...


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the node (`kaya run`) owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(address: str) -> socket.socket:
    """A listening socket for `http.address`; OSError naming it if it cannot be bound."""
    parsed = metrics_address(address, "http.address")
    assert parsed is not None
    host, port = parsed
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(f"cannot serve HTTP on {address}: {exc.strerror or exc}") from None


async def serve_gateway(
    node: Served, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve the gateway of `node` on `http.address` until cancelled; `task_status` gets
    its base URL once it listens. With security on it connects as the `client` role."""
    config = node.config
    nc = node.nc
    own: NATS | None = None
    if config.security.enabled:  # the node's role may not send commands: a client's may
        from kaya.app.broker.adapter import connect
        from kaya.app.security.pki import Pki

        tls = Pki(config.security_dir).role("client").ssl_context()
        nc = own = await connect(
            node.url, name=f"{config.node.name}-http", timeout=config.nats.startup_timeout, tls=tls
        )
    try:
        gateway = Gateway(
            nc,
            node.app,
            node.store,
            max_body=config.ingress.max_body,
            timeout=config.http.request_timeout,
            title=f"Kaya ({config.node.app or 'app'})",
            node=node,
        )
        sock = bind(config.http.address)
        host, port = sock.getsockname()[:2]
        server = _Server(
            uvicorn.Config(
                gateway.app,
                lifespan="off",
                access_log=False,
                log_config=None,
                ws="none",
                timeout_graceful_shutdown=5,
            )
        )
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[sock])
        shown = f"[{host}]" if ":" in host else host
        task_status.started(f"http://{shown}:{port}")
        started = time.monotonic()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                server.should_exit = True
                await server.shutdown(sockets=[sock])
                log.debug("HTTP gateway stopped after %.0fs", time.monotonic() - started)
    finally:
        if own is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await own.close()
