"""`kaya schema check|export|publish` and `kaya catalog`: the event contract, from the code.

    the app's registry -> code_schemas -> check against docs/schemas.json or kaya_schemas
                                       -> export (merged, older versions kept) / publish (KV)
    the app's registry + consumers -> kaya catalog -> docs/events.md, docs/asyncapi.json

Stored events outlive the code that wrote them: `schema check` fails a build whose
change would leave some of them unreadable, before it is deployed, and `publish`
lets other services' consumers check themselves against what this one emits. The
catalog is the same knowledge written for people. Both read the code alone; only
`--registry` and `publish` need a running NATS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson

from kaya.app.cli import common
from kaya.app.cli.common import CliError


def register(sub: common.Subcommands) -> None:
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
    common.remote(check)
    common.with_app(check)
    export = actions.add_parser(
        "export", help="add the code's schemas to the committed file (older versions kept)"
    )
    export.add_argument("--output", dest="file", default="docs/schemas.json", metavar="PATH")
    export.set_defaults(registry=False)
    common.common(export, node=False)
    common.with_app(export)
    publish = actions.add_parser(
        "publish", help="register the file's and the code's schemas in the kaya_schemas bucket"
    )
    publish.add_argument("--from", dest="file", default="docs/schemas.json", metavar="PATH")
    common.remote(publish)
    common.with_app(publish)
    for action in (check, export, publish):
        action.set_defaults(handler=_schema)

    catalog = sub.add_parser("catalog", help="the event dictionary: every command and event")
    catalog.add_argument("--format", choices=["markdown", "asyncapi"], default="markdown")
    catalog.add_argument("--output", metavar="PATH", help="write there (default: stdout)")
    common.common(catalog, node=False)
    common.with_app(catalog)
    catalog.set_defaults(handler=_catalog)


async def _schema(args: argparse.Namespace) -> int:
    from kaya.app.schemas import registry as schemas

    registry = common.app(common.config(args)).registry
    current = schemas.code_schemas(registry)
    path = Path(args.file)
    if args.action == "publish":
        everything = schemas.merge_schemas(_load(path), current)
        async with common.session(common.url(args)) as nc:
            try:
                added = await schemas.publish_schemas(nc.jetstream(), everything)
            except schemas.SchemaConflict as exc:
                raise CliError(str(exc), exit_code=1) from None
        print(f"{schemas.SCHEMAS_BUCKET}: {len(everything)} schemas, {added} newly registered")
        return 0
    if args.action == "check" and args.registry:
        url = common.url(args)
        async with common.session(url) as nc:
            recorded = await schemas.read_registry(nc.jetstream())
        against = f"{schemas.SCHEMAS_BUCKET} at {url}"
    else:
        if args.action == "check" and not await anyio.Path(path).exists():
            raise CliError(f"{path} does not exist: `kaya schema export` writes it")
        recorded, against = _load(path), str(path)
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


def _load(path: Path) -> dict[str, Any]:
    """The schema file, or one line saying why it cannot be read."""
    from kaya.app.schemas import registry as schemas

    try:
        recorded = schemas.load_schemas(path)
    except orjson.JSONDecodeError as exc:
        raise CliError(
            f"{path} is not a schema file (`kaya schema export` writes one): {exc}"
        ) from None
    if not isinstance(recorded, dict):
        raise CliError(f"{path} is not a schema file (`kaya schema export` writes one)")
    return recorded


async def _catalog(args: argparse.Namespace) -> int:
    from kaya.app.schemas.catalog import build_catalog, render_asyncapi, render_markdown

    app = common.app(common.config(args))
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
