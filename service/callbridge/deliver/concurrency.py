"""How many requests a subscription sends at once: a limit that follows the receiver.

Pure, no I/O: the deliverer feeds it one sample per answered attempt (`observe`) and
asks it how many requests may run (`limit`) and when a request has run so long that
it no longer counts (`detach_after_s`).

The design, in the family of TCP Vegas, BBR's probing and the gradient limiters
(Envoy's adaptive concurrency, Netflix's concurrency-limits), written for webhook
receivers, whose latency is the one thing we can see of their load:

* **Windows.** Samples are taken in windows of about one limit's worth of answers (at
  least `_MIN_WINDOW`, `_NOISY_WINDOW` for a receiver slow by itself now and then;
  at most `_WINDOW_S` or three unloaded latencies long), each judged at one limit:
  answers to requests sent before the limit last moved are left out (after a cut,
  for one unloaded latency more: sends decided before it).
* **Unloaded latency.** The lowest window median of the last `_HORIZON` windows. An
  answer is *slow* past both `tolerance` times it and it plus `headroom_s` (a
  receiver answering in 1 ms is not at its capacity for answering in 4: the bridge's
  own event loop adds that much). When the fast windows age out and the estimate
  would rise, one window at half the limit (a *dip*, BBR's ProbeRTT) checks it
  first: a receiver that slows down in proportion to the load is never seen
  unloaded at the level the limit cruises at, and the estimate would creep up.
* **Queueing shows as a share of slow answers.** A receiver serving N at once keeps
  the (N+1)th waiting: one answer in N+1 comes a whole service time late while the
  median does not move. So a window is judged by its share of slow answers against
  the share the receiver shows on its own (smoothed over windows without a queue)
  plus two standard errors for a window this size: with no slow answers of its
  own, one late answer is enough. Requests running far past the unloaded latency
  (hung: the detach rule's business) are not counted.
* **Queueing -> back under the knee.** The limit drops by the queue it measured (the
  excess share x the limit; when most answers queued, by Little's law to limit x
  typical latency / mean latency, Vegas's estimate), and the limit it queued at is
  remembered (the *knee*, `knee.py`: the limit stays just under it and tries it again
  rarely). Two cuts in a row after which
  answers are neither less often slow nor faster were not for a queue: they are
  undone and the receiver's own share learnt (its latency varies by itself; one such
  cut is not enough to tell, as other replicas sharing the receiver may not have cut
  yet). A receiver slow by itself now and then (own share past `_NOISY_SHARE`) gets
  no knee: a chance window looks the same as a queue there.
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
import math
import statistics
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from callbridge.deliver.knee import Knee

# Why the limit moved last (a metric label).
Reason = Literal["start", "increase", "latency", "errors", "restart"]


class _Queue(NamedTuple):
    """What a window that shows a queue saw of its answers (hung ones left out)."""

    share: float  # slow
    median: float
    mean: float


class _Cut(NamedTuple):
    """The last cut for a queue: what its window saw; the limit and knee before it, or
    before the cut it followed without helping (`strikes` such cuts in a row)."""

    seen: _Queue
    value: float
    knee: int | None
    strikes: int = 0


_MIN_WINDOW = 8
_NOISY_WINDOW = 32
_NOISY_SHARE = 0.02
_WINDOW_S = 1.0
_CUT_GRACE_S = 0.05
_WINDOW_ROUNDS = 3  # unloaded latencies a window lasts at least, when it is longer
_HORIZON = 30  # windows the unloaded latency is the minimum of
_ERROR_SHARE = 0.25
_ERROR_SMOOTHING = 0.3
_SLOW_SMOOTHING = 0.2
# A cut after which the share of slow answers and the median stay above this much
# of what they were did not help.
_UNHELPED = 0.75
_UNHELPED_SMOOTHING = 0.5
_INCREASE = 0.10
_SLOW_START_EXIT = 1.1
# The unloaded latency may rise this much (the fast windows aged out) before a dip
# checks it.
_DIP_RISE = 1.1
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
    # The share of slow answers the receiver shows without queueing (see above).
    slow_share: float = 0.0
    reason: Reason = "start"
    _samples: list[float] = field(default_factory=list)
    _answers: int = 0
    _errors: int = 0
    _window_started: float | None = None
    _moved_at: float = float("-inf")
    _knee: Knee = field(default_factory=Knee)
    # The limit a dip (one window at half of it, see `_close_window`) returns to.
    _dip_from: int | None = None
    # The unloaded latency as a dip (or a lower window) last confirmed it: it may
    # creep up a little at a time, each step under `_DIP_RISE`.
    _checked_s: float | None = None
    # Until the next window is judged.
    _last_cut: _Cut | None = None
    # The median latency of windows without a queue, smoothed.
    _typical_s: float | None = None
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

    @property
    def knee(self) -> int | None:
        """The lowest limit seen queueing and not probed clean since."""
        return self._knee.at

    def restart(self) -> None:
        """An outage ended: ramp up from the floor again, doubling (the backlog waits),
        up to under the knee if one is known (the receiver is likely the same)."""
        self.value = float(self.floor)
        self.slow_start = True
        self.error_share = 0.0
        self.reason = "restart"
        # A dip or a cut under judgement would otherwise restore the limit from before.
        self._knee.probing, self._dip_from, self._last_cut = False, None, None
        self._reset_window()

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
        self._knee.answered()
        if now - latency_s <= self._moved_at:
            # Sent before the limit last moved, at the old concurrency: judged by it,
            # the window after a cut would cut again, all the way down to the floor,
            # and a probe would be judged by answers sent under the knee.
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
        least = max(2, self.limit) if self.slow_start else max(self._min_window(), self.limit)
        if self._answers < least and now - self._window_started < self._window_s():
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
        after = self._hung_after(self.unloaded_s)
        return after if after < timeout_s else None

    # -- windows ------------------------------------------------------------------

    def _min_window(self) -> int:
        # A receiver slow now and then by itself needs more answers for its share of
        # slow ones to tell a queue of one from chance.
        return _NOISY_WINDOW if self.slow_share > _NOISY_SHARE else _MIN_WINDOW

    def _window_s(self) -> float:
        # Long enough for the answers of one round that queued behind another.
        return max(_WINDOW_S, _WINDOW_ROUNDS * (self.unloaded_s or 0.0))

    def _is_fast_error(self, latency_s: float) -> bool:
        # A 5xx answered at once measures nothing about how loaded the receiver is.
        return self.unloaded_s is not None and latency_s < self.unloaded_s

    def _slow_above(self, unloaded_s: float) -> float:
        return max(self.tolerance * unloaded_s, unloaded_s + self.headroom_s)

    @staticmethod
    def _hung_after(unloaded_s: float) -> float:
        return max(_DETACH_MIN_S, _DETACH_FACTOR * unloaded_s)

    def _queueing(self, samples: list[float]) -> _Queue | None:
        """What a window whose share of slow answers passes the receiver's own saw;
        None when it does not (then the window teaches that share) or nothing can be
        said."""
        if self.unloaded_s is None:
            return None
        judged = [s for s in samples if s < self._hung_after(self.unloaded_s)]
        if not judged:
            return None
        slow_above = self._slow_above(self.unloaded_s)
        share = sum(1 for s in judged if s > slow_above) / len(judged)
        median = statistics.median(judged)
        # Two standard errors of the receiver's own share in a window this size, and
        # half an answer: with no slow answers of its own, one is enough.
        own = self.slow_share
        margin = 2 * math.sqrt(own * (1 - own) / len(judged)) + 0.5 / len(judged)
        if share > own + margin:
            return _Queue(share, median, statistics.fmean(judged))
        self.slow_share += _SLOW_SMOOTHING * (share - own)
        self._typical_s = median if self._typical_s is None else self._typical_s
        self._typical_s += _SLOW_SMOOTHING * (median - self._typical_s)
        return None

    def _cut_to(self, limit: int, queue: _Queue) -> float:
        """The limit that ends the queue a window showed."""
        assert self.unloaded_s is not None
        if queue.median > self._slow_above(self.unloaded_s):
            # Most answers queued, maybe for several rounds: by Little's law the
            # receiver serves limit x unqueued latency / latency at once (Vegas's
            # estimate; the unqueued latency is the typical one of windows without a
            # queue: the unloaded one, a minimum, is below it when latency varies).
            return limit * (self._typical_s or self.unloaded_s) / queue.mean
        # A few queued (the limit is just past the knee): as many fewer.
        return limit - max(1, round((queue.share - self.slow_share) * limit))

    def _close_window(self, now: float) -> Reason | None:
        samples = self._samples
        share = self._errors / self._answers
        self.error_share += _ERROR_SMOOTHING * (share - self.error_share)
        median = statistics.median(samples) if samples else None
        self._reset_window()
        before = self.limit
        if self._dip_from is not None:
            # The dip's window: its median is what the receiver takes at half the
            # concurrency; back to where the limit was.
            if median is not None:
                self.recent.append(median)
            self.unloaded_s = self._checked_s = min(self.recent) if self.recent else None
            self.value, self._dip_from = float(self._dip_from), None
            return self._moved(before, now, "increase")
        if median is not None and self._dip_first(median, before):
            return self._moved(before, now, "latency")
        queue = self._queueing(samples)
        last_cut, self._last_cut = self._last_cut, None
        moved: Reason | None = None
        if self.error_share > _ERROR_SHARE:
            self.value = max(self.floor, self.value * 0.75)
            self.slow_start, moved = False, "errors"
        elif queue and last_cut and _unhelped(queue, last_cut.seen) and last_cut.strikes:
            # Two cuts in a row made answers neither less often slow nor faster: they
            # are the receiver's own (a latency that varies by itself), not our queue.
            # Learnt fast and the cuts undone; without this such a receiver's chance
            # slow windows ratcheted the limit (and its knee) down to the floor. (One
            # cut is not enough to tell: other replicas may not have cut yet.)
            self.slow_share += _UNHELPED_SMOOTHING * (queue.share - self.slow_share)
            self.value, self._knee.at = last_cut.value, last_cut.knee
            moved = "increase"
        elif queue:
            if last_cut and _unhelped(queue, last_cut.seen):
                self._last_cut = last_cut._replace(seen=queue, strikes=last_cut.strikes + 1)
            else:
                self._last_cut = _Cut(queue, self.value, self.knee)
            noisy = self.slow_share > _NOISY_SHARE
            self.value = max(self.floor, min(self._cut_to(before, queue), before - 1))
            if not noisy:
                # One late answer among none of its own is a queue for sure: the knee is
                # remembered. A receiver slow by itself now and then gives no such
                # certainty (a chance window looks the same): its limit grows back.
                self._knee.found(before, now)
            self.slow_start, moved = False, "latency"
        elif self._knee.probing:
            # The knee served without queueing: forgotten, the limit grows on.
            self._knee.cleared()
        elif self.value < self.ceiling:
            if self.slow_start and median is not None and self.unloaded_s is not None:
                # Doubling stops as soon as answers slow down at all (before the
                # receiver's queue shows as a cut), so the ramp overshoots little.
                self.slow_start = median <= _SLOW_START_EXIT * self.unloaded_s
            grown = self.value * 2 if self.slow_start else self.value * (1 + _INCREASE)
            cap = self._knee.cap(before, now, self.ceiling)
            self.value = min(cap, max(self.value + 1, grown))
            moved = "increase"
        self._knee.note(self.limit)
        return self._moved(before, now, moved)

    def _dip_first(self, median: float, limit: int) -> bool:
        """Take a window's median into the unloaded latency; True when, instead, a dip
        must check it first (the limit is halved for one window)."""
        self.recent.append(median)
        unloaded = min(self.recent)
        checked = self._checked_s
        if checked is None or unloaded < checked:
            self._checked_s = checked = unloaded
        if limit > self.floor and unloaded > max(
            _DIP_RISE * checked, checked + self.headroom_s / 2
        ):
            # The fast windows aged out. Slower for good, or queued at the level the
            # limit cruises at (a receiver slowing down in proportion to the load is
            # never seen unloaded there, and the estimate would creep up with it):
            # one window at half the limit tells, before the unloaded latency rises.
            self._dip_from = limit
            self.value = max(self.floor, limit // 2)
            return True
        self.unloaded_s = unloaded
        return False

    def _moved(self, before: int, now: float, why: Reason | None) -> Reason | None:
        if why is None or self.limit == before:
            return None
        self._moved_at = now
        if self.limit < before:
            # Requests the deliverer decided to send before the cut may still leave
            # just after it, into the queue the cut is ending: not judged either.
            self._moved_at += max(_CUT_GRACE_S, self.unloaded_s or 0.0)
        self.reason = why
        return why

    def _reset_window(self) -> None:
        # The next window starts at its first answer judged (not now: after a move,
        # answers to what was sent before it do not count, nor the time they take).
        self._samples = []
        self._answers = 0
        self._errors = 0
        self._window_started = None


def _unhelped(queue: _Queue, before: _Queue) -> bool:
    return queue.share > _UNHELPED * before.share and queue.median > _UNHELPED * before.median
