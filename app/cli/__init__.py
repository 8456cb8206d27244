"""`kaya`: run a node, talk to it over NATS, and read its store.

    kaya run [--config PATH] [--data-dir DIR] [--nats-port N]
    kaya send ENTITY ID JSON [--id COMMAND_ID]
    kaya get ENTITY ID
    kaya history ENTITY ID
    kaya streams
    kaya dlq list|show|replay|purge
    kaya replay PROJECTION
    kaya tail [SUBJECT]
    kaya server-config
    kaya schema check|export|publish
    kaya catalog [--format markdown|asyncapi]

Any failure prints one line starting with `error:` on stderr and exits non-zero:
1 for a refused command (the contract's error code is in the line), 2 for a
usage, config or connection problem.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from kaya.app.config import Config, ConfigError, load_config, with_overrides

if TYPE_CHECKING:
    from kaya.app.application import App

DEFAULT_URL = "nats://127.0.0.1:4222"


def kaya_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kaya")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


GC_THRESHOLDS = (50_000, 20, 20)
"""Allocations before a young collection, and young/middle collections before the next
generation's: far fewer full scans of the many long-lived objects a busy node holds."""


class CliError(Exception):
    """A one-line message for the user, with the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _config(args: argparse.Namespace) -> Config:
    config = load_config(getattr(args, "config", None))
    return with_overrides(
        config,
        data_dir=getattr(args, "data_dir", None),
        nats_port=getattr(args, "nats_port", None),
        monitor_port=getattr(args, "monitor_port", None),
        metrics_address=getattr(args, "metrics_address", None),
        app=getattr(args, "app", None),
    )


def _app(config: Config) -> App:
    """The app the command works with: `--app`, else `[node] app` in the config."""
    from kaya.app.application import AppError, load_app

    if not config.node.app:
        raise CliError(
            "no app to serve: pass --app module:attr (e.g. --app counter_app:app)"
            " or set `app` in the config's [node] section"
        )
    try:
        return load_app(config.node.app)
    except AppError as exc:
        raise CliError(str(exc)) from None


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
    from kaya.app.node import open_node
    from kaya.app.observability.logs import configure_logging

    config = _config(args)
    app = _app(config)
    configure_logging(
        level=args.log_level or config.log.level,
        fmt=args.log_format or config.log.format,
        node=config.node.name,
    )
    sys.setswitchinterval(0.0005)  # the SQLite thread hands the GIL back sooner: lower p99
    # A busy node keeps tens of thousands of requests, replies and actors alive; with the
    # default thresholds (700, 10, 10) the cyclic GC re-scans them every few hundred
    # allocations. At 3x peak: 5.0k -> 7.7k accepted/s, refusals p99 352 -> 253 ms (bench.load).
    gc.set_threshold(*GC_THRESHOLDS)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config, app) as node:
            gc.freeze()  # what start-up built lives as long as the node: never scan it again
            where = "embedded" if node.server else "external"
            if node.metrics_url:
                print(f"kaya node {config.node.name} metrics on {node.metrics_url}", flush=True)
            print(
                f"kaya node {config.node.name} ready on {node.url} ({where} nats-server,"
                f" store {config.store_path}, app {config.node.app})",
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


async def _connect(url: str) -> Any:
    import nats
    from nats.errors import NoServersError

    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)

    with anyio.move_on_after(3):
        try:
            return await nats.connect(
                url, connect_timeout=2, allow_reconnect=False, error_cb=remember
            )
        except (NoServersError, OSError) as exc:
            errors.append(exc)
    reason = errors[-1] if errors else "timed out"
    raise CliError(f"cannot connect to NATS at {url}: {reason}")


async def _request(
    url: str, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
) -> bytes:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    nc = await _connect(url)
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
    from kaya.store import StoreError, open_event_store

    config = _config(args)
    # with an app, events are shown as its code reads them: upcast to the current version
    registry = _app(config).registry if config.node.app else None
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
            "recorded_at": event.recorded_at,
            "command_id": event.command_id,
            "data": data,
        }
        print(orjson.dumps(line).decode())
    if not events:
        print(f"{args.entity}/{args.entity_id} has no events", file=sys.stderr)
    return 0


# ---- operations: streams, dlq, replay, tail ------------------------------------------------


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())


async def _streams(args: argparse.Namespace) -> int:
    from kaya.app.events.ops import describe_streams

    nc = await _connect(_url(args))
    try:
        streams = await describe_streams(nc.jetstream())
    finally:
        await nc.close()
    if args.json:
        _print_json(streams)
        return 0
    for stream in streams:
        if stream.get("missing"):
            print(f"{stream['stream']}: not created yet (start a node)")
            continue
        print(
            f"{stream['stream']}  subjects {','.join(stream['subjects'])}  "
            f"messages {stream['messages']}  bytes {stream['bytes']}  "
            f"seq {stream['first_seq']}..{stream['last_seq']}"
        )
        for c in stream["consumers"]:
            print(
                f"  consumer {c['name']:<16} lag {c['lag']:<8} pending {c['pending']:<8}"
                f" ack-pending {c['ack_pending']:<6} redelivered {c['redelivered']}"
            )
    return 0


async def _dlq(args: argparse.Namespace) -> int:
    from kaya.app.events import ops

    nc = await _connect(_url(args))
    try:
        js = nc.jetstream()
        if args.action == "list":
            letters = await ops.list_dead_letters(js, args.consumer)
            for letter in letters:
                print(orjson.dumps(letter.summary()).decode())
            print(f"{len(letters)} dead letters", file=sys.stderr)
        elif args.action == "show":
            if args.seq is None:
                raise CliError("kaya dlq show needs --seq N")
            try:
                letter = await ops.show_dead_letter(js, args.seq)
            except LookupError as exc:
                raise CliError(str(exc), exit_code=1) from None
            _print_json(
                {
                    **letter.summary(),
                    "headers": letter.headers,
                    "data": letter.data.decode(errors="replace"),
                }
            )
        elif args.action == "purge":
            removed = await ops.purge_dead_letters(js, args.consumer)
            print(f"purged {removed} dead letters")
        else:
            return await _dlq_replay(args, nc)
    finally:
        await nc.close()
    return 0


async def _dlq_replay(args: argparse.Namespace, nc: Any) -> int:
    from kaya.app.events import ops
    from kaya.app.events.consumers import Context
    from kaya.store import open_event_store

    config = _config(args)
    app = _app(config)

    async def publish(subject: str, data: bytes, headers: Any) -> None:
        await nc.publish(subject, data, headers=dict(headers) if headers else None)

    async with open_event_store(config.store_path) as store:
        context = Context(store, publish)
        for consumer in app.consumers:
            consumer.bind(context)
        outcome = await ops.replay_dead_letters(
            nc.jetstream(),
            store,
            {c.name: c for c in app.consumers},
            consumer=args.consumer,
            seq=args.seq,
            registry=app.registry,
        )
    print(
        f"replayed {len(outcome.replayed)}, already applied {len(outcome.skipped)},"
        f" failed {len(outcome.failed)}"
    )
    for seq, reason in outcome.failed.items():
        print(f"  seq {seq}: {reason}", file=sys.stderr)
    if outcome.failed:
        raise CliError(
            f"{len(outcome.failed)} dead letters still fail; fix the cause, retry", exit_code=1
        )
    return 0


async def _replay(args: argparse.Namespace) -> int:
    from kaya.app.events.consumers import Context
    from kaya.app.events.ops import rebuild_projection
    from kaya.store import open_event_store

    config = _config(args)
    app = _app(config)
    async with open_event_store(config.store_path) as store:
        models = {c.name: c for c in app.projections}
        consumer = models.get(args.projection)
        if consumer is None:
            known = ", ".join(sorted(models)) or "none"
            raise CliError(f"no read model named {args.projection!r} (known: {known})")
        consumer.bind(Context(store))
        view = app.views.get(args.projection)

        async def read_view(target: Any) -> Any:
            return None if view is None else await view(Context(target), {})

        def progress(done: int, total: int) -> None:
            width = 40
            filled = int(width * done / total) if total else width
            print(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} events",
                end="",
                file=sys.stderr,
                flush=True,
            )

        outcome = await rebuild_projection(
            store,
            consumer,
            view=read_view,
            progress=progress,
            swap=not args.dry_run,
            registry=app.registry,
        )
    print(file=sys.stderr)
    same = {
        None: "not compared (the live model was at another position)",
        True: "identical to the live read model",
        False: "DIFFERENT from the live read model",
    }
    swapped = "; swapped in" if outcome.swapped else " (dry run: live model untouched)"
    print(
        f"rebuilt {args.projection} from {outcome.events} events up to position"
        f" {outcome.position}: {same[outcome.identical_before_swap]}{swapped}"
    )
    return 0


async def _tail(args: argparse.Namespace) -> int:
    from kaya.app.events.ops import tail_events

    nc = await _connect(_url(args))
    try:
        seen = 0
        async for event in tail_events(nc, args.subject, from_start=args.all):
            print(orjson.dumps(event).decode(), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    finally:
        await nc.close()
    return 0


async def _slo(args: argparse.Namespace) -> int:
    from kaya.app.observability.slo import render

    for path, data in render(_config(args).slo).items():
        await anyio.Path(path).parent.mkdir(parents=True, exist_ok=True)
        await anyio.Path(path).write_bytes(data)
        print(f"wrote {path}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    """Polls `kaya.health`; rates come from the difference of two snapshots."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from kaya.app.observability.status import render_status

    url = _url(args)
    nc = await _connect(url)
    try:
        previous: dict[str, Any] | None = None
        while True:
            try:
                msg = await nc.request("kaya.health", b"", timeout=args.timeout)
            except (NoRespondersError, NatsTimeout):
                raise CliError(f"no Kaya node answers kaya.health on {url}") from None
            current = orjson.loads(msg.data)
            if args.once:
                _print_json(current)
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


