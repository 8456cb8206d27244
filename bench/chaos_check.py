"""The chaos runner's independent checker: what the wire said, against what the store holds.

    python -m bench.chaos_check RECORDING.json STORE.db    # re-check a run the runner kept

It imports nothing of Kaya. Its inputs are a *recording* made on the wire by the runner
(`bench/chaos.py`) and the node's store file, opened read-only with sqlite3 once the
node has stopped. The recording is JSON:

    commands   every command a client sent: command_id, entity, id, body, status
               ("ok", "error": a final failure reply, "unresolved": no final reply before
               the deadline), reply (the final reply, byte for byte as decoded), attempts
    states     {"account": {id: reply}, "transfer": {id: reply}}: kaya.qry.<entity>.<id>
               replies, taken once every transfer had ended (or the wait gave up)
    stream     every message of KAYA_EVENTS read with a plain ordered consumer: seq,
               subject, headers, data
    stream_info  {"messages", "first_seq", "last_seq"} when it was read
    view       the kaya.view.analytics reply
    replay     {"exit_code", "output"} of `kaya replay analytics --dry-run`, node stopped

Checks (each violation is reported with its evidence: the reply, the rows, the messages):

    lost             every ok reply's events are in the store, at the versions it gave
    applied twice    a command id's events appear once per entity: one contiguous run of
                     versions, not a repetition, nothing beyond what its reply gave
    refused applied  a command whose final reply was an error left no event
    state            every queried state is what the entity's stored events fold to
    money            sum(balances) + money held by unfinished transfers == acknowledged
                     deposits - acknowledged withdrawals; each ended transfer moved its
                     amount once (completed) or gave it all back (failed) and holds
                     nothing; no negative balance; once every transfer has ended, no
                     account lists an outgoing transfer and each currency's balances are
                     its own deposits - withdrawals (a transfer never crosses currencies)
    transfers ended  every transfer is completed or failed
    stream           KAYA_EVENTS == the store: same event ids, no duplicate, no gap (each
                     run of consecutive stored events missing from the stream is one
                     violation), each entity's messages in Kaya-Entity-Version order,
                     headers and body equal
    read model       kaya.view.analytics == the figures computed from the store up to its
                     position, the position is the store's last, and the replay says identical

Money held by a transfer: the transfer's state is read tolerantly, because its shape was
being changed (examples/bank/transfer.py, 2/6: `held` on the transfer, `outgoing` on the
source account). If the state carries one of HELD_FIELDS (an integer), that is the money
it holds; otherwise a pending transfer whose step is "credit" or "refund" holds its
amount (the debit landed, the money is in neither account). The account's `outgoing` is
not added (from the credit to the settlement the money is in the target's balance and
still listed there). Both shapes of a transfer's steps in the store are folded: plain
`Withdrawn` / `Deposited` (before 2/6) and `TransferDebited` / `TransferCredited` /
`TransferRefunded` / `TransferSettled`. The sum is exact only once every transfer has
ended, which the runner waits for; a transfer that ended holding money shows in the
per-transfer check with what the store says its steps did.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKS = (
    "lost",
    "applied twice",
    "refused applied",
    "state",
    "money",
    "transfers ended",
    "stream",
    "read model",
)
ENDED = frozenset({"completed", "failed"})
HELD_FIELDS = ("held", "amount_held", "held_amount", "holding", "in_flight")
"""State fields a transfer may report the money it holds in (the first integer one found)."""
MAX_PER_CHECK = 25
"""Violations kept with their evidence per check; beyond that only counted."""
STEP_PREFIX = "transfer/"
"""Saga steps' command ids are transfer/<id>/<step>: not a client's command."""


@dataclass(frozen=True)
class Row:
    """One row of the store's `events` table, its data decoded."""

    position: int
    event_id: str
    entity: str
    entity_id: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    command_id: str | None

    def brief(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "entity": self.entity,
            "id": self.entity_id,
            "version": self.version,
            "type": self.type,
            "data": self.data,
            "command_id": self.command_id,
            "event_id": self.event_id,
        }


