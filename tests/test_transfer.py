"""The transfer saga: its decider as given/when/then, then end to end on a real node.

Unit tests fold events with the saga's own `evolve` and ask `decide`, `next_step`
and `step_result` what they make of it: no NATS, no SQLite. The integration tests
go through `kaya.cmd.transfer.<id>` and watch `kaya.qry.transfer.<id>` until the
saga has ended, then check every account's balance and history.
"""

from __future__ import annotations

import functools
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from examples.bank import make_app
from examples.bank.account import Account, Credit, Debit, Deposit, Refund, Settle, Withdraw
from examples.bank.transfer import (
    CREDIT_TIMEOUT,
    Completed,
    Credited,
    CreditRefused,
    DebitDone,
    Debited,
    DebitRefused,
    Failed,
    Refunded,
    RefundRefused,
    Start,
    Started,
    Transfer,
    TransferEvent,
    TransferState,
)
from kaya.actors import (
    BadRequest,
    Command,
    ErrorCode,
    Registry,
    Rejected,
    UnknownCommand,
    decode_reply,
    error_reply,
)
from kaya.actors.saga import TRANSIENT, Step, StepDone
from kaya.actors.wire import command_done
from kaya.app.config import Config
from kaya.app.node import Node, open_node
from kaya.store import Append, NewEvent, open_event_store
from kaya.store.sagas import ensure_saga_tables, step_deadline
from tests.conftest import call, node_config
from tests.servers import NatsServer

TRANSFER = Transfer()
STARTED = Started(source="ann", target="bob", amount=30)
DEBITED = Debited(currency="EUR")
LEGACY = Started(source="ann", target="bob", amount=30, protocol=1)
"""A transfer started before 2/6: it steps with the account's Withdraw and Deposit."""


def given(*events: TransferEvent) -> TransferState:
    """The state after `events`, folded with the saga's own evolve."""
    initial: TransferState = TRANSFER.initial
    return functools.reduce(TRANSFER.evolve, events, initial)


def when(state: TransferState, command: Any) -> list[TransferEvent]:
    return list(TRANSFER.decide(state, command))


def done(step: str, *, ok: bool = True, code: str = "", reason: str = "") -> StepDone:
    return StepDone(step=step, ok=ok, code=code, reason=reason)


def debit_done(currency: str = "EUR") -> DebitDone:
    """What the driver feeds back for a debit that landed: with the source's currency."""
    return DebitDone(step="debit", ok=True, currency=currency)


# ---- Start ---------------------------------------------------------------------------


def test_start_a_transfer() -> None:
    assert when(given(), Start(source="ann", target="bob", amount=30)) == [STARTED]
    assert given(STARTED) == TransferState(
        source="ann",
        target="bob",
        amount=30,
        currency="",
        held=0,
        status="pending",
        reason="",
        step="debit",
        protocol=2,
    )


def test_a_transfer_to_the_same_account_is_rejected() -> None:
    with pytest.raises(Rejected, match="different"):
        when(given(), Start(source="ann", target="ann", amount=30))


@pytest.mark.parametrize(
    ("history", "status"),
    [
        ((STARTED,), "pending"),
        ((STARTED, DEBITED, Credited(), Completed()), "completed"),
        ((STARTED, DebitRefused(reason="no"), Failed(reason="debit refused: no")), "failed"),
    ],
)
def test_a_transfer_starts_only_once(history: tuple[TransferEvent, ...], status: str) -> None:
    with pytest.raises(Rejected, match=f"already {status}"):
        when(given(*history), Start(source="ann", target="bob", amount=30))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount": 0}, "amount"),
        ({"amount": -5}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"amount": 10**15 + 1}, "amount"),
        ({"source": "has space"}, "source"),
        ({"target": ""}, "target"),
        ({"target": "x" * 65}, "target"),
    ],
)
def test_a_malformed_start_is_a_bad_request(body: dict[str, Any], field: str) -> None:
    start = {"type": "Start", "source": "ann", "target": "bob", "amount": 30, **body}
    with pytest.raises(BadRequest, match=field):
        TRANSFER.decode_command(orjson.dumps(start))


def test_step_done_is_not_accepted_from_the_wire() -> None:
    body = {"type": "StepDone", "step": "debit", "ok": True, "code": "", "reason": ""}
    with pytest.raises(UnknownCommand, match="StepDone"):
        TRANSFER.decode_command(orjson.dumps(body))


# ---- the steps' outcomes -------------------------------------------------------------


def test_debit_done_holds_the_money_and_moves_on_to_the_credit() -> None:
    assert when(given(STARTED), debit_done("EUR")) == [DEBITED]
    state = given(STARTED, DEBITED)
    assert (state.step, state.held, state.currency) == ("credit", 30, "EUR")


