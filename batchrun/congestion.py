"""Telling congestion from one-off failures: a pure judge of recent answers.

A provider that fails a few rows at random (a stray 503, one 429 among
thousands of good answers) is not asking the client to slow down; a rate
limiter that has been overrun rejects many requests at once. So a push-back
(429, 503, a timeout) is congestion only when it is one of many among the
last answers: at least ``CONGESTED_SHARE`` of the last ``WINDOW`` answers,
or the last of ``STREAK`` push-backs in a row (an overrun limiter rejects
everything until its window turns).
A lone push-back is that row's own business: it waits for its own retry.
A 500 or a reset is never a push-back at all (see ``throttle``).
"""

from __future__ import annotations

import collections
import math

__all__ = ["CONGESTED_SHARE", "STREAK", "WINDOW", "RecentAnswers"]

# Answers judged together. One round trip's worth at the default limits.
WINDOW = 64

# Share of the window that must be push-backs to call it congestion: 13 of
# 64. With 5 % of rows pushed back at random, 13 in 64 happens about once in
# ten million windows; an overrun limiter rejects far more than a fifth.
CONGESTED_SHARE = 0.2

# Push-backs in a row, with no good answer between, that are congestion
# whatever the window holds. At 5 % of random push-backs, four in a row come
# about once in 160,000 answers.
STREAK = 4


class RecentAnswers:
    """The verdicts of the last ``window`` answers: good or pushed back.

    ``pushed_back()`` says whether the push-backs among them now reach
    ``share`` of a full window, however few answers have come so far (a
    burst at the start of a run counts as much as one later on), or whether
    the last ``streak`` answers were all push-backs.
    """

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
        self.good_seen = 0  # good answers since the start

    def good(self) -> None:
        """Count a good answer."""
        self._push(False)
        self._streak = 0
        self.good_seen += 1

    def pushed_back(self) -> bool:
        """Count a push-back; True when the recent answers show congestion."""
        self._push(True)
        self._streak += 1
        return self._pushbacks >= self._threshold or self._streak >= self._streak_needed

    def _push(self, pushback: bool) -> None:
        verdicts = self._verdicts
        if len(verdicts) == verdicts.maxlen and verdicts[0]:
            self._pushbacks -= 1  # the oldest verdict falls out of the window
        verdicts.append(pushback)
        self._pushbacks += pushback
