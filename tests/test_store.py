"""The SQLite event store on a real file: appends, reads, conflicts, group commit."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from kaya import store
from kaya.store import Append, NewEvent, Reply, Snapshot, StoredEvent

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kaya.db"


def event(type_: str = "Deposited", data: bytes = b'{"amount":1}', **kw: object) -> NewEvent:
    return NewEvent(
        event_id=uuid.uuid4().hex,
        type=type_,
        schema_version=1,
        data=data,
        **kw,  # type: ignore[arg-type]
    )


def append(
    entity_id: str,
    expected: int,
    count: int = 1,
    *,
    entity: str = "account",
    replies: list[Reply] | None = None,
    snapshot: Snapshot | None = None,
) -> Append:
    return Append(
        entity=entity,
        entity_id=entity_id,
        expected_version=expected,
        events=[event(data=f'{{"n":{expected + i}}}'.encode()) for i in range(1, count + 1)],
        replies=replies or [],
        snapshot=snapshot,
    )


def reply(command_id: str, body: bytes = b'{"ok":true}') -> Reply:
    return Reply(command_id=command_id, request_hash=b"h-" + command_id.encode(), body=body)


def versions(events: list[StoredEvent]) -> list[int]:
    return [e.version for e in events]


# ---- append and read -----------------------------------------------------------------


async def test_append_and_read_stream_round_trip(db: Path) -> None:
    first = event("Opened", b'{"owner":"ada","currency":"EUR"}', command_id="c-1")
    second = event("Deposited", b'{"amount":5}', command_id="c-2", traceparent="00-ab-cd-01")
    third = NewEvent(event_id=uuid.uuid4().hex, type="Withdrawn", schema_version=2, data=b"{}")
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            await events.append(Append("account", "a-1", 0, [first, second]))
            await events.append(Append("account", "a-1", 2, [third]))

            stream = await events.read_stream("account", "a-1")

    assert versions(stream) == [1, 2, 3]
    assert [(e.entity, e.entity_id) for e in stream] == [("account", "a-1")] * 3
    for stored, new in zip(stream, [first, second, third], strict=True):
        assert stored.event_id == new.event_id
        assert stored.type == new.type
        assert stored.schema_version == new.schema_version
        assert stored.data == new.data
        assert stored.command_id == new.command_id
        assert stored.traceparent == new.traceparent
    assert stream[0].position < stream[1].position < stream[2].position


async def test_read_stream_after_a_version(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            await events.append(append("a-1", 0, count=5))
            await events.append(append("a-2", 0, count=2))

            assert versions(await events.read_stream("account", "a-1", after_version=3)) == [4, 5]
            assert await events.read_stream("account", "a-1", after_version=5) == []
            assert await events.read_stream("account", "nobody") == []
            assert await events.read_stream("transfer", "a-1") == []


async def test_read_all_in_position_order_across_streams(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            await events.append(append("a", 0, count=2))
            await events.append(append("b", 0, count=1, entity="transfer"))
            await events.append(append("a", 2, count=1))
            await events.append(append("c", 0, count=2))

            everything = await events.read_all()
            after_second = await events.read_all(after_position=everything[1].position)
            page = await events.read_all(after_position=everything[1].position, limit=2)
            last = await events.last_position()

    assert [(e.entity_id, e.version) for e in everything] == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("a", 3),
        ("c", 1),
        ("c", 2),
    ]
    positions = [e.position for e in everything]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    assert after_second == everything[2:]
    assert page == everything[2:4]
    assert last == positions[-1]


# ---- optimistic concurrency ----------------------------------------------------------


@pytest.mark.parametrize(("expected", "case"), [(1, "stale"), (0, "from-scratch"), (4, "gap")])
async def test_an_append_at_the_wrong_version_is_refused_and_changes_nothing(
    db: Path, expected: int, case: str
) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            await events.append(append("a-1", 0, count=2))
            before = await events.read_stream("account", "a-1")

            with pytest.raises(store.VersionConflict) as caught:
                await events.append(append("a-1", expected, count=2, replies=[reply("late")]))

            assert await events.read_stream("account", "a-1") == before
            assert await events.find_replies("account", "a-1", ["late"]) == {}
            assert await events.last_position() == before[-1].position
    assert (caught.value.entity, caught.value.entity_id) == ("account", "a-1")
    assert caught.value.expected == expected
    assert isinstance(caught.value, store.StoreError)


async def test_a_stale_append_does_not_fail_the_rest_of_its_batch(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            await events.append(append("hot", 0, count=3))
            before = events.statistics()
            conflicts: list[store.VersionConflict] = []

            async def stale() -> None:
                try:
                    await events.append(append("hot", 1, replies=[reply("stale")]))
                except store.VersionConflict as exc:
                    conflicts.append(exc)

            async with anyio.create_task_group() as tg:
                for i in range(25):
                    tg.start_soon(events.append, append(f"cold-{i}", 0, replies=[reply(f"c{i}")]))
                tg.start_soon(stale)
                for i in range(25, 50):
                    tg.start_soon(events.append, append(f"cold-{i}", 0, replies=[reply(f"c{i}")]))

            after = events.statistics()
            assert len(conflicts) == 1
            assert versions(await events.read_stream("account", "hot")) == [1, 2, 3]
            assert await events.find_replies("account", "hot", ["stale"]) == {}
            for i in range(50):
                assert versions(await events.read_stream("account", f"cold-{i}")) == [1]
                assert set(await events.find_replies("account", f"cold-{i}", [f"c{i}"])) == {
                    f"c{i}"
                }
    # all 51 appends shared one batch: the 50 good ones committed together
    assert after.batches - before.batches == 1
    assert after.appends - before.appends == 50
    assert after.events - before.events == 50


async def test_concurrent_appends_share_transactions(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(events.append, append(f"a-{i}", 0, count=2))

            stats = events.statistics()
            everything = await events.read_all(limit=1000)
    assert stats.appends == 200
    assert stats.events == 400
    assert stats.queued == 0
    assert 1 <= stats.batches < stats.appends
    assert len(everything) == 400


async def test_a_small_batch_limit_splits_batches_without_losing_appends(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db, max_batch_events=10) as events:
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(events.append, append(f"a-{i}", 0, count=2))

            stats = events.statistics()
            everything = await events.read_all()
    assert stats.appends == 50
    assert stats.batches >= 10  # at most five appends of two events per batch
    assert len(everything) == 100


# ---- snapshots -----------------------------------------------------------------------


async def test_snapshots_upsert_and_the_latest_is_loaded(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            assert await events.load_snapshot("account", "a-1") is None

            await events.append(append("a-1", 0, count=2, snapshot=Snapshot(2, b'{"v":2}')))
            assert await events.load_snapshot("account", "a-1") == Snapshot(2, b'{"v":2}', 1)

            await events.append(append("a-1", 2, count=3, snapshot=Snapshot(5, b'{"v":5}', 3)))
            assert await events.load_snapshot("account", "a-1") == Snapshot(5, b'{"v":5}', 3)

            # an older snapshot never replaces a newer one
            await events.append(append("a-1", 5, snapshot=Snapshot(4, b'{"v":4}')))
            assert await events.load_snapshot("account", "a-1") == Snapshot(5, b'{"v":5}', 3)

            assert await events.load_snapshot("account", "a-2") is None
            assert await events.load_snapshot("transfer", "a-1") is None


async def test_a_refused_append_writes_no_snapshot(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            await events.append(append("a-1", 0, count=2))
            with pytest.raises(store.VersionConflict):
                await events.append(append("a-1", 0, snapshot=Snapshot(1, b"{}")))
            assert await events.load_snapshot("account", "a-1") is None


# ---- idempotency replies -------------------------------------------------------------


async def test_replies_round_trip(db: Path) -> None:
    first, second = reply("c-1", b'{"ok":true,"version":1}'), reply("c-2", b'{"ok":false}')
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            await events.append(append("a-1", 0, replies=[first]))
            # a rejected command leaves a reply and no event
            await events.append(Append("account", "a-1", 1, [], replies=[second]))

            found = await events.find_replies("account", "a-1", ["c-1", "c-2", "c-3"])
            assert found == {"c-1": first, "c-2": second}
            assert await events.find_replies("account", "a-1", []) == {}
            assert await events.find_replies("account", "a-2", ["c-1"]) == {}
            assert versions(await events.read_stream("account", "a-1")) == [1]


async def test_expire_replies_deletes_only_old_ones(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            # a reply is recorded in the same transaction, at the same time, as its event
            await events.append(append("a-1", 0, replies=[reply("old")]))
            await events.append(append("a-1", 1, replies=[reply("new")]))
            old, new = await events.read_stream("account", "a-1")
            assert old.recorded_at < new.recorded_at

            assert await events.expire_replies(older_than=new.recorded_at) == 1

            assert set(await events.find_replies("account", "a-1", ["old", "new"])) == {"new"}
            assert await events.expire_replies(older_than=new.recorded_at) == 0
            assert versions(await events.read_stream("account", "a-1")) == [1, 2]


# ---- lifecycle -----------------------------------------------------------------------


async def test_data_survives_closing_and_reopening(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            await events.append(append("a-1", 0, count=3, replies=[reply("c-1")]))
            await events.append(append("a-1", 3, snapshot=Snapshot(4, b'{"v":4}')))
            written = await events.read_all()

        async with store.open_event_store(db) as events:
            assert await events.read_all() == written
            assert set(await events.find_replies("account", "a-1", ["c-1"])) == {"c-1"}
            assert await events.load_snapshot("account", "a-1") == Snapshot(4, b'{"v":4}')
            await events.append(append("a-1", 4))
            assert versions(await events.read_stream("account", "a-1")) == [1, 2, 3, 4, 5]


async def test_appends_queued_before_close_are_committed(db: Path) -> None:
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, store.open_event_store(db) as events:
            for i in range(20):
                tg.start_soon(events.append, append(f"a-{i}", 0))
            await anyio.lowlevel.checkpoint()  # they queue; the writer has not run yet
            assert events.statistics().queued == 20

        async with store.open_event_store(db) as events:
            assert len(await events.read_all()) == 20


async def test_an_append_after_close_raises_store_error(db: Path) -> None:
    with anyio.fail_after(10):
        async with store.open_event_store(db) as events:
            await events.append(append("a-1", 0))

        with pytest.raises(store.StoreError, match="closed"):
            await events.append(append("a-1", 1))


async def test_an_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with anyio.fail_after(10), pytest.raises(store.StoreError, match="cannot open"):
        async with store.open_event_store(blocker / "kaya.db"):
            pass
