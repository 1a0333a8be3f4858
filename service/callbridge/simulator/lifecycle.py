"""The simulator's lifecycle rules: how calls move from pending to an ending, step by step.

Each step, every call whose dwell time (1-4 steps) is up moves on, the weights of
``_OUTCOMES`` deciding where (most calls complete)::

    pending          -> queued | cancelled | failed
    queued           -> ringing | cancelled | failed
    ringing          -> answered | no_answer | busy | failed
    answered         -> in_progress | failed
    in_progress      -> completed | failed
    no_answer, busy  -> queued   (a redial: redial_probability, at most max_redials)

A call gets ``started_at`` when answered, ``ended_at`` and ``duration_seconds`` when
it completes or fails after the answer; ``late_update_probability`` of completed
calls get ``ended_at``/``duration_seconds`` (or a metadata edit) one step later.
An unanswered attempt (no_answer, busy) gets ``started_at`` (when it began ringing),
``ended_at`` and ``duration_seconds: 0``; a redial re-queues the call with the three
back to null, as a platform does when it starts a new attempt.

Calls leave ``pending`` in creation order while fewer than ``concurrency`` calls of
their batch hold a dialling slot (queued to in_progress), so a batch lasts many
steps; redials re-enter ``queued`` without waiting for a slot. Timestamps come from
a fixed epoch plus the step, so runs are reproducible. With ``config.timing`` (the
wall-clock mode) dwell times are drawn in seconds per status instead of 1-4 steps.

Every `Transition` carries ``at``, the simulator clock's reading when it happened:
the ground truth of how long each status was visible.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from callbridge.models import (
    ANSWERED,
    BUSY,
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    NO_ANSWER,
    PENDING,
    QUEUED,
    RINGING,
    TERMINAL_STATUSES,
)
from callbridge.simulator.calls import COMPANIES, BatchRecord, CallRecord
from callbridge.simulator.config import SimulatorConfig

__all__ = ["LEGAL_TRANSITIONS", "Lifecycle", "StatusSpan", "Transition"]

# Simulated clock: a fixed epoch so timestamps are reproducible run to run.
SIM_EPOCH = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
SIM_SECONDS_PER_STEP = 15
MIN_DWELL_STEPS = 1
MAX_DWELL_STEPS = 4

# What a status may become when its dwell time is up, with weights.
_OUTCOMES: Mapping[str, tuple[tuple[str, ...], tuple[float, ...]]] = MappingProxyType(
    {
        PENDING: ((QUEUED, CANCELLED, FAILED), (0.97, 0.02, 0.01)),
        QUEUED: ((RINGING, FAILED, CANCELLED), (0.95, 0.03, 0.02)),
        RINGING: ((ANSWERED, NO_ANSWER, BUSY, FAILED), (0.72, 0.15, 0.08, 0.05)),
        ANSWERED: ((IN_PROGRESS, FAILED), (0.98, 0.02)),
        IN_PROGRESS: ((COMPLETED, FAILED), (0.97, 0.03)),
    }
)
_REDIALLABLE = frozenset({NO_ANSWER, BUSY})
# Calls occupying a dialling slot; each has exactly one lifecycle step scheduled.
_DIALLING = frozenset({QUEUED, RINGING, ANSWERED, IN_PROGRESS})

LEGAL_TRANSITIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        **{status: frozenset(nexts) for status, (nexts, _) in _OUTCOMES.items()},
        **{status: frozenset({QUEUED}) for status in _REDIALLABLE},
    }
)
"""Every status change the lifecycle can make (`Simulator.set_call` may force any)."""

# Kinds of scheduled work.
_NEXT, _REDIAL, _LATE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Transition:
    """One status change of one call, at simulator step `step` (ground truth for tests).

    ``at`` is the simulator clock's reading when it happened; it is left out of
    comparisons, so two runs of one config still compare equal.
    """

    batch_id: str
    call_id: str
    previous_status: str
    status: str
    step: int
    at: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class StatusSpan:
    """How long one call held one status, on the simulator clock (ground truth).

    ``end`` is None while the call still holds it. The API served the status to any
    request received in ``[start, end)`` (outages aside).
    """

    batch_id: str
    call_id: str
    status: str
    start: float
    end: float | None

    def duration(self, now: float) -> float:
        return (self.end if self.end is not None else now) - self.start


# (batch, call, call.gen when planned, kind)
_Work = tuple[BatchRecord, CallRecord, int, int]


class Lifecycle:
    """Moves the calls of batches along the lifecycle; owns the step counter and the record
    of transitions. Draws from its own seeded RNG only, so it is deterministic."""

    def __init__(
        self, config: SimulatorConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self.step = 0
        self.transitions: list[Transition] = []
        self._rng = random.Random(f"lifecycle:{config.seed}")
        self._schedule: dict[int, list[_Work]] = {}

    def advance(self, batches: Iterable[BatchRecord], changed: list[Transition]) -> None:
        """Take one step; append the status changes to `changed`."""
        self.step += 1
        for batch, call, gen, kind in self._schedule.pop(self.step, ()):
            if call.gen != gen:
                continue
            if kind == _NEXT:
                self._progress(batch, call, changed)
                continue
            call.followup = False
            batch.followups -= 1
            if kind == _REDIAL:
                # A new attempt: the platform forgets the last one's times.
                call.started_at = call.ended_at = call.duration_seconds = None
                call.started_s = call.ring_s = None
                self._set_status(batch, call, QUEUED, changed)
                self._plan(batch, call, _NEXT)
            else:
                self._apply_late_update(batch, call)
        for batch in batches:
            self._start_calls(batch, changed)

    def force_status(self, batch: BatchRecord, call: CallRecord, status: str) -> None:
        """Set a status from outside: cancel the call's scheduled work and go on from it."""
        call.gen += 1
        call.late_end_s = None
        if call.followup:
            call.followup = False
            batch.followups -= 1
        self._set_status(batch, call, status, [])
        if status in _DIALLING:
            self._plan(batch, call, _NEXT)
        elif status == PENDING:
            batch.repending.append((call, call.gen, self.step))

    def _set_status(
        self, batch: BatchRecord, call: CallRecord, status: str, out: list[Transition]
    ) -> None:
        previous = call.status
        batch.open += (status not in TERMINAL_STATUSES) - (previous not in TERMINAL_STATUSES)
        batch.dialling += (status in _DIALLING) - (previous in _DIALLING)
        call.status = status
        if call.history is None:
            call.history = [(batch.created_step, PENDING)]
        call.history.append((self.step, status))
        change = Transition(
            batch.batch_id, call.call_id, previous, status, self.step, self._clock()
        )
        self.transitions.append(change)
        out.append(change)
        batch.touch(call)

    def _plan(self, batch: BatchRecord, call: CallRecord, kind: int) -> None:
        timing = self.config.timing
        if kind == _LATE:
            due = self.step + 1
        elif timing is not None:
            due = self.step + timing.dwell_steps(call.status, self._rng.random())
        else:
            due = self.step + self._rng.randint(MIN_DWELL_STEPS, MAX_DWELL_STEPS)
        if kind != _NEXT:
            call.followup = True
            batch.followups += 1
        self._schedule.setdefault(due, []).append((batch, call, call.gen, kind))

    def _draw(self, status: str) -> str:
        statuses, weights = _OUTCOMES[status]
        return self._rng.choices(statuses, weights)[0]

    def _start_calls(self, batch: BatchRecord, out: list[Transition]) -> None:
        while batch.dialling < self.config.concurrency:
            call = self._next_pending(batch)
            if call is None:
                return
            status = self._draw(PENDING)
            self._set_status(batch, call, status, out)
            if status == QUEUED:
                self._plan(batch, call, _NEXT)

    def _next_pending(self, batch: BatchRecord) -> CallRecord | None:
        """Take the next call allowed to leave pending (each pending lasts a step at least)."""
        calls = batch.calls
        while batch.next_new < len(calls):
            call = calls[batch.next_new]
            if call.gen == 0 and call.status == PENDING:
                if batch.created_step >= self.step:
                    return None
                batch.next_new += 1
                return call
            batch.next_new += 1  # set_call moved it out of its first pending
        repending = batch.repending
        while repending:
            call, gen, since = repending[0]
            if call.gen != gen or call.status != PENDING:
                repending.popleft()  # set_call moved it again
            elif since >= self.step:
                return None
            else:
                repending.popleft()
                return call
        return None

    def _progress(self, batch: BatchRecord, call: CallRecord, out: list[Transition]) -> None:
        status = self._draw(call.status)
        if status == RINGING:
            call.ring_s = self._now_s()
        elif status in _REDIALLABLE and call.ring_s is not None:
            call.started_at = _iso(call.ring_s)
            call.ended_at = _iso(max(call.ring_s, self._now_s()))
            call.duration_seconds = 0
        elif status == ANSWERED:
            call.started_s = self._moment()
            call.started_at = _iso(call.started_s)
        elif status in (COMPLETED, FAILED) and call.started_s is not None:
            end_s = self._moment()
            late = status == COMPLETED and self._rng.random() < self.config.late_update_probability
            if late and self._rng.random() < 0.5:
                call.late_end_s = end_s  # the platform fills the end in one step later
            else:
                self._fill_end(call, end_s)
            if late:
                self._plan(batch, call, _LATE)
        self._set_status(batch, call, status, out)
        if status in _DIALLING:
            self._plan(batch, call, _NEXT)
        elif (
            status in _REDIALLABLE
            and call.redials < self.config.max_redials
            and self._rng.random() < self.config.redial_probability
        ):
            call.redials += 1
            self._plan(batch, call, _REDIAL)

    def _apply_late_update(self, batch: BatchRecord, call: CallRecord) -> None:
        if call.late_end_s is not None:
            self._fill_end(call, call.late_end_s)
            call.late_end_s = None
        elif isinstance(metadata := call.own_metadata(), dict):
            # A CRM sync rewrites the company after the call: same status, new content.
            others = [c for c in COMPANIES if c != metadata.get("Company Name")]
            call.metadata = {**metadata, "Company Name": self._rng.choice(others)}
        batch.touch(call)

    @staticmethod
    def _fill_end(call: CallRecord, end_s: int) -> None:
        call.ended_at = _iso(end_s)
        if call.started_s is not None:
            call.duration_seconds = end_s - call.started_s

    def _moment(self) -> int:
        """Seconds since the epoch for an event in the current step, spread within it."""
        spread = self._rng.randrange(SIM_SECONDS_PER_STEP)
        if self.config.timing is not None:
            return self._now_s()
        return self.step * SIM_SECONDS_PER_STEP + spread

    def _now_s(self) -> int:
        """Seconds since the epoch at the start of the current step (draws nothing)."""
        if self.config.timing is not None:
            return int(self.step * self.config.timing.step_seconds)
        return self.step * SIM_SECONDS_PER_STEP


def _iso(seconds: int) -> str:
    return (SIM_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
