"""`kaya run` as a user runs it: a child process with its embedded nats-server.

Checks start-up, the CLI against it, graceful and violent stops, and that no
nats-server outlives its node.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import deque
from pathlib import Path

import anyio
import nats
import orjson
import pytest

from tests.servers import (
    VENV_BIN,
    KayaProcess,
    drain,
    free_port,
    start_kaya,
    stop_pid,
    wait_for_line,
    wait_gone,
    write_config,
)

pytestmark = pytest.mark.slow


def kaya(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "kaya"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def history(config: Path, entity_id: str) -> list[dict[str, object]]:
    out = kaya("history", "account", entity_id, "--config", str(config))
    return [orjson.loads(line) for line in out.stdout.splitlines()]


async def stream_event_ids(url: str, subject: str) -> list[str]:
    """The Nats-Msg-Id of every message on `subject`, once the relay has caught up."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        with anyio.fail_after(15):
            while True:  # the relay republishes on start: wait for the stream to settle
                info = await js.stream_info("KAYA_EVENTS", subjects_filter=subject)
                if sum((info.state.subjects or {}).values()) >= 21:
                    break
                await anyio.sleep(0.05)
            sub = await js.subscribe(subject, stream="KAYA_EVENTS", ordered_consumer=True)
            ids = []
            for _ in range(sum((info.state.subjects or {}).values())):
                msg = await sub.next_msg(timeout=5)
                ids.append((msg.headers or {})["Nats-Msg-Id"])
        return ids
    finally:
        await nc.close()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "kaya.toml", tmp_path / "data", port=free_port())


@pytest.fixture
def running(config: Path) -> object:
    node = start_kaya(config)
    try:
        yield node
    finally:
        stop_pid(node.proc)


def test_run_prints_ready_and_serves_the_cli(running: KayaProcess, config: Path) -> None:
    assert "ready" in running.ready_line
    assert running.url.startswith("nats://127.0.0.1:")
    url = ["--url", running.url]

    opened = kaya("send", "account", "acc-1", '{"type":"Open","owner":"o","currency":"USD"}', *url)
    assert opened.returncode == 0, opened.stderr
    assert orjson.loads(opened.stdout)["version"] == 1

    deposit = '{"type":"Deposit","amount":40}'
    first = kaya("send", "account", "acc-1", deposit, "--id", "dep-1", *url)
    again = kaya("send", "account", "acc-1", deposit, "--id", "dep-1", *url)
    assert orjson.loads(first.stdout) == orjson.loads(again.stdout)

    refused = kaya("send", "account", "acc-1", '{"type":"Withdraw","amount":41}', *url)
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error: rejected: insufficient funds")
    assert refused.stdout == ""

    got = kaya("get", "account", "acc-1", *url)
    assert got.returncode == 0
    assert orjson.loads(got.stdout)["state"]["balance"] == 40

    history = kaya("history", "account", "acc-1", "--config", str(config))
    assert history.returncode == 0, history.stderr
    lines = [orjson.loads(line) for line in history.stdout.splitlines()]
    assert [(e["version"], e["type"]) for e in lines] == [(1, "Opened"), (2, "Deposited")]
    assert lines[1]["command_id"] == "dep-1"


def test_cli_errors_are_one_clear_line(running: KayaProcess) -> None:
    bad_json = kaya("send", "account", "a", "{nope", "--url", running.url)
    assert bad_json.returncode == 2
    assert bad_json.stderr.count("\n") == 1
    assert "not valid JSON" in bad_json.stderr

    nobody = kaya("get", "account", "a", "--url", f"nats://127.0.0.1:{free_port()}")
    assert nobody.returncode == 2
    assert nobody.stderr.startswith("error: cannot connect to NATS")
    assert nobody.stderr.count("\n") == 1

    unknown = kaya("send", "widget", "w", '{"type":"X"}', "--url", running.url)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error: unknown_entity:")


def test_help_exists_for_every_command() -> None:
    for command in ("run", "send", "get", "history", "server-config"):
        result = kaya(command, "--help")
        assert result.returncode == 0
        assert "usage: kaya" in result.stdout


def test_sigterm_stops_node_and_server_and_keeps_state(config: Path) -> None:
    node = start_kaya(config)
    try:
        servers = node.server_pids()
        assert len(servers) == 1, "the embedded nats-server is the node's child"
        sent = kaya(
            "send",
            "account",
            "keep",
            '{"type":"Open","owner":"k","currency":"EUR"}',
            "--url",
            node.url,
        )
        assert sent.returncode == 0, sent.stderr
        assert stop_pid(node.proc, signal.SIGTERM) == 0
        assert wait_gone(servers[0]), "nats-server outlived its node"
    finally:
        stop_pid(node.proc, signal.SIGKILL)

    again = start_kaya(config)
    try:
        got = kaya("get", "account", "keep", "--url", again.url)
        assert orjson.loads(got.stdout)["version"] == 1
    finally:
        assert stop_pid(again.proc) == 0


