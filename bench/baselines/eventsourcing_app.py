"""eventsourcing baseline: the `eventsourcing` library's SQLite application behind NATS.

    python -m bench.baselines.eventsourcing_app --url nats://127.0.0.1:PORT --db /tmp/x/es.sqlite

The Python library one would pick for event sourcing without Kaya (eventsourcing
9.5), used as its documentation shows: an `Account` aggregate whose `__init__`
is the `Opened` event and whose `deposit` method is the `Deposited` event, and a
`Bank` application with `open_account`, `deposit` and `get_account`, persisted by
`eventsourcing.sqlite` (PERSISTENCE_MODULE / SQLITE_DBNAME). Aggregate ids are
UUIDs, so `acc-7` maps to uuid5(NAMESPACE_URL, "kaya:account/acc-7").

Settings, chosen to match what a Kaya node does rather than to slow it down:

- Durability: the library opens file databases in WAL mode and leaves
  `synchronous` at SQLite's default, which is FULL in this build (checked at start
  and printed on the ready line); every `save()` is one transaction committed
  before the method returns, so before the reply. It does not set
  `wal_autocheckpoint` (Kaya sets 10,000 pages); that is left as the library has it.
- Snapshots every 100 events of an account (`snapshotting_intervals`), like
  Kaya's default `snapshot_every = 100`. The library writes each snapshot in its
  own transaction after the event's (Kaya writes it with the event).
- Aggregate cache on (AGGREGATE_CACHE_MAXSIZE = 100,000, Kaya's `max_active`)
  without fast-forwarding (AGGREGATE_CACHE_FASTFORWARD = n): this process is the
  only writer, as a node is the only writer of its store, so a cached aggregate
  is current and a command does not re-read its events. The library's defaults
  (no cache) would replay up to 100 events from SQLite per command.
- Concurrency: the library is synchronous and thread-safe (its SQLite pool
  serialises writers with a lock), so each command and query runs in a worker
  thread with `asyncio.to_thread` (the loop's default executor: min(32, cores+4)
  threads), tasks started per request by the same nats-py responder as the
  naive baseline. Two threads can decide on the same account at once; the loser
  gets the library's RecordConflictError (the unique (id, version) key) and
  retries on a fresh copy, up to MAX_ATTEMPTS, as optimistic concurrency is
  meant to be used. Retries are counted on stderr at exit.

It does not do what the naive baseline does not do either (idempotency, outbox
publishing, backpressure, Withdraw/Close); it does keep the library's notification
log (the stored_events rowid), which is its outbox equivalent.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

import uvloop
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import RecordConflictError

from bench.baselines.naive import (
    MAX_BALANCE,
    AccountState,
    Deposit,
    Open,
    Refused,
    build_parser,
    command_done,
    decode_command,
    error_reply,
    serve,
    state_reply,
)

SNAPSHOT_EVERY = 100
"""Kaya's default `[store] snapshot_every`."""
CACHE_SIZE = 100_000
"""Kaya's default `[actors] max_active`."""
MAX_ATTEMPTS = 10
"""Tries of one command when another thread saved the same account first."""


def account_uuid(account_id: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"kaya:account/{account_id}")


class Account(Aggregate):
    """An open account: opening it is creating it, so there is no `new` status here."""

    @staticmethod
    def create_id(account_id: str, **_: Any) -> UUID:
        return account_uuid(account_id)

    @event("Opened")
    def __init__(self, account_id: str, owner: str, currency: str, kind: str) -> None:
        self.account_id = account_id
        self.owner = owner
        self.currency = currency
        self.kind = kind
        self.balance = 0

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount


