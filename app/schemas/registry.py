"""Schema registry: the JSON Schema of every command and event type, per version.

    code (msgspec Structs) --msgspec.json.schema--> {"account.Opened.v2": {...}, ...}
      -> on start: JetStream KV bucket `kaya_schemas`, one key per type and version
      -> `kaya schema export`: docs/schemas.json, the committed record (older versions kept)
      -> `kaya schema check`: the code against either; fails on a change that would
         leave stored events unreadable

A registered version never changes: a changed shape is a new `schema_version`. A
new version is compatible with the last registered one when every object valid
for the old schema is valid for the new one (fields kept with the same or a wider
type, every new field with a default), or when the entity has an upcaster from the
old version, which takes responsibility for the difference.

Each schema is msgspec's, plus `x-kaya`: {entity, kind, type, version}.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import orjson
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyDeletedError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from kaya.actors import Registry

log = logging.getLogger("kaya.schemas")

SCHEMAS_BUCKET = "kaya_schemas"
SCHEMAS_FILE = Path("docs/schemas.json")

Kind = Literal["command", "event"]
SchemaSet = dict[str, dict[str, Any]]
"""KV key (`<entity>.<Type>.v<version>`) -> the JSON Schema of that type at that version."""


class SchemaConflict(Exception):
    """The registry holds a different schema under the same type and version."""


def schema_key(entity: str, type_name: str, version: int) -> str:
    return f"{entity}.{type_name}.v{version}"


def type_schema(entity: str, kind: Kind, cls: type[msgspec.Struct], version: int) -> dict[str, Any]:
    meta = {"entity": entity, "kind": kind, "type": cls.__name__, "version": version}
    return {"x-kaya": meta, **msgspec.json.schema(cls)}


def code_schemas(registry: Registry) -> SchemaSet:
    """The current version of every command and event type of the registry's entities."""
    schemas: SchemaSet = {}
    for entity in registry:
        kinds: tuple[tuple[Kind, Iterable[Any]], ...] = (
            ("command", entity.command_types),
            ("event", entity.event_types),
        )
        for kind, types in kinds:
            for cls in types:
                key = schema_key(entity.name, cls.__name__, cls.schema_version)
                if key in schemas:
                    raise ValueError(f"two types of {entity.name} are registered as {key}")
                schemas[key] = type_schema(entity.name, kind, cls, cls.schema_version)
    return sort_schemas(schemas)


def upcaster_keys(registry: Registry) -> set[tuple[str, str, int]]:
    """(entity, event type, from version) of every upcaster the registry's entities have."""
    return {(e.name, t, v) for e in registry for t, v in e.upcasters}


def _order(key: str) -> tuple[str, str, int]:
    entity, type_name, version = key.split(".")
    return entity, type_name, int(version.lstrip("v"))


def sort_schemas(schemas: Mapping[str, dict[str, Any]]) -> SchemaSet:
    return {key: schemas[key] for key in sorted(schemas, key=_order)}


def merge_schemas(recorded: Mapping[str, dict[str, Any]], current: SchemaSet) -> SchemaSet:
    """The record with the code's versions added: older versions stay registered."""
    return sort_schemas({**recorded, **current})


def dump_schemas(schemas: Mapping[str, dict[str, Any]]) -> bytes:
    return orjson.dumps(sort_schemas(schemas), option=orjson.OPT_INDENT_2) + b"\n"


def load_schemas(path: Path) -> SchemaSet:
    """A schema file (`kaya schema export`); a missing file is an empty record."""
    try:
        data: SchemaSet = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    return data


# ---- compatibility ------------------------------------------------------------------------

_ANNOTATIONS = frozenset({"title", "description", "examples", "$comment", "x-kaya"})
_MAPS = frozenset({"properties", "$defs"})  # keys of these are names, not keywords
_LOWER = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


def normalized(schema: Any, *, _in_map: bool = False) -> Any:
    """The schema without annotations (titles, docstrings, examples): what validation sees."""
    if isinstance(schema, dict):
        return {
            k: normalized(v, _in_map=k in _MAPS and not _in_map)
            for k, v in schema.items()
            if _in_map or k not in _ANNOTATIONS
        }
    if isinstance(schema, list):
        return [normalized(v) for v in schema]
    return schema


