"""The `account` entity of the example bank. Amounts are integers in minor units.

Rules: amount > 0 (a field constraint, so a violation is `bad_request`); balance
never below zero; nothing happens to an account that is not open; close only at
zero balance and with no transfer out of it in flight.

Transfers (examples/bank/transfer.py) move money with four commands of their own,
which only the transfer saga sends: they are not in `command_types`, so the wire
refuses them (`unknown_command`) like a saga's `StepDone`, and no client can forge a
refund or a settlement.

    Debit {amount, target}            balance -> outgoing[target]   (TransferDebited)
    Credit {amount, currency, source} balance += amount             (TransferCredited)
    Refund {amount, target}           outgoing[target] -> balance   (TransferRefunded)
    Settle {amount, target}           outgoing[target] -= amount    (TransferSettled)

Money a transfer has debited is listed in the source's `outgoing` (amount per
target) until the transfer ends: settled once the target took it, refunded if the
target refused it. `Close` is refused while `outgoing` is not empty, so the account
a refund goes back to is always open: a refund can never be refused, and money is
never stranded between a closed source and a refusing target. A credit carries the
source's currency, and an account in another currency refuses it (the transfer is
then refunded). Deposits and credits keep `balance + outgoing` within MAX_BALANCE, so
a refund never takes the balance above it either.

Schema history: `Opened` v2 (and `Open` v2) added `kind`; v1 accounts were all
personal, which the v1 -> v2 upcaster states for the v1 events still in the store.
The `Transfer*` events are new types (2/6): before them a transfer's debit, credit and
refund were plain `Withdrawn` / `Deposited` events, which stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec

from kaya import Command, Entity, Event, Rejected

MAX_AMOUNT = 10**15
"""Largest single amount; with MAX_BALANCE it keeps every figure exact in a double."""
MAX_BALANCE = 2**53 - 1

Amount = Annotated[int, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
Owner = Annotated[str, msgspec.Meta(min_length=1, max_length=200, extra={"sensitive": True})]
Sensitive = Annotated[str, msgspec.Meta(extra={"sensitive": True})]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
AccountId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
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


ClientCommand = Open | Deposit | Withdraw | Close
"""What a client may send: the account's `command_types`."""


class Debit(Command):
    """A transfer takes `amount` out of this account, for `target`: it is held as outgoing."""

    amount: Amount
    target: AccountId


class Credit(Command):
    """A transfer from `source` pays `amount` in: only into an open account of `currency`."""

    amount: Amount
    currency: Currency
    source: AccountId


class Refund(Command):
    """The transfer to `target` failed: its outgoing `amount` goes back to the balance."""

    amount: Amount
    target: AccountId


class Settle(Command):
    """The transfer to `target` landed there: its outgoing `amount` is no longer held here."""

    amount: Amount
    target: AccountId


TransferStep = Debit | Credit | Refund | Settle
"""Sent only by the transfer saga, in-process: never decoded from the wire."""

AccountCommand = ClientCommand | TransferStep


# ---- events --------------------------------------------------------------------------


class Opened(Event):
    schema_version = 2  # v2: `kind`; v1 events are upcast by `_opened_v1_to_v2`

    owner: Sensitive  # sealed at rest once security is on (kaya forget destroys it)
    currency: str
    kind: Kind = "personal"


class Deposited(Event):
    amount: int


class Withdrawn(Event):
    amount: int


class Closed(Event):
    pass


class TransferDebited(Event):
    """A transfer to `target` took `amount` (in the account's `currency`) out of the balance."""

    amount: int
    target: str
    currency: str


class TransferCredited(Event):
    """A transfer from `source` paid `amount` in."""

    amount: int
    source: str


class TransferRefunded(Event):
    """The transfer to `target` failed: its `amount` is back in the balance."""

    amount: int
    target: str


class TransferSettled(Event):
    """The transfer to `target` landed: its `amount` is no longer outgoing."""

    amount: int
    target: str


AccountEvent = (
    Opened
    | Deposited
    | Withdrawn
    | Closed
    | TransferDebited
    | TransferCredited
    | TransferRefunded
    | TransferSettled
)


def _opened_v1_to_v2(body: dict[str, Any]) -> dict[str, Any]:
    """Every v1 account was personal: said here, not left to whatever the default becomes."""
    return {**body, "kind": "personal"}


# ---- state ---------------------------------------------------------------------------


class AccountState(msgspec.Struct, frozen=True, kw_only=True):
    """`outgoing` (target -> amount debited by transfers not yet settled or refunded) is
    left out of the JSON while it is empty, so an account with nothing in flight reads
    exactly as it did before transfers held money: `{owner, currency, balance, status}`."""

    owner: Sensitive = ""  # sealed in snapshots
    currency: str = ""
    balance: int = 0
    status: Status = "new"
    outgoing: dict[str, int] | msgspec.UnsetType = msgspec.UNSET

    @property
    def in_flight(self) -> Mapping[str, int]:
        return self.outgoing or {}

    @property
    def held_out(self) -> int:
        """Money debited by transfers still in flight: it comes back here if they fail."""
        return sum(self.in_flight.values())


