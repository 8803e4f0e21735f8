"""Telling congestion from one-off failures: a pure judge of recent answers.

A provider that fails a few rows at random (a stray 503, one 429 among
thousands of good answers) is not asking the client to slow down; a rate
limiter that has been overrun rejects many requests at once. A push-back
(429, 503, a timeout) is congestion only when:

* push-backs are at least ``CONGESTED_SHARE`` of the last ``WINDOW``
  answers; or
* it ends a streak of ``STREAK`` *instant* rejections (answered in under
  the mean latency of good answers: a limiter rejects on arrival) of requests sent one
  after another, with no good answer to a request sent after them between.
  A full limiter rejects every request that reaches it, so its rejections
  are of consecutive sends; rejections scattered among accepted sends are
  chance (5 % of rows pushed back, at 64 in flight and 50 ms, put three
  rejections in every round trip, but rarely two in a row). Good answers
  to requests sent before a rejection were accepted before the limiter
  filled up, and say nothing of it now. For ``ALERT_ANSWERS`` answers after congestion was
  seen, ``ALERT_STREAK`` instant rejections are enough: a limiter that
  rejected a burst will reject again when the limit creeps back up.

Requests are known by their rank among the sends (``sent``), so "in a row"
and "sent after" do not depend on the clock's resolution.

Slow push-backs count only towards the share: answers finished in the same
instant are handled in no useful order (errors, being short, often first),
so a run of them proves nothing. A lone push-back is that row's own
business: it waits for its own retry. A 500 or a reset is never a push-back
at all (see ``throttle``).
"""

from __future__ import annotations

import collections
import math

__all__ = [
    "ALERT_ANSWERS",
    "ALERT_STREAK",
    "CONGESTED_SHARE",
    "STREAK",
    "WINDOW",
    "RecentAnswers",
]

# Answers judged together. One round trip's worth at the default limits.
WINDOW = 64

# Share of the window that must be push-backs to call it congestion: 13 of
# 64. With 5 % of rows pushed back at random, 13 in 64 happens about once in
# a hundred thousand windows; an overrun limiter rejects far more than a fifth.
CONGESTED_SHARE = 0.2

# Instant rejections in a row that are congestion whatever the window holds.
STREAK = 4

# Sends a streak may span beyond its own rejections: a request between
# them that the limiter let through just before it filled up.
STREAK_SLACK = 0

# The streak that is congestion for ALERT_ANSWERS answers after a verdict.
# Only a full-strength verdict starts the alert, so a rare false alarm
# cannot keep itself going; three in a row, as two rejected sends in a row
# happen by chance every twentieth push-back when 5 % of rows are pushed
# back, which would cut the limit again and again after one false alarm.
ALERT_STREAK = 3
ALERT_ANSWERS = 1024


class RecentAnswers:
    """The last ``window`` answers (good or pushed back) and the current
    streak of instant rejections; see the module docstring for the verdict."""

    def __init__(
        self, *, window: int = WINDOW, share: float = CONGESTED_SHARE, streak: int = STREAK
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        if streak < 2:
            raise ValueError(f"streak must be >= 2, got {streak!r}")
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self._verdicts: collections.deque[bool] = collections.deque(maxlen=window)
        self._threshold = max(2, math.ceil(share * window))
        self._pushbacks = 0
        self._streak_needed = streak
        self._streak = 0
        self._streak_sent = -math.inf  # latest rank of a rejection in the streak
        self._streak_first = math.inf  # earliest rank of a rejection in the streak
        self._sends = 0
        self._alert_left = 0
        self.good_seen = 0  # good answers since the start

    @property
    def sends(self) -> int:
        """Requests sent so far."""
        return self._sends

    def sent(self) -> int:
        """Count a request going out; its rank among the sends (1, 2, ...)."""
        self._sends += 1
        return self._sends

    def good(self, sent_at: float = math.inf) -> None:
        """Count a good answer to the request of rank ``sent_at`` (``sent``;
        unknown: sent last); it breaks the streak if sent after the streak's
        rejections."""
        self._push(False)
        if sent_at >= self._streak_sent:
            self._end_streak()
        self.good_seen += 1

    def pushed_back(self, instant_sent_at: float | None = None) -> bool:
        """Count a push-back; True when the recent answers show congestion.

        ``instant_sent_at``: for an instant rejection, its request's rank
        (``sent``); None for a push-back that took its time.
        """
        self._push(True)
        if instant_sent_at is not None:
            self._extend_streak(instant_sent_at)
        if self._pushbacks >= self._threshold or self._streak >= self._streak_needed:
            self._alert_left = ALERT_ANSWERS
            return True
        return self._alert_left > 0 and self._streak >= ALERT_STREAK

    def _extend_streak(self, rank: float) -> None:
        """Add an instant rejection to the streak, or start a new streak with
        it when the sends it would span are not nearly all rejections."""
        first = min(self._streak_first, rank)
        last = max(self._streak_sent, rank)
        if last - first + 1 > self._streak + 1 + STREAK_SLACK:
            self._end_streak()
            first = last = rank
        self._streak += 1
        self._streak_first, self._streak_sent = first, last

    def _end_streak(self) -> None:
        self._streak = 0
        self._streak_sent, self._streak_first = -math.inf, math.inf

    def _push(self, pushback: bool) -> None:
        if self._alert_left:
            self._alert_left -= 1
        verdicts = self._verdicts
        if len(verdicts) == verdicts.maxlen and verdicts[0]:
            self._pushbacks -= 1  # the oldest verdict falls out of the window
        verdicts.append(pushback)
        self._pushbacks += pushback
