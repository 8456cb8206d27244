"""App: what a node serves (entities, sagas, consumers, views), and how `--app` finds it.

The runtime knows no domain: `kaya run --app module:attr` imports the user's module
(the current directory first on the import path, as uvicorn does), takes the `App`
there, and the node serves exactly that: the subjects of its entities, its consumers
and its views, and nothing else.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kaya.actors import Entity, Registry
from kaya.actors.policy import Policy
from kaya.actors.wire import TOKEN
from kaya.app.events.consumers import Consumer, Projection, View


class AppError(Exception):
    """An app that cannot be loaded or is not well-formed; the message says why."""


class App:
    """The entities (sagas are entities too), consumers and views one node serves.

        app = kaya.App(
            entities=[Account(), Transfer()],
            consumers=[Analytics(), Notifications()],
            views={"analytics": analytics_view},
            policy=BankPolicy(),
        )

    Names are checked here, once: entity names follow the contract's rule
    (`[a-z][a-z0-9]{0,31}`), consumer and view names are single subject tokens,
    and none is used twice. Consumer instances keep per-node state once bound, so
    serve one App per node (`kaya run` loads a fresh one in each process).
    """

    def __init__(
        self,
        *,
        entities: Iterable[Entity[Any, Any, Any]] = (),
        consumers: Iterable[Consumer] = (),
        views: Mapping[str, View] | None = None,
        policy: Policy | None = None,
    ) -> None:
        try:
            self.registry = Registry(entities)
        except ValueError as exc:
            raise AppError(str(exc)) from None
        self.consumers: tuple[Consumer, ...] = tuple(consumers)
        self.views: dict[str, View] = dict(views or {})
        self.policy = policy or Policy()
        """Who may do what, asked once callers carry JWTs (`[security.jwt]`); the default
        allows every authenticated caller everything."""
        names: set[str] = set()
        for consumer in self.consumers:
            name = getattr(consumer, "name", None)
            if not isinstance(name, str) or not TOKEN.fullmatch(name):
                raise AppError(
                    f"consumer {type(consumer).__name__} needs a `name` of 1-64 characters"
                    f" of [A-Za-z0-9_-], not {name!r}"
                )
            if name in names:
                raise AppError(f"two consumers are named {name!r}")
            names.add(name)
        for view in self.views:
            if not TOKEN.fullmatch(view):
                raise AppError(f"view name {view!r} must be 1-64 characters of [A-Za-z0-9_-]")

    @property
    def entities(self) -> list[Entity[Any, Any, Any]]:
        return list(self.registry)

    @property
    def projections(self) -> list[Projection]:
        """The consumers `kaya replay` can rebuild: their only effects are their tables."""
        return [c for c in self.consumers if isinstance(c, Projection)]

    def consumer(self, name: str) -> Consumer:
        for consumer in self.consumers:
            if consumer.name == name:
                return consumer
        known = ", ".join(sorted(c.name for c in self.consumers)) or "none"
        raise AppError(f"no consumer named {name!r} (known: {known})")


def load_app(spec: str) -> App:
    """The App named by `module:attr` (attr may be a function returning one).

    The current directory goes first on the import path, so `kaya run --app
    counter_app:app` works from the folder holding `counter_app.py`.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"--app {spec!r}: expected module:attribute, e.g. counter_app:app")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppError(
                f"--app {spec!r}: no module named {exc.name!r} (looked in {cwd} and the"
                " installed packages)"
            ) from None
        raise
    try:
        found: object = getattr(module, attr)
    except AttributeError:
        raise AppError(f"--app {spec!r}: module {module_name} has no attribute {attr!r}") from None
    if not isinstance(found, App) and callable(found):
        factory: Callable[[], object] = found
        found = factory()
    if not isinstance(found, App):
        raise AppError(f"--app {spec!r} is a {type(found).__name__}, not a kaya.App")
    return found
