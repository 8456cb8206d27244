"""The `transfer` saga: debit the source, credit the target, then settle or refund.

    Start --> Started (pending, step debit)
      debit ok ------> Debited {currency} (held: amount; step credit, with a deadline)
      debit refused -> DebitRefused + Failed
      credit ok -----> Credited (held: 0; step settle)
      settle done ---> Completed
      credit refused or past its deadline -> CreditRefused (step refund)
      refund ok -----> Refunded + Failed (held: 0)

Money is conserved by design, whatever fails and whatever clients do meanwhile:

- every step is an account command whose id is derived from the transfer id and the
  step, so it is applied at most once; a credit is refunded only once the target has
  definitely not taken it (refused, or refused as too late by its deadline);
- the money a transfer has debited is always visible: in the transfer's `held` from
  `Debited` until `Credited` or `Refunded`, and in the source account's `outgoing`
  from the debit until the settlement or the refund;
- a refund is never refused: the source cannot `Close` while the transfer is in its
  `outgoing`, and only the settlement or the refund takes it out of there;
- source and target currencies match: the debit reports the source's currency
  (`Debited.currency`), the credit carries it, and a target in another currency
  refuses it (`rejected: currency mismatch: ...`), so the money goes back to the source
  and the transfer fails with that reason.

Schema history: `Started` v2 added `protocol`. A transfer started before 2/6
(`Started` v1, upcast to protocol 1) finishes with the steps it began with, the
account's plain `Withdraw` and `Deposit` under the same step ids, so a step that
landed before the upgrade is still answered from the account's memory, never applied
twice; only such a transfer can still end with `RefundRefused` (its money then stays
in its `held`). `Debited` v2 added `currency` ("" in v1: not known).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec

from examples.bank.account import (
    MAX_AMOUNT,
    Credit,
    Debit,
    Deposit,
    Refund,
    Settle,
    Withdraw,
)
from kaya import Command, Event, Rejected, Saga, Step, StepDone

AccountId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Amount = Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
Status = Literal["new", "pending", "completed", "failed"]
StepName = Literal["", "debit", "credit", "settle", "refund"]

CREDIT_TIMEOUT = 10.0
"""Seconds the target account has to take the credit before it is refunded."""

PROTOCOL = 2
"""How the steps are carried out: 2 with the account's transfer commands (Debit,
Credit, Settle, Refund); 1, before 2/6, with its client commands Withdraw and Deposit."""


class Start(Command):
    source: AccountId
    target: AccountId
    amount: Amount


class Started(Event):
    schema_version = 2  # v2: `protocol`; v1 events are upcast by `_started_v1_to_v2`

    source: str
    target: str
    amount: int
    protocol: int = PROTOCOL


class Debited(Event):
    schema_version = 2  # v2: `currency`; a v1 event reads as "" (not known)

    currency: str = ""


class DebitRefused(Event):
    reason: str


class Credited(Event):
    pass


class CreditRefused(Event):
    reason: str


class Refunded(Event):
    pass


class RefundRefused(Event):  # only a transfer started before 2/6 (protocol 1) can get it
    reason: str


class Completed(Event):
    pass


class Failed(Event):
    reason: str


TransferEvent = (
    Started
    | Debited
    | DebitRefused
    | Credited
    | CreditRefused
    | Refunded
    | RefundRefused
    | Completed
    | Failed
)


def _started_v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    """A v1 transfer was started by code that stepped with Withdraw and Deposit."""
    return {**body, "protocol": 1}


class DebitDone(StepDone):
    """The debit's outcome with what the source reported: the currency of the money taken."""

    currency: str = ""


class TransferState(msgspec.Struct, frozen=True, kw_only=True):
    source: str = ""
    target: str = ""
    amount: int = 0
    currency: str = ""
    """The source's, once debited: what the credit carries."""
    held: int = 0
    """Debited from the source and neither credited to the target nor refunded yet."""
    status: Status = "new"
    reason: str = ""
    step: StepName = ""
    protocol: int = PROTOCOL


