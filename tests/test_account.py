"""The account decider as given/when/then: pure, no NATS, no SQLite."""

from __future__ import annotations

import functools

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
    Deposit,
    Deposited,
    Open,
    Opened,
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