@dataclass(frozen=True)
class Violation:
    check: str
    message: str
    evidence: Any


@dataclass
class Report:
    """Violations (at most MAX_PER_CHECK kept per check), counts per check, figures."""

    violations: list[Violation] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, check: str, message: str, evidence: Any) -> None:
        assert check in CHECKS, check
        self.counts[check] += 1
        if self.counts[check] <= MAX_PER_CHECK:
            self.violations.append(Violation(check, message, evidence))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "violations_total": self.total,
            "violations_per_check": {name: self.counts[name] for name in CHECKS},
            "violations": [
                {"check": v.check, "message": v.message, "evidence": v.evidence}
                for v in self.violations
            ],
            "figures": self.figures,
            "notes": self.notes,
        }

    def render(self, limit: int = 40) -> str:
        lines = [f"{self.total} violations"]
        for name in CHECKS:
            if self.counts[name]:
                lines.append(f"  {name}: {self.counts[name]}")
        for violation in self.violations[:limit]:
            evidence = json.dumps(violation.evidence, sort_keys=True, default=str)
            if len(evidence) > 600:
                evidence = evidence[:600] + "..."
            lines.append(f"- [{violation.check}] {violation.message}\n    evidence: {evidence}")
        if len(self.violations) > limit:
            lines.append(f"  ... {len(self.violations) - limit} more in the JSON")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---- the store ---------------------------------------------------------------------------