def resolved(schema: dict[str, Any]) -> dict[str, Any]:
    """The normalized schema of the type itself, every `$ref` to its `$defs` inlined."""
    defs = schema.get("$defs", {})

    def inline(node: Any, seen: frozenset[str]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.rsplit("/", 1)[1]
                return node if name in seen else inline(defs[name], seen | {name})
            return {k: inline(v, seen) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [inline(v, seen) for v in node]
        return node

    root: dict[str, Any] = normalized(inline(schema, frozenset()))
    return root


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why an object valid for `old` (a resolved object schema) may be invalid for `new`."""
    problems: list[str] = []
    old_fields, new_fields = old.get("properties", {}), new.get("properties", {})
    for name, old_field in old_fields.items():
        if name not in new_fields:
            problems.append(f"field {name!r} removed")
        elif not widens(old_field, new_fields[name]):
            problems.append(
                f"field {name!r} changed type: {_brief(old_field)} -> {_brief(new_fields[name])}"
            )
    added = set(new.get("required", ())) - set(old.get("required", ()))
    for name in sorted(added):
        if name in old_fields:
            problems.append(f"field {name!r} became required")
        else:
            problems.append(f"new required field {name!r} has no default")
    return problems


def widens(old: Any, new: Any) -> bool:
    """Whether every value valid for `old` is valid for `new` (a conservative answer)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return bool(old == new)
    old = {k: v for k, v in old.items() if k != "default"}
    new = {k: v for k, v in new.items() if k != "default"}
    if old == new or not new:
        return True
    if "anyOf" in old:
        return all(widens(option, new) for option in old["anyOf"])
    if "anyOf" in new:
        return any(widens(old, option) for option in new["anyOf"])
    if "enum" in old and "enum" in new:
        return all(value in new["enum"] for value in old["enum"])
    if "properties" in old and "properties" in new:
        return not breaking_changes(old, new)
    old_type, new_type = old.get("type"), new.get("type")
    if old_type != new_type and not (old_type == "integer" and new_type == "number"):
        return False
    if not widens(old.get("items", {}), new.get("items", {})):
        return False
    bounds = {*_LOWER, *_UPPER, "type", "items"}
    if {k: v for k, v in old.items() if k not in bounds} != {
        k: v for k, v in new.items() if k not in bounds
    }:
        return False
    looser_below = all(k not in new or (k in old and new[k] <= old[k]) for k in _LOWER)
    looser_above = all(k not in new or (k in old and new[k] >= old[k]) for k in _UPPER)
    return looser_below and looser_above


def _brief(schema: Any) -> str:
    return orjson.dumps(schema).decode()[:120]


@dataclass(frozen=True)
class Finding:
    """One type's verdict: `breaking` findings fail `kaya schema check`."""

    type: str
    """`<entity>.<Type>` and its kind, e.g. `account.Opened (event)`."""
    message: str
    breaking: bool = False


@dataclass(frozen=True)
class CompatibilityReport:
    findings: list[Finding]
    unchanged: int

    @property
    def breaking(self) -> list[Finding]:
        return [f for f in self.findings if f.breaking]

    @property
    def ok(self) -> bool:
        return not self.breaking

    def format(self, against: str) -> str:
        lines = [
            f"{'BREAKING' if f.breaking else 'ok':<8} {f.type}: {f.message}" for f in self.findings
        ]
        verdict = (
            f"{len(self.breaking)} breaking change(s)"
            if self.breaking
            else "compatible: stored events stay readable"
        )
        lines.append(f"schema check against {against}: {verdict}; {self.unchanged} types unchanged")
        return "\n".join(lines)


def _by_type(schemas: Mapping[str, dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, Any]]:
    types: dict[tuple[str, str, str], dict[int, Any]] = {}
    for key, schema in schemas.items():
        meta = schema.get("x-kaya") or {}
        entity, type_name, version = _order(key)
        ident = (str(meta.get("entity", entity)), str(meta.get("kind", "event")), type_name)
        types.setdefault(ident, {})[int(meta.get("version", version))] = schema
    return types


def check_compatibility(
    recorded: Mapping[str, dict[str, Any]],
    current: Mapping[str, dict[str, Any]],
    upcasters: Set[tuple[str, str, int]] = frozenset(),
) -> CompatibilityReport:
    """The code's schemas (`current`) against the registered ones, type by type.

    Breaking: a registered version whose schema changed; a version that went back;
    a type that disappeared (an event type only with an upcaster mapping it away);
    a new version that is not a widening of the last registered one, unless an
    upcaster brings that version's events to the new shape (events only: stored
    commands do not exist, so a command's old bodies must simply stay valid).
    """
    old_types, new_types = _by_type(recorded), _by_type(current)
    findings: list[Finding] = []
    unchanged = 0
    for ident in sorted(old_types.keys() | new_types.keys()):
        entity, kind, name = ident
        label = f"{entity}.{name} ({kind})"
        registered, code = old_types.get(ident, {}), new_types.get(ident, {})
        if not registered:
            findings.extend(Finding(label, f"new, v{v}") for v in sorted(code))
            continue
        latest = max(registered)
        upcast = kind == "event" and (entity, name, latest) in upcasters
        if not code:
            if upcast:
                findings.append(Finding(label, f"removed; v{latest} events are upcast away"))
            else:
                why = "stored events" if kind == "event" else "clients' commands"
                findings.append(
                    Finding(label, f"removed: {why} of v{latest} can no longer be read", True)
                )
            continue
        version = max(code)
        schema = code[version]
        if version < latest:
            findings.append(
                Finding(label, f"code is at v{version} but v{latest} is registered", True)
            )
        elif version in registered:
            if normalized(registered[version]) != normalized(schema):
                findings.append(
                    Finding(
                        label,
                        f"v{version} changed without a new schema_version"
                        f" (registered versions never change: make it v{version + 1})",
                        True,
                    )
                )
            else:
                unchanged += 1
        elif upcast:
            findings.append(Finding(label, f"v{latest} -> v{version}: by upcaster"))
        else:
            problems = breaking_changes(resolved(registered[latest]), resolved(schema))
            hint = f'; add an upcaster for ("{name}", {latest})' if kind == "event" else ""
            findings.extend(
                Finding(label, f"v{latest} -> v{version}: {p}{hint}", True) for p in problems
            )
            if not problems:
                findings.append(Finding(label, f"v{latest} -> v{version}: compatible"))
    return CompatibilityReport(findings, unchanged)


# ---- the registry in JetStream KV ---------------------------------------------------------


async def schema_bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The `kaya_schemas` bucket, created when missing."""
    try:
        return await js.key_value(SCHEMAS_BUCKET)
    except BucketNotFoundError:
        config = KeyValueConfig(
            bucket=SCHEMAS_BUCKET,
            description="Kaya: JSON Schema of every command and event type, per version",
            history=1,
            storage=StorageType.FILE,
            replicas=replicas,
        )
        return await js.create_key_value(config)


async def publish_schemas(
    js: JetStreamContext, schemas: Mapping[str, dict[str, Any]], *, replicas: int = 1
) -> int:
    """Register every schema not registered yet; return how many were new.

    A key already registered with another shape raises SchemaConflict: this code
    would publish events that do not match what other services read in the registry.
    A difference in annotations only (docstrings, titles) is updated in place.
    """
    kv = await schema_bucket(js, replicas=replicas)
    added = 0
    conflicts: list[str] = []
    for key, schema in schemas.items():
        value = orjson.dumps(schema)
        try:
            await kv.create(key, value)
            added += 1
            continue
        except KeyWrongLastSequenceError:
            entry = await kv.get(key)
        registered = orjson.loads(entry.value or b"{}")
        if normalized(registered) != normalized(schema):
            conflicts.append(key)
        elif entry.value != value:
            await kv.update(key, value, last=entry.revision)
    if conflicts:
        raise SchemaConflict(
            f"{SCHEMAS_BUCKET} already registers {', '.join(conflicts)} with another shape:"
            " a changed type needs a new schema_version (see `kaya schema check --registry`)"
        )
    if added:
        log.info("registered %d schemas in %s", added, SCHEMAS_BUCKET)
    return added


async def register_schemas(js: JetStreamContext, registry: Registry, *, replicas: int = 1) -> int:
    """On start: publish the code's current schemas (older versions stay in the bucket)."""
    return await publish_schemas(js, code_schemas(registry), replicas=replicas)


async def read_registry(js: JetStreamContext) -> SchemaSet:
    """Every schema in `kaya_schemas`; empty when the bucket does not exist yet."""
    # the keys from the bucket's stream state, not from `kv.keys()`: that one watches for
    # updates with a timeout and, on a busy machine, can report no keys at all
    prefix = f"$KV.{SCHEMAS_BUCKET}."
    try:
        kv = await js.key_value(SCHEMAS_BUCKET)
        info = await js.stream_info(f"KV_{SCHEMAS_BUCKET}", subjects_filter=f"{prefix}>")
    except (BucketNotFoundError, NotFoundError):
        return {}
    schemas: SchemaSet = {}
    for subject in info.state.subjects or {}:
        key = subject.removeprefix(prefix)
        try:
            entry = await kv.get(key)
        except KeyDeletedError:
            continue
        schemas[key] = orjson.loads(entry.value or b"{}")
    return sort_schemas(schemas)
