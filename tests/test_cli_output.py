"""What `kaya history` and `kaya tail` print: one JSON object per event, its `data` a
JSON object and `recorded_at` an ISO 8601 UTC time."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import anyio
import orjson
import pytest
from nats.aio.client import Client as NATS

from kaya.actors.wire import iso_utc
from kaya.app.cli.events import tail_line
from kaya.app.node import Node
from tests.conftest import call
from tests.servers import VENV_BIN, NatsServer


def test_recorded_at_is_iso_8601_utc_to_the_millisecond() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1796438446.1234) == "2026-12-05T02:40:46.123Z"
    now = datetime.now(UTC).timestamp()
    assert datetime.fromisoformat(iso_utc(now)).timestamp() == pytest.approx(now, abs=0.001)


def test_tail_prints_data_as_an_object_and_keeps_a_body_that_is_not_json() -> None:
    event = {"subject": "kaya.evt.account.a", "type": "Deposited", "data": '{"amount":5}'}
    assert tail_line(event) == {**event, "data": {"amount": 5}}
    garbled = {**event, "data": "not json \ufffd"}
    assert tail_line(garbled) == garbled


async def kaya(*args: str) -> list[dict[str, object]]:
    with anyio.fail_after(30):
        result = await anyio.run_process([str(VENV_BIN / "kaya"), *args], check=False)
    assert result.returncode == 0, result.stderr.decode()
    return [orjson.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.anyio
async def test_history_and_tail_print_the_same_data(
    node: Node, nc: NATS, nats_server: NatsServer, uid: str
) -> None:
    subject = f"kaya.cmd.account.{uid}"
    before = datetime.now(UTC).timestamp()
    await call(nc, subject, {"type": "Open", "owner": "h", "currency": "EUR"})
    await call(nc, subject, {"type": "Deposit", "amount": 5})
    history = await kaya("history", "account", uid, "--data-dir", node.config.node.data_dir)
    assert [e["type"] for e in history] == ["Opened", "Deposited"]
    assert history[1]["data"] == {"type": "Deposited", "amount": 5}
    for event in history:
        recorded = str(event["recorded_at"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", recorded), recorded
        when = datetime.fromisoformat(recorded).timestamp()
        assert before - 1 <= when <= datetime.now(UTC).timestamp() + 1
    tailed = await kaya(
        "tail", f"kaya.evt.account.{uid}", "--all", "--count", "2", "--url", nats_server.url
    )
    assert [e["data"] for e in tailed] == [e["data"] for e in history]
