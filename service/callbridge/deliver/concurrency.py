"""How many requests a subscription sends at once: a limit that follows the receiver.

Pure, no I/O: the deliverer feeds it one sample per answered attempt (`observe`) and
asks it how many requests may run (`limit`) and when a request has run so long that
it no longer counts (`detach_after_s`).

The design, in the family of TCP Vegas and the gradient limiters (Envoy's adaptive
concurrency, Netflix's concurrency-limits), written for webhook receivers:

* **Windows.** Samples are taken in windows of about one limit's worth of answers (at
  least `_MIN_WINDOW`, at most `_WINDOW_S` long). A window's latency is the median of
  its successful answers and timeouts: the median ignores the few requests a receiver
  hangs, which are the detach rule's business, not the limit's.
* **Unloaded latency.** The lowest window median of the last `_HORIZON` windows: a
  receiver that became slower for good is learnt again once its fast windows are
  that old.
* **Latency climbs -> halve.** A window whose median is past both `tolerance` times
  the unloaded latency and the unloaded latency plus `headroom_s` halves the limit:
  the receiver queues our requests, more at once would only make each slower. Halving
  (not a proportional cut) takes the limit back under the receiver's capacity once a
  cycle, so the unloaded latency keeps being measured; a cut in proportion hovers
  above capacity, where every window looks a little slower than the last and the
  estimate creeps up with it. The absolute headroom keeps a receiver answering in
  1 ms from being throttled for answering in 4 (a queue of microseconds is not a
  receiver at its capacity, and the bridge's own event loop adds that much).
* **Errors come -> lower.** When the share of answers that say "overloaded" (5xx, 429,
  timeouts; not 4xx, which are about a payload) averaged over recent windows passes
  `_ERROR_SHARE`, the limit is cut by a quarter. A receiver failing a few requests at
  random stays well under it.
* **Otherwise -> raise.** From the floor, doubling per window while answers come as
  fast as unloaded (a start, or a restart after an outage: the backlog must drain
  fast), then 10 % (at least one) per window.

Between `floor` and `ceiling` (the subscription's ``max_in_flight``, still enforced
fleet-wide by the claim script).
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field
from typing import Literal

# Why the limit moved last (a metric label).
Reason = Literal["start", "increase", "latency", "errors", "restart"]

_MIN_WINDOW = 8
_WINDOW_S = 1.0
_HORIZON = 30  # windows the unloaded latency is the minimum of
_ERROR_SHARE = 0.25
_ERROR_SMOOTHING = 0.3
_INCREASE = 0.10
_SLOW_START_EXIT = 1.1
# A request is detached after this many times the unloaded latency (at least
# `_DETACH_MIN_S`): far past what the receiver takes when it answers at all.
_DETACH_FACTOR = 8.0
_DETACH_MIN_S = 0.5


@dataclass(slots=True)
class AdaptiveLimit:
    """The concurrency limit of one subscription on this replica."""

    ceiling: int
    floor: int = 1
    tolerance: float = 1.5
    headroom_s: float = 0.025
    value: float = 0.0
    slow_start: bool = True
    unloaded_s: float | None = None
    error_share: float = 0.0
    reason: Reason = "start"
    _samples: list[float] = field(default_factory=list)
    _answers: int = 0
    _errors: int = 0
    _window_started: float | None = None
    _cut_at: float = float("-inf")
    # The last windows' medians (the unloaded latency is their minimum).
    recent: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=_HORIZON)
    )

    def __post_init__(self) -> None:
        self.floor = max(1, min(self.floor, self.ceiling))
        if self.value <= 0:
            # From the floor: the first windows are the unloaded latency (starting at
            # the ceiling against a small receiver would take its queue for its speed).
            self.value = float(self.floor)

    @property
    def limit(self) -> int:
        return max(self.floor, min(self.ceiling, int(self.value)))

    def restart(self) -> None:
        """An outage ended: ramp up from the floor again, doubling (the backlog waits)."""
        self.value = float(self.floor)
        self.slow_start = True
        self.error_share = 0.0
        self.reason = "restart"
        self._reset_window(None)

    def observe(
        self,
        *,
        latency_s: float,
        ok: bool,
        overloaded: bool,
        now: float,
        own_delay_s: float = 0.0,
    ) -> Reason | None:
        """One answered attempt: `ok` a 2xx, `overloaded` a 5xx, 429 or timeout (its
        `latency_s` the timeout). `own_delay_s`: how late the bridge's own event loop
        runs now; the answer may have waited that long for us, which says nothing about
        the receiver, so it is taken off (a bridge busy with a flood would otherwise
        throttle a receiver that keeps up). Returns why the limit moved, when a window
        closed and moved it."""
        latency_s = max(0.0, latency_s - own_delay_s) if ok else latency_s
        if now - latency_s < self._cut_at:
            # Sent before the last cut, at the old concurrency: judged by it, the window
            # after a cut would cut again, all the way down to the floor.
            return None
        if self._window_started is None:
            self._window_started = now
        self._answers += 1
        if overloaded:
            self._errors += 1
        if ok or (overloaded and latency_s > 0 and not self._is_fast_error(latency_s)):
            self._samples.append(latency_s)
        # While ramping up, a window is one round of the limit (2 answers at least): 1 to
        # 64 in seven rounds. Then about one limit's worth, 8 at least, for a steadier
        # median.
        least = max(2, self.limit) if self.slow_start else max(_MIN_WINDOW, self.limit)
        if self._answers < least and now - self._window_started < _WINDOW_S:
            return None
        if self._answers < 2:
            return None
        return self._close_window(now)

    def detach_after_s(self, timeout_s: float) -> float | None:
        """How long a request may run before it stops counting against the limit (its
        own timeout still runs); None when requests are never detached: nothing is
        known of the receiver yet, or it is slow across the board (then the limit, not
        the detach rule, must answer)."""
        if self.unloaded_s is None or not self.recent:
            return None
        if self.recent[-1] > self._slow_above(self.unloaded_s):
            return None
        after = max(_DETACH_MIN_S, _DETACH_FACTOR * self.unloaded_s)
        return after if after < timeout_s else None

    # -- windows ------------------------------------------------------------------

    def _is_fast_error(self, latency_s: float) -> bool:
        # A 5xx answered at once measures nothing about how loaded the receiver is.
        return self.unloaded_s is not None and latency_s < self.unloaded_s

    def _slow_above(self, unloaded_s: float) -> float:
        return max(self.tolerance * unloaded_s, unloaded_s + self.headroom_s)

    def _close_window(self, now: float) -> Reason | None:
        share = self._errors / self._answers
        self.error_share += _ERROR_SMOOTHING * (share - self.error_share)
        median = statistics.median(self._samples) if self._samples else None
        self._reset_window(now)
        before = self.limit
        moved: Reason | None = None
        if median is not None:
            self.recent.append(median)
            self.unloaded_s = min(self.recent)
        if self.error_share > _ERROR_SHARE:
            self.value = max(self.floor, self.value * 0.75)
            self.slow_start, moved, self._cut_at = False, "errors", now
        elif median is not None and median > self._slow_above(self.unloaded_s or median):
            self.value = max(self.floor, self.value * 0.5)
            self.slow_start, moved, self._cut_at = False, "latency", now
        elif self.value < self.ceiling:
            if self.slow_start and median is not None and self.unloaded_s is not None:
                # Doubling stops as soon as answers slow down at all (before the
                # receiver's queue shows as a cut), so the ramp overshoots little.
                self.slow_start = median <= _SLOW_START_EXIT * self.unloaded_s
            grown = self.value * 2 if self.slow_start else self.value * (1 + _INCREASE)
            self.value = min(self.ceiling, max(self.value + 1, grown))
            moved = "increase"
        if moved is None or self.limit == before:
            return None
        self.reason = moved
        return moved

    def _reset_window(self, now: float | None) -> None:
        self._samples = []
        self._answers = 0
        self._errors = 0
        self._window_started = now
