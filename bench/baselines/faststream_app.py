"""FastStream baseline: the naive append behind a FastStream NATS responder.

    python -m bench.baselines.faststream_app --url nats://127.0.0.1:PORT --db /tmp/x/fs.sqlite

What a team reaching for a messaging framework would write: a `NatsBroker` with
`@broker.subscriber("kaya.cmd.account.{account_id}")` handlers that take the
account id from the subject (`Path()`) and return the reply, which FastStream
publishes to the request's reply subject itself. Behind the handlers is exactly
the naive baseline's store (bench/baselines/naive.py: one aiosqlite connection,
one BEGIN IMMEDIATE ... COMMIT per request, WAL, synchronous=FULL, Kaya's events
table), so the difference from `naive` is what the framework adds per message
(parsing into a StreamMessage, dependency injection, middlewares, its publisher)
and how it schedules handlers.

Concurrency: a core NATS subscriber in FastStream 0.7 runs its handler for one
message at a time unless `max_workers` is set; with `max_workers=N` it hands
messages to a task group that runs up to N handlers at once. It is set to
MAX_WORKERS (1,000, more than any load generator here keeps in flight) so
FastStream handles requests as concurrently as the nats-py baselines do; the
transactions themselves are still serialised on the one connection.

Other choices: the handlers return the reply as bytes (encoded with msgspec by
the shared code, so the wire format is the same as Kaya's, and FastStream sends
bytes as they are); per-message logging is moved to DEBUG (the logger stays at
INFO, so errors still print) because FastStream logs every message received and
processed at INFO by default and a Kaya node runs the benchmark at WARNING; the
event loop is uvloop; the broker is started and stopped programmatically instead
of through `faststream run`, to print `ready` once subscribed and stop on SIGTERM
(`broker.stop()` waits for handlers in flight, then drains the connection).

It does not do what the naive baseline does not do either: idempotency, outbox,
snapshots, backpressure, Withdraw/Close (see naive.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop
from faststream import Path as SubjectToken
from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage

from bench.baselines.naive import (
    AccountStore,
    Refused,
    build_parser,
    check_entity_id,
    error_reply,
)

MAX_WORKERS = 1000
"""Handlers FastStream may run at once per subscriber (its default is 1)."""
GRACEFUL_TIMEOUT = 10.0


def build_broker(url: str, store: AccountStore) -> NatsBroker:
    broker = NatsBroker(
        url,
        name="bench-faststream",
        allow_reconnect=False,
        graceful_timeout=GRACEFUL_TIMEOUT,
        log_level=logging.DEBUG,  # per-message "Received"/"Processed" lines: off at INFO
    )

    @broker.subscriber("kaya.cmd.account.{account_id}", max_workers=MAX_WORKERS)
    async def on_command(msg: NatsMessage, account_id: str = SubjectToken()) -> bytes:
        try:
            return await store.command(check_entity_id(account_id), msg.body)
        except Refused as exc:
            return error_reply(exc.code, exc.message)

    @broker.subscriber("kaya.qry.account.{account_id}", max_workers=MAX_WORKERS)
    async def on_query(account_id: str = SubjectToken()) -> bytes:
        try:
            return await store.query(check_entity_id(account_id))
        except Refused as exc:
            return error_reply(exc.code, exc.message)

    return broker


async def main_async(url: str, db: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store = await AccountStore.open(db)
    try:
        broker = build_broker(url, store)
        try:
            await broker.start()
            await broker.connection.flush()  # the server has our subscriptions
            print(
                f"bench-faststream ready on {url} (kaya.cmd.account.*, kaya.qry.account.*)",
                flush=True,
            )
            await stop.wait()
        finally:
            await broker.stop()
    finally:
        await store.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    args = build_parser((__doc__ or "").splitlines()[0]).parse_args()
    uvloop.run(main_async(args.url, args.db))


if __name__ == "__main__":
    main()
