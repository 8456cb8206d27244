"""Shared fixtures: a real nats-server and an in-process node per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from examples.bank import make_app
from kaya.app.config import Config, IngressConfig, NatsConfig, NodeConfig
from kaya.app.node import Node, open_node
from tests.servers import NatsServer, start_nats_server


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """nats-py and aiosqlite are asyncio-only; `kaya run` uses uvloop, so test both loops."""
    backend: tuple[str, dict[str, Any]] = request.param
    return backend


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A fresh server per test (it starts in tens of milliseconds): streams and durable
    consumers are fixed names in the contract, so tests must not share them."""
    server = start_nats_server(tmp_path_factory.mktemp("nats"))
    try:
        yield server
    finally:
        server.stop()


def node_config(nats_server: NatsServer, data_dir: Path, **sections: Any) -> Config:
    config = Config(
        node=NodeConfig(name="test", data_dir=str(data_dir)),
        nats=NatsConfig(url=nats_server.url),
        ingress=IngressConfig(queue_group=f"kaya-{uuid.uuid4().hex[:8]}"),
    )
    return msgspec.structs.replace(config, **sections) if sections else config


@pytest.fixture
async def node(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Node]:
    async with open_node(node_config(nats_server, tmp_path / "node"), make_app()) as running:
        yield running


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def uid() -> str:
    """A fresh entity id: tests share one server, so they never share an entity."""
    return uuid.uuid4().hex[:12]


async def call(
    nc: NATS,
    subject: str,
    body: dict[str, Any] | bytes = b"",
    *,
    command_id: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """One request over the wire, decoded."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Kaya-Command-Id": command_id} if command_id else None
    msg = await nc.request(subject, data, timeout=timeout, headers=headers)
    reply: dict[str, Any] = orjson.loads(msg.data)
    return reply
