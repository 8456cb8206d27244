"""Actor runtime: virtual actors, one bounded mailbox each, group-committed appends.

An actor exists for every entity id, but only in name until a message arrives:
then it is activated (rebuilt from its snapshot and later events), processes its
mailbox one message at a time, and goes idle. An idle actor is a small object
with no task; after `idle_timeout` or when `max_active` is exceeded it is
passivated (dropped) and will be rebuilt from the store on its next message.

This module schedules: `tell`/`query`/`ask` put a message in its actor's mailbox
(`actors/mailbox.py`), an actor with mail gets a worker, the worker activates it
and runs its turns (`actors/turn.py`) until the mailbox is empty, then tells the
turn observers (sagas) what state it left behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from kaya.actors.entity import Command
from kaya.actors.errors import Forbidden, Internal, KayaError, Unavailable
from kaya.actors.ids import request_hash, trace_id
from kaya.actors.mailbox import (
    Actor,
    AnyEntity,
    Message,
    ReplyFn,
    answer,
    deliver,
    take_commands,
)
from kaya.actors.policy import ActsOn, Caller, Lookup, Policy
from kaya.actors.sealing import Sealer, is_sealed
from kaya.actors.turn import Journal, Turns
from kaya.actors.wire import Answer, error_answer, ok_answer, state_reply
from kaya.store import EventStore
from kaya.store.timing import Stages

log = logging.getLogger("kaya.actors")

TurnObserver = Callable[[AnyEntity, str, Any, str | None], None]
"""Told (entity, entity id, committed state, last traceparent) when an actor's mailbox is
drained: how sagas see that a step is due. It runs on the actor's worker: keep it short."""

_MAX_IDLE_WORKERS = 1024


@dataclass(frozen=True)
class RuntimeSettings:
    mailbox_size: int = 1024
    max_active: int = 100_000
    idle_timeout: float = 300.0
    snapshot_every: int = 100
    max_turn: int = 512
    """Most commands one actor decides per turn (and so per append)."""


@dataclass(frozen=True)
class RuntimeStatistics:
    """A snapshot of the runtime's counters, taken by `ActorRuntime.statistics()`."""

    active: int
    busy: int
    queued: int
    activations: int
    passivations: int
    commands: int
    crashes: int


