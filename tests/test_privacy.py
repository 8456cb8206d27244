"""Sensitive data at rest, and forgotten: canaries through a secure node (`kaya run --secure`).

Accounts are opened with canary owner names and used (deposits, a transfer, a retried
command, snapshots every two events); then every file under the node's data directory
(SQLite with its -wal and -shm, the JetStream store, the keys, the contexts) and the
node's log are searched for the canaries: 0 plaintext hits. `kaya forget` then
destroys one account's key: queries show its owner as redacted, and its sealed values
no longer open with anything the node still has. Real processes, stopped by PID.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from kaya.actors.masking import MASK
from tests.servers import VENV_BIN, KayaProcess, free_port, start_kaya, stop_pid, write_config

CANARIES = {f"priv-{n}": f"Canary Owner {n} 7f3c91" for n in range(1, 4)}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KayaProcess, Path]]:
    root = tmp_path_factory.mktemp("privacy")
    config = write_config(
        root / "kaya.toml",
        root / "data",
        port=free_port(),
        extra="[store]\nsnapshot_every = 2\n[security]\nenabled = true\n",
    )
    proc = start_kaya(config)
    try:
        yield proc, config
    finally:
        stop_pid(proc.proc)


def kaya(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "kaya"), *argv], capture_output=True, text=True, timeout=30, check=False
    )


def security_dir(config: Path) -> Path:
    return config.parent / "data" / "security"


def context(config: Path, role: str) -> str:
    return str(security_dir(config) / "contexts" / f"kaya-{role}.json")


@pytest.mark.anyio
async def test_canaries_are_nowhere_in_plaintext_and_forgotten_ones_read_as_redacted(
    node: tuple[KayaProcess, Path],
) -> None:
    import nats

    from kaya import Client
    from kaya.app.security.pki import Pki
    from kaya.app.security.tls import tls_url

    proc, config = node
    client_ctx = context(config, "client")
    admin = await nats.connect(
        tls_url(proc.url), tls=Pki(security_dir(config)).role("admin").ssl_context()
    )
    try:
        token = kaya("pseudonym", CANARIES["priv-1"], "--config", str(config))
        assert token.returncode == 0, token.stderr
        subject = f"kaya.notify.{token.stdout.strip()}"
        assert CANARIES["priv-1"].split()[0] not in subject
        notified = await admin.subscribe(subject)
        async with Client.connect(tls=client_ctx, attempts=3) as client:
            for account, owner in CANARIES.items():
                opened = await client.send(
                    "account", account, {"type": "Open", "owner": owner, "currency": "EUR"},
                    command_id=f"open-{account}",
                )  # fmt: skip
                assert opened.events[0]["owner"] == owner  # the caller gets what it sent
                for amount in (100, 50, 25):
                    await client.send("account", account, {"type": "Deposit", "amount": amount})
            again = await client.send(
                "account", "priv-1",
                {"type": "Open", "owner": CANARIES["priv-1"], "currency": "EUR"},
                command_id="open-priv-1",
            )  # fmt: skip
            assert again.version == 1
            assert again.events[0]["owner"] == CANARIES["priv-1"]
            await client.send(
                "transfer", "priv-t1", {"type": "Start", "source": "priv-1", "target": "priv-2",
                                         "amount": 10},
            )  # fmt: skip

            async def transferred() -> bool:
                return (await client.get("transfer", "priv-t1")).state["status"] == "completed"

            await until_async(transferred, timeout=10)
            state = await client.get("account", "priv-1")
            assert state.state["owner"] == CANARIES["priv-1"]  # an allowed reader sees it
        message = await notified.next_msg(timeout=10)  # the owner's notifications arrive
        body = orjson.loads(message.data)
        assert body["id"] == "priv-1"
        assert CANARIES["priv-1"].encode() not in message.data
        assert body["event"].get("owner", MASK) == MASK

        # the relay has published everything and the store has settled: search it all
        js = admin.jetstream()
        await until_async(lambda: _published(js, "kaya.evt.account.priv-3"), timeout=10)
        data = config.parent / "data"
        files = [p for p in data.rglob("*") if p.is_file()]
        assert any(p.name.endswith("-wal") for p in files)  # the WAL is searched too
        assert len(files) > 10
        for owner in CANARIES.values():
            needle = owner.encode()
            assert [p for p in files if needle in p.read_bytes()] == [], owner
            assert all(owner not in line for line in proc.stderr), owner
        dead = kaya("dlq", "list", "--context", context(config, "admin"))
        assert all(owner not in dead.stdout for owner in CANARIES.values())

        # forgetting: the client may not, the admin may
        denied = kaya("forget", "account", "priv-1", "--context", client_ctx)
        assert denied.returncode != 0
        assert "forbidden" in denied.stderr, denied.stderr
        done = kaya("forget", "account", "priv-1", "--context", context(config, "admin"))
        assert done.returncode == 0, done.stderr
        assert "forgot account/priv-1" in done.stdout
        async with Client.connect(tls=client_ctx, attempts=3) as client:

            async def redacted() -> bool:
                return (await client.get("account", "priv-1")).state["owner"] == MASK

            await until_async(redacted, timeout=10)
            state = await client.get("account", "priv-1")
            assert state.state["balance"] == 165  # only the owner is gone: the money is not
            deposit = await client.send("account", "priv-1", {"type": "Deposit", "amount": 1})
            assert deposit.version == state.version + 1
            replayed = await client.send(
                "account", "priv-1",
                {"type": "Open", "owner": CANARIES["priv-1"], "currency": "EUR"},
                command_id="open-priv-1",
            )  # fmt: skip
            assert replayed.events[0]["owner"] == MASK  # the remembered reply too
            other = await client.get("account", "priv-2")
            assert other.state["owner"] == CANARIES["priv-2"]  # one entity, one key
        again_done = kaya("forget", "account", "priv-1", "--context", context(config, "admin"))
        assert "has no key" in again_done.stdout
        await _no_key_opens(admin, data, "priv-1")
    finally:
        await admin.close()


async def until_async(check: Any, timeout: float) -> None:
    from tests.test_cluster import eventually

    await eventually(check, bool, timeout)


async def _published(js: Any, subject: str) -> bool:
    info = await js.stream_info("KAYA_EVENTS", subjects_filter=subject)
    return bool(info.state.subjects) and info.state.subjects.get(subject, 0) >= 4


async def _no_key_opens(admin: Any, data: Path, account: str) -> None:
    """Every key left in KAYA_KEYS (unwrapped with the node's master key) fails to open
    the forgotten account's sealed owner, in the SQLite store and in JetStream."""
    import sqlite3

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from kaya.actors.sealing import PREFIX, open_value
    from kaya.app.config import load_config
    from kaya.app.security.keys import KEYS_BUCKET, master_key

    store = load_config(data.parent / "kaya.toml").store_path
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        (raw,) = db.execute(
            "SELECT data FROM events WHERE entity = 'account' AND entity_id = ? AND version = 1",
            (account,),
        ).fetchone()
    sealed_store = orjson.loads(raw)["owner"]
    msg = await admin.jetstream().get_msg(
        "KAYA_EVENTS", seq=1, subject=f"kaya.evt.account.{account}", next=True
    )
    sealed_log = orjson.loads(msg.data)["owner"]
    assert sealed_store.startswith(PREFIX)
    assert sealed_log.startswith(PREFIX)
    master = AESGCM(master_key(data / "security"))
    kv = await admin.jetstream().key_value(KEYS_BUCKET)
    names = await kv.keys()
    assert f"account.{account}" not in names
    assert "account.priv-2" in names
    for name in names:
        wrapped = (await kv.get(name)).value
        key = AESGCM(master.decrypt(wrapped[:12], wrapped[12:], b"kaya-key:" + name.encode()))
        for sealed in (sealed_store, sealed_log):
            assert open_value(key, "account", account, "owner", sealed) == MASK
