from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from callbridge.models import KNOWN_STATUSES, TERMINAL_STATUSES, event_id
from callbridge.poll.diff import BatchView, DiffResult, ScanFacts, diff
from callbridge.store.callstate import CallState, Fingerprint

NOW = 1_800_000_000_000
TS = "2027-01-15T08:00:00.000Z"


def item(call_id: str, status: str, **fields: Any) -> dict[str, Any]:
    base = {
        "call_id": call_id,
        "external_id": "101",
        "phone_number": "919876543210",
        "name": "John Doe",
        "status": status,
        "duration_seconds": None,
        "started_at": None,
        "ended_at": None,
        "metadata": {"Name": "John Doe"},
    }
    base.update(fields)
    return base


class Tracker:
    """Applies diffs like the poller does, keeping full state."""

    def __init__(self, backfill: bool = True) -> None:
        self.states: dict[str, CallState] = {}
        self.view = BatchView({})
        self.backfill = backfill
        self.events: list[dict[str, Any]] = []
        self.ids: list[str] = []
        # Backward moves seen last scan: a second scan showing them confirms them.
        self.suspects: dict[str, str] = {}

    def poll(self, items: list[dict[str, Any]], scan: ScanFacts | None = None) -> DiffResult:
        r = diff(
            "b1",
            self.states,
            items,
            self.view,
            now_ms=NOW,
            timestamp=TS,
            backfill=self.backfill,
            scan=scan or ScanFacts(),
            confirmed=set(self.suspects),
        )
        self.suspects = r.unconfirmed
        self.states.update(r.states)
        self.view = BatchView(r.counts, r.completed, r.completions)
        self.events += [orjson.loads(e.body) for e in r.events]
        self.ids += [e.id for e in r.events]
        return r


def types(r: DiffResult) -> list[str]:
    return [e.type for e in r.events]


def test_pending_first_sight_is_silent_then_transitions_emit() -> None:
    t = Tracker()
    assert types(t.poll([item("c1", "pending")])) == []
    r = t.poll([item("c1", "ringing")])
    assert types(r) == ["call.ringing"]
    data = orjson.loads(r.events[0].body)["data"]
    assert data["previous_status"] == "pending"
    assert data["skipped_statuses"] == ["queued"]
    assert data["sequence"] == 1
    assert data["call"]["status"] == "ringing"


def test_first_sight_non_pending_is_initial_unless_backfill_off() -> None:
    r = Tracker().poll([item("c1", "answered")])
    data = orjson.loads(r.events[0].body)["data"]
    assert (data["initial"], data["previous_status"]) == (True, None)
    assert types(Tracker(backfill=False).poll([item("c1", "answered")])) == []


def test_skipped_statuses_pending_to_completed() -> None:
    t = Tracker()
    t.poll([item("c1", "pending")])
    r = t.poll([item("c1", "completed")])
    data = orjson.loads(r.events[0].body)["data"]
    assert data["skipped_statuses"] == ["queued", "ringing", "answered", "in_progress"]


def test_field_change_same_status_is_call_updated() -> None:
    t = Tracker()
    t.poll([item("c1", "completed", ended_at=None)])
    r = t.poll([item("c1", "completed", ended_at="2026-11-28T10:00:05Z", duration_seconds=42)])
    assert types(r) == ["call.updated"]
    data = orjson.loads(r.events[0].body)["data"]
    assert data["changed_fields"] == ["duration_seconds", "ended_at"]


def test_null_regression_and_missing_fields_are_not_events() -> None:
    t = Tracker()
    t.poll([item("c1", "completed", ended_at="x")])
    r = t.poll([item("c1", "completed", ended_at=None)])
    assert types(r) == []
    assert r.anomalies["field_regressed"] == 1
    r = t.poll([{"call_id": "c1", "status": "completed"}])
    assert types(r) == []
    # And the value coming back is not a change either.
    assert types(t.poll([item("c1", "completed", ended_at="x")])) == []


def test_unknown_status_and_extra_fields() -> None:
    t = Tracker()
    t.poll([item("c1", "pending")])
    r = t.poll([item("c1", "voicemail", recording="r1")])
    assert types(r) == ["call.voicemail"]
    r = t.poll([item("c1", "voicemail", recording="r2")])
    assert orjson.loads(r.events[0].body)["data"]["changed_fields"] == ["recording"]


def test_one_off_stale_copy_is_ignored() -> None:
    t = Tracker()
    t.poll([item("c1", "answered")])
    r = t.poll([item("c1", "ringing")])
    assert types(r) == []
    assert r.anomalies["status_regressed"] == 1
    assert r.unconfirmed == {"c1": "ringing"}
    # The next scan shows the call where it was: the copy was stale, nothing happened.
    assert types(t.poll([item("c1", "answered")])) == []
    assert t.suspects == {}


