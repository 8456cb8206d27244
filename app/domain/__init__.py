"""The reference domain: the entities, consumers and views `kaya run` serves."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS

from kaya.actors import Registry
from kaya.app.consumers import Consumer
from kaya.app.domain.account import Account
from kaya.app.domain.analytics import Analytics, analytics_view
from kaya.app.domain.notifications import Notifications
from kaya.app.domain.transfer import Transfer
from kaya.app.ingress import ViewFn
from kaya.store import EventStore


def reference_registry() -> Registry:
    return Registry([Account(), Transfer()])


def reference_consumer_types() -> list[type[Consumer]]:
    """The classes of `reference_consumers`: what the event dictionary lists as readers."""
    return [Analytics, Notifications]


def reference_read_models() -> list[Consumer]:
    """The consumers whose only effects are their own tables: these can be rebuilt."""
    return [Analytics()]


def reference_consumers(nc: NATS, store: EventStore) -> list[Consumer]:
    async def publish(subject: str, data: bytes, headers: dict[str, str]) -> None:
        await nc.publish(subject, data, headers=headers)

    return [*reference_read_models(), Notifications(store, publish)]


def reference_views(store: EventStore) -> dict[str, ViewFn]:
    async def analytics(params: dict[str, Any]) -> dict[str, Any]:
        return await analytics_view(store, params)

    return {"analytics": analytics}


__all__ = [
    "Account",
    "Analytics",
    "Notifications",
    "Transfer",
    "reference_consumer_types",
    "reference_consumers",
    "reference_read_models",
    "reference_registry",
    "reference_views",
]