class Bank(Application[UUID]):
    snapshotting_intervals = {Account: SNAPSHOT_EVERY}

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(env)
        self.conflict_retries = 0

    def open_account(self, account_id: str, owner: str, currency: str, kind: str) -> Account:
        account = Account(account_id=account_id, owner=owner, currency=currency, kind=kind)
        try:
            self.save(account)
        except RecordConflictError:
            raise Refused("rejected", "account is already open") from None
        return account

    def deposit(self, account_id: str, amount: int) -> Account:
        for _ in range(MAX_ATTEMPTS):
            try:
                account: Account = self.repository.get(account_uuid(account_id))
            except AggregateNotFoundError:
                raise Refused("rejected", "account is not open (status new)") from None
            if account.balance + amount > MAX_BALANCE:
                raise Refused("rejected", f"deposit would take the balance above {MAX_BALANCE}")
            account.deposit(amount=amount)
            try:
                self.save(account)
            except RecordConflictError:
                self.conflict_retries += 1
                continue
            return account
        raise Refused("conflict", f"{account_id} changed under {MAX_ATTEMPTS} tries in a row")

    def get_account(self, account_id: str) -> Account | None:
        try:
            account: Account = self.repository.get(account_uuid(account_id))
        except AggregateNotFoundError:
            return None
        return account

    def synchronous_pragma(self) -> int:
        datastore = self.recorder.datastore  # type: ignore[attr-defined]
        with datastore.transaction(commit=False) as cursor:
            cursor.execute("PRAGMA synchronous")
            return int(cursor.fetchone()[0])


def build_bank(db: Path) -> Bank:
    db.parent.mkdir(parents=True, exist_ok=True)
    return Bank(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(db),
            "SQLITE_LOCK_TIMEOUT": "5",
            "AGGREGATE_CACHE_MAXSIZE": str(CACHE_SIZE),
            "AGGREGATE_CACHE_FASTFORWARD": "n",
        }
    )


class Responder:
    """The wire contract over a Bank: decode on the loop, run the command in a thread."""

    def __init__(self, bank: Bank) -> None:
        self.bank = bank

    def _command(self, entity_id: str, body: bytes) -> bytes:
        try:
            command = decode_command(body)
            if isinstance(command, Open):
                account = self.bank.open_account(
                    entity_id, command.owner, command.currency, command.kind
                )
                events: list[dict[str, Any]] = [
                    {
                        "type": "Opened",
                        "owner": command.owner,
                        "currency": command.currency,
                        "kind": command.kind,
                    }
                ]
            else:
                assert isinstance(command, Deposit)
                account = self.bank.deposit(entity_id, command.amount)
                events = [{"type": "Deposited", "amount": command.amount}]
        except Refused as exc:
            return error_reply(exc.code, exc.message)
        return command_done(entity_id, account.version, events)

    def _query(self, entity_id: str) -> bytes:
        account = self.bank.get_account(entity_id)
        if account is None:
            return state_reply(entity_id, 0, AccountState())
        state = AccountState(
            owner=account.owner, currency=account.currency, balance=account.balance, status="open"
        )
        return state_reply(entity_id, account.version, state)

    async def command(self, entity_id: str, body: bytes) -> bytes:
        return await asyncio.to_thread(self._command, entity_id, body)

    async def query(self, entity_id: str) -> bytes:
        return await asyncio.to_thread(self._query, entity_id)


async def main_async(url: str, db: Path) -> None:
    bank = await asyncio.to_thread(build_bank, db)
    try:
        synchronous = await asyncio.to_thread(bank.synchronous_pragma)
        if synchronous < 2:
            raise SystemExit(f"SQLite synchronous is {synchronous}, not FULL (2): not comparable")
        responder = Responder(bank)
        note = f"synchronous={synchronous}, up to {_threads()} worker threads"
        await serve(url, "bench-eventsourcing", responder.command, responder.query, note=note)
    finally:
        print(f"eventsourcing: {bank.conflict_retries} conflict retries", file=sys.stderr)
        bank.close()


def _threads() -> int:
    return min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default, used by to_thread


def main() -> None:
    args = build_parser((__doc__ or "").splitlines()[0]).parse_args()
    uvloop.run(main_async(args.url, args.db))


if __name__ == "__main__":
    main()
