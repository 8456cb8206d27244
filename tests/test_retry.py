"""Backoff: the delays it produces, checked with an injected random draw and sleep."""

from __future__ import annotations

import random

import anyio
import pytest

from kaya.actors.retry import Backoff


def fixed(value: float) -> Backoff:
    """A backoff whose random draw is always `value` (in [0, 1))."""
    return Backoff(initial=0.1, cap=2.0, random=lambda: value)


def test_the_ceiling_doubles_from_initial_up_to_the_cap() -> None:
    backoff = Backoff(initial=0.1, cap=2.0)
    ceilings = [backoff.ceiling(attempt) for attempt in range(1, 9)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])


def test_the_delay_is_the_random_draw_scaled_to_the_ceiling() -> None:
    """Full jitter: uniform in [0, ceiling); the draw 0 gives no wait, near 1 the ceiling."""
    assert [fixed(0.0).delay(attempt) for attempt in (1, 3, 10)] == [0.0, 0.0, 0.0]
    assert fixed(0.5).delay(1) == pytest.approx(0.05)
    assert fixed(0.5).delay(3) == pytest.approx(0.2)
    assert fixed(0.5).delay(10) == pytest.approx(1.0)
    top = 1.0 - 2**-53  # the largest draw random.random() can make
    assert fixed(top).delay(4) == pytest.approx(0.8)
    assert fixed(top).delay(4) < 0.8


def test_delays_stay_within_their_bounds_and_grow_on_average() -> None:
    backoff = Backoff(initial=0.05, cap=1.0, random=random.Random(7).random)
    means = []
    for attempt in range(1, 9):
        ceiling = min(1.0, 0.05 * 2 ** (attempt - 1))
        delays = [backoff.delay(attempt) for _ in range(2000)]
        assert all(0.0 <= d < ceiling for d in delays)
        assert max(delays) > 0.9 * ceiling  # the whole range is used, not a slice of it
        means.append(sum(delays) / len(delays))
    assert means[:5] == sorted(means[:5])  # doubling until the cap (reached at attempt 6)
    assert means[5:] == pytest.approx([0.5, 0.5, 0.5], rel=0.1)  # then level at cap / 2


def test_a_huge_attempt_waits_the_cap_instead_of_overflowing() -> None:
    assert Backoff(initial=0.1, cap=3.0).ceiling(5000) == 3.0
    assert Backoff(initial=0.0, cap=3.0).ceiling(5000) == 0.0
    assert fixed(0.5).delay(10**6) == pytest.approx(1.0)


def test_attempts_count_from_one_and_bounds_are_not_negative() -> None:
    with pytest.raises(ValueError, match="count from 1"):
        Backoff(initial=0.1, cap=2.0).delay(0)
    with pytest.raises(ValueError, match="initial >= 0"):
        Backoff(initial=-0.1, cap=2.0)
    with pytest.raises(ValueError, match="cap >= 0"):
        Backoff(initial=0.1, cap=-1.0)


def test_sleep_waits_the_delay_through_the_injected_sleep() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    draws = iter([0.25, 0.5, 0.75, 0.5])
    backoff = Backoff(initial=1.0, cap=3.0, random=lambda: next(draws), sleep=sleep)

    async def main() -> list[float]:
        return [await backoff.sleep(attempt) for attempt in (1, 2, 3, 4)]

    returned = anyio.run(main)
    assert slept == returned
    assert slept == pytest.approx([0.25, 1.0, 2.25, 1.5])  # ceilings 1, 2, 3 (cap), 3