def test_debit_refused_fails_the_transfer() -> None:
    events = when(given(STARTED), done("debit", ok=False, code="rejected", reason="broke"))
    assert events == [DebitRefused(reason="broke"), Failed(reason="debit refused: broke")]
    state = given(STARTED, *events)
    assert (state.status, state.step, state.reason) == ("failed", "", "debit refused: broke")
    assert state.held == 0


def test_credit_done_releases_the_money_and_settles_the_source() -> None:
    events = when(given(STARTED, DEBITED), done("credit"))
    assert events == [Credited()]
    state = given(STARTED, DEBITED, *events)
    assert (state.status, state.step, state.held) == ("pending", "settle", 0)


@pytest.mark.parametrize("ok", [True, False])
def test_settle_done_completes_the_transfer(ok: bool) -> None:
    history = (STARTED, DEBITED, Credited())
    events = when(given(*history), done("settle", ok=ok, code="" if ok else "rejected"))
    assert events == [Completed()]  # the money is at the target either way
    state = given(*history, *events)
    assert (state.status, state.step, state.reason, state.held) == ("completed", "", "", 0)


@pytest.mark.parametrize("code", ["rejected", "timeout"])
def test_credit_refused_or_too_late_asks_for_a_refund(code: str) -> None:
    events = when(given(STARTED, DEBITED), done("credit", ok=False, code=code, reason="no"))
    assert events == [CreditRefused(reason=f"{code}: no")]
    state = given(STARTED, DEBITED, *events)
    assert (state.status, state.step, state.held) == ("pending", "refund", 30)


def test_refund_done_fails_the_transfer_with_the_credit_reason() -> None:
    history = (STARTED, DEBITED, CreditRefused(reason="rejected: closed"))
    events = when(given(*history), done("refund"))
    assert events == [Refunded(), Failed(reason="credit refused: rejected: closed")]
    state = given(*history, *events)
    assert (state.status, state.reason) == ("failed", "credit refused: rejected: closed")
    assert state.held == 0


def test_a_refused_refund_leaves_the_money_held_by_the_transfer() -> None:
    """Only a transfer started before 2/6 can see this: the money stays in sight."""
    history = (LEGACY, Debited(), CreditRefused(reason="rejected: closed"))
    events = when(given(*history), done("refund", ok=False, code="rejected", reason="closed"))
    assert events == [RefundRefused(reason="closed"), Failed(reason="refund refused: closed")]
    state = given(*history, *events)
    assert (state.status, state.held) == ("failed", 30)


def test_a_transfer_started_before_2_6_completes_on_its_credit() -> None:
    assert when(given(LEGACY), done("debit")) == [Debited()]
    events = when(given(LEGACY, Debited()), done("credit"))
    assert events == [Credited(), Completed()]
    assert given(LEGACY, Debited(), *events).status == "completed"


ENDED_COMPLETED = (STARTED, DEBITED, Credited(), Completed())
ENDED_FAILED = (STARTED, DebitRefused(reason="x"), Failed(reason="debit refused: x"))


@pytest.mark.parametrize(
    ("history", "late"),
    [
        ((), done("debit")),  # never started
        ((STARTED, DEBITED), done("debit")),  # repeated
        ((STARTED, DEBITED), debit_done()),
        ((STARTED, DEBITED), done("debit", ok=False, code="rejected")),
        ((STARTED,), done("credit")),  # ahead of its step
        ((STARTED, DEBITED), done("settle")),
        ((STARTED, DEBITED, CreditRefused(reason="r")), done("credit")),
        ((STARTED, DEBITED, Credited()), done("credit")),
        ((STARTED, DEBITED, Credited()), done("refund")),
        (ENDED_COMPLETED, done("credit")),
        (ENDED_COMPLETED, done("settle")),
        (ENDED_COMPLETED, done("refund")),
        (ENDED_FAILED, done("debit")),
        (
            (STARTED, DEBITED, CreditRefused(reason="r"), Refunded(), Failed(reason="f")),
            done("refund"),
        ),
    ],
)
def test_a_late_or_repeated_outcome_is_ignored(
    history: tuple[TransferEvent, ...], late: StepDone
) -> None:
    assert when(given(*history), late) == []


# ---- next_step -----------------------------------------------------------------------


def test_next_step_follows_the_state() -> None:
    saga = Transfer(credit_timeout=7.5)
    assert saga.next_step(given()) is None
    assert saga.next_step(given(STARTED)) == Step(
        "debit", "account", "ann", Debit(amount=30, target="bob"), timeout=None
    )
    assert saga.next_step(given(STARTED, DEBITED)) == Step(
        "credit",
        "account",
        "bob",
        Credit(amount=30, currency="EUR", source="ann"),
        timeout=7.5,
    )
    assert saga.next_step(given(STARTED, DEBITED, Credited())) == Step(
        "settle", "account", "ann", Settle(amount=30, target="bob"), timeout=None
    )
    assert saga.next_step(given(STARTED, DEBITED, CreditRefused(reason="r"))) == Step(
        "refund", "account", "ann", Refund(amount=30, target="bob"), timeout=None
    )
    assert saga.next_step(given(*ENDED_COMPLETED)) is None
    assert saga.next_step(given(*ENDED_FAILED)) is None


