from __future__ import annotations

from callbridge.metrics import Metrics, event_label


def test_calls_gauge_reads_zero_when_a_status_empties_and_sums_unknowns() -> None:
    m = Metrics()
    m.set_calls("b1", {"ringing": 5, "pending": 1})
    m.set_calls("b1", {"completed": 4, "voicemail": 1, "transferred": 1})
    value = m.registry.get_sample_value
    assert value("callbridge_calls", {"batch": "b1", "status": "ringing"}) == 0
    assert value("callbridge_calls", {"batch": "b1", "status": "completed"}) == 4
    assert value("callbridge_calls", {"batch": "b1", "status": "other"}) == 2
    m.forget_batch("b1")
    assert value("callbridge_calls", {"batch": "b1", "status": "completed"}) is None


def test_event_labels_are_bounded() -> None:
    assert event_label("call.completed") == "call.completed"
    assert event_label("call.updated") == "call.updated"
    assert event_label("batch.completed") == "batch.completed"
    assert event_label("call.teleported") == "other"


def test_subscription_series_exist_at_zero_from_the_start_and_go_with_it() -> None:
    """A counter born at 1 shows no increase(): alerts need the 0 sample first."""
    m = Metrics()
    m.init_subscription("crm")
    value = m.registry.get_sample_value
    assert value("callbridge_dead_letters_total", {"subscription": "crm"}) == 0
    for outcome, status in (("success", "2xx"), ("retry", "none"), ("dead", "5xx")):
        labels = {"subscription": "crm", "outcome": outcome, "status_class": status}
        assert value("callbridge_delivery_attempts_total", labels) == 0
    for state in ("ready", "scheduled", "inflight", "dead", "waiting"):
        assert value("callbridge_queue_depth", {"subscription": "crm", "state": state}) == 0
    assert value("callbridge_subscription_disabled", {"subscription": "crm"}) == 0
    assert value("callbridge_subscription_breaker_open", {"subscription": "crm"}) == 0
    lag = {"subscription": "crm", "le": "+Inf"}
    assert value("callbridge_delivery_lag_seconds_bucket", lag) == 0

    m.forget_subscription("crm")
    assert value("callbridge_dead_letters_total", {"subscription": "crm"}) is None
    assert value("callbridge_delivery_lag_seconds_bucket", lag) is None
    assert not [s for f in m.registry.collect() for s in f.samples if s.labels.get("subscription")]


def test_batch_poll_outcomes_exist_at_zero_until_the_batch_is_forgotten() -> None:
    m = Metrics()
    m.init_batch("b1")
    value = m.registry.get_sample_value
    for outcome in ("committed", "unchanged", "failed", "auth_failed", "not_owner"):
        assert value("callbridge_poll_cycles_total", {"batch": "b1", "outcome": outcome}) == 0
    m.forget_batch("b1")
    assert value("callbridge_poll_cycles_total", {"batch": "b1", "outcome": "failed"}) is None


def test_fixed_series_cover_every_event_label() -> None:
    m = Metrics()
    m.init_fixed_series()
    value = m.registry.get_sample_value
    for event_type in ("call.completed", "call.updated", "batch.completed", "other"):
        assert value("callbridge_events_total", {"type": event_type}) == 0
    rejected = {"outcome": "auth_error", "code": "401"}
    assert value("callbridge_upstream_requests_total", rejected) == 0
