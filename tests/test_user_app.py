"""A user's own app, served by `kaya run --app`: the runtime knows no domain.

The app is examples/counter_app.py, the code of the README's "Your first entity",
copied into a folder outside the repository as a user would have it.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import anyio
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

import kaya
from examples import counter_app
from examples.counter_app import Add, Added, Counter, Tally, Totals, totals
from kaya.actors.wire import shard_of
from kaya.app.application import AppError, load_app
from kaya.app.node import open_node
from tests.conftest import call, node_config
from tests.servers import VENV_BIN, NatsServer, free_port, start_kaya, stop_pid

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def counter_app_fresh() -> kaya.App:
    return kaya.App(entities=[Counter()], consumers=[Totals()], views={"totals": totals})


async def until_view(nc: NATS, subject: str, check: Any, timeout: float = 10) -> dict[str, Any]:
    """Ask a view until `check(reply)` holds: consumers apply events after the reply."""
    with anyio.fail_after(timeout):
        while True:
            reply = await call(nc, subject)
            if check(reply):
                return reply
            await anyio.sleep(0.05)


# ---- pure: the decider and the app, without NATS or SQLite ---------------------------


def test_the_counter_decides_without_nats_or_sqlite() -> None:
    assert kaya.decide(Counter(), given=[Added(n=60)], when=Add(n=40)) == [Added(n=40)]
    with pytest.raises(kaya.Rejected, match="may not pass 100"):
        kaya.decide(Counter(), given=[Added(n=60)], when=Add(n=41))
    assert kaya.replay(Counter(), [Added(n=1), Added(n=2)]) == Tally(total=3)


def test_the_readme_shows_the_first_entity_as_it_is_tested() -> None:
    """The README's code block is this file's code: what a newcomer copies runs."""
    code = counter_app.__file__
    body = Path(code).read_text().split('"""', 2)[2].strip()
    assert body in README.read_text()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("counter_app", "expected module:attribute"),
        ("no_such_module_here:app", "no module named 'no_such_module_here'"),
        ("examples.counter_app:nothing", "has no attribute 'nothing'"),
        ("examples.counter_app:Counter", "not a kaya.App"),
    ],
)
def test_a_bad_app_spec_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(AppError, match=message):
        load_app(spec)


def test_an_app_refuses_names_the_wire_cannot_carry() -> None:
    class Bad(Counter):
        name = "Counter-2"

    with pytest.raises(AppError, match="entity name 'Counter-2'"):
        kaya.App(entities=[Bad()])
    with pytest.raises(AppError, match="two consumers are named 'totals'"):
        kaya.App(consumers=[Totals(), Totals()])
    with pytest.raises(AppError, match=r"view name 'a\.b'"):
        kaya.App(views={"a.b": totals})


def test_the_entity_name_rule_is_the_wires() -> None:
    """One rule for registry and ingress: a digit after the first letter is fine."""
    assert kaya.App(entities=[Counter()]).registry.get("counter2").name == "counter2"


# ---- an in-process node serving only the user's app -----------------------------------


