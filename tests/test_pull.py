"""The lean pull under the consumers: ack subjects, batches, and a consumer that vanishes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from kaya.app.broker.pull import PREFETCH, LeanPull, PullGone, ack_tokens
from tests.servers import NatsServer

pytestmark = pytest.mark.anyio


def test_ack_subjects_give_delivery_count_and_stream_sequence() -> None:
    assert ack_tokens("$JS.ACK.KAYA_EVENTS.analytics.1.42.40.1700000000000000000.3") == (1, 42)
    with_domain = "$JS.ACK.hub.ACCHASH.KAYA_EVENTS.analytics.2.7.5.1700000000000000000.0.abc"
    assert ack_tokens(with_domain) == (2, 7)
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        ack_tokens("_INBOX.abc")


async def _stream_with(nc: NATS, count: int) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="PULLTEST", subjects=["pt.>"]))
    for i in range(count):
        await js.publish(f"pt.{i % 3}", str(i).encode())
    await js.add_consumer(
        "PULLTEST",
        ConsumerConfig(durable_name="c", ack_policy=AckPolicy.ALL, max_ack_pending=4 * PREFETCH),
    )


async def test_batches_come_in_stream_order_and_stop_when_drained(
    nats_server: NatsServer, nc: NATS
) -> None:
    await _stream_with(nc, 25)
    seen: list[int] = []
    async with pulling(nc, "c", expires=0.5) as pull:
        with anyio.fail_after(20):
            while len(seen) < 25:
                batch = await pull.next_batch(timeout=1.0)
                assert len(batch) <= 4
                seen += [ack_tokens(m.reply)[1] for m in batch]
                if batch:
                    await batch[-1].ack()  # AckPolicy.ALL: the last one acks the batch
        assert seen == list(range(1, 26))
        assert await pull.next_batch(timeout=0.6) == []  # drained: no error, just nothing


@contextlib.asynccontextmanager
async def pulling(nc: NATS, consumer: str, *, expires: float) -> AsyncIterator[LeanPull]:
    pull = LeanPull(nc, "PULLTEST", consumer, batch=4, expires=expires)
    await pull.start()
    try:
        yield pull
    finally:
        await pull.stop()


async def _drain_until_gone(pull: LeanPull) -> None:
    while True:
        await pull.next_batch(timeout=0.5)


async def test_a_deleted_consumer_is_reported_not_waited_on_forever(
    nats_server: NatsServer, nc: NATS
) -> None:
    await _stream_with(nc, 3)
    async with pulling(nc, "c", expires=0.3) as pull:
        first = await pull.next_batch(timeout=2.0)
        assert [m.data for m in first] == [b"0", b"1", b"2"]
        await nc.jetstream().delete_consumer("PULLTEST", "c")
        with anyio.fail_after(20), pytest.raises(PullGone):
            await _drain_until_gone(pull)


async def test_a_consumer_that_does_not_exist_is_reported_at_once(
    nats_server: NatsServer, nc: NATS
) -> None:
    await _stream_with(nc, 1)
    async with pulling(nc, "nobody", expires=0.3) as pull:
        with anyio.fail_after(5), pytest.raises(PullGone, match="no responders"):
            await _drain_until_gone(pull)