def read_store(path: Path) -> list[Row]:
    """Every event in store order, from a read-only connection (the node has stopped)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT position, event_id, entity, entity_id, version, type, schema_version,"
            " data, command_id FROM events ORDER BY position"
        ).fetchall()
    finally:
        db.close()
    return [
        Row(int(p), str(e), str(n), str(i), int(v), str(t), int(s), _decode(d), c)
        for p, e, n, i, v, t, s, d, c in rows
    ]


def _decode(data: Any) -> dict[str, Any]:
    value = json.loads(data)
    return value if isinstance(value, dict) else {"value": value}


@dataclass
class Account:
    """An account folded from its stored events (the bank's rules, restated here).

    Both shapes of a transfer's steps are folded: before 2/6 they were plain `Withdrawn`
    and `Deposited`; since, `TransferDebited` (balance -> outgoing[target]),
    `TransferCredited`, `TransferRefunded` (outgoing[target] -> balance) and
    `TransferSettled` (outgoing[target] ends)."""

    currency: str = ""
    balance: int = 0
    status: str = "new"
    version: int = 0
    outgoing: dict[str, int] = field(default_factory=dict)

    def hold(self, target: str, change: int) -> None:
        left = self.outgoing.get(target, 0) + change
        if left:
            self.outgoing[target] = left
        else:
            self.outgoing.pop(target, None)


def fold_account(rows: list[Row]) -> Account:
    account = Account()
    for row in rows:
        account.version = row.version
        amount = int(row.data.get("amount") or 0)
        target = str(row.data.get("target", ""))
        match row.type:
            case "Opened":
                account.currency = str(row.data.get("currency", ""))
                account.status = "open"
            case "Deposited" | "TransferCredited":
                account.balance += amount
            case "Withdrawn":
                account.balance -= amount
            case "Closed":
                account.status = "closed"
            case "TransferDebited":
                account.balance -= amount
                account.hold(target, amount)
            case "TransferRefunded":
                account.balance += amount
                account.hold(target, -amount)
            case "TransferSettled":
                account.hold(target, -amount)
    return account


# ---- the checks --------------------------------------------------------------------------


@dataclass
class Inputs:
    """The recording and the store, indexed the ways the checks read them."""

    commands: list[dict[str, Any]]
    states: dict[str, dict[str, Any]]
    rows: list[Row]
    by_stream: dict[tuple[str, str], list[Row]]
    by_command: dict[tuple[str, str, str], list[Row]]

    @classmethod
    def build(cls, recording: dict[str, Any], rows: list[Row]) -> Inputs:
        by_stream: dict[tuple[str, str], list[Row]] = defaultdict(list)
        by_command: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
        for row in rows:
            by_stream[(row.entity, row.entity_id)].append(row)
            if row.command_id is not None:
                by_command[(row.entity, row.entity_id, row.command_id)].append(row)
        for stream in by_stream.values():
            stream.sort(key=lambda r: r.version)
        for group in by_command.values():
            group.sort(key=lambda r: r.version)
        states = recording.get("states") or {}
        return cls(
            commands=list(recording.get("commands") or []),
            states={kind: dict(replies or {}) for kind, replies in states.items()},
            rows=rows,
            by_stream=dict(by_stream),
            by_command=dict(by_command),
        )

    def acknowledged(self) -> list[dict[str, Any]]:
        return [c for c in self.commands if c.get("status") == "ok"]

    def applied(self, command: dict[str, Any]) -> list[Row]:
        key = (command["entity"], command["id"], command["command_id"])
        return self.by_command.get(key, [])


def _acked_versions(command: dict[str, Any]) -> list[int]:
    """The versions an ok reply says its events were stored at."""
    reply = command.get("reply") or {}
    events = reply.get("events") or []
    version = int(reply.get("version", 0))
    return list(range(version - len(events) + 1, version + 1))


def check_lost(inputs: Inputs, report: Report) -> None:
    for command in inputs.acknowledged():
        reply = command.get("reply") or {}
        entity, entity_id, command_id = command["entity"], command["id"], command["command_id"]
        if (reply.get("entity"), reply.get("id")) != (entity, entity_id):
            report.add("lost", f"{command_id}: the reply names another entity", command)
            continue
        stored = {r.version: r for r in inputs.by_stream.get((entity, entity_id), [])}
        events = reply.get("events") or []
        wrong = []
        for version, event in zip(_acked_versions(command), events, strict=True):
            row = stored.get(version)
            if (
                row is None
                or row.command_id != command_id
                or row.type != event.get("type")
                or row.data != event
            ):
                wrong.append({"version": version, "reply": event, "store": row and row.brief()})
        if wrong:
            first, last = _acked_versions(command)[0], reply.get("version")
            report.add(
                "lost",
                f"acknowledged {command_id} on {entity}.{entity_id}: its events are not in the"
                f" store at versions {first}..{last}",
                {"command": command, "at those versions": wrong},
            )


def _repeats(rows: list[Row]) -> bool:
    """True when the rows are k >= 2 copies of one shorter sequence of (type, data)."""
    items = [(r.type, json.dumps(r.data, sort_keys=True)) for r in rows]
    n = len(items)
    return any(n % k == 0 and items == items[: n // k] * k for k in range(2, n + 1))


def check_applied_twice(inputs: Inputs, report: Report) -> None:
    acked = {(c["entity"], c["id"], c["command_id"]): c for c in inputs.acknowledged()}
    for (entity, entity_id, command_id), rows in inputs.by_command.items():
        versions = [r.version for r in rows]
        contiguous = versions == list(range(versions[0], versions[0] + len(versions)))
        command = acked.get((entity, entity_id, command_id))
        extra = sorted(set(versions) - set(_acked_versions(command))) if command else []
        if contiguous and not extra and not _repeats(rows):
            continue
        why = (
            "beyond the versions its reply gave"
            if extra
            else "in separate appends"
            if not contiguous
            else "repeated"
        )
        report.add(
            "applied twice",
            f"{command_id} on {entity}.{entity_id}: {len(rows)} events at versions {versions},"
            f" {why}",
            {"events": [r.brief() for r in rows], "command": command},
        )


def check_refused_applied(inputs: Inputs, report: Report) -> None:
    for command in inputs.commands:
        if command.get("status") != "error":
            continue
        rows = inputs.applied(command)
        if rows:
            report.add(
                "refused applied",
                f"{command['command_id']} on {command['entity']}.{command['id']} was answered"
                f" {_code(command)} but its events are in the store",
                {"command": command, "events": [r.brief() for r in rows]},
            )


def _code(command: dict[str, Any]) -> str:
    reply = command.get("reply") or {}
    return str((reply.get("error") or {}).get("code", "?"))


def _state(reply: Any) -> dict[str, Any] | None:
    if isinstance(reply, dict) and reply.get("ok") and isinstance(reply.get("state"), dict):
        state: dict[str, Any] = reply["state"]
        return state
    return None


def check_state(inputs: Inputs, report: Report) -> None:
    for account_id, reply in sorted(inputs.states.get("account", {}).items()):
        state = _state(reply)
        folded = fold_account(inputs.by_stream.get(("account", account_id), []))
        if state is None:
            report.add("state", f"account {account_id}: no state reply", {"reply": reply})
            continue
        seen = {
            "version": reply.get("version"),
            "balance": state.get("balance"),
            "status": state.get("status"),
            "currency": state.get("currency"),
            "outgoing": state.get("outgoing") or {},
        }
        want = {
            "version": folded.version,
            "balance": folded.balance,
            "status": folded.status,
            "currency": folded.currency,
            "outgoing": folded.outgoing,
        }
        if seen != want:
            report.add(
                "state",
                f"account {account_id}: the node serves {seen}, its stored events fold to {want}",
                {"reply": reply},
            )
    for transfer_id, reply in sorted(inputs.states.get("transfer", {}).items()):
        state = _state(reply)
        rows = inputs.by_stream.get(("transfer", transfer_id), [])
        if state is None:
            report.add("state", f"transfer {transfer_id}: no state reply", {"reply": reply})
            continue
        status = "new" if not rows else "pending"
        for row in rows:
            status = {"Completed": "completed", "Failed": "failed"}.get(row.type, status)
        version = rows[-1].version if rows else 0
        if (reply.get("version"), state.get("status")) != (version, status):
            report.add(
                "state",
                f"transfer {transfer_id}: the node serves version {reply.get('version')}"
                f" status {state.get('status')}, the store has version {version} ({status})",
                {"reply": reply, "last events": [r.brief() for r in rows[-3:]]},
            )


def held_by(state: dict[str, Any]) -> int:
    """Money a transfer's state says it holds (see the module's docstring)."""
    for name in HELD_FIELDS:
        value = state.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if state.get("status") == "pending" and state.get("step") in ("credit", "refund"):
        return int(state.get("amount") or 0)
    return 0


def transfer_steps(inputs: Inputs) -> dict[str, dict[str, list[Row]]]:
    """What the store says each transfer's steps did to accounts: rows by transfer id and
    step, found by the steps' derived command ids (transfer/<id>/<step>)."""
    steps: dict[str, dict[str, list[Row]]] = defaultdict(dict)
    for (entity, _, command_id), rows in inputs.by_command.items():
        if entity != "account" or not command_id.startswith(STEP_PREFIX):
            continue
        parts = command_id.split("/")
        if len(parts) == 3:
            steps[parts[1]].setdefault(parts[2], []).extend(rows)
    return steps


