"""What a committed group of a poll cycle adds to the metrics (and the odd items and
unreadable snapshot entries it logs)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from callbridge.metrics import Metrics, event_label, status_label
from callbridge.poll.diff import DiffResult
from callbridge.store.callstate import CallStates

log = logging.getLogger(__name__)


def record_diff(m: Metrics, batch_id: str, result: DiffResult) -> None:
    m.set_calls(batch_id, result.counts)
    # Counted per label first: a flood of 20,000 changes is a handful of series.
    for (frm, to), n in Counter(result.transitions).items():
        m.transitions.labels(status_label(frm), status_label(to)).inc(n)
    for etype, n in Counter(ev.type for ev in result.events).items():
        m.events.labels(event_label(etype)).inc(n)
    _count(m, batch_id, result.anomalies.items())


def count_odd_items(m: Metrics, batch_id: str, duplicates: int, invalid: int) -> None:
    _count(m, batch_id, (("duplicate_item", duplicates), ("invalid_item", invalid)))


def note_unreadable(batch_id: str, states: CallStates) -> None:
    """Log the snapshot entries a diff could not decode (then seen afresh), once."""
    if states.unreadable:
        log.warning(
            "batch %s: %d unreadable snapshot entries; those calls are seen afresh",
            batch_id,
            states.unreadable,
            extra={"action": "snapshot_unreadable", "batch_id": batch_id},
        )
        states.unreadable = 0


def _count(m: Metrics, batch_id: str, kinds: Iterable[tuple[str, int]]) -> None:
    for kind, n in kinds:
        if not n:
            continue
        m.upstream_anomalies.labels(kind).inc(n)
        log.warning(
            "batch %s: %d odd item(s) in the scan: %s",
            batch_id,
            n,
            kind,
            extra={"action": "upstream_anomaly", "batch_id": batch_id},
        )
