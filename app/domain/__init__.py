"""The reference domain: the entities `kaya run` serves and every benchmark drives."""

from actors import Registry
from app.domain.account import Account


def reference_registry() -> Registry:
    return Registry([Account()])


__all__ = ["Account", "reference_registry"]
