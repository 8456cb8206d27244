"""The web console (`/console`) and its JSON (`/v1/admin/*`), against a real node with JWTs on.

The endpoints over HTTP (admin claim required, purge only with confirmation, sagas with
why they failed), then the page in headless Chromium (Debian's `chromium`, driven by
Playwright's Python API): a token given, an account looked up (state, events with times
and trace ids), a dead letter shown, replayed (and applied), another purged after the
confirm dialog; a screenshot saved to docs/console.png; no console errors.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import httpx
import pytest

from examples.bank import make_app
from kaya.actors.wire import Delivered
from kaya.app.config import (
    ConsumersConfig,
    HttpConfig,
    IngressConfig,
    JwtConfig,
    SecurityConfig,
)
from kaya.app.events.consumers import Consumer, Effects
from kaya.app.node import Node, open_node
from kaya.app.security.tokens import mint, new_signing_key
from tests.conftest import node_config
from tests.servers import NatsServer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "console.png"
"""The README's picture: written when missing or with KAYA_UPDATE_SCREENSHOT=1, so a test
run leaves the tree clean (the ids and times in it change on every run)."""
ISSUER, AUDIENCE = "https://id.example.test", "kaya-bank"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
NO_CHROMIUM = "chromium not found: apt-get install chromium (Debian) for the console's browser test"


def chromium_path() -> str | None:
    return os.environ.get("KAYA_CHROMIUM") or shutil.which("chromium") or None


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """One loop is enough here: the gateway's loops are tested in tests/test_http.py."""
    return ("asyncio", {})


class Fussy(Consumer):
    """Fails on a deposit of 13 until fixed: a dead letter on demand."""

    name = "fussy"
    fixed: ClassVar[bool] = False
    ddl = "CREATE TABLE IF NOT EXISTS fussy_seen (event_id TEXT PRIMARY KEY, amount INTEGER)"
    tables = ("fussy_seen",)

    async def handle(self, event: Delivered, effects: Effects) -> None:
        amount = event.decode().get("amount", 0)
        if amount == 13 and not self.fixed:
            raise ValueError("13 is unlucky")
        effects.execute("INSERT OR IGNORE INTO fussy_seen VALUES (?, ?)", (event.event_id, amount))


@dataclass
class Console:
    node: Node
    url: str
    client: httpx.AsyncClient
    key: bytes

    def token(self, subject: str = "operator", **claims: Any) -> str:
        return mint(self.key, subject=subject, issuer=ISSUER, audience=AUDIENCE, claims=claims)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(admin=True)}"}

    async def send(self, entity_id: str, command: dict[str, Any], **headers: str) -> Any:
        response = await self.client.post(
            f"/v1/account/{entity_id}", json=command, headers={**self.admin(), **headers}
        )
        assert response.status_code == 200, response.text
        return response.json()

    async def dead_letters(self) -> list[Any]:
        response = await self.client.get("/v1/admin/dlq", headers=self.admin())
        assert response.status_code == 200, response.text
        letters: list[Any] = response.json()["letters"]
        return letters

    async def dead_letter(self, entity_id: str) -> None:
        """Deposit 13 on `entity_id` and wait until `fussy` gave up on it."""
        before = len(await self.dead_letters())
        await self.send(entity_id, {"type": "Deposit", "amount": 13})
        with anyio.fail_after(20):
            while True:
                if len(await self.dead_letters()) > before:
                    return
                await anyio.sleep(0.05)


@pytest.fixture
async def console(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Console]:
    security = tmp_path / "security"
    signing, _ = new_signing_key(security)
    config = node_config(
        nats_server,
        tmp_path,
        # the browser's driver shares this test's event loop with the node: its lag is the
        # harness's, not the node's, so shedding on lag is off here
        ingress=IngressConfig(queue_group=f"kaya-{uuid.uuid4().hex[:8]}", max_loop_lag=0),
        http=HttpConfig(address="127.0.0.1:0"),
        consumers=ConsumersConfig(max_attempts=2, backoff_initial=0.01, backoff_max=0.02),
        security=SecurityConfig(
            dir=str(security),
            jwt=JwtConfig(
                enabled=True, issuer=ISSUER, audience=AUDIENCE, key_file="jwt-public.pem"
            ),
        ),
    )
    Fussy.fixed = False
    bank = make_app()
    async with open_node(config, make_app(consumers=[*bank.consumers, Fussy()])) as node:
        assert node.http_url is not None
        async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as client:
            yield Console(node, node.http_url, client, signing.read_bytes())


