"""Load shedding on event-loop lag: the probe, and the ingress refusing while behind."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import anyio.lowlevel
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from examples.bank import make_app
from kaya.app import node as app_node
from kaya.app.config import IngressConfig
from kaya.app.observability.lag import LoopLag
from tests.conftest import call, node_config
from tests.servers import NatsServer

pytestmark = pytest.mark.anyio

OPEN = {"type": "Open", "owner": "ann", "currency": "EUR"}


async def _probe_while(block: str, chunk: float, total: float = 0.3) -> LoopLag:
    """Run the probe while the loop is held in `chunk`-second stretches for `total` seconds,
    yielding between them (as a loop drowning in work does), either on the CPU or off it."""
    lag = LoopLag()
    async with anyio.create_task_group() as tg:
        await tg.start(lag.run)
        end = time.perf_counter() + total
        while time.perf_counter() < end:
            deadline = time.perf_counter() + chunk
            if block == "cpu":
                while time.perf_counter() < deadline:
                    pass
            else:
                # off the CPU: what another process holding the core looks like
                time.sleep(chunk)  # noqa: ASYNC251
            await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    return lag


async def test_a_loop_busy_with_its_own_work_is_behind() -> None:
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    lag = await _probe_while("cpu", 0.04)
    got = (time.thread_time() - cpu0) / (time.perf_counter() - wall0)
    if got < 0.85:  # the probe is right to say "not our own work" then: nothing to check
        pytest.skip(f"other processes held the core: this thread ran {got:.0%} of the time")
    assert lag.max_lag >= 0.03
    assert lag.busy >= 0.75
    assert lag.behind(0.015)


async def test_a_loop_waiting_off_cpu_is_late_but_not_behind() -> None:
    lag = await _probe_while("sleep", 0.04)
    assert lag.max_lag >= 0.03  # the timer did fire late ...
    assert lag.busy < 0.75  # ... but the loop's thread was not the one using the time
    assert not lag.behind(0.015)


class AlwaysBehind(LoopLag):
    def behind(self, max_lag: float) -> bool:
        return True


async def test_a_node_behind_refuses_commands_at_once_and_changes_nothing(
    nats_server: NatsServer,
    tmp_path: Path,
    nc: NATS,
    uid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    subject = f"kaya.cmd.account.{uid}"
    async with app_node.open_node(node_config(nats_server, tmp_path), make_app()):
        assert (await call(nc, subject, OPEN))["ok"] is True
    monkeypatch.setattr(app_node, "LoopLag", AlwaysBehind)
    async with app_node.open_node(node_config(nats_server, tmp_path), make_app()):
        refused = await call(nc, subject, {"type": "Deposit", "amount": 5})
        assert refused["ok"] is False
        assert refused["error"]["code"] == "overloaded"
        assert "behind" in refused["error"]["message"]
        # queries are still served: an operator can look at a node that sheds commands
        state = await call(nc, f"kaya.qry.account.{uid}")
        assert state["version"] == 1
        assert state["state"]["balance"] == 0


async def test_requests_beyond_the_queued_bound_are_refused_and_change_nothing(
    nats_server: NatsServer, tmp_path: Path, nc: NATS, uid: str
) -> None:
    """300 deposits sent in one burst land in nats-py's buffer together: beyond
    `max_queued` waiting there, a request is refused before it is even decoded."""
    # lag shedding off: only the buffer bound may refuse here
    ingress = IngressConfig(max_queued=5, max_loop_lag=0)
    config = node_config(nats_server, tmp_path, ingress=ingress)
    subject = f"kaya.cmd.account.{uid}"
    async with app_node.open_node(config, make_app()):
        assert (await call(nc, subject, OPEN))["ok"] is True
        inbox = nc.new_inbox()
        replies: list[bytes] = []
        all_in = anyio.Event()

        async def collect(msg: Msg) -> None:
            replies.append(msg.data)
            if len(replies) == 300:
                all_in.set()

        await nc.subscribe(inbox, cb=collect)
        body = orjson.dumps({"type": "Deposit", "amount": 1})
        for _ in range(300):
            await nc.publish(subject, body, reply=inbox)
        await nc.flush()
        with anyio.fail_after(30):
            await all_in.wait()
        decoded = [orjson.loads(r) for r in replies]
        refused = [d for d in decoded if not d["ok"]]
        assert refused, "the burst never filled the buffer past max_queued"
        assert {d["error"]["code"] for d in refused} == {"overloaded"}
        assert all("queued at this node" in d["error"]["message"] for d in refused)
        ok = sum(1 for d in decoded if d["ok"])
        state = await call(nc, f"kaya.qry.account.{uid}")
        assert state["state"]["balance"] == ok  # nothing refused was applied
