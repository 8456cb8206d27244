"""`kaya status` and `kaya slo export`: watching a running node, and alerting on it.

    kaya status     -> kaya.health (two snapshots: rates) + KAYA_DLQ size -> a live screen
    kaya slo export -> [slo] in the config -> alerting rules and a dashboard, as files

`status` asks the node itself over NATS, so it needs nothing but the NATS URL: no
Prometheus to look at a node during an incident. `slo export` writes, from the
same config the node runs with, what Prometheus and Grafana need to page on the
objectives it states, so the alerts cannot drift from the config.
"""

from __future__ import annotations

import argparse
from typing import Any

import anyio
import orjson

from kaya.app.cli import common
from kaya.app.cli.common import CliError


def register(sub: common.Subcommands) -> None:
    slo = sub.add_parser("slo", help="write the alerting rules and dashboard from [slo]")
    slo.add_argument("action", choices=["export"])
    common.common(slo, node=False)
    slo.set_defaults(handler=_slo)

    status = sub.add_parser("status", help="a live view of a running node (Ctrl-C to quit)")
    common.remote(status)
    status.add_argument("--interval", type=float, default=2.0, help="seconds between updates")
    status.add_argument("--once", action="store_true", help="print one snapshot as JSON")
    status.set_defaults(handler=_status)


async def _slo(args: argparse.Namespace) -> int:
    from kaya.app.observability.slo import render

    for path, data in render(common.config(args).slo).items():
        await anyio.Path(path).parent.mkdir(parents=True, exist_ok=True)
        await anyio.Path(path).write_bytes(data)
        print(f"wrote {path}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    """Polls `kaya.health`; rates come from the difference of two snapshots."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from kaya.app.observability.status import render_status

    url = common.url(args)
    nc = await common.connect(url)
    try:
        previous: dict[str, Any] | None = None
        while True:
            try:
                msg = await nc.request("kaya.health", b"", timeout=args.timeout)
            except (NoRespondersError, NatsTimeout):
                raise CliError(f"no Kaya node answers kaya.health on {url}") from None
            current = orjson.loads(msg.data)
            if args.once:
                common.print_json(current)
                return 0
            dlq = await _dlq_size(nc)
            print("\x1b[2J\x1b[H" + render_status(current, previous, dlq), flush=True)
            previous = current
            await anyio.sleep(args.interval)
    finally:
        await nc.close()


async def _dlq_size(nc: Any) -> int | None:
    from nats.js.errors import NotFoundError

    try:
        info = await nc.jetstream().stream_info("KAYA_DLQ")
    except NotFoundError:
        return None
    return int(info.state.messages)
