"""`/openapi.json` and `/docs`: the gateway's operations, generated from the app's schemas.

Every entity of the app gets its paths (`/v1/<entity>/{id}`: POST a command, GET the
state; `/v1/<entity>/{id}/events`), every view `/v1/views/<name>`. Command, event and state
schemas are msgspec's JSON Schema of the app's types (`msgspec.json.schema_components`),
named `<entity>.<Type>` so two entities may both have a `Close`. OpenAPI 3.1, whose schema
objects are JSON Schema 2020-12, which is what msgspec writes.

`/docs` is plain HTML rendered from the same document, with no script and nothing from a
CDN: it works offline, behind a firewall and under a strict content security policy.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from kaya.actors.wire import ErrorReply
from kaya.app.http.pages import EventsPage

if TYPE_CHECKING:
    from kaya.app.application import App

ERROR_STATUSES: dict[str, tuple[str, ...]] = {
    "400": ("bad_request",),
    "401": ("unauthorized",),
    "403": ("forbidden",),
    "404": ("unknown_entity", "unknown_command"),
    "409": ("conflict",),
    "413": ("bad_request",),
    "422": ("rejected",),
    "429": ("overloaded",),
    "500": ("internal",),
    "503": ("unavailable",),
    "504": ("timeout",),
}
"""Error responses and the contract codes they carry."""
_READ_ERRORS = ("400", "401", "403", "404", "429", "500", "503", "504")
_VIEW_ERRORS = ("400", "401", "403", "500", "503", "504")


def _errors(statuses: tuple[str, ...]) -> dict[str, Any]:
    return {status: {"$ref": f"#/components/responses/{status}"} for status in statuses}


def _id_parameter() -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "the entity id",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
    }


def _header(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string", **schema},
    }


def openapi_document(app: App, *, title: str = "Kaya") -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s gateway."""
    shared_refs, schemas = msgspec.json.schema_components(
        [ErrorReply, EventsPage], ref_template="#/components/schemas/{name}"
    )
    error_ref, page_ref = shared_refs
    paths: dict[str, Any] = {}
    trace = _header(
        "traceparent",
        "W3C trace context: kept with the events; the reply carries the command's back",
        pattern="^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    )
    for entity in app.registry:
        name = entity.name
        template = f"#/components/schemas/{name}.{{name}}"
        types = [*entity.command_types, entity.state_type, *entity.event_types]
        refs, components = msgspec.json.schema_components(types, ref_template=template)
        schemas.update({f"{name}.{key}": value for key, value in components.items()})
        commands = refs[: len(entity.command_types)]
        state = refs[len(entity.command_types)]
        events = refs[len(entity.command_types) + 1 :]
        mapping = {
            t.__name__: ref["$ref"] for t, ref in zip(entity.command_types, commands, strict=True)
        }
        command_reply = {
            "type": "object",
            "required": ["ok", "entity", "id", "version", "events"],
            "properties": {
                "ok": {"const": True},
                "entity": {"const": name},
                "id": {"type": "string"},
                "version": {"type": "integer", "description": "the entity's version after it"},
                "events": {"type": "array", "items": {"oneOf": list(events)}},
            },
        }
        state_reply = {
            "type": "object",
            "required": ["ok", "entity", "id", "version", "state"],
            "properties": {
                "ok": {"const": True},
                "entity": {"const": name},
                "id": {"type": "string"},
                "version": {"type": "integer", "description": "0: no events yet"},
                "state": state,
            },
        }
        names = ", ".join(mapping)
        paths[f"/v1/{name}/{{id}}"] = {
            "parameters": [_id_parameter()],
            "post": {
                "operationId": f"{name}_command",
                "tags": [name],
                "summary": f"Send a command to one {name} ({names})",
                "description": "Kaya's `kaya.cmd` request over HTTP. A failed command changes"
                " nothing. Sending the same `Idempotency-Key` again returns the first reply"
                " without a second effect (`409 conflict` if the body differs).",
                "parameters": [
                    _header(
                        "Idempotency-Key",
                        "the command id (Kaya-Command-Id): 1-128 printable ASCII characters",
                        pattern="^[\\x21-\\x7e]{1,128}$",
                    ),
                    trace,
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": list(commands),
                                "discriminator": {"propertyName": "type", "mapping": mapping},
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "done: the version after it and the events it recorded",
                        "content": {"application/json": {"schema": command_reply}},
                    },
                    **_errors(tuple(ERROR_STATUSES)),
                },
            },
            "get": {
                "operationId": f"{name}_state",
                "tags": [name],
                "summary": f"The state of one {name}",
                "parameters": [trace],
                "responses": {
                    "200": {
                        "description": "the current state",
                        "content": {"application/json": {"schema": state_reply}},
                    },
                    **_errors(_READ_ERRORS),
                },
            },
        }
        paths[f"/v1/{name}/{{id}}/events"] = {
            "parameters": [_id_parameter()],
            "get": {
                "operationId": f"{name}_events",
                "tags": [name],
                "summary": f"The history of one {name}, paged",
                "description": "Events with version > `after`, oldest first, from the node's"
                " store; `next` is the `after` of the next page. Fields sealed at rest"
                " (`kaya:enc:v1:...`, with `[security]` on) are shown as `***`"
                " (`masked: true`); the state shows them to a caller allowed to read it.",
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "default": 0},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1000,
                            "default": 100,
                        },
                    },
                ],
                "responses": {
                    "200": {
                        "description": "a page of events",
                        "content": {"application/json": {"schema": page_ref}},
                    },
                    **_errors(_READ_ERRORS),
                },
            },
        }
    for view in sorted(app.views):
        paths[f"/v1/views/{view}"] = {
            "get": {
                "operationId": f"view_{view}",
                "tags": ["views"],
                "summary": f"The view {view}",
                "description": "Query parameters are the view's parameters, as strings"
                ' (`?currency=EUR` is `{"currency": "EUR"}`; a repeated key a list).',
                "parameters": [
                    {
                        "name": "params",
                        "in": "query",
                        "style": "form",
                        "explode": True,
                        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "the view's answer",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["ok", "view"],
                                    "properties": {
                                        "ok": {"const": True},
                                        "view": {"const": view},
                                    },
                                }
                            }
                        },
                    },
                    **_errors(_VIEW_ERRORS),
                },
            }
        }
    responses = {
        status: {
            "description": f"{' or '.join(codes)}"
            + (" (body over ingress.max_body)" if status == "413" else ""),
            "content": {"application/json": {"schema": error_ref}},
        }
        for status, codes in ERROR_STATUSES.items()
    }
    for status in ("429", "503"):
        responses[status]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": "v1",
            "description": "The Kaya wire contract (v1) over HTTP. Each request is sent to the"
            " node over NATS, as any client's: where `[security.jwt]` is on, every"
            " operation needs `Authorization: Bearer <JWT>`.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{}, {"bearer": []}],
    }


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ccc;margin-top:2rem}
.op{margin:1rem 0;padding:.5rem 1rem;border-left:4px solid #888;background:#f7f7f7}
.post{border-color:#2a7} .get{border-color:#27a}
code,pre{background:#eee;padding:.1rem .3rem} pre{padding:.5rem;overflow:auto}
.method{font-weight:bold;text-transform:uppercase;margin-right:.5rem}
"""


def _pre(value: Any) -> str:
    return f"<pre>{html.escape(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())}</pre>"


def docs_html(document: dict[str, Any]) -> str:
    """A static HTML page of `document`'s operations and schemas (no script, no CDN)."""
    e = html.escape
    info = document["info"]
    schemas = document["components"]["schemas"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(info['title'])}: HTTP API</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(info['title'])}: HTTP API {e(info['version'])}</h1>",
        f"<p>{e(info['description'])}</p>",
        "<p>The machine-readable document: <a href='/openapi.json'>/openapi.json</a>;"
        " the NATS side (commands, queries, views, events, notifications, dead letters) as"
        " AsyncAPI: <a href='/asyncapi.json'>/asyncapi.json</a>."
        ' Errors are <code>{"ok": false, "error": {"code": C, "message": M}}</code>'
        " with the HTTP status of their code:</p><ul>",
    ]
    for status, response in document["components"]["responses"].items():
        parts.append(f"<li><code>{e(status)}</code> {e(response['description'])}</li>")
    parts.append("</ul>")
    tag = None
    for path, item in document["paths"].items():
        for method in ("post", "get"):
            op = item.get(method)
            if op is None:
                continue
            if op["tags"][0] != tag:
                tag = op["tags"][0]
                parts.append(f"<h2>{e(tag)}</h2>")
            parts.append(
                f"<div class='op {method}' id='{e(op['operationId'])}'>"
                f"<p><span class='method'>{method}</span><code>{e(path)}</code>"
                f" {e(op['summary'])}</p>"
            )
            if "description" in op:
                parts.append(f"<p>{e(op['description'])}</p>")
            params = [*item.get("parameters", []), *op.get("parameters", [])]
            if params:
                parts.append("<p>Parameters: ")
                parts.append(
                    ", ".join(
                        f"<code>{e(p['name'])}</code> ({e(p['in'])})"
                        + (f": {e(p['description'])}" if "description" in p else "")
                        for p in params
                    )
                )
                parts.append("</p>")
            body = op.get("requestBody")
            if body is not None:
                parts.append("<p>Body, one of:</p>")
                for ref in body["content"]["application/json"]["schema"]["oneOf"]:
                    key = ref["$ref"].rsplit("/", 1)[-1]
                    parts.append(f"<details><summary><code>{e(key)}</code></summary>")
                    parts.append(_pre(schemas[key]) + "</details>")
            parts.append("</div>")
    parts.append("<h2>Schemas</h2>")
    for key, schema in schemas.items():
        parts.append(f"<details><summary><code>{e(key)}</code></summary>{_pre(schema)}</details>")
    parts.append("</body></html>")
    return "".join(parts)
