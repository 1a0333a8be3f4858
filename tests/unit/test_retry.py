from __future__ import annotations

import random

import pytest

from callbridge.deliver.retry import AttemptResult, classify
from callbridge.models import parse_retry_after

SCHEDULE = [5, 300, 1800]


@pytest.mark.parametrize(
    ("result", "attempts", "outcome"),
    [
        (AttemptResult(200), 1, "success"),
        (AttemptResult(204), 4, "success"),
        (AttemptResult(410), 1, "disable"),
        (AttemptResult(500), 1, "retry"),
        (AttemptResult(429), 1, "retry"),
        (AttemptResult(301), 1, "retry"),
        (AttemptResult(400), 1, "retry"),
        (AttemptResult(None, error="timeout after 15s"), 2, "retry"),
        (AttemptResult(500), 3, "retry"),
        (AttemptResult(500), 4, "dead"),
        (AttemptResult(None, error="connect: refused"), 4, "dead"),
    ],
)
def test_classification(result: AttemptResult, attempts: int, outcome: str) -> None:
    assert classify(result, attempts, SCHEDULE, random.Random(1)).outcome == outcome


def test_delay_follows_schedule_with_jitter() -> None:
    rng = random.Random(7)
    delays = [classify(AttemptResult(503), 2, SCHEDULE, rng).delay_s for _ in range(200)]
    assert min(delays) >= 240
    assert max(delays) <= 360
    assert max(delays) - min(delays) > 60  # jitter really spreads


def test_retry_after_is_honoured_within_bounds() -> None:
    r = classify(AttemptResult(429, retry_after_s=120), 1, SCHEDULE, random.Random(1))
    assert r.delay_s >= 120
    huge = classify(AttemptResult(503, retry_after_s=10**9), 1, SCHEDULE, random.Random(1))
    assert huge.delay_s <= 6 * 3600


def test_redirect_reason_is_explicit() -> None:
    assert "redirect 302 not followed" in classify(AttemptResult(302), 1, SCHEDULE).reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, None), ("", None), ("7", 7.0), ("-1", None), ("soon", None), ("nan", None)],
)
def test_parse_retry_after(raw: str | None, expected: float | None) -> None:
    assert parse_retry_after(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wednesday, 21-Oct-15 07:28:30 GMT", 30.0),  # RFC 850, still to be accepted
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: at once
        ("Wed, 99 Oct 2015 07:28:30 GMT", None),
    ],
)
def test_parse_retry_after_http_date(raw: str, expected: float | None) -> None:
    """The HTTP-date form was read as absent (a 429 then paced for 1 s)."""
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(raw, now=now) == expected
