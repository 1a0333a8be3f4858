"""Reading a batch from the platform for one cycle: its pages, and second looks.

A scan keeps what arrived: when a page fails after its retries (bounded by one
poll interval), the pages read so far are returned with ``complete=False`` and
their calls are committed; the next scan starts on time, so no call is blind
for longer than an outage plus one interval. Only the first page failing is an
error for the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from callbridge.callstate import CallState
from callbridge.diff import Candidates
from callbridge.errors import UpstreamAuthError, UpstreamError
from callbridge.models import is_backward, normalise_status
from callbridge.pages import RawPage
from callbridge.store.leases import LeaseKeeper
from callbridge.upstream import UpstreamClient

log = logging.getLogger(__name__)

# Backward moves confirmed by a look-up per cycle at most; the rest wait a scan.
MAX_LOOKUPS_PER_CYCLE = 20


@dataclass(frozen=True, slots=True)
class Scan:
    pages: list[RawPage]
    # Every page arrived and the last one said there is no more.
    complete: bool


async def read_pages(
    upstream: UpstreamClient,
    batch_id: str,
    previous: Mapping[int, RawPage],
    keeper: LeaseKeeper,
    retry_within_s: float,
) -> Scan:
    """The batch's pages as far as they can be read now; raises when none arrived."""
    pages: list[RawPage] = []
    try:
        async for page in upstream.iter_pages(batch_id, previous, retry_within_s=retry_within_s):
            keeper.check()
            pages.append(page)
    except UpstreamAuthError:
        raise
    except UpstreamError as exc:
        if not pages:
            raise
        log.warning(
            "scan of batch %s stopped after %d pages, keeping them: %s",
            batch_id,
            len(pages),
            exc,
            extra={"action": "scan_partial", "batch_id": batch_id},
        )
        return Scan(pages, complete=False)
    return Scan(pages, complete=bool(pages) and not pages[-1].has_more)


async def confirm_backward_moves(
    upstream: UpstreamClient,
    batch_id: str,
    states: Mapping[str, CallState],
    suspects: Mapping[str, str],
    candidates: Candidates,
    retry_within_s: float,
) -> set[str]:
    """Call ids whose backward move a second observation confirms.

    The second observation is the previous scan (`suspects`: the call was seen
    backwards then too) or, at once, an ``external_id`` look-up of the call. A
    look-up showing the call where we last saw it proves the scan's copy stale:
    the look-up's item replaces it in `candidates` (so the diff sees the truth).
    """
    confirmed: set[str] = set()
    lookups = 0
    for i, item in enumerate(candidates.items):
        call_id = item["call_id"]
        prev = states.get(call_id)
        if prev is None or not is_backward(prev.status, normalise_status(item["status"])):
            continue
        if call_id in suspects:
            confirmed.add(call_id)
            continue
        external_id = item.get("external_id")
        if not isinstance(external_id, str) or lookups >= MAX_LOOKUPS_PER_CYCLE:
            continue
        lookups += 1
        try:
            fresh = await upstream.find_call(
                batch_id, call_id, external_id, retry_within_s=retry_within_s
            )
        except UpstreamError:
            continue  # the next scan confirms it, or not
        if fresh is None:
            continue
        candidates.items[i] = fresh.item
        candidates.raws[call_id] = fresh.raw
        if is_backward(prev.status, normalise_status(fresh.status)):
            confirmed.add(call_id)
    return confirmed
