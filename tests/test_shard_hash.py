"""The node's shard function agrees with nats-server's `partition()` mapping, key by key."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from kaya.actors.wire import parse_shard, shard_of
from tests.servers import start_nats_server

pytestmark = pytest.mark.anyio


async def test_shard_of_matches_the_servers_mapping(tmp_path: Path) -> None:
    server = start_nats_server(tmp_path / "nats", shards=16)
    try:
        nc = NATS()
        await nc.connect(server.url)
        try:
            sub = await nc.subscribe("kaya.shard.*.cmd.>")
            keys = [("account", f"acc-{i}") for i in range(200)]
            keys += [("transfer", f"t{i}") for i in range(50)] + [("counter", "x_Y-9")]
            for entity, entity_id in keys:
                await nc.publish(f"kaya.cmd.{entity}.{entity_id}", b"{}")
            seen = [await sub.next_msg(timeout=5) for _ in keys]
        finally:
            await nc.close()
    finally:
        server.stop()
    mapped = {tuple(m.subject.split(".")[4:6]): parse_shard(m.subject) for m in seen}
    assert len(set(mapped.values())) == 16  # the keys spread over every shard
    for entity, entity_id in keys:
        assert shard_of(16, entity, entity_id) == mapped[(entity, entity_id)], (entity, entity_id)


def test_parse_shard() -> None:
    assert parse_shard("kaya.shard.12.cmd.account.a") == 12
    assert parse_shard("kaya.cmd.account.a") is None
    assert parse_shard("kaya.shard.x.cmd.account.a") is None
