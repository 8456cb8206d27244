"""Schema evolution: versions, upcasting, the registry, compatibility checks, unknown events.

Pure tests first (entities, rules), then the store and the runtime, then a real
nats-server: the KV registry, v1 events relayed to consumers, unknown-version policies.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import anyio
import msgspec
import orjson
import pytest
from nats.aio.client import Client as NATS

from examples.bank import Analytics, Notifications, make_app
from examples.bank.account import Account, AccountState, Deposit, Open, Opened
from kaya.actors import ActorRuntime, Entity, Event, UnknownSchema, decode_reply
from kaya.actors.wire import EVENTS_STREAM
from kaya.app.events.admission import admit
from kaya.app.events.consumers import (
    Consumer,
    Context,
    Delivered,
    Effects,
    UnknownEventPolicy,
)
from kaya.app.events.dlq import list_dead_letters
from kaya.app.node import Node, open_node
from kaya.app.schemas.contracts import check_consumer, sample_value
from kaya.app.schemas.registry import (
    SCHEMAS_BUCKET,
    SCHEMAS_FILE,
    SchemaConflict,
    check_compatibility,
    code_schemas,
    dump_schemas,
    load_schemas,
    merge_schemas,
    publish_schemas,
    read_registry,
    resolved,
    type_schema,
    upcaster_keys,
)
from kaya.store import Append, NewEvent, open_event_store
from tests.conftest import call, node_config
from tests.servers import NatsServer

BANK = "examples.bank:app"

REPO = Path(__file__).resolve().parents[1]


def opened_v1(owner: str = "ann", currency: str = "EUR") -> NewEvent:
    """An `Opened` as a v1 node stored it: no `kind`."""
    body = {"type": "Opened", "owner": owner, "currency": currency}
    return NewEvent(uuid.uuid4().hex, "Opened", 1, orjson.dumps(body))


def deposited(amount: int) -> NewEvent:
    body = {"type": "Deposited", "amount": amount}
    return NewEvent(uuid.uuid4().hex, "Deposited", 1, orjson.dumps(body))


# ---- upcasting (pure) -------------------------------------------------------------------------


class Made(Event):
    """v3 of a gadget's first event. v1 was `Built {label}`; v2 `Made {title}`; v3 adds `size`."""

    schema_version = 3
    title: str
    size: int = 1


class Painted(Event):
    colour: str


def _built_to_made(body: dict[str, Any]) -> dict[str, Any]:
    """v1 `Built {label}` -> v2 `Made {title}`: a renamed type and a renamed field."""
    return {"type": "Made", "title": body["label"]}


class Gadget(Entity[Any, Any, Any]):
    name = "gadget"
    state_type = AccountState
    command_types = (Open,)
    event_types = (Made, Painted)
    upcasters = {("Built", 1): _built_to_made}  # Made v2 -> v3 needs none: `size` has a default


def test_an_upcaster_chain_reads_every_old_version_as_the_current_type() -> None:
    gadget = Gadget()
    current = Made(title="t", size=1)
    assert gadget.decode_event("Built", 1, b'{"type":"Built","label":"t"}') == current
    assert gadget.decode_event("Made", 2, b'{"type":"Made","title":"t"}') == current
    assert gadget.decode_event("Made", 3, b'{"type":"Made","title":"t","size":1}') == current
    assert gadget.upcast("Built", 1, {"type": "Built", "label": "t"}) == (
        "Made",
        {"type": "Made", "title": "t"},
    )


def test_an_unknown_type_or_a_newer_version_is_refused_not_guessed() -> None:
    gadget = Gadget()
    with pytest.raises(UnknownSchema, match="no event type 'Lost'"):
        gadget.decode_event("Lost", 1, b"{}")
    with pytest.raises(UnknownSchema, match="newer than this code"):
        gadget.decode_event("Made", 4, b'{"type":"Made","title":"t"}')
    with pytest.raises(UnknownSchema, match="newer than this code"):
        gadget.decode_event("Painted", 2, b'{"type":"Painted","colour":"red"}')


