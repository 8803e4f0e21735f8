"""Tests of batchrun.congestion: congestion told from one-off push-backs."""

from __future__ import annotations

import heapq
import random
from typing import Any

import pytest

from batchrun.congestion import (
    ALERT_ANSWERS,
    ALERT_STREAK,
    CONGESTED_SHARE,
    STREAK,
    WINDOW,
    RecentAnswers,
)


def test_a_lone_push_back_is_no_congestion() -> None:
    recent = RecentAnswers()
    assert not recent.pushed_back()
    for _ in range(WINDOW):
        recent.good()
    assert not recent.pushed_back()


def test_push_backs_in_a_row_are_congestion() -> None:
    recent = RecentAnswers()
    for _ in range(100):
        recent.good()
    verdicts = [recent.pushed_back(instant_sent_at=1.0) for _ in range(STREAK)]
    assert verdicts == [False] * (STREAK - 1) + [True]


def test_rejections_scattered_among_sends_are_no_streak() -> None:
    recent = RecentAnswers()
    ranks = [recent.sent() for _ in range(40)]
    # Every other send rejected, the others still in flight: the share may
    # tell, a streak may not.
    assert not any(recent.pushed_back(instant_sent_at=rank) for rank in ranks[::2][:STREAK])
    assert [recent.pushed_back(instant_sent_at=rank) for rank in ranks[30 : 30 + STREAK]][-1]


def test_slow_push_backs_in_a_row_count_only_towards_the_share() -> None:
    recent = RecentAnswers()
    for _ in range(100):
        recent.good()
    assert not any(recent.pushed_back() for _ in range(STREAK))


def test_good_answers_sent_before_the_rejections_do_not_break_the_streak() -> None:
    recent = RecentAnswers()
    verdicts = []
    for _ in range(STREAK):
        recent.good(sent_at=0.5)  # accepted before the limiter filled up
        verdicts.append(recent.pushed_back(instant_sent_at=1.0))
    assert verdicts[-1]
    recent.good(sent_at=2.0)  # sent after them: the limiter took it
    assert not recent.pushed_back(instant_sent_at=3.0)


def test_a_share_of_the_window_is_congestion_even_with_good_answers_between() -> None:
    recent = RecentAnswers(window=20, share=0.25, streak=10)
    for _ in range(20):
        recent.good()
    verdicts = []
    for _ in range(5):
        recent.good()
        verdicts.append(recent.pushed_back())
    assert verdicts == [False, False, False, False, True]  # 5 of the last 20


def test_old_push_backs_leave_the_window() -> None:
    recent = RecentAnswers(window=10, share=0.3, streak=5)
    recent.pushed_back()
    recent.pushed_back()
    for _ in range(9):
        recent.good()
    assert not recent.pushed_back()  # the first two fell out: 1 of the last 10


def test_random_five_percent_push_backs_are_rarely_congestion() -> None:
    rng = random.Random(7)
    runs_alarmed = 0
    for _ in range(40):  # 40 runs of 5,000 rows where 10 % fail once
        recent = RecentAnswers()
        congested = 0
        for _ in range(5_500):
            if rng.random() < 0.05:
                congested += recent.pushed_back(instant_sent_at=0.0)
            else:
                recent.good()
        runs_alarmed += congested > 0
    assert runs_alarmed <= 2  # four instant ones in a row: once in 160,000 answers


def test_after_congestion_a_shorter_streak_is_enough_for_a_while() -> None:
    assert 2 <= ALERT_STREAK < STREAK
    recent = RecentAnswers()
    assert [recent.pushed_back(1.0) for _ in range(STREAK)][-1]
    for _ in range(10):
        recent.good()
    shorter = [recent.pushed_back(2.0) for _ in range(ALERT_STREAK)]
    assert shorter == [False] * (ALERT_STREAK - 1) + [True]
    for _ in range(ALERT_ANSWERS):
        recent.good()
    assert not any(recent.pushed_back(3.0) for _ in range(ALERT_STREAK))


def simulate(
    recent: RecentAnswers,
    rng: random.Random,
    *,
    answers: int,
    rejected: float,
    full_from: int | None = None,
) -> list[int]:
    """64 requests in flight, each sent as soon as an answer frees its place:
    good answers take 50 ms, rejections 1 ms. A share ``rejected`` of the
    requests is rejected at random; from answer ``full_from`` on, the limiter
    is full and rejects every request. The answers (counted from 0) whose
    verdict was congestion."""
    in_flight: list[tuple[float, int, bool]] = []

    def send(now: float, answered: int) -> None:
        rank = recent.sent()
        full = full_from is not None and answered >= full_from
        if full or rng.random() < rejected:
            heapq.heappush(in_flight, (now + 0.001, rank, True))
        else:
            heapq.heappush(in_flight, (now + 0.05, rank, False))

    for _ in range(64):
        send(0.0, 0)
    verdicts = []
    for answer in range(answers):
        now, rank, pushed_back = heapq.heappop(in_flight)
        if pushed_back and recent.pushed_back(instant_sent_at=rank):
            verdicts.append(answer)
        elif not pushed_back:
            recent.good(sent_at=rank)
        send(now, answer)
    return verdicts


def test_random_push_backs_among_many_in_flight_are_rarely_congestion() -> None:
    """At 64 in flight, 5 % of rows pushed back put about three rejections in
    every round trip while the good answers still come from requests sent
    before them: "in a row" must mean sent in a row."""
    rng = random.Random(3)
    alarmed = [simulate(RecentAnswers(), rng, answers=5_500, rejected=0.05) for _ in range(40)]
    # Four rejected sends in a row happen by chance 5,500 x 0.05^4 = 0.03
    # times a run (1.4 in 40 runs; more than 4 runs: 1 %), and then no
    # second verdict follows: the alert's shorter streak is still 3 in a row.
    assert sum(bool(verdicts) for verdicts in alarmed) <= 4
    assert all(len(verdicts) <= 1 for verdicts in alarmed)


def test_a_full_limiter_among_many_in_flight_is_congestion_at_once() -> None:
    rng = random.Random(5)
    for _ in range(20):
        verdicts = simulate(RecentAnswers(), rng, answers=3_000, rejected=0.05, full_from=2_000)
        assert next(answer for answer in verdicts if answer >= 2_000) <= 2_000 + 64 + STREAK


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"share": 0.0}, {"share": 1.5}, {"streak": 1}])
def test_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RecentAnswers(**kwargs)


def test_defaults_are_a_fifth_of_a_round_trip() -> None:
    assert (WINDOW, CONGESTED_SHARE) == (64, 0.2)
