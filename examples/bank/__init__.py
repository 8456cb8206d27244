"""The bank: Kaya's example app, and the workload of its benchmarks and chaos tests.

    account        an entity: Open, Deposit, Withdraw, Close
    transfer       a saga: debit the source, credit the target, then settle the source's
                   outgoing, or refund it if the credit fails (money conserved by design)
    analytics      a projection (read model) served on kaya.view.analytics
    notifications  a reaction: account and transfer events -> kaya.notify.<owner token>
    policy         who may do what once callers carry JWTs: owners their own accounts

Serve it with `kaya run --app examples.bank:app` from the repository's root (`make run`).
Built only on `kaya`'s public API, as any user's app is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from examples.bank.account import Account
from examples.bank.analytics import Analytics, analytics_view
from examples.bank.notifications import Notifications
from examples.bank.policy import BankPolicy
from examples.bank.transfer import Transfer
from kaya import App, Consumer, Entity


def make_app(*entities: Entity[Any, Any, Any], consumers: Iterable[Consumer] | None = None) -> App:
    """A fresh bank (its consumers keep per-node state). `entities` replace the defaults
    of the same name and `consumers` the default two (tests swap in a flaky account or a
    recording consumer, for instance)."""
    chosen = {e.name: e for e in (Account(), Transfer(), *entities)}
    return App(
        entities=chosen.values(),
        consumers=[Analytics(), Notifications()] if consumers is None else consumers,
        views={"analytics": analytics_view},
        policy=BankPolicy(),
    )


app = make_app
"""What `--app examples.bank:app` loads: a factory, so each node gets its own consumers."""

__all__ = ["Account", "Analytics", "BankPolicy", "Notifications", "Transfer", "app", "make_app"]
