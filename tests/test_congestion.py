"""Tests of batchrun.congestion: congestion told from one-off push-backs."""

from __future__ import annotations

import random
from typing import Any

import pytest

from batchrun.congestion import (
    ALERT_ANSWERS,
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


def test_after_congestion_two_in_a_row_are_enough_for_a_while() -> None:
    recent = RecentAnswers()
    assert [recent.pushed_back(1.0) for _ in range(STREAK)][-1]
    for _ in range(10):
        recent.good()
    assert [recent.pushed_back(2.0), recent.pushed_back(2.0)] == [False, True]
    for _ in range(ALERT_ANSWERS):
        recent.good()
    assert [recent.pushed_back(3.0), recent.pushed_back(3.0)] == [False, False]


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"share": 0.0}, {"share": 1.5}, {"streak": 1}])
def test_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RecentAnswers(**kwargs)


def test_defaults_are_a_fifth_of_a_round_trip() -> None:
    assert (WINDOW, CONGESTED_SHARE) == (64, 0.2)
