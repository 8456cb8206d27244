"""Which shards a node takes and hands over in one round: a pure function of what it sees.

Kept apart from the lease I/O so every rule is tested without NATS:

- a free shard is taken at once up to the node's fair share (ceil(shards / live nodes)):
  an unserved shard is not churn, and a node alone takes every shard in one round;
- a shard with a move request is left to its target while the target is alive;
- a node above its fair share hands over at most `max_moves` shards a round, and only
  while some live node is below the floor of the share: a joining node gets its share
  over a few rounds instead of every shard moving at once, and a balanced cluster with
  uneven counts (16 over 3: 6, 5, 5) never moves anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class View:
    """What a node sees in the bucket this round."""

    me: str
    shards: int
    owners: dict[int, str]
    """Shard -> its holder; a shard missing here is free."""
    nodes: frozenset[str]
    """Live nodes (a heartbeat within the lease TTL), this one included."""
    moves: dict[int, str] = field(default_factory=dict)
    """Shard -> the node an operator asked it to move to."""


@dataclass(frozen=True)
class Plan:
    take: list[int]
    hand_over: dict[int, str]
    """Shard -> the node it goes to (written as a move request, so the others leave it)."""


def plan(view: View, *, max_moves: int, exclusive: bool = False) -> Plan:
    """This round's moves for `view.me`. `exclusive` (local durability): take every free
    shard and never hand one over: one node serves them all."""
    nodes = view.nodes | {view.me}
    mine = sorted(n for n, owner in view.owners.items() if owner == view.me)
    free = [n for n in range(view.shards) if n not in view.owners]
    if exclusive:
        return Plan(take=free, hand_over={})
    ceiling = math.ceil(view.shards / len(nodes))
    floor = view.shards // len(nodes)
    take: list[int] = []
    for n in free:
        target = view.moves.get(n)
        unclaimed = target is None or target not in nodes
        if target == view.me or (unclaimed and len(mine) + len(take) < ceiling):
            take.append(n)
    hand_over: dict[int, str] = {}
    for n in mine:  # an operator's moves first
        target = view.moves.get(n)
        mover = target is not None and target != view.me and target in nodes
        if mover and target is not None and len(hand_over) < max_moves:
            hand_over[n] = target
    counts = {node: 0 for node in nodes}
    for owner in view.owners.values():
        if owner in counts:
            counts[owner] += 1
    left = len(mine) - len(hand_over)
    for n in reversed(mine):
        if len(hand_over) >= max_moves or left <= floor:
            break
        if n in hand_over:
            continue
        needy = [node for node in sorted(nodes, key=lambda x: (counts[x], x)) if node != view.me]
        if not needy or counts[needy[0]] >= floor:
            break
        hand_over[n] = needy[0]
        counts[needy[0]] += 1
        left -= 1
    return Plan(take=take, hand_over=hand_over)
