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
    status.add_argument(
        "--interval", type=common.positive_float, default=2.0, help="seconds between updates"
    )
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
    """Polls `kaya.health`; rates come from the difference of two snapshots.

    When the node stops while it is watched (no answer, or its embedded server and so
    the connection gone), the view ends with one line and exit code 2, like any
    connection problem: a screen that silently froze would look like a healthy idle node.
    """
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from kaya.actors.wire import HEALTH_SUBJECT
    from kaya.app.observability.status import render_status

    url = common.url(args)
    previous: dict[str, Any] | None = None
    try:
        async with common.session(url) as nc:
            while True:
                try:
                    msg = await nc.request(HEALTH_SUBJECT, b"", timeout=args.timeout)
                except (NoRespondersError, NatsTimeout):
                    if previous is not None:
                        raise CliError(
                            f"the node stopped answering {HEALTH_SUBJECT} on {url}"
                        ) from None
                    raise CliError(f"no Kaya node answers {HEALTH_SUBJECT} on {url}") from None
                try:
                    current = orjson.loads(msg.data)
                    if args.once:
                        common.print_json(current)
                        return 0
                    screen = render_status(current, previous, await _dlq_size(nc))
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                    raise CliError(
                        f"the reply on {HEALTH_SUBJECT} at {url} is not a Kaya node's status"
                    ) from None
                print("\x1b[2J\x1b[H" + screen, flush=True)
                previous = current
                await anyio.sleep(args.interval)
    except CliError as exc:
        if previous is not None and str(exc).startswith("lost the connection"):
            raise CliError(f"{exc}: the node (or its server) stopped") from None
        raise


async def _dlq_size(nc: Any) -> int | None:
    """Messages in KAYA_DLQ; None when unknown (no stream yet, or JetStream not answering):
    the status view shows `?` rather than failing over one line of it."""
    import nats.errors

    try:
        info = await nc.jetstream().stream_info("KAYA_DLQ")
    except nats.errors.Error:
        return None
    return int(info.state.messages)