async def _server_config(args: argparse.Namespace) -> int:
    from kaya.app.broker.embedded import server_config
    from kaya.app.node import embedded_settings

    print(server_config(embedded_settings(_config(args))), end="")
    return 0


# ---- schemas and the event dictionary ---------------------------------------------------------


async def _schema(args: argparse.Namespace) -> int:
    from kaya.app.schemas import registry as schemas

    registry = _app(_config(args)).registry
    current = schemas.code_schemas(registry)
    path = Path(args.file)
    if args.action == "publish":
        everything = schemas.merge_schemas(schemas.load_schemas(path), current)
        nc = await _connect(_url(args))
        try:
            added = await schemas.publish_schemas(nc.jetstream(), everything)
        except schemas.SchemaConflict as exc:
            raise CliError(str(exc), exit_code=1) from None
        finally:
            await nc.close()
        print(f"{schemas.SCHEMAS_BUCKET}: {len(everything)} schemas, {added} newly registered")
        return 0
    if args.action == "check" and args.registry:
        url = _url(args)
        nc = await _connect(url)
        try:
            recorded = await schemas.read_registry(nc.jetstream())
        finally:
            await nc.close()
        against = f"{schemas.SCHEMAS_BUCKET} at {url}"
    else:
        if args.action == "check" and not await anyio.Path(path).exists():
            raise CliError(f"{path} does not exist: `kaya schema export` writes it")
        recorded, against = schemas.load_schemas(path), str(path)
    report = schemas.check_compatibility(recorded, current, schemas.upcaster_keys(registry))
    if args.action == "check" or not report.ok:
        print(report.format(against), file=sys.stdout if args.action == "check" else sys.stderr)
    if not report.ok:
        verb = "found" if args.action == "check" else "refusing to export:"
        raise CliError(f"{verb} {len(report.breaking)} breaking schema change(s)", exit_code=1)
    if args.action == "export":
        merged = schemas.merge_schemas(recorded, current)
        await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        await anyio.Path(path).write_bytes(schemas.dump_schemas(merged))
        print(f"wrote {path}: {len(merged)} schemas, {len(merged.keys() - recorded.keys())} new")
    return 0