def test_sigint_stops_cleanly(config: Path) -> None:
    node = start_kaya(config)
    servers = node.server_pids()
    assert stop_pid(node.proc, signal.SIGINT) == 0
    assert wait_gone(servers[0])


def test_a_killed_node_leaves_no_server_and_loses_nothing_acknowledged(config: Path) -> None:
    node = start_kaya(config)
    servers = node.server_pids()
    try:
        kaya(
            "send",
            "account",
            "k9",
            '{"type":"Open","owner":"k","currency":"EUR"}',
            "--url",
            node.url,
        )
        for i in range(1, 21):
            ok = kaya(
                "send", "account", "k9", f'{{"type":"Deposit","amount":{i}}}', "--url", node.url
            )
            assert ok.returncode == 0
    finally:
        stop_pid(node.proc, signal.SIGKILL)
    assert wait_gone(servers[0]), "nats-server survived SIGKILL of its node"

    again = start_kaya(config)
    try:
        state = orjson.loads(kaya("get", "account", "k9", "--url", again.url).stdout)
        assert state["version"] == 21
        assert state["state"]["balance"] == 210
        # every committed event is in the stream exactly once, whenever the kill came
        assert anyio.run(stream_event_ids, again.url, "kaya.evt.account.k9") == [
            e["event_id"] for e in history(config, "k9")
        ]
    finally:
        stop_pid(again.proc)


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[store]\nsynchronous = 'FAST'\n", "store.synchronous"),
        ("[store]\nsnapshot_evry = 5\n", "unknown key store.snapshot_evry"),
        ("[actors]\nmailbox_size = 0\n", "actors.mailbox_size"),
        ("[nats]\nport = 'x'\n", "nats.port"),
        ("[nats\n", "not valid TOML"),
    ],
)
def test_a_bad_config_stops_start_up_with_one_message(
    tmp_path: Path, toml: str, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = kaya("run", "--config", str(path), timeout=20)
    assert result.returncode == 2
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()


def test_a_busy_port_is_a_clear_error(tmp_path: Path, running: KayaProcess) -> None:
    port = running.url.rsplit(":", 1)[1]
    config = write_config(tmp_path / "second.toml", tmp_path / "other", port=int(port))
    result = kaya("run", "--config", str(config), timeout=30)
    assert result.returncode == 2
    assert "error: nats-server exited" in result.stderr
    assert "address already in use" in result.stderr


def test_status_reads_a_running_node_and_says_when_none_is_there(
    running: KayaProcess,
) -> None:
    once = kaya("status", "--once", "--url", running.url)
    assert once.returncode == 0, once.stderr
    status = orjson.loads(once.stdout)
    assert status["ready"] is True
    assert status["relay"]["backlog"] == 0
    assert {"analytics", "notifications"} <= set(status["consumers"])

    nobody = kaya("status", "--url", f"nats://127.0.0.1:{free_port()}")
    assert nobody.returncode == 2
    assert nobody.stderr.startswith("error: cannot connect to NATS")


def test_status_ends_with_one_line_when_the_node_stops(running: KayaProcess) -> None:
    """The live view of a node whose embedded server goes away: one line, exit 2."""
    status = subprocess.Popen(
        [str(VENV_BIN / "kaya"), "status", "--url", running.url, "--interval", "0.2"],
        bufsize=0,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_line(status, "stdout", b": ready", 30)  # the first screen is up
        drain(status, "stdout", deque(maxlen=10))
        assert stop_pid(running.proc) == 0
        status.wait(timeout=30)
        assert status.stderr is not None
        err = status.stderr.read().decode()
    finally:
        stop_pid(status)
    assert status.returncode == 2, err
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert "stopped" in err


def test_sigterm_stops_a_node_still_waiting_for_its_nats_server(tmp_path: Path) -> None:
    """`nats.url` names a server that is down: the node keeps trying (it may come up),
    and SIGTERM still stops it at once instead of being held until it connects."""
    config = tmp_path / "kaya.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\napp = "examples.bank:app"\n'
        f'[nats]\nurl = "nats://127.0.0.1:{free_port()}"\n'
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "kaya"), "run", "--config", str(config)],
        cwd=Path(__file__).resolve().parent.parent,
        bufsize=0,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_line(proc, "stderr", b"Connection refused", 30)  # retrying
        drain(proc, "stderr", deque(maxlen=50))
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    finally:
        stop_pid(proc, signal.SIGKILL)
    assert proc.returncode == 0
