"""Turns: how an actor decides the commands it took from its mailbox and commits them.

A busy actor takes every command waiting in its mailbox as one turn: it decides
them in order against its state, appends all their events in one store append
(which itself shares a transaction with other actors' appends) and replies to
each caller once the append is durable. Per-key order holds because one turn
runs at a time per actor; a hot key gets big batches instead of a long queue of
fsyncs.

A turn, in order: look up the replies already remembered for its command ids
(a repeat gets the first answer, never a second effect); decide and evolve each
new command, encoding its events (a handler that raises changes nothing); build
one Append of the events, the replies to remember and maybe a snapshot; commit
it; then answer every caller, with the failure instead if the commit failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import orjson

from kaya.actors.errors import (
    Conflict,
    Forbidden,
    Internal,
    KayaError,
    Rejected,
    Timeout,
    Unavailable,
)
from kaya.actors.ids import event_ids, trace_id
from kaya.actors.mailbox import Actor, Message, answer
from kaya.actors.masking import masked
from kaya.actors.policy import ActsOn, Caller, Lookup, Policy
from kaya.actors.sealing import Sealer, is_sealed
from kaya.actors.wire import (
    Answer,
    command_done,
    error_answer,
    ok_answer,
    remembered_answer,
)
from kaya.store import Append, EventStore, NewEvent, Reply, Snapshot, StoreError, VersionConflict

log = logging.getLogger("kaya.actors")

_encoder = msgspec.json.Encoder()


class Journal(Protocol):
    """Where a turn's events go first in a cluster (replicated durability): the shared log.

    `record` stores the events of one stream following `version`, or raises Unavailable
    (nothing may be assumed stored); `hashes` are the request hashes of the commands the
    events come from, by command id, so any node can remember their replies. The local
    store then gets only the replies and snapshots: it follows the log by itself.
    """

    async def record(
        self,
        entity: str,
        entity_id: str,
        version: int,
        events: Sequence[NewEvent],
        hashes: Mapping[str, bytes],
        last_seq: int,
    ) -> int:
        """... `last_seq` is the stream sequence of the entity's last event (0: none): the
        log refuses the write if the entity has anything newer. Returns the new one."""
        ...

    async def settled(self) -> None:
        """Until the local store holds every event this node wrote: before an activation."""

    def admits(self, entity: str, entity_id: str) -> bool:
        """Whether this node serves the entity's shard now."""


_Answer = tuple[Message, Answer, bool]
"""(message, reply, whether the reply holds only if the turn's append commits)"""


@dataclass(slots=True)
class _Decided:
    """What a turn decided, before it is committed."""

    state: Any
    version: int
    known: dict[str, Reply]  # command id -> its remembered reply, this turn's included
    events: list[NewEvent] = field(default_factory=list)
    remembered: list[Reply] = field(default_factory=list)
    answers: list[_Answer] = field(default_factory=list)
    decided: set[str] = field(default_factory=set)  # command ids first decided in this turn
    crashed: bool = False

    def settle(self, message: Message, reply: Answer, *, durable: bool) -> None:
        """Answer `message` with `reply`, and remember it under its command id if it has one."""
        self.answers.append((message, reply, durable))
        cid = message.command_id
        if cid is not None:
            kept = Reply(command_id=cid, request_hash=message.request_hash, body=reply.body)
            self.known[cid] = kept
            self.remembered.append(kept)


