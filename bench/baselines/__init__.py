"""Alternatives to Kaya doing the same job, measured beside it in the same run.

Each is a responder process serving the account part of Kaya's wire contract
(`kaya.cmd.account.<id>`: Open, Deposit; `kaya.qry.account.<id>`: state) with
the same reply shapes, as durable as a node (SQLite WAL, synchronous=FULL, each
command's event committed before its reply), so bench/e2e.py's load generator
and balance check run against it unchanged:

    python -m <module> --url nats://127.0.0.1:PORT --db /path/to/file.sqlite

It prints a line containing `ready` once subscribed and exits 0 on SIGTERM.

- `naive` (bench.baselines.naive): nats-py + aiosqlite, one SQLite transaction
  (and fsync) per request, no group commit. Shows what Kaya's batching buys over
  the obvious design on the same stack and the same schema.
- `faststream` (bench.baselines.faststream_app): the same store behind a
  FastStream NatsBroker with concurrent handlers (`max_workers`). Shows what a
  popular messaging framework gives for the same append.
- `eventsourcing` (bench.baselines.eventsourcing_app): the `eventsourcing`
  library's Application and Aggregate on its SQLite persistence, snapshots
  every 100 events and its aggregate cache on, called in worker threads. Shows
  what the established Python event-sourcing library gives for the same deposits.
"""

from __future__ import annotations

RESPONDERS: dict[str, str] = {
    "naive": "bench.baselines.naive",
    "faststream": "bench.baselines.faststream_app",
    "eventsourcing": "bench.baselines.eventsourcing_app",
}
"""Baseline name -> module to run as `[sys.executable, "-m", module, "--url", url, "--db", db]`."""
