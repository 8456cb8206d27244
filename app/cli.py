"""`kaya`: run a node, talk to it over NATS, and read its store.

    kaya run [--config PATH] [--data-dir DIR] [--nats-port N]
    kaya send ENTITY ID JSON [--id COMMAND_ID]
    kaya get ENTITY ID
    kaya history ENTITY ID
    kaya server-config

Any failure prints one line starting with `error:` on stderr and exits non-zero:
1 for a refused command (the contract's error code is in the line), 2 for a
usage, config or connection problem.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import orjson

from app.config import Config, ConfigError, load_config, with_overrides

DEFAULT_URL = "nats://127.0.0.1:4222"


class CliError(Exception):
    """A one-line message for the user, with the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return with_overrides(
        config,
        data_dir=getattr(args, "data_dir", None),
        nats_port=getattr(args, "nats_port", None),
    )


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    if os.environ.get("KAYA_NATS_URL"):
        return os.environ["KAYA_NATS_URL"]
    if args.config:
        config = _config(args)
        return config.nats.url or f"nats://{config.nats.host}:{config.nats.port}"
    return DEFAULT_URL


# ---- kaya run ------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    from app.logs import configure_logging
    from app.node import open_node

    config = _config(args)
    configure_logging(
        level=args.log_level or config.log.level,
        fmt=args.log_format or config.log.format,
        node=config.node.name,
    )
    sys.setswitchinterval(0.0005)  # the SQLite thread hands the GIL back sooner: lower p99
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config) as node:
            where = "embedded" if node.server else "external"
            print(
                f"kaya node {config.node.name} ready on {node.url} ({where} nats-server,"
                f" store {config.store_path})",
                flush=True,
            )
            async for signum in signals:
                print(
                    f"kaya node {config.node.name} stopping ({signal.Signals(signum).name})",
                    file=sys.stderr,
                    flush=True,
                )
                break
    return 0


# ---- kaya send / get ------------------------------------------------------------------


async def _request(
    url: str, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
) -> bytes:
    import nats
    from nats.errors import NoRespondersError, NoServersError
    from nats.errors import TimeoutError as NatsTimeout

    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)

    nc = None
    with anyio.move_on_after(3):
        try:
            nc = await nats.connect(
                url, connect_timeout=2, allow_reconnect=False, error_cb=remember
            )
        except (NoServersError, OSError) as exc:
            errors.append(exc)
    if nc is None:
        reason = errors[-1] if errors else "timed out"
        raise CliError(f"cannot connect to NATS at {url}: {reason}")
    try:
        msg = await nc.request(subject, body, timeout=timeout, headers=headers)
    except NoRespondersError:
        raise CliError(
            f"no Kaya node is serving {subject} on {url}: start one with `kaya run`"
        ) from None
    except NatsTimeout:
        raise CliError(f"no reply on {subject} within {timeout}s", exit_code=1) from None
    finally:
        await nc.close()
    return bytes(msg.data)


def _print_reply(data: bytes) -> int:
    try:
        reply: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise CliError(f"the node sent a reply that is not JSON: {data[:200]!r}") from None
    if isinstance(reply, dict) and reply.get("ok") is False:
        error = reply.get("error") or {}
        raise CliError(f"{error.get('code', 'internal')}: {error.get('message', '')}", exit_code=1)
    print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
    return 0


async def _send(args: argparse.Namespace) -> int:
    try:
        orjson.loads(args.json)
    except orjson.JSONDecodeError as exc:
        raise CliError(f"JSON argument is not valid JSON: {exc}") from None
    headers = {"Kaya-Command-Id": args.id} if args.id else None
    data = await _request(
        _url(args),
        f"kaya.cmd.{args.entity}.{args.entity_id}",
        args.json.encode(),
        headers,
        args.timeout,
    )
    return _print_reply(data)


async def _get(args: argparse.Namespace) -> int:
    data = await _request(
        _url(args), f"kaya.qry.{args.entity}.{args.entity_id}", b"", None, args.timeout
    )
    return _print_reply(data)


# ---- kaya history ---------------------------------------------------------------------


async def _history(args: argparse.Namespace) -> int:
    from store import StoreError, open_event_store

    config = _config(args)
    try:
        async with open_event_store(config.store_path, readonly=True) as store:
            events = await store.read_stream(args.entity, args.entity_id)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    for event in events:
        line = {
            "version": event.version,
            "position": event.position,
            "type": event.type,
            "schema_version": event.schema_version,
            "event_id": event.event_id,
            "recorded_at": event.recorded_at,
            "command_id": event.command_id,
            "data": orjson.loads(event.data),
        }
        print(orjson.dumps(line).decode())
    if not events:
        print(f"{args.entity}/{args.entity_id} has no events", file=sys.stderr)
    return 0


async def _server_config(args: argparse.Namespace) -> int:
    from app.embedded import server_config
    from app.node import embedded_settings

    print(server_config(embedded_settings(_config(args))), end="")
    return 0


# ---- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaya", description="Kaya: actors on NATS JetStream with a SQLite event store."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, node: bool) -> None:
        p.add_argument("--config", metavar="PATH", help="TOML config file (default: built-in)")
        if node:
            p.add_argument("--data-dir", metavar="DIR", help="overrides node.data_dir")
            p.add_argument("--nats-port", type=int, metavar="N", help="overrides nats.port")

    def remote(p: argparse.ArgumentParser) -> None:
        common(p, node=False)
        p.add_argument("--url", help=f"NATS URL (default: $KAYA_NATS_URL or {DEFAULT_URL})")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")

    run = sub.add_parser("run", help="start a node and serve until SIGINT/SIGTERM")
    common(run, node=True)
    run.add_argument("--log-format", choices=["json", "text"], help="overrides log.format")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(handler=_run)

    send = sub.add_parser("send", help="send a command and print the reply")
    send.add_argument("entity")
    send.add_argument("entity_id", metavar="ID")
    send.add_argument(
        "json", metavar="JSON", help='the command, e.g. \'{"type":"Deposit","amount":5}\''
    )
    send.add_argument("--id", metavar="COMMAND_ID", help="Kaya-Command-Id (idempotency key)")
    remote(send)
    send.set_defaults(handler=_send)

    get = sub.add_parser("get", help="print an entity's state")
    get.add_argument("entity")
    get.add_argument("entity_id", metavar="ID")
    remote(get)
    get.set_defaults(handler=_get)

    history = sub.add_parser("history", help="print an entity's events from the store")
    history.add_argument("entity")
    history.add_argument("entity_id", metavar="ID")
    common(history, node=True)
    history.set_defaults(handler=_history)

    server = sub.add_parser("server-config", help="print the nats-server config a node uses")
    common(server, node=True)
    server.set_defaults(handler=_server_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], Awaitable[int]] = args.handler
    try:
        return anyio.run(handler, args, backend="asyncio", backend_options={"use_uvloop": True})
    except (CliError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, CliError) else 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: one line, not a traceback
        from app.embedded import ServerError
        from store import StoreError

        if isinstance(exc, (ServerError, StoreError, OSError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
