"""Kaya: an async, actor-based runtime for event-driven services on NATS JetStream and SQLite.

This module is the public API: what a user imports to write an app and to talk to one.
Every other module (`kaya.app`, `kaya.actors`, `kaya.store`) is internal and may change.

    Writing an app                       Talking to a node
    --------------                       -----------------
    Command, Event       messages        Client             commands, queries, views
    Entity               a decider       Reply, StateReply  what the client returns
    Rejected             a domain "no"   KayaError & co.    the contract's error codes
    Saga, Step, StepDone orchestration
    Consumer, Projection reactions, read models
    Delivered, Effects   what a consumer gets and writes
    Context, View        reads lent to consumers and views
    App                  what `kaya run --app module:attr` serves
    Policy, Caller       who may do what, once callers carry JWTs

Errors, one per code of the wire contract:

    KayaError
    ├── BadRequest        bad_request       ├── Unauthorized   unauthorized
    ├── UnknownEntity     unknown_entity    ├── Forbidden      forbidden
    ├── UnknownCommand    unknown_command   ├── Unavailable    unavailable
    ├── Rejected          rejected          ├── Timeout        timeout
    ├── Conflict          conflict          └── Internal       internal
    └── Overloaded        overloaded
"""

from kaya.actors import (
    BadRequest,
    Command,
    Conflict,
    Entity,
    Event,
    Forbidden,
    Internal,
    KayaError,
    Overloaded,
    Rejected,
    Timeout,
    Unauthorized,
    Unavailable,
    UnknownCommand,
    UnknownEntity,
    UnknownSchema,
    Upcaster,
)
from kaya.actors.policy import ActsOn, Caller, Decision, Policy
from kaya.actors.saga import Saga, Step, StepDone
from kaya.actors.testing import decide, replay, run_saga
from kaya.actors.wire import Delivered
from kaya.app.application import App, AppError
from kaya.app.client import Client, Reply, StateReply
from kaya.app.events.consumers import Consumer, Context, Effects, Projection, View

__version__ = "0.1.0"

__all__ = [
    "ActsOn",
    "App",
    "AppError",
    "BadRequest",
    "Caller",
    "Client",
    "Command",
    "Conflict",
    "Consumer",
    "Context",
    "Decision",
    "Delivered",
    "Effects",
    "Entity",
    "Event",
    "Forbidden",
    "Internal",
    "KayaError",
    "Overloaded",
    "Policy",
    "Projection",
    "Rejected",
    "Reply",
    "Saga",
    "StateReply",
    "Step",
    "StepDone",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "UnknownCommand",
    "UnknownEntity",
    "UnknownSchema",
    "Upcaster",
    "View",
    "__version__",
    "decide",
    "replay",
    "run_saga",
]
