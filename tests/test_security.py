"""Security on: TLS with a client certificate per role, made on first start; each refusal
said in one line. Real processes (`kaya run --secure`, the `kaya` CLI), stopped by PID."""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kaya.app.broker.embedded import ServerSettings, TlsFiles, server_config
from kaya.app.security.pki import (
    ROLES,
    _write_cert,
    _write_key,
    ensure_pki,
    issue,
    new_ca,
)
from kaya.app.security.tls import tls_url
from tests.servers import VENV_BIN, KayaProcess, free_port, start_kaya, stop_pid, write_config


@pytest.fixture(scope="module")
def secure_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KayaProcess, Path]]:
    root = tmp_path_factory.mktemp("secure")
    config = write_config(root / "kaya.toml", root / "data", port=free_port())
    node = start_kaya(
        config, argv=[str(VENV_BIN / "kaya"), "run", "--config", str(config), "--secure"]
    )
    try:
        yield node, root / "data" / "security"
    finally:
        stop_pid(node.proc)


def kaya(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "kaya"), *argv], capture_output=True, text=True, timeout=30, check=False
    )


def context(security: Path, role: str) -> str:
    return str(security / "contexts" / f"kaya-{role}.json")


def test_first_start_makes_the_pki_and_a_context_per_role(
    secure_node: tuple[KayaProcess, Path],
) -> None:
    node, security = secure_node
    for role in ROLES:
        ctx = orjson.loads(Path(context(security, role)).read_bytes())
        assert ctx["url"] == tls_url(node.url)
        cert = x509.load_pem_x509_certificate(Path(ctx["cert"]).read_bytes())
        assert cert.subject.rfc4514_string() == f"CN=kaya-{role}"
        assert Path(ctx["key"]).stat().st_mode & 0o077 == 0  # keys readable by the owner only
        assert Path(ctx["ca"]) == security / "ca.pem"
    assert (security / "ca.key").stat().st_mode & 0o077 == 0


def test_a_client_with_its_context_is_served(secure_node: tuple[KayaProcess, Path]) -> None:
    _, security = secure_node
    opened = kaya("send", "account", "sec-1", '{"type":"Open","owner":"o","currency":"EUR"}',
                  "--context", context(security, "client"))  # fmt: skip
    assert opened.returncode == 0, opened.stderr
    got = kaya("get", "account", "sec-1", "--context", context(security, "client"))
    assert orjson.loads(got.stdout)["version"] == 1


def refused(node: KayaProcess, security: Path, ctx: dict[str, str], tmp: Path) -> str:
    path = tmp / "ctx.json"
    path.write_bytes(orjson.dumps(ctx))
    done = kaya("get", "account", "sec-1", "--context", str(path))
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # one line, no traceback, no asyncio noise
    return lines[0]


def test_plaintext_is_refused_in_one_line(
    secure_node: tuple[KayaProcess, Path], tmp_path: Path
) -> None:
    node, _ = secure_node
    done = kaya("get", "account", "sec-1", "--url", node.url)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: cannot connect to NATS at {node.url}: the server's certificate is not from a"
        " CA this client trusts: security is on there; connect with --context"
        " <data_dir>/security/contexts/kaya-<role>.json"
    ]


def test_no_certificate_is_refused_in_one_line(
    secure_node: tuple[KayaProcess, Path], tmp_path: Path
) -> None:
    node, security = secure_node
    line = refused(
        node, security, {"url": tls_url(node.url), "ca": str(security / "ca.pem")}, tmp_path
    )
    assert "the server requires a client certificate" in line


