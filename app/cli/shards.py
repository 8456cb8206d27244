"""`kaya shards` and `kaya shards move N --to NODE`: who serves what, and moving a shard.

    kaya shards               -> KAYA_SHARDS (the lease bucket) -> shard, owner, epoch, state
    kaya shards move 3 --to kaya-2
                              -> move.3 = kaya-2 -> the owner hands over, kaya-2 takes it
                              -> waits until kaya-2 serves it (or says why not)

Both read the bucket the nodes keep their leases in, so they need only the NATS URL.
A move is a request: the owner drains the shard (its commands in flight are answered),
deletes its lease, and the target takes it under a new epoch after catching up.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio

from kaya.app.cli import common
from kaya.app.cli.common import CliError

MOVE_TIMEOUT = 60.0


def register(sub: common.Subcommands) -> None:
    shards = sub.add_parser("shards", help="list the shards and their owners, or move one")
    common.remote(shards)
    shards.add_argument("--json", action="store_true", help="print the table as JSON")
    actions = shards.add_subparsers(dest="action", metavar="{move}")
    move = actions.add_parser("move", help="hand shard N over to node NODE")
    move.add_argument("shard", type=int, metavar="N")
    move.add_argument("--to", required=True, metavar="NODE", help="a live node's name")
    common.remote(move)
    shards.set_defaults(handler=_shards)


async def _table(nc: Any) -> Any:
    from nats.js.errors import BucketNotFoundError, NotFoundError

    from kaya.app.cluster.leases import BUCKET, read_table

    try:
        kv = await nc.jetstream().key_value(BUCKET)
    except (BucketNotFoundError, NotFoundError):
        raise CliError(f"no {BUCKET} bucket on this NATS: no node has run against it") from None
    return kv, await read_table(kv)


async def _shards(args: argparse.Namespace) -> int:
    url = common.url(args)
    count = common.config(args).shards.count
    async with common.session(url) as nc:
        kv, table = await _table(nc)
        if getattr(args, "action", None) == "move":
            return await _move(kv, table, args.shard, args.to, count)
        rows = [
            {
                "shard": n,
                "owner": table.owners[n][0] if n in table.owners else None,
                "epoch": table.owners[n][1] if n in table.owners else None,
                "state": table.owners[n][2] if n in table.owners else "unowned",
                "move_to": table.moves.get(n),
            }
            for n in range(max([count - 1, *table.owners, *table.moves], default=-1) + 1)
        ]
        if args.json:
            common.print_json(
                {"shards": rows, "nodes": sorted(table.nodes), "consumers": table.singletons}
            )
            return 0
        print(f"{'shard':>5}  {'owner':<16} {'epoch':>8}  state")
        for row in rows:
            move = f"  -> {row['move_to']}" if row["move_to"] else ""
            print(
                f"{row['shard']:>5}  {row['owner'] or '-':<16} {row['epoch'] or '-':>8}"
                f"  {row['state']}{move}"
            )
        print(f"nodes: {', '.join(sorted(table.nodes)) or 'none alive'}")
        for name, node in sorted(table.singletons.items()):
            print(f"consumer {name}: runs on {node}")
    return 0


async def _move(kv: Any, table: Any, shard: int, to: str, count: int) -> int:
    from kaya.app.cluster.leases import read_table, request_move

    if not 0 <= shard < count:
        raise CliError(f"shard {shard} is not one of 0..{count - 1}", exit_code=1)
    if to not in table.nodes:
        alive = ", ".join(sorted(table.nodes)) or "none"
        raise CliError(f"node {to!r} is not alive (live nodes: {alive})", exit_code=1)
    owner = table.owners.get(shard, (None, 0, ""))
    if owner[0] == to and owner[2] == "serving":
        print(f"shard {shard} is already served by {to} (epoch {owner[1]})")
        return 0
    await request_move(kv, shard, to)
    deadline = time.monotonic() + MOVE_TIMEOUT
    while time.monotonic() < deadline:
        table = await read_table(kv)
        node, epoch, state = table.owners.get(shard, (None, 0, ""))
        if node == to and state == "serving":
            print(f"shard {shard} moved to {to} (epoch {epoch})")
            return 0
        await anyio.sleep(0.2)  # the bucket is polled: nothing to wait on across processes
    raise CliError(f"shard {shard} not served by {to} after {MOVE_TIMEOUT:g}s", exit_code=2)
