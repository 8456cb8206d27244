"""Sealing: the fields a schema marks sensitive are stored encrypted, with a key per entity.

With security on, a turn seals its events (and the replies it remembers, and its
snapshots) before anything leaves the actor, so the store, the relay, the log of a
cluster and the dead letters only ever hold ciphertext for those fields: there is
one place to encrypt, and every copy downstream is a copy of ciphertext. Each entity
(`account/a-1`) has its own data key, kept wrapped by the master key in a key store
(app/security/keys.py); `kaya forget account a-1` destroys that key, and every copy of
the fields, wherever it went, becomes unreadable at once ("crypto-shredding"): no
rewrite of an immutable event log, no hunt through backups.

A sealed value stays a JSON string, `"kaya:enc:v1:<base64url(nonce | ciphertext)>"`
(AES-256-GCM), so the event keeps its shape. The field's name and the entity are its
associated data: a sealed value copied into another field or entity does not open.
Reading opens it again; a value whose key is gone, or that fails authentication,
reads as `MASK`, so a forgotten owner is "***" in queries and consumers alike.
Only top-level string fields are sealed: mark a field sensitive where it is a string.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any, Protocol

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kaya.actors.masking import MASK

PREFIX = "kaya:enc:v1:"
_MARK = b'"kaya:enc:v1:'
_NONCE = 12


class Keyring(Protocol):
    """The data keys of entities (app/security/keys.py keeps them wrapped, in NATS)."""

    async def key(self, entity: str, entity_id: str, *, create: bool) -> AESGCM | None:
        """The entity's key; with `create`, made (and stored durably) if it has none.
        None when it has none, or had one that was forgotten."""
        ...


def is_sealed(data: bytes) -> bool:
    """Whether JSON `data` holds a sealed value: the fast path skips everything else."""
    return _MARK in data


def _aad(entity: str, entity_id: str, field: str) -> bytes:
    return f"{entity}/{entity_id}/{field}".encode()


def seal_value(aead: AESGCM, entity: str, entity_id: str, field: str, value: str) -> str:
    nonce = os.urandom(_NONCE)
    sealed = aead.encrypt(nonce, value.encode(), _aad(entity, entity_id, field))
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def open_value(aead: AESGCM | None, entity: str, entity_id: str, field: str, token: str) -> str:
    """The plaintext of a sealed value, or MASK if its key is gone or it does not open."""
    if aead is None:
        return MASK
    raw = token[len(PREFIX) :]
    try:
        blob = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        plain = aead.decrypt(blob[:_NONCE], blob[_NONCE:], _aad(entity, entity_id, field))
        return plain.decode()
    except (InvalidTag, ValueError, binascii.Error):
        return MASK


def _open_in(value: Any, aead: AESGCM | None, entity: str, entity_id: str) -> Any:
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(item, str):
                if item.startswith(PREFIX):
                    value[name] = open_value(aead, entity, entity_id, name, item)
            elif isinstance(item, dict | list):
                _open_in(item, aead, entity, entity_id)
    elif isinstance(value, list):
        for item in value:
            _open_in(item, aead, entity, entity_id)
    return value


class Sealer:
    """Seals and opens the sensitive fields of one node's entities, through a keyring."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    async def seal(self, entity: str, entity_id: str, fields: frozenset[str], data: bytes) -> bytes:
        """`data` (a JSON object) with its top-level string `fields` sealed."""
        if not fields:
            return data
        body = orjson.loads(data)
        present = [f for f in fields if isinstance(body.get(f), str)]
        if not present:
            return data
        aead = await self._keyring.key(entity, entity_id, create=True)
        assert aead is not None  # create=True makes one or raises
        for name in present:
            body[name] = seal_value(aead, entity, entity_id, name, body[name])
        return orjson.dumps(body)

    async def open(self, entity: str, entity_id: str, data: bytes) -> bytes:
        """`data` with every sealed value opened (or MASK): anything JSON, at any depth."""
        if _MARK not in data:
            return data
        aead = await self._keyring.key(entity, entity_id, create=False)
        return orjson.dumps(_open_in(orjson.loads(data), aead, entity, entity_id))
