"""What every `kaya` command shares: its options, its config and app, NATS, its output.

    argv -> build_parser (the family modules' `register`) -> a handler
      -> config(args) / app(config) / url(args) -> session / request -> print_*

One place for them, so every command reads `--config`, `--app` and `--url` the same
way, reports a failure the same way (a CliError: one line and an exit code, printed
by `main`), and prints JSON the same way. Heavy imports (nats, the node) happen
inside the functions that need them: `kaya --help` and `--version` stay fast.

Every failure a user can cause or meet is expected, so it is a CliError: a bad
argument (argparse's own errors included), a server that is down, has no JetStream
or no Kaya streams yet, a connection that drops. `session` turns nats-py's and
JetStream's exceptions into one line that names the server; a traceback is left
for bugs only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import orjson

from kaya.app.config import Config, load_config, with_overrides
from kaya.app.security.tls import Violations

if TYPE_CHECKING:
    from kaya.app.application import App

DEFAULT_URL = "nats://127.0.0.1:4222"


def kaya_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kaya")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class CliError(Exception):
    """A one-line message for the user, with the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one `error:` line (exit 2) like every other failure."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[Parser]
    """What each family's `register` adds its commands to."""


def _number(
    cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str
) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value

    parse.__name__ = what  # what argparse would name in its message
    return parse


positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number of seconds > 0")
positive_int = _number(int, lambda v: v > 0, "an integer >= 1")
count = _number(int, lambda v: v >= 0, "an integer >= 0")


# ---- options ----------------------------------------------------------------------------


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
    p.add_argument(
        "--context",
        metavar="FILE",
        help="a NATS CLI context file (its url, cert, key, ca), e.g."
        " data/security/contexts/kaya-client.json when security is on",
    )
    p.add_argument(
        "--timeout", type=positive_float, default=5.0, help="seconds to wait for a reply"
    )


# ---- config, app, url ---------------------------------------------------------------------


def config(args: argparse.Namespace) -> Config:
    loaded = load_config(getattr(args, "config", None))
    return with_overrides(
        loaded,
        data_dir=getattr(args, "data_dir", None),
        nats_port=getattr(args, "nats_port", None),
        monitor_port=getattr(args, "monitor_port", None),
        metrics_address=getattr(args, "metrics_address", None),
        http_address=getattr(args, "http_address", None),
        app=getattr(args, "app", None),
        secure=getattr(args, "secure", None),
        role=getattr(args, "role", None),
        node_name=getattr(args, "node_name", None) or os.environ.get("KAYA_NODE_NAME") or None,
    )


def app(config: Config) -> App:
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


def store_path(config: Config) -> Path:
    """The event store a tool opens read-write: it must exist (a node made it), or the tool
    would create an empty store where the user mistyped a path."""
    path = config.store_path
    if not path.is_file():
        raise CliError(f"no event store at {path} (is --data-dir or node.data_dir right?)")
    return path


def check_names(entity: str, entity_id: str, command_id: str | None = None) -> None:
    """The contract's checks on what goes into a subject or a header, made here: a name
    with a space or a wildcard cannot even be sent. Refused as the node refuses them."""
    from kaya.actors.errors import BadRequest
    from kaya.actors.wire import check_command_id, check_entity_id, check_entity_name

    try:
        check_entity_name(entity)
        check_entity_id(entity_id)
        if command_id is not None:
            check_command_id(command_id)
    except BadRequest as exc:
        raise CliError(f"{exc.code}: {exc.message}", exit_code=1) from None


_TLS: dict[str, Any] = {}
_VIOLATIONS = Violations()
"""URL -> the credentials (`kaya.app.security.pki.Credentials`) this command connects with."""


def url(args: argparse.Namespace) -> str:
    """The server(s) to talk to, and with `--context` (or a config with security on) the
    certificate to present: registered here for `connect`."""
    from kaya.app.security.pki import Pki
    from kaya.app.security.tls import read_context

    chosen = _url(args)
    context = getattr(args, "context", None)
    if context:
        try:
            named, credentials = read_context(Path(context))
        except ValueError as exc:
            raise CliError(str(exc)) from None
        chosen = str(args.url or named or chosen)
        if credentials is not None:
            _TLS[chosen] = credentials
    elif getattr(args, "config", None) and config(args).security.enabled:
        pki = Pki(config(args).security_dir)  # the operator's own tools: the admin's
        if pki.has("admin"):
            _TLS[chosen] = pki.role("admin")
    return chosen


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    if os.environ.get("KAYA_NATS_URL"):
        return os.environ["KAYA_NATS_URL"]
    if args.config:
        settings = config(args)
        return settings.nats.url or f"nats://{settings.nats.host}:{settings.nats.port}"
    return DEFAULT_URL


# ---- NATS -------------------------------------------------------------------------------


