"""Entity keys: one data key per entity, wrapped by the master key, kept in a NATS KV bucket.

    KAYA_KEYS   key `<entity>.<id>`   value: nonce | AES-GCM(master, data key)

Why NATS and not the node's SQLite: every node of a cluster reads every entity's
events (its store follows the log), so every node needs the keys, and a forgotten key
must be gone from all of them at once. The bucket is replicated like KAYA_EVENTS, and
forgetting is one secure erase of one message there (`kaya forget`, admin only:
STREAM.MSG.DELETE overwrites the stored message), then a purge marker every node sees
on `$KV.KAYA_KEYS.>`, which drops the key from its cache and reloads the entity's
actor. No SQLite file ever holds a key, so no SQLite file needs scrubbing.

A key is made, and stored with an acknowledged write, before the first event sealed
with it is committed: a crash in between leaves an unused key, never an event whose
key was lost. The master key (`$KAYA_MASTER_KEY`, 64 hex digits, else
`<security dir>/master.key`, made once, 0600) must be the same on every node; it
never leaves the node, and without it the bucket is useless to whoever copies it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import nats.js.errors
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

log = logging.getLogger("kaya.security")

KEYS_BUCKET = "KAYA_KEYS"
KEYS_STREAM = f"KV_{KEYS_BUCKET}"
_NONCE = 12


class UnreadableKey(Exception):
    """A key that exists but cannot be opened: the master key differs from the one that
    wrapped it (a node started with another `KAYA_MASTER_KEY`)."""


def master_key(directory: Path) -> bytes:
    """`$KAYA_MASTER_KEY` (hex) if set, else `<dir>/master.key`, made once (0600)."""
    text = os.environ.get("KAYA_MASTER_KEY", "").strip()
    if not text:
        path = directory / "master.key"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another node of a shared security dir made it first
                pass
            else:
                with os.fdopen(fd, "w") as out:
                    out.write(os.urandom(32).hex())
        text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("the master key must be 64 hex digits (KAYA_MASTER_KEY)") from None
    if len(key) != 32:
        raise ValueError(f"the master key must be 32 bytes (64 hex digits), not {len(key)}")
    return key


def pseudonym_key(master: bytes) -> bytes:
    """The key pseudonyms are made with (HMAC), derived so it is not the master key."""
    return hmac.new(master, b"kaya pseudonyms v1", hashlib.sha256).digest()


def pseudonym(secret: bytes, value: str) -> str:
    """A subject token for `value`: `p` + 24 hex digits of its HMAC under `secret` (96
    bits: no two owners of any realistic bank share one, and it reveals nothing)."""
    return "p" + hmac.new(secret, value.encode(), hashlib.sha256).hexdigest()[:24]


def key_name(entity: str, entity_id: str) -> str:
    return f"{entity}.{entity_id}"


def stream_config(replicas: int) -> StreamConfig:
    """The bucket's stream: what `create_key_value` makes (history 1), but deletes allowed.
    A KV bucket's stream denies deleting a message, and that cannot be changed later;
    forgetting is exactly that, because the server's erase overwrites the message where
    a KV purge would only drop it."""
    return StreamConfig(
        name=KEYS_STREAM,
        description="Kaya: wrapped data keys of entities with sensitive fields (kaya forget)",
        subjects=[f"$KV.{KEYS_BUCKET}.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=False,
        discard=DiscardPolicy.NEW,
        duplicate_window=120,
        max_msgs_per_subject=1,
        num_replicas=replicas,
        storage=StorageType.FILE,
    )


async def ensure_keys_bucket(nc: NATS, replicas: int) -> KeyValue:
    js = nc.jetstream()
    try:
        await js.add_stream(stream_config(replicas))
    except nats.js.errors.BadRequestError as exc:  # made before, with other settings
        log.warning("%s exists with other settings (%s); using it as it is", KEYS_STREAM, exc)
    return await js.key_value(KEYS_BUCKET)


class KeyVault:
    """The keyring of actors/sealing.py, over the KV bucket, with a bounded cache.

    `on_forget(entity, id)` is called when a key is erased anywhere (from the bucket's
    subject): the node reloads that entity's actor, whose state still holds plaintext.
    """

    def __init__(
        self,
        nc: NATS,
        kv: KeyValue,
        master: bytes,
        *,
        cache_size: int = 100_000,
        on_forget: Callable[[str, str], None] = lambda entity, entity_id: None,
    ) -> None:
        self._nc = nc
        self._kv = kv
        self._master = AESGCM(master)
        self._cache: OrderedDict[str, AESGCM] = OrderedDict()
        self._cache_size = cache_size
        self.on_forget = on_forget
        self.forgotten = 0

    async def start(self) -> None:
        """Listen for erased keys. Core NATS: a key forgotten while this node was cut off
        is dropped when the connection comes back (the cache is cleared on reconnect)."""
        await self._nc.subscribe(f"$KV.{KEYS_BUCKET}.>", cb=self._on_change)

    def clear(self) -> None:
        self._cache.clear()

    async def _on_change(self, msg: Msg) -> None:
        operation = (msg.headers or {}).get("KV-Operation")
        if operation not in ("DEL", "PURGE"):
            return
        name = msg.subject[len(f"$KV.{KEYS_BUCKET}.") :]
        entity, _, entity_id = name.partition(".")
        self._cache.pop(name, None)
        self.forgotten += 1
        try:
            self.on_forget(entity, entity_id)
        except Exception:
            log.exception("reloading %s/%s after its key was forgotten failed", entity, entity_id)

    async def key(self, entity: str, entity_id: str, *, create: bool) -> AESGCM | None:
        name = key_name(entity, entity_id)
        cached = self._cache.get(name)
        if cached is not None:
            self._cache.move_to_end(name)
            return cached
        wrapped = await self._read(name)
        if wrapped is None:
            if not create:
                return None
            wrapped = await self._create(name)
        aead = self._unwrap(name, wrapped)
        self._cache[name] = aead
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return aead

    async def _read(self, name: str) -> bytes | None:
        try:
            entry = await self._kv.get(name)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return entry.value or None

    async def _create(self, name: str) -> bytes:
        nonce = os.urandom(_NONCE)
        wrapped = nonce + self._master.encrypt(nonce, os.urandom(32), _wrap_aad(name))
        try:
            await self._kv.create(name, wrapped)
        except nats.js.errors.KeyWrongLastSequenceError:
            found = await self._read(name)  # made by the node before us (a failover)
            if found is None:
                raise
            return found
        return wrapped

    def _unwrap(self, name: str, wrapped: bytes) -> AESGCM:
        try:
            key = self._master.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _wrap_aad(name))
        except InvalidTag:
            raise UnreadableKey(
                f"the master key does not open the key of {name}: is KAYA_MASTER_KEY (or"
                " master.key) the same on every node?"
            ) from None
        return AESGCM(key)


def _wrap_aad(name: str) -> bytes:
    return b"kaya-key:" + name.encode()


async def forget(nc: NATS, entity: str, entity_id: str) -> bool:
    """Destroy an entity's key everywhere: erase its message from the bucket (the server
    overwrites it), then purge the key so every node drops its cached copy. False if
    there was no key (never had sensitive data, or already forgotten)."""
    js = nc.jetstream()
    kv = await js.key_value(KEYS_BUCKET)
    name = key_name(entity, entity_id)
    try:
        entry = await kv.get(name)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return False
    if entry.revision is not None:
        await js.delete_msg(KEYS_STREAM, entry.revision)  # erase: no_erase is false
    await kv.purge(name)
    return True
