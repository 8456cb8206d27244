"""Every expected failure of the `kaya` CLI is one line, `error: ...`, with its exit code.

1 for a command the contract refuses (the line carries the code), 2 for usage, config and
connection problems: a bad argument, a server that is down, has no JetStream or no Kaya
streams yet, no node, no event store. Never a traceback. The CLI runs as a child process,
as a user runs it, against a real nats-server (with an in-process node where it needs one).
"""

from __future__ import annotations

import os
import subprocess
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest

from kaya.app.broker.embedded import find_binary
from kaya.app.node import Node
from tests.servers import (
    VENV_BIN,
    NatsServer,
    drain,
    free_port,
    stop_pid,
    wait_for_line,
)

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
OPEN = '{"type":"Open","owner":"ann","currency":"EUR"}'
APP = ("--app", "examples.bank:app")


async def kaya(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """`kaya ARGS` in the repository's root (where `examples.bank` is importable)."""
    env = {k: v for k, v in os.environ.items() if k != "KAYA_NATS_URL"}
    with anyio.fail_after(60):  # a CLI that hangs instead of failing is a failure too
        return await anyio.run_process(
            [str(VENV_BIN / "kaya"), *args],
            check=False,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture
def anyio_backend() -> str:
    """The CLI runs in its own process: the test's event loop makes no difference here."""
    return "asyncio"


def assert_one_line(result: subprocess.CompletedProcess[bytes], exit_code: int, *words: str) -> str:
    err = result.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert result.returncode == exit_code, (result.returncode, err)
    for word in words:
        assert word in err, err
    return err


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[str]:
    """A nats-server WITHOUT JetStream, as `nats-server -p PORT` starts one."""
    port = free_port()
    proc = subprocess.Popen(
        [find_binary(), "-a", "127.0.0.1", "-p", str(port)],
        bufsize=0,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_line(proc, "stderr", b"Server is ready", 15)
        drain(proc, "stderr", deque(maxlen=50))
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_pid(proc)


# ---- against a running node ------------------------------------------------------------------

DEEP = "[" * 1000 + "]" * 1000


@pytest.mark.parametrize(
    ("args", "exit_code", "words"),
    [
        pytest.param(("send", "account", "a b", OPEN), 1, ("bad_request", "'a b'"), id="id-space"),
        pytest.param(("send", "account", "", OPEN), 1, ("bad_request", "id ''"), id="id-empty"),
        pytest.param(("send", "account", "a.b", OPEN), 1, ("bad_request", "'a.b'"), id="id-dot"),
        pytest.param(("send", "Account", "a", OPEN), 1, ("bad_request", "Account"), id="entity"),
        pytest.param(("get", "account", "a b"), 1, ("bad_request", "'a b'"), id="get-id-space"),
        pytest.param(("get", "account", "*"), 1, ("bad_request", "'*'"), id="get-wildcard"),
        pytest.param(
            ("send", "account", "a", OPEN, "--id", "has space"),
            1,
            ("bad_request", "Kaya-Command-Id"),
            id="command-id-space",
        ),
        pytest.param(
            ("send", "account", "a", OPEN, "--id", b"\xff"),
            1,
            ("bad_request", "Kaya-Command-Id"),
            id="command-id-not-utf8",
        ),
        pytest.param(("send", "account", "a", "{nope"), 2, ("not valid JSON",), id="json-typo"),
        pytest.param(("send", "account", "a", b'{"x":"\xff"}'), 2, ("JSON",), id="json-not-utf8"),
        pytest.param(
            ("send", "account", "a", '{"type":"Deposit","amount":' + DEEP + "}"),
            1,
            ("bad_request", "nested"),
            id="json-deep",
        ),
        pytest.param(
            ("send", "account", "a", '{"type":"Deposit","amount":1e400}'),
            1,
            ("bad_request", "out of range"),
            id="json-1e400",
        ),
        pytest.param(
            ("send", "widget", "w", '{"type":"X"}'), 1, ("unknown_entity",), id="unknown-entity"
        ),
        pytest.param(("send", "account", "a", OPEN, "--timeout", "0"), 2, ("--timeout",), id="t0"),
        pytest.param(("get", "account", "a", "--timeout", "-1"), 2, ("--timeout",), id="t-1"),
        pytest.param(("send", "account"), 2, ("required",), id="missing-arguments"),
        pytest.param(("frobnicate",), 2, ("frobnicate",), id="unknown-command"),
        pytest.param(("schema",), 2, ("kaya schema", "ACTION"), id="missing-action"),
        pytest.param(("tail", "bad subject"), 2, ("bad subject",), id="tail-space"),
        pytest.param(("tail", "foo.bar"), 2, ("kaya.evt.",), id="tail-outside-events"),
        pytest.param(("tail", "--count", "-1"), 2, ("--count",), id="tail-count"),
        pytest.param(("dlq", "show", "--seq", "-1"), 2, ("--seq",), id="dlq-seq"),
        pytest.param(("dlq", "show"), 2, ("--seq",), id="dlq-show-no-seq"),
        pytest.param(("dlq", "purge", "a b"), 2, ("'a b'",), id="dlq-consumer-name"),
        pytest.param(("status", "--interval", "0"), 2, ("--interval",), id="status-interval"),
    ],
)
async def test_failures_against_a_running_node_are_one_line(
    node: Node, nats_server: NatsServer, args: Sequence[str], exit_code: int, words: Sequence[str]
) -> None:
    result = await kaya(*args, "--url", nats_server.url)
    assert_one_line(result, exit_code, *words)
    assert result.stdout == b""


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("nats://127.0.0.1:99999", id="port-out-of-range"),
        pytest.param("nats://no such host:4222", id="bad-host"),
        pytest.param("tls://127.0.0.1:{port}", id="nobody-there-tls"),
        pytest.param("nats://127.0.0.1:{port}", id="nobody-there"),
    ],
)
@pytest.mark.parametrize(
    "args",
    [
        ("send", "account", "a", OPEN),
        ("streams",),
        ("status",),
        ("dlq", "list"),
    ],
)
async def test_a_bad_url_or_a_server_that_is_down_is_one_line(
    url: str, args: Sequence[str]
) -> None:
    result = await kaya(*args, "--url", url.format(port=free_port()))
    assert_one_line(result, 2, "cannot connect to NATS")


# ---- a server without a node, without the streams, without JetStream ----------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("send", "account", "a", OPEN), ("no Kaya node",)),
        (("get", "account", "a"), ("no Kaya node",)),
        (("status", "--once"), ("no Kaya node",)),
        (("status",), ("no Kaya node",)),
        (("dlq", "purge"), ("KAYA_DLQ", "start a node")),
        (("dlq", "show", "--seq", "1"), ("KAYA_DLQ", "start a node")),
        (("tail",), ("KAYA_EVENTS", "start a node")),
    ],
)
async def test_a_server_where_no_node_ran_is_one_line(
    nats_server: NatsServer, args: Sequence[str], words: Sequence[str]
) -> None:
    result = await kaya(*args, "--url", nats_server.url)
    assert_one_line(result, 2, *words)


