"""How ``callbridge admin`` shows the admin API's answers to people: plain tables."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart; '-' for empty cells."""
    cells = [[str(h) for h in headers]] + [
        ["-" if v is None or v == "" else str(v) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def when(ms: int | None) -> str | None:
    """A UTC timestamp from epoch milliseconds."""
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def batches(data: list[dict[str, Any]]) -> str:
    rows = [
        (
            b["id"],
            b["lifecycle"],
            b["total"],
            "yes" if b["completed"] else "no",
            when(b["last_poll_ms"]),
            when(b["last_change_ms"]),
            b["owner"],
        )
        for b in data
    ]
    headers = ("BATCH", "LIFECYCLE", "CALLS", "COMPLETED", "LAST POLL", "LAST CHANGE", "OWNER")
    return table(headers, rows) if rows else "no batches watched"


def timeline(data: dict[str, Any]) -> str:
    head = (
        f"call {data['call_id']} in batch {data['batch_id']}: {data['status']} "
        f"(sequence {data['sequence']})"
    )
    rows = [
        (when(e["at_ms"]), e["status"], e["sequence"], e["event_type"], e["event_id"])
        for e in data["timeline"]
    ]
    return head + "\n" + table(("AT", "STATUS", "SEQUENCE", "EVENT", "EVENT ID"), rows)


def state_of(s: dict[str, Any]) -> str:
    if not s["enabled_in_config"]:
        return "off in config"
    if s["disabled"]:
        return f"disabled ({s['disabled_reason'] or 'operator'})"
    if (s["breaker_open_until_ms"] or 0) > time.time() * 1000:
        return "breaker open"
    return "enabled"


def subscriptions(data: list[dict[str, Any]]) -> str:
    rows = [
        (
            s["name"],
            state_of(s),
            s["consecutive_failures"],
            s["queue"]["ready"],
            s["queue"]["scheduled"],
            s["queue"]["inflight"],
            s["queue"]["dead"],
            s["url"],
        )
        for s in data
    ]
    headers = ("NAME", "STATE", "FAILURES", "READY", "SCHEDULED", "INFLIGHT", "DEAD", "URL")
    return table(headers, rows) if rows else "no subscriptions configured"


def dead_letters(data: dict[str, Any]) -> str:
    rows = []
    for d in data["items"]:
        last = d["history"][-1] if d["history"] else {}
        rows.append(
            (
                d["event_id"],
                d["type"],
                d["attempts"],
                when(last.get("at_ms")),
                last.get("error") or (f"HTTP {last['status']}" if last.get("status") else None),
            )
        )
    if not rows:
        return "no dead letters" if data["offset"] == 0 else "no dead letters at this offset"
    return table(("EVENT ID", "TYPE", "ATTEMPTS", "LAST ATTEMPT", "LAST ERROR"), rows)


def jobs(data: list[dict[str, Any]]) -> str:
    rows = [
        (
            j["id"],
            # Absent from a bridge of a previous release: its jobs are all windows.
            j.get("scope", "all"),
            j["state"],
            j["phase"],
            when(j["since_ms"]),
            when(j["until_ms"]) or "-",
            f"{j['scanned']}/{j['total']}",
            j["requeued"],
            when(j["finished_ms"]) or "-",
        )
        for j in data
    ]
    headers = (
        "JOB",
        "SCOPE",
        "STATE",
        "PHASE",
        "SINCE",
        "UNTIL",
        "LOOKED AT",
        "DUE AGAIN",
        "FINISHED",
    )
    return table(headers, rows) if rows else "no recovery jobs"
