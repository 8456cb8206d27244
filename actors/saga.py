"""Sagas (orchestration): an event-sourced entity whose state says what to do next.

A saga is an `Entity` like any other (its own stream, decider, mailbox) plus one
more pure function, `next_step(state)`: the command it needs another entity to
take now, or None. When a saga's turns are done, the `SagaDriver` (a turn observer
registered with the runtime) carries the step out:

    saga state --next_step--> Step(target, command)      (pure)
    driver: ask target with command id "<saga>/<id>/<step>" (idempotent: at most once)
    driver: reply --step_result--> StepDone command      (pure; None: transient, retry)
    saga decides StepDone -> events -> new state --next_step--> ...

Because the step's command id is derived from the saga id and the step name, a
step retried after a crash or a timeout is applied at most once by its target,
and the target's remembered reply tells the saga what really happened. A step
with a `timeout` gets a deadline stored beside the saga: the target refuses the
command (`timeout`, remembered like any reply) if it reaches it too late, so
"it timed out" is a definite answer, never a guess that might still come true.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from kaya.actors.entity import Command, Entity
from kaya.actors.errors import KayaError
from kaya.actors.registry import Registry
from kaya.actors.retry import Backoff
from kaya.actors.wire import Answer, AnyReply, decode_reply
from kaya.store import EventStore
from kaya.store.sagas import ensure_saga_tables, forget_deadline, step_deadline, unfinished

if TYPE_CHECKING:
    from kaya.actors.runtime import ActorRuntime

log = logging.getLogger("kaya.sagas")

AskFn = Callable[..., Awaitable[bytes]]
"""How a step reaches its target: `ask(entity, id, command, *, command_id, deadline,
traceparent) -> reply body`. In-process by default; in a cluster, over NATS to whichever
node owns the target's shard. Raises KayaError when it cannot tell (retried)."""

StepObserver = Callable[[str, str, str, str | None], AbstractContextManager[str | None]]
"""Wraps one saga step (saga, id, step, traceparent) and yields the traceparent its
commands carry: how the app layer adds a tracing span without actors/ knowing of it."""

TRANSIENT = frozenset({"overloaded", "unavailable", "internal"})
"""Reply codes that say nothing about the step: try it again (same command id)."""


class Step(msgspec.Struct, frozen=True):
    """A command the saga needs another entity to take now; returned by `next_step`.

    `name` is unique within one saga instance: the runtime sends the command with the
    command id `<saga>/<id>/<name>`, so however often it is retried (crash, timeout,
    restart) the target applies it at most once. With `timeout`, the target refuses it
    (`timeout`, remembered) if it arrives later than that many seconds after first sent.
    """

    name: str
    entity: str
    entity_id: str
    command: Command
    timeout: float | None = None


class StepDone(Command, frozen=True):
    """Fed back to the saga with the outcome of a step. Never accepted from the wire."""

    step: str
    ok: bool
    code: str = ""
    reason: str = ""


class Saga(Entity[Any, Any, Any]):
    """Base of orchestrating sagas: an entity whose state says what to do next.

    You implement what an entity has (`decide`, `evolve`, the types) plus
    `next_step(state) -> Step | None`, and decide the `StepDone` commands the runtime
    feeds back with each step's outcome. The runtime guarantees: each step is applied
    at most once by its target; a transient failure (`overloaded`, `unavailable`,
    `internal`) is retried with backoff, never reported; unfinished sagas (no event of
    `terminal_events` yet) resume when the node starts. Test one without NATS or SQLite
    with `kaya.run_saga`.
    """

    terminal_events: ClassVar[tuple[str, ...]] = ()

    def next_step(self, state: Any) -> Step | None:
        raise NotImplementedError

    def step_result(self, step: Step, reply: AnyReply) -> StepDone | None:
        """Turn a reply into StepDone; None for a transient failure (the step is retried)."""
        if reply.ok:
            return StepDone(step=step.name, ok=True)
        error = reply.error
        code = error.code if error else "internal"
        if code in TRANSIENT:
            return None
        return StepDone(step=step.name, ok=False, code=code, reason=error.message if error else "")

    def step_command_id(self, entity_id: str, step: Step) -> str:
        return f"{self.name}/{entity_id}/{step.name}"


