"""Commands authorised per caller: `Authorization: Bearer <JWT>` against the bank's policy.

A real node (`kaya run`, `[security.jwt]` on, the key pair `kaya security token` uses),
real tokens signed here with `mint`. The cases of issue 14: no token, expired, wrong
key, wrong issuer or audience, another owner's account; an owner acts on their own
account, an admin on any; a refused command changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kaya import Client, Forbidden, Unauthorized
from kaya.app.security.tokens import mint, new_signing_key
from tests.servers import KayaProcess, free_port, start_kaya, stop_pid, write_config

ISSUER, AUDIENCE = "https://id.example.test", "kaya-bank"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def jwt_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KayaProcess, bytes]]:
    root = tmp_path_factory.mktemp("authz")
    security = root / "data" / "security"
    signing, _ = new_signing_key(security)
    config = write_config(
        root / "kaya.toml",
        root / "data",
        port=free_port(),
        extra=(
            "[security.jwt]\nenabled = true\n"
            f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\nkey_file = "jwt-public.pem"\n'
        ),
    )
    node = start_kaya(config)
    try:
        yield node, signing.read_bytes()
    finally:
        stop_pid(node.proc)


def token(key: bytes, subject: str, **options: Any) -> str:
    return mint(
        key,
        subject=subject,
        issuer=options.pop("issuer", ISSUER),
        audience=options.pop("audience", AUDIENCE),
        **options,
    )


@pytest.fixture
async def as_user(jwt_node: tuple[KayaProcess, bytes]) -> AsyncIterator[Any]:
    node, key = jwt_node
    clients: list[Client] = []

    async def connect(subject: str | None, **options: Any) -> Client:
        bearer = token(key, subject, **options) if subject is not None else None
        client = await Client.connect(node.url, token=bearer, attempts=1)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.aclose()


def _other_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


DEPOSIT = {"type": "Deposit", "amount": 5}
OPEN_ALICE = {"type": "Open", "owner": "alice", "currency": "EUR"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "options", "says"),
    [
        ("missing", None, "Authorization: Bearer <JWT> is required"),
        ("expired", {"claims": {"exp": int(time.time()) - 3600}}, "expired"),
        ("wrong key", {"key": "other"}, "signature"),
        ("wrong issuer", {"issuer": "https://evil.test"}, "issuer"),
        ("wrong audience", {"audience": "another-service"}, "audience"),
    ],
)
async def test_a_request_without_a_valid_token_is_unauthorized(
    jwt_node: tuple[KayaProcess, bytes], case: str, options: dict[str, Any] | None, says: str
) -> None:
    node, key = jwt_node
    bearer = None
    if options is not None:
        options = dict(options)
        signer = _other_key() if options.pop("key", None) == "other" else key
        bearer = token(signer, "mallory", **options)
    async with Client.connect(node.url, token=bearer, attempts=1) as client:
        with pytest.raises(Unauthorized, match=says):
            await client.send("account", "authz-none", DEPOSIT)
        with pytest.raises(Unauthorized):
            await client.get("account", "authz-none")
        with pytest.raises(Unauthorized):
            await client.view("analytics")
    async with Client.connect(node.url, token=token(key, "admin", claims={"admin": True})) as admin:
        assert (await admin.get("account", "authz-none")).version == 0  # nothing happened


@pytest.mark.anyio
async def test_an_owner_acts_on_their_own_account_only(as_user: Any) -> None:
    alice, bob = await as_user("alice"), await as_user("bob")
    opened = await alice.send("account", "authz-a", {"type": "Open", "owner": "alice",
                                                     "currency": "EUR"})  # fmt: skip
    assert opened.version == 1
    await alice.send("account", "authz-a", {"type": "Deposit", "amount": 100})
    with pytest.raises(Forbidden, match="may not send Open"):  # not in someone else's name
        await bob.send("account", "authz-x", {"type": "Open", "owner": "alice", "currency": "EUR"})
    for command in (DEPOSIT, {"type": "Withdraw", "amount": 5}, {"type": "Close"}):
        with pytest.raises(Forbidden, match="account/authz-a"):
            await bob.send("account", "authz-a", command)
    with pytest.raises(Forbidden, match="may not read account/authz-a"):
        await bob.get("account", "authz-a")
    state = await alice.get("account", "authz-a")
    assert state.version == 2  # bob's refused commands changed nothing
    assert state.state["balance"] == 100


@pytest.mark.anyio
async def test_a_refused_caller_does_not_get_a_remembered_reply(as_user: Any) -> None:
    """A repeat of alice's command id by bob is refused, not answered with alice's reply."""
    alice, bob = await as_user("alice"), await as_user("bob")
    await alice.send("account", "authz-r", OPEN_ALICE, command_id="authz-open-r")
    with pytest.raises(Forbidden):
        await bob.send("account", "authz-r", OPEN_ALICE, command_id="authz-open-r")


@pytest.mark.anyio
async def test_an_admin_claim_acts_on_any_account(as_user: Any) -> None:
    alice = await as_user("alice")
    admin = await as_user("ops", claims={"admin": True})
    await alice.send("account", "authz-b", {"type": "Open", "owner": "alice", "currency": "EUR"})
    deposited = await admin.send("account", "authz-b", DEPOSIT)
    assert deposited.version == 2
    assert (await admin.get("account", "authz-b")).state["owner"] == "alice"


@pytest.mark.anyio
async def test_a_transfer_is_started_and_read_by_the_source_owner(as_user: Any) -> None:
    alice, bob = await as_user("alice"), await as_user("bob")
    await alice.send("account", "authz-t1", {"type": "Open", "owner": "alice", "currency": "EUR"})
    await alice.send("account", "authz-t1", {"type": "Deposit", "amount": 50})
    await bob.send("account", "authz-t2", {"type": "Open", "owner": "bob", "currency": "EUR"})
    with pytest.raises(Forbidden, match="may not send Start"):  # bob cannot move alice's money
        await bob.send("transfer", "authz-x1", {"type": "Start", "source": "authz-t1",
                                                "target": "authz-t2", "amount": 50})  # fmt: skip
    move = {"type": "Start", "source": "authz-t1", "target": "authz-t2", "amount": 20}
    started = await alice.send("transfer", "authz-x2", move)
    assert started.version == 1
    assert (await alice.get("transfer", "authz-x2")).state["source"] == "authz-t1"
    with pytest.raises(Forbidden):
        await bob.get("transfer", "authz-x2")
    with pytest.raises(Forbidden):  # nobody's transfer yet: nothing to read
        await bob.get("transfer", "authz-x1")
    assert (await alice.get("account", "authz-t1")).state["balance"] in (30, 50)  # 20 moving


@pytest.mark.anyio
async def test_any_authenticated_caller_reads_the_analytics_view(as_user: Any) -> None:
    carol = await as_user("carol")
    totals = await carol.view("analytics")
    assert set(totals["accounts"]) == {"opened", "closed"}  # totals: nothing about anyone
