"""The `transfer` saga: debit the source, credit the target, refund if the credit fails.

    Start --> Started (pending, step debit)
      debit ok ------> Debited (step credit, with a deadline)
      debit refused -> DebitRefused + Failed
      credit ok -----> Credited + Completed
      credit refused or past its deadline -> CreditRefused (step refund)
      refund ok -----> Refunded + Failed
      refund refused -> RefundRefused + Failed   (money held: needs an operator)

Money is conserved whatever fails: every step is an account command whose id is
derived from the transfer id and the step, so it is applied at most once, and a
credit is refunded only once the target has definitely not taken it (refused, or
refused as too late by its deadline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec

from examples.bank.account import MAX_AMOUNT, Deposit, Withdraw
from kaya import Command, Event, Rejected, Saga, Step, StepDone

AccountId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Amount = Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
Status = Literal["new", "pending", "completed", "failed"]
StepName = Literal["", "debit", "credit", "refund"]

CREDIT_TIMEOUT = 10.0
"""Seconds the target account has to take the credit before it is refunded."""


class Start(Command):
    source: AccountId
    target: AccountId
    amount: Amount


class Started(Event):
    source: str
    target: str
    amount: int


class Debited(Event):
    pass


class DebitRefused(Event):
    reason: str


class Credited(Event):
    pass


class CreditRefused(Event):
    reason: str


class Refunded(Event):
    pass


class RefundRefused(Event):
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


class TransferState(msgspec.Struct, frozen=True, kw_only=True):
    source: str = ""
    target: str = ""
    amount: int = 0
    status: Status = "new"
    reason: str = ""
    step: StepName = ""


class Transfer(Saga):
    name = "transfer"
    state_type = TransferState
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
            case StepDone(step="debit", ok=True):
                return [Debited()]
            case StepDone(step="debit", reason=reason):
                why = f"debit refused: {reason}"
                return [DebitRefused(reason=reason), Failed(reason=why)]
            case StepDone(step="credit", ok=True):
                return [Credited(), Completed()]
            case StepDone(step="credit", code=code, reason=reason):
                return [CreditRefused(reason=f"{code}: {reason}")]
            case StepDone(step="refund", ok=True):
                return [Refunded(), Failed(reason=f"credit refused: {state.reason}")]
            case StepDone(step="refund", reason=reason):
                return [RefundRefused(reason=reason), Failed(reason=f"refund refused: {reason}")]
        raise TypeError(f"unhandled command {command!r}")

    def evolve(self, state: TransferState, event: TransferEvent) -> TransferState:
        replace = msgspec.structs.replace
        match event:
            case Started(source=source, target=target, amount=amount):
                return replace(
                    state,
                    source=source,
                    target=target,
                    amount=amount,
                    status="pending",
                    step="debit",
                )
            case Debited():
                return replace(state, step="credit")
            case CreditRefused(reason=reason):
                return replace(state, step="refund", reason=reason)
            case Completed():
                return replace(state, status="completed", step="")
            case Failed(reason=reason):
                return replace(state, status="failed", step="", reason=reason)
            case DebitRefused() | Credited() | Refunded() | RefundRefused():
                return state
        raise TypeError(f"unhandled event {event!r}")

    def next_step(self, state: TransferState) -> Step | None:
        if state.status != "pending":
            return None
        match state.step:
            case "debit":
                return Step("debit", "account", state.source, Withdraw(amount=state.amount))
            case "credit":
                return Step(
                    "credit",
                    "account",
                    state.target,
                    Deposit(amount=state.amount),
                    timeout=self.credit_timeout,
                )
            case "refund":
                return Step("refund", "account", state.source, Deposit(amount=state.amount))
        return None
