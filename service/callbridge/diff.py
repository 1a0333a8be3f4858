"""Pure change detection: what we knew of each call + a fresh scan -> events.

No I/O here. The poller hands in the previous state of the calls that may have
changed and the scanned items; this module decides which events happened and what
the new state is. Event ids are a function of (batch, call, sequence, type), so a
diff recomputed after a crash yields the same ids and receivers can deduplicate.

Per-call state is compact (it is stored for every tracked call): the status, a
sequence number and a fingerprint made of one CRC-32 per field. Field digests let
us name the changed fields of a ``call.updated`` without storing the item itself.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from callbridge.models import (
    ANSWERED,
    IN_PROGRESS,
    PENDING,
    QUEUED,
    RINGING,
    TERMINAL_STATUSES,
    Event,
    skipped_statuses,
)

# Fields with a fixed slot in the fingerprint; others are kept by name.
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "external_id",
    "phone_number",
    "name",
    "duration_seconds",
    "started_at",
    "ended_at",
    "metadata",
)
_NOT_FINGERPRINTED = frozenset({"call_id", "status"})
_ABSENT = 0  # digest of a missing or null field


def field_digest(value: Any) -> int:
    """CRC-32 of the canonical JSON of a field value; 0 means absent/null."""
    if value is None:
        return _ABSENT
    digest = zlib.crc32(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
    # Keep 0 reserved for "absent".
    return digest or 1


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Digests of every field but call_id and status."""

    known: tuple[int, ...]
    extra: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, item: Mapping[str, Any]) -> Fingerprint:
        known = tuple(field_digest(item.get(name)) for name in FINGERPRINT_FIELDS)
        extra = tuple(
            sorted(
                (k, field_digest(v))
                for k, v in item.items()
                if k not in _NOT_FINGERPRINTED and k not in _KNOWN_SET
            )
        )
        return cls(known, extra)

    def as_dict(self) -> dict[str, int]:
        out = dict(zip(FINGERPRINT_FIELDS, self.known, strict=True))
        out.update(self.extra)
        return out

    def encode(self) -> str:
        """Compact text form: base64 of the fixed slots, then ``;name=digest`` extras."""
        head = base64.b64encode(struct.pack(f">{len(self.known)}I", *self.known)).decode()
        tail = "".join(f";{k}={d:x}" for k, d in self.extra)
        return head.rstrip("=") + tail

    @classmethod
    def decode(cls, text: str) -> Fingerprint:
        head, *extras = text.split(";")
        raw = base64.b64decode(head + "=" * (-len(head) % 4))
        if len(raw) != 4 * len(FINGERPRINT_FIELDS):
            raise ValueError("fingerprint has the wrong number of fields")
        known = struct.unpack(f">{len(FINGERPRINT_FIELDS)}I", raw)
        extra = []
        for part in extras:
            name, _, digest = part.rpartition("=")
            extra.append((name, int(digest, 16)))
        return cls(tuple(known), tuple(extra))


_KNOWN_SET = frozenset(FINGERPRINT_FIELDS)

# Order of the statuses a call passes before it ends. A call only moves back in
# this order through a terminal status (a redial), never directly.
_PROGRESS = {s: i for i, s in enumerate((PENDING, QUEUED, RINGING, ANSWERED, IN_PROGRESS))}


def _regresses(previous: str, new: str) -> bool:
    a, b = _PROGRESS.get(previous), _PROGRESS.get(new)
    return a is not None and b is not None and b < a


@dataclass(frozen=True, slots=True)
class CallState:
    """What the bridge last observed of one call."""

    status: str
    seq: int
    fingerprint: Fingerprint

    def encode(self) -> str:
        # The status goes last: an unknown status string may contain anything.
        return f"{self.seq}|{self.fingerprint.encode()}|{self.status}"

    @classmethod
    def decode(cls, text: str | bytes) -> CallState:
        if isinstance(text, bytes):
            text = text.decode()
        seq, fp, status = text.split("|", 2)
        return cls(status=status, seq=int(seq), fingerprint=Fingerprint.decode(fp))


