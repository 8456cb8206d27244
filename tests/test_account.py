"""The account decider as given/when/then: pure, no NATS, no SQLite.

The transfer steps (Debit, Credit, Refund, Settle) are here too: what the account
guarantees so that a transfer can never strand money (issue 2/6).
"""

from __future__ import annotations

import functools

import msgspec
import pytest

from examples.bank.account import (
    MAX_AMOUNT,
    MAX_BALANCE,
    Account,
    AccountCommand,
    AccountEvent,
    AccountState,
    Close,
    Closed,
    Credit,
    Debit,
    Deposit,
    Deposited,
    Open,
    Opened,
    Refund,
    Settle,
    TransferCredited,
    TransferDebited,
    TransferRefunded,
    TransferSettled,
    Withdraw,
    Withdrawn,
)
from kaya.actors import BadRequest, Command, Rejected, UnknownCommand


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


ACCOUNT = Account()
OPENED = Opened(owner="ada", currency="EUR")


def given(*events: AccountEvent) -> AccountState:
    """The state after `events`, folded with the entity's own evolve."""
    return functools.reduce(ACCOUNT.evolve, events, ACCOUNT.initial)


def when(state: AccountState, command: AccountCommand) -> list[AccountEvent]:
    return list(ACCOUNT.decide(state, command))


# ---- evolve --------------------------------------------------------------------------


def test_a_new_account_is_empty_and_not_open() -> None:
    assert given() == AccountState(owner="", currency="", balance=0, status="new")


def test_events_fold_into_the_state() -> None:
    state = given(OPENED, Deposited(amount=100), Withdrawn(amount=30), Deposited(amount=5))
    assert state == AccountState(owner="ada", currency="EUR", balance=75, status="open")


def test_closed_folds_into_a_closed_status() -> None:
    assert given(OPENED, Closed()).status == "closed"


# ---- open ----------------------------------------------------------------------------


def test_open_a_new_account() -> None:
    assert when(given(), Open(owner="ada", currency="EUR")) == [OPENED]


@pytest.mark.parametrize(
    "history", [(OPENED,), (OPENED, Closed())], ids=["already-open", "already-closed"]
)
def test_open_twice_is_rejected(history: tuple[AccountEvent, ...]) -> None:
    with pytest.raises(Rejected, match="already"):
        when(given(*history), Open(owner="bob", currency="USD"))


# ---- deposit -------------------------------------------------------------------------


def test_deposit_into_an_open_account() -> None:
    assert when(given(OPENED), Deposit(amount=250)) == [Deposited(amount=250)]


def test_deposit_up_to_the_balance_cap() -> None:
    state = given(OPENED, Deposited(amount=MAX_BALANCE - 10))
    assert when(state, Deposit(amount=10)) == [Deposited(amount=10)]


def test_deposit_above_the_balance_cap_is_rejected() -> None:
    state = given(OPENED, Deposited(amount=MAX_BALANCE - 10))
    with pytest.raises(Rejected, match=str(MAX_BALANCE)):
        when(state, Deposit(amount=11))


# ---- withdraw ------------------------------------------------------------------------


def test_withdraw_part_of_the_balance() -> None:
    state = given(OPENED, Deposited(amount=100))
    assert when(state, Withdraw(amount=40)) == [Withdrawn(amount=40)]


def test_withdraw_the_whole_balance() -> None:
    state = given(OPENED, Deposited(amount=100))
    assert when(state, Withdraw(amount=100)) == [Withdrawn(amount=100)]


def test_withdraw_more_than_the_balance_is_rejected() -> None:
    state = given(OPENED, Deposited(amount=100), Withdrawn(amount=60))
    with pytest.raises(Rejected, match="insufficient funds"):
        when(state, Withdraw(amount=41))


def test_withdraw_from_an_empty_account_is_rejected() -> None:
    with pytest.raises(Rejected, match="insufficient funds"):
        when(given(OPENED), Withdraw(amount=1))


# ---- close ---------------------------------------------------------------------------


def test_close_at_zero_balance() -> None:
    assert when(given(OPENED), Close()) == [Closed()]


def test_close_after_emptying_the_account() -> None:
    state = given(OPENED, Deposited(amount=100), Withdrawn(amount=100))
    assert when(state, Close()) == [Closed()]


def test_close_with_a_balance_is_rejected() -> None:
    state = given(OPENED, Deposited(amount=1))
    with pytest.raises(Rejected, match="balance of 1"):
        when(state, Close())


# ---- nothing happens to an account that is not open ----------------------------------


@pytest.mark.parametrize("history", [(), (OPENED, Closed())], ids=["never-opened", "after-close"])
@pytest.mark.parametrize(
    "command",
    [Deposit(amount=1), Withdraw(amount=1), Close()],
    ids=["deposit", "withdraw", "close"],
)
def test_an_account_that_is_not_open_refuses_everything(
    history: tuple[AccountEvent, ...], command: AccountCommand
) -> None:
    with pytest.raises(Rejected, match="not open"):
        when(given(*history), command)


