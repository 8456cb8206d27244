"""`kaya forget` and `kaya pseudonym`: the personal data of one entity, from the command line.

    kaya forget ENTITY ID   erase the entity's key in KAYA_KEYS: its sensitive fields
                            become unreadable everywhere (store, log, DLQ, read models)
    kaya pseudonym VALUE    the subject token standing for VALUE (an owner's
                            notifications: kaya.notify.<token>)

Both need the admin's credentials (`--context .../kaya-admin.json`, or `--config` of a
node with security on): forgetting is irreversible, and the pseudonym secret derives
from the master key, which only a node's host (and its operator) holds.
"""

from __future__ import annotations

import argparse

from kaya.app.cli import common
from kaya.app.cli.common import CliError


def register(sub: common.Subcommands) -> None:
    forget = sub.add_parser(
        "forget", help="destroy an entity's key: its sensitive fields become unreadable"
    )
    forget.add_argument("entity")
    forget.add_argument("entity_id", metavar="ID")
    common.remote(forget)
    forget.set_defaults(handler=_forget)

    pseudonym = sub.add_parser(
        "pseudonym", help="the subject token for a value (kaya.notify.<token>)"
    )
    pseudonym.add_argument("value")
    common.common(pseudonym, node=True)
    pseudonym.set_defaults(handler=_pseudonym)


async def _forget(args: argparse.Namespace) -> int:
    from kaya.app.security.keys import KEYS_BUCKET, forget

    common.check_names(args.entity, args.entity_id)
    async with common.session(common.url(args), stream=f"KV_{KEYS_BUCKET}") as nc:
        erased = await forget(nc, args.entity, args.entity_id)
    if erased:
        print(f"forgot {args.entity}/{args.entity_id}: its sensitive fields are unreadable now")
    else:
        print(f"{args.entity}/{args.entity_id} has no key (no sensitive data, or forgotten)")
    return 0


async def _pseudonym(args: argparse.Namespace) -> int:
    from kaya.app.security.keys import master_key, pseudonym, pseudonym_key

    config = common.config(args)
    if not config.security.enabled:
        raise CliError("pseudonyms need [security] enabled: without it the token is the value")
    try:
        secret = pseudonym_key(master_key(config.security_dir))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(pseudonym(secret, args.value))
    return 0
