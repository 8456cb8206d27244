"""Money is conserved under any interleaving of client commands with running transfers.

A hypothesis state machine sends random Open (EUR or USD), Deposit, Withdraw, Close
and transfer Starts (to accounts never opened and across currencies too) to four
accounts on a real node: a real nats-server started per example, a real SQLite store
in a temp dir, transfers running in the node while the next commands arrive, and the
node stopped and opened again on the same data dir between steps now and then.

Hypothesis calls its rules synchronously, so the node runs on an event loop of its own
in a thread (`anyio.from_thread.start_blocking_portal`) and each rule is a
`portal.call`. The model keeps only what the node acknowledged: which accounts are
open in which currency, which are closed, and the money deposited and withdrawn.

After every step (`money_is_in_sight`), from one consistent read of the event store:
the account balances plus what transfers have debited and neither credited nor
refunded equal deposits minus withdrawals, and no balance is below zero. At the end of
each run (`teardown`), once every transfer has ended (polled with a deadline), the same
sum through queries, each account's exact balance from the transfers' outcomes, and
each outcome against the model: a transfer completes only between two open accounts
of one currency, and a closed account holds nothing.

`KAYA_MONEY_EXAMPLES` / `KAYA_MONEY_STEPS` raise the bounds for a heavier run, and
`KAYA_MONEY_SHRINK=1` shrinks a failure to a minimal sequence (slow: every replay has its
own timing): `KAYA_MONEY_EXAMPLES=200 KAYA_MONEY_STEPS=60 pytest tests/test_money_model.py
-p no:timeout`. By default the run is derandomized (the same sequences every time) and
takes about ten seconds.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import nats
import orjson
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from examples.bank import make_app
from kaya.app.node import Node, open_node
from tests.conftest import call, node_config
from tests.servers import NatsServer, start_nats_server

pytestmark = pytest.mark.slow

ACCOUNTS = ("a0", "a1", "a2", "a3")
CURRENCIES = ("EUR", "USD")
ENDED = frozenset({"completed", "failed"})
MAX_RESTARTS = 2
"""Per run: each restart costs a node start, and two already cover resuming mid-way."""
DEADLINE = 30.0
"""Seconds any one wait may take (a transfer's end, a reply): far beyond a healthy node."""

EXAMPLES = int(os.environ.get("KAYA_MONEY_EXAMPLES", "25"))
STEPS = int(os.environ.get("KAYA_MONEY_STEPS", "40"))
SHRINK = os.environ.get("KAYA_MONEY_SHRINK", "") == "1"
"""Shrinking replays a failure many times, each with its own timing: minutes, more than
the suite's per-test timeout. Off by default: a failure is reported as it was found."""

T = TypeVar("T")


@dataclass(frozen=True)
class Planned:
    """A transfer the node accepted, and what the model knew when it was started."""

    source: str
    target: str
    amount: int
    currencies: tuple[str | None, str | None]
    """(source, target) currency at Start, None if not open yet."""


class Harness:
    """A nats-server and a node, the node's event loop in a thread of its own."""

    def __init__(self, root: Path) -> None:
        self._cleanup: list[Callable[[], object]] = []
        self._node_cm: AbstractContextManager[Node] | None = None
        self.node: Node | None = None
        try:
            self.server: NatsServer = start_nats_server(root / "nats")
            self._cleanup.append(self.server.stop)
            portal_cm = start_blocking_portal(backend="asyncio")
            self.portal: BlockingPortal = portal_cm.__enter__()
            self._cleanup.append(lambda: portal_cm.__exit__(None, None, None))
            self.config = node_config(self.server, root / "node")
            self.nc: NATS = self.portal.call(nats.connect, self.server.url)
            self._cleanup.append(lambda: self.portal.call(self.nc.close))
        except BaseException:
            self.close()
            raise

    def start_node(self) -> None:
        cm = self.portal.wrap_async_context_manager(open_node(self.config, make_app()))
        self.node = cm.__enter__()
        self._node_cm = cm

    def stop_node(self) -> None:
        cm, self._node_cm, self.node = self._node_cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def close(self) -> None:
        """Everything that was started is stopped, even if stopping one part fails."""
        steps = [self.stop_node, *reversed(self._cleanup)]
        self._cleanup = []
        errors: list[BaseException] = []
        for step in steps:
            try:
                step()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.portal.call(fn, *args)

    def request(self, subject: str, body: dict[str, Any] | bytes = b"") -> dict[str, Any]:
        return self.portal.call(functools.partial(_request, self.nc, subject, body))

    def command(self, entity: str, entity_id: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = self.request(f"kaya.cmd.{entity}.{entity_id}", body)
        if not reply["ok"]:
            # only domain refusals: anything else would leave the outcome unknown
            assert reply["error"]["code"] == "rejected", (entity, entity_id, body, reply)
        return reply

    def state(self, entity: str, entity_id: str) -> dict[str, Any]:
        reply = self.request(f"kaya.qry.{entity}.{entity_id}")
        assert reply["ok"] is True, reply
        state: dict[str, Any] = reply["state"]
        return state


async def _request(nc: NATS, subject: str, body: dict[str, Any] | bytes) -> dict[str, Any]:
    """One request; a node just (re)started may not have its subscriptions seen yet."""
    with anyio.fail_after(DEADLINE):
        while True:
            try:
                return await call(nc, subject, body, timeout=DEADLINE)
            except NoRespondersError:
                await anyio.sleep(0.01)


async def _account_events(node: Node) -> list[tuple[str, str, dict[str, Any], str | None]]:
    """(account, type, body, command id) of every account event, in one read: a snapshot."""
    rows = await node.store.query(
        "SELECT entity_id, type, data, command_id FROM events"
        " WHERE entity = 'account' ORDER BY position"
    )
    return [(str(i), str(t), orjson.loads(d), c) for i, t, d, c in rows]


SIGN = {
    "Deposited": 1,
    "Withdrawn": -1,
    "TransferDebited": -1,
    "TransferCredited": 1,
    "TransferRefunded": 1,
}
"""How each account event moves the balance (TransferSettled, Opened, Closed: not at all)."""


class MoneyModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="kaya-money-"))
        self.harness: Harness | None = None
        try:
            self.harness = Harness(self.root)
            self.harness.start_node()
        except BaseException:
            self._close()
            raise
        self.opened: dict[str, str] = {}
        self.closed: set[str] = set()
        self.deposited: Counter[str] = Counter()
        self.withdrawn: Counter[str] = Counter()
        self.transfers: dict[str, Planned] = {}
        self.ended: dict[str, dict[str, Any]] = {}
        self.restarts = 0
        self.starts = 0

    @property
    def node(self) -> Harness:
        assert self.harness is not None
        return self.harness

    # ---- client commands ---------------------------------------------------------------

    @initialize(
        currencies=st.lists(st.sampled_from(CURRENCIES), min_size=3, max_size=3),
        funds=st.lists(st.integers(0, 1000), min_size=3, max_size=3),
        opened=st.integers(2, 3),
    )
    def open_and_fund(self, currencies: list[str], funds: list[int], opened: int) -> None:
        """Most runs are about money moving: two or three accounts start open and funded
        (a2 may be opened later by a rule, a3 never is)."""
        for account, currency, amount in zip(ACCOUNTS[:opened], currencies, funds, strict=False):
            self.open(account, currency)
            if amount:
                self.deposit(account, amount)

    @rule(account=st.sampled_from(ACCOUNTS[:3]), currency=st.sampled_from(CURRENCIES))
    def open(self, account: str, currency: str) -> None:
        """a3 is never opened: transfers to it must fail and give the money back."""
        body = {"type": "Open", "owner": f"owner-{account}", "currency": currency}
        if self.node.command("account", account, body)["ok"]:
            assert account not in self.opened
            self.opened[account] = currency

    @rule(account=st.sampled_from(ACCOUNTS), amount=st.integers(1, 1000))
    def deposit(self, account: str, amount: int) -> None:
        reply = self.node.command("account", account, {"type": "Deposit", "amount": amount})
        if reply["ok"]:
            self.deposited[account] += amount
        else:
            assert account not in self.opened or account in self.closed, reply

    @rule(account=st.sampled_from(ACCOUNTS), amount=st.integers(1, 1000))
    def withdraw(self, account: str, amount: int) -> None:
        reply = self.node.command("account", account, {"type": "Withdraw", "amount": amount})
        if reply["ok"]:
            self.withdrawn[account] += amount

    @rule(account=st.sampled_from(ACCOUNTS))
    def withdraw_everything(self, account: str) -> None:
        """Empty the account, so that a Close can succeed (unless a transfer is in flight)."""
        balance = self.node.state("account", account)["balance"]
        if balance:
            self.withdraw(account, balance)

    @rule(account=st.sampled_from(ACCOUNTS))
    def close(self, account: str) -> None:
        if self.node.command("account", account, {"type": "Close"})["ok"]:
            self.closed.add(account)

    @rule(
        source=st.sampled_from(ACCOUNTS),
        to=st.sampled_from(ACCOUNTS),  # `target` is taken: hypothesis's bundles
        amount=st.integers(1, 600),
    )
    def transfer(self, source: str, to: str, amount: int) -> None:
        self.starts += 1
        transfer_id = f"t{self.starts}"
        body = {"type": "Start", "source": source, "target": to, "amount": amount}
        reply = self.node.command("transfer", transfer_id, body)
        if source == to:
            assert not reply["ok"], reply
            return
        assert reply["ok"], reply
        currencies = (self._currency_now(source), self._currency_now(to))
        self.transfers[transfer_id] = Planned(source, to, amount, currencies)

    @rule(source=st.sampled_from(ACCOUNTS), to=st.sampled_from(ACCOUNTS), closes=st.integers(0, 3))
    def transfer_everything(self, source: str, to: str, closes: int) -> None:
        """The reported case: all of the source's money away, and Close sent to the source
        at once, while the transfer runs (its debit may land before or after each)."""
        balance = self.node.state("account", source)["balance"]
        if balance:
            self.transfer(source, to, balance)
        for _ in range(closes):
            self.close(source)

    def _currency_now(self, account: str) -> str | None:
        return self.opened.get(account) if account not in self.closed else None

    # ---- the node's life ---------------------------------------------------------------

    @precondition(lambda self: self.restarts < MAX_RESTARTS)  # counts rules only: no timing
    @rule()
    def restart(self) -> None:
        """Stop the node mid-way (transfers in flight) and open it again on the same data."""
        self.node.stop_node()
        self.node.start_node()
        self.restarts += 1

    @rule()
    def let_the_oldest_transfer_end(self) -> None:
        """No precondition on what the node did: which rules hypothesis may draw must not
        depend on timing (whether a transfer started can), or its replays diverge."""
        oldest = next((t for t in self.transfers if t not in self.ended), None)
        if oldest is not None:
            self._wait_ended(oldest)

    def _wait_ended(self, transfer_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + DEADLINE
        while True:
            state = self.node.state("transfer", transfer_id)
            if state["status"] in ENDED:
                self.ended[transfer_id] = state
                return state
            assert time.monotonic() < deadline, f"transfer {transfer_id} never ended: {state}"
            time.sleep(0.01)  # polling an observable state, bounded by the deadline

    # ---- what must hold at every step ----------------------------------------------------

    @invariant()
    def money_is_in_sight(self) -> None:
        """Balances plus money debited and neither credited nor refunded (matched by the
        steps' command ids) equal deposits minus withdrawals, at every committed point."""
        node = self.node.node
        assert node is not None
        balances: Counter[str] = Counter()
        steps: dict[str, set[str]] = {}
        amounts: dict[str, int] = {}
        closed: set[str] = set()
        for account, type_, body, command_id in self.node.run(_account_events, node):
            assert account not in closed, f"{type_} on {account} after it closed"
            balances[account] += SIGN.get(type_, 0) * int(body.get("amount", 0))
            assert balances[account] >= 0, (account, type_, body)
            if type_ == "Closed":
                assert balances[account] == 0, account
                closed.add(account)
            if command_id and command_id.startswith("transfer/"):
                _, transfer_id, step = command_id.split("/")
                assert step not in steps.setdefault(transfer_id, set()), f"{command_id} twice"
                steps[transfer_id].add(step)
                amounts[transfer_id] = int(body["amount"])
        in_flight = sum(
            amounts[t]
            for t, done in steps.items()
            if "debit" in done and not {"credit", "refund"} & done
        )
        expected = sum(self.deposited.values()) - sum(self.withdrawn.values())
        assert sum(balances.values()) + in_flight == expected

    # ---- what must hold once every transfer has ended ------------------------------------

    def teardown(self) -> None:
        try:
            if self.harness is not None and self.harness.node is not None:
                self._check_the_end()
        finally:
            self._close()

    def _check_the_end(self) -> None:
        for transfer_id in self.transfers:
            if transfer_id not in self.ended:
                self._wait_ended(transfer_id)
        accounts = {a: self.node.state("account", a) for a in ACCOUNTS}
        held = sum(state["held"] for state in self.ended.values())
        expected = sum(self.deposited.values()) - sum(self.withdrawn.values())
        assert sum(a["balance"] for a in accounts.values()) + held == expected
        assert held == 0  # every transfer ended: none still holds money

        moved: Counter[str] = Counter()
        for transfer_id, plan in self.transfers.items():
            state = self.ended[transfer_id]
            assert (state["source"], state["target"], state["amount"]) == (
                plan.source,
                plan.target,
                plan.amount,
            )
            if state["status"] == "completed":
                moved[plan.source] -= plan.amount
                moved[plan.target] += plan.amount
                assert self.opened.get(plan.source) == self.opened.get(plan.target), state
                assert state["currency"] == self.opened[plan.target], state
            else:
                assert state["reason"], state
            source_currency, target_currency = plan.currencies
            if plan.target not in self.opened:
                assert state["status"] == "failed", state
            if source_currency and target_currency and source_currency != target_currency:
                assert state["status"] == "failed", state
                closed_meanwhile = plan.target in self.closed and "closed" in state["reason"]
                assert (
                    state["reason"].startswith("debit refused")
                    or "currency mismatch" in state["reason"]
                    or closed_meanwhile
                ), state

        for account, state in accounts.items():
            assert "outgoing" not in state, state  # settled or refunded: nothing in flight
            assert state["balance"] >= 0, state
            assert state["balance"] == (
                self.deposited[account] - self.withdrawn[account] + moved[account]
            ), (account, state)
            if account in self.closed:
                assert (state["status"], state["balance"]) == ("closed", 0), state

    def _close(self) -> None:
        try:
            if self.harness is not None:
                self.harness.close()
        finally:
            self.harness = None
            shutil.rmtree(self.root, ignore_errors=True)


def test_money_is_conserved_whatever_clients_do_while_transfers_run() -> None:
    run_state_machine_as_test(
        MoneyModel,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate, *([Phase.shrink] if SHRINK else [])],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
