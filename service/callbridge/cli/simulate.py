"""``callbridge simulate``'s turbulence flags: the faults real platforms have.

Outages, pages reordered between the requests of a scan, and the wall-clock mode
(statuses lasting seconds, some under one); see docs/turbulence.md. Importing this
module imports nothing of the simulator: the CLI builds its parser without it.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from callbridge.simulator import Timing


def turbulence_options(args: argparse.Namespace) -> tuple[dict[str, Any], Timing | None]:
    """The turbulence flags of ``callbridge simulate``: the `FaultConfig` fields they set,
    and the wall-clock `Timing` (None without --realtime/--dwell). Exits 2 on nonsense."""
    from callbridge.simulator import FaultConfig, Timing

    faults: dict[str, Any] = {
        "reorder_ratio": args.fault_reorder,
        "reorder_share": args.reorder_share,
        "outage_every_seconds": args.outage_every,
        "outage_seconds": args.outage_seconds,
        "outage_windows": tuple(args.outage_window or ()),
        "outage_kind": args.outage_kind,
    }
    try:
        FaultConfig(**faults)
        timing = None
        if args.realtime or args.dwell:
            timing = Timing(step_seconds=args.step, dwell_seconds=dict(args.dwell or ()))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc  # the CLI's exit code for bad usage
    return faults, timing


def _dwell(text: str) -> tuple[str, tuple[float, float]]:
    """``STATUS=LOW:HIGH`` (seconds), or ``STATUS=SECONDS`` for a fixed dwell."""
    status, sep, span = text.partition("=")
    low, _, high = span.partition(":")
    try:
        bounds = (float(low), float(high or low))
    except ValueError:
        bounds = (-1.0, -1.0)
    if not sep or not status or bounds[0] < 0:
        raise argparse.ArgumentTypeError(f"expected STATUS=LOW:HIGH in seconds, got {text!r}")
    return status, bounds


def _window(text: str) -> tuple[float, float]:
    """``START:END``, seconds after the simulator starts."""
    start, sep, end = text.partition(":")
    try:
        window = (float(start), float(end))
    except ValueError:
        window = (-1.0, -1.0)
    if not sep or not 0 <= window[0] < window[1]:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, got {text!r}")
    return window


def add_turbulence_flags(p: argparse.ArgumentParser) -> None:
    """The simulate flags for the faults real platforms have (docs/turbulence.md)."""
    p.add_argument(
        "--concurrency", type=int, default=10, help="calls of a batch dialling at once (default 10)"
    )
    p.add_argument(
        "--realtime", action="store_true",
        help="wall-clock mode: statuses last seconds (see --dwell); use --step 0.1 for "
        "sub-second ones",
    )  # fmt: skip
    p.add_argument(
        "--dwell", type=_dwell, action="append", metavar="STATUS=LOW:HIGH",
        help="how long a status lasts in the wall-clock mode, seconds (repeatable; implies "
        "--realtime); for no_answer/busy the pause before a redial",
    )  # fmt: skip
    p.add_argument(
        "--fault-reorder", type=float, default=0.0, metavar="RATIO",
        help="share of requests after which the batch's order changes (0-1)",
    )  # fmt: skip
    p.add_argument(
        "--reorder-share", type=float, default=0.1, metavar="RATIO",
        help="share of a batch's items that trade places on each reorder (default 0.1)",
    )  # fmt: skip
    p.add_argument(
        "--outage-every", type=float, default=0.0, metavar="SECONDS",
        help="an outage every that many seconds (with --outage-seconds)",
    )  # fmt: skip
    p.add_argument(
        "--outage-seconds", type=float, default=0.0, metavar="SECONDS",
        help="how long each outage lasts: every request fails meanwhile",
    )  # fmt: skip
    p.add_argument(
        "--outage-window", type=_window, action="append", metavar="START:END",
        help="an outage from START to END seconds after start (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--outage-kind", choices=("503", "reset"), default="503",
        help="answer 503 during an outage, or reset the connection (default 503)",
    )  # fmt: skip
