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
