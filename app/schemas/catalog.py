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
from dataclasses import dataclass
from typing import Any

import msgspec

from kaya.actors import Entity, Registry
from kaya.actors.wire import AnyReply, subscribes
from kaya.app.events.consumers import Consumer
from kaya.app.schemas.registry import SCHEMAS_BUCKET, Kind, resolved, schema_key, type_schema

API_VERSION = "1.0.0"
"""The wire contract's version (DESIGN.md: "Wire contract (v1)")."""


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
    return Catalog(types, entries)


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


def render_asyncapi(catalog: Catalog) -> dict[str, Any]:
    """An AsyncAPI 3.0.0 document: per entity, its command and event channels."""
    classes = [t.cls for t in catalog.types]
    refs, schemas = msgspec.json.schema_components(
        [*classes, AnyReply], ref_template="#/components/schemas/{name}"
    )
    keys = [schema_key(t.entity, t.name, t.version) for t in catalog.types]
    payload = dict(zip(keys, refs[:-1], strict=True))
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for entity in catalog.entities():
        id_parameter = {"id": {"description": "the entity id: 1-64 characters of [A-Za-z0-9_-]"}}
        for kind, channel, action, address in (
            ("command", f"{entity}Commands", "send", f"kaya.cmd.{entity}.{{id}}"),
            ("event", f"{entity}Events", "receive", f"kaya.evt.{entity}.{{id}}"),
        ):
            entries = catalog.of(entity, kind)  # type: ignore[arg-type]
            channels[channel] = {
                "address": address,
                "title": f"{entity} {kind}s",
                "parameters": id_parameter,
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
                operation["reply"] = {"channel": {"$ref": "#/channels/replies"}}
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
    channels["replies"] = {
        "address": None,
        "title": "replies",
        "description": "the requester's inbox (NATS request/reply)",
        "messages": {"reply": {"$ref": "#/components/messages/reply"}},
    }
    messages["reply"] = {
        "name": "reply",
        "title": "command reply",
        "summary": '{"ok": true, ...} after the events are durable, or {"ok": false, "error": ...}',
        "contentType": "application/json",
        "payload": refs[-1],
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Kaya",
            "version": API_VERSION,
            "description": (
                "Commands on kaya.cmd.<entity>.<id> (request/reply) and events on"
                " kaya.evt.<entity>.<id> (JetStream stream KAYA_EVENTS). Generated by"
                " `kaya catalog --format asyncapi`."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
