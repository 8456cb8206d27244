"""The event dictionary (`kaya catalog`): every command and event, read from the code alone.

    registry (entities: types, versions, upcasters, the `decide` source)
      + consumer classes (subjects, accepts)
      -> Catalog -> docs/events.md (Markdown) and docs/asyncapi.json (AsyncAPI 3.0.0)

Which command triggers which event is read from the `match` statement of each
entity's `decide`: a `case` whose body constructs events names its pattern as
their trigger (`case Deposit(amount=n): return [Deposited(...)]` -> Deposit).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kaya.actors import Entity, Registry
from kaya.actors.wire import (
    HEADER_ATTEMPTS,
    HEADER_AUTHORIZATION,
    HEADER_CONSUMER,
    HEADER_EVENT_ID,
    HEADER_LAST_ERROR,
    HEADER_MSG_ID,
    HEADER_ORIGINAL_SEQUENCE,
    HEADER_ORIGINAL_SUBJECT,
    HEADER_TRACEPARENT,
    AnyReply,
    subscribes,
)
from kaya.app.events.consumers import Consumer
from kaya.app.schemas.registry import SCHEMAS_BUCKET, Kind, resolved, schema_key, type_schema

API_VERSION = "1.0.0"
"""The wire contract's version (DESIGN.md: "Wire contract (v1)")."""

LOCAL_SERVER = "127.0.0.1:4222"
"""Where `kaya run` starts its embedded nats-server when no NATS URL is configured."""


@dataclass(frozen=True)
class TypeEntry:
    entity: str
    kind: Kind
    name: str
    version: int
    cls: type[msgspec.Struct]
    upcast_from: tuple[int, ...]
    """Versions with an upcaster to the next one."""
    triggers: tuple[str, ...]
    """Events: the `decide` cases that emit it. Commands: the events it may emit."""
    consumers: tuple[str, ...]

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(range(1, self.version + 1))

    @property
    def schema(self) -> dict[str, Any]:
        return type_schema(self.entity, self.kind, self.cls, self.version)

    @property
    def summary(self) -> str:
        return _summary(self.cls.__doc__)


@dataclass(frozen=True)
class ConsumerEntry:
    name: str
    subject: str
    accepts: dict[str, list[int]] | None
    policy: str
    summary: str


@dataclass(frozen=True)
class Catalog:
    types: list[TypeEntry]
    consumers: list[ConsumerEntry]
    states: dict[str, type[msgspec.Struct]] = field(default_factory=dict)
    """Per entity, its state type (what `kaya.qry.<entity>.<id>` answers)."""

    def entities(self) -> list[str]:
        return list(dict.fromkeys(t.entity for t in self.types))

    def of(self, entity: str, kind: Kind) -> list[TypeEntry]:
        return [t for t in self.types if t.entity == entity and t.kind == kind]


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    return inspect.cleandoc(doc or "").split("\n\n")[0].replace("\n", " ")


def decide_cases(entity: Entity[Any, Any, Any]) -> list[tuple[str, list[str]]]:
    """(trigger, events) for each `case` of `decide` that constructs events."""
    try:
        source = textwrap.dedent(inspect.getsource(type(entity).decide))
    except (OSError, TypeError):
        return []
    events = set(entity.event_versions)
    cases: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.match_case):
            emitted = [
                call.func.id
                for call in ast.walk(node)
                if isinstance(call, ast.Call)
                and isinstance(call.func, ast.Name)
                and call.func.id in events
            ]
            if emitted:
                cases.append((_trigger(node.pattern), list(dict.fromkeys(emitted))))
    return cases


def _trigger(pattern: ast.pattern) -> str:
    if isinstance(pattern, ast.MatchClass):
        fixed = [
            f"{attr}={ast.unparse(p.value) if isinstance(p, ast.MatchValue) else p.value}"
            for attr, p in zip(pattern.kwd_attrs, pattern.kwd_patterns, strict=True)
            if isinstance(p, ast.MatchValue | ast.MatchSingleton)
        ]
        name = ast.unparse(pattern.cls)
        return f"{name}({', '.join(fixed)})" if fixed else name
    if isinstance(pattern, ast.MatchOr):
        return " | ".join(_trigger(p) for p in pattern.patterns)
    return ast.unparse(pattern)


