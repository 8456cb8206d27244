"""Outbox relay: committed events -> JetStream KAYA_EVENTS, at least once, in store order.

The event table is the outbox. The relay reads events after its checkpoint,
publishes a whole batch with every ack in flight at once (pipelined, one reply
inbox and one wildcard subscription for all acks), and advances the checkpoint
past the longest prefix the broker acknowledged. A crash anywhere loses nothing:
the next start publishes again from the checkpoint and the broker drops what it
already has, by `Nats-Msg-Id` (the event id) within its duplicate window.

JetStream acknowledges a publish before it fsyncs (every 2 minutes by default),
so a broker that loses power can lose acknowledged events. The SQLite store is
the source of truth: on start and on every reconnect the relay rewinds to the
events committed `relay_rewind` seconds before its checkpoint and publishes
them again; dedup drops those the broker still has.

Nothing the relay meets leaves it: a broker that refuses or does not answer, a
connection that is down, a store that cannot save the checkpoint. It records the
failure (`statistics().health`: failing since, errors, the last one), backs off,
and tries again, so command serving never depends on it and it resumes by itself.
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from kaya.actors.retry import Backoff
from kaya.actors.wire import event_header_block, event_headers, event_subject
from kaya.app.broker.adapter import HeaderPublisher
from kaya.app.events.failing import Failing, PartHealth
from kaya.store import EventStore, StoredEvent, StoreError

log = logging.getLogger("kaya.relay")

CHECKPOINT = "relay"
SAVE_EVERY = 0.5
"""Seconds between checkpoint saves while events keep coming (always saved when idle)."""


class _Ack(msgspec.Struct):
    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, object] | None = None


_ack_decoder = msgspec.json.Decoder(_Ack)


class RelayStatistics(msgspec.Struct, frozen=True):
    published: int
    duplicates: int
    failures: int
    """Batches the broker did not fully acknowledge."""
    checkpoint: int
    committed: int
    health: PartHealth = PartHealth()
    """Failing since when, errors so far (refusals, lost acks, exceptions, checkpoint saves)."""

    @property
    def backlog(self) -> int:
        return max(0, self.committed - self.checkpoint)


class Relay:
    """Publishes the store's events to JetStream. `run()` until cancelled."""

    def __init__(
        self,
        nc: NATS,
        store: EventStore,
        *,
        batch: int = 1000,
        ack_timeout: float = 5.0,
        rewind: float = 150.0,
    ) -> None:
        self._nc = nc
        self._store = store
        self._batch = batch
        self._ack_timeout = ack_timeout
        self._rewind_seconds = rewind
        self._backoff = Backoff(initial=0.2, cap=10.0)  # full jitter: about the old 0.1-5 s mean
        self._inbox = nc.new_inbox()  # one inbox: every ack arrives on `<inbox>.<gen>.<i>`
        self._acks: dict[int, _Ack | None] = {}
        self._generation = 0
        self._outstanding = 0
        self._all_acked = anyio.Event()
        self._rewind_requested = True
        self._position = 0  # where reading resumes (moves back on a rewind)
        self._published = 0  # highest position the broker acknowledged
        self._checkpoint = 0  # what the store holds: saved at most every SAVE_EVERY seconds
        self._saved_at = 0.0
        self.published = 0
        self.duplicates = 0
        self.failures = 0
        self._caught_up = anyio.Event()
        self._publisher = HeaderPublisher(nc)
        self._failing = Failing()
        self._committed = 0  # the store's last position when last read (statistics)

    @property
    def checkpoint(self) -> int:
        """The last store position the broker has acknowledged (and we saved)."""
        return self._published

    @property
    def health(self) -> PartHealth:
        """Failing since when (publishes refused or never acknowledged), and why."""
        return self._failing.snapshot()

    def request_rewind(self) -> None:
        """Ask for a republish of the recent past (the broker may have lost it)."""
        self._rewind_requested = True

    async def statistics(self) -> RelayStatistics:
        try:  # a store that cannot be read must not make health itself fail
            self._committed = await self._store.last_position()
        except StoreError:
            log.debug("relay: reading the last position failed", exc_info=True)
        return RelayStatistics(
            published=self.published,
            duplicates=self.duplicates,
            failures=self.failures,
            checkpoint=self._published,
            committed=self._committed,
            health=self.health,
        )

    def _wake_waiters(self) -> None:
        """Wake every `wait_caught_up`, then arm a fresh event for the next ones."""
        self._caught_up.set()
        self._caught_up = anyio.Event()

    async def wait_caught_up(self) -> None:
        """Until everything committed so far has been acknowledged by the broker."""
        target = await self._store.last_position()
        while self._published < target:
            await self._caught_up.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        sub = await self._nc.subscribe(f"{self._inbox}.>", cb=self._on_ack)
        try:
            self._checkpoint = await self._store.checkpoint(CHECKPOINT)
            self._position = self._published = self._checkpoint
            task_status.started()
            while True:
                try:
                    await self._step()
                except Exception as exc:  # a broker away, a store that cannot read: wait, retry
                    await self._failed(repr(exc))
        finally:
            with anyio.CancelScope(shield=True):
                await self._save_checkpoint()
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection may already be closed
                    log.debug("relay: unsubscribe failed", exc_info=True)

    async def _step(self) -> None:
        """Publish the next batch after the position, or wait (up to 1 s) for a commit."""
        if self._rewind_requested:
            await self._rewind()
        seen = self._store.commit_count
        events = await self._store.read_all(self._position, self._batch)
        if not events:
            saved = await self._save_checkpoint()
            self._wake_waiters()
            if saved:  # idle, caught up and the checkpoint saved: nothing is failing
                self._recovered()
            with anyio.move_on_after(1.0):
                await self._store.wait_for_commit(seen)
            return
        acked, refusal = await self._publish(events)
        if acked:
            self._position = events[acked - 1].position
            self._published = max(self._published, self._position)
            if time.monotonic() - self._saved_at >= SAVE_EVERY:
                await self._save_checkpoint()
            self._wake_waiters()
        if acked < len(events):
            self.failures += 1
            await self._failed(refusal or "the broker did not acknowledge in time")
        elif not self._failing.since or await self._save_checkpoint():
            self._recovered()

    async def _failed(self, why: str) -> None:
        attempt = self._failing.failed(why)
        delay = self._backoff.delay(attempt)
        log.warning("relay: %s; retrying in %.2fs (attempt %d)", why, delay, attempt)
        await anyio.sleep(delay)

    def _recovered(self) -> None:
        if self._failing.recovered():
            log.info("relay: recovered")

    async def _rewind(self) -> None:
        self._rewind_requested = False
        if self._rewind_seconds <= 0 or self._position == 0:
            return
        cutoff = await self._store.position_at(time.time() - self._rewind_seconds)
        rewound = min(self._position, cutoff)
        if rewound < self._position:
            log.info("relay: republishing positions %d..%d", rewound + 1, self._position)
            self._position = rewound

    async def _publish(self, events: list[StoredEvent]) -> tuple[int, str]:
        """Publish all, wait for the acks; return how many leading events were acked, and
        the broker's reason for refusing the first one that was not (empty: no answer)."""
        self._generation += 1  # a late ack of an earlier batch must not count for this one
        self._acks = dict.fromkeys(range(len(events)))
        self._outstanding = len(events)
        self._all_acked = anyio.Event()
        inbox = f"{self._inbox}.{self._generation}"
        for i, event in enumerate(events):
            await self._publish_one(event, f"{inbox}.{i}")
        with anyio.move_on_after(self._ack_timeout):
            await self._all_acked.wait()
        acked = 0
        refusal = ""
        for i in range(len(events)):
            ack = self._acks.get(i)
            if ack is None or ack.error is not None or ack.seq is None:
                if ack is not None and ack.error is not None:
                    why = ack.error.get("description", ack.error)
                    refusal = f"the broker refused position {events[i].position}: {why}"
                break
            acked += 1
            if ack.duplicate:
                self.duplicates += 1
            else:
                self.published += 1
        return acked, refusal

    async def _publish_one(self, event: StoredEvent, reply: str) -> None:
        """Publish with headers; nats-py's own header encoding is most of a publish's cost,
        so the header block is built in one go (wire.event_header_block) and handed over."""
        await self._publisher.publish(
            event_subject(event.entity, event.entity_id),
            event.data,
            reply=reply,
            header_block=event_header_block(event),
            headers=lambda: event_headers(event),
        )

    async def _on_ack(self, msg: Msg) -> None:
        try:
            generation, index = map(int, msg.subject.rsplit(".", 2)[1:])
        except ValueError:
            return
        if generation != self._generation:
            return
        if index not in self._acks or self._acks[index] is not None:
            return
        if msg.headers and msg.headers.get("Status") == "503":
            ack = _Ack(error={"code": 503, "description": "no responders: is JetStream up?"})
        else:
            try:
                ack = _ack_decoder.decode(msg.data)
            except msgspec.DecodeError:
                ack = _Ack(error={"description": f"unreadable ack {msg.data[:100]!r}"})
        self._acks[index] = ack
        self._outstanding -= 1
        if self._outstanding == 0:
            self._all_acked.set()

    async def _save_checkpoint(self) -> bool:
        """Save the position; False if the store refused (counted as a failure, retried
        on the next save). Saving is throttled: a lost checkpoint only costs a
        deduplicated republish, while each save takes the store's write lock, which the
        group commit is waiting for."""
        self._saved_at = time.monotonic()
        if self._position <= self._checkpoint:
            return True
        try:
            # no fsync: a checkpoint lost to power loss only means republishing (deduplicated)
            async with self._store.transaction(durable=False) as tx:
                await tx.set_checkpoint(CHECKPOINT, self._position)
        except StoreError as exc:
            if self._failing.failed(f"saving the checkpoint failed: {exc}") == 1:
                log.warning("relay: saving the checkpoint failed (%s); will retry", exc)
            return False
        self._checkpoint = self._position
        return True