def test_a_v1_opened_is_read_as_a_personal_account() -> None:
    account = Account()
    v1 = account.decode_event("Opened", 1, b'{"type":"Opened","owner":"ann","currency":"EUR"}')
    assert v1 == Opened(owner="ann", currency="EUR", kind="personal")
    v2 = b'{"type":"Opened","owner":"bo","currency":"EUR","kind":"business"}'
    assert account.decode_event("Opened", 2, v2).kind == "business"


def test_events_are_validated_before_they_are_stored() -> None:
    account = Account()
    assert orjson.loads(account.encode_event(Opened(owner="a", currency="EUR"))) == {
        "type": "Opened",
        "owner": "a",
        "currency": "EUR",
        "kind": "personal",
    }
    with pytest.raises(msgspec.ValidationError, match="kind"):
        account.encode_event(Opened(owner="a", currency="EUR", kind="charity"))  # type: ignore[arg-type]
    with pytest.raises(UnknownSchema, match="does not declare event type Made"):
        account.encode_event(Made(title="x"))  # type: ignore[arg-type]


# ---- mixed-version histories (store + runtime, no NATS) ----------------------------------


class Sloppy(Account):
    """An account whose decider emits an event its entity does not declare."""

    name = "sloppy"

    def decide(self, state: AccountState, command: Any) -> Sequence[Any]:
        if isinstance(command, Deposit) and command.amount == 13:
            return [Made(title="not mine")]
        return super().decide(state, command)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_mixed_version_history_rebuilds_the_same_state(tmp_path: Path) -> None:
    account, sloppy = Account(), Sloppy()
    async with open_event_store(tmp_path / "kaya.db") as store:
        # "old": written by a v1 node; "new": the same facts written by this code
        await store.append(Append("account", "old", 0, [opened_v1(), deposited(5), deposited(7)]))
        runtime = ActorRuntime(store)
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)
            for command in (Open(owner="ann", currency="EUR"), Deposit(amount=5)):
                assert decode_reply(await runtime.ask(account, "new", command)).ok
            assert decode_reply(await runtime.ask(account, "new", Deposit(amount=7))).ok
            assert decode_reply(await runtime.ask(account, "old", Deposit(amount=1))).ok
            assert decode_reply(await runtime.ask(account, "new", Deposit(amount=1))).ok
            old = decode_reply(await runtime.ask(account, "old", None))
            new = decode_reply(await runtime.ask(account, "new", None))
            assert (
                old.state
                == new.state
                == {
                    "owner": "ann",
                    "currency": "EUR",
                    "balance": 13,
                    "status": "open",
                }
            )
            assert old.version == new.version == 4
            # a decider that emits an undeclared event: refused before the store, nothing written
            await runtime.ask(sloppy, "s", Open(owner="ann", currency="EUR"))
            refused = decode_reply(await runtime.ask(sloppy, "s", Deposit(amount=13)))
            assert refused.error is not None
            assert refused.error.code == "internal"
            tg.cancel_scope.cancel()
        stored = await store.read_stream("account", "old")
        assert [(e.type, e.schema_version) for e in stored] == [
            ("Opened", 1),  # history is never rewritten: the upcaster reads it
            ("Deposited", 1),
            ("Deposited", 1),
            ("Deposited", 1),
        ]
        assert (await store.read_stream("account", "new"))[0].schema_version == 2
        assert len(await store.read_stream("sloppy", "s")) == 1


# ---- compatibility rules (pure) -------------------------------------------------------------


def event_set(*types: type[msgspec.Struct], versions: Sequence[int] = ()) -> dict[str, Any]:
    """A schema set of `thing` events, as a registry or docs/schemas.json holds them."""
    schemas = {}
    for i, cls in enumerate(types):
        version = versions[i] if versions else 1
        schemas[f"thing.{cls.__name__}.v{version}"] = type_schema("thing", "event", cls, version)
    return schemas


def v1() -> type[Event]:
    class Shipped(Event):
        """Shipped, v1."""

        parcel: str
        weight: int
        note: str = ""
        size: Literal["s", "m"] = "s"

    return Shipped


def check(new: type[msgspec.Struct], version: int = 2, upcast: bool = False) -> list[str]:
    report = check_compatibility(
        event_set(v1()),
        event_set(new, versions=[version]),
        {("thing", "Shipped", 1)} if upcast else set(),
    )
    return [f.message for f in report.breaking]