class SagaDriver:
    """Carries out the steps sagas ask for, and resumes unfinished sagas on start."""

    def __init__(
        self,
        runtime: ActorRuntime,
        store: EventStore,
        registry: Registry,
        *,
        backoff: Backoff | None = None,
        observe_step: StepObserver | None = None,
        ask: AskFn | None = None,
        admits: Callable[[str, str], bool] | None = None,
        resume_on_start: bool = True,
    ) -> None:
        """`backoff` spaces the retries of a step (and of reporting its outcome).

        In a cluster, `ask` carries steps to other nodes, `admits(saga, id)` says whether
        this node still serves a saga (a step of a saga whose shard moved away is left to
        the new owner, which resumes it), and sagas resume per shard as shards arrive
        (`resume`) instead of all at start."""
        self._observe_step = observe_step
        self._ask = ask
        self._admits = admits
        self._resume_on_start = resume_on_start
        self._runtime = runtime
        self._store = store
        self._registry = registry
        # waits below 0.1 s, 0.2 s, 0.4 s, ... 2 s: a busy target gets room, a saga no stall
        self._backoff = backoff or Backoff(initial=0.1, cap=2.0)
        self._running: set[tuple[str, str, str]] = set()
        self._tg: TaskGroup | None = None
        self.steps_done = 0
        self.retries = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await ensure_saga_tables(self._store)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            unobserve = self._runtime.observe_turns(self._after_turns)
            try:
                if self._resume_on_start:
                    await self.resume()
                task_status.started()
                await anyio.sleep_forever()
            finally:
                unobserve()
                self._tg = None

    async def resume(self, belongs: Callable[[str, str], bool] | None = None) -> int:
        """Wake every unfinished saga (for which `belongs(saga, id)`, if given)."""
        resumed = 0
        for entity in self._registry:
            if isinstance(entity, Saga):
                for saga_id in await unfinished(self._store, entity.name, entity.terminal_events):
                    if belongs is None or belongs(entity.name, saga_id):
                        self._wake(entity, saga_id)
                        resumed += 1
        if resumed:
            log.info("resuming %d unfinished sagas", resumed)
        return resumed

    def _serves(self, saga: Saga, saga_id: str) -> bool:
        return self._admits is None or self._admits(saga.name, saga_id)

    def _wake(self, saga: Saga, saga_id: str) -> None:
        """Activate the saga: when its (empty) turn ends, `_after_turns` looks at its state."""

        async def ignore(_: Answer) -> None:
            return None

        if not self._serves(saga, saga_id):
            return

        with contextlib.suppress(KayaError):  # a full mailbox: busy, it will look anyway
            self._runtime.query(saga, saga_id, ignore)

    def _after_turns(
        self, entity: Entity[Any, Any, Any], entity_id: str, state: Any, trace: str | None
    ) -> None:
        if not isinstance(entity, Saga) or self._tg is None:
            return
        step = entity.next_step(state)
        if step is None:
            return
        key = (entity.name, entity_id, step.name)
        if key not in self._running:
            self._running.add(key)
            self._tg.start_soon(self._run_step, entity, entity_id, step, key, trace)

    async def _run_step(
        self,
        saga: Saga,
        saga_id: str,
        step: Step,
        key: tuple[str, str, str],
        trace: str | None,
    ) -> None:
        """One step: the same trace as the command that led to it, so a transfer is one trace."""
        observed = (
            self._observe_step(saga.name, saga_id, step.name, trace)
            if self._observe_step is not None
            else contextlib.nullcontext(trace)
        )
        with observed as trace:
            try:
                command_id = saga.step_command_id(saga_id, step)
                deadline = None
                if step.timeout is not None:
                    deadline = await step_deadline(
                        self._store, saga.name, saga_id, step.name, time.time() + step.timeout
                    )
                target = self._registry.get(step.entity)
                ask = self._ask or self._runtime.ask
                attempt = 0
                while True:
                    done = None
                    if not self._serves(saga, saga_id):
                        return  # the saga's shard moved: its new owner resumes it
                    try:
                        reply = await ask(
                            target,
                            step.entity_id,
                            step.command,
                            command_id=command_id,
                            deadline=deadline,
                            traceparent=trace,
                        )
                        done = saga.step_result(step, decode_reply(reply))
                    except KayaError as exc:  # overloaded or unavailable right now
                        log.debug("saga %s/%s step %s: %s", saga.name, saga_id, step.name, exc)
                    if done is not None:
                        break
                    attempt += 1
                    self.retries += 1
                    await self._backoff.sleep(attempt)
                await self._report(saga, saga_id, done, f"{command_id}/done", trace)
                self.steps_done += 1
                if step.timeout is not None:
                    await forget_deadline(self._store, saga.name, saga_id, step.name)
            except Exception:
                log.exception(
                    "saga %s/%s step %s failed; it resumes on the next activation",
                    saga.name,
                    saga_id,
                    step.name,
                )
            finally:
                self._running.discard(key)
        self._wake(saga, saga_id)  # look again: the next step may have been skipped meanwhile

    async def _report(
        self, saga: Saga, saga_id: str, done: StepDone, command_id: str, trace: str | None
    ) -> None:
        attempt = 0
        while self._serves(saga, saga_id):
            try:
                reply = decode_reply(
                    await self._runtime.ask(
                        saga, saga_id, done, command_id=command_id, traceparent=trace
                    )
                )
                if reply.ok:
                    return
                if reply.error is None or reply.error.code not in TRANSIENT:
                    # StepDone is never refused by design: this is a bug, not a retry case
                    log.error(
                        "saga %s/%s refused its step outcome: %s", saga.name, saga_id, reply.error
                    )
                    return
            except KayaError:
                pass
            attempt += 1
            await self._backoff.sleep(attempt)