def event_id(batch_id: str, subject: str, seq: int, event_type: str) -> str:
    """Deterministic event id: the same observation always gets the same id."""
    h = hashlib.blake2b(
        f"{batch_id}\x1f{subject}\x1f{seq}\x1f{event_type}".encode(), digest_size=12
    )
    return "evt_" + h.hexdigest()


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One observation of a call, kept for operators (bounded per call)."""

    call_id: str
    at_ms: int
    status: str
    seq: int
    event_type: str | None  # None when recorded silently (first sight as pending)

    def encode(self) -> bytes:
        return orjson.dumps([self.at_ms, self.status, self.seq, self.event_type])


@dataclass(frozen=True, slots=True)
class BatchView:
    """The batch-level facts a diff needs and updates."""

    counts: Mapping[str, int]
    completed: bool = False
    completions: int = 0


@dataclass(slots=True)
class DiffResult:
    states: dict[str, CallState] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)
    transitions: list[tuple[str | None, str]] = field(default_factory=list)
    anomalies: Counter[str] = field(default_factory=Counter)
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
    prev_d, new_d = prev.as_dict(), new.as_dict()
    changed: list[str] = []
    merged: dict[str, int] = {}
    for name in prev_d.keys() | new_d.keys():
        old, cur = prev_d.get(name, _ABSENT), new_d.get(name, _ABSENT)
        if cur == _ABSENT and old != _ABSENT:
            anomalies["field_regressed"] += 1
            merged[name] = old
        else:
            merged[name] = cur
            if cur != old:
                changed.append(name)
    known = tuple(merged.pop(n, _ABSENT) for n in FINGERPRINT_FIELDS)
    extra = tuple(sorted((k, d) for k, d in merged.items() if d != _ABSENT))
    return Fingerprint(known, extra), sorted(changed)


def diff(
    batch_id: str,
    previous: Mapping[str, CallState],
    items: Iterable[Mapping[str, Any]],
    batch: BatchView,
    *,
    now_ms: int,
    timestamp: str,
    backfill: bool = True,
) -> DiffResult:
    """Events for the scanned `items` given what was known before.

    `items` may be every call of the scan or only those that may have changed
    (the poller skips items identical to the last scan); `previous` must hold the
    state of every item passed in that was seen before. Calls absent from `items`
    are left as they are.
    """
    out = DiffResult()
    counts = Counter(batch.counts)
    for item in items:
        call_id: str = item["call_id"]
        # Statuses are documented lowercase; " Completed" is still completed.
        status: str = item["status"].strip().lower()
        prev = previous.get(call_id)
        new_fp = Fingerprint.of(item)
        if prev is None:
            counts[status] += 1
            if status == PENDING or not backfill:
                out.states[call_id] = CallState(status, 0, new_fp)
                out.timeline.append(TimelineEntry(call_id, now_ms, status, 0, None))
                continue
            seq = 1
            etype = f"call.{status}"
            out.states[call_id] = CallState(status, seq, new_fp)
            out.events.append(
                _call_event(batch_id, item, etype, seq, None, True, [], None, timestamp)
            )
            out.timeline.append(TimelineEntry(call_id, now_ms, status, seq, etype))
            out.transitions.append((None, status))
            continue

        if _regresses(prev.status, status):
            # e.g. answered -> ringing: a stale copy (a cache behind the API, an item
            # served twice while pages shift). Reporting it would invent two events.
            out.anomalies["status_regressed"] += 1
            continue
        merged_fp, changed_fields = _merge_fingerprint(prev.fingerprint, new_fp, out.anomalies)
        if status != prev.status:
            counts[prev.status] -= 1
            counts[status] += 1
            seq = prev.seq + 1
            etype = f"call.{status}"
            skipped = skipped_statuses(prev.status, status)
            out.states[call_id] = CallState(status, seq, merged_fp)
            out.events.append(
                _call_event(
                    batch_id, item, etype, seq, prev.status, False, skipped, None, timestamp
                )
            )
            out.timeline.append(TimelineEntry(call_id, now_ms, status, seq, etype))
            out.transitions.append((prev.status, status))
        elif changed_fields:
            seq = prev.seq + 1
            etype = "call.updated"
            out.states[call_id] = CallState(status, seq, merged_fp)
            out.events.append(
                _call_event(
                    batch_id, item, etype, seq, status, False, [], changed_fields, timestamp
                )
            )
            out.timeline.append(TimelineEntry(call_id, now_ms, status, seq, etype))

    out.counts = {s: n for s, n in counts.items() if n > 0}
    out.completed, out.completions = batch.completed, batch.completions
    total = sum(out.counts.values())
    all_terminal = total > 0 and all(s in TERMINAL_STATUSES for s in out.counts)
    if all_terminal and not batch.completed:
        out.completed = True
        out.completions = batch.completions + 1
        out.events.append(
            Event.build(
                event_id=event_id(batch_id, "", out.completions, "batch.completed"),
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
) -> Event:
    call_id: str = item["call_id"]
    data: dict[str, Any] = {
        "batch_id": batch_id,
        "call_id": call_id,
        "external_id": item.get("external_id"),
        "status": item["status"].strip().lower(),
        "previous_status": previous_status,
        "sequence": seq,
        "initial": initial,
        "skipped_statuses": skipped,
    }
    if changed_fields is not None:
        data["changed_fields"] = changed_fields
    data["call"] = item
    return Event.build(
        event_id=event_id(batch_id, call_id, seq, etype),
        type=etype,
        timestamp=timestamp,
        batch_id=batch_id,
        call_id=call_id,
        data=data,
    )


def select_candidates(
    pages: Iterable[Iterable[dict[str, Any]]], signatures: Mapping[str, int]
) -> tuple[list[dict[str, Any]], dict[str, int], int]:
    """Items that differ from the last committed scan, their new signatures, duplicates.

    Items are merged by call_id; when a call appears twice (pages shifting while
    we read), the copy from the later page wins, as it was served later.
    """
    merged: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for items in pages:
        for item in items:
            call_id = item["call_id"]
            if call_id in merged:
                duplicates += 1
            merged[call_id] = item
    candidates: list[dict[str, Any]] = []
    new_sigs: dict[str, int] = {}
    dumps, crc = orjson.dumps, zlib.crc32
    for call_id, item in merged.items():
        sig = crc(dumps(item))
        if signatures.get(call_id) != sig:
            candidates.append(item)
            new_sigs[call_id] = sig
    return candidates, new_sigs, duplicates