def test_a_removed_field_breaks_stored_events_unless_an_upcaster_covers_it() -> None:
    class Shipped(Event):
        parcel: str
        note: str = ""
        size: Literal["s", "m"] = "s"

    assert check(Shipped) == [
        "v1 -> v2: field 'weight' removed; add an upcaster for (\"Shipped\", 1)"
    ]
    assert check(Shipped, upcast=True) == []


def test_a_changed_type_breaks() -> None:
    class Shipped(Event):
        parcel: str
        weight: str
        note: str = ""
        size: Literal["s", "m"] = "s"

    (problem,) = check(Shipped)
    assert "field 'weight' changed type" in problem


def test_a_new_required_field_without_a_default_breaks() -> None:
    class Shipped(Event):
        parcel: str
        weight: int
        carrier: str
        note: str = ""
        size: Literal["s", "m"] = "s"

    assert check(Shipped) == [
        "v1 -> v2: new required field 'carrier' has no default; add an upcaster for"
        ' ("Shipped", 1)'
    ]


def test_an_optional_field_that_becomes_required_breaks() -> None:
    class Shipped(Event):
        parcel: str
        weight: int
        note: str
        size: Literal["s", "m"] = "s"

    assert any("field 'note' became required" in p for p in check(Shipped))


def test_a_registered_version_that_changes_shape_breaks() -> None:
    class Shipped(Event):
        parcel: str
        weight: int
        note: str = ""
        size: Literal["s", "m"] = "s"
        extra: int = 0

    assert check(Shipped, version=1) == [
        "v1 changed without a new schema_version (registered versions never change: make it v2)"
    ]


def test_removed_types_and_versions_going_back_break() -> None:
    report = check_compatibility(event_set(v1()), {})
    assert [f.message for f in report.breaking] == [
        "removed: stored events of v1 can no longer be read"
    ]
    renamed = check_compatibility(event_set(v1()), {}, {("thing", "Shipped", 1)})
    assert renamed.ok
    back = check_compatibility(event_set(v1(), versions=[3]), event_set(v1(), versions=[2]))
    assert [f.message for f in back.breaking] == ["code is at v2 but v3 is registered"]


def test_compatible_changes_pass() -> None:
    class Shipped(Event):
        """Docstrings are annotations: changing them changes nothing."""

        parcel: str | None
        weight: float
        note: str = ""
        size: Literal["s", "m", "l"] = "m"
        carrier: str = "post"

    class Returned(Event):
        parcel: str

    assert check(Shipped) == []
    assert check_compatibility(event_set(v1()), event_set(v1(), Returned)).ok  # a new type


def test_constraints_may_loosen_but_not_tighten() -> None:
    def weighed(low: int, high: int, version: int) -> dict[str, Any]:
        grams = Annotated[int, msgspec.Meta(ge=low, le=high)]
        cls = msgspec.defstruct("Weighed", [("grams", grams)], bases=(Event,))
        return event_set(cls, versions=[version])

    def compatible(old: tuple[int, int], new: tuple[int, int]) -> bool:
        return check_compatibility(weighed(*old, 1), weighed(*new, 2)).ok

    assert compatible((1, 10), (0, 20))
    assert not compatible((1, 10), (2, 10))
    assert not compatible((1, 10), (1, 9))


# ---- the project's own schemas: what CI checks ------------------------------------------------


def test_the_code_is_compatible_with_the_committed_schemas() -> None:
    """`kaya schema check`: a breaking change to a reference type fails here, in CI."""
    registry = make_app().registry
    recorded = load_schemas(REPO / SCHEMAS_FILE)
    report = check_compatibility(recorded, code_schemas(registry), upcaster_keys(registry))
    assert report.ok, report.format(str(SCHEMAS_FILE))
    assert "account.Opened.v1" in recorded  # history is kept


def test_the_committed_schemas_are_up_to_date() -> None:
    """`kaya schema export` would change nothing: every current version is recorded."""
    path = REPO / SCHEMAS_FILE
    recorded = load_schemas(path)
    assert dump_schemas(merge_schemas(recorded, code_schemas(make_app().registry))) == (
        path.read_bytes()
    ), "run `kaya schema export` and commit docs/schemas.json"


