"""The ``callbridge`` command: builds settings, configures logging, runs things.

Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage, 3 `run` cannot
start (Redis unreachable or refusing, or another live process under this
``server.replica_id``; one line names the cause and the key)
(`callbridge admin` adds 1 not found, 3 auth, 4 unreachable: see `cli.admin`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from callbridge import __version__
from callbridge.cli.admin import add_admin_parser
from callbridge.cli.event_schemas import add_event_schemas_parser
from callbridge.cli.simulate import add_turbulence_flags, turbulence_options
from callbridge.errors import CallbridgeError, ConfigError, StartupError

log = logging.getLogger("callbridge.cli.main")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_CANNOT_START = 0, 1, 2, 3

# Extra fields our log records may carry; JSON logs include them when present.
_LOG_FIELDS = ("action", "batch_id", "call_id", "subscription", "event_id", "trace_id", "span_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _LOG_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(
            f"{n}={getattr(record, n)}" for n in _LOG_FIELDS if getattr(record, n, None)
        )
        line = f"{line} [{extras}]" if extras else line
        # Keep one record on one line, tracebacks included.
        return line.replace("\n", " | ")


def configure_logging(fmt: str = "text", level: str = "INFO", *, trace_ids: bool = False) -> None:
    """`trace_ids` (tracing on): records made in a span carry its `trace_id`/`span_id`."""
    handler = logging.StreamHandler(sys.stderr)
    if trace_ids:
        from callbridge.tracing import TraceIds

        handler.addFilter(TraceIds())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would print every scrape and probe.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get("CALLBRIDGE_CONFIG")
    if not path:
        raise ConfigError(["(cli): no config given: use --config PATH or set CALLBRIDGE_CONFIG"])
    return path


def _print_config_error(exc: ConfigError) -> None:
    print("configuration error:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    from callbridge.config import load_settings

    settings = load_settings(_config_path(args))
    if problems := settings.redis.tls.unreadable():
        raise ConfigError(problems)
    subs = ", ".join(s.name for s in settings.subscriptions) or "none"
    target = settings.redis.target
    # Where it points, never the URL itself (it may carry a password).
    redis = "embedded" if target is None else target.where()
    print(
        f"config ok: {len(settings.batches)} batches, subscriptions: {subs}, redis: {redis}, "
        f"admin API: {'on' if settings.admin.token else 'off'}"
    )
    return EXIT_OK


def tune_gc() -> None:
    """Collect the youngest generation every 50,000 allocations instead of 700.

    A poll cycle allocates its pages, items and events in bursts, all acyclic and
    freed by reference counting; at CPython's default threshold the collector ran
    hundreds of times a cycle over them (about a third of a flood cycle's CPU,
    docs/performance.md). Long-lived state is kept as strings, which it never scans.
    """
    gc.set_threshold(50_000, 20, 100)


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(EXIT_OK)


def cmd_run(args: argparse.Namespace) -> int:
    # A stop request before the app runs has nothing to drain: exit 0 at once.
    # web.run_app replaces this with its graceful handlers when it starts.
    signal.signal(signal.SIGTERM, _exit_quietly)
    from aiohttp import web

    from callbridge.app import build_app
    from callbridge.config import load_settings

    settings = load_settings(_config_path(args))
    configure_logging(
        settings.logging.format, settings.logging.level, trace_ids=settings.tracing.enabled
    )
    tune_gc()
    log.info(
        "callbridge %s starting: %d batches, %d subscriptions",
        __version__,
        len(settings.batches),
        len(settings.subscriptions),
        extra={"action": "starting"},
    )
    web.run_app(
        build_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        print=None,
        access_log=None,
        # The service's own stop waits for the grace period; HTTP keeps a little.
        shutdown_timeout=5.0,
        handle_signals=True,
    )
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from callbridge.simulator import FaultConfig, Simulator, SimulatorConfig, serve
    from callbridge.simulator.serve import usage_text

    configure_logging("text", "INFO")
    turbulence, timing = turbulence_options(args)  # exits 2 on nonsense
    faults = FaultConfig(
        rate_limit_ratio=args.fault_429,
        server_error_ratio=args.fault_5xx,
        slow_ratio=args.fault_slow,
        malformed_ratio=args.fault_malformed,
        shift_ratio=args.fault_shift,
        **turbulence,
    )
    env_key = os.environ.get("CALLBRIDGE_API_KEY")
    config = SimulatorConfig(
        batches=args.batches,
        calls_per_batch=args.calls,
        api_key=env_key or args.api_key,
        seed=args.seed,
        faults=faults,
        concurrency=args.concurrency,
        timing=timing,
    )
    simulator = Simulator(config)

    def ready(url: str) -> None:
        # A key from the environment may be a real one: refer to it, never print it.
        key = "${CALLBRIDGE_API_KEY}" if env_key else config.api_key
        print(usage_text(url, simulator.batch_ids, key), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                args.host,
                args.port,
                config,
                step_seconds=args.step,
                on_ready=ready,
                simulator=simulator,
            )
        )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from callbridge.demo import run_demo

    configure_logging("text", "WARNING")
    try:
        return asyncio.run(
            run_demo(
                calls=args.calls, step_seconds=args.step, port=args.port, keep_open=args.keep_open
            )
        )
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a captured webhook request: headers file + body file."""
    from callbridge.deliver.signing import SignatureError, verify

    secrets = args.secret or os.environ.get("CALLBRIDGE_WEBHOOK_SECRET", "").split()
    if not secrets:
        print("no secret: use --secret whsec_... or CALLBRIDGE_WEBHOOK_SECRET", file=sys.stderr)
        return EXIT_CONFIG
    headers: dict[str, str] = {}
    for line in Path(args.headers).read_text().splitlines():
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    body = Path(args.body).read_bytes() if args.body != "-" else sys.stdin.buffer.read()
    now = int(args.now) if args.now is not None else int(time.time())
    try:
        verify(secrets, headers, body, now=now, tolerance_s=args.tolerance)
    except (SignatureError, ValueError) as exc:
        print(f"INVALID: {exc}")
        return EXIT_FAILURE
    msg_id = next((v for k, v in headers.items() if k.lower() == "webhook-id"), None)
    print(f"valid: webhook-id {msg_id}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callbridge",
        description="Real-time signed webhooks (Standard Webhooks) from the List Batch Calls "
        "polling API.",
    )
    parser.add_argument("--version", action="version", version=f"callbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            "-c",
            help="YAML config file (default: $CALLBRIDGE_CONFIG)",
        )

    p = sub.add_parser("run", help="run the bridge: poll batches, deliver webhooks, serve HTTP")
    with_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and exit (2 when invalid)")
    with_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "simulate",
        help="serve a simulated List Batch Calls API with calls moving through their lifecycle",
        description="Serve a simulated List Batch Calls API whose calls move through their "
        "lifecycle. On start it prints the batch ids it serves, the API key it accepts "
        "and a config snippet (upstream: base_url + api_key, batches:) to paste into a "
        "callbridge config.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--batches", type=int, default=2, help="number of batches (default 2)")
    p.add_argument("--calls", type=int, default=200, help="calls per batch (default 200)")
    p.add_argument("--step", type=float, default=1.0, help="seconds per lifecycle step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--api-key",
        default="sk_test",
        help="the key it accepts (default sk_test); CALLBRIDGE_API_KEY wins when set",
    )
    for name in ("429", "5xx", "slow", "malformed", "shift"):
        p.add_argument(
            f"--fault-{name}", type=float, default=0.0, metavar="RATIO",
            help=f"share of requests answered with the {name} fault (0-1)",
        )  # fmt: skip
    add_turbulence_flags(p)  # simulate_cli.py
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "demo",
        help="see it work: embedded Redis, simulated platform, the bridge and a verifying "
        "receiver in one process; exits when the demo batch completes",
    )
    p.add_argument("--calls", type=int, default=20, help="calls in the demo batch (default 20)")
    p.add_argument("--step", type=float, default=0.5, help="seconds per simulated step")
    p.add_argument("--port", type=int, default=8080, help="bridge HTTP port (default 8080)")
    p.add_argument(
        "--keep-open",
        action="store_true",
        help="keep the bridge and its console (/ui/) running after the batch completes",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("verify", help="verify a captured webhook request's signature")
    p.add_argument(
        "--secret", action="append", help="whsec_ secret (repeatable; or CALLBRIDGE_WEBHOOK_SECRET)"
    )
    p.add_argument("--headers", required=True, help="file with 'Name: value' header lines")
    p.add_argument("--body", required=True, help="file with the exact body bytes, or -")
    p.add_argument("--tolerance", type=int, default=300, help="accepted timestamp skew, seconds")
    p.add_argument("--now", help="unix time to check the timestamp against (default: now)")
    p.set_defaults(func=cmd_verify)

    add_event_schemas_parser(sub)
    add_admin_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    except StartupError as exc:
        print(f"callbridge: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except CallbridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return code
