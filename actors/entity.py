"""Entities as deciders: `decide(state, command) -> events` and `evolve(state, event) -> state`.

Both are pure, so an entity is tested without NATS or SQLite; the runtime does the
I/O around them. Commands and events are frozen msgspec Structs, tagged on
`"type"` with their class name; the codecs for an entity are built once, here.

Events are stored forever, so their shapes evolve by version: each event type has a
`schema_version`, and an entity keeps `upcasters`, functions from the JSON object of
(type, version N) to that of version N + 1. Reading an old event runs the chain, so
`evolve` and the consumers only ever see the current shape:

    stored (Opened, v1, {...}) --upcasters[("Opened", 1)]--> (Opened, v2, {...}) --> Opened
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar, Union

import msgspec

from kaya.actors.errors import BadRequest, UnknownCommand
from kaya.actors.masking import sensitive_fields
from kaya.actors.wire import DIGITS, LONG_NUMBER, TOO_DEEP, integer_out_of_range


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


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""The JSON object of an event at version N -> the object at version N + 1. It may rename
the type by setting `"type"`: the result is then version N + 1 of the new type."""


class UnknownSchema(ValueError):
    """An event whose type or schema version this code cannot read (or refuses to write)."""


class _TypeProbe(msgspec.Struct):
    type: str


_probe = msgspec.json.Decoder(_TypeProbe)


def _shorten(text: str, limit: int = 64) -> str:
    """`text` quoted, cut to `limit` characters: a caller's string echoed in a reply stays short."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


_encoder = msgspec.json.Encoder()


class Entity(Generic[S, C, E]):
    """An entity definition. Subclasses set the class attributes and the two functions.

    `name` is the `<entity>` token of the subjects; `state_schema` is bumped when
    the state type changes shape, so older snapshots are ignored, not misread;
    `upcasters` maps (event type, version N) to the function that brings its JSON
    object to version N + 1 (a version step without one reads the old object as it
    is: a compatible change, which `kaya schema check` verifies).
    """

    name: ClassVar[str]
    state_type: ClassVar[type[msgspec.Struct]]
    command_types: ClassVar[tuple[type[Command], ...]]
    internal_types: ClassVar[tuple[type[Command], ...]] = ()
    """Commands only sagas send (a transfer's debit): never accepted from clients, and
    in a cluster carried node to node on `kaya.step.*`, so they must be listed here."""
    event_types: ClassVar[tuple[type[Event], ...]]
    state_schema: ClassVar[int] = 1
    upcasters: ClassVar[Mapping[tuple[str, int], Upcaster]] = {}

    def __init__(self) -> None:
        commands: Any = Union[self.command_types]  # noqa: UP007 - a runtime union of classes
        self._command_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(commands)
        # type name -> (current version, decoder, class): one lookup on the fast path
        self._events: dict[str, tuple[int, msgspec.json.Decoder[Any], type[Event]]] = {
            t.__name__: (t.schema_version, msgspec.json.Decoder(t), t) for t in self.event_types
        }
        self.event_versions: Mapping[str, int] = {
            t.__name__: t.schema_version for t in self.event_types
        }
        self._state_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(self.state_type)
        self.command_names = frozenset(t.__name__ for t in self.command_types)
        # what a turn seals (actors/sealing.py): per event type, and in the state's snapshots
        self._sensitive = {t.__name__: sensitive_fields(t) for t in self.event_types}
        self.state_sensitive = sensitive_fields(self.state_type)
        steps: Any = Union[(*self.command_types, *self.internal_types)]
        self._step_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(steps)

    def sensitive(self, type_name: str) -> frozenset[str]:
        """The fields of event type `type_name` that its schema marks sensitive."""
        return self._sensitive.get(type_name, frozenset())

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
        """Decode and validate a command body; BadRequest or UnknownCommand names the fault.

        Whatever the decoder refuses is the caller's fault, so it is a BadRequest: not JSON,
        not UTF-8, nested too deeply (msgspec raises RecursionError), a number out of range
        (a float beyond double, or an integer beyond 64 bits, which msgspec would accept).
        """
        try:
            command: C = self._command_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise self._explain(data, exc) from None
        except RecursionError:
            raise BadRequest(f"command JSON {TOO_DEEP}") from None
        # the first test is integer_out_of_range's own, inlined: this is every command's path
        if len(data) - len(data.translate(None, DIGITS)) < LONG_NUMBER:
            return command
        path = integer_out_of_range(data)
        if path is not None:
            raise BadRequest(
                f"invalid {type(command).__name__}: integer out of range (64 bits) - at `{path}`"
            )
        return command

    def decode_step(self, data: bytes) -> C:
        """A command from another node's saga: a client's command or an internal one."""
        try:
            command: C = self._step_decoder.decode(data)
        except msgspec.DecodeError as exc:
            known = ", ".join(t.__name__ for t in (*self.command_types, *self.internal_types))
            raise BadRequest(f"{self.name}: not a step command ({known}): {exc}") from None
        return command

    def _explain(self, data: bytes, exc: msgspec.DecodeError) -> Exception:
        try:
            probe = _probe.decode(data)
        except msgspec.ValidationError:
            return BadRequest(f'command must be a JSON object with a string "type": {exc}')
        except msgspec.DecodeError:
            return BadRequest(f"malformed JSON: {exc}")
        except RecursionError:  # skipping a deep unknown field
            return BadRequest(f"command JSON {TOO_DEEP}")
        if probe.type not in self.command_names:
            known = ", ".join(sorted(self.command_names))
            return UnknownCommand(
                f"{self.name} has no command {_shorten(probe.type)} (known: {known})"
            )
        return BadRequest(f"invalid {probe.type}: {exc}")

    def decode_event(self, type_name: str, schema_version: int, data: bytes) -> E:
        """A stored event as its current type, upcast first if it is an older version."""
        current = self._events.get(type_name)
        if current is not None and current[0] == schema_version:
            return current[1].decode(data)  # type: ignore[no-any-return]
        type_name, body = self.upcast(type_name, schema_version, msgspec.json.decode(data))
        return msgspec.convert(body, self._events[type_name][2])  # type: ignore[return-value]

    def upcast(
        self, type_name: str, schema_version: int, body: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """Run the upcaster chain: the (type, JSON object) at the current version.

        Raises UnknownSchema for a type this entity does not have (and no upcaster
        maps away) or a version newer than this code's.
        """
        while True:
            current = self._events.get(type_name)
            if current is not None and schema_version >= current[0]:
                if schema_version == current[0]:
                    return type_name, body
                raise UnknownSchema(
                    f"{self.name} event {type_name} v{schema_version} is newer than this"
                    f" code's v{current[0]}"
                )
            upcaster = self.upcasters.get((type_name, schema_version))
            if upcaster is not None:
                body = upcaster(body)
                type_name = str(body.get("type", type_name))
            elif current is None:
                raise UnknownSchema(f"{self.name} has no event type {type_name!r}")
            schema_version += 1

    def encode_event(self, event: E) -> bytes:
        """The event's JSON, validated against its declared type: nothing invalid is stored."""
        current = self._events.get(type(event).__name__)
        if current is None or current[2] is not type(event):
            raise UnknownSchema(f"{self.name} does not declare event type {type(event).__name__}")
        data = _encoder.encode(event)
        current[1].decode(data)  # constraints (Meta) hold only once decoded: check them
        return data

    def decode_state(self, data: bytes) -> S:
        return self._state_decoder.decode(data)  # type: ignore[no-any-return]
