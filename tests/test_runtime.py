"""The actor runtime over a real SQLite store, with the account entity; no NATS."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from examples.bank.account import (
    Account,
    AccountCommand,
    AccountEvent,
    AccountState,
    Deposit,
    Open,
    Withdraw,
)
from kaya.actors import (
    ActorRuntime,
    AnyReply,
    Command,
    Overloaded,
    RuntimeSettings,
    decode_reply,
)
from kaya.actors.wire import Answer
from kaya.store import EventStore, StoredEvent, open_event_store

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kaya.db"


ACCOUNT = Account()
OPEN = Open(owner="ada", currency="EUR")


class Flaky(Account):
    """An account whose handler has a bug: it crashes on a deposit of 13."""

    name = "flaky"

    def decide(self, state: AccountState, command: AccountCommand) -> Sequence[AccountEvent]:
        if isinstance(command, Deposit) and command.amount == 13:
            raise RuntimeError("unlucky number")
        return super().decide(state, command)


@asynccontextmanager
async def running(
    events: EventStore,
    settings: RuntimeSettings | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[ActorRuntime]:
    """A runtime serving `events` until the block exits."""
    runtime = ActorRuntime(events, settings, clock=clock)
    async with anyio.create_task_group() as tg:
        await tg.start(runtime.run)
        yield runtime
        tg.cancel_scope.cancel()


async def ask(
    runtime: ActorRuntime,
    entity_id: str,
    command: Command | None,
    *,
    command_id: str | None = None,
    entity: Account = ACCOUNT,
) -> AnyReply:
    return decode_reply(await runtime.ask(entity, entity_id, command, command_id=command_id))


def code(reply: AnyReply) -> str:
    return "ok" if reply.ok else (reply.error.code if reply.error else "?")


def message(reply: AnyReply) -> str:
    return reply.error.message if reply.error else ""


def balance(reply: AnyReply) -> int:
    assert reply.state is not None, reply
    return int(reply.state["balance"])


def amounts(stream: list[StoredEvent]) -> list[tuple[int, str, int | None]]:
    """(version, type, amount) of each stored event."""
    out: list[tuple[int, str, int | None]] = []
    for e in stream:
        data = msgspec.json.decode(e.data)
        out.append((e.version, e.type, data.get("amount")))
    return out


class Replies:
    """A reply callback for `tell` that collects bodies and wakes a waiter at a count."""

    def __init__(self, expected: int) -> None:
        self.bodies: list[bytes] = []
        self._expected = expected
        self._done = anyio.Event()

    async def __call__(self, answer: Answer) -> None:
        self.bodies.append(answer.body)
        assert answer.outcome == decode_reply(answer.body).outcome  # made with the reply
        if len(self.bodies) >= self._expected:
            self._done.set()

    async def wait(self) -> list[AnyReply]:
        await self._done.wait()
        return [decode_reply(b) for b in self.bodies]


# ---- ordering and group commit -------------------------------------------------------


async def test_concurrent_deposits_to_one_account_get_gapless_versions(db: Path) -> None:
    got: dict[int, AnyReply] = {}  # amount -> reply
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events) as runtime:
            opened = await ask(runtime, "a-1", OPEN)

            async def deposit(amount: int) -> None:
                got[amount] = await ask(runtime, "a-1", Deposit(amount=amount))

            async with anyio.create_task_group() as tg:
                for amount in range(1, 1001):
                    tg.start_soon(deposit, amount)

            stream = await events.read_stream("account", "a-1")
            state = await ask(runtime, "a-1", None)

    assert code(opened) == "ok"
    assert opened.version == 1
    assert all(r.ok for r in got.values())
    assert {r.version for r in got.values()} == set(range(2, 1002))
    # per-key order: commands are applied in the order they were sent
    assert all(got[amount].version == amount + 1 for amount in got)
    assert all(got[n].events == [{"type": "Deposited", "amount": n}] for n in got)
    assert [e.version for e in stream] == list(range(1, 1002))
    assert amounts(stream)[1:] == [(n + 1, "Deposited", n) for n in range(1, 1001)]
    assert state.version == 1001
    assert balance(state) == sum(range(1, 1001))


async def test_a_query_sees_the_commands_sent_before_it(db: Path) -> None:
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events) as runtime:
            replies = Replies(4)
            runtime.tell(ACCOUNT, "a-1", OPEN, replies)
            for amount in (10, 20, 30):
                runtime.tell(ACCOUNT, "a-1", Deposit(amount=amount), replies)
            state = await ask(runtime, "a-1", None)  # queued behind the commands
            unknown = await ask(runtime, "nobody", None)
            assert [code(r) for r in await replies.wait()] == ["ok"] * 4

    assert (state.ok, state.entity, state.id, state.version) == (True, "account", "a-1", 4)
    assert state.state == {"owner": "ada", "currency": "EUR", "balance": 60, "status": "open"}
    assert (unknown.ok, unknown.id, unknown.version) == (True, "nobody", 0)
    assert unknown.state == {"owner": "", "currency": "", "balance": 0, "status": "new"}


# ---- idempotency ---------------------------------------------------------------------


async def test_a_repeated_command_id_is_applied_once_and_gets_the_first_reply(db: Path) -> None:
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events) as runtime:
            await ask(runtime, "a-1", OPEN)
            first = await runtime.ask(ACCOUNT, "a-1", Deposit(amount=5), command_id="d-1")
            again = await runtime.ask(ACCOUNT, "a-1", Deposit(amount=5), command_id="d-1")

            concurrent: list[bytes] = []

            async def send() -> None:
                body = await runtime.ask(ACCOUNT, "a-1", Deposit(amount=7), command_id="d-2")
                concurrent.append(body)

            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(send)

            stream = await events.read_stream("account", "a-1")
            state = await ask(runtime, "a-1", None)

    assert again == first
    assert decode_reply(first).version == 2
    assert len(concurrent) == 5
    assert len(set(concurrent)) == 1
    assert decode_reply(concurrent[0]).version == 3
    assert amounts(stream) == [(1, "Opened", None), (2, "Deposited", 5), (3, "Deposited", 7)]
    assert [e.command_id for e in stream] == [None, "d-1", "d-2"]
    assert balance(state) == 12


async def test_a_command_id_is_remembered_across_restarts(db: Path) -> None:
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events) as runtime:
            await ask(runtime, "a-1", OPEN)
            first = await runtime.ask(ACCOUNT, "a-1", Deposit(amount=5), command_id="d-1")

        async with open_event_store(db) as events, running(events) as runtime:
            again = await runtime.ask(ACCOUNT, "a-1", Deposit(amount=5), command_id="d-1")
            stream = await events.read_stream("account", "a-1")

    assert again == first
    assert [e.version for e in stream] == [1, 2]


async def test_a_command_id_reused_for_another_command_is_a_conflict(db: Path) -> None:
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events) as runtime:
            await ask(runtime, "a-1", OPEN)
            first = await runtime.ask(ACCOUNT, "a-1", Deposit(amount=5), command_id="d-1")
            before = await events.read_stream("account", "a-1")

            other_amount = await ask(runtime, "a-1", Deposit(amount=6), command_id="d-1")
            other_type = await ask(runtime, "a-1", Withdraw(amount=5), command_id="d-1")
            original = await runtime.ask(ACCOUNT, "a-1", Deposit(amount=5), command_id="d-1")

            assert await events.read_stream("account", "a-1") == before
            state = await ask(runtime, "a-1", None)

    assert code(other_amount) == "conflict"
    assert "d-1" in message(other_amount)
    assert code(other_type) == "conflict"
    assert original == first
    assert (state.version, balance(state)) == (2, 5)


async def test_a_rejected_command_changes_nothing_and_its_repeat_is_rejected_again(
    db: Path,
) -> None:
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events) as runtime:
            await ask(runtime, "a-1", OPEN)
            await ask(runtime, "a-1", Deposit(amount=100))
            before = await events.read_stream("account", "a-1")

            rejected = await runtime.ask(ACCOUNT, "a-1", Withdraw(amount=500), command_id="w-1")
            assert await events.read_stream("account", "a-1") == before

            await ask(runtime, "a-1", Deposit(amount=1000))  # now the withdrawal would pass
            repeated = await runtime.ask(ACCOUNT, "a-1", Withdraw(amount=500), command_id="w-1")
            state = await ask(runtime, "a-1", None)

    reply = decode_reply(rejected)
    assert code(reply) == "rejected"
    assert "insufficient funds" in message(reply)
    assert repeated == rejected
    assert (state.version, balance(state)) == (3, 1100)


async def test_a_command_to_an_account_that_is_not_open_is_rejected(db: Path) -> None:
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events) as runtime:
            reply = await ask(runtime, "a-1", Deposit(amount=1))
            assert await events.read_stream("account", "a-1") == []
    assert code(reply) == "rejected"


# ---- failures ------------------------------------------------------------------------


async def test_a_crashing_handler_fails_only_its_caller_and_the_actor_is_rebuilt(
    db: Path,
) -> None:
    flaky = Flaky()
    got: dict[int, AnyReply] = {}
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events) as runtime:
            await ask(runtime, "f-1", OPEN, entity=flaky)
            before = runtime.statistics()

            async def deposit(amount: int) -> None:
                got[amount] = await ask(runtime, "f-1", Deposit(amount=amount), entity=flaky)

            async with anyio.create_task_group() as tg:
                for amount in (1, 2, 13, 4, 5):
                    tg.start_soon(deposit, amount)

            after_crash = await ask(runtime, "f-1", Deposit(amount=6), entity=flaky)
            stats = runtime.statistics()
            stream = await events.read_stream("flaky", "f-1")
            state = await ask(runtime, "f-1", None, entity=flaky)

    assert code(got[13]) == "internal"
    assert {n: code(r) for n, r in got.items() if n != 13} == dict.fromkeys((1, 2, 4, 5), "ok")
    assert code(after_crash) == "ok"
    assert after_crash.version == 6
    assert stats.crashes == before.crashes + 1
    assert stats.activations == before.activations + 1  # rebuilt from the store
    assert [amount for _, _, amount in amounts(stream)] == [None, 1, 2, 4, 5, 6]
    assert balance(state) == 18


async def test_a_full_mailbox_is_overloaded(db: Path) -> None:
    with anyio.fail_after(10):
        async with (
            open_event_store(db) as events,
            running(events, RuntimeSettings(mailbox_size=4)) as runtime,
        ):
            replies = Replies(5)
            runtime.tell(ACCOUNT, "a-1", OPEN, replies)
            for _ in range(3):
                runtime.tell(ACCOUNT, "a-1", Deposit(amount=1), replies)
            with pytest.raises(Overloaded, match="a-1") as caught:
                runtime.tell(ACCOUNT, "a-1", Deposit(amount=100), replies)
            runtime.tell(ACCOUNT, "a-2", OPEN, replies)  # other keys have their own mailbox

            assert [code(r) for r in await replies.wait()] == ["ok"] * 5
            after = await ask(runtime, "a-1", Deposit(amount=1))  # drained: accepted again
            state = await ask(runtime, "a-1", None)

    assert caught.value.code == "overloaded"
    assert code(after) == "ok"
    assert (state.version, balance(state)) == (5, 4)


# ---- activation, passivation ---------------------------------------------------------


async def test_idle_actors_are_passivated_and_rebuilt_from_the_store(db: Path) -> None:
    now = 1000.0
    settings = RuntimeSettings(idle_timeout=60)
    with anyio.fail_after(10):
        async with (
            open_event_store(db) as events,
            running(events, settings, clock=lambda: now) as runtime,
        ):
            await ask(runtime, "a-1", OPEN)
            await ask(runtime, "a-1", Deposit(amount=5))
            now = 1030.0
            await ask(runtime, "a-2", OPEN)
            assert runtime.statistics().active == 2

            assert runtime.passivate_idle(1059.0) == 0
            assert runtime.passivate_idle(1061.0) == 1  # a-1 idle for 61 s, a-2 for 31 s
            stats = runtime.statistics()
            assert (stats.active, stats.passivations, stats.activations) == (1, 1, 2)

            state = await ask(runtime, "a-1", None)
            stats = runtime.statistics()

    assert (stats.active, stats.activations) == (2, 3)
    assert state.version == 2
    assert balance(state) == 5


async def test_max_active_caps_the_actors_in_memory(db: Path) -> None:
    with anyio.fail_after(10):
        async with (
            open_event_store(db) as events,
            running(events, RuntimeSettings(max_active=5)) as runtime,
        ):
            for i in range(20):
                await ask(runtime, f"a-{i}", OPEN)
                await ask(runtime, f"a-{i}", Deposit(amount=i + 1))
                assert runtime.statistics().active <= 5
            states = [await ask(runtime, f"a-{i}", None) for i in range(20)]
            stats = runtime.statistics()

    assert stats.active <= 5
    assert stats.passivations >= 15
    assert [balance(s) for s in states] == list(range(1, 21))
    assert {s.version for s in states} == {2}


async def test_busy_actors_over_the_cap_keep_per_key_order(db: Path) -> None:
    with anyio.fail_after(10):
        async with (
            open_event_store(db) as events,
            running(events, RuntimeSettings(max_active=1)) as runtime,
        ):
            replies = Replies(4)
            runtime.tell(ACCOUNT, "a-1", OPEN, replies)  # busy: cannot be evicted
            runtime.tell(ACCOUNT, "a-2", OPEN, replies)
            runtime.tell(ACCOUNT, "a-2", Deposit(amount=5), replies)
            runtime.tell(ACCOUNT, "a-2", Deposit(amount=6), replies)
            got = await replies.wait()
            stream = await events.read_stream("account", "a-2")

    assert [code(r) for r in got] == ["ok"] * 4
    assert amounts(stream) == [(1, "Opened", None), (2, "Deposited", 5), (3, "Deposited", 6)]


# ---- snapshots -----------------------------------------------------------------------


async def test_snapshots_are_taken_and_used_to_rebuild(db: Path) -> None:
    settings = RuntimeSettings(snapshot_every=10)
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events, settings) as runtime:
            await ask(runtime, "a-1", OPEN)
            for amount in range(1, 25):  # 25 events in all
                assert code(await ask(runtime, "a-1", Deposit(amount=amount))) == "ok"
            snapshot = await events.load_snapshot("account", "a-1")

        # a rebuild must need only the snapshot and the events after it
        with sqlite3.connect(db) as raw:
            raw.execute("DELETE FROM events WHERE version <= 20")
        raw.close()

        async with open_event_store(db) as events, running(events, settings) as runtime:
            state = await ask(runtime, "a-1", None)

    assert snapshot is not None
    assert snapshot.version == 20
    assert ACCOUNT.decode_state(snapshot.state) == AccountState(
        owner="ada", currency="EUR", balance=sum(range(1, 20)), status="open"
    )
    assert state.version == 25
    assert balance(state) == sum(range(1, 25))


# ---- where the time goes -------------------------------------------------------------


async def test_every_command_is_timed_through_each_stage_of_its_path(db: Path) -> None:
    """The latency budget (store/timing.py): each command of a batch is counted once per
    stage it went through, in the order of the path, and the stages add up to no more
    than the time the commands took."""
    with anyio.fail_after(10):
        async with open_event_store(db) as events, running(events) as runtime:
            await ask(runtime, "t-1", OPEN)
            begun = time.perf_counter()
            replies = Replies(50)
            for amount in range(1, 51):
                runtime.tell(ACCOUNT, "t-1", Deposit(amount=amount), replies)
            assert all(r.ok for r in await replies.wait())
            took = time.perf_counter() - begun
            stages = runtime.stages.snapshot()
    per_command = ("mailbox", "decide", "reply")
    assert {stage: stages[stage].count for stage in per_command} == dict.fromkeys(per_command, 51)
    # the store counts appends (one per turn: the 50 deposits went in a few turns)
    turns = stages["queue"].count
    assert 2 <= turns <= 51
    assert stages["wake"].count == turns
    assert stages["insert"].count == stages["fsync"].count == turns
    assert "seal" not in stages
    assert "ingress" not in stages
    mean_path = sum(stages[s].mean for s in ("mailbox", "decide", "queue", "insert", "fsync"))
    assert 0 < mean_path < took + 0.5  # the deposits' path, not some other clock's
