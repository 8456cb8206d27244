"""Naive baseline: NATS request -> one SQLite transaction -> reply, once per request.

    python -m bench.baselines.naive --url nats://127.0.0.1:PORT --db /tmp/x/naive.sqlite

What a competent first implementation of the same service looks like: nats-py on
uvloop, one aiosqlite connection, and for every command its own transaction

    BEGIN IMMEDIATE
    SELECT the account's row from a state table (version, owner, balance, ...)
    decide (the same rules as Kaya's account entity)
    INSERT the event into an `events` table shaped exactly like Kaya's (store/schema.py:
      same columns, UNIQUE (entity, entity_id, version), the gapless-version trigger)
    INSERT (Open) or UPDATE (Deposit) the state row
    COMMIT                      (WAL, synchronous=FULL: one fsync)

and only then the reply. It is as durable as a Kaya node (same pragmas as Kaya's
writer: WAL, synchronous=FULL, wal_autocheckpoint=10000) and replies in the same
wire format, so bench/e2e.py's generator and balance check work unchanged.

Requests are handled concurrently: nats-py runs a subscription's callback one
message at a time, so the callback only starts a task per request. The tasks
share the one connection, and a connection holds one transaction at a time, so
an asyncio.Lock serialises the transactions (FIFO); decoding, replying and the
next requests' parsing overlap with the commit in flight. That is the point of
"naive": no group commit, so throughput is bounded by one fsync plus five
aiosqlite thread hops per request, whatever the concurrency.

What it does not do that Kaya does: idempotency keys (`Kaya-Command-Id`), the
outbox relay to JetStream, consumers, snapshots (it keeps a state row instead,
written in the same transaction), sharding, backpressure (`overloaded`), auth,
tracing, metrics, Withdraw/Close. Event ids are uuid4 (Kaya's increase
monotonically); state is read from SQLite on every command (Kaya keeps it in
memory). Queries read the state row, under the same lock.

The NATS side (`serve`) and the account rules (`decode_command`, `decide`,
replies) are reused by the FastStream and eventsourcing baselines, so the three
differ only where they are meant to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import aiosqlite
import msgspec
import nats
import uvloop
from nats.aio.msg import Msg

from kaya.actors import wire as replies  # the contract's reply envelopes
from kaya.actors.errors import ErrorCode
from kaya.store.schema import DDL as KAYA_DDL

ENTITY = "account"
COMMAND_SUBJECT = "kaya.cmd.account.*"
QUERY_SUBJECT = "kaya.qry.account.*"
ENTITY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_AMOUNT = 10**15
MAX_BALANCE = 2**53 - 1
STOP_TIMEOUT = 10.0
"""Seconds to let requests in flight finish on SIGTERM before closing anyway."""


# ---- commands, events, errors: the account entity's rules (examples/bank/account.py) ----------

Amount = Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
Owner = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
Kind = Literal["personal", "business"]


class Open(msgspec.Struct, tag="Open", tag_field="type", forbid_unknown_fields=True):
    owner: Owner
    currency: Currency
    kind: Kind = "personal"


class Deposit(msgspec.Struct, tag="Deposit", tag_field="type", forbid_unknown_fields=True):
    amount: Amount


Command = Open | Deposit
KNOWN_COMMANDS = ("Open", "Deposit")


class _Probe(msgspec.Struct):
    type: str


class Opened(msgspec.Struct, tag="Opened", tag_field="type"):
    owner: str
    currency: str
    kind: str


class Deposited(msgspec.Struct, tag="Deposited", tag_field="type"):
    amount: int


Event = Opened | Deposited
SCHEMA_VERSIONS = {"Opened": 2, "Deposited": 1}
"""The schema versions Kaya records for these events."""


class Refused(Exception):
    """A command or query answered with an error reply; nothing was changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_decode_command = msgspec.json.Decoder(Command).decode
_decode_probe = msgspec.json.Decoder(_Probe).decode


def decode_command(body: bytes) -> Command:
    """The command in a request body; Refused with `bad_request` or `unknown_command`."""
    try:
        command: Command = _decode_command(body)
    except msgspec.DecodeError as exc:
        try:
            probe = _decode_probe(body)
        except msgspec.DecodeError:
            raise Refused("bad_request", f"malformed command: {exc}") from None
        if probe.type not in KNOWN_COMMANDS:
            raise Refused(
                "unknown_command",
                f"{ENTITY} has no command {probe.type!r} (known: {', '.join(KNOWN_COMMANDS)})",
            ) from None
        raise Refused("bad_request", f"malformed {probe.type}: {exc}") from None
    return command


