"""The `account` entity of the example bank. Amounts are integers in minor units.

Rules: amount > 0 (a field constraint, so a violation is `bad_request`); balance
never below zero; nothing happens to an account that is not open; close only at
zero balance.

Schema history: `Opened` v2 (and `Open` v2) added `kind`; v1 accounts were all
personal, which the v1 -> v2 upcaster states for the v1 events still in the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec

from kaya import Command, Entity, Event, Rejected

MAX_AMOUNT = 10**15
"""Largest single amount; with MAX_BALANCE it keeps every figure exact in a double."""
MAX_BALANCE = 2**53 - 1

Amount = Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
Owner = Annotated[str, msgspec.Meta(min_length=1, max_length=200, extra={"sensitive": True})]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
Status = Literal["new", "open", "closed"]
Kind = Literal["personal", "business"]


# ---- commands ------------------------------------------------------------------------


class Open(Command):
    schema_version = 2  # v2: `kind`, optional

    owner: Owner
    currency: Currency
    kind: Kind = "personal"


class Deposit(Command):
    amount: Amount


class Withdraw(Command):
    amount: Amount


class Close(Command):
    pass


AccountCommand = Open | Deposit | Withdraw | Close


# ---- events --------------------------------------------------------------------------


class Opened(Event):
    schema_version = 2  # v2: `kind`; v1 events are upcast by `_opened_v1_to_v2`

    owner: str
    currency: str
    kind: Kind = "personal"


class Deposited(Event):
    amount: int


class Withdrawn(Event):
    amount: int


class Closed(Event):
    pass


AccountEvent = Opened | Deposited | Withdrawn | Closed


def _opened_v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    """Every v1 account was personal: said here, not left to whatever the default becomes."""
    return {**body, "kind": "personal"}


# ---- state ---------------------------------------------------------------------------


class AccountState(msgspec.Struct, frozen=True, kw_only=True):
    owner: str = ""
    currency: str = ""
    balance: int = 0
    status: Status = "new"


class Account(Entity[AccountState, AccountCommand, AccountEvent]):
    name = "account"
    state_type = AccountState
    command_types = (Open, Deposit, Withdraw, Close)
    event_types = (Opened, Deposited, Withdrawn, Closed)
    upcasters = {("Opened", 1): _opened_v1_to_v2}

    def decide(self, state: AccountState, command: AccountCommand) -> Sequence[AccountEvent]:
        match command:
            case Open(owner=owner, currency=currency, kind=kind):
                if state.status != "new":
                    raise Rejected(f"account is already {state.status}")
                return [Opened(owner=owner, currency=currency, kind=kind)]
            case _ if state.status != "open":
                raise Rejected(f"account is not open (status {state.status})")
            case Deposit(amount=amount):
                if state.balance + amount > MAX_BALANCE:
                    raise Rejected(f"deposit would take the balance above {MAX_BALANCE}")
                return [Deposited(amount=amount)]
            case Withdraw(amount=amount):
                if amount > state.balance:
                    raise Rejected(
                        f"insufficient funds: balance {state.balance}, withdrawal {amount}"
                    )
                return [Withdrawn(amount=amount)]
            case Close():
                if state.balance != 0:
                    raise Rejected(f"cannot close with a balance of {state.balance}")
                return [Closed()]
        raise TypeError(f"unhandled command {command!r}")

    def evolve(self, state: AccountState, event: AccountEvent) -> AccountState:
        match event:
            case Opened(owner=owner, currency=currency):
                return msgspec.structs.replace(state, owner=owner, currency=currency, status="open")
            case Deposited(amount=amount):
                return msgspec.structs.replace(state, balance=state.balance + amount)
            case Withdrawn(amount=amount):
                return msgspec.structs.replace(state, balance=state.balance - amount)
            case Closed():
                return msgspec.structs.replace(state, status="closed")
        raise TypeError(f"unhandled event {event!r}")
