"""Test helpers: run deciders and sagas as pure functions, with no NATS and no SQLite.

Given/when/then for an entity:

    events = kaya.decide(Counter(), given=[Added(n=60)], when=Add(n=50))   # raises Rejected

and a saga driven to its end, each step answered by a function of the test's:

    state, events = kaya.run_saga(Transfer(), Start(...), respond=lambda step: None)

Both encode every event as the runtime would before storing it, so a test also fails
on an event that breaks its schema's constraints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kaya.actors.entity import Command, Entity, Event
from kaya.actors.errors import KayaError
from kaya.actors.saga import Saga, Step
from kaya.actors.wire import AnyReply, ErrorBody

AnyEntity = Entity[Any, Any, Any]


def replay(entity: AnyEntity, events: Iterable[Event], state: Any = None) -> Any:
    """The state after `events`, from `state` (the entity's initial state by default)."""
    state = entity.initial if state is None else state
    for event in events:
        state = entity.evolve(state, event)
    return state


def decide(entity: AnyEntity, given: Iterable[Event], when: Command) -> list[Event]:
    """The events `entity` decides for the command `when` after the events `given`.

    A domain refusal propagates as the `Rejected` the entity raised.
    """
    return _decided(entity, replay(entity, given), when)


def _decided(entity: AnyEntity, state: Any, command: Command) -> list[Event]:
    events = list(entity.decide(state, command))
    for event in events:
        entity.encode_event(event)  # what the runtime does before an append: validates it
    return events


Respond = Callable[[Step], KayaError | None]
"""Answers one saga step: None for success, or the error its target would reply with."""


def run_saga(
    saga: Saga, start: Command, respond: Respond, *, max_steps: int = 100
) -> tuple[Any, list[Event]]:
    """Drive a saga from its first command to its end: (final state, every event).

    Each step the saga asks for goes to `respond`; its answer is fed back as the saga
    driver would (a transient error such as `Overloaded` makes the step be asked again).
    """
    events = decide(saga, [], start)
    state = replay(saga, events)
    for _ in range(max_steps):
        step = saga.next_step(state)
        if step is None:
            return state, events
        error = respond(step)
        reply = (
            AnyReply(ok=True)
            if error is None
            else AnyReply(ok=False, error=ErrorBody(code=error.code, message=error.message))
        )
        done = saga.step_result(step, reply)
        if done is None:
            continue  # transient: the driver asks the same step again
        new = _decided(saga, state, done)
        events.extend(new)
        state = replay(saga, new, state)
    raise RuntimeError(f"saga {saga.name} did not end within {max_steps} steps")
