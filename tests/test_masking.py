"""Sensitive fields are masked in log lines; log lines carry entity, id, command id, trace."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
import orjson
import pytest

from examples.bank.account import Open
from kaya.actors import ActorRuntime, Command, Entity, Event, decode_reply
from kaya.actors.masking import MASK, masked, sensitive_fields
from kaya.app.observability.logs import JsonFormatter
from kaya.store import open_event_store

pytestmark = pytest.mark.anyio

SECRET = "Ada Lovelace-4711"


class Enrol(Command):
    name: Annotated[str, msgspec.Meta(extra={"sensitive": True})]
    course: str


class Enrolled(Event):
    pass


class EnrolState(msgspec.Struct, frozen=True):
    count: int = 0


class Flaky(Entity[Any, Any, Any]):
    name = "student"
    state_type = EnrolState
    command_types = (Enrol,)
    event_types = (Enrolled,)

    def decide(self, state: Any, command: Any) -> list[Any]:
        raise RuntimeError("bug in the handler")

    def evolve(self, state: Any, event: Any) -> Any:
        return state


def test_sensitive_fields_come_from_the_schema() -> None:
    assert sensitive_fields(Enrol) == {"name"}
    assert masked(Enrol(name=SECRET, course="maths")) == {
        "type": "Enrol",
        "name": MASK,
        "course": "maths",
    }
    assert masked(Open(owner=SECRET, currency="EUR"))["owner"] == MASK  # the reference domain


async def test_a_crash_log_masks_the_command_and_names_the_trace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="kaya.actors")
    async with open_event_store(tmp_path / "s.db") as store:
        runtime = ActorRuntime(store)
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)
            with anyio.fail_after(5):
                reply = await runtime.ask(
                    Flaky(),
                    "s-1",
                    Enrol(name=SECRET, course="maths"),
                    command_id="c-9",
                    traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
            tg.cancel_scope.cancel()
    assert decode_reply(reply).error is not None
    lines = [JsonFormatter("n1").format(r) for r in caplog.records]
    assert lines, "the crash was logged"
    entry = orjson.loads(lines[0])
    assert entry["entity"] == "student"
    assert entry["id"] == "s-1"
    assert entry["command_id"] == "c-9"
    assert entry["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert entry["command"] == {"type": "Enrol", "name": MASK, "course": "maths"}
    assert all(SECRET not in line for line in lines)
    assert SECRET not in caplog.text