def test_kaya_schema_check_reports_and_fails_on_a_breaking_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kaya.app.cli import main

    monkeypatch.chdir(REPO)
    assert main(["schema", "check", "--app", BANK]) == 0
    assert "compatible" in capsys.readouterr().out

    broken = load_schemas(REPO / SCHEMAS_FILE)
    schema = broken["account.Deposited.v1"]["$defs"]["Deposited"]
    schema["properties"]["amount"] = {"type": "string"}  # as if the code had changed it
    path = tmp_path / "schemas.json"
    path.write_bytes(dump_schemas(broken))
    assert main(["schema", "check", "--app", BANK, "--against", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "BREAKING account.Deposited (event): v1 changed without a new schema_version" in out
    assert "error: found 1 breaking schema change(s)" in err
    assert (
        main(["schema", "export", "--app", BANK, "--output", str(path)]) == 1
    )  # refuses to record it

    fresh = tmp_path / "fresh.json"
    assert main(["schema", "export", "--app", BANK, "--output", str(fresh)]) == 0
    assert load_schemas(fresh) == code_schemas(make_app().registry)


# ---- consumers: current shape, accepts, contract tests -------------------------------------


def delivered(
    type_name: str, version: int, body: dict[str, Any], entity: str = "account"
) -> Delivered:
    return Delivered(
        subject=f"kaya.evt.{entity}.a1",
        entity=entity,
        entity_id="a1",
        type=type_name,
        schema_version=version,
        entity_version=1,
        position=1,
        event_id="e1",
        data=orjson.dumps({"type": type_name, **body}),
        headers={"Kaya-Event-Type": type_name, "Kaya-Schema-Version": str(version)},
    )


class Recorder(Consumer):
    """Remembers what it handled; its policy and `accepts` are set per test."""

    name = "recorder"
    filter_subject = "kaya.evt.account.>"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, dict[str, Any]]] = []
        self.handled = anyio.Event()

    async def handle(self, event: Delivered, effects: Effects) -> None:
        self.seen.append((event.type, event.schema_version, event.decode()))
        self.handled.set()


def test_consumers_get_the_current_shape_and_only_what_they_accept() -> None:
    registry = make_app().registry
    old = delivered("Opened", 1, {"owner": "ann", "currency": "EUR"})
    now = admit(Recorder(), old, registry)
    assert (now.type, now.schema_version, now.headers["Kaya-Schema-Version"]) == ("Opened", 2, "2")
    assert now.decode() == {"type": "Opened", "owner": "ann", "currency": "EUR", "kind": "personal"}
    assert admit(Recorder(), old, None) is old  # no registry: as received

    class Picky(Recorder):
        accepts: ClassVar[dict[str, set[int]]] = {"Opened": {1}}

    with pytest.raises(UnknownSchema, match="does not accept Opened v2"):
        admit(Picky(), old, registry)
    with pytest.raises(UnknownSchema, match="newer"):
        admit(Recorder(), delivered("Opened", 3, {"owner": "a", "currency": "EUR"}), registry)
    with pytest.raises(UnknownSchema, match="no entity named 'parcel'"):
        admit(Recorder(), delivered("Sent", 1, {}, entity="parcel"), registry)
    with pytest.raises(UnknownSchema, match="does not read"):
        admit(Recorder(), delivered("Opened", 1, {"owner": 5}), registry)


