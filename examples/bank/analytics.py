"""The analytics read model (CQRS): totals per currency and counts, on `kaya.view.analytics`.

Its effects are SQL, applied with the consumer's checkpoint in one transaction, so
it is effectively-once: a redelivered event cannot count twice. An event's currency
is looked up in the model's own `analytics_accounts` table inside the same
transaction, so an account opened earlier in the same batch is already visible.

`deposited` / `withdrawn` (and their counts) are money entering and leaving the
bank: client deposits and withdrawals. Transfers move money inside one currency (an
account refuses a credit in another), so their debits, credits and refunds move only
`balance`: the sum of the balances of that currency's accounts. While a transfer is
in flight its amount is out of `balance` (held by the transfer); once every transfer
has ended, `balance == deposited - withdrawn` for each currency.
"""

from __future__ import annotations

from typing import Any

from kaya import Context, Delivered, Effects, Projection

_CURRENCY_OF = "(SELECT currency FROM analytics_accounts WHERE id = ?)"


class Analytics(Projection):
    name = "analytics"
    filter_subject = "kaya.evt.account.>"
    accepts = {
        "Opened": {2},
        "Deposited": {1},
        "Withdrawn": {1},
        "Closed": {1},
        "TransferDebited": {1},
        "TransferCredited": {1},
        "TransferRefunded": {1},
        "TransferSettled": {1},
    }
    tables = ("analytics_accounts", "analytics_currencies")
    ddl = """
    CREATE TABLE IF NOT EXISTS analytics_accounts (
        id       TEXT PRIMARY KEY,
        currency TEXT NOT NULL,
        status   TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS analytics_currencies (
        currency        TEXT PRIMARY KEY,
        balance         INTEGER NOT NULL DEFAULT 0,
        deposited       INTEGER NOT NULL DEFAULT 0,
        withdrawn       INTEGER NOT NULL DEFAULT 0,
        deposits        INTEGER NOT NULL DEFAULT 0,
        withdrawals     INTEGER NOT NULL DEFAULT 0,
        accounts_opened INTEGER NOT NULL DEFAULT 0,
        accounts_closed INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID
    """

    async def handle(self, event: Delivered, effects: Effects) -> None:
        body = event.decode()
        account = event.entity_id
        match event.type:
            case "Opened":
                currency = str(body["currency"])
                effects.execute(
                    "INSERT OR REPLACE INTO analytics_accounts (id, currency, status)"
                    " VALUES (?, ?, 'open')",
                    (account, currency),
                )
                effects.execute(
                    "INSERT INTO analytics_currencies (currency, accounts_opened) VALUES (?, 1)"
                    " ON CONFLICT (currency) DO UPDATE SET accounts_opened = accounts_opened + 1",
                    (currency,),
                )
            case "Deposited":
                amount = _amount(body)
                effects.execute(
                    "UPDATE analytics_currencies SET balance = balance + ?,"
                    " deposited = deposited + ?, deposits = deposits + 1"
                    f" WHERE currency = {_CURRENCY_OF}",
                    (amount, amount, account),
                )
            case "Withdrawn":
                amount = _amount(body)
                effects.execute(
                    "UPDATE analytics_currencies SET balance = balance - ?,"
                    " withdrawn = withdrawn + ?, withdrawals = withdrawals + 1"
                    f" WHERE currency = {_CURRENCY_OF}",
                    (amount, amount, account),
                )
            case "Closed":
                effects.execute(
                    "UPDATE analytics_accounts SET status = 'closed' WHERE id = ?", (account,)
                )
                effects.execute(
                    "UPDATE analytics_currencies SET accounts_closed = accounts_closed + 1"
                    f" WHERE currency = {_CURRENCY_OF}",
                    (account,),
                )
            case "TransferDebited":
                effects.execute(
                    "UPDATE analytics_currencies SET balance = balance - ?"
                    f" WHERE currency = {_CURRENCY_OF}",
                    (_amount(body), account),
                )
            case "TransferCredited" | "TransferRefunded":
                effects.execute(
                    "UPDATE analytics_currencies SET balance = balance + ?"
                    f" WHERE currency = {_CURRENCY_OF}",
                    (_amount(body), account),
                )
            case _:
                pass  # a settlement, or another account event: no figure moves


def _amount(body: dict[str, Any]) -> int:
    amount = body["amount"]
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ValueError(f"amount must be a positive integer, got {amount!r}")
    return amount


async def analytics_view(context: Context, params: dict[str, Any]) -> dict[str, Any]:
    """The read model as served on `kaya.view.analytics` (and compared by `kaya replay`)."""
    rows = await context.query(
        "SELECT currency, balance, deposited, withdrawn, deposits, withdrawals,"
        " accounts_opened, accounts_closed FROM analytics_currencies ORDER BY currency"
    )
    currencies = {
        row[0]: {
            "balance": row[1],
            "deposited": row[2],
            "withdrawn": row[3],
            "deposits": row[4],
            "withdrawals": row[5],
            "accounts_opened": row[6],
            "accounts_closed": row[7],
        }
        for row in rows
    }
    wanted = params.get("currency")
    if isinstance(wanted, str):
        currencies = {k: v for k, v in currencies.items() if k == wanted}
    return {
        "currencies": currencies,
        "accounts": {
            "opened": sum(c["accounts_opened"] for c in currencies.values()),
            "closed": sum(c["accounts_closed"] for c in currencies.values()),
        },
        "operations": {
            "deposits": sum(c["deposits"] for c in currencies.values()),
            "withdrawals": sum(c["withdrawals"] for c in currencies.values()),
        },
        "position": await context.checkpoint(Analytics.name),
    }
