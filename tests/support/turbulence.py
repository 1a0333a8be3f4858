"""The ground-truth checker: what the receiver got, against what the platform really did.

Pure functions over the simulator's ground truth (`Simulator.spans`, its outage
windows) and the receiver's records (`tests.support.flaky.HookRequest`); all times on
one clock (the simulator's; the receiver is given the same one).

The rule
--------
A status is **served twice** when at least two of the platform's successful answers
to the bridge carried the call in that status (the simulator records every answer,
``SimulatorConfig.record_served``): issue 11's rule. Without that record, a status
counts as served twice when it was **visible** for ``2 x T`` (``T`` the poll
interval), visible being the span's length minus its overlap with outage windows.

* **required**: every status served twice, and every call's **final** status (the
  span still open at the end), must arrive as ``call.<status>``. ``pending`` is never
  required (the bridge records it silently). A status that comes back with only
  statuses not served twice in between (ringing, a 0.3 s no_answer and queued,
  ringing again) may look to any poller like one unbroken stretch: such repeats form
  one **occurrence**, required when any part of it is, delivered when any part of it is.
* **invented**: a delivered ``call.<status>`` whose status the call never had before
  the event arrived; **out of order**: a status the call had, but that no placement of
  the call's events (by ``data.sequence``) in the order of its real statuses explains.
  Events are placed on real statuses by a monotone matching (event ``i`` on a span that
  started before the event first arrived, spans in time order) that places as many
  events as possible, then covers as many required statuses as possible; required
  statuses left uncovered are **missing**.
* **chains**: per call, status events in ``data.sequence`` order; the first one's
  ``previous_status`` is null or ``pending`` (recorded silently), every other one's is
  the status of the event before it. ``data.missed_terminal: true`` may mark a redial
  whose terminal status was never visible long enough: it does not excuse a broken
  chain, it must be true (a terminal status really lies between the two real statuses
  the events were placed on), else it counts as a **false marker**.
* **batch.completed**: a batch completes when every call is terminal, and reopens when
  a call is redialled. Each completion visible for ``2 x T``, and the last one, must be
  reported; a shorter one may be (completions apart by a reopen shorter than ``2 x T``
  count as one): per batch, required <= distinct events <= all.
* **bodies**: no ``webhook-id`` arrives with two different bodies, and no two ids
  claim the same (call, sequence).
* **lag**: for every placed status event, from the status's start in the ground truth
  to the first 2xx answer of its id; percentiles by nearest rank.

``only_final=True`` is for subscriptions to final statuses only (large campaigns):
only final statuses are required, and chains are not checked (their previous
statuses name events the subscription never receives).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from callbridge.models import PENDING, TERMINAL_STATUSES
from callbridge.simulator import StatusSpan
from tests.support.flaky import HookRequest
from tests.support.turbulence_report import Missing, Problem, Report, percentile

__all__ = ["Missing", "Problem", "Report", "check", "occurrences", "percentile", "visible_s"]

# Reading the same clock twice in a row can give the same value; no other slack.
_EPSILON_S = 1e-6


def visible_s(start: float, end: float, outages: Iterable[tuple[float, float]]) -> float:
    """Seconds of [start, end) outside every outage window."""
    hidden = sum(max(0.0, min(end, b) - max(start, a)) for a, b in _merged(outages))
    return max(0.0, end - start - hidden)


def _merged(windows: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(windows):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass(frozen=True, slots=True)
class _Event:
    id: str
    seq: int
    status: str
    previous: str | None
    marker: bool
    first_seen: float  # first arrival, any answer
    first_ok: float


def check(
    spans: Iterable[StatusSpan],
    requests: Sequence[HookRequest],
    *,
    poll_interval_s: float,
    outages: Iterable[tuple[float, float]] = (),
    now: float,
    only_final: bool = False,
    served: Mapping[tuple[str, str], Sequence[float]] | None = None,
) -> Report:
    """Judge `requests` against the ground truth `spans`; see the module docstring."""
    report = Report(poll_interval_s)
    outages = _merged(outages)
    need_s = 2 * poll_interval_s
    per_call: dict[tuple[str, str], list[StatusSpan]] = defaultdict(list)
    for span in spans:
        per_call[(span.batch_id, span.call_id)].append(span)

    first_seen: dict[str, HookRequest] = {}
    first_ok: dict[str, HookRequest] = {}
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for r in requests:
        first_seen.setdefault(r.id, r)
        if r.ok:
            first_ok.setdefault(r.id, r)
        bodies[r.id].add(r.body)
    report.unverified = sum(1 for r in requests if not r.verified)
    report.two_bodies = sorted(i for i, b in bodies.items() if len(b) > 1)
    report.undelivered_ids = sorted(set(first_seen) - set(first_ok))

    events: dict[tuple[str, str], list[_Event]] = defaultdict(list)
    attempted: dict[tuple[str, str], list[_Event]] = defaultdict(list)
    completions: dict[str, set[str]] = defaultdict(set)
    for event_id, r in first_seen.items():
        ok = first_ok.get(event_id)
        doc = r.payload()
        data = doc["data"]
        if doc["type"] == "batch.completed":
            if ok is not None:
                completions[data["batch_id"]].add(event_id)
            calls = sum(1 for b, _ in per_call if b == data["batch_id"])
            if data.get("total") != calls:
                report.batch_completed_bad.append(f"{event_id}: total {data.get('total')}")
            continue
        if doc["type"] != f"call.{data.get('status')}":
            continue  # call.updated and other non-status events
        target = events if ok is not None else attempted
        target[(data["batch_id"], data["call_id"])].append(
            _Event(
                event_id,
                int(data["sequence"]),
                data["status"],
                data.get("previous_status"),
                data.get("missed_terminal") is True,
                r.at,
                ok.at if ok is not None else math.inf,
            )
        )

    for key, chain in per_call.items():
        if served is None:
            long = [
                span.end is None or visible_s(span.start, span.end, outages) >= need_s
                for span in chain
            ]
        else:
            times = served.get(key, ())
            long = [
                span.end is None or sum(span.start <= at < span.end for at in times) >= 2
                for span in chain
            ]
        required = [
            span.status != PENDING and (span.end is None or (not only_final and is_long))
            for span, is_long in zip(chain, long, strict=True)
        ]
        group = occurrences([span.status for span in chain], long)
        for g in {group[j] for j, req in enumerate(required) if req}:
            report.required += 1
            status = chain[g].status
            report.required_by_status[status] = report.required_by_status.get(status, 0) + 1
        delivered = sorted(events.pop(key, []), key=lambda e: e.seq)
        report.status_events += len(delivered)
        tried = sorted(delivered + attempted.get(key, []), key=lambda e: e.seq)
        _check_call(
            report,
            key,
            chain,
            required,
            group,
            delivered,
            tried,
            outages,
            now,
            chains=not only_final,
        )

    for key, stray in events.items():  # events for calls the platform never had
        for e in stray:
            report.invented.append(Problem(e.id, "/".join(key), "no such call"))

    _check_completions(report, per_call, completions, outages, need_s)
    return report


def _check_call(
    report: Report,
    key: tuple[str, str],
    chain: list[StatusSpan],
    required: list[bool],
    group: list[int],
    delivered: list[_Event],
    tried: list[_Event],
    outages: list[tuple[float, float]],
    now: float,
    *,
    chains: bool,
) -> None:
    call = "/".join(key)
    match = _place(chain, required, delivered)
    # Placing the events attempted but never answered 2xx as well tells the missing
    # statuses no request carried from those stuck in retries.
    sent_spans = _place(chain, required, tried).values() if len(tried) > len(delivered) else ()
    sent = {group[j] for j in sent_spans}
    for i, e in enumerate(delivered):
        j = match.get(i)
        if j is None:
            real = any(s.status == e.status and s.start <= e.first_seen for s in chain)
            target = report.out_of_order if real else report.invented
            target.append(Problem(e.id, call, f"{e.status} (seq {e.seq})"))
        else:
            report.lags_s.append(e.first_ok - chain[j].start)
    covered = {group[j] for j in match.values()}
    missing: dict[int, Missing] = {}
    for j, span in enumerate(chain):
        g = group[j]
        if not required[j] or g in covered:
            continue
        end = span.end if span.end is not None else now
        seen_s = visible_s(span.start, end, outages)
        if g not in missing or seen_s > missing[g].visible_s or span.end is None:
            missing[g] = Missing(
                span.batch_id, span.call_id, span.status, span.start, seen_s, span.end is None
            )
    report.missing += missing.values()
    report.missing_unattempted += sum(1 for g in missing if g not in sent)
    seqs: set[int] = set()
    for k, e in enumerate(delivered):
        if e.seq in seqs:
            report.same_sequence.append(Problem(e.id, call, f"sequence {e.seq} twice"))
        seqs.add(e.seq)
        expected = delivered[k - 1].status if k else None
        if chains and e.previous != expected and not (k == 0 and e.previous == PENDING):
            report.broken_chains.append(
                Problem(e.id, call, f"{e.previous} -> {e.status}, last delivered {expected}")
            )
        if e.marker:
            report.missed_terminal_markers += 1
            a, b = match.get(k - 1) if k else None, match.get(k)
            if a is not None and b is not None:
                between = chain[a + 1 : b]
                if not any(s.status in TERMINAL_STATUSES for s in between):
                    report.false_markers.append(
                        Problem(e.id, call, f"missed_terminal but no terminal before {e.status}")
                    )


def occurrences(statuses: Sequence[str], long: Sequence[bool]) -> list[int]:
    """Per span, the index of the first span of its occurrence: a status repeated with
    only short (not `long`) spans in between continues the earlier occurrence."""
    group = list(range(len(statuses)))
    last: dict[str, int] = {}
    for k, status in enumerate(statuses):
        j = last.get(status)
        if j is not None and not any(long[j + 1 : k]):
            group[k] = group[j]
        last[status] = k
    return group


def _place(
    chain: list[StatusSpan], required: list[bool], delivered: list[_Event]
) -> dict[int, int]:
    """Event index -> span index: the monotone placement with the most events placed,
    then the most required spans covered (a small LCS-style dynamic programme)."""
    n, m = len(delivered), len(chain)
    best = [[(0, 0)] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        e = delivered[i - 1]
        for j in range(1, m + 1):
            s = chain[j - 1]
            cand = max(best[i - 1][j], best[i][j - 1])
            if s.status == e.status and s.start <= e.first_seen + _EPSILON_S:
                placed, covered = best[i - 1][j - 1]
                cand = max(cand, (placed + 1, covered + required[j - 1]))
            best[i][j] = cand
    out: dict[int, int] = {}
    i, j = n, m
    while i and j:
        e, s = delivered[i - 1], chain[j - 1]
        if (
            s.status == e.status
            and s.start <= e.first_seen + _EPSILON_S
            and best[i][j] == (best[i - 1][j - 1][0] + 1, best[i - 1][j - 1][1] + required[j - 1])
        ):
            out[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif best[i][j] == best[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return out


def _check_completions(
    report: Report,
    per_call: dict[tuple[str, str], list[StatusSpan]],
    delivered: dict[str, set[str]],
    outages: list[tuple[float, float]],
    need_s: float,
) -> None:
    """Per batch: completions visible for 2 x T (and the last) <= events <= completions."""
    changes: dict[str, list[tuple[float, int]]] = defaultdict(list)
    opened: dict[str, int] = defaultdict(int)
    for (batch_id, _), chain in per_call.items():
        opened[batch_id] += 1  # every call starts pending, so open
        for prev, span in itertools.pairwise(chain):
            delta = (span.status not in TERMINAL_STATUSES) - (prev.status not in TERMINAL_STATUSES)
            if delta:
                changes[batch_id].append((span.start, delta))
    for batch_id, total in opened.items():
        open_now = total
        periods: list[tuple[float, float | None]] = []
        moments = sorted(changes[batch_id])
        k = 0
        while k < len(moments):
            at = moments[k][0]
            while k < len(moments) and moments[k][0] == at:  # one step's changes at once
                open_now += moments[k][1]
                k += 1
            if open_now == 0:
                periods.append((at, None))
            elif periods and periods[-1][1] is None:
                periods[-1] = (periods[-1][0], at)
        # Completions apart by a short reopen may look like one: count them once.
        groups: list[bool] = []
        for k, (a, b) in enumerate(periods):
            is_long = b is None or visible_s(a, b, outages) >= need_s
            previous_end = periods[k - 1][1] if k else None
            if previous_end is not None and visible_s(previous_end, a, outages) < need_s:
                groups[-1] = groups[-1] or is_long
            else:
                groups.append(is_long)
        got = len(delivered.get(batch_id, ()))
        report.batch_completed[batch_id] = (got, sum(groups), len(periods))
