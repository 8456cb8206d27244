"""The node's HTTP face for orchestrators and Prometheus: /metrics, /healthz, /readyz.

Three GET endpoints with tiny bodies do not justify a web framework: this is a
minimal HTTP/1.1 responder on anyio's TCP listener (one request per connection,
bounded header size and read time), so it adds no dependency and no thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import SocketStream, TaskStatus

log = logging.getLogger("kaya.http")

Route = Callable[[], Awaitable[tuple[int, str, bytes]]]
"""Returns (status, content type, body)."""

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
MAX_HEADER = 8192


async def serve_http(
    host: str,
    port: int,
    routes: dict[str, Route],
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started(port)` gives the bound port (0: any)."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(5):
                    head = b""
                    while b"\r\n\r\n" not in head and len(head) < MAX_HEADER:
                        head += await stream.receive(4096)
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                method, _, rest = request_line.partition(" ")
                path = rest.split(" ", 1)[0].split("?", 1)[0]
                route = routes.get(path)
                if route is None:
                    status, kind, body = 404, "text/plain", b"not found\n"
                elif method not in ("GET", "HEAD"):
                    status, kind, body = 405, "text/plain", b"GET only\n"
                else:
                    status, kind, body = await route()
                head_out = (
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                    f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                await stream.send(head_out + (b"" if method == "HEAD" else body))
            except (anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError, OSError):
                pass
            except Exception:
                log.exception("http handler failed")

    async with listener:
        task_status.started(int(bound))
        await listener.serve(handle)
