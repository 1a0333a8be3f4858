"""Second looks: a call seen moving backwards is reported only when a second look agrees.

A backward move (``ringing -> queued``, ``completed -> in_progress``) is a redial or a
stale copy served by the platform. The first sighting becomes a `Suspect`, kept with
the commit (`stored_suspects`) so that a restart or a take-over judges it too; the
second look is the next read that serves the call, or at once an ``external_id``
look-up (`confirm_backward_moves`). Pure but for that look-up.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from callbridge.errors import UpstreamError
from callbridge.models import is_backward, is_terminal, normalise_status
from callbridge.poll.candidates import Candidates
from callbridge.poll.pages import entry
from callbridge.poll.upstream import UpstreamClient
from callbridge.store.callstate import ABSENT, FINGERPRINT_FIELDS, CallState, Fingerprint

# Backward moves confirmed by a look-up per cycle at most; the rest wait a scan.
# Look-ups cost requests from the budget every scan shares, so they are few, and
# only for the moves a scan alone confirms late (a terminal status never seen).
MAX_LOOKUPS_PER_CYCLE = 4
_STARTED_AT = FINGERPRINT_FIELDS.index("started_at")
_ENDED_AT = FINGERPRINT_FIELDS.index("ended_at")


@dataclass(frozen=True, slots=True)
class Suspect:
    """A call seen moving backwards, waiting for a second look."""

    status: str
    item: dict[str, Any]
    raw: bytes
    # The platform served it so twice already (two reads of the cycle that saw it):
    # a second look must report it, whatever the call shows then.
    twice: bool = False
    # The cycle that saw it (`BatchCache.cycle`; -1: an earlier process's). Only a
    # later cycle gives the second look: a scan sees each call once, and an active
    # plan, whose reads may serve a call more than once, must report what a full scan
    # reports, in the same cycle (`tests/integration/test_planner.py`).
    cycle: int = -1


@dataclass(slots=True)
class LookupBudget:
    """Look-ups a cycle may still make (its groups of pages share them)."""

    left: int


def must_judge(suspects: Mapping[str, Suspect], cycle: int) -> set[str]:
    """Calls whose second look is due whatever they show (served twice going back by
    an earlier cycle): decoded even when served as the last commit saw them."""
    return {c for c, s in suspects.items() if s.twice and s.cycle != cycle}


async def confirm_backward_moves(
    upstream: UpstreamClient,
    batch_id: str,
    states: Mapping[str, CallState],
    suspects: Mapping[str, Suspect],
    candidates: Candidates,
    retry_within_s: float,
    lookups: LookupBudget,
    cycle: int,
) -> tuple[set[str], dict[str, dict[str, Any]]]:
    """Call ids whose backward move a second observation confirms, and what the scan
    showed of those the look-up found moved on since (to report first, see `diff`).

    The second observation is an earlier cycle's (`suspects`: the call was seen
    backwards then too) or, at once, an ``external_id`` look-up of the call (for a
    call whose terminal status we never saw: a redial after a seen one waits a
    cycle). A look-up showing the call where we last saw it proves the scan's copy
    stale (the look-up's item replaces it in `candidates`, so the diff sees the
    truth) unless this cycle's reads served it twice (`candidates.twice`). A status
    served twice is reported whatever the call did next: a cycle slower than the
    call's statuses may next find it back in the very item we knew (a redial that
    came round), so an earlier cycle's suspect served twice is confirmed by any
    later sight of the call.
    """
    confirmed: set[str] = set()
    moved_on: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(candidates.items):
        call_id = item["call_id"]
        prev = states.get(call_id)
        if prev is None:
            continue
        status = normalise_status(item["status"])
        earlier = suspects.get(call_id)  # a first look by an earlier cycle
        if earlier is not None and earlier.cycle == cycle:
            earlier = None
        if not is_backward(prev.status, status):
            if earlier is not None and (
                earlier.twice
                or _new_attempt(prev, item)
                or (is_terminal(prev.status) and status != prev.status)
            ):
                # Served twice going back; or seen going back, now forward again in
                # another attempt than the one we know, or ended otherwise than we saw
                # it end (a finished call changes only when redialled): the backward
                # status was a redial.
                confirmed.add(call_id)
            continue
        if earlier is not None:
            confirmed.add(call_id)
            continue
        external_id = item.get("external_id")
        if not isinstance(external_id, str) or is_terminal(prev.status) or lookups.left <= 0:
            continue
        lookups.left -= 1
        try:
            fresh = await upstream.find_call(
                batch_id, call_id, external_id, retry_within_s=retry_within_s
            )
        except UpstreamError:
            continue  # the next scan confirms it, or not
        if fresh is None:
            continue
        status = normalise_status(fresh.status)
        backward = is_backward(prev.status, status)
        if not backward and call_id in candidates.twice:
            continue  # served twice going back: a first look all the same, kept as served
        candidates.items[i] = fresh.item
        candidates.raws[call_id] = fresh.raw
        if backward:
            confirmed.add(call_id)
        elif status == prev.status and _new_attempt(prev, fresh.item):
            # Back where we last saw it, but in a new attempt (it started ringing at
            # another time): it was redialled and has come forward again since the
            # scan. The scan's status was real.
            confirmed.add(call_id)
            moved_on[call_id] = item
    return confirmed, moved_on


def _new_attempt(prev: CallState, item: Mapping[str, Any]) -> bool:
    """The item shows another attempt than `prev`: both carry a ``started_at``, or
    both an ``ended_at``, and they differ (a field filled in late on the same attempt
    is not a new one; a call that was never answered may have no start time, but a
    finished one that ends again ends at another time)."""
    fields = Fingerprint.of(item).known
    known = prev.fingerprint.known
    return any(
        fields[i] != ABSENT and known[i] != ABSENT and fields[i] != known[i]
        for i in (_STARTED_AT, _ENDED_AT)
    )


def replays_for(
    candidates: Candidates,
    confirmed: set[str],
    suspects: Mapping[str, Suspect],
    moved_on: Mapping[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """For confirmed calls that have moved on since the scan that saw them go back,
    what that scan showed (reported first: see `diff`)."""
    out = dict(moved_on)
    if not confirmed or not suspects:
        return out
    for item in candidates.items:
        call_id = item["call_id"]
        suspect = suspects.get(call_id)
        if (
            call_id in confirmed
            and suspect is not None
            and suspect.status != normalise_status(item["status"])
        ):
            out[call_id] = suspect.item
    return out


def suspects_from(
    candidates: Candidates,
    unconfirmed: Mapping[str, str],
    before: Mapping[str, Suspect],
    cycle: int,
) -> dict[str, Suspect]:
    """The calls seen going back and not confirmed yet, for the next cycle to judge.

    Those this scan saw go back, with what it showed of them (served twice: by two
    reads behind `candidates`, or again after a look of this same `cycle`); and the
    earlier ones this scan did not serve at all (a page that failed, items shifting
    between pages): forgetting them would make a redial need two sightings in a row.
    A call served as the last commit saw it is back where we knew it: forgotten (one
    served twice never is: it is decoded and judged, `must_judge`).
    """
    out: dict[str, Suspect] = {}
    if before:
        seen = {item["call_id"] for item in candidates.items}
        out = {
            call_id: suspect
            for call_id, suspect in before.items()
            # Served twice by this cycle: judged by the next, whatever this one saw after.
            if (suspect.twice and suspect.cycle == cycle)
            or (call_id not in seen and call_id not in candidates.unchanged)
        }
    if not unconfirmed:
        return out
    for item in candidates.items:
        status = unconfirmed.get(call_id := item["call_id"])
        if status is not None:
            # Unconfirmed with a suspect already: one of this cycle (an earlier one
            # would have confirmed it); in the same status, the platform served it twice.
            last = before.get(call_id)
            again = last is not None and last.status == status
            twice = call_id in candidates.twice or again
            raw = candidates.raws[call_id]
            out[call_id] = Suspect(status, item, raw, twice, cycle if last is None else last.cycle)
    return out


def unsettled(suspects: Mapping[str, Suspect], candidates: Candidates) -> int:
    """Calls seen going back to a non-terminal status by an earlier look, unconfirmed,
    that `candidates` do not judge again (the diff judges those it holds): each may
    be dialling again, so the batch may not complete yet (`diff.ScanFacts`)."""
    if not suspects:
        return 0
    seen = {item["call_id"] for item in candidates.items}
    return sum(
        1
        for call_id, suspect in suspects.items()
        if not is_terminal(suspect.status)
        and call_id not in seen
        and call_id not in candidates.unchanged
    )


# Suspects kept with the snapshot at most: a platform serving every call backwards
# must not make each commit carry megabytes (the rest are still kept in memory).
MAX_STORED_SUSPECTS = 1000


def stored_suspects(suspects: Mapping[str, Suspect]) -> tuple[list[bytes], list[str]]:
    """What the commit keeps of `suspects` (their items as served, and which were
    served twice), so that a replica taking over, or this one restarted, judges them
    on its first scan."""
    kept = list(itertools.islice(suspects.items(), MAX_STORED_SUSPECTS))
    return [s.raw for _, s in kept], [c for c, s in kept if s.twice]


def restored_suspects(raws: Iterable[bytes], twice: Iterable[str] = ()) -> dict[str, Suspect]:
    """`stored_suspects` read back (from an earlier cycle, as far as any cycle of this
    process goes). An older release stored no `twice`: none then."""
    served_twice = set(twice)
    out: dict[str, Suspect] = {}
    for raw in raws:
        e = entry(raw)
        if e is not None:
            status = normalise_status(e.status)
            out[e.call_id] = Suspect(status, e.item, e.raw, e.call_id in served_twice)
    return out
