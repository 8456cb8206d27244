"""Shards across nodes: leases in a KV bucket, writes fenced by epoch, the log as the truth.

leases.py    who owns which shard: KAYA_SHARDS bucket, renewed on a thread of its own
plan.py      which shards to take or hand over this round (pure, tested alone)
journal.py   a command's events into KAYA_EVENTS, refused unless under the current epoch
follower.py  every node's SQLite follows KAYA_EVENTS: partition recovery is a catch-up
host.py      the node's side: catch a shard up, serve it, drop it
"""