def _ca(security: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((security / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((security / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def test_a_certificate_from_another_ca_is_refused_in_one_line(
    secure_node: tuple[KayaProcess, Path], tmp_path: Path
) -> None:
    node, security = secure_node
    other_cert, other_key = new_ca("someone else's CA")
    cert, key = issue(other_cert, other_key, "kaya-client")
    _write_cert(tmp_path / "c.pem", cert)
    _write_key(tmp_path / "c.key", key)
    ctx = {"url": tls_url(node.url), "cert": str(tmp_path / "c.pem"),
           "key": str(tmp_path / "c.key"), "ca": str(security / "ca.pem")}  # fmt: skip
    assert "does not trust this client certificate" in refused(node, security, ctx, tmp_path)


def test_an_expired_certificate_is_refused_in_one_line(
    secure_node: tuple[KayaProcess, Path], tmp_path: Path
) -> None:
    node, security = secure_node
    ca_cert, ca_key = _ca(security)
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    cert, key = issue(ca_cert, ca_key, "kaya-client", not_before=long_ago, days=1)
    _write_cert(tmp_path / "c.pem", cert)
    _write_key(tmp_path / "c.key", key)
    ctx = {"url": tls_url(node.url), "cert": str(tmp_path / "c.pem"),
           "key": str(tmp_path / "c.key"), "ca": str(security / "ca.pem")}  # fmt: skip
    assert "it has expired" in refused(node, security, ctx, tmp_path)


def test_the_pki_is_kept_across_starts(tmp_path: Path) -> None:
    first = ensure_pki(tmp_path / "s", hosts=["127.0.0.1"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir() if p.is_file()}
    ensure_pki(tmp_path / "s", hosts=["127.0.0.1"])
    after = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir() if p.is_file()}
    assert before == after
    assert first.ca.exists()


def test_the_server_config_requires_verified_client_certificates(tmp_path: Path) -> None:
    tls = TlsFiles(cert=tmp_path / "s.pem", key=tmp_path / "s.key", ca=tmp_path / "ca.pem")
    text = server_config(ServerSettings(store_dir=tmp_path, tls=tls))
    assert "tls {" in text
    assert "verify: true" in text
    assert f'ca_file: "{(tmp_path / "ca.pem").resolve()}"' in text
    assert "tls {" not in server_config(ServerSettings(store_dir=tmp_path))


@pytest.mark.anyio
async def test_kaya_client_connects_with_a_context_file(
    secure_node: tuple[KayaProcess, Path],
) -> None:
    from kaya import Client
    from kaya.actors.errors import Unavailable

    _, security = secure_node
    async with Client.connect(tls=context(security, "client")) as client:
        state = await client.get("account", "client-1")
    assert state.version == 0
    node, _ = secure_node
    with pytest.raises(Unavailable, match="requires a client certificate"):
        await Client.connect(
            tls_url(node.url), tls=str(_ca_only(security)), timeout=2.0, attempts=1
        )


def _ca_only(security: Path) -> Path:
    path = security.parent.parent / "ca-only.json"
    path.write_bytes(orjson.dumps({"ca": str(security / "ca.pem")}))
    return path


async def connect_as(security: Path, role: str, url: str) -> tuple[object, list[str]]:
    """A raw nats-py connection with the role's certificate; the violations it is told of."""
    import nats

    from kaya.app.security.pki import Pki

    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc))

    nc = await nats.connect(
        tls_url(url), tls=Pki(security).role(role).ssl_context(), error_cb=on_error,
        allow_reconnect=False,
    )  # fmt: skip
    return nc, refused


async def until_refused(refused: list[str], subject: str) -> None:
    from tests.test_schemas import until

    tail = subject.split(".", 1)[1]  # the server names the subject its mapping made
    await until(lambda: any(subject in text or f".{tail}" in text for text in refused), 5)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the node under test is a process: one client loop is enough


CORE_FORBIDDEN = [  # (role, kind, subject): refused with the server's -ERR
    ("client", "pub", "kaya.evt.account.forged-1"),  # a forged event
    ("client", "sub", "kaya.shard.*.cmd.>"),  # a fake node
    ("reader", "pub", "kaya.cmd.account.a-1"),
    ("node", "pub", "kaya.evt.nosuchentity.x"),  # not an entity of the app
]
JETSTREAM_FORBIDDEN = [  # (role, API subject): JetStream answers nothing, changes nothing
    ("client", "$JS.API.STREAM.PURGE.KAYA_EVENTS"),
    ("client", "$JS.API.STREAM.DELETE.KAYA_DLQ"),
    ("reader", "$JS.API.STREAM.DELETE.KAYA_EVENTS"),
    ("node", "$JS.API.STREAM.DELETE.KAYA_EVENTS"),
    ("node", "$JS.API.STREAM.PURGE.KAYA_EVENTS"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("role", "kind", "subject"), CORE_FORBIDDEN)
async def test_each_role_is_refused_what_it_may_not_do(
    secure_node: tuple[KayaProcess, Path], role: str, kind: str, subject: str
) -> None:
    node, security = secure_node
    nc, refused = await connect_as(security, role, node.url)
    try:
        if kind == "pub":
            await nc.publish(subject, b"{}")  # type: ignore[attr-defined]
        else:
            await nc.subscribe(subject, queue="kaya")  # type: ignore[attr-defined]
        await nc.flush()  # type: ignore[attr-defined]
        await until_refused(refused, subject)
    finally:
        await nc.close()  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.parametrize(("role", "subject"), JETSTREAM_FORBIDDEN)
async def test_only_admin_deletes_or_purges_streams(
    secure_node: tuple[KayaProcess, Path], role: str, subject: str
) -> None:
    import nats.errors

    node, security = secure_node
    admin, _ = await connect_as(security, "admin", node.url)
    nc, _ = await connect_as(security, role, node.url)
    try:
        stream = subject.rsplit(".", 1)[1]
        before = await admin.jetstream().stream_info(stream)  # type: ignore[attr-defined]
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(subject, b"", timeout=1.0)  # type: ignore[attr-defined]
        after = await admin.jetstream().stream_info(stream)  # type: ignore[attr-defined]
        assert after.state.messages >= before.state.messages  # neither purged nor gone
    finally:
        await nc.close()  # type: ignore[attr-defined]
        await admin.close()  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_each_role_may_do_what_its_role_allows(
    secure_node: tuple[KayaProcess, Path],
) -> None:
    from kaya import Client
    from kaya.actors.errors import Forbidden

    node, security = secure_node
    async with Client.connect(tls=context(security, "client"), attempts=3) as client:
        await client.send("account", "m-1", {"type": "Open", "owner": "m", "currency": "EUR"})
        assert (await client.get("account", "m-1")).version == 1  # (the module's only test of it)
        assert "currencies" in await client.view("analytics")
    async with Client.connect(tls=context(security, "reader"), attempts=1) as reader:
        assert (await reader.get("account", "m-1")).version == 1
        assert "currencies" in await reader.view("analytics")
        with pytest.raises(Forbidden, match="may not publish"):
            await reader.send("account", "m-1", {"type": "Deposit", "amount": 1})
    nc, refused = await connect_as(security, "reader", node.url)
    try:  # a reader reads the event stream
        info = await nc.jetstream().stream_info("KAYA_EVENTS")  # type: ignore[attr-defined]
        assert info.state.messages >= 1
    finally:
        await nc.close()  # type: ignore[attr-defined]
    assert refused == []
    admin, refused = await connect_as(security, "admin", node.url)
    try:  # only admin manages streams
        js = admin.jetstream()  # type: ignore[attr-defined]
        await js.add_stream(name="SCRATCH", subjects=["scratch.>"])
        assert await js.delete_stream("SCRATCH") is True
    finally:
        await admin.close()  # type: ignore[attr-defined]
    assert refused == []


def test_security_init_and_server_config_for_an_external_server(tmp_path: Path) -> None:
    made = kaya("security", "init", "--data-dir", str(tmp_path), "--host", "nats.example")
    assert made.returncode == 0, made.stderr
    security = tmp_path / "security"
    for role in ROLES:
        assert orjson.loads(Path(context(security, role)).read_bytes())["url"] == (
            "tls://127.0.0.1:4222"
        )
    server = x509.load_pem_x509_certificate((security / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "nats.example" in names.get_values_for_type(x509.DNSName)
    config = tmp_path / "kaya.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\n[security]\nenabled = true\n')
    printed = kaya("server-config", "--config", str(config), "--app", "examples.bank:app")
    assert printed.returncode == 0, printed.stderr
    text = printed.stdout
    assert "verify_and_map: true" in text
    assert f'ca_file: "{security / "ca.pem"}"' in text
    assert '{ user: "CN=kaya-client", permissions: { publish: { allow: ["kaya.cmd.>"' in text
    assert '"kaya.evt.account.>", "kaya.evt.transfer.>"' in text  # the app's entities only


@pytest.mark.anyio
async def test_jetstream_files_hold_no_plaintext(secure_node: tuple[KayaProcess, Path]) -> None:
    """A canary owner name reaches KAYA_EVENTS sealed, and no file under the server's store
    has it (the server encrypts them too: `encryption_key`)."""
    from kaya import Client

    node, security = secure_node
    canary = "canary-owner-5d2f8e"
    async with Client.connect(tls=context(security, "client"), attempts=3) as client:
        await client.send(
            "account", "canary-1", {"type": "Open", "owner": canary, "currency": "EUR"}
        )
    admin, _ = await connect_as(security, "admin", node.url)
    try:
        js = admin.jetstream()  # type: ignore[attr-defined]

        from tests.test_cluster import eventually

        subject = "kaya.evt.account.canary-1"
        await eventually(  # the relay publishes on its own schedule
            lambda: js.stream_info("KAYA_EVENTS", subjects_filter=subject),
            lambda info: bool(info.state.subjects),
            10,
        )
        msg = await js.get_last_msg("KAYA_EVENTS", "kaya.evt.account.canary-1")
        assert canary.encode() not in msg.data  # sealed (tests/test_privacy.py)
        assert orjson.loads(msg.data)["owner"].startswith("kaya:enc:v1:")
    finally:
        await admin.close()  # type: ignore[attr-defined]
    store = security.parent / "nats"
    files = [p for p in store.rglob("*") if p.is_file() and p.name != "nats-server.conf"]
    assert files
    assert [p for p in files if canary.encode() in p.read_bytes()] == []


def test_a_tool_refused_by_its_role_says_forbidden_at_once(
    secure_node: tuple[KayaProcess, Path],
) -> None:
    """nats-server answers a forbidden JetStream call with silence; Kaya's tools know the
    role's permissions and refuse before sending."""
    _, security = secure_node
    purged = kaya("dlq", "purge", "--context", context(security, "client"), "--timeout", "30")
    assert purged.returncode == 1, purged
    assert purged.stderr.strip().splitlines() == [
        "error: forbidden: this role may not publish to $JS.API.STREAM.INFO.KAYA_DLQ"
    ]
    for role in ("reader", "admin"):  # a reader looks at the streams and the dead letters
        listed = kaya("streams", "--context", context(security, role))
        assert listed.returncode == 0, listed.stderr
        assert "KAYA_EVENTS" in listed.stdout
        dead = kaya("dlq", "list", "--context", context(security, role))
        assert dead.returncode == 0, dead.stderr
