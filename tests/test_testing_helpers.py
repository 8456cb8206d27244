"""The public test helpers: a user's saga driven to its end without NATS or SQLite."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import pytest

import kaya


class Book(kaya.Command):
    room: str


class Booked(kaya.Event):
    room: str


class Reserved(kaya.Event):
    pass


class Confirmed(kaya.Event):
    pass


class Cancelled(kaya.Event):
    reason: str


class Booking(msgspec.Struct, frozen=True, kw_only=True):
    room: str = ""
    status: Literal["new", "reserving", "confirming", "done", "cancelled"] = "new"


class Reserve(kaya.Command):
    booking: str


class BookingSaga(kaya.Saga):
    """Reserve the room, then confirm it; a refused reservation cancels the booking."""

    name = "booking"
    state_type = Booking
    command_types = (Book,)
    event_types = (Booked, Reserved, Confirmed, Cancelled)
    terminal_events = ("Confirmed", "Cancelled")

    def decide(self, state: Booking, command: Any) -> list[kaya.Event]:
        match command:
            case Book(room=room) if state.status == "new":
                return [Booked(room=room)]
            case kaya.StepDone(step="reserve", ok=True):
                return [Reserved()]
            case kaya.StepDone(step="reserve", reason=reason):
                return [Cancelled(reason=reason)]
            case kaya.StepDone(step="confirm", ok=True):
                return [Confirmed()]
        raise kaya.Rejected(f"cannot {type(command).__name__} a {state.status} booking")

    def evolve(self, state: Booking, event: kaya.Event) -> Booking:
        match event:
            case Booked(room=room):
                return Booking(room=room, status="reserving")
            case Reserved():
                return msgspec.structs.replace(state, status="confirming")
            case Confirmed():
                return msgspec.structs.replace(state, status="done")
            case Cancelled():
                return msgspec.structs.replace(state, status="cancelled")
        return state

    def next_step(self, state: Booking) -> kaya.Step | None:
        if state.status == "reserving":
            return kaya.Step("reserve", "room", state.room, Reserve(booking="b"))
        if state.status == "confirming":
            return kaya.Step("confirm", "room", state.room, Reserve(booking="b"))
        return None


def test_a_saga_runs_to_its_end_with_each_step_answered() -> None:
    asked: list[str] = []

    def respond(step: kaya.Step) -> kaya.KayaError | None:
        asked.append(step.name)
        return None

    state, events = kaya.run_saga(BookingSaga(), Book(room="r-1"), respond)
    assert state.status == "done"
    assert events == [Booked(room="r-1"), Reserved(), Confirmed()]
    assert asked == ["reserve", "confirm"]


def test_a_refused_step_takes_the_sagas_other_branch() -> None:
    state, events = kaya.run_saga(
        BookingSaga(), Book(room="r-1"), lambda step: kaya.Rejected("no rooms left")
    )
    assert state.status == "cancelled"
    assert events[-1] == Cancelled(reason="no rooms left")


def test_a_transient_failure_asks_the_same_step_again() -> None:
    answers: list[kaya.KayaError | None] = [kaya.Overloaded("busy"), None, None]
    state, _ = kaya.run_saga(BookingSaga(), Book(room="r-1"), lambda step: answers.pop(0))
    assert state.status == "done"
    assert answers == []


def test_a_saga_that_never_ends_is_reported() -> None:
    with pytest.raises(RuntimeError, match="did not end within 3 steps"):
        kaya.run_saga(BookingSaga(), Book(room="r"), lambda s: kaya.Overloaded("x"), max_steps=3)