def _moved(rows: list[Row]) -> int:
    return sum(int(r.data.get("amount") or 0) for r in rows)


def _step_brief(steps: dict[str, list[Row]]) -> dict[str, list[dict[str, Any]]]:
    return {
        name: [
            {"account": r.entity_id, "type": r.type, "amount": r.data.get("amount")} for r in rows
        ]
        for name, rows in steps.items()
    }


def check_money(inputs: Inputs, report: Report) -> None:
    currency_of = {
        key[1]: fold_account(rows).currency
        for key, rows in inputs.by_stream.items()
        if key[0] == "account"
    }
    deposited = withdrawn = 0
    per_currency: Counter[str] = Counter()
    in_doubt: list[dict[str, Any]] = []
    for command in inputs.commands:
        kind = (command.get("body") or {}).get("type")
        if command["entity"] != "account" or kind not in ("Deposit", "Withdraw"):
            continue
        if command.get("status") == "unresolved":
            if not inputs.applied(command):
                continue  # never applied: nothing to count
            in_doubt.append(command)
        elif command.get("status") != "ok":
            continue
        amount = int(command["body"]["amount"])
        if kind == "Deposit":
            deposited += amount
        else:
            withdrawn += amount
        per_currency[currency_of.get(command["id"], "?")] += (
            amount if kind == "Deposit" else -amount
        )

    balances: dict[str, int] = {}
    for account_id, reply in sorted(inputs.states.get("account", {}).items()):
        state = _state(reply)
        if state is None:
            continue
        balances[account_id] = int(state.get("balance") or 0)
        if balances[account_id] < 0:
            report.add("money", f"account {account_id} is below zero", {"reply": reply})

    transfers = {t: _state(r) for t, r in inputs.states.get("transfer", {}).items()}
    unfinished = {t: s for t, s in transfers.items() if s and s.get("status") not in ENDED}
    held = {t: held_by(s) for t, s in unfinished.items() if held_by(s)}
    if not unfinished:  # every transfer ended: nothing may still be listed as outgoing
        for account_id, reply in sorted(inputs.states.get("account", {}).items()):
            state = _state(reply)
            if state and state.get("outgoing"):
                report.add(
                    "money",
                    f"account {account_id} still lists outgoing transfers {state['outgoing']}"
                    " though every transfer has ended",
                    {"reply": reply},
                )

    # Per transfer: what its steps did to the accounts, from the store, against its end.
    steps_of = transfer_steps(inputs)
    leaks = []
    for transfer_id, state in sorted(transfers.items()):
        if state is None or state.get("status") not in ENDED:
            continue
        amount = int(state.get("amount") or 0)
        steps = steps_of.get(transfer_id, {})
        debit, credit, refund, settle = (
            _moved(steps.get(name, [])) for name in ("debit", "credit", "refund", "settle")
        )
        if state["status"] == "completed":
            right = (debit, credit, refund) == (amount, amount, 0) and settle in (0, amount)
            if any(r.type == "TransferDebited" for r in steps.get("debit", [])):
                right = right and settle == amount  # the source's outgoing was ended
        else:
            right = credit == 0 == settle and debit == refund and debit in (0, amount)
        kept = held_by(state)
        if right and not kept:
            continue
        leak = {
            "transfer": transfer_id,
            "state": state,
            "steps in the store": _step_brief(steps),
            "money not back in an account": debit - credit - refund,
        }
        leaks.append(leak)
        report.add(
            "money",
            f"transfer {transfer_id} ended {state['status']} ({state.get('reason') or 'ok'})"
            f" holding {kept}; its steps moved debit {debit}, credit {credit}, refund {refund},"
            f" settle {settle} of {amount}",
            leak,
        )

    total = sum(balances.values())
    expected = deposited - withdrawn
    held_total = sum(held.values())
    report.figures["money"] = {
        "sum of balances": total,
        "held by unfinished transfers": held_total,
        "acknowledged deposits": deposited,
        "acknowledged withdrawals": withdrawn,
        "in doubt, found applied": len(in_doubt),
        "accounts": len(balances),
    }
    if total + held_total != expected:
        report.add(
            "money",
            f"sum of balances {total} + held by unfinished transfers {held_total} !="
            f" acknowledged deposits {deposited} - withdrawals {withdrawn} = {expected}"
            f" (difference {total + held_total - expected})",
            {
                **report.figures["money"],
                "held": held,
                "in doubt, found applied": in_doubt,
                "transfers whose money is not back": leaks[:10],
            },
        )
    # Per currency: a transfer moves money within one currency (examples/bank/transfer.py:
    # a target in another currency refuses the credit), so once every transfer has ended
    # each currency's balances are its deposits - withdrawals.
    if unfinished:
        return
    by_currency: Counter[str] = Counter()
    for account_id, balance in balances.items():
        by_currency[currency_of.get(account_id, "?")] += balance
    for currency in sorted(set(by_currency) | set(per_currency)):
        if by_currency[currency] != per_currency[currency]:
            crossed = [
                t
                for t, s in transfers.items()
                if s
                and s.get("status") == "completed"
                and currency_of.get(s.get("source", "")) != currency_of.get(s.get("target", ""))
            ]
            report.add(
                "money",
                f"{currency}: balances {by_currency[currency]} != deposits - withdrawals"
                f" {per_currency[currency]} in {currency}",
                {"completed transfers between currencies": crossed[:20], "count": len(crossed)},
            )