def test_stale_copy_of_a_finished_call_reports_nothing() -> None:
    t = Tracker()
    t.poll([item("c1", "pending")])
    assert types(t.poll([item("c1", "completed")])) == ["call.completed", "batch.completed"]
    assert types(t.poll([item("c1", "in_progress")])) == []
    assert types(t.poll([item("c1", "completed")])) == []
    assert [e["type"] for e in t.events] == ["call.completed", "batch.completed"]


def test_confirmed_backward_move_is_a_redial_whose_terminal_was_missed() -> None:
    t = Tracker()
    t.poll([item("c1", "pending")])
    t.poll([item("c1", "ringing")])
    # no_answer came and went between two scans; the platform redialled.
    assert types(t.poll([item("c1", "queued")])) == []
    r = t.poll([item("c1", "queued")])
    assert types(r) == ["call.queued"]
    data = orjson.loads(r.events[0].body)["data"]
    assert data["previous_status"] == "ringing"
    assert data["missed_terminal"] is True
    assert data["sequence"] == 2
    r = t.poll([item("c1", "ringing")])
    data = orjson.loads(r.events[0].body)["data"]
    assert (data["previous_status"], data["missed_terminal"]) == ("queued", False)


def test_partial_scan_never_completes_the_batch() -> None:
    t = Tracker()
    t.poll([item("c1", "pending"), item("c2", "pending")])
    r = t.poll([item("c1", "completed"), item("c2", "completed")], ScanFacts(complete=False))
    assert types(r) == ["call.completed", "call.completed"]
    # The platform says three calls: the one we never saw may still be ringing.
    r = t.poll([], ScanFacts(complete=True, total=3))
    assert types(r) == []
    r = t.poll([item("c3", "busy")], ScanFacts(complete=True, total=3))
    assert types(r) == ["call.busy", "batch.completed"]


def test_redial_re_enters_with_new_sequence_and_batch_reopens() -> None:
    t = Tracker()
    t.poll([item("c1", "pending"), item("c2", "completed")])
    r = t.poll([item("c1", "no_answer")])
    assert types(r) == ["call.no_answer", "batch.completed"]
    # Out of a terminal status: confirmed by a second observation before it counts.
    assert types(t.poll([item("c1", "queued")])) == []
    r = t.poll([item("c1", "queued")])
    assert types(r) == ["call.queued"]
    assert orjson.loads(r.events[0].body)["data"]["missed_terminal"] is False
    assert not r.completed
    r = t.poll([item("c1", "ringing")])
    r = t.poll([item("c1", "completed")])
    assert types(r) == ["call.completed", "batch.completed"]
    assert len(set(t.ids)) == len(t.ids)
    batch_events = [e for e in t.events if e["type"] == "batch.completed"]
    assert batch_events[-1]["data"]["counts"] == {"completed": 2}


def test_event_ids_are_deterministic() -> None:
    a, b = Tracker(), Tracker()
    for t in (a, b):
        t.poll([item("c1", "pending")])
        t.poll([item("c1", "completed")])
    assert a.ids == b.ids
    # Pinned: the id digests the body (the derivation changed with issue 21, part 2).
    assert a.ids[0] == event_id("b1", "c1", 1, "call.completed", orjson.dumps(a.events[0]))


def test_an_id_never_names_two_bodies() -> None:
    """What a failover that rewound Redis makes the bridge emit again, or emit instead,
    never reuses an id: the same change seen at another time, another update under the
    same sequence, another completion under the same count."""
    prev = {"c1": CallState("ringing", 1, Fingerprint.of(item("c1", "ringing")))}
    view = BatchView({"ringing": 1})

    def once(status: str, ts: str, **fields: Any) -> list[tuple[str, bytes]]:
        r = diff("b1", prev, [item("c1", status, **fields)], view, now_ms=NOW, timestamp=ts)
        return [(e.id, e.body) for e in r.events]

    later = "2026-11-28T10:00:09.000Z"
    assert once("answered", TS) == once("answered", TS)
    assert once("answered", TS)[0][0] != once("answered", later)[0][0]
    assert once("ringing", TS, name="X")[0][0] != once("ringing", TS, name="Y")[0][0]
    # Two calls, one completed; the other ends completed or busy: two completions
    # counted 1 each, two events.
    both = {"c1": CallState("completed", 2, Fingerprint.of(item("c1", "completed")))}
    both["c2"] = prev["c1"]
    two = BatchView({"completed": 1, "ringing": 1})
    ids = set()
    for status in ("completed", "busy"):
        r = diff("b1", both, [item("c2", status)], two, now_ms=NOW, timestamp=TS)
        ids |= {e.id for e in r.events if e.type == "batch.completed"}
    assert len(ids) == 2


