"""The HTTP gateway (`[http] address`): the wire contract over HTTP, against a real node.

Every status of the contract's codes (through a real node where a request can cause it,
through a stand-in responder on NATS for the rest), idempotency, state, paged history,
views, JWTs and the policy, `/openapi.json` checked by an OpenAPI validator and covering
every command of the bank, `/docs`, the config key and the `kaya run` flag.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from openapi_spec_validator import validate

from examples.bank import make_app
from kaya.actors.errors import ErrorCode
from kaya.actors.wire import error_reply
from kaya.app.cli.common import innermost
from kaya.app.config import (
    ConfigError,
    HttpConfig,
    IngressConfig,
    JwtConfig,
    MetricsConfig,
    SecurityConfig,
    load_config,
    parse_config,
    with_overrides,
)
from kaya.app.http import STATUS, Gateway, openapi_document, status_for
from kaya.app.http.gateway import _mask
from kaya.app.node import open_node
from kaya.app.security.tokens import mint, new_signing_key
from kaya.store import open_event_store
from tests.conftest import node_config
from tests.servers import NatsServer, free_port, start_kaya, stop_pid, write_config

pytestmark = pytest.mark.anyio

OPEN = {"type": "Open", "owner": "alice", "currency": "EUR"}
ISSUER, AUDIENCE = "https://id.example.test", "kaya-bank"


@pytest.fixture
async def gateway(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = node_config(nats_server, tmp_path, http=HttpConfig(address="127.0.0.1:0"))
    async with open_node(config, make_app()) as node:
        assert node.http_url is not None
        async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as client:
            yield client


def _error(response: httpx.Response) -> str:
    body = response.json()
    assert body["ok"] is False
    assert set(body["error"]) == {"code", "message"}
    code: str = body["error"]["code"]
    return code


# ---- the status table ------------------------------------------------------------------


def test_every_contract_code_has_its_status() -> None:
    assert set(STATUS) == {"ok", *get_args(ErrorCode)}
    assert {code: status_for(code) for code in STATUS} == {
        "ok": 200,
        "bad_request": 400,
        "unknown_entity": 404,
        "unknown_command": 404,
        "conflict": 409,
        "rejected": 422,
        "unauthorized": 401,
        "forbidden": 403,
        "overloaded": 429,
        "unavailable": 503,
        "timeout": 504,
        "internal": 500,
    }
    assert status_for("something_new") == 500


@pytest.fixture
async def stand_in(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[tuple[NATS, Any]]:
    """A gateway (ASGI, no socket) on a NATS server where no node serves: the test plays
    the node on the subjects it subscribes to."""
    nc = await nats.connect(nats_server.url)
    async with open_event_store(tmp_path / "kaya.db") as store:
        gateway = Gateway(nc, make_app(), store, max_body=1024, timeout=0.5)
        transport = httpx.ASGITransport(app=gateway.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield nc, client
    await nc.close()


@pytest.mark.parametrize("code", sorted(get_args(ErrorCode)))
async def test_each_error_code_a_node_replies_gets_its_status(
    stand_in: tuple[NATS, Any], code: str
) -> None:
    nc, client = stand_in

    async def reply(msg: Msg) -> None:
        await msg.respond(error_reply(code, f"said {code}"))  # type: ignore[arg-type]

    await nc.subscribe("kaya.shard.*.cmd.account.a-1", cb=reply)  # the server maps it
    await nc.flush()
    response = await client.post("/v1/account/a-1", json={"type": "Deposit", "amount": 1})
    assert response.status_code == STATUS[code]
    assert response.json() == {"ok": False, "error": {"code": code, "message": f"said {code}"}}
    if code in ("overloaded", "unavailable"):
        assert response.headers["retry-after"] == "1"
    if code == "unauthorized":
        assert response.headers["www-authenticate"] == "Bearer"


async def test_no_node_is_503_and_no_reply_in_time_is_504(stand_in: tuple[NATS, Any]) -> None:
    nc, client = stand_in
    response = await client.post("/v1/account/a-1", json={"type": "Deposit", "amount": 1})
    assert response.status_code == 503
    assert _error(response) == "unavailable"
    await nc.subscribe("kaya.shard.*.qry.account.a-2")  # takes the request, never answers
    await nc.flush()
    response = await client.get("/v1/account/a-2")
    assert response.status_code == 504
    assert _error(response) == "timeout"


async def test_a_body_over_max_body_is_413_with_the_contracts_body(
    stand_in: tuple[NATS, Any],
) -> None:
    _, client = stand_in
    response = await client.post("/v1/account/a-1", content=b"{" + b" " * 2000 + b"}")
    assert response.status_code == 413
    assert _error(response) == "bad_request"
    assert "exceeds the limit of 1024" in response.json()["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"type": "Deposit", "amount": 1, "pad": "'
        for _ in range(10):
            yield b"x" * 200

    streamed = await client.post("/v1/account/a-1", content=chunks())
    assert streamed.status_code == 413
    assert _error(streamed) == "bad_request"


# ---- through a real node ---------------------------------------------------------------


async def test_a_command_returns_the_contracts_reply(gateway: httpx.AsyncClient) -> None:
    opened = await gateway.post("/v1/account/h-1", json=OPEN)
    assert opened.status_code == 200
    assert opened.json() == {
        "ok": True,
        "entity": "account",
        "id": "h-1",
        "version": 1,
        "events": [{"type": "Opened", "owner": "alice", "currency": "EUR", "kind": "personal"}],
    }
    deposited = await gateway.post("/v1/account/h-1", json={"type": "Deposit", "amount": 7})
    assert deposited.status_code == 200
    assert deposited.json()["version"] == 2
    state = await gateway.get("/v1/account/h-1")
    assert state.status_code == 200
    assert state.json()["state"] == {
        "owner": "alice",
        "currency": "EUR",
        "balance": 7,
        "status": "open",
    }
    assert state.json()["version"] == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        pytest.param("/v1/account/h-2", b"{not json", 400, "bad_request", id="bad-json"),
        pytest.param("/v1/account/h-2", b"[1, 2]", 400, "bad_request", id="not-an-object"),
        pytest.param("/v1/Account/h-2", b"{}", 400, "bad_request", id="bad-entity-name"),
        pytest.param("/v1/account/h.2", b"{}", 400, "bad_request", id="bad-id"),
        pytest.param("/v1/account/" + "x" * 65, b"{}", 400, "bad_request", id="long-id"),
        pytest.param("/v1/nosuch/h-2", b'{"type": "X"}', 404, "unknown_entity", id="entity"),
        pytest.param("/v1/account/h-2", b'{"type": "Fly"}', 404, "unknown_command", id="command"),
        pytest.param("/v1/nowhere", b"{}", 404, "bad_request", id="no-route"),
    ],
)
async def test_refusals_get_their_status_and_the_contracts_body(
    gateway: httpx.AsyncClient, path: str, body: bytes, status: int, code: str
) -> None:
    response = await gateway.post(path, content=body)
    assert response.status_code == status
    assert _error(response) == code


async def test_a_rule_that_says_no_is_422_and_changes_nothing(gateway: httpx.AsyncClient) -> None:
    await gateway.post("/v1/account/h-3", json=OPEN)
    response = await gateway.post("/v1/account/h-3", json={"type": "Withdraw", "amount": 1000})
    assert response.status_code == 422
    assert _error(response) == "rejected"
    assert (await gateway.get("/v1/account/h-3")).json()["version"] == 1


async def test_the_same_idempotency_key_is_one_effect_and_another_body_409(
    gateway: httpx.AsyncClient,
) -> None:
    await gateway.post("/v1/account/h-4", json=OPEN)
    key = {"Idempotency-Key": f"deposit-{uuid.uuid4().hex}"}
    deposit = {"type": "Deposit", "amount": 5}
    first = await gateway.post("/v1/account/h-4", json=deposit, headers=key)
    again = await gateway.post("/v1/account/h-4", json=deposit, headers=key)
    assert first.status_code == again.status_code == 200
    assert first.content == again.content
    history = (await gateway.get("/v1/account/h-4/events")).json()
    assert [e["type"] for e in history["events"]] == ["Opened", "Deposited"]
    assert history["events"][1]["command_id"] == key["Idempotency-Key"]
    assert (await gateway.get("/v1/account/h-4")).json()["state"]["balance"] == 5
    other = await gateway.post(
        "/v1/account/h-4", json={"type": "Deposit", "amount": 6}, headers=key
    )
    assert other.status_code == 409
    assert _error(other) == "conflict"


async def test_the_history_is_paged(gateway: httpx.AsyncClient) -> None:
    await gateway.post("/v1/account/h-5", json=OPEN)
    for amount in range(1, 6):
        await gateway.post("/v1/account/h-5", json={"type": "Deposit", "amount": amount})
    seen: list[int] = []
    after: int | None = 0
    pages = 0
    while after is not None:
        page = await gateway.get("/v1/account/h-5/events", params={"after": after, "limit": 2})
        assert page.status_code == 200
        body = page.json()
        assert body["version"] == 6
        assert len(body["events"]) <= 2
        seen += [e["version"] for e in body["events"]]
        after = body["next"]
        pages += 1
    assert seen == [1, 2, 3, 4, 5, 6]
    assert pages == 3
    first = (await gateway.get("/v1/account/h-5/events", params={"limit": 1})).json()["events"][0]
    assert first["type"] == "Opened"
    assert first["data"]["owner"] == "alice"  # security is off: stored in the clear
    assert first["recorded_at"].endswith("Z")  # as `kaya history` prints it
    assert first["masked"] is False
    for query in ({"limit": 0}, {"limit": 1001}, {"after": -1}, {"after": "x"}):
        bad = await gateway.get("/v1/account/h-5/events", params=query)
        assert bad.status_code == 400
        assert _error(bad) == "bad_request"
    unknown = await gateway.get("/v1/nosuch/h-5/events")
    assert unknown.status_code == 404


def test_sealed_values_are_masked() -> None:
    data = {"type": "Opened", "owner": "kaya:enc:v1:AAAA", "n": [1, {"x": "kaya:enc:v1:B"}]}
    assert _mask(data) == ({"type": "Opened", "owner": "***", "n": [1, {"x": "***"}]}, True)
    assert _mask({"owner": "alice"}) == ({"owner": "alice"}, False)


async def test_a_view_takes_query_parameters(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/v1/views/analytics", params={"currency": "EUR"})
    assert response.status_code == 200
    assert response.json()["ok"] is True
    assert response.json()["view"] == "analytics"
    unknown = await gateway.get("/v1/views/nosuch")
    assert unknown.status_code == 400
    assert "no view named 'nosuch'" in unknown.json()["error"]["message"]


async def test_traceparent_goes_through_and_comes_back(gateway: httpx.AsyncClient) -> None:
    trace = "00-" + uuid.uuid4().hex + "-" + uuid.uuid4().hex[:16] + "-01"
    response = await gateway.post("/v1/account/h-6", json=OPEN, headers={"traceparent": trace})
    assert response.status_code == 200
    assert response.headers["traceparent"].split("-")[1] == trace.split("-")[1]
    events = (await gateway.get("/v1/account/h-6/events")).json()["events"]
    assert events[0]["traceparent"].split("-")[1] == trace.split("-")[1]


async def test_openapi_is_valid_and_covers_every_command(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    covered = {}
    for entity in ("account", "transfer"):
        body = document["paths"][f"/v1/{entity}/{{id}}"]["post"]["requestBody"]
        refs = body["content"]["application/json"]["schema"]["oneOf"]
        covered[entity] = [ref["$ref"].rsplit(".", 1)[-1] for ref in refs]
        assert f"/v1/{entity}/{{id}}/events" in document["paths"]
        assert "get" in document["paths"][f"/v1/{entity}/{{id}}"]
    assert covered == {"account": ["Open", "Deposit", "Withdraw", "Close"], "transfer": ["Start"]}
    assert "/v1/views/analytics" in document["paths"]
    # generated from the app: every command of every entity, whatever the app
    app = make_app()
    assert openapi_document(app) == document | {"info": openapi_document(app)["info"]}
    docs = await gateway.get("/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    for name in ("Open", "Deposit", "Withdraw", "Close", "Start", "/v1/views/analytics"):
        assert name in docs.text
    assert "<script" not in docs.text


async def test_the_asyncapi_document_is_served_beside_the_docs(
    gateway: httpx.AsyncClient,
) -> None:
    """The NATS side of the same app, as `kaya catalog --format asyncapi` writes it."""
    from kaya.app.schemas.catalog import build_catalog, render_asyncapi

    response = await gateway.get("/asyncapi.json")
    assert response.status_code == 200
    document = response.json()
    app = make_app()
    assert document == render_asyncapi(
        build_catalog(app.registry, [type(c) for c in app.consumers])
    )
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert {"kaya.cmd.account.{id}", "kaya.view.{name}", "kaya.notify.{token}"} <= addresses
    assert "/asyncapi.json" in (await gateway.get("/docs")).text


async def test_a_wrong_method_is_405_with_a_contract_body(gateway: httpx.AsyncClient) -> None:
    response = await gateway.delete("/v1/account/h-7")
    assert response.status_code == 405
    assert _error(response) == "bad_request"


# ---- JWTs and the policy -----------------------------------------------------------------


@pytest.fixture
async def jwt_gateway(
    nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, bytes]]:
    security = tmp_path / "security"
    signing, _ = new_signing_key(security)
    config = node_config(
        nats_server,
        tmp_path,
        http=HttpConfig(address="127.0.0.1:0"),
        security=SecurityConfig(
            dir=str(security),
            jwt=JwtConfig(
                enabled=True, issuer=ISSUER, audience=AUDIENCE, key_file="jwt-public.pem"
            ),
        ),
    )
    async with open_node(config, make_app()) as node:
        assert node.http_url is not None
        async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as client:
            yield client, signing.read_bytes()


def _bearer(key: bytes, subject: str, **claims: Any) -> dict[str, str]:
    token = mint(key, subject=subject, issuer=ISSUER, audience=AUDIENCE, claims=claims or None)
    return {"Authorization": f"Bearer {token}"}


async def test_without_a_token_401_and_anothers_account_403(
    jwt_gateway: tuple[httpx.AsyncClient, bytes],
) -> None:
    client, key = jwt_gateway
    alice, bob = _bearer(key, "alice"), _bearer(key, "bob")
    deposit = {"type": "Deposit", "amount": 5}
    for response in (
        await client.post("/v1/account/j-1", json=OPEN),
        await client.get("/v1/account/j-1"),
        await client.get("/v1/account/j-1/events"),
        await client.get("/v1/views/analytics"),
    ):
        assert response.status_code == 401
        assert _error(response) == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    expired = _bearer(key, "alice", exp=1)
    assert (await client.post("/v1/account/j-1", json=OPEN, headers=expired)).status_code == 401
    assert (await client.post("/v1/account/j-1", json=OPEN, headers=alice)).status_code == 200
    assert (await client.post("/v1/account/j-1", json=deposit, headers=alice)).status_code == 200
    for response in (
        await client.post("/v1/account/j-1", json=deposit, headers=bob),
        await client.get("/v1/account/j-1", headers=bob),
        await client.get("/v1/account/j-1/events", headers=bob),  # the history is the state's
    ):
        assert response.status_code == 403
        assert _error(response) == "forbidden"
    mine = await client.get("/v1/account/j-1/events", headers=alice)
    assert [e["type"] for e in mine.json()["events"]] == ["Opened", "Deposited"]
    admin = _bearer(key, "root", admin=True)
    assert (await client.get("/v1/account/j-1", headers=admin)).json()["state"]["balance"] == 5


# ---- config and the command line ------------------------------------------------------------


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:", "127.0.0.1:http", ":70000"])
def test_a_malformed_http_address_is_refused_naming_the_key(address: str) -> None:
    with pytest.raises(ConfigError, match=r"http\.address"):
        parse_config(f'[http]\naddress = "{address}"\n')


@pytest.mark.parametrize(
    "toml",
    [
        '[http]\naddress = "127.0.0.1:4222"\n',
        '[http]\naddress = "0.0.0.0:8222"\n',
        '[http]\naddress = "127.0.0.1:9464"\n[metrics]\naddress = "localhost:9464"\n',
    ],
)
def test_an_http_address_on_another_listeners_port_is_refused(toml: str) -> None:
    with pytest.raises(ConfigError, match=r"http\.address.*(nats\.|metrics\.address)"):
        parse_config(toml)


def test_http_is_off_by_default_and_on_in_the_repositorys_config(tmp_path: Path) -> None:
    assert HttpConfig().address == ""
    repo = Path(__file__).resolve().parent.parent
    assert load_config(repo / "config.toml").http.address == "127.0.0.1:8080"
    path = tmp_path / "kaya.toml"
    path.write_text("")
    assert with_overrides(load_config(path), http_address="127.0.0.1:0").http.address == (
        "127.0.0.1:0"
    )
    with pytest.raises(ConfigError, match=r"^command line: .*http\.address"):
        with_overrides(load_config(path), http_address="127.0.0.1:4222")
    with pytest.raises(ConfigError, match=r"http\.address.*metrics\.address"):
        with_overrides(load_config(path), http_address="127.0.0.1:1", metrics_address=":1")


async def test_a_busy_http_port_stops_the_node_with_one_line(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        config = node_config(
            nats_server, tmp_path, http=HttpConfig(address=f"127.0.0.1:{port}"),
            metrics=MetricsConfig(), ingress=IngressConfig(queue_group=uuid.uuid4().hex),
        )  # fmt: skip
        with pytest.raises(BaseException) as raised:  # noqa: PT011 - checked just below
            async with open_node(config, make_app()) as node:
                raise AssertionError(f"served on {node.http_url}")
    failure = innermost(raised.value)  # what `kaya run` prints, in one line
    assert isinstance(failure, OSError)
    assert str(failure).startswith(f"cannot serve HTTP on 127.0.0.1:{port}: ")


@pytest.mark.slow
def test_kaya_run_http_address_serves_and_says_where(tmp_path: Path) -> None:
    config = write_config(tmp_path / "kaya.toml", tmp_path / "data", port=free_port())
    from tests.servers import VENV_BIN

    argv = [str(VENV_BIN / "kaya"), "run", "--config", str(config), "--http-address", "127.0.0.1:0"]
    node = start_kaya(config, argv=argv)
    try:
        url = node.ready_line.split(", http ")[1].split(")")[0].strip()
        assert url.startswith("http://127.0.0.1:")
        opened = httpx.post(f"{url}/v1/account/cli-1", json=OPEN, timeout=10)
        assert opened.status_code == 200
        assert orjson.loads(opened.content)["version"] == 1
        assert httpx.get(f"{url}/openapi.json", timeout=10).json()["openapi"] == "3.1.0"
    finally:
        assert stop_pid(node.proc) == 0


@pytest.mark.slow
def test_a_secure_node_serves_http_as_a_client_and_masks_sealed_history(tmp_path: Path) -> None:
    """Security on: the gateway connects with the `client` certificate (the node's role may
    not send commands); stored events hold ciphertext, which the history shows as `***`."""
    config = write_config(
        tmp_path / "kaya.toml",
        tmp_path / "data",
        port=free_port(),
        extra='[security]\nenabled = true\n[http]\naddress = "127.0.0.1:0"\n',
    )
    node = start_kaya(config)
    try:
        url = node.ready_line.split(", http ")[1].split(")")[0].strip()
        opened = httpx.post(f"{url}/v1/account/sec-1", json=OPEN, timeout=10)
        assert opened.status_code == 200
        assert opened.json()["events"][0]["owner"] == "alice"  # the caller's own reply
        state = httpx.get(f"{url}/v1/account/sec-1", timeout=10).json()
        assert state["state"]["owner"] == "alice"
        event = httpx.get(f"{url}/v1/account/sec-1/events", timeout=10).json()["events"][0]
        assert event["data"]["owner"] == "***"
        assert event["masked"] is True
        assert event["data"]["currency"] == "EUR"
    finally:
        assert stop_pid(node.proc) == 0