def _outgoing(state: AccountState, target: str, change: int) -> dict[str, int] | msgspec.UnsetType:
    """`state.outgoing` with `change` added to `target`'s amount; UNSET once nothing is left."""
    outgoing = dict(state.in_flight)
    left = outgoing.get(target, 0) + change
    if left:
        outgoing[target] = left
    else:
        outgoing.pop(target, None)
    return outgoing or msgspec.UNSET


class Account(Entity[AccountState, AccountCommand, AccountEvent]):
    name = "account"
    state_type = AccountState
    command_types = (Open, Deposit, Withdraw, Close)  # the transfer steps never come by wire
    internal_types = (Debit, Credit, Refund, Settle)  # ... but from a saga on another node
    event_types = (
        Opened,
        Deposited,
        Withdrawn,
        Closed,
        TransferDebited,
        TransferCredited,
        TransferRefunded,
        TransferSettled,
    )
    upcasters = {("Opened", 1): _opened_v1_to_v2}

    def decide(self, state: AccountState, command: AccountCommand) -> Sequence[AccountEvent]:
        match command:
            case Open(owner=owner, currency=currency, kind=kind):
                if state.status != "new":
                    raise Rejected(f"account is already {state.status}")
                return [Opened(owner=owner, currency=currency, kind=kind)]
            case Deposit() | Withdraw() | Close() | Debit() | Credit() if state.status != "open":
                raise Rejected(f"account is not open (status {state.status})")
            case Deposit(amount=amount):
                _check_room(state, amount, "deposit")
                return [Deposited(amount=amount)]
            case Withdraw(amount=amount):
                if amount > state.balance:
                    raise Rejected(
                        f"insufficient funds: balance {state.balance}, withdrawal {amount}"
                    )
                return [Withdrawn(amount=amount)]
            case Close():
                if state.in_flight:
                    raise Rejected(
                        "cannot close while transfers out of the account are in flight:"
                        f" {_describe(state.in_flight)}"
                    )
                if state.balance != 0:
                    raise Rejected(f"cannot close with a balance of {state.balance}")
                return [Closed()]
            case Debit(amount=amount, target=target):
                if amount > state.balance:
                    raise Rejected(
                        f"insufficient funds: balance {state.balance}, transfer {amount}"
                    )
                return [TransferDebited(amount=amount, target=target, currency=state.currency)]
            case Credit(amount=amount, currency=currency, source=source):
                if currency != state.currency:
                    raise Rejected(
                        f"currency mismatch: the account is in {state.currency},"
                        f" the transfer in {currency}"
                    )
                _check_room(state, amount, "credit")
                return [TransferCredited(amount=amount, source=source)]
            case Refund(amount=amount, target=target):
                # not checked for `open`: the account is, since Close waits for every
                # outgoing transfer to end, and a refund must land whatever happened
                _check_outgoing(state, target, amount)
                return [TransferRefunded(amount=amount, target=target)]
            case Settle(amount=amount, target=target):
                _check_outgoing(state, target, amount)
                return [TransferSettled(amount=amount, target=target)]
        raise TypeError(f"unhandled command {command!r}")

    def evolve(self, state: AccountState, event: AccountEvent) -> AccountState:
        replace = msgspec.structs.replace
        match event:
            case Opened(owner=owner, currency=currency):
                return replace(state, owner=owner, currency=currency, status="open")
            case Deposited(amount=amount) | TransferCredited(amount=amount):
                return replace(state, balance=state.balance + amount)
            case Withdrawn(amount=amount):
                return replace(state, balance=state.balance - amount)
            case Closed():
                return replace(state, status="closed")
            case TransferDebited(amount=amount, target=target):
                outgoing = _outgoing(state, target, amount)
                return replace(state, balance=state.balance - amount, outgoing=outgoing)
            case TransferRefunded(amount=amount, target=target):
                outgoing = _outgoing(state, target, -amount)
                return replace(state, balance=state.balance + amount, outgoing=outgoing)
            case TransferSettled(amount=amount, target=target):
                return replace(state, outgoing=_outgoing(state, target, -amount))
        raise TypeError(f"unhandled event {event!r}")


def _check_room(state: AccountState, amount: int, what: str) -> None:
    """Money held out may come back (a refund): keep room for it below MAX_BALANCE."""
    if state.balance + state.held_out + amount > MAX_BALANCE:
        raise Rejected(f"{what} would take the balance above {MAX_BALANCE}")


def _check_outgoing(state: AccountState, target: str, amount: int) -> None:
    """A refund or a settlement ends money the account holds out for `target`. The saga
    sends each once, after the debit landed, so this holds unless something else wrote."""
    if state.in_flight.get(target, 0) < amount:
        raise Rejected(f"no transfer of {amount} to {target} is in flight")


def _describe(outgoing: Mapping[str, int]) -> str:
    return ", ".join(f"{amount} to {target}" for target, amount in sorted(outgoing.items()))