def build_catalog(registry: Registry, consumers: Sequence[type[Consumer]]) -> Catalog:
    types: list[TypeEntry] = []
    for entity in registry:
        cases = decide_cases(entity)
        upcasts: dict[str, list[int]] = {}
        for type_name, version in sorted(entity.upcasters):
            upcasts.setdefault(type_name, []).append(version)
        for command in entity.command_types:
            name = command.__name__
            emits = [e for when, events in cases if when.split("(")[0] == name for e in events]
            types.append(
                TypeEntry(
                    entity.name,
                    "command",
                    name,
                    command.schema_version,
                    command,
                    (),
                    tuple(dict.fromkeys(emits)),
                    (),
                )
            )
        for event in entity.event_types:
            name = event.__name__
            readers = tuple(
                c.name
                for c in consumers
                if subscribes(c.filter_subject, f"kaya.evt.{entity.name}.id")
                and (c.accepts is None or name in c.accepts)
            )
            types.append(
                TypeEntry(
                    entity.name,
                    "event",
                    name,
                    event.schema_version,
                    event,
                    tuple(upcasts.get(name, ())),
                    tuple(trigger for trigger, events in cases if name in events),
                    readers,
                )
            )
    entries = [
        ConsumerEntry(
            c.name,
            c.filter_subject,
            None if c.accepts is None else {t: sorted(v) for t, v in sorted(c.accepts.items())},
            c.unknown_event_policy,
            _summary(c.__doc__ or getattr(inspect.getmodule(c), "__doc__", None)),
        )
        for c in consumers
    ]
    return Catalog(types, entries, {entity.name: entity.state_type for entity in registry})


# ---- Markdown -------------------------------------------------------------------------------