class Turns:
    """Runs actors' turns against one store; counts the commands and the handler crashes."""

    def __init__(
        self,
        store: EventStore,
        *,
        snapshot_every: int,
        journal: Journal | None = None,
        sealer: Sealer | None = None,
        policy: Policy | None = None,
        lookup: Lookup | None = None,
    ) -> None:
        """`sealer`: with security on, what seals the sensitive fields of everything a
        turn stores (its events, remembered replies and snapshots) before it leaves.
        `policy`: with JWT on, the app's; asked for every command that has a caller, with
        the state it is decided against; `lookup` settles its `ActsOn` answers."""
        self._store = store
        self._journal = journal
        self._sealer = sealer
        self._policy = policy
        self._lookup = lookup
        self._snapshot_every = snapshot_every
        self.commands = 0
        self.crashes = 0

    async def run(self, actor: Actor, turn: Sequence[Message]) -> None:
        """Decide `turn` against the actor's state, commit it, then answer every message."""
        entity, entity_id = actor.entity, actor.entity_id
        stages = self._store.stages
        started = time.perf_counter()
        for message in turn:
            stages.observe("mailbox", started - message.enqueued)
        if self._policy is not None:
            turn = await self._settle_acts_on(actor, turn)
            if not turn:
                return
        command_ids = {m.command_id for m in turn if m.command_id is not None}
        try:
            known = await self._store.find_replies(entity.name, entity_id, command_ids)
        except StoreError as exc:
            log.warning("reading the replies of %s/%s failed: %s", entity.name, entity_id, exc)
            error = error_answer(Unavailable("the store cannot be read now; retry later"))
            for message in turn:
                await answer(message, error)
            return
        sealer = self._sealer
        if sealer is not None and known:  # a repeat's first reply, as it was sent
            for cid, kept in known.items():
                if is_sealed(kept.body):
                    body = await sealer.open(entity.name, entity_id, kept.body)
                    known[cid] = Reply(kept.command_id, kept.request_hash, body)
        decided = self._decide(actor, turn, known)
        answers = decided.answers
        now = time.perf_counter()
        stages.observe("decide", now - started, len(turn))
        if decided.events or decided.remembered:
            sealed = True
            if sealer is not None:
                sealed = await self._seal(actor, decided, sealer)
                now, before = time.perf_counter(), now
                stages.observe("seal", now - before, len(turn))
            if not sealed:
                failure = error_answer(Unavailable("the entity's key cannot be read now; retry"))
                answers = _failed(decided.answers, failure)
            else:
                answers = await self._commit(actor, decided)
                now = time.perf_counter()
        if decided.crashed:
            actor.loaded = False  # rebuilt from the store before its next message
        for message, reply, _ in answers:
            await answer(message, reply)
            stages.observe("reply", time.perf_counter() - now)

    def _decide(self, actor: Actor, turn: Sequence[Message], known: dict[str, Reply]) -> _Decided:
        entity, entity_id = actor.entity, actor.entity_id
        out = _Decided(state=actor.state, version=actor.version, known=known)
        for message in turn:
            self.commands += 1
            cid = message.command_id
            if message.caller is not None and self._policy is not None:
                # before a repeat is answered: a reply goes only to who may see it
                refusal = self._refusal(entity, entity_id, out.state, message, message.caller)
                if refusal is not None:
                    out.answers.append((message, error_answer(refusal), False))
                    continue
            if cid is not None and cid in known:
                prior = known[cid]
                # a repeat within this turn is only as good as this turn's commit
                pending = cid in out.decided
                if prior.request_hash == message.request_hash:
                    out.answers.append((message, remembered_answer(prior.body), pending))
                else:
                    out.answers.append((message, _reused_id(cid), False))
                continue
            if cid is not None:
                out.decided.add(cid)
            if message.traceparent is not None:
                actor.traceparent = message.traceparent
            if message.deadline is not None and time.time() > message.deadline:
                late = Timeout("the command reached the entity after its deadline")
                # a definite answer: a later repeat must not apply it
                out.settle(message, error_answer(late), durable=cid is not None)
                continue
            try:
                events = list(entity.decide(out.state, message.command))
                next_state = out.state
                for event in events:
                    next_state = entity.evolve(next_state, event)
                encoded = [entity.encode_event(event) for event in events]  # validated
            except Rejected as exc:
                out.settle(message, error_answer(exc), durable=cid is not None)
                continue
            except Exception:
                out.crashed = True
                self.crashes += 1
                log.exception(
                    "handler crashed on %s for %s/%s",
                    type(message.command).__name__,
                    entity.name,
                    entity_id,
                    extra={
                        "entity": entity.name,
                        "id": entity_id,
                        "command": masked(message.command),
                        "command_id": cid,
                        "trace_id": trace_id(message.traceparent),
                    },
                )
                failed = error_answer(Internal("the handler failed; nothing changed"))
                out.answers.append((message, failed, False))
                continue
            out.state = next_state
            out.version += len(events)
            for event, data in zip(events, encoded, strict=True):
                out.events.append(
                    NewEvent(
                        event_id=event_ids.next(),
                        type=type(event).__name__,
                        schema_version=event.schema_version,
                        data=data,
                        command_id=cid,
                        traceparent=message.traceparent,
                    )
                )
            done = command_done(entity.name, entity_id, out.version, events)
            out.settle(message, ok_answer(done), durable=True)
        return out

    async def _settle_acts_on(self, actor: Actor, turn: Sequence[Message]) -> list[Message]:
        """Settle the policy's `ActsOn` answers (they need another entity: I/O) before the
        turn decides; the messages left to decide. One that cannot be settled now is
        answered `unavailable` here."""
        policy, lookup = self._policy, self._lookup
        assert policy is not None
        left: list[Message] = []
        for message in turn:
            caller = message.caller
            if caller is not None and message.command is not None:
                try:
                    decision = policy.command(
                        caller, actor.entity.name, actor.state, message.command
                    )
                except Exception:
                    decision = False  # _refusal logs it when it is asked again
                if isinstance(decision, ActsOn):
                    try:
                        if lookup is None:
                            raise Unavailable("no way to ask about another entity here")
                        message.allowed = await lookup(caller, decision.entity, decision.id)
                    except KayaError as exc:
                        await answer(message, error_answer(exc))
                        continue
            left.append(message)
        return left

    def _refusal(
        self, entity: Any, entity_id: str, state: Any, message: Message, caller: Caller
    ) -> KayaError | None:
        """Forbidden (or Internal, if the policy itself failed) unless the policy allows."""
        assert self._policy is not None
        command = message.command
        try:
            decision = self._policy.command(caller, entity.name, state, command)
        except Exception:
            log.exception("the policy failed on %s for %s/%s", type(command).__name__,
                          entity.name, entity_id)  # fmt: skip
            return Internal("the authorization policy failed; nothing changed")
        allowed = message.allowed is True if isinstance(decision, ActsOn) else decision is True
        if allowed:
            return None
        return Forbidden(
            f"the caller may not send {type(command).__name__} to {entity.name}/{entity_id}"
        )

    async def _seal(self, actor: Actor, decided: _Decided, sealer: Sealer) -> bool:
        """Seal what the turn stores, in place (the answers keep the plaintext the caller
        sent); False if the entity's key cannot be had: then nothing is stored."""
        entity, entity_id = actor.entity, actor.entity_id
        try:
            sealed = False
            for i, event in enumerate(decided.events):
                fields = entity.sensitive(event.type)
                if fields:
                    data = await sealer.seal(entity.name, entity_id, fields, event.data)
                    decided.events[i] = msgspec.structs.replace(event, data=data)
                    sealed = True
            if sealed:
                _remember_sealed(decided)
        except Exception:
            log.exception("sealing the events of %s/%s failed", entity.name, entity_id)
            return False
        return True

    async def _commit(self, actor: Actor, decided: _Decided) -> list[_Answer]:
        """Append what the turn decided; the answers to send, failures swapped in if it failed."""
        entity = actor.entity
        snapshot = None
        every = self._snapshot_every
        if decided.events and every > 0 and decided.version // every != actor.version // every:
            state = _encoder.encode(decided.state)
            if self._sealer is not None and entity.state_sensitive:
                try:
                    state = await self._sealer.seal(
                        entity.name, actor.entity_id, entity.state_sensitive, state
                    )
                except Exception:  # no snapshot this time: the events are enough
                    log.exception("sealing a snapshot of %s/%s failed", entity.name,
                                  actor.entity_id)  # fmt: skip
                    state = b""
            if state:
                snapshot = Snapshot(
                    version=decided.version, state=state, schema=entity.state_schema
                )
        events = decided.events
        if self._journal is not None and events:
            hashes = {r.command_id: r.request_hash for r in decided.remembered}
            try:
                if actor.log_seq < 0:  # the position of the version it was built from
                    actor.log_seq = await self._store.position_of(
                        entity.name, actor.entity_id, actor.version
                    )
                actor.log_seq = await self._journal.record(
                    entity.name, actor.entity_id, actor.version, events, hashes, actor.log_seq
                )
            except (Unavailable, StoreError) as exc:
                actor.loaded = False  # the log decides what happened: rebuild from it
                actor.log_seq = -1
                reason = exc if isinstance(exc, Unavailable) else Unavailable(str(exc))
                return _failed(decided.answers, error_answer(reason))
            events = []  # in the log: the follower brings them into the store
        append = Append(
            entity=entity.name,
            entity_id=actor.entity_id,
            expected_version=actor.version,
            events=events,
            replies=decided.remembered,
            snapshot=snapshot,
        )
        try:
            await self._store.append(append)
        except VersionConflict as exc:
            actor.loaded = False  # someone else wrote: rebuild before the next turn
            return _failed(decided.answers, error_answer(Conflict(f"{exc}; retry")))
        except StoreError as exc:
            if self._journal is not None and decided.events:
                # the log holds the events: the command happened; only the local copy of
                # its replies is missing, and the follower writes those from the log too
                log.warning("remembering replies of %s/%s failed: %s", entity.name,
                            actor.entity_id, exc)  # fmt: skip
                actor.state, actor.version = decided.state, decided.version
                return decided.answers
            actor.loaded = False
            log.warning("appending to %s/%s failed: %s", entity.name, actor.entity_id, exc)
            failure = error_answer(Unavailable("the store cannot write now; retry later"))
            return _failed(decided.answers, failure)
        actor.state, actor.version = decided.state, decided.version
        return decided.answers


def _remember_sealed(decided: _Decided) -> None:
    """The remembered replies with the turn's sealed events in place of their plaintext:
    a remembered reply is a stored copy like any other. A command's events are the turn's
    events under its command id, in order (as its reply was built from them)."""
    by_command: dict[str, list[NewEvent]] = {}
    for event in decided.events:
        if event.command_id is not None:
            by_command.setdefault(event.command_id, []).append(event)
    for i, kept in enumerate(decided.remembered):
        events = by_command.get(kept.command_id)
        if events and kept.body.startswith(b'{"ok":true'):
            body = orjson.loads(kept.body)
            body["events"] = [orjson.Fragment(event.data) for event in events]
            decided.remembered[i] = msgspec.structs.replace(kept, body=orjson.dumps(body))


def _failed(answers: list[_Answer], failure: Answer) -> list[_Answer]:
    """The answers of a turn whose append failed: each one that needed the commit fails."""
    return [(m, failure if durable else r, durable) for m, r, durable in answers]


def _reused_id(command_id: str) -> Answer:
    return error_answer(
        Conflict(f"Kaya-Command-Id {command_id!r} was already used with a different command")
    )
