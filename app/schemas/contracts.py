"""Consumer contract tests: does a consumer handle every registered event version it reads?

    registered schemas (the `kaya_schemas` bucket, or docs/schemas.json)
      -> one sample event per (type, version) that the consumer's subject covers,
         made from that version's JSON Schema
      -> the runner's own path: `admit` (upcast to the current version, `accepts`), `handle`
      -> ContractReport: per sample, handled / refused (its unknown-event policy) / failed

A team proves its consumer against the schemas other services registered:

    report = await check_consumer(MyConsumer(), await read_registry(js), registry)
    assert not report.problems, report.format()

Samples are one small, consistent world: every string is "contract" (unless the
schema gives an example or a default), every entity id too, so an event that
names another entity (a transfer's `source`) names the sample one; integers are
the smallest allowed. Samples run in the entities' declared event order (an
`Opened` before a `Deposited`); with a `store`, effects are applied as the runner
applies them, so a handler that looks up what an earlier event wrote finds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from kaya.actors import Registry, UnknownSchema
from kaya.actors.wire import delivered_from_stored, subscribes
from kaya.app.events.admission import admit
from kaya.app.events.consumers import Consumer, Effects
from kaya.app.events.runner import apply_batch, ensure_tables
from kaya.app.schemas.registry import resolved
from kaya.store import EventStore, StoredEvent

SAMPLE = "contract"

Outcome = Literal["handled", "refused", "failed"]


@dataclass(frozen=True)
class ContractCase:
    key: str
    """The registered schema's key, e.g. `account.Opened.v1`."""
    outcome: Outcome
    detail: str = ""


@dataclass(frozen=True)
class ContractReport:
    consumer: str
    cases: list[ContractCase] = field(default_factory=list)

    @property
    def problems(self) -> list[ContractCase]:
        """Samples the consumer would not handle: refused by its policy, or failed."""
        return [c for c in self.cases if c.outcome != "handled"]

    def format(self) -> str:
        lines = [f"{c.outcome:<8} {c.key} {c.detail}".rstrip() for c in self.cases]
        lines.append(
            f"consumer {self.consumer}: {len(self.cases) - len(self.problems)} of"
            f" {len(self.cases)} registered event versions handled"
        )
        return "\n".join(lines)


def sample_value(schema: Any) -> Any:
    """A small value valid for a resolved JSON Schema (the common cases msgspec emits)."""
    if not isinstance(schema, dict):
        return None
    for keyword in ("examples", "enum"):
        if schema.get(keyword):
            return schema[keyword][0]
    if "default" in schema:
        return schema["default"]
    if "const" in schema:
        return schema["const"]
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"] or schema["anyOf"]
        return sample_value(options[0])
    kind = schema.get("type")
    if kind == "object":
        return {name: sample_value(s) for name, s in schema.get("properties", {}).items()}
    if kind == "array":
        return [sample_value(schema["items"])] * schema.get("minItems", 0)
    if kind in ("integer", "number"):
        if "minimum" in schema:
            return schema["minimum"]
        return schema.get("exclusiveMinimum", 0) + 1
    if kind == "string":
        return SAMPLE.ljust(schema.get("minLength", 0), "x")
    if kind == "boolean":
        return True
    return None


def _covered(
    consumer: Consumer, schemas: Mapping[str, dict[str, Any]], registry: Registry | None
) -> list[tuple[str, dict[str, Any]]]:
    """The registered event schemas the consumer's subject covers, in the entities' order."""
    entities = [e.name for e in registry] if registry is not None else []
    order = {e.name: list(e.event_versions) for e in registry} if registry is not None else {}

    def rank(item: tuple[str, dict[str, Any]]) -> tuple[int, str, int, str, int]:
        meta = item[1]["x-kaya"]
        entity, name = meta["entity"], meta["type"]
        types = order.get(entity, [])
        return (
            entities.index(entity) if entity in entities else len(entities),
            entity,
            types.index(name) if name in types else len(types),
            name,
            meta["version"],
        )

    covered = [
        (key, schema)
        for key, schema in schemas.items()
        if schema.get("x-kaya", {}).get("kind") == "event"
        and subscribes(consumer.filter_subject, f"kaya.evt.{schema['x-kaya']['entity']}.{SAMPLE}")
    ]
    return sorted(covered, key=rank)


async def check_consumer(
    consumer: Consumer,
    schemas: Mapping[str, dict[str, Any]],
    registry: Registry | None = None,
    *,
    store: EventStore | None = None,
) -> ContractReport:
    """Run one sample of every registered event version the consumer reads through it.

    `registry` upcasts as the node's runner does (None: the consumer gets the
    samples as registered). With `store`, the consumer's tables are created there
    and each sample's effects applied with its checkpoint.
    """
    report = ContractReport(consumer.name)
    if store is not None:
        await ensure_tables(store, consumer)
        position = await store.checkpoint(consumer.checkpoint_name())
    else:
        position = 0
    versions: dict[str, int] = {}
    for key, schema in _covered(consumer, schemas, registry):
        meta = schema["x-kaya"]
        position += 1
        versions[meta["entity"]] = versions.get(meta["entity"], 0) + 1
        stored = StoredEvent(
            position=position,
            event_id=f"{SAMPLE}-{position}",
            entity=meta["entity"],
            entity_id=SAMPLE,
            version=versions[meta["entity"]],
            type=meta["type"],
            schema_version=meta["version"],
            data=orjson.dumps(sample_value(resolved(schema))),
            recorded_at=0.0,
            command_id=None,
            traceparent=None,
        )
        event = delivered_from_stored(stored)
        try:
            event = admit(consumer, event, registry)
        except UnknownSchema as exc:
            report.cases.append(
                ContractCase(key, "refused", f"({consumer.unknown_event_policy}): {exc}")
            )
            continue
        effects = Effects()
        try:
            await consumer.handle(event, effects)
            if store is not None:
                await apply_batch(store, consumer, [(position, effects)])
        except Exception as exc:
            report.cases.append(ContractCase(key, "failed", f"{type(exc).__name__}: {exc}"))
            continue
        detail = "" if event.schema_version == meta["version"] else f"(as v{event.schema_version})"
        report.cases.append(ContractCase(key, "handled", detail))
    return report
