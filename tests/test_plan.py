"""Shard placement rules, without NATS: fair shares, operator moves, little churn."""

from __future__ import annotations

from kaya.app.cluster.plan import View, plan


def owners(**counts: int) -> dict[int, str]:
    out: dict[int, str] = {}
    n = 0
    for node, count in counts.items():
        for _ in range(count):
            out[n] = node
            n += 1
    return out


def test_a_node_alone_takes_every_shard_in_one_round() -> None:
    p = plan(View(me="a", shards=16, owners={}, nodes=frozenset({"a"})), max_moves=2)
    assert p.take == list(range(16))
    assert p.hand_over == {}


def test_free_shards_are_taken_up_to_the_fair_share() -> None:
    view = View(me="b", shards=16, owners=owners(a=6), nodes=frozenset({"a", "b", "c"}))
    assert plan(view, max_moves=2).take == list(range(6, 12))


def test_a_joining_node_gets_shards_a_few_at_a_time() -> None:
    view = View(me="a", shards=16, owners=owners(a=16), nodes=frozenset({"a", "b"}))
    first = plan(view, max_moves=2)
    assert len(first.hand_over) == 2
    assert set(first.hand_over.values()) == {"b"}
    # and b takes what is handed to it, while a third node leaves it alone
    moves = dict(first.hand_over)
    rest = {n: o for n, o in view.owners.items() if n not in moves}
    for me in ("b", "c"):
        seen = View(me=me, shards=16, owners=rest, nodes=frozenset({"a", "b", "c"}), moves=moves)
        taken = set(plan(seen, max_moves=2).take)
        assert (set(moves) <= taken) == (me == "b")


def test_a_balanced_cluster_moves_nothing() -> None:
    for me in ("a", "b", "c"):
        view = View(me=me, shards=16, owners=owners(a=6, b=5, c=5), nodes=frozenset("abc"))
        assert plan(view, max_moves=2).hand_over == {}
        assert plan(view, max_moves=2).take == []


def test_rebalancing_converges_and_stops() -> None:
    current = owners(a=16)
    nodes = frozenset("abc")
    for _round in range(20):
        changed = False
        for me in sorted(nodes):
            p = plan(View(me=me, shards=16, owners=current, nodes=nodes), max_moves=2)
            for n, target in p.hand_over.items():
                current[n] = target  # hand over and taken by its target
                changed = True
        if not changed:
            break
    counts = sorted(list(current.values()).count(x) for x in nodes)
    assert counts == [5, 5, 6]


def test_an_operator_move_is_handed_to_its_target() -> None:
    view = View(me="a", shards=4, owners=owners(a=2, b=2), nodes=frozenset("ab"), moves={0: "b"})
    assert plan(view, max_moves=2).hand_over == {0: "b"}
    dead = View(me="a", shards=4, owners=owners(a=2, b=2), nodes=frozenset("ab"), moves={0: "z"})
    assert plan(dead, max_moves=2).hand_over == {}


def test_exclusive_takes_all_and_keeps_them() -> None:
    view = View(me="a", shards=8, owners=owners(a=3), nodes=frozenset("ab"))
    p = plan(view, max_moves=2, exclusive=True)
    assert p.take == list(range(3, 8))
    assert p.hand_over == {}
