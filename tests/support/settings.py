"""Test secrets and a settings builder pointing the bridge at local servers."""

from __future__ import annotations

from typing import Any

from callbridge.config import Settings, parse_settings

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_dGhpcyBpcyB0aGUgb2xkIHNlY3JldCBrZXkhIQ=="
API_KEY = "sk_test_key"


def make_settings(
    base_url: str,
    redis_url: str | None,
    *,
    subscriptions: list[dict[str, Any]] | None = None,
    batches: list[str] | None = None,
    **sections: Any,
) -> Settings:
    raw: dict[str, Any] = {
        "upstream": {
            "base_url": base_url,
            "api_key": API_KEY,
            "max_requests_per_second": 1000,
            "timeout_seconds": 5,
            "max_attempts": 3,
            "backoff_max_seconds": 0.05,
        },
        "redis": {"url": redis_url},
        "poller": {"interval_seconds": 1, "lease_ttl_seconds": 10},
        "batches": [{"id": b} for b in batches or []],
        "subscriptions": subscriptions or [],
    }
    for name, value in sections.items():
        raw.setdefault(name, {}).update(value)
    return parse_settings(raw, env={})
