"""One subscription's lane on this replica: its slots, what runs in them, its loop state.

A slot is held from the claim until the attempt's outcome is written. An attempt that
has run far longer than the receiver usually takes is *detached*: it keeps running
until its own timeout, but its slot goes back, so a receiver that hangs a few requests
does not stall the rest of the backlog behind them (the claim script likewise stops
counting it fleet-wide, `claim.lua`'s detach_ms).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from callbridge.config import SubscriptionSettings
from callbridge.deliver.concurrency import AdaptiveLimit, Reason
from callbridge.deliver.outcomes import Finished
from callbridge.deliver.retry import AttemptResult

AttemptKey = tuple[str, str]  # (event id, claim token)
# Detached attempts per subscription at most, in multiples of its max_in_flight.
_MAX_DETACHED_FACTOR = 4


@dataclass(slots=True)
class Lane:
    settings: SubscriptionSettings
    keys: list[bytes]
    wake: asyncio.Event
    limiter: AdaptiveLimit
    # Slots held: claimed deliveries whose outcome is not written yet, less the
    # detached ones (see `_detach_overdue`).
    inflight: int = 0
    # Attempts running and counted, (event id, claim token) -> start (monotonic),
    # oldest first; those detached moved to `detached`.
    running: dict[AttemptKey, float] = field(default_factory=dict)
    detached: set[AttemptKey] = field(default_factory=set)
    # A recovery's promotion is due or under way (promote.lua).
    promoting: bool = False
    next_sweep: float = 0.0
    next_depth: float = 0.0
    next_ops: float = 0.0
    # Operators' recovery jobs still running (`store.recovery`), looked up now and then.
    jobs: list[str] = field(default_factory=list)
    next_jobs: float = 0.0
    next_job_step: float = 0.0
    # Attempts finished since the last step, written by the next one.
    finished: list[Finished] = field(default_factory=list)
    # Whether a claim may find something: false once one came back short, true
    # again when work is enqueued or the idle period passed.
    maybe_due: bool = True
    # Steps running (the loop keeps a few in flight) and no new one before this
    # (monotonic) after a step failed.
    steps: int = 0
    retry_at: float = 0.0
    # (claim token, slots it holds) of a step that failed: it may have claimed, and
    # the next claiming step sends the token again (see `Deliverer._step`).
    lost_claim: tuple[str, int] | None = None

    def take_lost_claim(self) -> tuple[str, int]:
        """The lost claim to send again, if any (then forgotten): ("", 0) when none."""
        lost, self.lost_claim = self.lost_claim, None
        return lost or ("", 0)

    @classmethod
    def of(cls, sub: SubscriptionSettings) -> Lane:
        ceiling = sub.max_in_flight
        floor = 1 if sub.adaptive_concurrency else ceiling
        return cls(sub, sub.signing_keys, asyncio.Event(), AdaptiveLimit(ceiling, floor))

    def observe(self, result: AttemptResult, now: float, own_delay_s: float) -> Reason | None:
        """Feed an answered attempt to the limit (`AdaptiveLimit.observe`): fast
        failures that say nothing of the receiver's load are left out."""
        if not (result.ok or result.overloaded):
            return None
        return self.limiter.observe(
            latency_s=result.duration_s,
            ok=result.ok,
            overloaded=result.overloaded,
            now=now,
            own_delay_s=own_delay_s,
        )

    def claimable(self, held: int, free: int) -> tuple[int, int]:
        """How many a step may claim: of the `held` slots its written outcomes free, and
        of the replica's `free` ones. Never more in flight than the limit as it is now
        (it may have been cut since these slots were taken; claiming one per outcome
        written kept a receiver at the old concurrency)."""
        room = max(0, self.limiter.limit - (self.inflight - held))
        reuse = min(held, room)
        return reuse, max(0, min(room - reuse, free))

    def start(self, key: AttemptKey, now: float) -> None:
        self.running[key] = now

    def finish(self, key: AttemptKey) -> bool:
        """An attempt ended: whether it had been detached (its slot given back then)."""
        if self.running.pop(key, None) is not None:
            return False
        self.detached.discard(key)
        return True

    def detach_due(self, now: float) -> tuple[int, float | None]:
        """`detach_overdue` at the limiter's threshold, at most 4 x max_in_flight
        detached at once; (0, None) while the limiter detaches nothing."""
        s = self.settings
        after = self.limiter.detach_after_s(s.timeout_seconds)
        if after is None:
            return 0, None
        n, wait = self.detach_overdue(after, now, cap=_MAX_DETACHED_FACTOR * s.max_in_flight)
        if n:
            # Their slots are free here and no longer counted by the claim script: a
            # claim that came back short while they held them (the fleet-wide bound,
            # or half of it while the endpoint is paced) may find room now. Without
            # this the loop waited out its idle period with deliveries due.
            self.maybe_due = True
        return n, wait

    def detach_overdue(self, after_s: float, now: float, *, cap: int) -> tuple[int, float | None]:
        """Detach the attempts running for `after_s` or more (at most `cap` detached at
        once: sockets stay bounded whatever hangs). Returns how many were detached and
        the seconds until the next running one would be."""
        overdue: list[AttemptKey] = []
        wait: float | None = None
        for key, started in self.running.items():  # oldest first
            if now - started < after_s:
                wait = started + after_s - now
                break
            if len(self.detached) + len(overdue) >= cap:
                break
            overdue.append(key)
        for key in overdue:
            del self.running[key]
            self.detached.add(key)
        return len(overdue), wait
