"""The web console (`/console`) and the JSON it reads (`/v1/admin/...`), served by the gateway.

    GET  /console                   index.html, console.js, console.css (package data, no build)
    GET  /v1/admin/status           the node: `kaya status`'s snapshot, shard owners, entities
    GET  /v1/admin/sagas            the latest sagas: in flight, failed (why), completed
    GET  /v1/admin/dlq?consumer=C   dead letters (KAYA_DLQ), oldest first
    GET  /v1/admin/dlq/<seq>        one, with its headers and data
    POST /v1/admin/dlq/replay       {"seq": N} | {"consumer": C} | {}: through the consumer again
    POST /v1/admin/dlq/purge        {"confirm": true[, "consumer": C]}: deleted for good
    GET  /v1/admin/schemas          the schema registry (`kaya_schemas`; the app's if empty)

Authorization: with `[security.jwt]` on, every `/v1/admin/*` request needs a bearer token
the node's issuer signed (401 without or invalid) whose claims hold `"admin": true` (403
without); the console sends the token it keeps in sessionStorage. With JWTs off the
endpoints are as open as the rest of the gateway. The entity browser uses the contract's
own `/v1/<entity>/<id>` and `/events`, so the app's policy decides there.

The DLQ operations are `kaya dlq`'s (app/events/dlq.py) on the node's connection and store;
a replay runs the letter through this node's bound consumer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kaya.actors.errors import BadRequest, Forbidden, KayaError
from kaya.actors.saga import Saga
from kaya.actors.sealing import PREFIX as SEALED_PREFIX
from kaya.actors.wire import DLQ_STREAM, TOKEN, error_reply, iso_utc
from kaya.app.events import dlq
from kaya.app.observability.health import node_status, status_json
from kaya.app.observability.statistics import NodeStatistics
from kaya.app.schemas.registry import code_schemas, read_registry
from kaya.store import EventStore

if TYPE_CHECKING:
    from kaya.app.application import App
    from kaya.app.cluster.leases import LeaseKeeper
    from kaya.app.config import Config
    from kaya.app.security.tokens import TokenVerifier

CONSOLE_DIR: Final = Path(__file__).resolve().parent / "console"
CONSOLE_FILES: Final[Mapping[str, str]] = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The console runs only its own files: no inline script, nothing from elsewhere."""
JSON: Final = "application/json"
MAX_ADMIN_BODY: Final = 4096
DEFAULT_LIMIT: Final = 200
MAX_LIMIT: Final = 10_000
MASK: Final = "***"


class Administered(Protocol):
    """What the console needs of a running node (kaya.app.node.Node has it)."""

    @property
    def config(self) -> Config: ...
    @property
    def nc(self) -> NATS: ...
    @property
    def store(self) -> EventStore: ...
    @property
    def app(self) -> App: ...
    @property
    def consumers(self) -> Mapping[str, object]: ...
    @property
    def keeper(self) -> LeaseKeeper | None: ...
    async def statistics(self) -> NodeStatistics: ...


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS), status, media_type=JSON)


def _error(exc: KayaError, status: int) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(error_reply(exc.code, exc.message), status, headers=headers, media_type=JSON)


_STATUS: Final[Mapping[str, int]] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "unavailable": 503,
}


def _masked(value: Any) -> Any:
    """`value` with every sealed string (`kaya:enc:v1:...`) shown as `***`."""
    if isinstance(value, str):
        return MASK if value.startswith(SEALED_PREFIX) else value
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def _decoded(data: bytes) -> Any:
    """A payload as JSON (sealed values masked) if it is JSON, else its text."""
    try:
        return _masked(orjson.loads(data))
    except orjson.JSONDecodeError:
        return data.decode(errors="replace")


def _limit(request: Request) -> int:
    text = request.query_params.get("limit", str(DEFAULT_LIMIT))
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequest(f"query parameter limit={text!r} must be an integer 1-{MAX_LIMIT}")
    return int(text)


