"""The chaos runner (bench/chaos.py) in its quick mode, and its checker seen failing.

The runner test starts real nodes (`kaya run`, embedded nats-server) through
`python -m bench.chaos --quick`, kills one with -9 and stops another with SIGSTOP while
the bank workload runs, and asserts the independent checker found nothing. The checker
tests build a store file and a recording by hand: a consistent pair passes, and a pair
with a lost acknowledged command, a command applied twice and money that does not add
up is reported on each count, with its evidence.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import chaos_check
from kaya.store.schema import DDL

ROOT = Path(__file__).resolve().parent.parent


# ---- the runner, for real --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_quick_chaos_run_finds_no_violation(tmp_path: Path) -> None:
    output = tmp_path / "chaos.json"
    argv = [sys.executable, "-m", "bench.chaos", "--quick", "--only", "node-kill,node-stop"]
    done = subprocess.run(
        [*argv, "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
        stdin=subprocess.DEVNULL,
    )
    told = f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert output.exists(), told
    results = json.loads(output.read_text())
    rows = {row["scenario"]: row for row in results["summary"]}
    assert set(rows) == {"node-kill", "node-stop"}, told
    for row in rows.values():
        assert row["faults"] >= 1, told
        assert row["acknowledged"] > 50, told
        assert (row["violations"], row["incidents"]) == (0, 0), told
    for run in results["runs"]:  # the checker looked at something
        figures = run["check"]["figures"]
        assert figures["store events"] > 0
        assert figures["stream"]["messages"] == figures["store events"]
        assert figures["transfers"], figures
    kill = next(r for r in results["runs"] if r["scenario"] == "node-kill")
    assert kill["node starts"] >= 2, "killed once, restarted"
    assert done.returncode == 0, told


# ---- the checker, on inputs built by hand ----------------------------------------------


class Bank:
    """A store file written row by row, and the recording a client would have made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.executescript(DDL)
        self.position = 0
        self.commands: list[dict[str, Any]] = []
        self.balances: dict[str, int] = {}

    def store(self, entity_id: str, version: int, data: dict[str, Any], command_id: str) -> None:
        self.position += 1
        self.db.execute(
            "INSERT INTO events (position, event_id, entity, entity_id, version, type,"
            " schema_version, data, recorded_at, command_id)"
            " VALUES (?, ?, 'account', ?, ?, ?, ?, ?, 0, ?)",
            (
                self.position,
                f"ev-{self.position:04d}",
                entity_id,
                version,
                data["type"],
                2 if data["type"] == "Opened" else 1,
                json.dumps(data),
                command_id,
            ),
        )

    def acknowledged(
        self, entity_id: str, version: int, body: dict[str, Any], event: dict[str, Any], cid: str
    ) -> None:
        reply = {"ok": True, "entity": "account", "id": entity_id, "version": version}
        self.commands.append(
            {
                "command_id": cid,
                "entity": "account",
                "id": entity_id,
                "body": body,
                "status": "ok",
                "reply": {**reply, "events": [event]},
                "attempts": 1,
            }
        )

    def recording(self) -> dict[str, Any]:
        """States, stream and view exactly as a healthy node would serve this store."""
        self.db.commit()
        rows = chaos_check.read_store(self.path)
        accounts = sorted({r.entity_id for r in rows})
        states = {}
        for account_id in accounts:
            folded = chaos_check.fold_account([r for r in rows if r.entity_id == account_id])
            state = {
                "owner": "x",
                "currency": folded.currency,
                "balance": self.balances.get(account_id, folded.balance),
                "status": folded.status,
            }
            states[account_id] = {
                "ok": True,
                "entity": "account",
                "id": account_id,
                "version": folded.version,
                "state": state,
            }
        stream = [
            {
                "seq": i + 1,
                "subject": f"kaya.evt.account.{r.entity_id}",
                "headers": {
                    "Nats-Msg-Id": r.event_id,
                    "Kaya-Event-Type": r.type,
                    "Kaya-Schema-Version": str(r.schema_version),
                    "Kaya-Entity-Version": str(r.version),
                    "Kaya-Position": str(r.position),
                },
                "data": json.dumps(r.data),
            }
            for i, r in enumerate(rows)
        ]
        last = rows[-1].position
        view = {
            "ok": True,
            "view": "analytics",
            "currencies": chaos_check.analytics_from_store(rows, last),
            "position": last,
        }
        return {
            "commands": self.commands,
            "states": {"account": states, "transfer": {}},
            "stream": stream,
            "stream_info": {"messages": len(stream), "first_seq": 1, "last_seq": len(stream)},
            "view": view,
            "replay": {"exit_code": 0, "output": "rebuilt ...: identical to the live read model"},
        }


