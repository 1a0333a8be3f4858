"""How a batch that would never finish on its own ends. Pure: the cycle commits what
these functions return.

* **Not found**: a batch the platform answers 404 for is checked again every
  ``not_found_recheck_seconds``; once it has answered 404 for
  ``not_found_retire_seconds`` the cycle commits a ``batch.retired`` event
  (`not_found_step`) and the batch retires (`lifecycle`).
* **A call the platform stopped listing**: a complete full scan that served fewer
  calls than the snapshot holds makes the next full scan a census (`needs_census`):
  it reads every page (no page skipped as unchanged) and names the calls none of them
  served. One missing from every census for ``vanished_call_seconds``
  (`after_census`) is reported once, as ``call.updated`` with ``removed: true``, and
  stored as `models.REMOVED`, which is finished: it no longer keeps the batch open.
  A call missing from one scan (pages shifting while they are read) is seen again by
  the next census and forgotten.
* **A status the API does not document** keeps its calls open while the batch moves;
  once nothing changed for ``unknown_status_final_seconds`` they count as finished,
  so the batch can complete (`unknown_statuses_final`, see `diff`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping

from callbridge.config import PollerSettings
from callbridge.models import REMOVED, Event, iso_ms
from callbridge.store.callstate import CallStates
from callbridge.store.snapshots import BatchMeta

log = logging.getLogger(__name__)

# Missing calls remembered with the snapshot at most (their count only delays the rest).
MAX_VANISHED = 1000


def not_found_step(
    batch_id: str, meta: BatchMeta, now_ms: int, settings: PollerSettings
) -> tuple[BatchMeta | None, list[Event]]:
    """What a cycle answered 404 commits: when the batch was first not found, and
    once that is `not_found_retire_seconds` ago its end (a ``batch.retired`` event);
    None when there is nothing new to write."""
    since = meta.not_found_since_ms
    if not since:
        log.warning(
            "batch %s not found upstream; rechecking every %.0fs, retired after %.0fs",
            batch_id,
            settings.not_found_recheck_seconds,
            settings.not_found_retire_seconds,
            extra={"action": "batch_not_found", "batch_id": batch_id},
        )
        return dataclasses.replace(meta, not_found_since_ms=now_ms), []
    if meta.ended or now_ms - since < settings.not_found_retire_seconds * 1000:
        return None, []
    log.warning(
        "batch %s not found upstream for %.0fs: retired",
        batch_id,
        (now_ms - since) / 1000,
        extra={"action": "batch_not_found_retired", "batch_id": batch_id},
    )
    event = Event.build(
        # One per episode of not being found: watched again and lost again, another.
        seq=since,
        type="batch.retired",
        timestamp=iso_ms(now_ms),
        batch_id=batch_id,
        call_id=None,
        data={"batch_id": batch_id, "reason": "not_found", "not_found_since": iso_ms(since)},
    )
    return dataclasses.replace(meta, ended="not_found"), [event]


def needs_census(stored: int, counts: Mapping[str, int], total: int | None) -> bool:
    """Whether a complete full scan that reported `total` calls leaves some of the
    `stored` ones (`counts`: the snapshot's, by status) unaccounted for: the next full
    scan then reads every page and names them."""
    return total is not None and stored - counts.get(REMOVED, 0) > total


def after_census(
    states: CallStates,
    served: Collection[str] | None,
    vanished: Mapping[str, int],
    now_ms: int,
    settings: PollerSettings,
) -> tuple[dict[str, int], list[str]]:
    """After a census that `served` these calls (None: the cycle was no census): the
    stored calls still missing, with when each was first missed (those served again
    are forgotten), and those missing for `vanished_call_seconds`, to report removed
    now."""
    if served is None:
        return dict(vanished), []
    after_ms = settings.vanished_call_seconds * 1000
    still: dict[str, int] = {}
    removed: list[str] = []
    for call_id in states:
        if call_id in served or states.status(call_id) == REMOVED:
            continue
        since = vanished.get(call_id, now_ms)
        if now_ms - since >= after_ms:
            removed.append(call_id)
        elif len(still) < MAX_VANISHED:  # the others start counting later
            still[call_id] = since
    return still, removed


def unknown_statuses_final(meta: BatchMeta, now_ms: int, settings: PollerSettings) -> bool:
    """Whether calls in undocumented statuses count as finished: the batch completed
    with them already, or nothing changed in it for `unknown_status_final_seconds`."""
    quiet_ms = now_ms - meta.last_change_ms
    return meta.completed or quiet_ms >= settings.unknown_status_final_seconds * 1000
