"""The campaign simulator's bounded record of its answers: per call, per status span,
when it was served, in which status and by which request.

The checker's rule (`tests.support.turbulence`) asks only whether a status was served
twice; explaining a loss or a late event needs more: which requests carried the call
(a whole page, a status list, the pending probe, an ``external_id`` look-up) and
when. Full scans of 200,000 calls every 2 s would make a complete record tens of
millions of readings, so each span the call held keeps a fixed block of 8 floats:
its status, how many answers carried it, the first two answers and the last one
(time and request). A call holds a handful of spans (pending, the dial, the end,
a redial), so the record stays a few hundred bytes per call, whatever the length of
the campaign.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any
from urllib.parse import parse_qs, urlsplit

# The request the simulator is answering (set by a middleware, read when it records).
CURRENT_REQUEST: ContextVar[str] = ContextVar("current_request", default="?")

# Block layout: status, count, (t, request) of the first, second and last answer.
_BLOCK = 8
_NONE = math.nan


def request_kind(path_qs: str) -> str | None:
    """``page``, ``status`` (a status list, the probe included) or ``lookup``; None for
    other routes."""
    parts = urlsplit(path_qs)
    if "/call-batches/" not in parts.path:
        return None
    query = parse_qs(parts.query)
    if "external_id" in query:
        return "lookup"
    return "status" if "status" in query else "page"


def request_label(path_qs: str) -> str:
    """A request in a few words: ``page 3/500``, ``status=queued p1/500``,
    ``probe pending``, ``lookup <external id>``."""
    query = {k: v[0] for k, v in parse_qs(urlsplit(path_qs).query).items()}
    page, limit = query.get("page", "1"), query.get("limit", "?")
    if "external_id" in query:
        return f"lookup {query['external_id']}"
    status = query.get("status")
    if status is None:
        return f"page {page}/{limit}"
    if limit == "1":
        return f"probe {status} p{page}"
    return f"status={status} p{page}/{limit}"


class ServedRecord:
    """Per (batch, call): one block per status span it was served in (see the module)."""

    def __init__(self) -> None:
        self._calls: dict[tuple[str, str], array[float]] = {}
        # Calls whose last block is the span they hold now (a status change ends it).
        self._open: set[tuple[str, str]] = set()
        self._statuses: list[str] = []
        self._status_ids: dict[str, int] = {}
        self._requests: list[str] = []
        self._request_ids: dict[str, int] = {}

    def _intern(self, value: str, ids: dict[str, int], values: list[str]) -> int:
        i = ids.get(value)
        if i is None:
            i = ids[value] = len(values)
            values.append(value)
        return i

    def status_changed(self, key: tuple[str, str]) -> None:
        self._open.discard(key)

    def add(self, key: tuple[str, str], status: str, at: float, request: str) -> None:
        req = float(self._intern(request, self._request_ids, self._requests))
        record = self._calls.get(key)
        if record is None or key not in self._open:
            st = float(self._intern(status, self._status_ids, self._statuses))
            block = (st, 1.0, at, req, _NONE, _NONE, at, req)
            if record is None:
                self._calls[key] = array("d", block)
            else:
                record.extend(block)
            self._open.add(key)
            return
        base = len(record) - _BLOCK
        record[base + 1] += 1
        if record[base + 1] == 2:
            record[base + 4], record[base + 5] = at, req
        record[base + 6], record[base + 7] = at, req

    def _blocks(self, key: tuple[str, str]) -> Iterator[tuple[str, int, list[tuple[float, int]]]]:
        record = self._calls.get(key)
        if record is None:
            return
        for base in range(0, len(record), _BLOCK):
            status, count = self._statuses[int(record[base])], int(record[base + 1])
            answers = [(record[base + 2], int(record[base + 3]))]
            if count >= 2:
                answers.append((record[base + 4], int(record[base + 5])))
            if count >= 3:
                answers.append((record[base + 6], int(record[base + 7])))
            yield status, count, answers

    def times(self, batch_id: str) -> list[tuple[str, list[float]]]:
        """Per call of the batch, the first two answers' times of each span (what the
        checker's served-twice rule reads)."""
        out = []
        for key in self._calls:
            if key[0] == batch_id:
                times = [t for _, _, answers in self._blocks(key) for t, _ in answers[:2]]
                out.append((key[1], times))
        return out

    def trace(self, keys: Iterable[tuple[str, str]]) -> dict[str, list[dict[str, Any]]]:
        """Per ``batch/call``: its spans as served, each ``{status, count, answers:
        [[t, request label, path], ...]}`` (first, second and last answer)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for key in keys:
            out["/".join(key)] = [
                {
                    "status": status,
                    "count": count,
                    "answers": [
                        [t, request_label(self._requests[r]), self._requests[r]] for t, r in answers
                    ],
                }
                for status, count, answers in self._blocks(key)
            ]
        return out
