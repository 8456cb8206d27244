"""`kaya`: run a node, talk to it over NATS, and read its store.

    kaya run [--config PATH] [--data-dir DIR] [--nats-port N]
    kaya send ENTITY ID JSON [--id COMMAND_ID]
    kaya get ENTITY ID
    kaya history ENTITY ID
    kaya streams
    kaya dlq list|show|replay|purge
    kaya replay PROJECTION
    kaya tail [SUBJECT]
    kaya server-config [--cluster-name NAME --cluster-port N --routes URL,...]
    kaya dev-cluster [--servers S] [--nodes N] [--base-port P] [--data-dir DIR]
    kaya shards [move N --to NODE]
    kaya security init
    kaya security token --sub NAME [--admin] [--ttl SECONDS]
    kaya forget ENTITY ID
    kaya pseudonym VALUE
    kaya schema check|export|publish
    kaya catalog [--format markdown|asyncapi]

Any failure prints one line starting with `error:` on stderr and exits non-zero:
1 for a refused command (the contract's error code is in the line), 2 for a
usage, config or connection problem. A traceback means a bug in Kaya.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence

import anyio

from kaya.app.cli import cluster, entities, events, node, observe, privacy, schemas, shards, token
from kaya.app.cli.common import CliError, Parser, kaya_version
from kaya.app.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kaya", description="Kaya: actors on NATS JetStream with a SQLite event store."
    )
    parser.add_argument("--version", action="version", version=f"kaya {kaya_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # in the order `kaya --help` lists them
    node.register(sub)  # run
    entities.register(sub)  # send, get, history
    events.register(sub)  # streams, dlq, replay, tail
    observe.register(sub)  # slo, status
    node.register_server_config(sub)  # server-config
    token.register(node.register_security(sub))  # security init, security token
    cluster.register(sub)  # dev-cluster
    shards.register(sub)  # shards, shards move
    privacy.register(sub)  # forget, pseudonym
    schemas.register(sub)  # schema, catalog
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # asyncio's SSL transport warns on stderr when a server closes a refused handshake; the
    # refusal itself is said in one `error:` line
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    handler: Callable[[argparse.Namespace], Awaitable[int]] = args.handler
    try:
        return anyio.run(handler, args, backend="asyncio", backend_options={"use_uvloop": True})
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: one line, not a traceback
        from kaya.app.broker.embedded import ServerError
        from kaya.app.schemas.registry import SchemaConflict
        from kaya.store import StoreError

        cause: BaseException = exc
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
            cause = cause.exceptions[0]  # raised inside the node's task groups
        if isinstance(cause, CliError | ConfigError):
            print(f"error: {cause}", file=sys.stderr)
            return cause.exit_code if isinstance(cause, CliError) else 2
        if isinstance(cause, BrokenPipeError):  # `kaya status --once | head`: enough read
            return 0
        if isinstance(cause, ServerError | StoreError | OSError | SchemaConflict):
            print(f"error: {cause}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