def entity_id_of(subject: str, kind: str) -> str:
    """The id in `kaya.<kind>.account.<id>`; Refused with `bad_request` otherwise."""
    tokens = subject.split(".")
    if len(tokens) != 4 or tokens[:3] != ["kaya", kind, ENTITY]:
        raise Refused("bad_request", f"subject {subject!r} is not kaya.{kind}.{ENTITY}.<id>")
    return check_entity_id(tokens[3])


def check_entity_id(entity_id: str) -> str:
    if not ENTITY_ID.fullmatch(entity_id):
        raise Refused("bad_request", f"id {entity_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return entity_id


class AccountState(msgspec.Struct, kw_only=True):
    """What Kaya's account query returns in `state` (examples/bank/account.py) for an
    account no transfer is moving money out of (Kaya adds `outgoing` only then)."""

    owner: str = ""
    currency: str = ""
    balance: int = 0
    status: str = "new"


def decide(state: AccountState, command: Command) -> Event:
    """Kaya's account rules for Open and Deposit; Refused with `rejected` when one says no.

    Kaya's cap counts money held out by transfers in flight (`outgoing`) with the
    balance; with no transfers here that is always nothing, so the balance alone."""
    if isinstance(command, Open):
        if state.status != "new":
            raise Refused("rejected", f"account is already {state.status}")
        return Opened(owner=command.owner, currency=command.currency, kind=command.kind)
    if state.status != "open":
        raise Refused("rejected", f"account is not open (status {state.status})")
    if state.balance + command.amount > MAX_BALANCE:
        raise Refused("rejected", f"deposit would take the balance above {MAX_BALANCE}")
    return Deposited(amount=command.amount)


# ---- replies: the wire contract's envelopes, encoded by Kaya's own code -----------------------


_encode = msgspec.json.Encoder().encode
"""Event bodies for the events table."""


def command_done(entity_id: str, version: int, events: list[Any]) -> bytes:
    return replies.command_done(ENTITY, entity_id, version, events)


def state_reply(entity_id: str, version: int, state: Any) -> bytes:
    return replies.state_reply(ENTITY, entity_id, version, state)


def error_reply(code: str, message: str) -> bytes:
    return replies.error_reply(cast(ErrorCode, code), message)


# ---- the store: one transaction per command --------------------------------------------------

STATE_DDL = """
CREATE TABLE IF NOT EXISTS account_state (
    entity_id TEXT    PRIMARY KEY,
    version   INTEGER NOT NULL,
    owner     TEXT    NOT NULL,
    currency  TEXT    NOT NULL,
    kind      TEXT    NOT NULL,
    balance   INTEGER NOT NULL,
    status    TEXT    NOT NULL
) WITHOUT ROWID;
"""

_SELECT_STATE = (
    "SELECT version, owner, currency, balance, status FROM account_state WHERE entity_id = ?"
)
_INSERT_EVENT = (
    "INSERT INTO events (event_id, entity, entity_id, version, type, schema_version,"
    " data, recorded_at, command_id, traceparent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)"
)
_INSERT_STATE = (
    "INSERT INTO account_state (entity_id, version, owner, currency, kind, balance, status)"
    " VALUES (?, 1, ?, ?, ?, 0, 'open')"
)
_UPDATE_BALANCE = "UPDATE account_state SET version = ?, balance = ? WHERE entity_id = ?"


class AccountStore:
    """Accounts over one aiosqlite connection: each command is its own transaction."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()  # one transaction at a time on the one connection

    @classmethod
    async def open(cls, path: Path) -> AccountStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT
        try:
            # Kaya's writer pragmas (store/sql.py): same durability, same checkpointing
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA wal_autocheckpoint = 10000")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA busy_timeout = 5000")
            await db.executescript(KAYA_DDL + STATE_DDL)
        except BaseException:
            await db.close()
            raise
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    async def _state(self, entity_id: str) -> tuple[int, AccountState]:
        rows = list(await self._db.execute_fetchall(_SELECT_STATE, (entity_id,)))
        if not rows:
            return 0, AccountState()
        version, owner, currency, balance, status = rows[0]
        return version, AccountState(owner=owner, currency=currency, balance=balance, status=status)

    async def command(self, entity_id: str, body: bytes) -> bytes:
        """Decode, then BEGIN; read; decide; append; update; COMMIT: the reply after the fsync."""
        try:
            command = decode_command(body)
        except Refused as exc:
            return error_reply(exc.code, exc.message)
        db = self._db
        async with self._lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                version, state = await self._state(entity_id)
                event = decide(state, command)
                new_version = version + 1
                await db.execute(
                    _INSERT_EVENT,
                    (
                        uuid.uuid4().hex,
                        ENTITY,
                        entity_id,
                        new_version,
                        type(event).__name__,
                        SCHEMA_VERSIONS[type(event).__name__],
                        _encode(event),
                        time.time(),
                    ),
                )
                if isinstance(event, Opened):
                    await db.execute(
                        _INSERT_STATE, (entity_id, event.owner, event.currency, event.kind)
                    )
                else:
                    await db.execute(
                        _UPDATE_BALANCE, (new_version, state.balance + event.amount, entity_id)
                    )
                await db.execute("COMMIT")
            except Refused as exc:
                await db.execute("ROLLBACK")
                return error_reply(exc.code, exc.message)
            except BaseException:
                with contextlib.suppress(Exception):
                    await db.execute("ROLLBACK")
                raise
        return command_done(entity_id, new_version, [event])

    async def query(self, entity_id: str) -> bytes:
        async with self._lock:  # never read another task's uncommitted transaction
            version, state = await self._state(entity_id)
        return state_reply(entity_id, version, state)


# ---- NATS: a nats-py responder, one task per request ------------------------------------------

Handler = Callable[[str, bytes], Awaitable[bytes]]
"""A command: (entity id, request body) -> reply body."""
QueryHandler = Callable[[str], Awaitable[bytes]]
"""A state query: entity id -> reply body."""


async def _answer(msg: Msg, kind: str, handler: Handler) -> None:
    try:
        reply = await handler(entity_id_of(msg.subject, kind), msg.data)
    except Refused as exc:
        reply = error_reply(exc.code, exc.message)
    except Exception as exc:  # the reply says so; the responder keeps serving
        print(f"internal error on {msg.subject}: {exc!r}", file=sys.stderr, flush=True)
        reply = error_reply("internal", f"{type(exc).__name__}: {exc}")
    if msg.reply:
        await msg.respond(reply)


async def serve(
    url: str, name: str, on_command: Handler, on_query: QueryHandler, *, note: str = ""
) -> None:
    """Answer commands and queries until SIGTERM/SIGINT, then finish those in flight.

    Prints one line containing `ready` (with `note`) once the server has the subscriptions.
    """
    nc = await nats.connect(url, name=name, allow_reconnect=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    inflight: set[asyncio.Task[None]] = set()

    async def query(entity_id: str, _body: bytes) -> bytes:
        return await on_query(entity_id)

    def spawn(kind: str, handler: Handler) -> Callable[[Msg], Awaitable[None]]:
        # nats-py awaits a subscription's callback before delivering its next message:
        # start a task per request so requests are handled concurrently
        async def callback(msg: Msg) -> None:
            task = asyncio.create_task(_answer(msg, kind, handler))
            inflight.add(task)
            task.add_done_callback(inflight.discard)

        return callback

    try:
        subs = [
            await nc.subscribe(COMMAND_SUBJECT, cb=spawn("cmd", on_command)),
            await nc.subscribe(QUERY_SUBJECT, cb=spawn("qry", query)),
        ]
        await nc.flush()
        extra = f"; {note}" if note else ""
        print(f"{name} ready on {url} ({COMMAND_SUBJECT}, {QUERY_SUBJECT}{extra})", flush=True)
        await stop.wait()
        for sub in subs:
            await sub.unsubscribe()
        if inflight:
            await asyncio.wait(set(inflight), timeout=STOP_TIMEOUT)
    finally:
        await nc.drain()


async def main_async(url: str, db: Path) -> None:
    store = await AccountStore.open(db)
    try:
        await serve(url, "bench-naive", store.command, store.query)
    finally:
        await store.close()


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", required=True, help="NATS URL, e.g. nats://127.0.0.1:4222")
    parser.add_argument("--db", required=True, type=Path, help="SQLite file (created if absent)")
    return parser


def main() -> None:
    args = build_parser((__doc__ or "").splitlines()[0]).parse_args()
    uvloop.run(main_async(args.url, args.db))


if __name__ == "__main__":
    main()