def test_a_transfer_started_before_2_6_steps_with_withdraw_and_deposit() -> None:
    saga = Transfer(credit_timeout=7.5)
    assert saga.next_step(given(LEGACY)) == Step("debit", "account", "ann", Withdraw(amount=30))
    assert saga.next_step(given(LEGACY, Debited())) == Step(
        "credit", "account", "bob", Deposit(amount=30), timeout=7.5
    )
    assert saga.next_step(given(LEGACY, Debited(), CreditRefused(reason="r"))) == Step(
        "refund", "account", "ann", Deposit(amount=30)
    )


def test_stored_v1_events_read_as_a_transfer_started_before_2_6() -> None:
    started = TRANSFER.decode_event(
        "Started", 1, b'{"type":"Started","source":"ann","target":"bob","amount":30}'
    )
    assert started == LEGACY
    assert TRANSFER.decode_event("Debited", 1, b'{"type":"Debited"}') == Debited(currency="")


def test_the_credit_deadline_defaults_to_credit_timeout() -> None:
    step = TRANSFER.next_step(given(STARTED, DEBITED))
    assert step is not None
    assert step.timeout == CREDIT_TIMEOUT


def test_step_command_ids_derive_from_the_transfer_and_the_step() -> None:
    step = TRANSFER.next_step(given(STARTED))
    assert step is not None
    assert TRANSFER.step_command_id("t-1", step) == "transfer/t-1/debit"


# ---- step_result ---------------------------------------------------------------------

DEBIT = Step("debit", "account", "ann", Debit(amount=30, target="bob"))
DEBITED_EVENT = {"type": "TransferDebited", "amount": 30, "target": "bob", "currency": "USD"}


def test_a_debit_that_landed_reports_the_source_currency() -> None:
    reply = decode_reply(command_done("account", "ann", 3, [DEBITED_EVENT]))
    assert TRANSFER.step_result(DEBIT, reply) == debit_done("USD")


def test_a_debit_reply_without_a_currency_reports_none_which_no_account_takes() -> None:
    reply = decode_reply(command_done("account", "ann", 3, []))
    assert TRANSFER.step_result(DEBIT, reply) == debit_done("")
    events = when(given(STARTED), debit_done(""))
    step = TRANSFER.next_step(given(STARTED, *events))
    assert step is not None
    assert step.command == Credit(amount=30, currency="", source="ann")


def test_other_ok_replies_are_done_steps() -> None:
    settle = Step("settle", "account", "ann", Settle(amount=30, target="bob"))
    assert TRANSFER.step_result(settle, decode_reply(command_done("account", "ann", 4, []))) == (
        done("settle")
    )
    legacy = Step("debit", "account", "ann", Withdraw(amount=30))
    reply = decode_reply(command_done("account", "ann", 3, [{"type": "Withdrawn", "amount": 30}]))
    assert TRANSFER.step_result(legacy, reply) == done("debit")


@pytest.mark.parametrize("code", ["overloaded", "unavailable", "internal"])
def test_a_transient_reply_means_try_again(code: ErrorCode) -> None:
    assert code in TRANSIENT
    assert TRANSFER.step_result(DEBIT, decode_reply(error_reply(code, "later"))) is None


@pytest.mark.parametrize("code", ["rejected", "timeout"])
def test_a_definite_no_is_a_failed_step(code: ErrorCode) -> None:
    reply = decode_reply(error_reply(code, "no way"))
    assert TRANSFER.step_result(DEBIT, reply) == done("debit", ok=False, code=code, reason="no way")


# ---- end to end on a node ------------------------------------------------------------

OPEN = {"type": "Open", "owner": "o", "currency": "EUR"}
ENDED = frozenset({"completed", "failed"})


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def served(nc: NATS) -> None:
    """Wait (bounded) until a freshly started node answers.

    Now and then (a few in a hundred starts) the first request from another connection
    gets "no responders" although the node flushed its subscriptions before `open_node`
    returned; an immediate retry is answered. Not what these tests are about: skip it.
    """
    with anyio.fail_after(5):
        while True:
            try:
                await nc.request("kaya.qry.account.probe", b"", timeout=5)
                return
            except NoRespondersError:
                await anyio.sleep(0.01)


async def open_account(nc: NATS, account_id: str, balance: int, currency: str = "EUR") -> None:
    await served(nc)
    body = {**OPEN, "currency": currency}
    assert (await call(nc, f"kaya.cmd.account.{account_id}", body))["ok"] is True
    if balance:
        deposit = {"type": "Deposit", "amount": balance}
        assert (await call(nc, f"kaya.cmd.account.{account_id}", deposit))["ok"] is True