# ---- decoding commands ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "command"),
    [
        (b'{"type": "Open", "owner": "ada", "currency": "EUR"}', Open(owner="ada", currency="EUR")),
        (b'{"amount": 5, "type": "Deposit"}', Deposit(amount=5)),
        (b'{"type": "Withdraw", "amount": 7}', Withdraw(amount=7)),
        (b'{"type": "Close"}', Close()),
        (f'{{"type": "Deposit", "amount": {MAX_AMOUNT}}}'.encode(), Deposit(amount=MAX_AMOUNT)),
    ],
    ids=["open", "deposit", "withdraw", "close", "largest-amount"],
)
def test_decode_valid_commands(body: bytes, command: Command) -> None:
    assert ACCOUNT.decode_command(body) == command


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b'{"type": "Deposit", "amount": 5'],
    ids=["empty", "open-brace", "text", "truncated"],
)
def test_malformed_json_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest, match="malformed JSON"):
        ACCOUNT.decode_command(body)


@pytest.mark.parametrize(
    "body",
    [b'{"amount": 5}', b'{"type": 5, "amount": 5}', b"[]", b'"Deposit"', b"null"],
    ids=["missing-type", "type-not-a-string", "array", "string", "null"],
)
def test_a_body_without_a_string_type_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest, match='"type"'):
        ACCOUNT.decode_command(body)


@pytest.mark.parametrize("name", ["Transfer", "deposit", "Deposited", ""])
def test_an_unknown_command_type_is_unknown_command(name: str) -> None:
    with pytest.raises(UnknownCommand, match="known: Close, Deposit, Open, Withdraw"):
        ACCOUNT.decode_command(f'{{"type": "{name}", "amount": 5}}'.encode())


@pytest.mark.parametrize("command", ["Deposit", "Withdraw"])
@pytest.mark.parametrize(
    "amount",
    ["0", "-1", "1.5", "5.0", '"5"', "true", "null", str(MAX_AMOUNT + 1)],
    ids=["zero", "negative", "fraction", "float", "string", "bool", "null", "too-large"],
)
def test_an_amount_that_is_not_a_positive_integer_is_a_bad_request(
    command: str, amount: str
) -> None:
    with pytest.raises(BadRequest, match="amount") as caught:
        ACCOUNT.decode_command(f'{{"type": "{command}", "amount": {amount}}}'.encode())
    assert not isinstance(caught.value, UnknownCommand)


def test_a_missing_amount_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="amount"):
        ACCOUNT.decode_command(b'{"type": "Deposit"}')


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "Deposit", "amount": 5, "memo": "rent"}',
        b'{"type": "Close", "force": true}',
        b'{"type": "Open", "owner": "ada", "currency": "EUR", "balance": 100}',
    ],
    ids=["deposit-memo", "close-force", "open-balance"],
)
def test_an_unknown_field_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest, match="unknown field"):
        ACCOUNT.decode_command(body)


@pytest.mark.parametrize("currency", ['"eur"', '"EURO"', '"EU"', '"E1R"', '""', "978"], ids=str)
def test_a_bad_currency_is_a_bad_request(currency: str) -> None:
    body = f'{{"type": "Open", "owner": "ada", "currency": {currency}}}'.encode()
    with pytest.raises(BadRequest, match="currency"):
        ACCOUNT.decode_command(body)


@pytest.mark.parametrize("owner", ['""', '"' + "x" * 201 + '"', "7"], ids=["empty", "long", "int"])
def test_a_bad_owner_is_a_bad_request(owner: str) -> None:
    body = f'{{"type": "Open", "owner": {owner}, "currency": "EUR"}}'.encode()
    with pytest.raises(BadRequest, match="owner"):
        ACCOUNT.decode_command(body)


# ---- transfer steps: what keeps a transfer's money in sight -----------------------------

FUNDED = (OPENED, Deposited(amount=100))
DEBITED = TransferDebited(amount=30, target="bob", currency="EUR")


def test_a_debit_holds_the_money_as_outgoing_for_the_target() -> None:
    assert when(given(*FUNDED), Debit(amount=30, target="bob")) == [DEBITED]
    state = given(*FUNDED, DEBITED)
    assert (state.balance, state.in_flight, state.held_out) == (70, {"bob": 30}, 30)


def test_outgoing_amounts_add_up_per_target() -> None:
    more = TransferDebited(amount=5, target="bob", currency="EUR")
    other = TransferDebited(amount=7, target="cy", currency="EUR")
    state = given(*FUNDED, DEBITED, more, other)
    assert (state.balance, state.in_flight) == (58, {"bob": 35, "cy": 7})
    state = given(*FUNDED, DEBITED, more, other, TransferSettled(amount=5, target="bob"))
    assert state.in_flight == {"bob": 30, "cy": 7}


@pytest.mark.parametrize(
    ("history", "reason"),
    [
        (FUNDED, "insufficient funds: balance 100, transfer 101"),
        ((), "not open"),
        ((*FUNDED, Withdrawn(amount=100), Closed()), "not open"),
    ],
    ids=["insufficient", "never-opened", "closed"],
)
def test_a_debit_is_refused_when_a_withdrawal_would_be(
    history: tuple[AccountEvent, ...], reason: str
) -> None:
    with pytest.raises(Rejected, match=reason):
        when(given(*history), Debit(amount=101, target="bob"))


