"""Watchdog: an embedded nats-server whose JetStream stopped writing is restarted.

nats-server marks a stream's file store failed after a write error (a full disk:
`Critical write error ... no space left on device`) and then leaves every later
publish to that stream unanswered, even once space is back; a restart of the server
heals it (measured with nats-server 2.15: publishes timed out for as long as we
waited after freeing the disk; the first one after a restart was stored). The node
sees it only as a relay whose publishes are never acknowledged. So, when the relay
has been failing for WEDGED_AFTER seconds while the node is connected, and the disk
under the JetStream directory has room again, the node restarts its own server: the
supervisor starts it on the same store, the client reconnects, the relay rewinds.
An external server is the operator's to restart: the relay then shows as failing in
`kaya status`, `/readyz` and the metrics.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import anyio

from kaya.app.broker.embedded import EmbeddedServer
from kaya.app.events.failing import PartHealth

log = logging.getLogger("kaya.nats")

WEDGED_AFTER = 20.0
"""Seconds of failing relay publishes, while connected, before the server is restarted;
also the least time between two such restarts."""
CHECK_EVERY = 2.0
MIN_FREE = 4 * 1024 * 1024
"""Bytes free under the JetStream directory for a restart to be worth it."""


async def watch_jetstream(
    server: EmbeddedServer,
    relay_health: Callable[[], PartHealth],
    connected: Callable[[], bool],
    store_dir: Path,
) -> None:
    """Until cancelled: restart `server` when JetStream writes have stopped working."""
    while True:
        await anyio.sleep(CHECK_EVERY)
        failing_for = relay_health().failing_for()
        if failing_for < WEDGED_AFTER or not connected():
            continue
        try:
            free = shutil.disk_usage(store_dir).free
        except OSError:
            continue
        if free < MIN_FREE:  # still full: a restart would fail the same way
            log.warning(
                "JetStream writes have failed for %.0f s; %d bytes free under %s: waiting"
                " for room before restarting nats-server",
                failing_for,
                free,
                store_dir,
            )
            continue
        server.restart(f"JetStream writes have failed for {failing_for:.0f} s")
        await anyio.sleep(WEDGED_AFTER)
