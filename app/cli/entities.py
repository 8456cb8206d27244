"""`kaya send`, `kaya get` and `kaya history`: one entity, from the command line.

    kaya send ENTITY ID JSON -> kaya.cmd.<entity>.<id> -> a node's ingress -> the reply
    kaya get ENTITY ID       -> kaya.qry.<entity>.<id> -> the entity's state
    kaya history ENTITY ID   -> the node's SQLite file  -> its events, one JSON line each
                                (recorded_at in ISO 8601 UTC, data as a JSON object)

`send` and `get` go the way any client's requests go (NATS request-reply to a
running node), so what they print is what a client would get. `history` reads the
store file itself (read-only, beside a running node), because the events are the
truth a reply was made from; with an app, as its current code reads them.
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from kaya.actors.wire import iso_utc
from kaya.app.cli import common
from kaya.app.cli.common import CliError


def register(sub: common.Subcommands) -> None:
    send = sub.add_parser("send", help="send a command and print the reply")
    send.add_argument("entity")
    send.add_argument("entity_id", metavar="ID")
    send.add_argument(
        "json", metavar="JSON", help='the command, e.g. \'{"type":"Deposit","amount":5}\''
    )
    send.add_argument("--id", metavar="COMMAND_ID", help="Kaya-Command-Id (idempotency key)")
    common.remote(send)
    _with_headers(send)
    send.set_defaults(handler=_send)

    get = sub.add_parser("get", help="print an entity's state")
    get.add_argument("entity")
    get.add_argument("entity_id", metavar="ID")
    common.remote(get)
    _with_headers(get)
    get.set_defaults(handler=_get)

    history = sub.add_parser("history", help="print an entity's events from the store")
    history.add_argument("entity")
    history.add_argument("entity_id", metavar="ID")
    common.common(history, node=True)
    common.with_app(history)
    history.set_defaults(handler=_history)


def _with_headers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token",
        default=os.environ.get("KAYA_TOKEN"),
        help="a JWT sent as `Authorization: Bearer` (default: $KAYA_TOKEN), where the node"
        " checks callers ([security.jwt]; `kaya security token` makes one for development)",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="K=V",
        help="a header to send (repeatable), e.g. traceparent=00-...",
    )


def _headers(args: argparse.Namespace) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--header {item!r}: expected NAME=VALUE")
        headers[name.strip()] = value
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    return headers


async def _send(args: argparse.Namespace) -> int:
    import msgspec

    common.check_names(args.entity, args.entity_id, args.id)
    # the bytes as given: an argument that is not UTF-8 arrives with surrogate escapes
    body = args.json.encode("utf-8", "surrogateescape")
    try:
        msgspec.json.decode(body)
    except msgspec.ValidationError:
        pass  # well-formed, e.g. a number out of range: the node says what is wrong with it
    except msgspec.DecodeError as exc:
        raise CliError(f"JSON argument is not valid JSON: {exc}") from None
    except RecursionError:
        pass  # nested too deeply: the node's `bad_request` says so
    headers = _headers(args)
    if args.id:
        headers["Kaya-Command-Id"] = args.id
    data = await common.request(
        common.url(args),
        f"kaya.cmd.{args.entity}.{args.entity_id}",
        body,
        headers or None,
        args.timeout,
    )
    return common.print_reply(data)


async def _get(args: argparse.Namespace) -> int:
    common.check_names(args.entity, args.entity_id)
    data = await common.request(
        common.url(args),
        f"kaya.qry.{args.entity}.{args.entity_id}",
        b"",
        _headers(args) or None,
        args.timeout,
    )
    return common.print_reply(data)


async def _history(args: argparse.Namespace) -> int:
    from kaya.store import StoreError, open_event_store

    config = common.config(args)
    # with an app, events are shown as its code reads them: upcast to the current version
    registry = common.app(config).registry if config.node.app else None
    try:
        async with open_event_store(config.store_path, readonly=True) as store:
            events = await store.read_stream(args.entity, args.entity_id)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    for event in events:
        type_name, version = event.type, event.schema_version
        data = orjson.loads(event.data)
        if registry is not None and event.entity in registry:
            entity = registry.get(event.entity)
            type_name, data = entity.upcast(type_name, version, data)
            version = entity.event_versions.get(type_name, version)
        line = {
            "version": event.version,
            "position": event.position,
            "type": type_name,
            "schema_version": version,
            "event_id": event.event_id,
            "recorded_at": iso_utc(event.recorded_at),
            "command_id": event.command_id,
            "data": data,
        }
        print(orjson.dumps(line).decode())
    if not events:
        print(f"{args.entity}/{args.entity_id} has no events", file=sys.stderr)
    return 0