async def _catalog(args: argparse.Namespace) -> int:
    from kaya.app.schemas.catalog import build_catalog, render_asyncapi, render_markdown

    app = _app(_config(args))
    catalog = build_catalog(app.registry, [type(c) for c in app.consumers])
    if args.format == "asyncapi":
        text = orjson.dumps(render_asyncapi(catalog), option=orjson.OPT_INDENT_2).decode() + "\n"
    else:
        text = render_markdown(catalog)
    if args.output:
        await anyio.Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


# ---- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaya", description="Kaya: actors on NATS JetStream with a SQLite event store."
    )
    parser.add_argument("--version", action="version", version=f"kaya {kaya_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, node: bool) -> None:
        p.add_argument("--config", metavar="PATH", help="TOML config file (default: built-in)")
        if node:
            p.add_argument("--data-dir", metavar="DIR", help="overrides node.data_dir")
            p.add_argument("--nats-port", type=int, metavar="N", help="overrides nats.port")

    def with_app(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--app",
            metavar="MODULE:ATTR",
            help="the app (kaya.App) to use, e.g. counter_app:app; overrides node.app",
        )

    def remote(p: argparse.ArgumentParser) -> None:
        common(p, node=False)
        p.add_argument("--url", help=f"NATS URL (default: $KAYA_NATS_URL or {DEFAULT_URL})")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")

    run = sub.add_parser("run", help="start a node and serve until SIGINT/SIGTERM")
    common(run, node=True)
    with_app(run)
    run.add_argument(
        "--monitor-port", type=int, metavar="N", help="overrides nats.monitor_port (0: off)"
    )
    run.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="overrides metrics.address (port 0 picks a free one; empty: off)",
    )
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
    with_app(history)
    history.set_defaults(handler=_history)

    streams = sub.add_parser("streams", help="streams, consumers and their lag")
    remote(streams)
    streams.add_argument("--json", action="store_true", help="machine-readable output")
    streams.set_defaults(handler=_streams)

    dlq = sub.add_parser("dlq", help="dead letters: list, show, replay, purge")
    dlq.add_argument("action", choices=["list", "show", "replay", "purge"])
    dlq.add_argument("consumer", nargs="?", help="only this consumer's dead letters")
    dlq.add_argument("--seq", type=int, help="one dead letter, by its KAYA_DLQ sequence")
    remote(dlq)
    dlq.add_argument("--data-dir", metavar="DIR", help="the node's data dir (for replay)")
    with_app(dlq)
    dlq.set_defaults(handler=_dlq)

    replay = sub.add_parser("replay", help="rebuild a read model from the event store")
    replay.add_argument("projection", metavar="PROJECTION", help="e.g. analytics")
    replay.add_argument("--dry-run", action="store_true", help="rebuild and compare only")
    common(replay, node=True)
    with_app(replay)
    replay.set_defaults(handler=_replay)

    tail = sub.add_parser("tail", help="follow events as they are published")
    tail.add_argument("subject", nargs="?", default="kaya.evt.>", metavar="SUBJECT")
    tail.add_argument("--all", action="store_true", help="from the start of the stream")
    tail.add_argument("--count", type=int, default=0, help="stop after N events")
    remote(tail)
    tail.set_defaults(handler=_tail)

    slo = sub.add_parser("slo", help="write the alerting rules and dashboard from [slo]")
    slo.add_argument("action", choices=["export"])
    common(slo, node=False)
    slo.set_defaults(handler=_slo)

    status = sub.add_parser("status", help="a live view of a running node (Ctrl-C to quit)")
    remote(status)
    status.add_argument("--interval", type=float, default=2.0, help="seconds between updates")
    status.add_argument("--once", action="store_true", help="print one snapshot as JSON")
    status.set_defaults(handler=_status)

    server = sub.add_parser("server-config", help="print the nats-server config a node uses")
    common(server, node=True)
    server.set_defaults(handler=_server_config)

    schema = sub.add_parser("schema", help="event schemas: compatibility check, export, publish")
    actions = schema.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="fail on a change that would leave stored events unreadable"
    )
    where = check.add_mutually_exclusive_group()
    where.add_argument(
        "--against",
        dest="file",
        default="docs/schemas.json",
        metavar="PATH",
        help="the committed schemas (default: docs/schemas.json)",
    )
    where.add_argument(
        "--registry", action="store_true", help="the kaya_schemas KV bucket of a running system"
    )
    remote(check)
    with_app(check)
    export = actions.add_parser(
        "export", help="add the code's schemas to the committed file (older versions kept)"
    )
    export.add_argument("--output", dest="file", default="docs/schemas.json", metavar="PATH")
    export.set_defaults(registry=False)
    common(export, node=False)
    with_app(export)
    publish = actions.add_parser(
        "publish", help="register the file's and the code's schemas in the kaya_schemas bucket"
    )
    publish.add_argument("--from", dest="file", default="docs/schemas.json", metavar="PATH")
    remote(publish)
    with_app(publish)
    for action in (check, export, publish):
        action.set_defaults(handler=_schema)

    catalog = sub.add_parser("catalog", help="the event dictionary: every command and event")
    catalog.add_argument("--format", choices=["markdown", "asyncapi"], default="markdown")
    catalog.add_argument("--output", metavar="PATH", help="write there (default: stdout)")
    common(catalog, node=False)
    with_app(catalog)
    catalog.set_defaults(handler=_catalog)
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
    except BrokenPipeError:  # `kaya status --once | head`: the reader had enough
        return 0
    except Exception as exc:  # the last line of defence: one line, not a traceback
        from kaya.app.broker.embedded import ServerError
        from kaya.app.schemas.registry import SchemaConflict
        from kaya.store import StoreError

        cause: BaseException = exc
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
            cause = cause.exceptions[0]  # raised inside the node's task groups
        if isinstance(cause, (ServerError, StoreError, OSError, SchemaConflict)):
            print(f"error: {cause}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