class Transfer(Saga):
    name = "transfer"
    state_type = TransferState
    state_schema = 2  # 2/6: `protocol`, `currency`, `held`; older snapshots are rebuilt
    command_types = (Start,)  # StepDone comes from the runtime only, never from the wire
    event_types = (
        Started,
        Debited,
        DebitRefused,
        Credited,
        CreditRefused,
        Refunded,
        RefundRefused,
        Completed,
        Failed,
    )
    upcasters = {("Started", 1): _started_v1_to_v2}
    terminal_events = ("Completed", "Failed")

    def __init__(self, *, credit_timeout: float = CREDIT_TIMEOUT) -> None:
        super().__init__()
        self.credit_timeout = credit_timeout

    def decide(self, state: TransferState, command: Any) -> Sequence[TransferEvent]:
        match command:
            case Start(source=source, target=target, amount=amount):
                if state.status != "new":
                    raise Rejected(f"transfer already {state.status}")
                if source == target:
                    raise Rejected("source and target must be different accounts")
                return [Started(source=source, target=target, amount=amount)]
            case StepDone(step=step) if step != state.step or state.status != "pending":
                return []  # a late or repeated outcome: already acted upon
            case DebitDone(ok=True, currency=currency):
                return [Debited(currency=currency)]
            case StepDone(step="debit", ok=True):  # protocol 1: the currency is not reported
                return [Debited()]
            case StepDone(step="debit", reason=reason):
                why = f"debit refused: {reason}"
                return [DebitRefused(reason=reason), Failed(reason=why)]
            case StepDone(step="credit", ok=True):
                if state.protocol >= 2:
                    return [Credited()]  # the source still lists it as outgoing: settle it
                return [Credited(), Completed()]
            case StepDone(step="credit", code=code, reason=reason):
                return [CreditRefused(reason=f"{code}: {reason}")]
            case StepDone(step="settle"):
                # never refused: the debit listed it and only this step or a refund ends it
                return [Completed()]
            case StepDone(step="refund", ok=True):
                return [Refunded(), Failed(reason=f"credit refused: {state.reason}")]
            case StepDone(step="refund", reason=reason):
                return [RefundRefused(reason=reason), Failed(reason=f"refund refused: {reason}")]
        raise TypeError(f"unhandled command {command!r}")

    def evolve(self, state: TransferState, event: TransferEvent) -> TransferState:
        replace = msgspec.structs.replace
        match event:
            case Started(source=source, target=target, amount=amount, protocol=protocol):
                return replace(
                    state,
                    source=source,
                    target=target,
                    amount=amount,
                    status="pending",
                    step="debit",
                    protocol=protocol,
                )
            case Debited(currency=currency):
                return replace(state, step="credit", held=state.amount, currency=currency)
            case Credited():
                step: StepName = "settle" if state.protocol >= 2 else state.step
                return replace(state, step=step, held=0)
            case CreditRefused(reason=reason):
                return replace(state, step="refund", reason=reason)
            case Refunded():
                return replace(state, held=0)
            case Completed():
                return replace(state, status="completed", step="")
            case Failed(reason=reason):
                return replace(state, status="failed", step="", reason=reason)
            case DebitRefused() | RefundRefused():
                return state  # a refused refund leaves the money held here
        raise TypeError(f"unhandled event {event!r}")

    def next_step(self, state: TransferState) -> Step | None:
        if state.status != "pending":
            return None
        source, target, amount = state.source, state.target, state.amount
        if state.protocol < 2:
            return self._protocol_1_step(state)
        match state.step:
            case "debit":
                return Step("debit", "account", source, Debit(amount=amount, target=target))
            case "credit":
                credit = Credit(amount=amount, currency=state.currency, source=source)
                return Step("credit", "account", target, credit, timeout=self.credit_timeout)
            case "settle":
                return Step("settle", "account", source, Settle(amount=amount, target=target))
            case "refund":
                return Step("refund", "account", source, Refund(amount=amount, target=target))
        return None

    def _protocol_1_step(self, state: TransferState) -> Step | None:
        """The steps as a transfer started before 2/6 took them: the same commands under
        the same ids, so what landed then is answered from the account's memory."""
        amount = state.amount
        match state.step:
            case "debit":
                return Step("debit", "account", state.source, Withdraw(amount=amount))
            case "credit":
                deposit = Deposit(amount=amount)
                return Step("credit", "account", state.target, deposit, timeout=self.credit_timeout)
            case "refund":
                return Step("refund", "account", state.source, Deposit(amount=amount))
        return None

    def step_result(self, step: Step, reply: Any) -> StepDone | None:
        """As the runtime's, plus the currency a `Debit` reports (`TransferDebited`'s).

        A reply without it (none is ever sent) reads as "" , which no account has: the
        credit is then refused and refunded rather than landing in an unknown currency.
        """
        done = super().step_result(step, reply)
        if done is None or not done.ok or not isinstance(step.command, Debit):
            return done
        events: list[dict[str, Any]] = getattr(reply, "events", None) or []
        currency = next((str(e["currency"]) for e in events if "currency" in e), "")
        return DebitDone(step=done.step, ok=True, currency=currency)
