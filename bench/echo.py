"""Echo responder: the transport's limit, the baseline every Kaya figure is divided by.

    python -m bench.echo --url nats://127.0.0.1:PORT [--security-dir DIR]

A plain nats-py subscription on `kaya.cmd.>` that answers every request with one
fixed reply shaped like a Kaya deposit reply. It does what a node must do at the
least (receive, publish a reply) and nothing else, in its own process like a
node, so the same load generator against it measures what nats-py, nats-server
and this machine allow; a node can only be slower, and the ratio says by how much.
With `--security-dir` (a Kaya dev PKI) it connects over TLS with the `node` role's
client certificate: the transport's limit with TLS (`echo-tls`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
from pathlib import Path

import nats
import uvloop
from nats.aio.msg import Msg

SUBJECT = "kaya.cmd.>"
REPLY = (
    b'{"ok":true,"entity":"account","id":"acc-0","version":2,'
    b'"events":[{"type":"Deposited","amount":1}]}'
)


async def serve(url: str, tls: ssl.SSLContext | None = None) -> None:
    """Answer until SIGTERM/SIGINT, then drain so no request in flight is left unanswered."""
    nc = await nats.connect(url, name="bench-echo", allow_reconnect=False, tls=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def respond(msg: Msg) -> None:
        if msg.reply:
            await nc.publish(msg.reply, REPLY)

    try:
        await nc.subscribe(SUBJECT, cb=respond)
        await nc.flush()
        print(f"echo responder ready on {url} ({SUBJECT})", flush=True)
        await stop.wait()
    finally:
        await nc.drain()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="NATS URL, e.g. nats://127.0.0.1:4222")
    parser.add_argument("--security-dir", type=Path, help="a Kaya dev PKI: connect over TLS")
    args = parser.parse_args()
    tls = None
    if args.security_dir is not None:
        from kaya.app.security.pki import Pki

        tls = Pki(args.security_dir).role("node").ssl_context()
    uvloop.run(serve(args.url, tls))


if __name__ == "__main__":
    main()
