"""Entities as deciders: `decide(state, command) -> events` and `evolve(state, event) -> state`.

Both are pure, so an entity is tested without NATS or SQLite; the runtime does the
I/O around them. Commands and events are frozen msgspec Structs, tagged on
`"type"` with their class name; the codecs for an entity are built once, here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar, Union

import msgspec

from actors.errors import BadRequest, UnknownCommand


class Command(
    msgspec.Struct,
    tag=True,
    tag_field="type",
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
):
    """Base of commands: imperative names (`Deposit`). Unknown fields are refused."""

    schema_version: ClassVar[int] = 1


class Event(msgspec.Struct, tag=True, tag_field="type", frozen=True, kw_only=True):
    """Base of events: past-tense names (`Deposited`). Stored forever, so change with care."""

    schema_version: ClassVar[int] = 1


S = TypeVar("S", bound=msgspec.Struct)
C = TypeVar("C", bound=Command)
E = TypeVar("E", bound=Event)


class _TypeProbe(msgspec.Struct):
    type: str


_probe = msgspec.json.Decoder(_TypeProbe)


class Entity(Generic[S, C, E]):
    """An entity definition. Subclasses set the class attributes and the two functions.

    `name` is the `<entity>` token of the subjects; `state_schema` is bumped when
    the state type changes shape, so older snapshots are ignored, not misread.
    """

    name: ClassVar[str]
    state_type: ClassVar[type[msgspec.Struct]]
    command_types: ClassVar[tuple[type[Command], ...]]
    event_types: ClassVar[tuple[type[Event], ...]]
    state_schema: ClassVar[int] = 1

    def __init__(self) -> None:
        commands: Any = Union[self.command_types]  # noqa: UP007 - a runtime union of classes
        self._command_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(commands)
        self._event_decoders: dict[str, msgspec.json.Decoder[Any]] = {
            t.__name__: msgspec.json.Decoder(t) for t in self.event_types
        }
        self._state_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(self.state_type)
        self.command_names = frozenset(t.__name__ for t in self.command_types)

    @property
    def initial(self) -> S:
        """The state of an entity with no events."""
        return self.state_type()  # type: ignore[return-value]

    def decide(self, state: S, command: C) -> Sequence[E]:
        raise NotImplementedError

    def evolve(self, state: S, event: E) -> S:
        raise NotImplementedError

    # ---- codecs ----------------------------------------------------------------

    def decode_command(self, data: bytes) -> C:
        """Decode and validate a command body; BadRequest or UnknownCommand names the fault."""
        try:
            command: C = self._command_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise self._explain(data, exc) from None
        return command

    def _explain(self, data: bytes, exc: msgspec.DecodeError) -> Exception:
        try:
            probe = _probe.decode(data)
        except msgspec.ValidationError:
            return BadRequest(f'command must be a JSON object with a string "type": {exc}')
        except msgspec.DecodeError:
            return BadRequest(f"malformed JSON: {exc}")
        if probe.type not in self.command_names:
            known = ", ".join(sorted(self.command_names))
            return UnknownCommand(f"{self.name} has no command {probe.type!r} (known: {known})")
        return BadRequest(f"invalid {probe.type}: {exc}")

    def decode_event(self, type_name: str, data: bytes) -> E:
        decoder = self._event_decoders.get(type_name)
        if decoder is None:
            raise ValueError(f"{self.name} has no event type {type_name!r}")
        return decoder.decode(data)  # type: ignore[no-any-return]

    def decode_state(self, data: bytes) -> S:
        return self._state_decoder.decode(data)  # type: ignore[no-any-return]
