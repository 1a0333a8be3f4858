"""The simulated world: batches of calls that change only when `advance` is called.

Separate seeded random streams keep runs reproducible: batch ids, each batch's
contacts (seeded by its id), the lifecycle, and faults. So neither HTTP traffic nor
fault settings change what happens to the calls, and adding a batch does not change
the contacts of another.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import orjson

from callbridge.models import PENDING
from callbridge.simulator.calls import ITEM_FIELDS, BatchRecord
from callbridge.simulator.config import FaultConfig, SimulatorConfig
from callbridge.simulator.lifecycle import Lifecycle, StatusSpan, Transition


class Simulator:
    """The simulated platform: batches of calls that change only when `advance` is called.

    `faults` may be replaced at any time and applies from the next request.
    `request_log` holds ``(clock() when received, path+query, status)`` for every
    request any app from `make_app` served, ``/healthz`` included; `clock` defaults
    to `time.monotonic`, and `started_at` is its reading at creation (outage windows
    count from it). Unknown batch or call ids raise `KeyError`.

    Ground truth for checkers: `transitions` (each with the clock reading ``at``),
    `spans` (how long each call held each status) and `outages`.
    """

    def __init__(
        self, config: SimulatorConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.faults: FaultConfig = config.faults
        self.clock = clock
        self.started_at = clock()
        self.request_log: list[tuple[float, str, int]] = []
        self.served: dict[tuple[str, str], list[float]] = {}
        self._lifecycle = Lifecycle(config, clock)
        self._id_rng = random.Random(f"batch-ids:{config.seed}")
        self._batches: dict[str, BatchRecord] = {}
        self._call_ids: set[str] = set()
        for _ in range(config.batches):
            batch_id = f"{config.batch_prefix}{self._id_rng.getrandbits(32):08x}"
            while batch_id in self._batches:
                batch_id = f"{config.batch_prefix}{self._id_rng.getrandbits(32):08x}"
            self.add_batch(batch_id, config.calls_per_batch)

    # -- world ----------------------------------------------------------------
    @property
    def batch_ids(self) -> list[str]:
        """Batch ids in creation order."""
        return list(self._batches)

    @property
    def step_count(self) -> int:
        """Steps taken so far; transitions carry the step they happened in."""
        return self._lifecycle.step

    def add_batch(self, batch_id: str, calls: int) -> None:
        """Create a batch of `calls` pending calls; its contacts derive from seed and id."""
        if batch_id in self._batches:
            raise ValueError(f"batch {batch_id!r} already exists")
        if calls < 0:
            raise ValueError("calls must be >= 0")
        self._batches[batch_id] = BatchRecord.generate(
            batch_id,
            calls,
            seed=self.config.seed,
            taken=self._call_ids,
            created_step=self._lifecycle.step,
            created_at=self.clock(),
        )

    def advance(self, steps: int = 1) -> list[Transition]:
        """Move the world `steps` steps on; returns the status changes, in order."""
        if steps < 0:
            raise ValueError("steps must be >= 0")
        changed: list[Transition] = []
        for _ in range(steps):
            self._lifecycle.advance(self._batches.values(), changed)
        return changed

    def set_call(self, batch_id: str, call_id: str, **fields: Any) -> None:
        """Edit a call directly: any item field but ``call_id``, or a new field.

        Values are stored as their JSON round trip. A new ``status`` is recorded as
        a `Transition` and cancels the call's scheduled work; the lifecycle then goes
        on from it (terminal and unknown statuses stay put). Timestamps are not filled
        in for a forced status.
        """
        batch = self._batch(batch_id)
        call = batch.call(call_id)
        values = {name: orjson.loads(orjson.dumps(value)) for name, value in fields.items()}
        status = values.pop("status", call.status)
        if not isinstance(status, str) or not status:
            raise ValueError("status must be a non-empty string")
        call.own_metadata()
        for name, value in values.items():
            if name in ITEM_FIELDS:
                setattr(call, name, value)
            else:
                call.extra = {**(call.extra or {}), name: value}
        if "external_id" in values:
            batch.external_ids_changed()
        if status != call.status:
            self._lifecycle.force_status(batch, call, status)
        batch.touch(call)

    def history(self, batch_id: str, call_id: str) -> list[tuple[int, str]]:
        """``(step, status)`` for every status the call has had, starting with its first."""
        batch = self._batch(batch_id)
        call = batch.call(call_id)
        return list(call.history or [(batch.created_step, PENDING)])

    def transitions(self) -> list[Transition]:
        """Every status change so far, in order."""
        return list(self._lifecycle.transitions)

    def spans(self) -> list[StatusSpan]:
        """Every status every call has held, with its start and end on the clock.

        Per call in order; the first span is the pending the call was created in,
        the last one has ``end=None``. Built from `transitions`, so forced changes
        (`set_call`) are included.
        """
        current: dict[tuple[str, str], tuple[str, float]] = {}
        for batch in self._batches.values():
            for call in batch.calls:
                current[(batch.batch_id, call.call_id)] = (PENDING, batch.created_at)
        out: list[StatusSpan] = []
        for t in self._lifecycle.transitions:
            key = (t.batch_id, t.call_id)
            status, start = current[key]
            out.append(StatusSpan(t.batch_id, t.call_id, status, start, t.at))
            current[key] = (t.status, t.at)
        for (batch_id, call_id), (status, start) in current.items():
            out.append(StatusSpan(batch_id, call_id, status, start, None))
        out.sort(key=lambda span: (span.batch_id, span.call_id, span.start))
        return out

    def outages(self, until: float | None = None) -> list[tuple[float, float]]:
        """The outage windows of the current `faults` up to `until` (default: now), as
        ``(start, end)`` clock readings."""
        elapsed = (self.clock() if until is None else until) - self.started_at
        return [
            (self.started_at + start, self.started_at + end)
            for start, end in self.faults.outages(elapsed)
        ]

    def in_outage(self) -> bool:
        """Whether the API is down right now (see `FaultConfig`)."""
        return self.faults.in_outage(self.clock() - self.started_at)

    def reorder(self, batch_id: str, rng: random.Random, share: float) -> None:
        """Change the batch's served order for good: `share` of its items trade places."""
        self._batch(batch_id).reorder(rng, share)

    def is_finished(self, batch_id: str | None = None) -> bool:
        """True when every call (of one batch, or of all) is terminal and nothing is
        scheduled: no redial and no late field update pending. Nothing changes after."""
        batches = self._batches.values() if batch_id is None else [self._batch(batch_id)]
        return all(batch.open == 0 and batch.followups == 0 for batch in batches)

    def calls(self, batch_id: str) -> list[dict[str, Any]]:
        """The batch's current items, exactly as the API returns them, in creation order."""
        return [orjson.loads(item) for item in self._batch(batch_id).encoded_in_creation_order()]

    # -- used by the HTTP layer -------------------------------------------------
    def has_batch(self, batch_id: str) -> bool:
        """Whether the batch exists (the API answers 404 otherwise)."""
        return batch_id in self._batches

    def count(
        self, batch_id: str, *, status: str | None = None, external_id: str | None = None
    ) -> int:
        """How many calls of the batch match the filters (the API's ``total``)."""
        return self._batch(batch_id).count(status, external_id)

    def encoded_items(
        self,
        batch_id: str,
        *,
        status: str | None = None,
        external_id: str | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> list[bytes]:
        """The JSON bytes of the matching items ``[start:stop]``, encoded once per change."""
        return self._batch(batch_id).encoded_items(status, external_id, start, stop)

    def served_ids(
        self,
        batch_id: str,
        *,
        status: str | None = None,
        external_id: str | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> list[str]:
        """The call ids `encoded_items` answers for the same arguments (with
        ``config.record_served``; empty otherwise: a product simulator keeps nothing)."""
        if not self.config.record_served:
            return []
        return self._batch(batch_id).call_ids(status, external_id, start, stop)

    def record_served(self, batch_id: str, call_ids: list[str]) -> None:
        """Note that these calls reached a client now: `served` holds, per (batch,
        call), the clock readings of every answer that carried it (what a poller could
        possibly have seen), for test checkers."""
        now = self.clock()
        for call_id in call_ids:
            self.served.setdefault((batch_id, call_id), []).append(now)

    def record_request(self, received: float, path: str, status: int) -> None:
        """Append to `request_log`, keeping at most ``config.request_log_max`` entries."""
        log = self.request_log
        log.append((received, path, status))
        if len(log) > self.config.request_log_max:
            # Dropping the older half at once keeps trimming amortised O(1).
            del log[: len(log) // 2]

    # -- internals --------------------------------------------------------------
    def _batch(self, batch_id: str) -> BatchRecord:
        try:
            return self._batches[batch_id]
        except KeyError:
            raise KeyError(f"no batch {batch_id!r}") from None
