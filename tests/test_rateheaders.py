"""Tests of batchrun.rateheaders: Retry-After, retry-after-ms and x-ratelimit-reset-*."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from multidict import CIMultiDict

from batchrun.rateheaders import parse_duration, parse_retry_after, pause_hint

NOW = datetime(2015, 10, 21, 7, 27, 30, tzinfo=UTC)

# --- parse_retry_after -----------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "30"}, 30.0),
        ({"retry-after": "7"}, 7.0),
        ({"Retry-After": " 12 "}, 12.0),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": "0.25"}, 0.25),
        ({"Retry-After": "-5"}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "20.5"}, 0.0205),
        ({"retry-after-ms": "-100"}, 0.0),
        ({"retry-after-ms": "1500", "Retry-After": "30"}, 1.5),
        ({"retry-after-ms": "soon", "Retry-After": "7"}, 7.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "   "}, None),
        ({"Retry-After": "Mon, 31 Feb 2020 00:00:00 GMT"}, None),
        ({"retry-after-ms": "soon"}, None),
        ({}, None),
        ({"Content-Type": "application/json"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    result = parse_retry_after(headers, now=NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Wed, 21 Oct 2015 07:28:00 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:28:00 +0000", 30.0),
        ("Wed, 21 Oct 2015 07:28:00", 30.0),  # no zone: taken as UTC
        ("Wed, 21 Oct 2015 09:28:00 +0200", 30.0),
        ("Wed, 21 Oct 2015 08:27:30 GMT", 3600.0),
        ("Wed, 21 Oct 2015 07:27:30 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # in the past
        ("Tue, 20 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_parse_retry_after_http_date(value: str, expected: float) -> None:
    assert parse_retry_after({"Retry-After": value}, now=NOW) == pytest.approx(expected)


def test_parse_retry_after_http_date_defaults_to_current_time() -> None:
    future = datetime.now(UTC) + timedelta(hours=1)
    value = future.strftime("%a, %d %b %Y %H:%M:%S GMT")
    result = parse_retry_after({"Retry-After": value})
    assert result is not None
    assert 3500 < result <= 3600


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("RETRY-AFTER", "9")], 9.0),
        ([("Retry-After", "9")], 9.0),
        ([("retry-after", "9")], 9.0),
        ([("Retry-After-Ms", "250")], 0.25),
        ([("RETRY-AFTER-MS", "250"), ("retry-AFTER", "60")], 0.25),
        ([("rEtRy-AfTeR", "Wed, 21 Oct 2015 07:28:00 GMT")], 30.0),
        ([("X-Other", "1")], None),
    ],
)
def test_parse_retry_after_case_insensitive(
    pairs: list[tuple[str, str]], expected: float | None
) -> None:
    headers: CIMultiDict[str] = CIMultiDict(pairs)
    result = parse_retry_after(headers, now=NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


# --- parse_duration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("2h3m4.5s", 7384.5),
        ("0.5", 0.5),
        ("0", 0.0),
        ("17", 17.0),
        ("  3s ", 3.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("250us", 0.00025),
        ("100ns", 1e-7),
        (".5s", 0.5),
        ("1m30s", 90.0),
        ("", None),
        ("s", None),
        ("soon", None),
        ("1x", None),
        ("-1s", None),
        ("-0.5", None),
        ("nan", None),
        ("inf", None),
        ("1s 2s", None),
        ("5 s", None),
    ],
)
def test_parse_duration(text: str, expected: float | None) -> None:
    result = parse_duration(text)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


# --- pause_hint -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "expected"),
    [
        ({}, 429, None),
        ({"Content-Type": "application/json"}, 429, None),
        ({"Retry-After": "30"}, 429, 30.0),
        ({"Retry-After": "30"}, 503, 30.0),
        ({"retry-after": "7"}, 200, 7.0),
        ({"RETRY-AFTER": "7"}, 429, 7.0),
        ({"retry-after-ms": "1500"}, 429, 1.5),
        ({"retry-after-ms": "1500", "Retry-After": "30"}, 429, 30.0),  # the longer
        ({"retry-after-ms": "45000", "Retry-After": "30"}, 429, 45.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 429, 30.0),
        ({"Retry-After": "soon"}, 429, None),
        ({"Retry-After": "soon", "retry-after-ms": "250"}, 429, 0.25),
        ({"x-ratelimit-reset-requests": "6m0s"}, 429, 360.0),
        ({"x-ratelimit-reset-requests": "6m0s"}, 200, None),
        ({"x-ratelimit-reset-tokens": "20ms"}, 429, 0.02),
        ({"x-ratelimit-reset-tokens": "20ms"}, 503, None),
        ({"X-RateLimit-Reset-Tokens": "1.5s"}, 429, 1.5),
        (
            {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "2m3s"},
            429,
            123.0,
        ),
        ({"x-ratelimit-reset-tokens": "garbage", "Retry-After": "2"}, 429, 2.0),
        ({"x-ratelimit-reset-tokens": "garbage"}, 429, None),
        ({"Retry-After": "1", "x-ratelimit-reset-tokens": "10s"}, 429, 10.0),
        ({"Retry-After": "1", "x-ratelimit-reset-tokens": "10s"}, 200, 1.0),
        ({"Retry-After": "0"}, 429, 0.0),
    ],
)
def test_pause_hint(headers: dict[str, str], status: int, expected: float | None) -> None:
    result = pause_hint(headers, status=status, now=NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_pause_hint_reads_case_insensitive_multidicts() -> None:
    headers = CIMultiDict({"Retry-After": "3", "X-Ratelimit-Reset-Requests": "4s"})
    assert pause_hint(headers, status=429) == pytest.approx(4.0)
