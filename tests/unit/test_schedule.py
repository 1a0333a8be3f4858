from __future__ import annotations

import random

import pytest

from callbridge.config import PollerSettings
from callbridge.poll.lifecycle import auth_backoff_s, interval_s, jittered, lifecycle

P = PollerSettings(
    interval_seconds=5, quiet_period_seconds=600, linger_interval_seconds=300, linger_seconds=3600
)
NOW = 10_000_000


@pytest.mark.parametrize(
    ("completed", "quiet_s", "not_found", "expected"),
    [
        (False, 10_000, False, "active"),
        (True, 10, False, "active"),
        (True, 599, False, "active"),
        (True, 601, False, "lingering"),
        (True, 600 + 3599, False, "lingering"),
        (True, 600 + 3601, False, "retired"),
        (False, 0, True, "not_found"),
    ],
)
def test_lifecycle(completed: bool, quiet_s: int, not_found: bool, expected: str) -> None:
    state = lifecycle(
        completed=completed,
        last_change_ms=NOW - quiet_s * 1000,
        not_found=not_found,
        now_ms=NOW,
        settings=P,
    )
    assert state == expected


def test_intervals() -> None:
    assert interval_s("active", P) == 5
    assert interval_s("lingering", P) == 300
    assert interval_s("not_found", P) == P.not_found_recheck_seconds
    assert interval_s("retired", P) is None


def test_jitter_and_auth_backoff() -> None:
    rng = random.Random(1)
    values = [jittered(10, 0.1, rng) for _ in range(100)]
    assert min(values) >= 9
    assert max(values) <= 11
    assert [auth_backoff_s(n, P) for n in (1, 2, 3)] == [5, 10, 20]
    assert auth_backoff_s(50, P) == P.auth_backoff_max_seconds
