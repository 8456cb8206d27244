"""`kaya security token`: a development bearer token, to try `[security.jwt]` locally.

    kaya security token --sub NAME [--admin] [--ttl S] [--issuer I] [--audience A]
      -> <security dir>/jwt-signing.key (made with jwt-public.pem if absent) -> the JWT

The token is printed alone on stdout, so `TOKEN=$(kaya security token --sub alice)`
works. The node verifies it with `key_file = "jwt-public.pem"` in `[security.jwt]`
(relative paths are under the security dir). Production tokens come from your
identity provider, whose public keys the node is given instead.
"""

from __future__ import annotations

import argparse
import sys

from kaya.app.cli import common
from kaya.app.cli.common import CliError


def register(actions: common.Subcommands) -> None:
    """`token`, beside `init` under `kaya security`."""
    token = actions.add_parser(
        "token",
        help="print a development JWT for [security.jwt]",
        description="Print a JWT signed with <security dir>/jwt-signing.key (made, with"
        " jwt-public.pem, if absent). A node whose [security.jwt] has"
        ' key_file = "jwt-public.pem" and the same issuer and audience accepts it.',
    )
    common.common(token, node=False)
    token.add_argument("--data-dir", metavar="DIR", help="overrides node.data_dir")
    token.add_argument("--sub", required=True, metavar="NAME", help="the caller (`sub` claim)")
    token.add_argument(
        "--admin", action="store_true", help='add the claim "admin": true (for your policy)'
    )
    token.add_argument(
        "--ttl",
        type=common.positive_float,
        default=3600.0,
        metavar="SECONDS",
        help="seconds until it expires (default 3600)",
    )
    token.add_argument("--issuer", metavar="ISS", help="default: security.jwt.issuer")
    token.add_argument("--audience", metavar="AUD", help="default: security.jwt.audience")
    token.set_defaults(handler=_token)


async def _token(args: argparse.Namespace) -> int:
    from kaya.app.config import jwt_key_paths
    from kaya.app.security.tokens import mint, new_signing_key

    config = common.config(args)
    settings = config.security.jwt
    issuer = args.issuer or settings.issuer
    audience = args.audience or settings.audience
    for flag, key, value in (("--issuer", "issuer", issuer), ("--audience", "audience", audience)):
        if not value:
            raise CliError(f"no {key}: give {flag} or set security.jwt.{key} in the config")
    signing, public = new_signing_key(config.security_dir)
    key_file, _ = jwt_key_paths(config)
    if key_file is not None and key_file.resolve() != public.resolve():
        print(
            f"note: security.jwt.key_file is {key_file}, not {public}: a node with this"
            " config refuses the token",
            file=sys.stderr,
        )
    claims = {"admin": True} if args.admin else None
    print(
        mint(
            signing.read_bytes(),
            subject=args.sub,
            issuer=issuer,
            audience=audience,
            ttl=args.ttl,
            claims=claims,
        )
    )
    return 0