def _consumer_name(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not TOKEN.fullmatch(value):
        raise BadRequest(f"consumer {value!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return value


Handler = Callable[[Request], Awaitable[Response]]


class Admin:
    """The console's files and `/v1/admin/*` of one node: `Admin(node).routes()`."""

    def __init__(self, node: Administered) -> None:
        self._node = node
        self._verifier: TokenVerifier | None = None
        if node.config.security.jwt.enabled:
            from kaya.app.security.tokens import TokenVerifier  # PyJWT only when it is on

            self._verifier = TokenVerifier.from_config(node.config)
        self._files = {name: (CONSOLE_DIR / name).read_bytes() for name in CONSOLE_FILES}

    def routes(self) -> list[Route]:
        """Before the gateway's `/v1/{entity}/{id}`, which `/v1/admin/status` also matches."""
        guard = self._guarded
        return [
            Route("/console", self._page, methods=["GET"]),
            Route("/console/", self._page, methods=["GET"]),
            Route("/console/{name}", self._file, methods=["GET"]),
            Route("/v1/admin/status", guard(self._status), methods=["GET"]),
            Route("/v1/admin/sagas", guard(self._sagas), methods=["GET"]),
            Route("/v1/admin/dlq", guard(self._dlq_list), methods=["GET"]),
            Route("/v1/admin/dlq/replay", guard(self._dlq_replay), methods=["POST"]),
            Route("/v1/admin/dlq/purge", guard(self._dlq_purge), methods=["POST"]),
            Route("/v1/admin/dlq/{seq:int}", guard(self._dlq_show), methods=["GET"]),
            Route("/v1/admin/schemas", guard(self._schemas), methods=["GET"]),
        ]

    # ---- the page -----------------------------------------------------------------------

    async def _page(self, request: Request) -> Response:
        return self._serve("index.html")

    async def _file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in CONSOLE_FILES:
            message = f"no route GET {request.url.path}: see /console"
            return Response(error_reply("bad_request", message), 404, media_type=JSON)
        return self._serve(name)

    def _serve(self, name: str) -> Response:
        headers = {
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        return Response(self._files[name], 200, headers=headers, media_type=CONSOLE_FILES[name])

    # ---- authorization, errors ----------------------------------------------------------------

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except KayaError as exc:
                return _error(exc, _STATUS.get(exc.code, 500))
            except KeyError:
                raise  # a bug, not a missing letter
            except LookupError as exc:
                return _error(BadRequest(str(exc).strip("'\"")), 404)
            except nats.errors.Error as exc:  # no reply in time, reconnecting, closed
                message = f"the node cannot reach NATS right now ({type(exc).__name__}); retry"
                return Response(error_reply("unavailable", message), 503, media_type=JSON)

        return guarded

    def _authorize(self, request: Request) -> None:
        if self._verifier is None:
            return
        caller = self._verifier.verify(request.headers.get("authorization"))
        if caller.claims.get("admin") is not True:
            raise Forbidden(
                f"{caller.subject!r} may not use the console: /v1/admin needs a token"
                ' with the claim "admin": true'
            )

    async def _body(self, request: Request) -> dict[str, Any]:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_ADMIN_BODY:
                raise BadRequest(f"body of more than {MAX_ADMIN_BODY} bytes")
        if not data.strip():
            return {}
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    # ---- the node ------------------------------------------------------------------------

    async def _status(self, request: Request) -> Response:
        node = self._node
        status = node_status(await node.statistics())
        owners: dict[int, dict[str, Any]] = {}
        nodes: list[str] = []
        keeper = node.keeper
        if keeper is not None:
            table = keeper.table  # replaced whole by the keeper's thread: one read
            found = {
                shard: {"node": owner, "epoch": epoch, "state": state}
                for shard, (owner, epoch, state) in table.owners.items()
            }
            me = keeper.settings.node
            for shard, lease in list(keeper.leases.items()):  # newer than the table's read
                found[shard] = {"node": me, "epoch": lease.epoch, "state": lease.state}
            owners = dict(sorted(found.items()))
            nodes = sorted({*table.nodes, me})
        status["shard_owners"] = owners
        status["nodes"] = nodes
        status["entities"] = [entity.name for entity in node.app.registry]
        status["app_consumers"] = [consumer.name for consumer in node.app.consumers]
        return Response(status_json(status), 200, media_type=JSON)

    async def _sagas(self, request: Request) -> Response:
        """The latest event of each saga, newest first: in flight until a terminal one."""
        limit = _limit(request)
        wanted = request.query_params.get("status", "all")
        if wanted not in ("all", "in_flight", "failed", "completed"):
            raise BadRequest(f"status={wanted!r} must be all, in_flight, failed or completed")
        sagas: list[dict[str, Any]] = []
        counts = {"in_flight": 0, "failed": 0, "completed": 0}
        for entity in self._node.app.registry:
            if not isinstance(entity, Saga):
                continue
            rows = await self._node.store.query(
                "SELECT e.entity_id, e.version, e.type, e.data, e.recorded_at, e.traceparent"
                " FROM events e JOIN ("
                "  SELECT entity_id, MAX(version) AS v FROM events WHERE entity = ?"
                "  GROUP BY entity_id"
                ") last ON e.entity_id = last.entity_id AND e.version = last.v"
                " WHERE e.entity = ? ORDER BY e.position DESC",
                (entity.name, entity.name),
            )
            for entity_id, version, type_name, data, recorded_at, traceparent in rows:
                status = _saga_status(type_name, entity.terminal_events)
                counts[status] += 1
                if wanted not in ("all", status) or len(sagas) >= limit:
                    continue
                body = _decoded(bytes(data))
                reason = body.get("reason") if isinstance(body, dict) else None
                sagas.append(
                    {
                        "entity": entity.name,
                        "id": entity_id,
                        "status": status,
                        "version": version,
                        "last_event": type_name,
                        "reason": reason if isinstance(reason, str) else "",
                        "updated_at": iso_utc(recorded_at),
                        "traceparent": traceparent,
                    }
                )
        return _json({"ok": True, "counts": counts, "sagas": sagas})

    # ---- dead letters ----------------------------------------------------------------------

    async def _dlq_list(self, request: Request) -> Response:
        consumer = _consumer_name(request.query_params.get("consumer"))
        limit = _limit(request)
        js = self._node.nc.jetstream()
        try:
            total = (await js.stream_info(DLQ_STREAM)).state.messages
        except NotFoundError:
            total, letters = 0, []
        else:
            letters = await dlq.list_dead_letters(js, consumer, limit=limit)
        return _json(
            {
                "ok": True,
                "total": total,
                "consumers": [c.name for c in self._node.app.consumers],
                "letters": [letter.summary() for letter in letters],
            }
        )

    async def _dlq_show(self, request: Request) -> Response:
        letter = await dlq.show_dead_letter(self._node.nc.jetstream(), request.path_params["seq"])
        return _json(
            {
                "ok": True,
                **letter.summary(),
                "event_id": letter.event_id,
                "original_seq": letter.original_seq,
                "headers": letter.headers,
                "data": _decoded(letter.data),
            }
        )

    async def _dlq_replay(self, request: Request) -> Response:
        body = await self._body(request)
        seq = body.get("seq")
        if seq is not None and (type(seq) is not int or seq < 1):
            raise BadRequest(f"seq must be a positive integer, not {seq!r}")
        consumer = _consumer_name(body.get("consumer"))
        node = self._node
        bound = {c.name: c for c in node.app.consumers if c.name in node.consumers}
        outcome = await dlq.replay_dead_letters(
            node.nc.jetstream(),
            node.store,
            bound,
            consumer=consumer,
            seq=seq,
            registry=node.app.registry,
        )
        return _json(
            {
                "ok": True,
                "replayed": outcome.replayed,
                "skipped": outcome.skipped,
                "failed": {str(seq): why for seq, why in outcome.failed.items()},
            }
        )

    async def _dlq_purge(self, request: Request) -> Response:
        body = await self._body(request)
        if body.get("confirm") is not True:
            raise BadRequest('purging deletes dead letters for good: send {"confirm": true}')
        consumer = _consumer_name(body.get("consumer"))
        if self._node.config.security.enabled:  # permissions.py: purging is the admin role's
            raise Forbidden(
                "with [security] on, the node's certificate may not purge streams:"
                " run `kaya dlq purge` with the admin role's"
            )
        purged = await dlq.purge_dead_letters(self._node.nc.jetstream(), consumer)
        return _json({"ok": True, "purged": purged})

    # ---- schemas ---------------------------------------------------------------------------

    async def _schemas(self, request: Request) -> Response:
        schemas = await read_registry(self._node.nc.jetstream())
        source = "kaya_schemas"
        if not schemas:
            schemas, source = code_schemas(self._node.app.registry), "app"
        return _json({"ok": True, "source": source, "schemas": schemas})


def _saga_status(last_type: str, terminal: tuple[str, ...]) -> str:
    if last_type not in terminal:
        return "in_flight"
    return "failed" if "fail" in last_type.lower() else "completed"