def test_close_is_refused_while_transfers_out_are_in_flight_and_names_them() -> None:
    state = given(
        *FUNDED,
        DEBITED,
        TransferDebited(amount=70, target="al", currency="EUR"),
    )
    assert state.balance == 0
    with pytest.raises(Rejected) as refused:
        when(state, Close())
    assert refused.value.message == (
        "cannot close while transfers out of the account are in flight: 70 to al, 30 to bob"
    )


def test_a_refund_puts_the_money_back_and_ends_the_outgoing() -> None:
    assert when(given(*FUNDED, DEBITED), Refund(amount=30, target="bob")) == [
        TransferRefunded(amount=30, target="bob")
    ]
    state = given(*FUNDED, DEBITED, TransferRefunded(amount=30, target="bob"))
    assert state == AccountState(owner="ada", currency="EUR", balance=100, status="open")


def test_a_settlement_ends_the_outgoing_and_leaves_the_balance() -> None:
    assert when(given(*FUNDED, DEBITED), Settle(amount=30, target="bob")) == [
        TransferSettled(amount=30, target="bob")
    ]
    state = given(*FUNDED, DEBITED, TransferSettled(amount=30, target="bob"))
    assert state == AccountState(owner="ada", currency="EUR", balance=70, status="open")
    assert when(state, Withdraw(amount=70)) == [Withdrawn(amount=70)]


def test_an_account_emptied_and_settled_can_close() -> None:
    state = given(
        *FUNDED,
        DEBITED,
        Withdrawn(amount=70),
        TransferSettled(amount=30, target="bob"),
    )
    assert when(state, Close()) == [Closed()]


@pytest.mark.parametrize("step", [Refund, Settle], ids=["refund", "settle"])
@pytest.mark.parametrize(
    ("amount", "target"), [(30, "cy"), (31, "bob")], ids=["other-target", "more-than-held"]
)
def test_a_refund_or_settlement_of_nothing_in_flight_is_refused(
    step: type[Refund] | type[Settle], amount: int, target: str
) -> None:
    with pytest.raises(Rejected, match=f"no transfer of {amount} to {target} is in flight"):
        when(given(*FUNDED, DEBITED), step(amount=amount, target=target))


def test_a_credit_in_the_account_currency_lands() -> None:
    credit = Credit(amount=30, currency="EUR", source="al")
    assert when(given(OPENED), credit) == [TransferCredited(amount=30, source="al")]
    assert given(OPENED, TransferCredited(amount=30, source="al")).balance == 30


def test_a_credit_in_another_currency_is_refused() -> None:
    with pytest.raises(Rejected) as refused:
        when(given(OPENED), Credit(amount=30, currency="USD", source="al"))
    assert refused.value.message == (
        "currency mismatch: the account is in EUR, the transfer in USD"
    )


@pytest.mark.parametrize("history", [(), (OPENED, Closed())], ids=["never-opened", "closed"])
def test_a_credit_to_an_account_that_is_not_open_is_refused(
    history: tuple[AccountEvent, ...],
) -> None:
    with pytest.raises(Rejected, match="not open"):
        when(given(*history), Credit(amount=30, currency="EUR", source="al"))


@pytest.mark.parametrize(
    "command",
    [Deposit(amount=11), Credit(amount=11, currency="EUR", source="al")],
    ids=["deposit", "credit"],
)
def test_money_held_out_keeps_room_below_the_cap_for_its_refund(command: AccountCommand) -> None:
    state = given(
        OPENED,
        Deposited(amount=MAX_BALANCE - 10),
        TransferDebited(amount=100, target="bob", currency="EUR"),
    )
    with pytest.raises(Rejected, match=str(MAX_BALANCE)):
        when(state, command)
    assert when(state, Refund(amount=100, target="bob")) == [
        TransferRefunded(amount=100, target="bob")
    ]


def test_the_state_shows_outgoing_only_while_something_is_in_flight() -> None:
    encode = msgspec.json.encode
    assert encode(given(*FUNDED)) == (
        b'{"owner":"ada","currency":"EUR","balance":100,"status":"open"}'
    )
    assert encode(given(*FUNDED, DEBITED)) == (
        b'{"owner":"ada","currency":"EUR","balance":70,"status":"open","outgoing":{"bob":30}}'
    )
    assert ACCOUNT.decode_state(encode(given(*FUNDED, DEBITED))) == given(*FUNDED, DEBITED)


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "Debit", "amount": 5, "target": "bob"}',
        b'{"type": "Credit", "amount": 5, "currency": "EUR", "source": "bob"}',
        b'{"type": "Refund", "amount": 5, "target": "bob"}',
        b'{"type": "Settle", "amount": 5, "target": "bob"}',
    ],
    ids=["debit", "credit", "refund", "settle"],
)
def test_transfer_steps_never_come_from_the_wire(body: bytes) -> None:
    with pytest.raises(UnknownCommand, match="known: Close, Deposit, Open, Withdraw"):
        ACCOUNT.decode_command(body)