def _code(response: httpx.Response) -> str:
    body = response.json()
    assert body["ok"] is False
    assert set(body["error"]) == {"code", "message"}
    code: str = body["error"]["code"]
    return code


# ---- the endpoints ----------------------------------------------------------------------


async def test_admin_endpoints_need_a_token_with_the_admin_claim(console: Console) -> None:
    client = console.client
    page = await client.get("/console")  # the page itself holds no data
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert b"/console/console.js" in page.content
    for name in ("console.js", "console.css"):
        assert (await client.get(f"/console/{name}")).status_code == 200
    assert (await client.get("/console/nothing.js")).status_code == 404

    anonymous = await client.get("/v1/admin/status")
    assert (anonymous.status_code, _code(anonymous)) == (401, "unauthorized")
    forged = await client.get("/v1/admin/status", headers={"Authorization": "Bearer x.y.z"})
    assert (forged.status_code, _code(forged)) == (401, "unauthorized")
    alice = {"Authorization": f"Bearer {console.token('alice')}"}
    for path in ("/v1/admin/status", "/v1/admin/dlq", "/v1/admin/schemas"):
        refused = await client.get(path, headers=alice)
        assert (refused.status_code, _code(refused)) == (403, "forbidden"), path
    refused = await client.post("/v1/admin/dlq/purge", json={"confirm": True}, headers=alice)
    assert refused.status_code == 403

    status = (await client.get("/v1/admin/status", headers=console.admin())).json()
    assert status["ok"] is True
    assert status["ready"] is True
    assert status["entities"] == ["account", "transfer"]
    assert len(status["shard_owners"]) == status["shards"]
    assert {o["node"] for o in status["shard_owners"].values()} == {"test"}

    schemas = (await client.get("/v1/admin/schemas", headers=console.admin())).json()
    assert schemas["source"] == "kaya_schemas"
    assert "account.Deposit.v1" in schemas["schemas"]


async def test_purge_needs_confirmation_and_sagas_say_why_they_failed(console: Console) -> None:
    client, admin = console.client, console.admin()
    source = f"acc-{uuid.uuid4().hex[:8]}"
    await console.send(source, {"type": "Open", "owner": "alice", "currency": "EUR"})
    await console.dead_letter(source)

    unconfirmed = await client.post("/v1/admin/dlq/purge", json={}, headers=admin)
    assert (unconfirmed.status_code, _code(unconfirmed)) == (400, "bad_request")
    assert len(await console.dead_letters()) == 1
    (letter,) = await console.dead_letters()
    shown = (await client.get(f"/v1/admin/dlq/{letter['seq']}", headers=admin)).json()
    assert shown["consumer"] == "fussy"
    assert shown["data"] == {"type": "Deposited", "amount": 13}
    assert "13 is unlucky" in shown["error"]
    missing = await client.get("/v1/admin/dlq/999999", headers=admin)
    assert missing.status_code == 404
    purged = await client.post(
        "/v1/admin/dlq/purge", json={"confirm": True, "consumer": "fussy"}, headers=admin
    )
    assert purged.json() == {"ok": True, "purged": 1}
    assert await console.dead_letters() == []

    transfer = f"tr-{uuid.uuid4().hex[:8]}"
    started = await client.post(
        f"/v1/transfer/{transfer}",
        json={"type": "Start", "source": source, "target": "nobody", "amount": 1000},
        headers=admin,
    )
    assert started.status_code == 200, started.text
    with anyio.fail_after(20):
        while True:
            body = (await client.get("/v1/admin/sagas?status=failed", headers=admin)).json()
            if body["sagas"]:
                break
            await anyio.sleep(0.05)
    (saga,) = body["sagas"]
    assert (saga["entity"], saga["id"], saga["last_event"]) == ("transfer", transfer, "Failed")
    assert saga["reason"].startswith("debit refused")
    assert body["counts"] == {"in_flight": 0, "failed": 1, "completed": 0}


# ---- the page in a browser --------------------------------------------------------------