def test_fingerprint_roundtrip_and_size() -> None:
    fp = Fingerprint.of(item("c1", "completed", extra_field=[1, 2]))
    assert Fingerprint.decode(fp.encode()) == fp
    state = CallState("completed", 12, fp)
    assert CallState.decode(state.encode()) == state
    assert len(CallState("in_progress", 3, Fingerprint.of(item("c", "x"))).encode()) < 64


# --- properties ------------------------------------------------------------------

LIFECYCLE = {
    "pending": ["queued", "cancelled"],
    "queued": ["ringing", "failed", "cancelled"],
    "ringing": ["answered", "no_answer", "busy", "failed"],
    "answered": ["in_progress", "failed"],
    "in_progress": ["completed", "failed"],
    "no_answer": ["queued"],
    "busy": ["queued"],
    "completed": [],
    "failed": [],
    "cancelled": [],
}


@st.composite
def histories(draw: st.DrawFn) -> list[list[str]]:
    """Per call, the statuses it goes through; per poll, what is visible."""
    calls = draw(st.integers(1, 5))
    out = []
    for _ in range(calls):
        seq = ["pending"]
        for _ in range(draw(st.integers(0, 10))):
            nxt = LIFECYCLE[seq[-1]]
            if not nxt:
                break
            seq.append(draw(st.sampled_from(nxt)))
        out.append(seq)
    return out


@settings(max_examples=200, deadline=None)
@given(histories(), st.data())
def test_properties_over_random_lifecycles(calls: list[list[str]], data: st.DataObject) -> None:
    t = Tracker()
    positions = [0] * len(calls)
    steps = max(len(s) for s in calls) * 2
    for _ in range(steps):
        # Random poll timing: each call advances 0-2 statuses between polls.
        for i, seq in enumerate(calls):
            positions[i] = min(len(seq) - 1, positions[i] + data.draw(st.integers(0, 2)))
        scan = [item(f"c{i}", calls[i][positions[i]]) for i in range(len(calls))]
        # Each status is seen by at least two scans (a backward move needs a
        # second observation); a third identical scan then emits nothing.
        t.poll(scan)
        t.poll(scan)
        assert types(t.poll(scan)) == []
    # Everything visible at the end.
    final = [item(f"c{i}", seq[-1]) for i, seq in enumerate(calls)]
    t.poll(final)
    t.poll(final)
    per_call: dict[str, list[dict[str, Any]]] = {}
    for e in t.events:
        if e["type"].startswith("call."):
            per_call.setdefault(e["data"]["call_id"], []).append(e["data"])
    for i, seq in enumerate(calls):
        evs = per_call.get(f"c{i}", [])
        # No event for a status the call never had.
        assert {e["status"] for e in evs} <= set(seq)
        # Sequence strictly increasing.
        seqs = [e["sequence"] for e in evs]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        # The final terminal status is never missed.
        if seq[-1] in TERMINAL_STATUSES:
            assert evs
            assert evs[-1]["status"] == seq[-1]
        # previous_status chains from one reported status to the next.
        statuses = [e for e in evs if e["previous_status"] is not None or e["initial"]]
        for before, after in itertools.pairwise(statuses):
            if after["status"] != before["status"]:
                assert after["previous_status"] == before["status"]
    assert len(set(t.ids)) == len(t.ids)


@given(st.lists(st.sampled_from(KNOWN_STATUSES), min_size=1, max_size=20))
def test_counts_match_states(statuses: list[str]) -> None:
    t = Tracker()
    for s in statuses:
        t.poll([item("c1", s), item("c2", "pending")])
    counts: Mapping[str, int] = t.view.counts
    assert sum(counts.values()) == 2


def test_status_case_and_spaces_are_normalised() -> None:
    t = Tracker()
    t.poll([item("c1", "pending")])
    r = t.poll([item("c1", " Completed ")])
    assert types(r) == ["call.completed", "batch.completed"]
    assert r.counts == {"completed": 1}
    assert orjson.loads(r.events[0].body)["data"]["call"]["status"] == " Completed "