def check_transfers_ended(inputs: Inputs, report: Report) -> None:
    started = {c["id"] for c in inputs.acknowledged() if c["entity"] == "transfer"}
    stored = {i for (e, i) in inputs.by_stream if e == "transfer"}
    states = inputs.states.get("transfer", {})
    statuses: Counter[str] = Counter()
    for transfer_id in sorted(started | stored):  # a refused Start made no transfer
        state = _state(states.get(transfer_id))
        status = state.get("status") if state else None
        statuses[str(status)] += 1
        if status in ENDED:
            continue
        rows = inputs.by_stream.get(("transfer", transfer_id), [])
        report.add(
            "transfers ended",
            f"transfer {transfer_id} has not ended (status {status})",
            {"reply": states.get(transfer_id), "last events": [r.brief() for r in rows[-3:]]},
        )
    report.figures["transfers"] = dict(statuses)


def check_stream(recording: dict[str, Any], inputs: Inputs, report: Report) -> None:
    messages = list(recording.get("stream") or [])
    info = recording.get("stream_info") or {}
    if info.get("messages") is not None and int(info["messages"]) != len(messages):
        report.add(
            "stream",
            f"read {len(messages)} messages of the {info['messages']} KAYA_EVENTS held",
            info,
        )
    by_id = {r.event_id: r for r in inputs.rows}
    seen: dict[str, list[int]] = defaultdict(list)
    per_subject: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for message in messages:
        headers = message.get("headers") or {}
        event_id = headers.get("Nats-Msg-Id", "")
        seen[event_id].append(message["seq"])
        try:
            version = int(headers.get("Kaya-Entity-Version", "-1"))
        except ValueError:
            version = -1
        per_subject[message["subject"]].append((message["seq"], version))
        row = by_id.get(event_id)
        if row is None:
            report.add("stream", f"message {message['seq']} is no event of the store", message)
            continue
        want = {
            "subject": f"kaya.evt.{row.entity}.{row.entity_id}",
            "Kaya-Event-Type": row.type,
            "Kaya-Schema-Version": str(row.schema_version),
            "Kaya-Entity-Version": str(row.version),
            "Kaya-Position": str(row.position),
            "data": row.data,
        }
        try:
            data: Any = json.loads(message.get("data") or "null")
        except ValueError:
            data = message.get("data")
        got = {
            "subject": message["subject"],
            **{k: headers.get(k) for k in want if k.startswith("Kaya-")},
            "data": data,
        }
        if got != want:
            report.add(
                "stream",
                f"message {message['seq']} differs from event {event_id} in the store",
                {"message": got, "store": want},
            )
    for event_id, seqs in seen.items():
        if len(seqs) > 1:
            row = by_id.get(event_id)
            report.add(
                "stream",
                f"event {event_id} is in KAYA_EVENTS {len(seqs)} times (seq {seqs})",
                {"store": row and row.brief()},
            )
    gap: list[Row] = []  # consecutive store events missing from the stream: one gap
    for row in [*inputs.rows, None]:
        if row is not None and row.event_id not in seen:
            gap.append(row)
            continue
        if gap:
            first, last = gap[0], gap[-1]
            where = f"position {first.position}" + (f"..{last.position}" if len(gap) > 1 else "")
            report.add(
                "stream",
                f"{len(gap)} stored events ({where}) are missing from KAYA_EVENTS",
                {"first": first.brief(), "last": last.brief(), "missing": len(gap)},
            )
            gap = []
    for subject, items in per_subject.items():
        versions = [v for _, v in items]
        if versions != list(range(1, len(versions) + 1)):
            at = next(
                (i for i, v in enumerate(versions) if v != i + 1),
                len(versions),
            )
            report.add(
                "stream",
                f"{subject}: Kaya-Entity-Version in stream order is not 1..{len(versions)}"
                f" (first break at the {at + 1}th message)",
                {"seq, version around the break": items[max(0, at - 3) : at + 3]},
            )
    missing = sum(1 for r in inputs.rows if r.event_id not in seen)
    report.figures["stream"] = {
        "messages": len(messages),
        "store events": len(inputs.rows),
        "store events missing": missing,
    }


