"""Shards across nodes: leases in a KV bucket, writes fenced by the log, the log as truth.

leases.py    who owns which shard: KAYA_SHARDS bucket, renewed on a thread of its own
plan.py      which shards to take or hand over this round (pure, tested alone)
journal.py   a command's events into KAYA_EVENTS, refused unless they follow the entity's
             last event there (the fence), answered only once stored
steps.py     a saga's steps to whichever node owns the target (kaya.step.*)
follower.py  every node's SQLite follows KAYA_EVENTS: partition recovery is a catch-up
host.py      the node's side: catch a shard up, serve it, drop it
"""