def test_select_candidates_merges_pages_and_skips_unchanged() -> None:
    from callbridge.poll.candidates import ItemSignatures, select_candidates

    def served(*items: dict[str, Any]) -> list[bytes]:
        return [orjson.dumps(i) for i in items]

    page1 = served(item("c1", "ringing"), item("c2", "pending"))
    page2 = served(item("c2", "queued"), item("c3", "pending"))  # c2 shifted: served twice
    known = ItemSignatures()
    cands = select_candidates([page1, page2], known)
    assert cands.duplicates == 1
    assert {c["call_id"]: c["status"] for c in cands.items} == {
        "c1": "ringing",
        "c2": "queued",  # the later page wins
        "c3": "pending",
    }
    assert set(cands.raws) == {"c1", "c2", "c3"}
    known.update(cands.signatures)
    again = select_candidates([page1, page2], known)
    # c2's first copy is not its committed one: it is a candidate (a stale copy), but
    # the later, committed copy wins the merge, so nothing is left to diff.
    assert again.items == []
    assert again.duplicates == 1
    # Items without a usable call_id or status are counted, never decoded further.
    odd = select_candidates(
        [[b'{"call_id":"","status":"x"}', b"[1]", orjson.dumps(item("c4", " "))]], known
    )
    assert (odd.items, odd.invalid) == ([], 3)


def test_an_integer_beyond_64_bits_is_read_as_the_fingerprints_always_read_it() -> None:
    """A field holding an integer too large for 64 bits: read as a float (as orjson reads
    it, and as every stored fingerprint was computed), never a crash of the cycle (a
    decoder keeping the exact integer made the fingerprint's encoder raise)."""
    from callbridge.poll.candidates import ItemSignatures, select_candidates

    raw = b'{"call_id":"c1","status":"ringing","metadata":{"n":123456789012345678901234567890}}'
    cands = select_candidates([[raw]], ItemSignatures())
    assert cands.items[0]["metadata"] == {"n": 1.2345678901234568e29}
    r = Tracker().poll(cands.items)
    assert types(r) == ["call.ringing"]
    assert r.states["c1"].fingerprint == Fingerprint.of(orjson.loads(raw))


def test_unreadable_state_raises_value_error() -> None:
    import pytest

    for bad in [b"x", b"1|zz|ok", b"a|b|c", b"\xe9", b"1|AAAA;x=zz|ok"]:
        with pytest.raises((ValueError, UnicodeDecodeError)):
            CallState.decode(bad)


def test_field_names_with_separators_round_trip() -> None:
    # Platform field names may hold anything; they once corrupted the stored status.
    t = Tracker()
    t.poll([item("c1", "pending", **{"a|b": 1, "x;y=z": 2, "50%": 3})])
    encoded = t.states["c1"].encode()
    decoded = CallState.decode(encoded)
    assert decoded == t.states["c1"]
    assert decoded.status == "pending"
    assert types(t.poll([item("c1", "pending", **{"a|b": 1, "x;y=z": 2, "50%": 3})])) == []


def test_schema_1_entries_are_read() -> None:
    # As written by the previous release: seq|fingerprint|status, names raw.
    fp = Fingerprint.of(item("c1", "ringing", recording="r1"))
    head = fp.encode().split(";")[0]
    old = f"3|{head};recording={dict(fp.extra)['recording']:x}|ringing"
    state = CallState.decode(old.encode())
    assert (state.status, state.seq) == ("ringing", 3)
    assert state.fingerprint == fp
    assert CallState.decode(state.encode()) == state


def test_call_states_decode_on_access_and_skip_unreadable_entries() -> None:
    from callbridge.store.callstate import CallStates

    state = CallState("ringing", 2, Fingerprint.of(item("c1", "ringing")))
    states = CallStates({"c1": state.encode(), "c2": "garbage"})
    assert states["c1"] == state
    assert states.status("c1") == "ringing"
    # Written by something else: the call reads as unknown (seen afresh), counted.
    assert states.get("c2") is None
    assert states.unreadable == 1
    assert set(states) == {"c1", "c2"}


def test_a_redial_seen_going_on_reports_what_the_first_look_saw() -> None:
    # ringing; no_answer unseen; the platform redials: queued (one scan), then ringing.
    # The second look confirms the move back; queued, seen by the first, comes first.
    t = Tracker()
    t.poll([item("c1", "pending")])
    t.poll([item("c1", "ringing")])
    assert types(t.poll([item("c1", "queued")])) == []
    first_look = item("c1", "queued")
    r = diff(
        "b1",
        t.states,
        [item("c1", "ringing")],
        t.view,
        now_ms=NOW,
        timestamp=TS,
        confirmed={"c1"},
        replays={"c1": first_look},
    )
    data = [orjson.loads(e.body)["data"] for e in r.events]
    assert [(d["status"], d["previous_status"], d["missed_terminal"]) for d in data] == [
        ("queued", "ringing", True),
        ("ringing", "queued", False),
    ]
    assert [d["sequence"] for d in data] == [2, 3]
    assert r.states["c1"].status == "ringing"