async def connect(url: str) -> Any:
    import nats
    import nats.errors

    from kaya.app.broker.adapter import server_urls

    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        if not _VIOLATIONS.seen(exc):  # a refused publish is told to its request instead
            errors.append(exc)

    with anyio.move_on_after(3):
        try:
            credentials = _TLS.get(url)
            nc = _client_for(credentials)
            await nc.connect(
                server_urls(url),
                connect_timeout=2,
                allow_reconnect=False,
                error_cb=remember,
                tls=credentials.ssl_context() if credentials is not None else None,
            )
            return nc
        except (nats.errors.Error, OSError, ValueError) as exc:  # refused, bad URL, TLS
            errors.append(exc)
    from kaya.app.security.tls import why_refused

    reason = why_refused(errors, _TLS.get(url)) or (_reason(errors[-1]) if errors else "timed out")
    raise CliError(f"cannot connect to NATS at {url}: {reason}")


def _client_for(credentials: Any) -> Any:
    """A plain client, or with a role's certificate one that refuses what the role may not
    publish before sending it (see CheckedClient)."""
    from nats.aio.client import Client

    from kaya.app.security.permissions import may_publish
    from kaya.app.security.tls import CheckedClient, role_of

    role = role_of(credentials) if credentials is not None else None
    if role is None:
        return Client()
    return CheckedClient(lambda subject: may_publish(role, subject))


def _reason(exc: BaseException) -> str:
    from kaya.app.security.tls import tls_refusal

    refusal = tls_refusal(exc)
    if refusal is not None:
        return refusal
    text = str(exc).removeprefix("nats: ").strip()
    return text or type(exc).__name__


def innermost(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-exception groups (raised in task groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def nats_failure(exc: BaseException, url: str, stream: str = "") -> CliError | None:
    """One line for a NATS or JetStream failure at `url`; None if `exc` is something else.

    `stream` names the stream the command reads, for a server where no node created it.
    """
    import nats.errors
    import nats.js.errors

    from kaya.app.broker.adapter import NatsUnreachable

    exc = innermost(exc)
    if isinstance(exc, NatsUnreachable):
        return CliError(str(exc))
    if isinstance(exc, PermissionError):
        return CliError(f"forbidden: {exc}", exit_code=1)
    if isinstance(exc, nats.js.errors.ServiceUnavailableError) or (
        isinstance(exc, nats.errors.NoRespondersError) and stream
    ):
        return CliError(
            f"JetStream is not enabled on the NATS server at {url}: Kaya needs it"
            " (`kaya run` embeds a server with it; run your own with `nats-server -js`)"
        )
    if isinstance(exc, nats.js.errors.NotFoundError) and "stream" in str(exc.description):
        what = stream or "the Kaya streams"
        return CliError(f"{what} does not exist on {url} yet: start a node (`kaya run`)")
    if isinstance(exc, nats.js.errors.APIError):
        return CliError(f"JetStream at {url} refused: {exc.description or _reason(exc)}")
    if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
        return CliError(f"NATS at {url} did not answer in time")
    if isinstance(
        exc,
        nats.errors.ConnectionClosedError
        | nats.errors.StaleConnectionError
        | nats.errors.ConnectionReconnectingError
        | ConnectionError,
    ):
        return CliError(f"lost the connection to NATS at {url}")
    if isinstance(exc, nats.errors.Error):
        return CliError(f"NATS at {url}: {_reason(exc)}")
    return None


@asynccontextmanager
async def session(url: str, *, stream: str = "") -> AsyncIterator[Any]:
    """A NATS connection for one command; NATS and JetStream failures inside the block
    come out as one CliError line naming the server (and `stream`, if it is missing)."""
    nc = await connect(url)
    try:
        yield nc
    except Exception as exc:
        failure = nats_failure(exc, url, stream)
        if failure is None:
            raise
        raise failure from None
    finally:
        # already closed when the server went away: nothing left to flush
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await nc.close()


async def request(
    url: str, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
) -> bytes:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from kaya.actors.wire import HEADER_SERVICE_ERROR, HEADER_SERVICE_ERROR_CODE

    async with session(url) as nc:
        try:
            msg = await _VIOLATIONS.request(nc, subject, body, timeout=timeout, headers=headers)
        except PermissionError as exc:
            raise CliError(f"forbidden: {exc}", exit_code=1) from None
        except NoRespondersError:
            raise CliError(
                f"no Kaya node is serving {subject} on {url}: start one with `kaya run`"
            ) from None
        except NatsTimeout:
            raise CliError(f"no reply on {subject} within {timeout}s", exit_code=1) from None
    replied = msg.headers or {}
    if not msg.data and HEADER_SERVICE_ERROR_CODE in replied:  # a micro error, no body
        code, reason = replied[HEADER_SERVICE_ERROR_CODE], replied.get(HEADER_SERVICE_ERROR, "")
        raise CliError(f"{code}: {reason}", exit_code=1)
    return bytes(msg.data)


# ---- output -----------------------------------------------------------------------------


def print_reply(data: bytes) -> int:
    try:
        reply: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise CliError(f"the node sent a reply that is not JSON: {data[:200]!r}") from None
    if isinstance(reply, dict) and reply.get("ok") is False:
        error = reply.get("error") or {}
        raise CliError(f"{error.get('code', 'internal')}: {error.get('message', '')}", exit_code=1)
    print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
    return 0


def print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
