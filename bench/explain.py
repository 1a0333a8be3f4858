"""Why a status went missing or arrived late: one call's ground truth, what the
simulator served of it, and what the receiver got, side by side.

For every call the checker finds a status missing for, and every call with an event
received more than `LATE_S` after its status began (at most `MAX_CALLS` calls), the
planner benchmark puts into its JSON (and prints, as a timeline, to stderr):

* ``spans``: the statuses the call held (campaign ground truth), from/to in seconds
  since the campaign started;
* ``served``: per status span, how many answers carried the call and the first two
  and the last of them, each with its time and request (``page 3/500``,
  ``status=queued p1/500``, ``probe pending p1``, ``lookup <external id>``; see
  `bench.served`);
* ``events``: every event the receiver got for it: received time, type, sequence,
  ``previous_status``, ``skipped_statuses``, ``missed_terminal``;
* ``requests``: every request of its batch in the `REQUESTS_S` after the status in
  question began (what the bridge read while it did not see the call).
"""

from __future__ import annotations

import bisect
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import aiohttp

from tests.support.turbulence import Report

LATE_S = 30.0
MAX_CALLS = 40
# The batch's requests listed in a trace: from the status in question on, this long.
REQUESTS_S = 6.5


def matched_events(
    truth: list[list[Any]], events: list[list[Any]]
) -> Iterator[tuple[str, str, str, float, float]]:
    """``(batch, call, status, entered, received)`` of each delivered call event,
    matched to the last time its call entered the event's status before the event was
    received (events of statuses the call never had before are left out)."""
    entered: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for batch, call, status, t in truth:
        entered[(batch, call, status)].append(float(t))
    for received, etype, batch, call, status, _stamp in events:
        if not str(etype).startswith("call."):
            continue
        times = entered.get((batch, call, status))
        if not times:
            continue
        i = bisect.bisect_right(times, float(received)) - 1
        if i >= 0:
            yield batch, call, status, times[i], float(received)


def late_events(
    truth: list[list[Any]], events: list[list[Any]], limit_s: float = LATE_S
) -> list[tuple[str, str, str, float, float]]:
    """The matched events (`matched_events`) received more than `limit_s` late."""
    return [m for m in matched_events(truth, events) if m[4] - m[3] > limit_s]


def reasons(
    report: Report,
    finals: dict[tuple[str, str], tuple[str, float]],
    lost_finals: list[tuple[str, str]],
    late: list[tuple[str, str, str, float, float]],
    t0: float,
) -> dict[tuple[str, str], tuple[list[str], float]]:
    """The calls to explain, losses first, then the latest events: per call, the
    reasons in words and when the first status it concerns began."""
    why: dict[tuple[str, str], tuple[list[str], float]] = {}

    def add(key: tuple[str, str], text: str, began: float) -> None:
        texts, first = why.get(key, ([], began))
        why[key] = ([*texts, text], min(first, began))

    for m in report.missing:
        text = f"missing {m.status} (began {m.start - t0:+.3f} s, visible {m.visible_s:.3f} s)"
        add((m.batch_id, m.call_id), text, m.start)
    for key in lost_finals:
        add(key, f"final {finals[key][0]} never arrived", finals[key][1])
    for batch, call, status, entered, received in sorted(late, key=lambda x: x[3] - x[4]):
        add((batch, call), f"{status} {received - entered:.1f} s late", entered)
    return why


async def _get(session: aiohttp.ClientSession, url: str, params: Any = None) -> Any:
    async with session.get(url, params=params) as resp:
        resp.raise_for_status()
        return await resp.json(content_type=None)


async def explain(
    session: aiohttp.ClientSession,
    sim_url: str,
    receiver_url: str,
    t0: float,
    why: dict[tuple[str, str], tuple[list[str], float]],
) -> list[dict[str, Any]]:
    """The traces of the calls in `why` (`reasons`), at most `MAX_CALLS`; times in
    seconds since `t0`. Each has the requests its batch got in the `REQUESTS_S` after
    the status in question began (what the bridge read while it was not seen)."""
    keys = list(why)[:MAX_CALLS]
    if not keys:
        return []
    wanted = set(keys)

    def rel(t: float | None) -> float | None:
        return None if t is None else round(float(t) - t0, 3)

    spans: dict[tuple[str, str], list[list[Any]]] = defaultdict(list)
    for batch_id in sorted({b for b, _ in keys}):
        for call, status, start, end in await _get(
            session, sim_url + "/_campaign/spans", {"batch": batch_id}
        ):
            if (batch_id, call) in wanted:
                spans[(batch_id, call)].append([status, rel(start), rel(end)])
    served = await _get(
        session, sim_url + "/_campaign/trace", [("call", f"{b}/{c}") for b, c in keys]
    )
    events: dict[tuple[str, str], list[list[Any]]] = defaultdict(list)
    for _event_id, received, doc in await _get(session, receiver_url + "/_hooks"):
        data = doc["data"]
        key = (data.get("batch_id"), data.get("call_id"))
        if key in wanted:
            events[key].append(
                [
                    rel(received),
                    doc["type"],
                    data.get("sequence"),
                    data.get("previous_status"),
                    data.get("skipped_statuses"),
                    data.get("missed_terminal"),
                ]
            )
    out = []
    for key in keys:
        texts, began = why[key]
        asked = await _get(
            session,
            sim_url + "/_campaign/requests",
            {"batch": key[0], "since": str(began), "until": str(began + REQUESTS_S)},
        )
        trace: dict[str, Any] = {
            "call": "/".join(key),
            "why": texts,
            "requests": [[rel(t), label] for t, label in asked],
            "spans": spans.get(key, []),
            "served": [
                {
                    "status": block["status"],
                    "count": block["count"],
                    "answers": [[rel(t), label, path] for t, label, path in block["answers"]],
                }
                for block in served.get("/".join(key), [])
            ],
            "events": sorted(events.get(key, []), key=lambda e: float(e[0])),
        }
        out.append(trace)
    return out


def render(traces: Iterable[dict[str, Any]]) -> str:
    """The traces as timelines: one line per status begun, answer, event received."""
    lines = []
    for trace in traces:
        lines.append(f"== {trace['call']}: {'; '.join(trace['why'])}")
        rows: list[tuple[float, int, str]] = []
        for status, start, end in trace["spans"]:
            held = "" if end is None else f" (held {end - start:.3f} s)"
            rows.append((start, 0, f"TRUTH   {status}{held}"))
        for block in trace["served"]:
            answers = block["answers"]
            for k, (t, label, _path) in enumerate(answers):
                nth = "last" if k == 2 else f"#{k + 1}"
                text = f"SERVED  {block['status']:<11} {nth} of {block['count']}: {label}"
                rows.append((t, 1, text))
        for received, etype, seq, previous, skipped, missed in trace["events"]:
            extra = f" skipped={skipped}" if skipped else ""
            extra += " missed_terminal" if missed else ""
            rows.append((received, 2, f"EVENT   {etype} seq {seq} prev={previous}{extra}"))
        rows += [(t, 1, f"REQUEST {label}") for t, label in trace["requests"]]
        lines += [f"  {t:9.3f}  {text}" for t, _, text in sorted(rows)]
    return "\n".join(lines)


def print_traces(traces: list[dict[str, Any]]) -> None:
    if traces:
        print(render(traces), file=sys.stderr)