@pytest.mark.parametrize(
    "args",
    [
        ("streams",),
        ("streams", "--json"),
        ("dlq", "list"),
        ("dlq", "show", "--seq", "1"),
        ("dlq", "purge"),
        ("dlq", "replay", *APP),
        ("tail",),
        ("schema", "check", "--registry", *APP),
        ("schema", "publish", *APP),
    ],
)
async def test_a_server_without_jetstream_is_one_line(
    plain_server: str, tmp_path: Path, args: Sequence[str]
) -> None:
    data_dir = ("--data-dir", str(tmp_path)) if "replay" in args else ()
    result = await kaya(*args, *data_dir, "--url", plain_server)
    assert_one_line(result, 2, "JetStream", plain_server)


async def test_kaya_run_against_a_server_without_jetstream_is_one_line(
    plain_server: str, tmp_path: Path
) -> None:
    config = tmp_path / "kaya.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\napp = "examples.bank:app"\n'
        f'[nats]\nurl = "{plain_server}"\n'
    )
    result = await kaya("run", "--config", str(config))
    assert_one_line(result, 2, "JetStream")


# ---- tools that open the event store -----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("replay", "analytics", *APP),
        ("replay", "analytics", "--dry-run", *APP),
        ("dlq", "replay", *APP),
        ("history", "account", "a"),
    ],
)
async def test_a_missing_event_store_is_one_line_and_is_not_created(
    node: Node, nats_server: NatsServer, tmp_path: Path, args: Sequence[str]
) -> None:
    """`replay` and `dlq replay` write to the store: a mistyped --data-dir must not leave an
    empty store behind (and then report that a read model's table is missing)."""
    missing = tmp_path / "nothing-here"
    url = ("--url", nats_server.url) if args[0] == "dlq" else ()
    result = await kaya(*args, "--data-dir", str(missing), *url)
    assert_one_line(result, 2, "no event store", str(missing))
    assert not missing.exists()


async def test_files_that_cannot_be_read_are_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "schemas.json"
    garbage.write_text("{not json")
    result = await kaya("schema", "check", "--against", str(garbage), *APP)
    assert_one_line(result, 2, "not a schema file", str(garbage))
    result = await kaya("history", "account", "a", "--config", str(tmp_path / "none.toml"))
    assert_one_line(result, 2, "cannot read config")
    result = await kaya("catalog", "--app", "no_such_module:app")
    assert_one_line(result, 2, "no_such_module")