async def account(nc: NATS, account_id: str) -> dict[str, Any]:
    reply = await call(nc, f"kaya.qry.account.{account_id}")
    assert reply["ok"] is True, reply
    state: dict[str, Any] = reply["state"]
    return state


async def balances(nc: NATS, *account_ids: str) -> list[int]:
    return [(await account(nc, a))["balance"] for a in account_ids]


async def start(
    nc: NATS, transfer_id: str, source: str, target: str, amount: int, **kw: Any
) -> dict[str, Any]:
    body = {"type": "Start", "source": source, "target": target, "amount": amount}
    return await call(nc, f"kaya.cmd.transfer.{transfer_id}", body, **kw)


async def wait_ended(nc: NATS, transfer_id: str, timeout: float = 10) -> dict[str, Any]:
    """Poll the transfer's state (observable, bounded) until it is completed or failed."""
    with anyio.fail_after(timeout):
        while True:
            reply = await call(nc, f"kaya.qry.transfer.{transfer_id}")
            assert reply["ok"] is True, reply
            state: dict[str, Any] = reply["state"]
            if state["status"] in ENDED:
                return state
            await anyio.sleep(0.01)


async def history(node: Node, entity: str, entity_id: str) -> list[tuple[str, Any, str | None]]:
    """(type, amount, command id) of each event in the stream."""
    events = await node.store.read_stream(entity, entity_id)
    return [(e.type, orjson.loads(e.data).get("amount"), e.command_id) for e in events]


@pytest.mark.anyio
async def test_a_transfer_moves_the_money(node: Node, nc: NATS) -> None:
    a, b, t = fresh("a"), fresh("b"), fresh("t")
    await open_account(nc, a, 100)
    await open_account(nc, b, 5)
    started = await start(nc, t, a, b, 30)
    assert started["ok"] is True, started
    assert started["events"] == [
        {"type": "Started", "source": a, "target": b, "amount": 30, "protocol": 2}
    ]

    state = await wait_ended(nc, t)
    assert state == {
        "source": a,
        "target": b,
        "amount": 30,
        "currency": "EUR",
        "held": 0,
        "status": "completed",
        "reason": "",
        "step": "",
        "protocol": 2,
    }
    assert await balances(nc, a, b) == [70, 35]
    assert (await history(node, "account", a))[2:] == [
        ("TransferDebited", 30, f"transfer/{t}/debit"),
        ("TransferSettled", 30, f"transfer/{t}/settle"),
    ]
    assert (await history(node, "account", b))[2:] == [
        ("TransferCredited", 30, f"transfer/{t}/credit")
    ]
    assert "outgoing" not in await account(nc, a)  # settled: nothing in flight any more
    assert [e.type for e in await node.store.read_stream("transfer", t)] == [
        "Started",
        "Debited",
        "Credited",
        "Completed",
    ]


@pytest.mark.anyio
async def test_step_done_is_refused_on_the_wire(node: Node, nc: NATS) -> None:
    t = fresh("t")
    await served(nc)
    body = {"type": "StepDone", "step": "debit", "ok": True, "code": "", "reason": ""}
    reply = await call(nc, f"kaya.cmd.transfer.{t}", body)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "unknown_command"
    assert (await call(nc, f"kaya.qry.transfer.{t}"))["version"] == 0


@pytest.mark.anyio
async def test_insufficient_funds_fail_the_transfer_and_move_nothing(node: Node, nc: NATS) -> None:
    a, b, t = fresh("a"), fresh("b"), fresh("t")
    await open_account(nc, a, 10)
    await open_account(nc, b, 0)
    assert (await start(nc, t, a, b, 50))["ok"] is True

    state = await wait_ended(nc, t)
    assert state["status"] == "failed"
    assert state["reason"].startswith("debit refused: insufficient funds")
    assert await balances(nc, a, b) == [10, 0]
    assert [e[0] for e in await history(node, "account", a)] == ["Opened", "Deposited"]
    assert [e[0] for e in await history(node, "account", b)] == ["Opened"]


@pytest.mark.anyio
async def test_a_refused_credit_is_refunded(node: Node, nc: NATS) -> None:
    a, b, t = fresh("a"), fresh("b"), fresh("t")
    await open_account(nc, a, 100)
    await open_account(nc, b, 0)
    assert (await call(nc, f"kaya.cmd.account.{b}", {"type": "Close"}))["ok"] is True
    assert (await start(nc, t, a, b, 40))["ok"] is True

    state = await wait_ended(nc, t)
    assert state["status"] == "failed"
    assert state["reason"].startswith("credit refused: rejected: account is not open")
    assert await balances(nc, a, b) == [100, 0]
    assert (await history(node, "account", a))[2:] == [
        ("TransferDebited", 40, f"transfer/{t}/debit"),
        ("TransferRefunded", 40, f"transfer/{t}/refund"),
    ]
    assert [e[0] for e in await history(node, "account", b)] == ["Opened", "Closed"]
    assert state["held"] == 0


