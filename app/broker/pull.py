"""A lean JetStream pull: one inbox, pull requests published by hand, the next batch in flight.

nats-py's `PullSubscription.fetch` makes a uuid, a task and a `wait_for` for every
message it returns, and it asks for the next batch only when called again: the
server waits while the consumer commits. On a node whose one event loop also
serves commands, that overhead was the largest part of a consumer's cost
(bench.consumers). Here:

- messages arrive on one plain subscription to a private inbox and are appended
  to a buffer by its callback; no per-message task or future;
- `PREFETCH` pull requests of `batch` messages each are kept outstanding, so the
  server delivers the next batch while the previous one is handled and committed
  (the durable's `max_ack_pending` must allow `PREFETCH * batch`);
- a request that ends (a `408` when it expires) is replaced; a `409` (the consumer
  deleted, a leadership change, a limit exceeded) or a `503` (no such consumer) makes
  `next_batch` raise `PullGone`; a request nobody answered for `expires` plus a
  grace period (a server that restarted, a reconnect that dropped it) is
  replaced too, and after `LOST_REQUESTS_FAIL` such losses in a row `next_batch`
  raises so the caller can recreate the durable consumer.

The delivery count and stream sequence are read from the message's reply
subject, which carries them, instead of building nats-py's metadata objects.
"""

from __future__ import annotations

import contextlib
import time

import anyio
import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

PREFETCH = 2
"""Pull requests kept outstanding: one being delivered while the other's batch is handled."""
LOST_GRACE = 2.0
"""Seconds past a request's expiry before it counts as lost (no 408 ever came)."""
LOST_REQUESTS_FAIL = 3
"""Lost requests in a row after which the consumer is presumed gone."""


class PullGone(nats.errors.Error):
    """The server stopped answering pull requests, or said the consumer is gone."""


def ack_tokens(reply: str) -> tuple[int, int]:
    """(times delivered, stream sequence) from a JetStream ack subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (9 tokens), or
    with domain and account hash after `ACK` (12 tokens and up).
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5])
    if len(tokens) >= 12:
        return int(tokens[6]), int(tokens[7])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


class LeanPull:
    """Pulls from durable `consumer` on `stream`; `next_batch` returns what has arrived."""

    def __init__(
        self, nc: NATS, stream: str, consumer: str, *, batch: int, expires: float = 1.0
    ) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = batch
        self._expires = expires
        self._request = orjson.dumps({"batch": batch, "expires": int(expires * 1e9)})
        self._inbox = nc.new_inbox()
        self._sub: object | None = None
        self._buffer: list[Msg] = []
        self._arrived = anyio.Event()
        # per outstanding request: messages still owed and when it was sent
        self._requests: list[tuple[int, float]] = []
        self._lost = 0
        self._gone = ""

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            # closed or reconnecting: the server dropped it anyway
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()  # type: ignore[attr-defined]

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and not msg.data and "Status" in headers:
            status = headers["Status"]
            if status == "100":  # heartbeat or flow control: not a request's end
                return
            if status == "409":  # consumer deleted, leadership change, a limit exceeded:
                # start over (the caller recreates the consumer, with backoff) rather than
                # re-ask at once and be refused again
                self._gone = f"409 {headers.get('Description', '')}".strip()
            elif status == "503":  # nobody serves the pull subject: no such consumer or stream
                self._gone = "no responders for the pull request"
            if self._requests:  # 404, 408, 409: the oldest request is over
                self._requests.pop(0)
            self._arrived.set()
            return
        self._buffer.append(msg)
        if self._requests:
            owed, sent = self._requests[0]
            if owed <= 1:
                self._requests.pop(0)
            else:
                self._requests[0] = (owed - 1, sent)
        self._lost = 0
        self._arrived.set()

    async def _top_up(self) -> None:
        """Keep PREFETCH requests outstanding; replace the ones that were lost."""
        now = time.monotonic()
        live = [r for r in self._requests if now - r[1] < self._expires + LOST_GRACE]
        if len(live) < len(self._requests):
            self._lost += len(self._requests) - len(live)
            self._requests = live
            if self._lost >= LOST_REQUESTS_FAIL:
                self._gone = f"{self._lost} pull requests went unanswered"
        while len(self._requests) < PREFETCH:
            await self._nc.publish(self._next_subject, self._request, reply=self._inbox)
            self._requests.append((self._batch, now))

    async def next_batch(self, timeout: float) -> list[Msg]:
        """Up to `batch` messages in delivery order; [] when none came within `timeout`."""
        if self._gone:
            raise PullGone(self._gone)
        await self._top_up()
        if not self._buffer:
            self._arrived = anyio.Event()
            with anyio.move_on_after(timeout):
                while not self._buffer and not self._gone:
                    await self._arrived.wait()
                    self._arrived = anyio.Event()
                    await self._top_up()
        if self._gone and not self._buffer:
            raise PullGone(self._gone)
        batch, self._buffer = self._buffer[: self._batch], self._buffer[self._batch :]
        return batch