def _field(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        text = " \\| ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in schema["enum"])
    elif "anyOf" in schema:
        text = " or ".join(_field(option) for option in schema["anyOf"])
    else:
        text = str(schema.get("type", "any"))
        if "items" in schema:
            text += f" of {_field(schema['items'])}"
        limits = [
            f"{k} {v}"
            for k, v in schema.items()
            if k not in ("type", "items", "default", "properties", "required")
        ]
        if limits:
            text += f" ({', '.join(limits)})".replace("|", "\\|")
    return text


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _fields(entry: TypeEntry) -> str:
    root = resolved(entry.schema)
    required = set(root.get("required", ()))
    parts = []
    for name, schema in root.get("properties", {}).items():
        if name == "type":
            continue
        default = "" if name in required else f" = {_json(schema.get('default'))}"
        parts.append(f"`{name}`: {_field(schema)}{default}")
    return "<br>".join(parts) or "—"


def _versions(entry: TypeEntry) -> str:
    text = ", ".join(f"v{v}" for v in entry.versions)
    if entry.upcast_from:
        text += " (upcast: " + ", ".join(f"v{v}→v{v + 1}" for v in entry.upcast_from) + ")"
    return text


def render_markdown(catalog: Catalog) -> str:
    lines = [
        "# Event dictionary",
        "",
        "Generated from the code by `kaya catalog --output docs/events.md`; do not edit by",
        "hand (`tests/test_catalog.py` fails when it is out of date). The JSON Schema of every",
        "type and version is in `docs/schemas.json` and, at run time, in the KV bucket",
        f"`{SCHEMAS_BUCKET}` (`nats kv get {SCHEMAS_BUCKET} <entity>.<Type>.v<N>`). Consumers",
        "receive every event in its current version: older ones are upcast first.",
    ]
    for entity in catalog.entities():
        lines += [
            "",
            f"## `{entity}`",
            "",
            f"Commands on `kaya.cmd.{entity}.<id>`, events on `kaya.evt.{entity}.<id>`.",
            "",
            "| command | version | fields | emits |",
            "|---|---|---|---|",
        ]
        for t in catalog.of(entity, "command"):
            emits = ", ".join(f"`{e}`" for e in t.triggers) or "—"
            lines.append(f"| `{t.name}` | v{t.version} | {_fields(t)} | {emits} |")
        lines += [
            "",
            "| event | versions | emitted on | read by | fields |",
            "|---|---|---|---|---|",
        ]
        for t in catalog.of(entity, "event"):
            triggers = "<br>".join(f"`{x}`" for x in t.triggers) or "—"
            readers = ", ".join(t.consumers) or "—"
            lines.append(f"| `{t.name}` | {_versions(t)} | {triggers} | {readers} | {_fields(t)} |")
    lines += [
        "",
        "## Consumers",
        "",
        "| consumer | subscribes to | accepts | unknown type or version | what it does |",
        "|---|---|---|---|---|",
    ]
    for c in catalog.consumers:
        accepts = (
            "whatever the registry knows"
            if c.accepts is None
            else ", ".join(f"`{t}` v{'/'.join(map(str, v))}" for t, v in c.accepts.items())
        )
        lines.append(f"| `{c.name}` | `{c.subject}` | {accepts} | {c.policy} | {c.summary} |")
    return "\n".join(lines) + "\n"


# ---- AsyncAPI 3.0.0 ---------------------------------------------------------------------------


def _string(description: str, **more: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **more}


def _event_headers(entry: TypeEntry) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "Nats-Msg-Id": _string("the event's unique id: the broker drops a republished copy"),
            "Kaya-Event-Type": _string("the event type", const=entry.name),
            "Kaya-Schema-Version": _string(
                f"the payload's schema version; this message is v{entry.version}, older"
                f" versions are registered in the KV bucket {SCHEMAS_BUCKET}",
                enum=[str(v) for v in entry.versions],
            ),
            "Kaya-Entity-Version": _string(
                "1-based position in the entity's stream", pattern="^[1-9][0-9]*$"
            ),
            "Kaya-Position": _string("position in the node's store", pattern="^[1-9][0-9]*$"),
            "Kaya-Command-Id": _string("the idempotency key of the command that caused it"),
            "traceparent": _string("W3C trace context"),
        },
        "required": [
            "Nats-Msg-Id",
            "Kaya-Event-Type",
            "Kaya-Schema-Version",
            "Kaya-Entity-Version",
            "Kaya-Position",
        ],
    }


_COMMAND_HEADERS = {
    "type": "object",
    "properties": {
        "Kaya-Command-Id": _string(
            "idempotency key: a repeat is applied at most once and gets the first reply",
            minLength=1,
            maxLength=128,
        ),
        "traceparent": _string("W3C trace context, kept with the events"),
        "Authorization": _string("Bearer <JWT>, where auth is on"),
    },
}


_ID = {"id": {"description": "the entity id: 1-64 characters of [A-Za-z0-9_-]"}}

_REQUEST_HEADERS = {
    "type": "object",
    "properties": {
        HEADER_TRACEPARENT: _string("W3C trace context"),
        HEADER_AUTHORIZATION: _string("Bearer <JWT>, where auth is on"),
    },
}

_ERROR_REPLY = {
    "type": "object",
    "description": "any failure: nothing changed",
    "properties": {
        "ok": {"const": False},
        "error": {
            "type": "object",
            "properties": {
                "code": {
                    "enum": [
                        "bad_request", "unknown_entity", "unknown_command", "rejected",
                        "conflict", "overloaded", "unauthorized", "forbidden", "unavailable",
                        "timeout", "internal",
                    ]
                },
                "message": {"type": "string"},
            },
            "required": ["code", "message"],
        },
    },
    "required": ["ok", "error"],
}  # fmt: skip

_REPLY_HEADERS = {
    "type": "object",
    "description": "NATS micro's error headers, on error replies only (the body says the same)",
    "properties": {
        "Nats-Service-Error": _string("the error message"),
        "Nats-Service-Error-Code": _string("the error code"),
    },
}


