"""What every `kaya` command shares: its options, its config and app, NATS, its output.

    argv -> build_parser (the family modules' `register`) -> a handler
      -> config(args) / app(config) / url(args) -> connect / request -> print_*

One place for them, so every command reads `--config`, `--app` and `--url` the same
way, reports a failure the same way (a CliError: one line and an exit code, printed
by `main`), and prints JSON the same way. Heavy imports (nats, the node) happen
inside the functions that need them: `kaya --help` and `--version` stay fast.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from kaya.app.config import Config, load_config, with_overrides

if TYPE_CHECKING:
    from kaya.app.application import App

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]
    """What each family's `register` adds its commands to."""

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
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")


# ---- config, app, url ---------------------------------------------------------------------


def config(args: argparse.Namespace) -> Config:
    loaded = load_config(getattr(args, "config", None))
    return with_overrides(
        loaded,
        data_dir=getattr(args, "data_dir", None),
        nats_port=getattr(args, "nats_port", None),
        monitor_port=getattr(args, "monitor_port", None),
        metrics_address=getattr(args, "metrics_address", None),
        app=getattr(args, "app", None),
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


def url(args: argparse.Namespace) -> str:
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


async def request(
    url: str, subject: str, body: bytes, headers: dict[str, str] | None, timeout: float
) -> bytes:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    nc = await connect(url)
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
