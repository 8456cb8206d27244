"""The NATS client adapter: how a node connects, and the one place that touches nats-py internals.

Everything else in Kaya uses nats-py's public API. Two things on the hot path have none:

- how many messages wait in a subscription's buffer (the ingress sheds load on it:
  nats-py buffers up to 512k messages per subscription and then drops them silently);
- publishing a message with a prebuilt header block (the relay: nats-py encodes headers
  key by key, which was most of a publish's cost).

Both are optional speed-ups or safety nets, never required: each checks once that the
internals it needs are there, and if they are not (a nats-py that changed) it logs one
warning and falls back to the public path. nats-py is pinned to the range the adapter's
test (tests/test_adapter.py, which compares the header block byte for byte with what
nats-py's own `publish` writes) passed on.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from nats.aio.client import Client as NATS
from nats.micro.request import Request

log = logging.getLogger("kaya.nats")

_warned: set[str] = set()


def _warn_once(what: str, why: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("nats-py: %s is off (%s); using the public API instead", what, why)


class NatsUnreachable(Exception):
    """No server answered the first connection in time; the message names them."""


def server_urls(url: str) -> list[str]:
    """The servers of `nats.url`, which may list a cluster's as "nats://a:4222,nats://b:4222".

    nats-py takes one URL or a list, not a comma list; given the whole list it can start
    on any server and fail over to the others.
    """
    return [part.strip() for part in url.split(",") if part.strip()]


async def connect(
    servers: str | list[str],
    *,
    name: str,
    on_reconnect: Callable[[], None] | None = None,
    on_disconnect: Callable[[], None] | None = None,
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> NATS:
    """A connection that reconnects forever and logs its disconnections.

    `servers` is one URL, a comma list of them (`nats.url`), or a list.

    The first connection must succeed within `timeout` (NatsUnreachable otherwise):
    nats-py's "reconnect forever" also applies to it, and a node that waits forever for
    a server that was never there looks alive while it serves nothing.

    `on_disconnect` and `on_reconnect` let the node time an outage (liveness) and
    restore what a restarted server may have lost (streams, the relay's rewind).
    """
    if isinstance(servers, str):
        servers = server_urls(servers)
    nc = NATS()

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %r", exc)

    async def on_disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("nats: disconnected")
            if on_disconnect is not None:
                on_disconnect()

    async def on_reconnected() -> None:
        log.info("nats: reconnected")
        if on_reconnect is not None:
            on_reconnect()

    with anyio.move_on_after(timeout) as scope:
        await nc.connect(
            servers,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            tls=tls,
        )
    if scope.cancelled_caught:
        with anyio.CancelScope(shield=True):
            await nc.close()
        where = ", ".join(servers)
        raise NatsUnreachable(f"cannot connect to NATS at {where} within {timeout:g} s")
    return nc


def reply_subject(request: Request) -> str:
    """The reply subject of a micro-service request ("" when the sender wants no reply).

    nats.micro's Request exposes subject, data and headers but not the reply subject;
    the ingress needs it to answer later, after the actor's commit.
    """
    msg = getattr(request, "_msg", None)
    reply = getattr(msg, "reply", None)
    if isinstance(reply, str):
        return reply
    raise RuntimeError("nats-py's micro Request no longer carries its message: see adapter.py")


def queued_messages(nc: NATS, request: Request) -> int | None:
    """Messages waiting in the buffer of the subscription `request` came on; None if unknown."""
    sid = getattr(getattr(request, "_msg", None), "_sid", None)
    subs = getattr(nc, "_subs", None)
    sub = subs.get(sid) if sid is not None and isinstance(subs, dict) else None
    pending = getattr(sub, "pending_msgs", None)
    if isinstance(pending, int):
        return pending
    _warn_once("the ingress's queued-requests bound", "no subscription buffer depth")
    return None


_PUBLISH_INTERNALS = (
    "_send_command",
    "_flush_pending",
    "_flush_queue",
    "stats",
    "max_payload",
    "is_draining_pubs",
)


class HeaderPublisher:
    """Publishes messages whose NATS header block is already encoded.

    `publish` hands the HPUB command to the client's outbound buffer exactly as nats-py's
    own `publish` would after encoding `headers`; when the internals are missing, or the
    client is not connected (nats-py then buffers or refuses by its own rules), it calls
    the public `publish` with `headers` instead.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._hpub: Callable[[str, str, bytes, bytes], bytes] | None = None
        missing = [name for name in _PUBLISH_INTERNALS if not hasattr(nc, name)]
        try:
            from nats.protocol.command import hpub_cmd
        except ImportError:
            missing.append("nats.protocol.command.hpub_cmd")
        else:
            self._hpub = hpub_cmd
        self.fast = not missing
        if missing:
            _warn_once("the relay's header fast path", f"missing {', '.join(missing)}")

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        reply: str,
        header_block: bytes,
        headers: Callable[[], Mapping[str, str]],
    ) -> None:
        nc: Any = self._nc
        if (
            self.fast
            and self._hpub is not None
            and nc.is_connected
            and not nc.is_draining_pubs
            and len(data) <= nc.max_payload
        ):
            await nc._send_command(self._hpub(subject, reply, header_block, data))
            nc.stats["out_msgs"] += 1
            nc.stats["out_bytes"] += len(data)
            flush_queue = nc._flush_queue
            if flush_queue is not None and flush_queue.empty():
                await nc._flush_pending()
            return
        await self._nc.publish(subject, data, reply=reply, headers=dict(headers()))
