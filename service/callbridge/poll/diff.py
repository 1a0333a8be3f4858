"""Pure change detection: what we knew of each call + a fresh scan -> events.

No I/O here. The poller hands in the previous state of the calls that may have
changed and the scanned items; this module decides which events happened and what
the new state is. An event's id is a digest of its body (`models.event_id`): one id
never names two bodies, even when a failover made the bridge see a change again.
What is stored per call is in `callstate`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from callbridge.models import (
    KNOWN_STATUSES,
    PENDING,
    REMOVED,
    TERMINAL_STATUSES,
    Event,
    TimelineEntry,
    is_backward,
    is_terminal,
    normalise_status,
    skipped_statuses,
)
from callbridge.store.callstate import ABSENT, FINGERPRINT_FIELDS, CallState, Fingerprint


# Not frozen: a first scan builds one per call, and a frozen dataclass costs three
# times as much to build (treated as a value all the same: never changed once built).
@dataclass(frozen=True, slots=True)
class BatchView:
    """The batch-level facts a diff needs and updates."""

    counts: Mapping[str, int]
    completed: bool = False
    completions: int = 0
    # Calls in statuses the API does not document count as finished, unless this
    # diff changes something in a batch not completed yet (`batch_end`).
    unknown_final: bool = False


@dataclass(frozen=True, slots=True)
class ScanFacts:
    """What the scan as a whole showed; batch-level facts need a complete scan.

    A partial scan (a page failed) still commits what its pages showed of each
    call, but it cannot tell that every call of the batch has ended: a call on a
    page that did not arrive may still be ringing.
    """

    complete: bool = True
    # The batch's size as the platform reported it (``total``); None when unknown.
    total: int | None = None
    # Calls an earlier look saw going back to a non-terminal status, not confirmed
    # yet and not in this diff's items: each may be dialling again (a redial of a
    # finished call), so the batch may not complete before its second look.
    unsettled: int = 0


@dataclass(slots=True)
class DiffResult:
    states: dict[str, CallState] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)
    transitions: list[tuple[str | None, str]] = field(default_factory=list)
    anomalies: Counter[str] = field(default_factory=Counter)
    # Calls that moved backwards without a second observation confirming it:
    # nothing is reported for them until one does (see `is_backward`).
    unconfirmed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    completed: bool = False
    completions: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.states or self.events)


def _merge_fingerprint(
    prev: Fingerprint, new: Fingerprint, anomalies: Counter[str]
) -> tuple[Fingerprint, list[str]]:
    """New fingerprint and changed field names.

    A field that goes back to null or disappears is an upstream glitch more often
    than a real edit: it is counted, not reported, and its last value is kept so
    it does not come back as a change either.
    """
    if prev == new:
        return prev, []
    if not prev.extra and not new.extra:
        # The documented fields only (the common case): slot by slot.
        known: list[int] = []
        changed: list[str] = []
        for name, old, cur in zip(FINGERPRINT_FIELDS, prev.known, new.known, strict=True):
            if cur == ABSENT and old != ABSENT:
                anomalies["field_regressed"] += 1
                known.append(old)
            else:
                known.append(cur)
                if cur != old:
                    changed.append(name)
        return Fingerprint(tuple(known)), sorted(changed)
    prev_d, new_d = prev.as_dict(), new.as_dict()
    changed = []
    merged: dict[str, int] = {}
    for name in prev_d.keys() | new_d.keys():
        old, cur = prev_d.get(name, ABSENT), new_d.get(name, ABSENT)
        if cur == ABSENT and old != ABSENT:
            anomalies["field_regressed"] += 1
            merged[name] = old
        else:
            merged[name] = cur
            if cur != old:
                changed.append(name)
    slots = tuple(merged.pop(n, ABSENT) for n in FINGERPRINT_FIELDS)
    extra = tuple(sorted((k, d) for k, d in merged.items() if d != ABSENT))
    return Fingerprint(slots, extra), sorted(changed)


def diff(
    batch_id: str,
    previous: Mapping[str, CallState],
    items: Iterable[Mapping[str, Any]],
    batch: BatchView,
    *,
    now_ms: int,
    timestamp: str,
    backfill: bool = True,
    scan: ScanFacts = ScanFacts(),
    confirmed: Collection[str] = (),
    raws: Mapping[str, bytes] | None = None,
    replays: Mapping[str, Mapping[str, Any]] | None = None,
    removed: Iterable[str] = (),
) -> DiffResult:
    """Events for the scanned `items` given what was known before.

    `items` may be every call of the scan or only those that may have changed
    (the poller skips items identical to the last scan); `previous` must hold the
    state of every item passed in that was seen before. Calls absent from `items`
    are left as they are.

    A call that moved backwards (`is_backward`) is reported only when its call_id
    is in `confirmed` (a second observation agreed); otherwise it is counted,
    listed in `unconfirmed` and left as it was. A confirmed move out of a terminal
    status is a redial; one between two non-terminal statuses is a redial whose
    terminal status the platform never showed us (``missed_terminal: true``).

    `replays` holds, for confirmed calls, what the previous scan showed when it saw
    the call go backwards, if the call has moved on since (``no_answer`` unseen,
    then ``queued``, then ``ringing``): it is reported first, as it was served.

    `raws` holds items' exact bytes as served: event bodies embed them as they are
    instead of serialising the decoded item again.

    `removed`: calls the platform stopped listing (their state in `previous`), each
    reported once as ``call.updated`` with ``removed: true`` and stored as `REMOVED`.
    """
    out = DiffResult()
    counts = Counter(batch.counts)
    raw_of = (raws or {}).get
    # Each call once, but for replays: a call observed twice moves on from the first.
    twice = bool(replays) and bool(confirmed)
    states, timeline = out.states, out.timeline
    for item, raw in (
        _observations(items, confirmed, replays or {}, raw_of)
        if twice
        else ((item, raw_of(item["call_id"])) for item in items)
    ):
        call_id: str = item["call_id"]
        status = normalise_status(item["status"])
        prev = (twice and states.get(call_id)) or previous.get(call_id)
        new_fp = Fingerprint.of(item)
        if prev is None:
            counts[status] += 1
            if status == PENDING or not backfill:
                # A first scan's common case (every call of a new batch): kept lean.
                states[call_id] = CallState(status, 0, new_fp)
                timeline.append(TimelineEntry(call_id, now_ms, status, 0, None))
                continue
            seq = 1
            etype = f"call.{status}"
            out.states[call_id] = CallState(status, seq, new_fp)
            out.events.append(
                _call_event(batch_id, item, etype, seq, None, True, [], None, timestamp, raw=raw)
            )
            out.timeline.append(_entry(out.events[-1], now_ms, status, seq))
            out.transitions.append((None, status))
            continue

        backward = is_backward(prev.status, status)
        if backward and call_id not in confirmed:
            # e.g. answered -> ringing: a stale copy (a cache behind the API, an item
            # served twice while pages shift) or a redial; a second look tells.
            out.anomalies["status_regressed"] += 1
            out.unconfirmed[call_id] = status
            continue
        merged_fp, changed_fields = _merge_fingerprint(prev.fingerprint, new_fp, out.anomalies)
        if status != prev.status:
            counts[prev.status] -= 1
            counts[status] += 1
            seq = prev.seq + 1
            etype = f"call.{status}"
            missed_terminal = backward and not is_terminal(prev.status)
            # A redial starts its path again from pending.
            skipped = skipped_statuses(PENDING if missed_terminal else prev.status, status)
            out.states[call_id] = CallState(status, seq, merged_fp)
            out.events.append(
                _call_event(
                    batch_id,
                    item,
                    etype,
                    seq,
                    prev.status,
                    False,
                    skipped,
                    None,
                    timestamp,
                    missed_terminal=missed_terminal,
                    raw=raw,
                )
            )
            out.timeline.append(_entry(out.events[-1], now_ms, status, seq))
            out.transitions.append((prev.status, status))
        elif changed_fields:
            seq = prev.seq + 1
            etype = "call.updated"
            out.states[call_id] = CallState(status, seq, merged_fp)
            out.events.append(
                _call_event(
                    batch_id,
                    item,
                    etype,
                    seq,
                    status,
                    False,
                    [],
                    changed_fields,
                    timestamp,
                    raw=raw,
                )
            )
            out.timeline.append(_entry(out.events[-1], now_ms, status, seq))

    for call_id in removed:
        prev = previous.get(call_id)
        if prev is None or prev.status == REMOVED:
            continue
        counts[prev.status] -= 1
        counts[REMOVED] += 1
        seq = prev.seq + 1
        states[call_id] = CallState(REMOVED, seq, prev.fingerprint)
        out.events.append(_removed_event(batch_id, call_id, prev.status, seq, timestamp))
        timeline.append(_entry(out.events[-1], now_ms, REMOVED, seq))

    out.counts = {s: n for s, n in counts.items() if n > 0}
    out.completed, out.completions = batch.completed, batch.completions
    total = sum(out.counts.values())
    unknown_final = batch.unknown_final and (batch.completed or not out.changed)
    all_terminal = total > 0 and all(
        s in TERMINAL_STATUSES or (unknown_final and s not in KNOWN_STATUSES) for s in out.counts
    )
    # Completion needs a scan that saw the whole batch: every page arrived and we
    # know of at least as many calls as the platform says it has. And no call seen
    # going back to a non-terminal status may await its second look: it counts as
    # finished until confirmed, but may be dialling again.
    whole = scan.complete and (scan.total is None or total >= scan.total)
    if scan.unsettled or any(not is_terminal(s) for s in out.unconfirmed.values()):
        whole = False
    if all_terminal and not batch.completed and whole:
        out.completed = True
        out.completions = batch.completions + 1
        out.events.append(
            # Its id digests its counts and time: a later completion after a failover
            # took this one from Redis is another event, never this one's copy.
            Event.build(
                seq=out.completions,
                type="batch.completed",
                timestamp=timestamp,
                batch_id=batch_id,
                call_id=None,
                data={
                    "batch_id": batch_id,
                    "total": total,
                    "counts": dict(sorted(out.counts.items())),
                },
            )
        )
    elif not all_terminal and batch.completed:
        # A call left a terminal status (a redial): the batch is open again.
        out.completed = False
    return out


def _entry(event: Event, now_ms: int, status: str, seq: int) -> TimelineEntry:
    """The timeline's record of a call's event, naming it (its id is not recomputable)."""
    assert event.call_id is not None
    return TimelineEntry(event.call_id, now_ms, status, seq, event.type, event.id)


def _observations(
    items: Iterable[Mapping[str, Any]],
    confirmed: Collection[str],
    replays: Mapping[str, Mapping[str, Any]],
    raw_of: Callable[[str], bytes | None],
) -> Iterator[tuple[Mapping[str, Any], bytes | None]]:
    for item in items:
        call_id = item["call_id"]
        replay = replays.get(call_id)
        if replay is not None and call_id in confirmed:
            yield replay, None
        yield item, raw_of(call_id)


def _removed_event(batch_id: str, call_id: str, status: str, seq: int, timestamp: str) -> Event:
    """The platform stopped listing the call (`batch_end`): reported once, with the
    status it last had; no item to embed."""
    return Event.build(
        seq=seq,
        type="call.updated",
        timestamp=timestamp,
        batch_id=batch_id,
        call_id=call_id,
        data={
            "batch_id": batch_id,
            "call_id": call_id,
            "external_id": None,
            "status": status,
            "previous_status": status,
            "sequence": seq,
            "initial": False,
            "skipped_statuses": [],
            "missed_terminal": False,
            "changed_fields": [],
            "removed": True,
            "call": None,
        },
    )


def _call_event(
    batch_id: str,
    item: Mapping[str, Any],
    etype: str,
    seq: int,
    previous_status: str | None,
    initial: bool,
    skipped: list[str],
    changed_fields: list[str] | None,
    timestamp: str,
    *,
    missed_terminal: bool = False,
    raw: bytes | None = None,
) -> Event:
    call_id: str = item["call_id"]
    data: dict[str, Any] = {
        "batch_id": batch_id,
        "call_id": call_id,
        "external_id": item.get("external_id"),
        "status": normalise_status(item["status"]),
        "previous_status": previous_status,
        "sequence": seq,
        "initial": initial,
        "skipped_statuses": skipped,
        "missed_terminal": missed_terminal,
    }
    if changed_fields is not None:
        data["changed_fields"] = changed_fields
    data["call"] = item if raw is None else orjson.Fragment(raw)
    return Event.build(
        seq=seq,
        type=etype,
        timestamp=timestamp,
        batch_id=batch_id,
        call_id=call_id,
        data=data,
    )