@pytest.mark.anyio
async def test_a_credit_past_its_deadline_is_refunded_and_stays_refused(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    # a negative timeout: the deadline has passed before the credit is first sent
    registry = Registry([Account(), Transfer(credit_timeout=-1.0)])
    async with open_node(node_config(nats_server, tmp_path), make_app(*registry)) as node:
        a, b, t = fresh("a"), fresh("b"), fresh("t")
        await open_account(nc, a, 100)
        await open_account(nc, b, 0)
        assert (await start(nc, t, a, b, 25))["ok"] is True

        state = await wait_ended(nc, t)
        assert state["status"] == "failed"
        assert state["reason"].startswith("credit refused: timeout:")
        assert await balances(nc, a, b) == [100, 0]
        assert [e[0] for e in await history(node, "account", b)] == ["Opened"]
        # the target remembers its refusal: the credit can never be applied afterwards
        again = decode_reply(
            await node.runtime.ask(
                node.app.registry.get("account"),
                b,
                Credit(amount=25, currency="EUR", source=a),
                command_id=f"transfer/{t}/credit",
            )
        )
        assert again.error is not None
        assert again.error.code == "timeout"
        assert await balances(nc, b) == [0]


@pytest.mark.anyio
async def test_a_repeated_start_moves_the_money_once(node: Node, nc: NATS) -> None:
    a, b, t = fresh("a"), fresh("b"), fresh("t")
    await open_account(nc, a, 100)
    await open_account(nc, b, 0)
    body = orjson.dumps({"type": "Start", "source": a, "target": b, "amount": 60})
    subject = f"kaya.cmd.transfer.{t}"
    headers = {"Kaya-Command-Id": f"start-{t}"}
    replies: list[bytes] = []

    async def send() -> None:
        replies.append((await nc.request(subject, body, timeout=10, headers=headers)).data)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(send)
    assert len(set(replies)) == 1  # the first reply, byte for byte
    assert orjson.loads(replies[0])["ok"] is True
    assert (await wait_ended(nc, t))["status"] == "completed"
    late = await nc.request(subject, body, timeout=10, headers=headers)
    assert late.data == replies[0]

    anonymous = await start(nc, t, a, b, 60)  # the same transfer without the key
    assert anonymous["ok"] is False
    assert anonymous["error"]["code"] == "rejected"
    assert "already completed" in anonymous["error"]["message"]
    assert await balances(nc, a, b) == [40, 60]
    assert len(await node.store.read_stream("transfer", t)) == 4


@pytest.mark.anyio
async def test_a_command_past_its_deadline_is_refused_for_good(node: Node, nc: NATS) -> None:
    a = fresh("a")
    await open_account(nc, a, 10)
    accounts = node.app.registry.get("account")

    async def deposit(command_id: str, deadline: float | None) -> bytes:
        return await node.runtime.ask(
            accounts, a, Deposit(amount=5), command_id=command_id, deadline=deadline
        )

    late = await deposit("late-1", time.time() - 1)
    refused = decode_reply(late)
    assert refused.ok is False
    assert refused.error is not None
    assert refused.error.code == "timeout"
    assert (await account(nc, a))["balance"] == 10
    # a repeat gets the same answer, even without a deadline or with one in the future
    assert await deposit("late-1", None) == late
    assert await deposit("late-1", time.time() + 60) == late
    assert [e[0] for e in await history(node, "account", a)] == ["Opened", "Deposited"]
    # in time, and under another id, the same command is applied
    assert decode_reply(await deposit("late-2", time.time() + 60)).ok is True
    assert (await account(nc, a))["balance"] == 15


# ---- resuming after a restart -----------------------------------------------------------


async def wait_ended_in_store(node: Node, transfer_id: str, timeout: float = 10) -> None:
    """Poll the store (observable, bounded) until the saga's stream ends. Unlike a state
    query, this does not activate the saga: only the node's own resume can finish it."""
    with anyio.fail_after(timeout):
        while True:
            events = await node.store.read_stream("transfer", transfer_id)
            if events and events[-1].type in TRANSFER.terminal_events:
                return
            await anyio.sleep(0.01)


def new_event(event: TransferEvent) -> NewEvent:
    return NewEvent(
        event_id=uuid.uuid4().hex,
        type=type(event).__name__,
        schema_version=event.schema_version,
        data=msgspec.json.encode(event),
    )


async def write_transfer(config: Config, transfer_id: str, *events: TransferEvent) -> None:
    """What a node that crashed mid-transfer leaves behind: the saga's stream so far."""
    async with open_event_store(config.store_path) as store:
        events_ = [new_event(e) for e in events]
        await store.append(Append("transfer", transfer_id, 0, events_))


@pytest.mark.anyio
async def test_unfinished_transfers_resume_when_the_node_starts(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    config = node_config(nats_server, tmp_path)
    a, b = fresh("a"), fresh("b")
    mid_credit, debit_unrecorded, not_debited = fresh("t1"), fresh("t2"), fresh("t3")
    async with open_node(config, make_app()) as node:
        await open_account(nc, a, 100)
        await open_account(nc, b, 0)
        # mid_credit's debit was applied and recorded by the saga before the crash
        debit = Debit(amount=10, target=b)
        cid = f"transfer/{mid_credit}/debit"
        assert decode_reply(
            await node.runtime.ask(node.app.registry.get("account"), a, debit, command_id=cid)
        ).ok
        # debit_unrecorded's debit reached the account, the crash came before the saga knew
        debit = Debit(amount=20, target=b)
        cid = f"transfer/{debit_unrecorded}/debit"
        assert decode_reply(
            await node.runtime.ask(node.app.registry.get("account"), a, debit, command_id=cid)
        ).ok

    await write_transfer(config, mid_credit, Started(source=a, target=b, amount=10), DEBITED)
    await write_transfer(config, debit_unrecorded, Started(source=a, target=b, amount=20))
    await write_transfer(config, not_debited, Started(source=a, target=b, amount=30))

    async with open_node(config, make_app()) as node:
        await served(nc)
        for t in (mid_credit, debit_unrecorded, not_debited):
            await wait_ended_in_store(node, t)
            assert (await wait_ended(nc, t))["status"] == "completed"
        assert await balances(nc, a, b) == [40, 60]
        debits = [e for e in await history(node, "account", a) if e[0] == "TransferDebited"]
        assert debits == [  # each transfer debited once, the resumed ones not again
            ("TransferDebited", 10, f"transfer/{mid_credit}/debit"),
            ("TransferDebited", 20, f"transfer/{debit_unrecorded}/debit"),
            ("TransferDebited", 30, f"transfer/{not_debited}/debit"),
        ]
        assert "outgoing" not in await account(nc, a)


async def debited_before_a_crash(
    node: Node, nc: NATS, transfer: str, source: str, target: str, debit: Command
) -> None:
    """Accounts `source` (100) and `target` (0), and the transfer's debit step applied under
    its step id, as if the node had stopped right after it."""
    await open_account(nc, source, 100)
    await open_account(nc, target, 0)
    reply = await node.runtime.ask(
        node.app.registry.get("account"), source, debit, command_id=f"transfer/{transfer}/debit"
    )
    assert decode_reply(reply).ok


@pytest.mark.anyio
async def test_a_credit_deadline_does_not_move_when_the_node_restarts(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    config = node_config(nats_server, tmp_path)
    a, b, t = fresh("a"), fresh("b"), fresh("t")
    async with open_node(config, make_app()) as node:
        await debited_before_a_crash(node, nc, t, a, b, Debit(amount=50, target=b))
    await write_transfer(config, t, Started(source=a, target=b, amount=50), DEBITED)
    async with open_event_store(config.store_path) as store:
        # the credit was first sent before the crash, with a deadline that has passed since
        await ensure_saga_tables(store)
        assert await step_deadline(store, "transfer", t, "credit", time.time() - 1) < time.time()

    registry = Registry([Account(), Transfer(credit_timeout=60.0)])
    async with open_node(config, make_app(*registry)) as node:
        await served(nc)
        await wait_ended_in_store(node, t)
        state = await wait_ended(nc, t)
        assert state["status"] == "failed"
        assert state["reason"].startswith("credit refused: timeout:")
        assert await balances(nc, a, b) == [100, 0]


@pytest.mark.anyio
async def test_a_client_cannot_take_a_step_command_id(node: Node, nc: NATS) -> None:
    a, b, t = fresh("a"), fresh("b"), fresh("t")
    await open_account(nc, a, 100)
    await open_account(nc, b, 0)
    forged = {"type": "Deposit", "amount": 30}
    claimed = await call(nc, f"kaya.cmd.account.{b}", forged, command_id=f"transfer/{t}/credit")
    assert claimed["ok"] is False
    assert claimed["error"]["code"] == "bad_request"
    assert "reserved" in claimed["error"]["message"]
    assert (await start(nc, t, a, b, 30))["ok"] is True
    assert (await wait_ended(nc, t))["status"] == "completed"
    assert await balances(nc, a, b) == [70, 30]


@pytest.mark.anyio
async def test_a_transfer_from_a_missing_account_fails_without_dead_letters(
    node: Node, nc: NATS
) -> None:
    b, t = fresh("b"), fresh("t")
    await open_account(nc, b, 0)
    assert (await start(nc, t, fresh("nobody"), b, 5))["ok"] is True
    state = await wait_ended(nc, t)
    assert state["status"] == "failed"
    assert "not open" in state["reason"]
    with anyio.fail_after(10):
        await node.relay.wait_caught_up()
        last = await node.store.last_position()
        await node.consumers["notifications"].wait_for_position(last)
    assert node.consumers["notifications"].statistics().dead_lettered == 0


@pytest.mark.anyio
async def test_consumers_pass_over_events_not_theirs_and_catch_up_to_the_last(
    node: Node, nc: NATS
) -> None:
    """Analytics reads only account events; a transfer's own events are the last ones in
    the stream, and its checkpoint (so its lag) still reaches them."""
    a, b, t = fresh("a"), fresh("b"), fresh("t")
    await open_account(nc, a, 100)
    await open_account(nc, b, 0)
    assert (await start(nc, t, a, b, 40))["ok"] is True
    assert (await wait_ended(nc, t))["status"] == "completed"
    last = await node.store.last_position()
    with anyio.fail_after(15):
        for runner in node.consumers.values():
            await runner.wait_for_position(last)
    tail = await node.store.read_all(last - 1, 1)
    assert tail[0].entity == "transfer"  # the last event is not an account's
    analytics = node.consumers["analytics"].statistics()
    assert analytics.checkpoint == last
    assert analytics.dead_lettered == 0
    view = await call(nc, "kaya.view.analytics")
    # a transfer moves money inside the bank: the balance, not deposits or withdrawals
    assert view["operations"] == {"deposits": 1, "withdrawals": 0}
    assert view["currencies"]["EUR"]["balance"] == 100


# ---- money is conserved whatever clients do meanwhile (issue 2/6) ------------------------


@pytest.mark.anyio
async def test_closing_the_source_while_its_transfer_fails_loses_no_money(
    node: Node, nc: NATS
) -> None:
    """The report: a transfer of the whole balance to an account that was never opened,
    `Close` sent to the source again and again. The debit must not strand the money:
    every `Close` is refused, the refund lands, the 500 are back at the source."""
    src, nobody, t = fresh("src"), fresh("nobody"), fresh("t")
    await open_account(nc, src, 500)
    assert (await start(nc, t, src, nobody, 500))["ok"] is True
    closes: list[dict[str, Any]] = []
    with anyio.fail_after(15):
        while True:  # no sleep: as many Close commands as the node answers
            closes.append(await call(nc, f"kaya.cmd.account.{src}", {"type": "Close"}))
            state = (await call(nc, f"kaya.qry.transfer.{t}"))["state"]
            if state["status"] in ENDED:
                break
    assert state["status"] == "failed"
    assert state["reason"] == "credit refused: rejected: account is not open (status new)"
    assert state["held"] == 0
    assert await account(nc, src) == {
        "owner": "o",
        "currency": "EUR",
        "balance": 500,
        "status": "open",
    }
    assert not any(c["ok"] for c in closes), closes
    reasons = {c["error"]["message"] for c in closes}
    assert reasons <= {
        "cannot close with a balance of 500",
        f"cannot close while transfers out of the account are in flight: 500 to {nobody}",
    }


@pytest.mark.anyio
async def test_a_transfer_between_currencies_is_refused_and_refunded(node: Node, nc: NATS) -> None:
    eur, usd, t = fresh("eur"), fresh("usd"), fresh("t")
    await open_account(nc, eur, 100, "EUR")
    await open_account(nc, usd, 0, "USD")
    assert (await start(nc, t, eur, usd, 40))["ok"] is True

    state = await wait_ended(nc, t)
    assert state["status"] == "failed"
    assert state["reason"] == (
        "credit refused: rejected: currency mismatch: the account is in USD, the transfer in EUR"
    )
    assert (state["currency"], state["held"]) == ("EUR", 0)
    assert await balances(nc, eur, usd) == [100, 0]
    assert [e[0] for e in await history(node, "account", usd)] == ["Opened"]
    assert [e[0] for e in await history(node, "account", eur)][2:] == [
        "TransferDebited",
        "TransferRefunded",
    ]


@pytest.mark.anyio
async def test_a_transfer_in_flight_shows_where_its_money_is(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    """A node that stopped after the debit: the money is in the source's `outgoing` and
    in the transfer's `held`; the source cannot close until the transfer has ended."""
    config = node_config(nats_server, tmp_path)
    a, b, t = fresh("a"), fresh("b"), fresh("t")
    async with open_node(config, make_app()) as node:
        # the saga's first step landed; the saga itself has not recorded anything yet
        await debited_before_a_crash(node, nc, t, a, b, Debit(amount=60, target=b))
        assert await account(nc, a) == {
            "owner": "o",
            "currency": "EUR",
            "balance": 40,
            "status": "open",
            "outgoing": {b: 60},
        }
        closing = await call(nc, f"kaya.cmd.account.{a}", {"type": "Close"})
        assert closing["error"] == {
            "code": "rejected",
            "message": f"cannot close while transfers out of the account are in flight: 60 to {b}",
        }
    await write_transfer(config, t, Started(source=a, target=b, amount=60), DEBITED)
    async with open_event_store(config.store_path) as store:
        stored = await store.read_stream("transfer", t)
    events = [TRANSFER.decode_event(e.type, e.schema_version, e.data) for e in stored]
    assert given(*events).held == 60

    async with open_node(config, make_app()) as node:  # resumes the transfer
        await served(nc)
        await wait_ended_in_store(node, t)
        assert (await wait_ended(nc, t))["status"] == "completed"
        assert await account(nc, a) == {
            "owner": "o",
            "currency": "EUR",
            "balance": 40,
            "status": "open",
        }
        assert await balances(nc, b) == [60]


@pytest.mark.anyio
@pytest.mark.parametrize("body", [
    {"type": "Debit", "amount": 5, "target": "x"},
    {"type": "Credit", "amount": 5, "currency": "EUR", "source": "x"},
    {"type": "Refund", "amount": 5, "target": "x"},
    {"type": "Settle", "amount": 5, "target": "x"},
], ids=["debit", "credit", "refund", "settle"])  # fmt: skip
async def test_a_client_cannot_send_a_transfer_step(
    node: Node, nc: NATS, body: dict[str, Any]
) -> None:
    a = fresh("a")
    await open_account(nc, a, 10)
    reply = await call(nc, f"kaya.cmd.account.{a}", body)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "unknown_command"
    assert await account(nc, a) == {
        "owner": "o",
        "currency": "EUR",
        "balance": 10,
        "status": "open",
    }


@pytest.mark.anyio
async def test_analytics_balances_stay_right_through_transfers(node: Node, nc: NATS) -> None:
    """Per currency, once every transfer has ended: balance == deposited - withdrawn ==
    the sum of that currency's account balances, whatever the transfers' outcomes."""
    e1, e2, e3, u1 = fresh("e1"), fresh("e2"), fresh("e3"), fresh("u1")
    await open_account(nc, e1, 100, "EUR")
    await open_account(nc, e2, 0, "EUR")
    await open_account(nc, e3, 0, "EUR")
    await open_account(nc, u1, 50, "USD")
    assert (await call(nc, f"kaya.cmd.account.{e3}", {"type": "Close"}))["ok"] is True
    assert (await call(nc, f"kaya.cmd.account.{e1}", {"type": "Withdraw", "amount": 10}))["ok"]
    plans = [(e1, e2, 30, "completed"), (e1, e3, 20, "failed"), (u1, e2, 5, "failed")]
    ids = [fresh("t") for _ in plans]
    for t, (source, target, amount, _) in zip(ids, plans, strict=True):
        assert (await start(nc, t, source, target, amount))["ok"] is True
    for t, (*_, outcome) in zip(ids, plans, strict=True):
        assert (await wait_ended(nc, t))["status"] == outcome
    with anyio.fail_after(10):
        await node.relay.wait_caught_up()
        await node.consumers["analytics"].wait_for_position(await node.store.last_position())
    assert node.consumers["analytics"].statistics().dead_lettered == 0
    view = await call(nc, "kaya.view.analytics")
    assert view["currencies"]["EUR"] == {
        "balance": 90,
        "deposited": 100,
        "withdrawn": 10,
        "deposits": 1,
        "withdrawals": 1,
        "accounts_opened": 3,
        "accounts_closed": 1,
    }
    assert view["currencies"]["USD"]["balance"] == 50
    assert await balances(nc, e1, e2, e3, u1) == [60, 30, 0, 50]


def stored_v1(event: TransferEvent, body: dict[str, Any]) -> NewEvent:
    """An event as the code before 2/6 stored it: version 1, its v1 body."""
    data = orjson.dumps({"type": type(event).__name__, **body})
    return NewEvent(
        event_id=uuid.uuid4().hex, type=type(event).__name__, schema_version=1, data=data
    )


@pytest.mark.anyio
async def test_a_transfer_started_before_2_6_resumes_with_its_own_steps(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    """Its debit landed as a `Withdraw` under the step's id before the upgrade: the
    resumed transfer must not send a different command under that id (the account
    would answer `conflict`, read as a refusal while the money had left)."""
    config = node_config(nats_server, tmp_path)
    a, b, t = fresh("a"), fresh("b"), fresh("t")
    async with open_node(config, make_app()) as node:
        await debited_before_a_crash(node, nc, t, a, b, Withdraw(amount=25))
    body = {"source": a, "target": b, "amount": 25}
    async with open_event_store(config.store_path) as store:
        await store.append(Append("transfer", t, 0, [stored_v1(STARTED, body)]))

    async with open_node(config, make_app()) as node:
        await served(nc)
        await wait_ended_in_store(node, t)
        state = await wait_ended(nc, t)
        assert (state["status"], state["protocol"], state["held"]) == ("completed", 1, 0)
        assert await balances(nc, a, b) == [75, 25]
        debit = f"transfer/{t}/debit"
        assert (await history(node, "account", a))[2:] == [("Withdrawn", 25, debit)]
        assert (await history(node, "account", b))[1:] == [
            ("Deposited", 25, f"transfer/{t}/credit")
        ]
