"""What a scan shows that differs from the last committed one (pure, no I/O).

An item whose bytes hash to the signature the last committed scan saw for a
call is unchanged, and costs a hash and a dict look-up: not even its call_id is
decoded. Only the others are checked and decoded, and go to the diff.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from callbridge.poll.pages import usable_item


@dataclass(slots=True)
class Candidates:
    """What a scan showed that differs from the last committed one."""

    items: list[dict[str, Any]] = field(default_factory=list)
    # The items' exact bytes as served, by call_id (event bodies embed them as is).
    raws: dict[str, bytes] = field(default_factory=dict)
    signatures: dict[str, int] = field(default_factory=dict)
    # Calls served exactly as the last committed scan saw them.
    unchanged: set[str] = field(default_factory=set)
    # Calls whose status in `items` the reads behind them served at least twice (a
    # backward one is then confirmed: `second_look`).
    twice: set[str] = field(default_factory=set)
    duplicates: int = 0
    invalid: int = 0


def select_candidates(
    pages: Iterable[Iterable[bytes | msgspec.Raw]],
    known: ItemSignatures,
    judge: Collection[str] = (),
) -> Candidates:
    """Items that differ from the last committed scan, and those of the calls in
    `judge` (`second_look.must_judge`) whatever they show.

    An item whose bytes hash to a signature the last committed scan saw is
    unchanged and costs nothing more: not even its call_id is decoded. The others
    are checked (call_id, status) and decoded. Items are merged by call_id; when a
    call appears twice (pages shifting while we read), the copy from the later page
    wins, as it was served later.
    """
    owners = known.owners
    fresh: dict[str, tuple[int, dict[str, Any], bytes]] = {}
    out = Candidates()
    unchanged = out.unchanged
    for raws in pages:
        for raw in raws:
            # As `pages.signature`, inlined: this loop runs for every call of a scan.
            data = bytes(raw)  # kept for the event bodies if the item changed
            sig = hash(data)
            call_id = owners.get(sig)
            if call_id is not None and call_id not in judge:
                if call_id in unchanged:
                    out.duplicates += 1
                elif call_id in fresh:
                    out.duplicates += 1
                    del fresh[call_id]  # a later copy, as committed: nothing changed
                unchanged.add(call_id)
                continue
            # Decoded once, into the dict the diff reads (a first scan decodes every
            # item: checking the key first and decoding again cost a third more).
            item = usable_item(data)
            if item is None:
                out.invalid += 1
                continue
            call_id = item["call_id"]
            if call_id in fresh or call_id in unchanged:
                out.duplicates += 1
                if call_id in fresh and fresh[call_id][1]["status"] == item["status"]:
                    out.twice.add(call_id)  # served twice (pages shifting): both count
            fresh[call_id] = (sig, item, data)
    items, raws_out, sigs = out.items, out.raws, out.signatures
    for call_id, (sig, item, data) in fresh.items():
        items.append(item)
        raws_out[call_id] = data
        sigs[call_id] = sig
    return out


class ItemSignatures:
    """The signature of each call's item as of the last committed scan, both ways."""

    __slots__ = ("by_call", "owners")

    def __init__(self) -> None:
        self.by_call: dict[str, int] = {}
        self.owners: dict[int, str] = {}

    def update(self, signatures: Mapping[str, int]) -> None:
        for call_id, sig in signatures.items():
            old = self.by_call.get(call_id)
            if old is not None and self.owners.get(old) == call_id:
                del self.owners[old]
            self.by_call[call_id] = sig
            self.owners[sig] = call_id