OPEN = {"type": "Open", "owner": "x", "currency": "EUR"}
OPENED = {"type": "Opened", "owner": "x", "currency": "EUR", "kind": "personal"}


def bank(path: Path, *, broken: bool) -> Bank:
    """Two accounts, 100 then 50 deposited. Broken: the 100 is stored twice (applied
    twice), the 50 is acknowledged but missing from the store (lost), and acc-2 is
    served with a balance of 70 (money that does not add up)."""
    b = Bank(path)
    for account_id in ("acc-1", "acc-2"):
        b.store(account_id, 1, OPENED, f"open-{account_id}")
        b.acknowledged(account_id, 1, OPEN, OPENED, f"open-{account_id}")
    deposit = {"type": "Deposit", "amount": 100}
    deposited = {"type": "Deposited", "amount": 100}
    b.store("acc-1", 2, deposited, "dep-1")
    b.acknowledged("acc-1", 2, deposit, deposited, "dep-1")
    if broken:
        b.store("acc-1", 3, deposited, "dep-1")  # the same command, applied again
    else:
        b.store("acc-2", 2, {"type": "Deposited", "amount": 50}, "dep-2")
    b.acknowledged(
        "acc-2", 2, {"type": "Deposit", "amount": 50}, {"type": "Deposited", "amount": 50}, "dep-2"
    )
    if broken:
        b.balances["acc-2"] = 70
    return b


def test_checker_passes_a_consistent_store(tmp_path: Path) -> None:
    b = bank(tmp_path / "kaya.db", broken=False)
    report = chaos_check.check(b.recording(), b.path)
    assert report.total == 0, report.render()
    assert report.figures["money"]["sum of balances"] == 150


def test_checker_reports_lost_duplicated_and_unbalanced(tmp_path: Path) -> None:
    b = bank(tmp_path / "kaya.db", broken=True)
    report = chaos_check.check(b.recording(), b.path)
    text = report.render()
    by_check: dict[str, list[chaos_check.Violation]] = {}
    for violation in report.violations:
        by_check.setdefault(violation.check, []).append(violation)

    (lost,) = by_check["lost"]
    assert "dep-2" in lost.message, text
    assert lost.evidence["command"]["command_id"] == "dep-2"
    assert lost.evidence["at those versions"] == [
        {"version": 2, "reply": {"type": "Deposited", "amount": 50}, "store": None}
    ]

    (twice,) = by_check["applied twice"]
    assert "dep-1" in twice.message, text
    assert [e["version"] for e in twice.evidence["events"]] == [2, 3]

    money = [v for v in by_check["money"] if "sum of balances" in v.message]
    assert len(money) == 1, text
    # served: acc-1 200 (the fold of its events), acc-2 70; acknowledged: 100 + 50
    assert money[0].evidence["sum of balances"] == 270
    assert money[0].evidence["acknowledged deposits"] == 150

    # acc-2 is served with 70 while its events fold to 0: the state check sees it too
    assert any("acc-2" in v.message for v in by_check["state"]), text
    assert report.counts["stream"] == 0, text
    assert report.counts["read model"] == 0, text