ANALYTICS_FIELDS = (
    "balance",
    "deposited",
    "withdrawn",
    "deposits",
    "withdrawals",
    "accounts_opened",
    "accounts_closed",
)


def analytics_from_store(rows: list[Row], position: int) -> dict[str, dict[str, int]]:
    """The analytics figures per currency, computed from account events up to `position`
    (examples/bank/analytics.py's docstring: deposits and withdrawals are money in and out
    of the bank; a transfer's debit, credit and refund move only `balance`)."""
    currency_of: dict[str, str] = {}
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        if row.entity != "account" or row.position > position:
            continue
        if row.type == "Opened":
            currency_of[row.entity_id] = str(row.data.get("currency"))
        currency = currency_of.get(row.entity_id)
        if currency is None:
            continue
        figures = out.setdefault(currency, dict.fromkeys(ANALYTICS_FIELDS, 0))
        amount = int(row.data.get("amount") or 0)
        match row.type:
            case "Opened":
                figures["accounts_opened"] += 1
            case "Deposited":
                figures["balance"] += amount
                figures["deposited"] += amount
                figures["deposits"] += 1
            case "Withdrawn":
                figures["balance"] -= amount
                figures["withdrawn"] += amount
                figures["withdrawals"] += 1
            case "Closed":
                figures["accounts_closed"] += 1
            case "TransferDebited":
                figures["balance"] -= amount
            case "TransferCredited" | "TransferRefunded":
                figures["balance"] += amount
    return out