@pytest.mark.anyio
async def test_a_node_serves_the_users_app_and_nothing_of_the_bank(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    async with open_node(node_config(nats_server, tmp_path), counter_app_fresh()) as node:
        done = await call(nc, "kaya.cmd.counter2.c-1", {"type": "Add", "n": 60})
        assert done == {
            "ok": True,
            "entity": "counter2",
            "id": "c-1",
            "version": 1,
            "events": [{"type": "Added", "n": 60}],
        }
        refused = await call(nc, "kaya.cmd.counter2.c-1", {"type": "Add", "n": 41})
        assert refused["error"] == {"code": "rejected", "message": "the total may not pass 100"}
        bank = await call(nc, "kaya.cmd.account.x", {"type": "Deposit", "amount": 1})
        assert bank["error"]["code"] == "unknown_entity"
        assert "counter2" in bank["error"]["message"]
        view = await until_view(nc, "kaya.view.totals", lambda r: r.get("totals"))
        assert view == {"ok": True, "view": "totals", "totals": {"c-1": 60}}
        analytics = await call(nc, "kaya.view.analytics")
        assert analytics["error"]["code"] == "bad_request"
        assert set(node.consumers) == {"totals"}
        js = nc.jetstream()
        durables = {c.name for c in await js.consumers_info("KAYA_EVENTS")}
        assert durables == {"totals"}
        tables = {r[0] for r in await node.store.query("SELECT name FROM sqlite_master")}
        assert "counter_totals" in tables
        assert not {t for t in tables if t.startswith(("analytics", "notify"))}


@pytest.mark.anyio
@pytest.mark.parametrize("shard", ["99", "16", "x", "-1"])
async def test_a_shard_token_the_mapping_cannot_produce_is_refused(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, shard: str
) -> None:
    async with open_node(node_config(nats_server, tmp_path), counter_app_fresh()):
        reply = await call(nc, f"kaya.shard.{shard}.cmd.counter2.c-1", {"type": "Add", "n": 1})
        assert reply["error"]["code"] == "bad_request"
        assert f"shard {shard!r}" in reply["error"]["message"]
        state = await call(nc, "kaya.qry.counter2.c-1")
        assert state["version"] == 0  # nothing was applied
        right = shard_of(16, "counter2", "c-1")  # a hand-made shard subject must be the key's
        wrong = (right + 1) % 16
        other = await call(nc, f"kaya.shard.{wrong}.cmd.counter2.c-1", {"type": "Add", "n": 1})
        assert other["error"]["code"] == "bad_request"
        assert f"is in shard {right}, not {wrong}" in other["error"]["message"]
        ok = await call(nc, f"kaya.shard.{right}.cmd.counter2.c-1", {"type": "Add", "n": 1})
        assert ok["ok"] is True


# ---- `kaya run --app` from the user's folder, outside the repository -------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_kaya_run_serves_an_app_from_the_current_directory(tmp_path: Path) -> None:
    service = tmp_path / "service"
    service.mkdir()
    shutil.copy(counter_app.__file__, service / "counter_app.py")
    port = free_port()
    config = service / "kaya.toml"
    config.write_text(
        f'[node]\ndata_dir = "{service / "data"}"\n[nats]\nport = {port}\nmonitor_port = 0\n'
    )
    node = start_kaya(
        config,
        argv=[str(VENV_BIN / "kaya"), "run", "--config", str(config), "--app", "counter_app:app"],
        cwd=service,
    )
    try:
        assert "app counter_app:app" in node.ready_line
        nc = await nats.connect(node.url)
        try:
            async with kaya.Client.connect(node.url) as client:
                first = await client.send("counter2", "c-7", Add(n=30), command_id="add-1")
                again = await client.send("counter2", "c-7", Add(n=30), command_id="add-1")
                assert first.version == again.version == 1  # a retry is applied once
                with pytest.raises(kaya.Rejected, match="may not pass 100"):
                    await client.send("counter2", "c-7", Add(n=71))
                with pytest.raises(kaya.UnknownEntity):
                    await client.send("account", "x", {"type": "Open", "owner": "a"})
                state = await client.get("counter2", "c-7", state_type=Tally)
                assert state.state == Tally(total=30)
            view = await until_view(nc, "kaya.view.totals", lambda r: r.get("totals"))
            assert view["totals"] == {"c-7": 30}
            durables = {c.name for c in await nc.jetstream().consumers_info("KAYA_EVENTS")}
            assert durables == {"totals"}
        finally:
            await nc.close()
    finally:
        assert stop_pid(node.proc) == 0
    with sqlite3.connect(service / "data" / "kaya.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "counter_totals" in tables
    assert not {t for t in tables if t.startswith(("analytics", "notify"))}


@pytest.mark.slow
def test_every_tool_that_needs_the_domain_takes_app(tmp_path: Path) -> None:
    service = tmp_path / "service"
    service.mkdir()
    shutil.copy(counter_app.__file__, service / "counter_app.py")
    kaya_bin = str(VENV_BIN / "kaya")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [kaya_bin, *args], cwd=service, capture_output=True, text=True, timeout=60
        )

    catalog = run("catalog", "--app", "counter_app:app")
    assert catalog.returncode == 0, catalog.stderr
    assert "counter2" in catalog.stdout
    assert "account" not in catalog.stdout
    schemas = service / "schemas.json"
    exported = run("schema", "export", "--app", "counter_app:app", "--output", str(schemas))
    assert exported.returncode == 0, exported.stderr
    assert set(orjson.loads(schemas.read_bytes())) == {"counter2.Add.v1", "counter2.Added.v1"}
    checked = run("schema", "check", "--app", "counter_app:app", "--against", str(schemas))
    assert checked.returncode == 0, checked.stderr
    missing = run("catalog")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: no app to serve: pass --app module:attr")
    wrong = run("replay", "totals", "--app", "counter_app:nope", "--data-dir", "d")
    assert wrong.returncode == 2
    assert "has no attribute 'nope'" in wrong.stderr


@pytest.mark.slow
def test_replay_of_an_unknown_read_model_is_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(VENV_BIN / "kaya"), "replay", "nosuch", "--app", "examples.bank:app"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert out.returncode == 2
    assert out.stderr == "error: no read model named 'nosuch' (known: analytics)\n"
