"""Sealing sensitive fields (actors/sealing.py) with a keyring in memory, without NATS."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec
import orjson
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from examples.bank.account import Account, AccountState
from kaya.actors.masking import MASK, sensitive_fields
from kaya.actors.sealing import PREFIX, Sealer, is_sealed


class MemoryKeyring:
    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], AESGCM] = {}
        self.created = 0

    async def key(self, entity: str, entity_id: str, *, create: bool) -> AESGCM | None:
        found = self.keys.get((entity, entity_id))
        if found is None and create:
            found = self.keys[(entity, entity_id)] = AESGCM(os.urandom(32))
            self.created += 1
        return found


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


OPENED = b'{"type":"Opened","owner":"Ada Lovelace","currency":"EUR","kind":"personal"}'


@pytest.mark.anyio
async def test_a_sealed_field_is_ciphertext_and_opens_again() -> None:
    keys = MemoryKeyring()
    sealer = Sealer(keys)
    sealed = await sealer.seal("account", "a-1", frozenset({"owner"}), OPENED)
    assert b"Ada" not in sealed
    assert is_sealed(sealed)
    body = orjson.loads(sealed)
    assert body["owner"].startswith(PREFIX)
    assert body["currency"] == "EUR"
    assert body["type"] == "Opened"
    assert orjson.loads(await sealer.open("account", "a-1", sealed)) == orjson.loads(OPENED)
    again = await sealer.seal("account", "a-1", frozenset({"owner"}), OPENED)
    assert again != sealed  # a fresh nonce each time: equal names do not look equal
    assert keys.created == 1  # one key per entity


@pytest.mark.anyio
async def test_a_forgotten_key_reads_as_masked() -> None:
    keys = MemoryKeyring()
    sealer = Sealer(keys)
    sealed = await sealer.seal("account", "a-1", frozenset({"owner"}), OPENED)
    del keys.keys[("account", "a-1")]
    assert orjson.loads(await sealer.open("account", "a-1", sealed))["owner"] == MASK


@pytest.mark.anyio
async def test_a_sealed_value_moved_to_another_entity_or_field_does_not_open() -> None:
    keys = MemoryKeyring()
    sealer = Sealer(keys)
    token = orjson.loads(await sealer.seal("account", "a-1", frozenset({"owner"}), OPENED))["owner"]
    keys.keys[("account", "a-2")] = keys.keys[("account", "a-1")]  # even under the same key
    moved = orjson.dumps({"type": "Opened", "owner": token})
    assert orjson.loads(await sealer.open("account", "a-2", moved))["owner"] == MASK
    renamed = orjson.dumps({"type": "Opened", "currency": token})
    assert orjson.loads(await sealer.open("account", "a-1", renamed))["currency"] == MASK
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    forged = orjson.dumps({"type": "Opened", "owner": tampered})
    assert orjson.loads(await sealer.open("account", "a-1", forged))["owner"] == MASK


@pytest.mark.anyio
async def test_data_without_sensitive_fields_is_left_alone() -> None:
    keys = MemoryKeyring()
    sealer = Sealer(keys)
    deposited = b'{"type":"Deposited","amount":5}'
    assert await sealer.seal("account", "a-1", frozenset(), deposited) is deposited
    assert await sealer.open("account", "a-1", deposited) is deposited
    assert keys.created == 0  # no key made for an entity that never had anything to seal


@pytest.mark.anyio
async def test_a_remembered_reply_is_sealed_like_its_events(tmp_path: Path) -> None:
    """Through a turn (a real SQLite file): the reply kept for repeats holds the sealed
    events, the caller got the plaintext, a repeat gets it again; a refusal stays as is."""
    import anyio

    from examples.bank.account import Deposit, Open
    from kaya.actors import ActorRuntime
    from kaya.store import open_event_store

    keys = MemoryKeyring()
    account = Account()
    async with open_event_store(tmp_path / "kaya.db") as store:
        runtime = ActorRuntime(store, sealer=Sealer(keys))
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)
            opening = Open(owner="Ada Lovelace", currency="EUR")
            first = await runtime.ask(account, "a-1", opening, command_id="open-1")
            refused = await runtime.ask(account, "a-2", Deposit(amount=5), command_id="dep-1")
            again = await runtime.ask(account, "a-1", opening, command_id="open-1")
            tg.cancel_scope.cancel()
        kept = await store.find_replies("account", "a-1", ["open-1"])
        kept_refusal = await store.find_replies("account", "a-2", ["dep-1"])
    assert b"Ada" in first  # the caller gets what it sent
    assert again == first  # and a repeat the same reply, opened again
    stored = kept["open-1"].body
    assert b"Ada" not in stored
    event = orjson.loads(stored)["events"][0]
    assert event["owner"].startswith(PREFIX)
    assert orjson.loads(await Sealer(keys).open("account", "a-1", stored)) == orjson.loads(first)
    assert kept_refusal["dep-1"].body == refused  # nothing in it to seal


def test_the_bank_marks_the_owner_sensitive_in_events_and_state() -> None:
    account = Account()
    assert account.sensitive("Opened") == {"owner"}
    assert account.sensitive("Deposited") == frozenset()
    assert account.state_sensitive == {"owner"}
    assert sensitive_fields(AccountState) == {"owner"}


def test_a_sensitive_field_that_is_not_a_string_is_refused() -> None:
    class Scored(msgspec.Struct):
        score: Annotated[int, msgspec.Meta(extra={"sensitive": True})]

    with pytest.raises(ValueError, match=r"Scored.score is marked sensitive but is not a string"):
        sensitive_fields(Scored)