def check_read_model(recording: dict[str, Any], inputs: Inputs, report: Report) -> None:
    view = recording.get("view")
    last = inputs.rows[-1].position if inputs.rows else 0
    if not isinstance(view, dict) or not view.get("ok"):
        report.add("read model", "no kaya.view.analytics reply", {"reply": view})
    else:
        position = int(view.get("position") or 0)
        if position != last:
            report.add(
                "read model",
                f"analytics is at position {position}, the store at {last}",
                {"view": view},
            )
        want = analytics_from_store(inputs.rows, position)
        got = view.get("currencies") or {}
        for currency in sorted(set(want) | set(got)):
            served = {k: (got.get(currency) or {}).get(k, 0) for k in ANALYTICS_FIELDS}
            computed = want.get(currency, dict.fromkeys(ANALYTICS_FIELDS, 0))
            if served != computed:
                report.add(
                    "read model",
                    f"analytics {currency} differs from the store's events up to position"
                    f" {position}",
                    {"served": served, "computed from the store": computed},
                )
    replay = recording.get("replay")
    if replay is not None:
        output = str(replay.get("output", ""))
        if replay.get("exit_code") != 0 or "identical to the live read model" not in output:
            report.add(
                "read model", "kaya replay analytics --dry-run does not say identical", replay
            )


def check(recording: dict[str, Any], store_path: Path) -> Report:
    """Every check, over a recording and the store file; see the module's docstring."""
    report = Report()
    rows = read_store(store_path)
    inputs = Inputs.build(recording, rows)
    check_lost(inputs, report)
    check_applied_twice(inputs, report)
    check_refused_applied(inputs, report)
    check_state(inputs, report)
    check_money(inputs, report)
    check_transfers_ended(inputs, report)
    check_stream(recording, inputs, report)
    check_read_model(recording, inputs, report)
    statuses = Counter(str(c.get("status")) for c in inputs.commands)
    report.figures["commands"] = dict(statuses)
    report.figures["store events"] = len(rows)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos_check", description=__doc__)
    parser.add_argument("recording", type=Path, help="recording.json a chaos run kept")
    parser.add_argument("store", type=Path, help="the node's kaya.db (the node stopped)")
    args = parser.parse_args(argv)
    report = check(json.loads(args.recording.read_text()), args.store)
    print(report.render())
    return 1 if report.total else 0


if __name__ == "__main__":
    sys.exit(main())