def _state_reply(entity: str, state: dict[str, Any]) -> dict[str, Any]:
    ok = {
        "type": "object",
        "properties": {
            "ok": {"const": True},
            "entity": {"const": entity},
            "id": {"type": "string"},
            "version": {
                "type": "integer",
                "minimum": 0,
                "description": "events in the entity's stream (0: none yet)",
            },
            "state": state,
        },
        "required": ["ok", "entity", "id", "version", "state"],
    }
    return {"oneOf": [ok, _ERROR_REPLY]}


_VIEW_REPLY = {
    "oneOf": [
        {
            "type": "object",
            "description": "the view's own keys beside `ok` and `view`",
            "properties": {"ok": {"const": True}, "view": {"type": "string"}},
            "required": ["ok", "view"],
            "additionalProperties": True,
        },
        _ERROR_REPLY,
    ]
}

_NOTIFICATION = {
    "type": "object",
    "description": (
        "what the app's consumers publish for one subscriber; the reference app's"
        " notifications consumer sends each account event to its owner, and a failed"
        " transfer to the source account's owner (sealed fields masked as ***)"
    ),
    "properties": {
        "dedup_key": _string("the event id: a reader keeps the first message per key"),
        "entity": _string("the entity the event belongs to"),
        "id": _string("the entity id"),
        "version": {"type": "integer", "minimum": 1, "description": "the event's entity version"},
        "event": {"type": "object", "description": "the event, with its `type`"},
        "text": _string("a sentence for a person, where there is one"),
    },
    "required": ["dedup_key", "entity", "id", "version", "event"],
    "additionalProperties": True,
}

_NOTIFICATION_HEADERS = {
    "type": "object",
    "properties": {
        "Kaya-Dedup-Key": _string("the event id, as in the body"),
        HEADER_MSG_ID: _string("the event id: a stream that stores these drops repeats"),
        HEADER_TRACEPARENT: _string("W3C trace context of the event"),
    },
    "required": ["Kaya-Dedup-Key"],
}

_DEAD_LETTER_HEADERS = {
    "type": "object",
    "description": "the event's own Kaya-* headers and traceparent, and these",
    "properties": {
        HEADER_MSG_ID: _string("<consumer>:<event id> (absent on a malformed message)"),
        HEADER_EVENT_ID: _string("the event's id (absent on a malformed message)"),
        HEADER_CONSUMER: _string("the consumer that gave up"),
        HEADER_ORIGINAL_SUBJECT: _string("where the event was: kaya.evt.<entity>.<id>"),
        HEADER_ORIGINAL_SEQUENCE: _string("its sequence in KAYA_EVENTS", pattern="^[0-9]+$"),
        HEADER_ATTEMPTS: _string("deliveries tried", pattern="^[1-9][0-9]*$"),
        HEADER_LAST_ERROR: _string("why the last attempt failed"),
    },
    "required": [
        HEADER_CONSUMER,
        HEADER_ORIGINAL_SUBJECT,
        HEADER_ORIGINAL_SEQUENCE,
        HEADER_ATTEMPTS,
        HEADER_LAST_ERROR,
    ],
}


def _message(
    name: str, title: str, summary: str, payload: dict[str, Any], headers: Any = None
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": "application/json",
    }
    if headers is not None:
        message["headers"] = headers
    message["payload"] = payload
    return message


def _reply_to(*names: str) -> dict[str, Any]:
    return {
        "channel": {"$ref": "#/channels/replies"},
        "messages": [{"$ref": f"#/channels/replies/messages/{n}"} for n in names],
    }