async def test_the_console_in_a_browser(console: Console, tmp_path: Path) -> None:
    executable = chromium_path()
    if executable is None:
        pytest.skip(NO_CHROMIUM)
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="playwright not installed: pip install -e '.[dev]'"
    )
    account = f"acc-{uuid.uuid4().hex[:8]}"
    traceparent = f"00-{TRACE}-00f067aa0ba902b7-01"
    await console.send(account, {"type": "Open", "owner": "alice", "currency": "EUR"})
    await console.send(account, {"type": "Deposit", "amount": 250}, traceparent=traceparent)
    await console.dead_letter(account)
    (letter,) = await console.dead_letters()
    failed = f"tr-{uuid.uuid4().hex[:8]}"
    await console.client.post(
        f"/v1/transfer/{failed}",
        json={"type": "Start", "source": account, "target": "nobody", "amount": 10_000},
        headers=console.admin(),
    )

    errors: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda msg: (
                    errors.append(f"console {msg.type}: {msg.text}")
                    if msg.type in ("error", "warning")
                    else None
                ),
            )
            page.on("dialog", lambda dialog: dialog.accept())
            await page.goto(f"{console.url}/console")
            expect = playwright_api.expect
            # no token yet: the node says 401, and the page says to give one
            await expect(page.locator("#message")).to_contain_text("401")
            before_token = [e for e in errors if "401" not in e]
            assert before_token == []
            errors.clear()

            await page.fill("#token", console.token("operator", admin=True))
            await page.click("#token-form button")
            await expect(page.locator("#node-cards")).to_contain_text("ready")
            await expect(page.locator("#node-outcomes")).to_contain_text("ok")
            await expect(page.locator("#node-consumers")).to_contain_text("fussy")
            await expect(page.locator("#node-shards")).to_contain_text("this node")
            assert await page.locator("#node-name").inner_text() == "test"

            # the entity browser: state, then events with their times and trace ids
            await page.click("button[data-tab=entities]")
            await page.fill("#entity-name", "account")
            await page.fill("#entity-id", account)
            await page.click("#entity-form button")
            await expect(page.locator("#entity-state")).to_contain_text('"owner": "alice"')
            events = page.locator("#entity-events")
            await expect(events).to_contain_text("Deposited")
            await expect(events).to_contain_text(TRACE)
            assert "Opened" in await events.inner_text()
            rows = await events.locator("tbody tr").all_inner_texts()
            assert len(rows) >= 3
            assert all("Z" in r or "+00:00" in r for r in rows)
            shot = tmp_path / "console.png"
            await page.screenshot(path=str(shot))

            # the sagas: the failed transfer and why
            await page.click("button[data-tab=sagas]")
            sagas = page.locator("#saga-list")
            await expect(sagas).to_contain_text(failed)
            await expect(sagas).to_contain_text("debit refused")

            # the schema registry
            await page.click("button[data-tab=schemas]")
            await expect(page.locator("#schema-list")).to_contain_text("account.Deposit.v1")
            await expect(page.locator("#schema-source")).to_contain_text("kaya_schemas")

            # the DLQ: show the dead letter, fix the consumer, replay it
            await page.click("button[data-tab=dlq]")
            dlq = page.locator("#dlq-list")
            await expect(dlq).to_contain_text("13 is unlucky")
            await dlq.locator("button.show").first.click()
            await expect(page.locator("#dlq-letter")).to_contain_text('"amount": 13')
            Fussy.fixed = True
            await dlq.locator("button.replay").first.click()
            await expect(page.locator("#message")).to_contain_text("replayed 1")
            await expect(dlq).to_contain_text("none")
            assert await console.dead_letters() == []
            rows = await console.node.store.query("SELECT amount FROM fussy_seen")
            assert (13,) in rows  # applied by the replay

            # another one, purged after the confirm dialog
            Fussy.fixed = False
            await console.dead_letter(account)
            await page.click("#dlq-refresh")
            await expect(dlq).to_contain_text("13 is unlucky")
            await page.click("#dlq-purge")
            await expect(page.locator("#message")).to_contain_text("purged 1")
            assert await console.dead_letters() == []
            text = await page.locator("main").inner_text()
            assert text.strip()
        finally:
            await browser.close()
    assert errors == []
    assert letter["consumer"] == "fussy"
    assert shot.stat().st_size > 10_000  # not a blank page
    if not SCREENSHOT.exists() or os.environ.get("KAYA_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
