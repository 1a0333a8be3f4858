"""The simulator's call store: batches of call records and their cached JSON.

A batch keeps its calls in creation order (the API's order until a reorder fault
changes it: then ``order`` holds the served order) with each item's JSON bytes
cached until the call changes, so a page is a join of cached bytes. Filtered
views (by status or external_id) are index lists cached per batch version. The
lifecycle rules live in `callbridge.simulator.lifecycle`; this module only holds the
state they act on.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Final

import orjson

from callbridge.models import PENDING

__all__ = ["ITEM_FIELDS", "BatchRecord", "CallRecord"]

# The documented item, in the documented key order.
ITEM_FIELDS: tuple[str, ...] = (
    "call_id",
    "external_id",
    "phone_number",
    "name",
    "status",
    "duration_seconds",
    "started_at",
    "ended_at",
    "metadata",
)
FIRST_EXTERNAL_ID = 101
FIRST_NAMES = (
    "Aarav", "Priya", "John", "Maria", "Wei", "Fatima", "Carlos", "Aisha", "Liam", "Sofia",
    "Rohan", "Ananya", "Noah", "Emma", "Kenji", "Olga", "Mateo", "Zara", "Ibrahim", "Chloe",
)  # fmt: skip
LAST_NAMES = (
    "Sharma", "Doe", "Garcia", "Chen", "Khan", "Silva", "Okafor", "Patel", "Müller", "Rossi",
    "Kim", "Novak", "Iyer", "Smith", "Haddad", "Tanaka", "Kowalski", "Mensah", "Reddy", "Brown",
)  # fmt: skip
COMPANIES = (
    "Acme Corporation", "Globex", "Initech", "Umbrella Health", "Stark Logistics",
    "Wayne Finance", "Hooli", "Vandelay Imports", "Soylent Foods", "Tyrell Systems",
)  # fmt: skip
# Stands for the metadata a contact was uploaded with, built only when encoded: one dict
# less per call makes creating a 100k-call batch markedly cheaper.
_DERIVED: Final = object()
# Status views are keyed by a client-chosen filter string; bounded so odd filters can't grow it.
_MAX_CACHED_VIEWS = 32


class CallRecord:
    """One call: its item fields plus the lifecycle bookkeeping of the simulator."""

    __slots__ = (
        "call_id",
        "company",
        "duration_seconds",
        "ended_at",
        "external_id",
        "extra",
        "followup",
        "gen",
        "history",
        "index",
        "late_end_s",
        "metadata",
        "name",
        "phone_number",
        "redials",
        "ring_s",
        "started_at",
        "started_s",
        "status",
    )

    def __init__(self, index: int, call_id: str, phone: str, name: str, company: str) -> None:
        self.index = index
        self.call_id = call_id
        # Item fields are Any: Simulator.set_call may store any JSON value in them.
        self.external_id: Any = str(FIRST_EXTERNAL_ID + index)
        self.phone_number: Any = phone
        self.name: Any = name
        self.status = PENDING
        self.duration_seconds: Any = None
        self.started_at: Any = None
        self.ended_at: Any = None
        self.company = company
        self.metadata: Any = _DERIVED
        self.extra: dict[str, Any] | None = None
        self.redials = 0
        # Bumped by a forced status change; scheduled work for an older gen is void.
        self.gen = 0
        self.followup = False  # a redial or late update is scheduled
        self.history: list[tuple[int, str]] | None = None  # None: never changed
        self.started_s: int | None = None
        self.ring_s: int | None = None  # when the current attempt began ringing
        self.late_end_s: int | None = None

    def own_metadata(self) -> Any:
        """The metadata as a value of its own, to edit it or the name independently."""
        if self.metadata is _DERIVED:
            self.metadata = {"Name": self.name, "Company Name": self.company}
        return self.metadata

    def item(self) -> dict[str, Any]:
        """The call as the API returns it."""
        # Spelled out rather than looped over ITEM_FIELDS: this is the encode hot path.
        item = {
            "call_id": self.call_id,
            "external_id": self.external_id,
            "phone_number": self.phone_number,
            "name": self.name,
            "status": self.status,
            "duration_seconds": self.duration_seconds,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "metadata": self.metadata
            if self.metadata is not _DERIVED
            else {"Name": self.name, "Company Name": self.company},
        }
        if self.extra:
            item.update(self.extra)
        return item


class BatchRecord:
    """A batch's calls in creation order, their cached JSON, and lifecycle counters."""

    __slots__ = (
        "batch_id",
        "by_id",
        "calls",
        "created_at",
        "created_step",
        "dialling",
        "encoded",
        "ext_index",
        "followups",
        "next_new",
        "open",
        "order",
        "position",
        "repending",
        "version",
        "views",
    )

    def __init__(
        self, batch_id: str, calls: list[CallRecord], created_step: int, created_at: float = 0.0
    ) -> None:
        self.batch_id = batch_id
        self.calls = calls
        self.created_at = created_at  # the simulator clock's reading at creation
        # The served order as call indexes, and each index's place in it; None while
        # it is the creation order (no reorder fault yet).
        self.order: list[int] | None = None
        self.position: list[int] | None = None
        self.by_id = {call.call_id: call for call in calls}
        # Each call's item JSON; None until first served and again after each change.
        self.encoded: list[bytes | None] = [None] * len(calls)
        self.created_step = created_step
        # Calls start dialling in creation order: calls[next_new:] are still in their
        # first pending, then come calls set back to pending: (call, gen, since step).
        self.next_new = 0
        self.repending: deque[tuple[CallRecord, int, int]] = deque()
        self.dialling = 0  # calls holding a dialling slot (queued .. in_progress)
        self.open = len(calls)  # calls in a non-terminal status
        self.followups = 0  # scheduled redials and late updates
        self.version = 0
        self.views: dict[str, tuple[int, list[int]]] = {}
        self.ext_index: dict[str, list[int]] | None = None

    @classmethod
    def generate(
        cls,
        batch_id: str,
        count: int,
        *,
        seed: int,
        taken: set[str],
        created_step: int,
        created_at: float = 0.0,
    ) -> BatchRecord:
        """A batch of `count` pending calls whose contacts derive from seed and batch id.

        `taken` holds every call id in use and receives the new ones, so ids stay
        unique across batches.
        """
        rng = random.Random(f"contacts:{seed}:{batch_id}")
        calls: list[CallRecord] = []
        for index in range(count):
            # One draw per call, sliced into fields: creation is on the 100k-call hot path.
            bits = rng.getrandbits(104)
            call_id = f"call_{bits & 0xFFFFFFFF:08x}"
            while call_id in taken:
                call_id = f"call_{rng.getrandbits(32):08x}"
            taken.add(call_id)
            first = FIRST_NAMES[((bits >> 32) & 0xFF) % len(FIRST_NAMES)]
            last = LAST_NAMES[((bits >> 40) & 0xFF) % len(LAST_NAMES)]
            company = COMPANIES[((bits >> 48) & 0xFF) % len(COMPANIES)]
            # Indian mobile numbers, like the documented example: 91, then [6-9], 9 digits.
            subscriber = ((bits >> 56) & 0xFF_FFFF_FFFF) % 1_000_000_000
            phone = f"91{6 + ((bits >> 96) & 0xFF) % 4}{subscriber:09d}"
            calls.append(CallRecord(index, call_id, phone, f"{first} {last}", company))
        return cls(batch_id, calls, created_step, created_at)

    def call(self, call_id: str) -> CallRecord:
        try:
            return self.by_id[call_id]
        except KeyError:
            raise KeyError(f"no call {call_id!r} in batch {self.batch_id!r}") from None

    def touch(self, call: CallRecord) -> None:
        """Record that `call` changed: its cached JSON and the filtered views are stale."""
        self.encoded[call.index] = None
        self.version += 1

    def reorder(self, rng: random.Random, share: float) -> None:
        """Let `share` of the items (two at least) trade places in the served order."""
        n = len(self.calls)
        k = min(n, max(2, round(share * n)))
        if k < 2:
            return
        order = self.order if self.order is not None else list(range(n))
        places = rng.sample(range(n), k)
        moved = [order[p] for p in places]
        rng.shuffle(moved)
        for place, index in zip(places, moved, strict=True):
            order[place] = index
        position = self.position if self.position is not None else [0] * n
        for place, index in enumerate(order):
            position[index] = place
        self.order, self.position = order, position
        self.version += 1  # cached views follow the served order

    def external_ids_changed(self) -> None:
        self.ext_index = None

    def count(self, status: str | None, external_id: str | None) -> int:
        """How many calls match the filters (the API's ``total``)."""
        if status is None and external_id is None:
            return len(self.calls)
        return len(self._view(status, external_id))

    def encoded_items(
        self, status: str | None, external_id: str | None, start: int, stop: int | None
    ) -> list[bytes]:
        """JSON bytes of the matching items ``[start:stop]``, encoding only stale ones."""
        encoded = self.encoded
        if status is None and external_id is None:
            if self.order is not None:
                return [encoded[i] or self._encode(i) for i in self.order[start:stop]]
            return [item or self._encode(start + i) for i, item in enumerate(encoded[start:stop])]
        return [encoded[i] or self._encode(i) for i in self._view(status, external_id)[start:stop]]

    def call_ids(
        self, status: str | None, external_id: str | None, start: int, stop: int | None
    ) -> list[str]:
        """The call ids of `encoded_items`'s answer for the same arguments."""
        if status is None and external_id is None:
            indexes = self.order if self.order is not None else range(len(self.calls))
        else:
            indexes = self._view(status, external_id)
        return [self.calls[i].call_id for i in indexes[start:stop]]

    def encoded_in_creation_order(self) -> list[bytes]:
        """Every item's JSON bytes in creation order, whatever the served order."""
        return [item or self._encode(i) for i, item in enumerate(self.encoded)]

    def _encode(self, index: int) -> bytes:
        # orjson returns bytes that keep its ~4 KiB output buffer alive; a right-sized
        # copy cuts a 100k-call batch's cache from ~400 MB to ~30 MB (and the page
        # faults that dominated encoding time).
        item = bytes(memoryview(orjson.dumps(self.calls[index].item())))
        self.encoded[index] = item
        return item

    def _view(self, status: str | None, external_id: str | None) -> list[int]:
        if external_id is not None:
            indexes = self._external_id_index().get(external_id, [])
            if self.position is not None:
                indexes = sorted(indexes, key=self.position.__getitem__)
            if status is None:
                return indexes
            return [i for i in indexes if self.calls[i].status == status]
        calls = self.calls
        if status is None:
            return list(self.order) if self.order is not None else list(range(len(calls)))
        cached = self.views.get(status)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        if self.order is not None:
            indexes = [i for i in self.order if calls[i].status == status]
        else:
            indexes = [call.index for call in calls if call.status == status]
        if len(self.views) >= _MAX_CACHED_VIEWS:
            self.views.clear()
        self.views[status] = (self.version, indexes)
        return indexes

    def _external_id_index(self) -> dict[str, list[int]]:
        if self.ext_index is None:
            self.ext_index = {}
            for call in self.calls:
                # set_call may store a non-string id; a query string never matches it.
                if isinstance(call.external_id, str):
                    self.ext_index.setdefault(call.external_id, []).append(call.index)
        return self.ext_index