def test_a_sample_is_valid_for_its_schema() -> None:
    for key, schema in load_schemas(REPO / SCHEMAS_FILE).items():
        cls = {t.__name__: t for e in make_app().registry for t in e.event_types}.get(
            schema["x-kaya"]["type"]
        )
        if cls is not None and schema["x-kaya"]["version"] == cls.schema_version:
            msgspec.convert(sample_value(resolved(schema)), cls)  # raises if invalid
        assert isinstance(sample_value(resolved(schema)), dict), key


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_the_reference_consumers_handle_every_registered_version(tmp_path: Path) -> None:
    """The contract test a consumer team writes, against the committed schemas."""
    schemas = load_schemas(REPO / SCHEMAS_FILE)
    async with open_event_store(tmp_path / "kaya.db") as store:
        sent: list[dict[str, Any]] = []

        async def publish(subject: str, data: bytes, headers: Mapping[str, str] | None) -> None:
            sent.append(orjson.loads(data))

        for consumer in (Analytics(), Notifications()):
            consumer.bind(Context(store, publish))
            report = await check_consumer(consumer, schemas, make_app().registry, store=store)
            assert not report.problems, report.format()
            assert "account.Opened.v1" in {c.key for c in report.cases}
        assert sent[0]["event"]["kind"] == "personal"  # the v1 sample, upcast

        class Stale(Recorder):
            name = "stale"
            accepts: ClassVar[dict[str, set[int]]] = {"Opened": {1}, "Deposited": {1}}

        report = await check_consumer(Stale(), schemas, make_app().registry)
        assert {c.key for c in report.problems} == {
            "account.Opened.v1",
            "account.Opened.v2",
            "account.Withdrawn.v1",
            "account.Closed.v1",
            "account.TransferDebited.v1",
            "account.TransferCredited.v1",
            "account.TransferRefunded.v1",
            "account.TransferSettled.v1",
        }

        class Strict(Recorder):
            name = "strict"

            async def handle(self, event: Delivered, effects: Effects) -> None:
                if event.type == "Opened":
                    event.decode()["kind"]  # written for v2 only

        without_upcasting = await check_consumer(Strict(), schemas)
        assert [(c.key, c.outcome) for c in without_upcasting.problems] == [
            ("account.Opened.v1", "failed")
        ]
        assert not (await check_consumer(Strict(), schemas, make_app().registry)).problems


# ---- the registry in a real nats-server --------------------------------------------------------


