"""Where a receiver's queue begins (the *knee*), and when to try it again.

Pure, part of the adaptive limit (`concurrency.py`): the lowest limit seen queueing is
remembered; the limit grows back to just under it and stays there. The knee itself is
tried again (one window, a *probe*) only after `PROBE_GAP_S` and `PROBE_ANSWERS`, both
doubled for every probe that found a queue again (at most `PROBE_BACKOFF` times, and
`PROBE_GAP_MAX_S`), and reset by one that did not — then the receiver grew, and the
knee is forgotten. A receiver limited to N is so served at N with a few late answers a
minute, instead of being pushed past N every few windows as additive increase does.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBE_GAP_S = 5.0
PROBE_ANSWERS = 256
PROBE_BACKOFF = 16
PROBE_GAP_MAX_S = 60.0


@dataclass(slots=True)
class Knee:
    # The lowest limit seen queueing and not probed clean since (None: not known).
    at: int | None = None
    # The window now running is a probe (the limit is at the knee).
    probing: bool = False
    # The next probe not before this (monotonic) nor before this many more answers.
    probe_at: float = 0.0
    probe_left: int = 0
    backoff: int = 1

    def answered(self) -> None:
        self.probe_left = max(0, self.probe_left - 1)

    def found(self, limit: int, now: float) -> None:
        """A window at `limit` queued: that is the knee now."""
        if self.probing:
            self.backoff = min(PROBE_BACKOFF, self.backoff * 2)
        self.at = limit
        self.probe_at = now + min(PROBE_GAP_MAX_S, PROBE_GAP_S * self.backoff)
        self.probe_left = PROBE_ANSWERS * self.backoff

    def cleared(self) -> None:
        """A probe's window did not queue: the receiver grew, or the knee was chance."""
        self.at, self.backoff = None, 1

    def cap(self, limit: int, now: float, ceiling: int) -> float:
        """How far the limit may grow now: under the knee, or to it when a probe is due."""
        if self.at is None:
            return float(ceiling)
        if limit + 1 < self.at:
            return float(self.at - 1)
        if now >= self.probe_at and self.probe_left <= 0:
            return float(self.at)
        return float(limit)

    def note(self, limit: int) -> None:
        """The limit after a window: the next window probes when it is at the knee."""
        self.probing = self.at is not None and limit >= self.at
