"""Notifications: every account event becomes a message on `kaya.notify.<owner token>`.

The token is `Context.pseudonym(owner)`: with security off the owner's name made
subject-safe (`kaya.notify.alice`); with it on an HMAC of the name (`kaya.notify.p3f9...`),
so no subject, log line or table here holds a name: the consumer stores the token, not
the owner, and the owner's sealed field is opened only to compute it. An owner's
app learns its subject from `kaya pseudonym NAME` (admin) or from whoever signed it up.
Sealed fields stay masked ("***") in the messages.

That includes what transfers do to an account (`TransferDebited`, `TransferCredited`,
`TransferRefunded`, `TransferSettled`): the owner sees money leave, arrive or come back.

It is also the choreographed half of transfers: nobody orchestrates it, it reacts
to a transfer's `Failed` event by telling the source account's owner.

An external effect, so at least once: each message carries the event id as
`Kaya-Dedup-Key` (and `Nats-Msg-Id`, so a stream that stores them drops repeats),
which is how a reader sees each event once. The owner of an account is learned
from its `Opened` event and kept in the consumer's own table; an account opened before
this node ran the consumer (in a cluster it runs on one node at a time, and moves) is
looked up in the node's store, which holds every event.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson

from kaya import Consumer, Context, Delivered, Effects

SEALED = "kaya:enc:v1:"


def notify_subject(token: str) -> str:
    """The subject of an owner's notifications, from `Context.pseudonym(owner)`."""
    return f"kaya.notify.{token}"


def _masked(body: dict[str, Any]) -> dict[str, Any]:
    return {k: "***" if isinstance(v, str) and v.startswith(SEALED) else v for k, v in body.items()}


class UnknownOwner(Exception):
    """An account event arrived before the consumer saw the account's `Opened`."""


class Notifications(Consumer):
    name = "notifications"
    filter_subject = "kaya.evt.>"
    tables = ("notify_owner_tokens", "notify_transfers")
    ddl = """
    CREATE TABLE IF NOT EXISTS notify_owner_tokens (
        id    TEXT PRIMARY KEY,
        owner TEXT NOT NULL  -- the owner's token (Context.pseudonym), never the name
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS notify_transfers (
        id     TEXT PRIMARY KEY,
        source TEXT NOT NULL
    ) WITHOUT ROWID
    """

    def __init__(self, *, cache_size: int = 10_000) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._sources: dict[str, str] = {}
        self._cache_size = cache_size

    def bind(self, context: Context) -> None:
        super().bind(context)
        self._owners.clear()  # what another node's store said is not this one's
        self._sources.clear()

    async def handle(self, event: Delivered, effects: Effects) -> None:
        if event.entity == "transfer":
            await self._on_transfer(event, effects)
            return
        if event.entity != "account":
            return
        body = event.decode()
        if event.type == "Opened":
            owner = await self._token(event.entity_id, event.data)
            effects.execute(
                "INSERT OR REPLACE INTO notify_owner_tokens (id, owner) VALUES (?, ?)",
                (event.entity_id, owner),
            )
            self._remember(event.entity_id, owner)
        else:
            owner = await self._owner_of(event.entity_id)
        message = {
            "dedup_key": event.event_id,
            "entity": event.entity,
            "id": event.entity_id,
            "version": event.entity_version,
            "event": _masked(body),
        }
        headers = {"Kaya-Dedup-Key": event.event_id, "Nats-Msg-Id": event.event_id}
        if event.traceparent:
            headers["traceparent"] = event.traceparent
        await self.context.publish(notify_subject(owner), orjson.dumps(message), headers)

    async def _token(self, account: str, opened: bytes) -> str:
        """The owner's subject token from the account's `Opened` event (sealed or not)."""
        body = orjson.loads(await self.context.reveal("account", account, opened))
        return self.context.pseudonym(str(body["owner"]))

    async def _on_transfer(self, event: Delivered, effects: Effects) -> None:
        body = event.decode()
        if event.type == "Started":
            effects.execute(
                "INSERT OR REPLACE INTO notify_transfers (id, source) VALUES (?, ?)",
                (event.entity_id, str(body["source"])),
            )
            self._sources[event.entity_id] = str(body["source"])
            return
        if event.type != "Failed":
            if event.type == "Completed":
                self._sources.pop(event.entity_id, None)
            return
        source = self._sources.pop(event.entity_id, None)
        if source is None:
            rows = await self.context.query(
                "SELECT source FROM notify_transfers WHERE id = ?", (event.entity_id,)
            )
            if rows:
                source = str(rows[0][0])
            else:  # Started before this node ran the consumer: the store has it
                started = await self.context.stream("transfer", event.entity_id)
                if not started or started[0].type != "Started":
                    raise UnknownOwner(f"no Started seen for transfer {event.entity_id}")
                source = str(orjson.loads(started[0].data)["source"])
        try:
            owner = await self._owner_of(source)
        except UnknownOwner:
            return  # the source account never existed (that is why it failed): nobody to tell
        message = {
            "dedup_key": event.event_id,
            "entity": "transfer",
            "id": event.entity_id,
            "version": event.entity_version,
            "event": body,
            "text": f"transfer {event.entity_id} failed: {body.get('reason', '')}",
        }
        headers = {"Kaya-Dedup-Key": event.event_id, "Nats-Msg-Id": event.event_id}
        if event.traceparent:
            headers["traceparent"] = event.traceparent
        await self.context.publish(notify_subject(owner), orjson.dumps(message), headers)

    def _remember(self, account: str, owner: str) -> None:
        self._owners[account] = owner
        self._owners.move_to_end(account)
        while len(self._owners) > self._cache_size:
            self._owners.popitem(last=False)

    async def _owner_of(self, account: str) -> str:
        owner = self._owners.get(account)
        if owner is None:
            rows = await self.context.query(
                "SELECT owner FROM notify_owner_tokens WHERE id = ?", (account,)
            )
            if rows:
                owner = str(rows[0][0])
            else:  # opened before this node ran the consumer (a cluster moves it): the store
                opened = await self.context.stream("account", account)
                if not opened or opened[0].type != "Opened":
                    raise UnknownOwner(f"no Opened seen for account {account}")
                owner = await self._token(account, opened[0].data)
            self._remember(account, owner)
        return owner
