"""`kaya run --role commands` and `--role consumers`: one node as two processes.

Real processes on one config and data dir: the `commands` process embeds the server and
serves commands, the `consumers` process runs the app's consumers beside it. The read
model they write is served by the first; the notifications come from the second; and a
`consumers` process killed with -9 stops nothing of the command path, and catches up
when it comes back.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from kaya import Client
from tests.servers import VENV_BIN, KayaProcess, free_port, start_kaya, stop_pid, write_config
from tests.test_cluster import eventually


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "kaya.toml", tmp_path / "data", port=free_port())


def run(config: Path, role: str) -> KayaProcess:
    argv = [str(VENV_BIN / "kaya"), "run", "--config", str(config), "--role", role]
    return start_kaya(config, argv=argv)


async def durables(nc: Any) -> set[str]:
    return {c.name for c in await nc.jetstream().consumers_info("KAYA_EVENTS")}


async def opened(client: Client) -> int:
    return int((await client.view("analytics"))["accounts"]["opened"])


@pytest.mark.anyio
async def test_commands_and_consumers_run_as_two_processes(config: Path) -> None:
    import nats

    commands = run(config, "commands")
    consumers: KayaProcess | None = None
    try:
        assert "(commands) ready" in commands.ready_line
        nc = await nats.connect(commands.url)
        try:
            async with Client.connect(commands.url) as client:
                for n in range(5):
                    await client.send("account", f"role-{n}", {"type": "Open",
                                      "owner": "roles", "currency": "EUR"})  # fmt: skip
                assert await durables(nc) == set()  # no consumer runs in `commands`
                notified = await nc.subscribe("kaya.notify.roles")
                await nc.flush()  # subscribed before the consumers start (run() blocks)
                consumers = run(config, "consumers")
                assert "(consumers) ready" in consumers.ready_line
                assert await opened_eventually(client, 5) == 5  # written by `consumers`
                assert {"analytics", "notifications"} <= await durables(nc)
                first = orjson.loads((await notified.next_msg(timeout=10)).data)
                assert first["id"].startswith("role-")

                # a crash of the consumers stops nothing of the command path
                stop_pid(consumers.proc, signal.SIGKILL)
                consumers = None
                for n in range(5, 10):
                    reply = await client.send("account", f"role-{n}", {"type": "Open",
                                              "owner": "roles", "currency": "EUR"})  # fmt: skip
                    assert reply.version == 1
                assert await opened(client) == 5  # nobody applies them meanwhile
                consumers = run(config, "consumers")  # back: it catches up
                assert await opened_eventually(client, 10) == 10
        finally:
            await nc.close()
    finally:
        if consumers is not None:
            stop_pid(consumers.proc)
        stop_pid(commands.proc)


async def opened_eventually(client: Client, count: int) -> int:
    return await eventually(lambda: opened(client), lambda n: n >= count, 15)


def test_an_unknown_role_is_refused_in_one_line(config: Path) -> None:
    import subprocess

    done = subprocess.run(
        [str(VENV_BIN / "kaya"), "run", "--config", str(config), "--role", "everything"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "invalid choice: 'everything'" in done.stderr
