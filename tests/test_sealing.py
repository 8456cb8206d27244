"""Sealing sensitive fields (actors/sealing.py), without NATS or SQLite: a keyring in memory."""

from __future__ import annotations

import os
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
async def test_a_remembered_reply_is_sealed_like_its_events() -> None:
    keys = MemoryKeyring()
    sealer = Sealer(keys)
    account = Account()
    reply = orjson.dumps(
        {"ok": True, "entity": "account", "id": "a-1", "version": 1,
         "events": [orjson.loads(OPENED)]}
    )  # fmt: skip
    sealed = await sealer.seal_reply("account", "a-1", account.sensitive, reply)
    assert b"Ada" not in sealed
    assert orjson.loads(await sealer.open("account", "a-1", sealed)) == orjson.loads(reply)
    refused = b'{"ok":false,"error":{"code":"rejected","message":"no"}}'
    assert await sealer.seal_reply("account", "a-1", account.sensitive, refused) is refused


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
