"""The event dictionary: `kaya catalog`, from the code alone, kept in sync with docs/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from examples.bank import Account, Transfer, make_app
from kaya.actors.wire import subscribes
from kaya.app.schemas.catalog import (
    build_catalog,
    decide_cases,
    render_asyncapi,
    render_markdown,
)

BANK = "examples.bank:app"

DOCS = Path(__file__).resolve().parents[1] / "docs"


def catalog() -> Any:
    return build_catalog(make_app().registry, [type(c) for c in make_app().consumers])


def test_the_committed_event_dictionary_is_up_to_date() -> None:
    assert (DOCS / "events.md").read_text() == render_markdown(catalog()), (
        "run `kaya catalog --output docs/events.md`"
    )
    committed = orjson.loads((DOCS / "asyncapi.json").read_bytes())
    assert committed == render_asyncapi(catalog()), (
        "run `kaya catalog --format asyncapi --output docs/asyncapi.json`"
    )


def test_kaya_catalog_prints_what_is_committed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from kaya.app.cli import main

    assert main(["catalog", "--app", BANK]) == 0
    assert capsys.readouterr().out == (DOCS / "events.md").read_text()
    out = tmp_path / "asyncapi.json"
    assert main(["catalog", "--app", BANK, "--format", "asyncapi", "--output", str(out)]) == 0
    assert out.read_bytes() == (DOCS / "asyncapi.json").read_bytes()


def test_triggers_are_read_from_decide() -> None:
    assert decide_cases(Account()) == [
        ("Open", ["Opened"]),
        ("Deposit", ["Deposited"]),
        ("Withdraw", ["Withdrawn"]),
        ("Close", ["Closed"]),
        ("Debit", ["TransferDebited"]),  # the transfer saga's steps: never on the wire
        ("Credit", ["TransferCredited"]),
        ("Refund", ["TransferRefunded"]),
        ("Settle", ["TransferSettled"]),
    ]
    cases = dict(decide_cases(Transfer()))
    assert cases["StepDone(step='debit')"] == ["DebitRefused", "Failed"]
    assert cases["StepDone(step='credit', ok=True)"] == ["Credited", "Completed"]
    entries = {(t.entity, t.name): t for t in catalog().types}
    assert entries["account", "Open"].triggers == ("Opened",)
    assert entries["transfer", "Failed"].triggers == (
        "StepDone(step='debit')",
        "StepDone(step='refund', ok=True)",
        "StepDone(step='refund')",
    )


def test_readers_versions_and_upcasters_are_listed() -> None:
    entries = {(t.entity, t.name): t for t in catalog().types}
    opened = entries["account", "Opened"]
    assert opened.versions == (1, 2)
    assert opened.upcast_from == (1,)
    assert opened.consumers == ("analytics", "notifications")
    assert entries["transfer", "Started"].consumers == ("notifications",)
    assert entries["account", "Open"].version == 2


@pytest.mark.parametrize(
    ("filter_subject", "subject", "matches"),
    [
        ("kaya.evt.>", "kaya.evt.account.a1", True),
        ("kaya.evt.account.>", "kaya.evt.account.a1", True),
        ("kaya.evt.account.>", "kaya.evt.transfer.t1", False),
        ("kaya.evt.*.a1", "kaya.evt.account.a1", True),
        ("kaya.evt.account", "kaya.evt.account.a1", False),
        ("kaya.evt.account.a1.>", "kaya.evt.account.a1", False),
    ],
)
def test_subject_filters(filter_subject: str, subject: str, matches: bool) -> None:
    assert subscribes(filter_subject, subject) is matches


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_asyncapi_document_is_complete_and_self_contained() -> None:
    doc = render_asyncapi(catalog())
    assert doc["asyncapi"] == "3.0.0"
    for ref in _refs(doc):  # every reference resolves inside the document
        assert ref.startswith("#/"), ref
        target: Any = doc
        for token in ref[2:].split("/"):
            target = target[token]
    events = doc["channels"]["accountEvents"]
    assert events["address"] == "kaya.evt.account.{id}"
    assert set(events["messages"]) == {
        "Opened",
        "Deposited",
        "Withdrawn",
        "Closed",
        "TransferDebited",
        "TransferCredited",
        "TransferRefunded",
        "TransferSettled",
    }
    receive = doc["operations"]["receiveAccountEvents"]
    assert receive["action"] == "receive"
    assert doc["operations"]["sendTransferCommands"]["action"] == "send"
    opened = doc["components"]["messages"]["account.Opened"]
    assert opened["headers"]["properties"]["Kaya-Schema-Version"]["enum"] == ["1", "2"]
    assert opened["headers"]["properties"]["Kaya-Event-Type"]["const"] == "Opened"
    payload = doc["components"]["schemas"]["Opened"]
    assert set(payload["properties"]) == {"type", "owner", "currency", "kind"}


def test_the_asyncapi_document_has_servers_and_every_channel_a_client_uses() -> None:
    doc = orjson.loads((DOCS / "asyncapi.json").read_bytes())
    assert {"asyncapi", "info", "servers", "channels", "operations", "components"} <= set(doc)
    assert {"title", "version"} <= set(doc["info"])
    assert doc["servers"]["local"] == {
        "host": "127.0.0.1:4222",
        "protocol": "nats",
        "description": doc["servers"]["local"]["description"],
    }
    assert "nats://127.0.0.1:4222" in doc["servers"]["local"]["description"]
    addresses = {c["address"]: name for name, c in doc["channels"].items()}
    for address in (
        "kaya.cmd.account.{id}",
        "kaya.qry.account.{id}",
        "kaya.evt.account.{id}",
        "kaya.cmd.transfer.{id}",
        "kaya.qry.transfer.{id}",
        "kaya.evt.transfer.{id}",
        "kaya.view.{name}",
        "kaya.notify.{token}",
        "kaya.dlq.{consumer}",
    ):
        assert address in addresses, address
    for name, channel in doc["channels"].items():
        # every {parameter} of an address is declared, and every message has a payload
        declared = set(channel.get("parameters", {}))
        used = {p.strip("{}") for p in (channel["address"] or "").split(".") if "{" in p}
        assert used == declared, name
        assert channel["messages"], name
        for ref in channel["messages"].values():
            message = doc["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
            assert "payload" in message, (name, ref)
            assert message["contentType"] == "application/json"
    channels_of = {op["channel"]["$ref"].rsplit("/", 1)[1]: op for op in doc["operations"].values()}
    assert set(channels_of) == set(doc["channels"]) - {"replies"}
    for op in doc["operations"].values():
        assert op["action"] in {"send", "receive"}
        # request/reply: the reply's messages are the replies channel's
        if op["action"] == "send":
            replies = {r["$ref"].rsplit("/", 1)[1] for r in op["reply"]["messages"]}
            assert replies <= set(doc["channels"]["replies"]["messages"]), op
    dlq = doc["channels"]["deadLetters"]["parameters"]["consumer"]
    assert dlq["enum"] == ["analytics", "notifications"]
    state = doc["components"]["messages"]["account.state"]["payload"]["oneOf"][0]
    assert state["properties"]["state"] == {"$ref": "#/components/schemas/AccountState"}
    assert set(doc["components"]["schemas"]["AccountState"]["properties"]) >= {
        "owner",
        "currency",
        "balance",
        "status",
    }