def render_asyncapi(catalog: Catalog) -> dict[str, Any]:
    """An AsyncAPI 3.0.0 document: the local server and every channel a client uses: per
    entity its commands, state queries and events; views, notifications, dead letters."""
    classes = [t.cls for t in catalog.types]
    states = list(catalog.states.items())
    refs, schemas = msgspec.json.schema_components(
        [*classes, *(cls for _, cls in states), AnyReply],
        ref_template="#/components/schemas/{name}",
    )
    keys = [schema_key(t.entity, t.name, t.version) for t in catalog.types]
    payload = dict(zip(keys, refs[: len(keys)], strict=True))
    state_refs = dict(zip((e for e, _ in states), refs[len(keys) : -1], strict=True))
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    replies: dict[str, Any] = {"reply": {"$ref": "#/components/messages/reply"}}
    for entity in catalog.entities():
        for kind, channel, action, address in (
            ("command", f"{entity}Commands", "send", f"kaya.cmd.{entity}.{{id}}"),
            ("event", f"{entity}Events", "receive", f"kaya.evt.{entity}.{{id}}"),
        ):
            entries = catalog.of(entity, kind)  # type: ignore[arg-type]
            channels[channel] = {
                "address": address,
                "title": f"{entity} {kind}s",
                "parameters": _ID,
                "messages": {
                    t.name: {"$ref": f"#/components/messages/{entity}.{t.name}"} for t in entries
                },
            }
            operation: dict[str, Any] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{channel}"},
                "messages": [{"$ref": f"#/channels/{channel}/messages/{t.name}"} for t in entries],
            }
            if kind == "command":
                operation["summary"] = f"Send a command to one {entity} (request/reply)."
                operation["reply"] = _reply_to("reply")
            else:
                operation["summary"] = (
                    f"Every {entity} event, per entity in version order"
                    " (JetStream stream KAYA_EVENTS)."
                )
            operations[f"{action}{entity.capitalize()}{kind.capitalize()}s"] = operation
            for t in entries:
                message: dict[str, Any] = {
                    "name": t.name,
                    "title": f"{entity} {t.name} v{t.version}",
                    "contentType": "application/json",
                    "headers": _event_headers(t) if kind == "event" else _COMMAND_HEADERS,
                    "payload": payload[schema_key(t.entity, t.name, t.version)],
                    "x-kaya": {"entity": entity, "kind": kind, "versions": list(t.versions)},
                }
                if t.summary:
                    message["summary"] = t.summary
                if kind == "event":
                    message["x-kaya"]["emitted-on"] = list(t.triggers)
                    message["x-kaya"]["read-by"] = list(t.consumers)
                else:
                    message["x-kaya"]["emits"] = list(t.triggers)
                messages[f"{entity}.{t.name}"] = message
        queries = f"{entity}Queries"
        channels[queries] = {
            "address": f"kaya.qry.{entity}.{{id}}",
            "title": f"{entity} state",
            "parameters": _ID,
            "messages": {"query": {"$ref": f"#/components/messages/{entity}.query"}},
        }
        messages[f"{entity}.query"] = _message(
            "query",
            f"{entity} state query",
            "an empty body: the reply is the entity's current state",
            {"type": "string", "maxLength": 0, "description": "empty"},
            _REQUEST_HEADERS,
        )
        state = state_refs.get(entity, {"type": "object"})
        messages[f"{entity}.state"] = _message(
            f"{entity}.state",
            f"{entity} state reply",
            '{"ok": true, "entity", "id", "version", "state"} or {"ok": false, "error": ...}',
            _state_reply(entity, state),
            _REPLY_HEADERS,
        )
        replies[f"{entity}.state"] = {"$ref": f"#/components/messages/{entity}.state"}
        operations[f"send{entity.capitalize()}Queries"] = {
            "action": "send",
            "summary": f"Read one {entity}'s state (request/reply, empty body).",
            "channel": {"$ref": f"#/channels/{queries}"},
            "messages": [{"$ref": f"#/channels/{queries}/messages/query"}],
            "reply": _reply_to(f"{entity}.state"),
        }
    channels["views"] = {
        "address": "kaya.view.{name}",
        "title": "read models",
        "parameters": {"name": {"description": "the view's name, as the app registers it"}},
        "messages": {"parameters": {"$ref": "#/components/messages/view.parameters"}},
    }
    messages["view.parameters"] = _message(
        "parameters",
        "view parameters",
        "a JSON object of the view's parameters ({} or an empty body for none)",
        {"type": "object", "additionalProperties": True},
        _REQUEST_HEADERS,
    )
    messages["view.reply"] = _message(
        "view.reply",
        "view reply",
        '{"ok": true, "view": NAME, ...} or {"ok": false, "error": ...}',
        _VIEW_REPLY,
        _REPLY_HEADERS,
    )
    replies["view.reply"] = {"$ref": "#/components/messages/view.reply"}
    operations["sendViewRequests"] = {
        "action": "send",
        "summary": "Read a read model (request/reply), answered from the node's SQLite.",
        "channel": {"$ref": "#/channels/views"},
        "messages": [{"$ref": "#/channels/views/messages/parameters"}],
        "reply": _reply_to("view.reply"),
    }
    channels["notifications"] = {
        "address": "kaya.notify.{token}",
        "title": "notifications",
        "parameters": {
            "token": {
                "description": "the subscriber's subject token (`kaya pseudonym NAME`: the"
                " name itself with security off, an HMAC of it with security on)"
            }
        },
        "messages": {"notification": {"$ref": "#/components/messages/notification"}},
    }
    messages["notification"] = _message(
        "notification",
        "notification",
        "at least once; one per event as far as a reader keeping dedup_key can tell",
        _NOTIFICATION,
        _NOTIFICATION_HEADERS,
    )
    operations["receiveNotifications"] = {
        "action": "receive",
        "summary": "Core NATS: subscribe to kaya.notify.<token> (kaya.notify.> for all).",
        "channel": {"$ref": "#/channels/notifications"},
        "messages": [{"$ref": "#/channels/notifications/messages/notification"}],
    }
    channels["deadLetters"] = {
        "address": "kaya.dlq.{consumer}",
        "title": "dead letters",
        "parameters": {
            "consumer": {
                "description": "the consumer that gave up on the event",
                "enum": [c.name for c in catalog.consumers],
            }
        },
        "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
    }
    messages["deadLetter"] = _message(
        "deadLetter",
        "dead letter",
        "an event a consumer gave up on after its retries, with where it was and why",
        {
            "description": "the original event body, unchanged (a malformed message: its"
            " bytes as they came); its type is in Kaya-Event-Type",
            "anyOf": [
                *(
                    payload[k]
                    for k, t in zip(keys, catalog.types, strict=True)
                    if t.kind == "event"
                ),
                {"description": "a malformed message, as it came"},
            ],
        },
        _DEAD_LETTER_HEADERS,
    )
    operations["receiveDeadLetters"] = {
        "action": "receive",
        "summary": "JetStream stream KAYA_DLQ (`kaya dlq list|show|replay|purge`).",
        "channel": {"$ref": "#/channels/deadLetters"},
        "messages": [{"$ref": "#/channels/deadLetters/messages/deadLetter"}],
    }
    channels["replies"] = {
        "address": None,
        "title": "replies",
        "description": "the requester's inbox (NATS request/reply)",
        "messages": replies,
    }
    messages["reply"] = {
        "name": "reply",
        "title": "command reply",
        "summary": '{"ok": true, ...} after the events are durable, or {"ok": false, "error": ...}',
        "contentType": "application/json",
        "headers": _REPLY_HEADERS,
        "payload": refs[-1],
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Kaya",
            "version": API_VERSION,
            "description": (
                "Commands on kaya.cmd.<entity>.<id> and state queries on kaya.qry.<entity>.<id>"
                " (request/reply), read models on kaya.view.<name>, events on"
                " kaya.evt.<entity>.<id> (JetStream stream KAYA_EVENTS), notifications on"
                " kaya.notify.<token>, dead letters on kaya.dlq.<consumer> (stream KAYA_DLQ)."
                " Generated by `kaya catalog --format asyncapi`."
            ),
        },
        "servers": {
            "local": {
                "host": LOCAL_SERVER,
                "protocol": "nats",
                "description": f"nats://{LOCAL_SERVER}: the nats-server `kaya run` embeds"
                " when no NATS URL is configured",
            }
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