class ActorRuntime:
    """Hosts the actors of one node. Run it with `run()` inside a task group."""

    def __init__(
        self,
        store: EventStore,
        settings: RuntimeSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        journal: Journal | None = None,
        sealer: Sealer | None = None,
        policy: Policy | None = None,
        lookup: Lookup | None = None,
    ) -> None:
        """`journal`: the shared log a cluster node writes to first (replicated durability);
        then an actor of a shard this node does not serve answers `unavailable`.
        `sealer`: with security on, seals sensitive fields at rest (actors/sealing.py).
        `policy`: with JWT on, the app's (actors/policy.py), asked about every message
        that has a caller; `lookup` settles its `ActsOn` answers."""
        self._store = store
        self._settings = settings or RuntimeSettings()
        self._clock = clock
        self._journal = journal
        self._sealer = sealer
        self._policy = policy
        self._lookup = lookup
        self._turns = Turns(
            store,
            snapshot_every=self._settings.snapshot_every,
            journal=journal,
            sealer=sealer,
            policy=policy,
            lookup=lookup,
        )
        self._actors: OrderedDict[tuple[str, str], Actor] = OrderedDict()
        self._tg: TaskGroup | None = None
        self._busy = 0
        self._ready: deque[Actor] = deque()  # running actors no worker has taken yet
        self._idle: list[asyncio.Future[None]] = []  # one per idle worker, to wake it
        self._activations = 0
        self._passivations = 0
        self._observers: list[TurnObserver] = []
        self._drained: anyio.Event | None = None  # set when an actor's mailbox is drained

    # ---- entry points --------------------------------------------------------------

    def tell(
        self,
        entity: AnyEntity,
        entity_id: str,
        command: Command,
        reply: ReplyFn,
        *,
        command_id: str | None = None,
        traceparent: str | None = None,
        deadline: float | None = None,
        caller: Caller | None = None,
    ) -> None:
        """Queue a command; `reply` gets the contract reply. Raises Overloaded when full.

        A command still queued at `deadline` (unix time) is not applied: it gets
        `timeout`, remembered under its command id like any other reply. With a
        `caller`, the app's policy decides first whether it may be sent at all.
        """
        digest = request_hash(command) if command_id is not None else b""
        message = Message(command, command_id, digest, traceparent, reply)
        message.deadline = deadline
        message.caller = caller
        self._enqueue(entity, entity_id, message)

    def query(
        self, entity: AnyEntity, entity_id: str, reply: ReplyFn, *, caller: Caller | None = None
    ) -> None:
        """Queue a state query behind the entity's pending commands (read-your-writes)."""
        message = Message(None, None, b"", None, reply)
        message.caller = caller
        self._enqueue(entity, entity_id, message)

    async def ask(
        self,
        entity: AnyEntity,
        entity_id: str,
        command: Command | None,
        *,
        command_id: str | None = None,
        traceparent: str | None = None,
        deadline: float | None = None,
        caller: Caller | None = None,
    ) -> bytes:
        """Send and wait for the reply: for in-process callers (sagas, tools, tests)."""
        done = anyio.Event()
        box: list[bytes] = []

        async def reply(data: Answer) -> None:
            box.append(data.body)
            done.set()

        if command is None:
            self.query(entity, entity_id, reply, caller=caller)
        else:
            self.tell(
                entity,
                entity_id,
                command,
                reply,
                command_id=command_id,
                traceparent=traceparent,
                deadline=deadline,
                caller=caller,
            )
        await done.wait()
        return box[0]

    @property
    def stages(self) -> Stages:
        """Where commands spend their time (store/timing.py), the store's and the actors'."""
        return self._store.stages

    def observe_turns(self, observer: TurnObserver) -> Callable[[], None]:
        """Call `observer` whenever an actor's mailbox is drained; returns its unregister.

        Observers are called in the order they registered. One that raises is logged
        and skipped: it never fails the actor, its callers or the other observers.
        """
        self._observers.append(observer)
        registered = True

        def unregister() -> None:
            nonlocal registered
            if registered:
                registered = False
                self._observers.remove(observer)

        return unregister

    def _enqueue(self, entity: AnyEntity, entity_id: str, message: Message) -> None:
        if self._tg is None:
            raise Unavailable("the actor runtime is not running")
        key = (entity.name, entity_id)
        actor = self._actors.get(key)
        if actor is None:
            # evict before adding: the new actor is idle too and must not be the victim
            if len(self._actors) >= self._settings.max_active:
                self._evict(len(self._actors) - self._settings.max_active + 1)
            actor = Actor(entity, entity_id)
            self._actors[key] = actor
        else:
            self._actors.move_to_end(key)
        if deliver(actor, message, self._settings.mailbox_size):
            self._busy += 1
            self._ready.append(actor)
            while self._idle:
                wake = self._idle.pop()
                if not wake.done():  # else its worker was cancelled
                    wake.set_result(None)
                    return
            self._tg.start_soon(self._worker)

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; passivates idle actors in the background."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                task_status.started()
                interval = min(max(self._settings.idle_timeout / 4, 0.05), 30.0)
                while True:
                    await anyio.sleep(interval)
                    self.passivate_idle(self._clock())
            finally:
                self._tg = None

    def passivate_idle(self, now: float) -> int:
        """Drop actors idle since before `now - idle_timeout`; return how many."""
        cutoff = now - self._settings.idle_timeout
        idle = [
            key
            for key, actor in self._actors.items()
            if not actor.running and actor.last_used <= cutoff
        ]
        for key in idle:
            del self._actors[key]
        self._passivations += len(idle)
        return len(idle)

    def unload(self, belongs: Callable[[str, str], bool]) -> int:
        """Forget every idle actor for which `belongs(entity, id)`: a shard this node no longer
        serves, whose next owner may write. A busy one is forgotten after its turn (its
        journal refuses the write). Returns how many were dropped now."""
        gone = [key for key, actor in self._actors.items() if belongs(*key) and not actor.running]
        for key in gone:
            del self._actors[key]
        for key, actor in self._actors.items():
            if belongs(*key):
                actor.loaded = False
        self._passivations += len(gone)
        return len(gone)

    def busy_where(self, belongs: Callable[[str, str], bool]) -> bool:
        """Whether an actor for which `belongs(entity, id)` is in a turn or has mail."""
        return any(a.running for key, a in self._actors.items() if belongs(*key))

    async def quiesce(self, belongs: Callable[[str, str], bool]) -> None:
        """Until no actor for which `belongs(entity, id)` is in a turn (a shard handed over
        waits for the answers on their way). New mail must be stopped first."""
        while self.busy_where(belongs):
            if self._drained is None:
                self._drained = anyio.Event()
            await self._drained.wait()

    def _evict(self, count: int) -> None:
        victims: list[tuple[str, str]] = []
        for key, actor in self._actors.items():  # least recently used first
            if not actor.running and not actor.mailbox:
                victims.append(key)
                if len(victims) >= count:
                    break
        for key in victims:
            del self._actors[key]
        self._passivations += len(victims)

    def statistics(self) -> RuntimeStatistics:
        return RuntimeStatistics(
            active=len(self._actors),
            busy=self._busy,
            queued=sum(len(a.mailbox or ()) for a in self._actors.values() if a.running),
            activations=self._activations,
            passivations=self._passivations,
            commands=self._turns.commands,
            crashes=self._turns.crashes,
        )

    # ---- one actor at a time -----------------------------------------------------------

    async def _worker(self) -> None:
        """Runs ready actors, one at a time, then waits to be woken for the next.

        Workers outlive the actors they run: starting a task in a task group costs
        more than a command's whole turn, and most commands find their actor idle.
        Every actor made ready wakes an idle worker or starts one, so no ready actor
        waits behind another's turn.
        """
        ready = self._ready
        while True:
            while ready:
                await self._run_actor(ready.popleft())
            if len(self._idle) >= _MAX_IDLE_WORKERS:
                return
            wake = asyncio.get_running_loop().create_future()
            self._idle.append(wake)
            await wake

    async def _run_actor(self, actor: Actor) -> None:
        mailbox = actor.mailbox
        assert mailbox is not None  # made ready by _enqueue, which creates it
        journal = self._journal
        try:
            while mailbox:
                if journal is not None and not journal.admits(actor.entity.name, actor.entity_id):
                    await self._refuse_all(actor)
                    return
                if not actor.loaded and not await self._activate(actor):
                    return
                if mailbox[0].command is None:
                    query = mailbox.popleft()
                    if query.caller is not None and self._policy is not None:
                        refusal = await self._query_refusal(actor, query.caller)
                        if refusal is not None:
                            await answer(query, error_answer(refusal))
                            continue
                    state = state_reply(
                        actor.entity.name, actor.entity_id, actor.version, actor.state
                    )
                    await answer(query, ok_answer(state))
                    continue
                await self._turns.run(actor, take_commands(mailbox, self._settings.max_turn))
        finally:
            actor.running = False
            if not mailbox:
                actor.mailbox = None
            actor.last_used = self._clock()
            self._busy -= 1
            if self._drained is not None:  # only while someone waits: not on the hot path
                self._drained.set()
                self._drained = None
        if actor.loaded and self._observers:
            self._tell_observers(actor)

    async def _query_refusal(self, actor: Actor, caller: Caller) -> KayaError | None:
        entity = actor.entity
        assert self._policy is not None
        try:
            decision = self._policy.query(caller, entity.name, actor.state)
            if isinstance(decision, ActsOn):
                if self._lookup is None:
                    return Unavailable("no way to ask about another entity here")
                decision = await self._lookup(caller, decision.entity, decision.id)
        except KayaError as exc:
            return exc
        except Exception:
            log.exception("the policy failed on a query of %s/%s", entity.name, actor.entity_id)
            return Internal("the authorization policy failed")
        if decision is True:
            return None
        return Forbidden(f"the caller may not read {entity.name}/{actor.entity_id}")

    def _tell_observers(self, actor: Actor) -> None:
        for observer in tuple(self._observers):  # one may unregister while it is told
            try:
                observer(actor.entity, actor.entity_id, actor.state, actor.traceparent)
            except Exception:
                log.exception("a turn observer failed on %s/%s", actor.entity.name, actor.entity_id)

    async def _refuse_all(self, actor: Actor) -> None:
        """Answer everything queued for an actor of a shard this node does not serve."""
        entity = actor.entity
        error = error_answer(
            Unavailable(f"{entity.name}/{actor.entity_id}: its shard is not served here now; retry")
        )
        while actor.mailbox:
            await answer(actor.mailbox.popleft(), error)
        actor.loaded = False
        self._actors.pop((entity.name, actor.entity_id), None)

    async def _activate(self, actor: Actor) -> bool:
        """Rebuild state from snapshot + events. On failure, answer everything queued."""
        entity = actor.entity
        try:
            if self._journal is not None:
                await self._journal.settled()
            state, version = entity.initial, 0
            sealer = self._sealer
            snapshot = await self._store.load_snapshot(entity.name, actor.entity_id)
            if snapshot is not None and snapshot.schema == entity.state_schema:
                data = snapshot.state
                if sealer is not None and is_sealed(data):
                    data = await sealer.open(entity.name, actor.entity_id, data)
                try:
                    state, version = entity.decode_state(data), snapshot.version
                except msgspec.DecodeError:
                    log.warning(
                        "ignoring unreadable snapshot of %s/%s", entity.name, actor.entity_id
                    )
            for stored in await self._store.read_stream(entity.name, actor.entity_id, version):
                data = stored.data
                if sealer is not None and is_sealed(data):
                    data = await sealer.open(entity.name, actor.entity_id, data)
                event = entity.decode_event(stored.type, stored.schema_version, data)
                state = entity.evolve(state, event)
                version = stored.version
        except Exception:
            log.exception("activation of %s/%s failed", entity.name, actor.entity_id)
            # the detail (an exception's text, maybe the store's) is in the log, not on the wire
            error = error_answer(
                Unavailable(f"cannot load {entity.name}/{actor.entity_id} now; retry later")
            )
            while actor.mailbox:
                await answer(actor.mailbox.popleft(), error)
            self._actors.pop((entity.name, actor.entity_id), None)
            return False
        actor.state, actor.version, actor.loaded = state, version, True
        actor.log_seq = -1  # read from the store at its first write
        self._activations += 1
        return True


__all__ = [
    "ActorRuntime",
    "Internal",
    "KayaError",
    "ReplyFn",
    "RuntimeSettings",
    "RuntimeStatistics",
    "TurnObserver",
    "request_hash",
    "trace_id",
]
