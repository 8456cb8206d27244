"""Registry: entity names (the `<entity>` subject token) to their definitions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from kaya.actors.entity import Entity
from kaya.actors.errors import UnknownEntity
from kaya.actors.wire import ENTITY_NAME


class Registry:
    def __init__(self, entities: Iterable[Entity[Any, Any, Any]] = ()) -> None:
        self._entities: dict[str, Entity[Any, Any, Any]] = {}
        for entity in entities:
            self.add(entity)

    def add(self, entity: Entity[Any, Any, Any]) -> None:
        if not ENTITY_NAME.fullmatch(entity.name):
            raise ValueError(
                f"entity name {entity.name!r} must be a lowercase letter then up to 31"
                " lowercase letters or digits"
            )
        if entity.name in self._entities:
            raise ValueError(f"entity {entity.name!r} is already registered")
        self._entities[entity.name] = entity

    def get(self, name: str) -> Entity[Any, Any, Any]:
        try:
            return self._entities[name]
        except KeyError:
            known = ", ".join(sorted(self._entities)) or "none"
            raise UnknownEntity(f"no entity named {name!r} (known: {known})") from None

    def __iter__(self) -> Iterator[Entity[Any, Any, Any]]:
        return iter(self._entities.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entities