@pytest.mark.anyio
async def test_schemas_are_registered_on_start_and_read_back(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    registry = make_app().registry
    config = node_config(nats_server, tmp_path / "node")
    async with open_node(config, make_app()):
        pass
    js = nc.jetstream()
    registered = await read_registry(js)
    assert registered == code_schemas(registry)
    kv = await js.key_value(SCHEMAS_BUCKET)  # what `nats kv get kaya_schemas ...` reads
    entry = await kv.get("account.Opened.v2")
    assert orjson.loads(entry.value or b"")["x-kaya"] == {
        "entity": "account",
        "kind": "event",
        "type": "Opened",
        "version": 2,
    }
    # older versions, from the committed record; then the code checks against the registry
    recorded = load_schemas(REPO / SCHEMAS_FILE)
    assert await publish_schemas(js, recorded) == len(recorded.keys() - registered.keys())
    registered = await read_registry(js)
    assert "account.Opened.v1" in registered
    assert check_compatibility(registered, code_schemas(registry), upcaster_keys(registry)).ok
    async with open_node(config, make_app()):  # a restart registers nothing new
        pass

    # someone changed a registered version: this node would publish what others misread
    changed = orjson.loads(entry.value or b"")
    changed["$defs"]["Opened"]["properties"]["owner"] = {"type": "integer"}
    await kv.put("account.Opened.v2", orjson.dumps(changed))
    conflict = pytest.RaisesExc(SchemaConflict, match=r"account\.Opened\.v2")
    with pytest.RaisesGroup(conflict, flatten_subgroups=True):
        async with open_node(config, make_app()):
            pass
    report = check_compatibility(await read_registry(js), code_schemas(registry))
    assert [f.type for f in report.breaking] == ["account.Opened (event)"]


def test_kaya_schema_publish_and_check_against_the_registry(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kaya.app.cli import main

    monkeypatch.chdir(REPO)
    url = ["--url", nats_server.url]
    assert (
        main(["schema", "check", "--app", BANK, "--registry", *url]) == 0
    )  # an empty registry: all new
    assert "new, v1" in capsys.readouterr().out
    assert main(["schema", "publish", "--app", BANK, *url]) == 0
    recorded = load_schemas(REPO / SCHEMAS_FILE)
    assert f"{len(recorded)} schemas, {len(recorded)} newly registered" in capsys.readouterr().out
    assert main(["schema", "check", "--app", BANK, "--registry", *url]) == 0
    assert f"{len(code_schemas(make_app().registry))} types unchanged" in capsys.readouterr().out


# ---- old events in JetStream, unknown versions -------------------------------------------------


async def stored_before_start(config: Any, events: dict[str, list[NewEvent]]) -> None:
    async with open_event_store(config.store_path) as store:
        for entity_id, stream in events.items():
            await store.append(Append("account", entity_id, 0, stream))


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Poll (bounded) for a state nothing signals, like a consumer that stopped."""
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_v1_events_in_jetstream_reach_consumers_in_their_current_shape(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    config = node_config(nats_server, tmp_path / "node")
    await stored_before_start(config, {"old": [opened_v1(), deposited(40)]})
    notes = await nc.subscribe("kaya.notify.ann")
    async with open_node(config, make_app()) as node:
        await call(nc, "kaya.cmd.account.new", {"type": "Open", "owner": "ann", "currency": "EUR"})
        await call(nc, "kaya.cmd.account.new", {"type": "Deposit", "amount": 2})
        await caught_up(node)
        view = await call(nc, "kaya.view.analytics")
        assert view["currencies"]["EUR"]["balance"] == 42
        assert view["accounts"]["opened"] == 2
        with anyio.fail_after(10):
            bodies = [orjson.loads((await notes.next_msg(timeout=5)).data) for _ in range(4)]
        opened = {b["id"]: b["event"] for b in bodies if b["event"]["type"] == "Opened"}
        assert (
            opened["old"]
            == opened["new"]
            == {
                "type": "Opened",
                "owner": "ann",
                "currency": "EUR",
                "kind": "personal",
            }
        )
    # the stream still carries v1 as stored: other services read it with the v1 schema
    sub = await nc.jetstream().subscribe(
        "kaya.evt.account.old", stream=EVENTS_STREAM, ordered_consumer=True
    )
    first = await sub.next_msg(timeout=5)
    assert (first.headers or {})["Kaya-Schema-Version"] == "1"
    assert "kind" not in orjson.loads(first.data)
    await sub.unsubscribe()


async def caught_up(node: Node) -> None:
    last = await node.store.last_position()
    with anyio.fail_after(15):
        await node.relay.wait_caught_up()
        for runner in node.consumers.values():
            await runner.wait_for_position(last)


def policy_consumer(name_: str, policy: UnknownEventPolicy) -> Recorder:
    class Policy(Recorder):
        name = name_
        unknown_event_policy = policy

    return Policy()


@pytest.mark.anyio
async def test_an_unknown_version_is_handled_by_policy_never_by_crashing(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    config = node_config(nats_server, tmp_path / "node")
    newer = NewEvent(uuid.uuid4().hex, "Opened", 9, b'{"type":"Opened","holder":"x"}')
    await stored_before_start(
        config, {"a1": [opened_v1()], "future": [newer], "a2": [opened_v1("bo")]}
    )
    consumers = {
        "dead": policy_consumer("dead", "dead_letter"),
        "skip": policy_consumer("skip", "skip"),
        "halt": policy_consumer("halt", "stop"),
    }

    async with open_node(config, make_app(consumers=consumers.values())) as node:
        runners = node.consumers
        await until(lambda: bool(runners["halt"].statistics().stopped))
        with anyio.fail_after(15):
            await runners["dead"].wait_for_position(3)
            await runners["skip"].wait_for_position(3)
        for name in ("dead", "skip"):
            assert [(t, v, b["owner"]) for t, v, b in consumers[name].seen] == [
                ("Opened", 2, "ann"),
                ("Opened", 2, "bo"),
            ]
            assert runners[name].statistics().unknown == 1
        assert [b["owner"] for _, _, b in consumers["halt"].seen] == ["ann"]
        assert "newer than this code" in runners["halt"].statistics().stopped
        assert runners["halt"].statistics().checkpoint == 1  # the event stays unapplied, unacked
        letters = await list_dead_letters(nc.jetstream(), "dead")
        assert [(x.event_type, x.original_subject) for x in letters] == [
            ("Opened", "kaya.evt.account.future")
        ]
        assert "newer than this code" in letters[0].last_error
        assert await list_dead_letters(nc.jetstream(), "skip") == []
        # the node keeps serving, and the consumers that did not stop keep consuming
        reply = await call(nc, "kaya.cmd.account.a1", {"type": "Deposit", "amount": 3})
        assert reply["ok"] is True, reply
        with anyio.fail_after(15):
            await runners["dead"].wait_for_position(4)
        assert consumers["dead"].seen[-1] == ("Deposited", 1, {"type": "Deposited", "amount": 3})
        assert len(consumers["halt"].seen) == 1
