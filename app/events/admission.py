"""Admission: the last step before `Consumer.handle`, wherever an event comes from.

    stored or delivered event -> current_shape (the producer's upcasters) -> accepts -> handle

The live runner, a dead letter's replay, a projection's rebuild and the contract
tests all hand a consumer its events through `admit`, so a consumer sees one shape
whichever of them calls it, and one that cannot read an event is told the same way
(UnknownSchema) by all of them. It sits apart from the runner because the DLQ, which
the runner publishes to, replays through it too.
"""

from __future__ import annotations

import msgspec

from kaya.actors import Registry, UnknownSchema
from kaya.actors.wire import HEADER_EVENT_TYPE, Delivered
from kaya.app.events.consumers import Consumer


def current_shape(event: Delivered, registry: Registry) -> Delivered:
    """The event at its type's current version, as the producing entity's code reads it.

    Raises UnknownSchema when the registry does not know the entity, the type or
    the version (one newer than the code).
    """
    if event.entity not in registry:
        raise UnknownSchema(f"no entity named {event.entity!r} is registered here")
    entity = registry.get(event.entity)
    if entity.event_versions.get(event.type) == event.schema_version:
        return event
    try:
        decoded = entity.decode_event(event.type, event.schema_version, event.data)
    except UnknownSchema:
        raise
    except Exception as exc:  # the upcaster or the decoder refused it: this code cannot read it
        raise UnknownSchema(f"{event.type} v{event.schema_version} does not read: {exc!r}") from exc
    type_name, version = type(decoded).__name__, type(decoded).schema_version
    headers = {**event.headers, HEADER_EVENT_TYPE: type_name, "Kaya-Schema-Version": str(version)}
    return msgspec.structs.replace(
        event,
        type=type_name,
        schema_version=version,
        data=msgspec.json.encode(decoded),
        headers=headers,
    )


def admit(consumer: Consumer, event: Delivered, registry: Registry | None) -> Delivered:
    """The event as `consumer.handle` should get it; UnknownSchema when it must not get it."""
    if registry is not None:
        event = current_shape(event, registry)
    if consumer.accepts is not None and event.schema_version not in consumer.accepts.get(
        event.type, ()
    ):
        raise UnknownSchema(
            f"consumer {consumer.name} does not accept {event.type} v{event.schema_version}"
        )
    return event
