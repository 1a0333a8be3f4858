"""The `callbridge` command line: `verify`, help texts, JSON logging."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from callbridge.cli.main import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    build_parser,
    configure_logging,
    main,
)
from callbridge.config import decode_whsec
from callbridge.deliver.signing import signature_headers
from tests.support.settings import OLD_SECRET, SECRET

NOW = 1_700_000_000
BODY = b'{"type":"call.completed","data":{"call_id":"call_1","sequence":5}}'


def capture(tmp_path: Path, body: bytes = BODY, *secrets: str, ts: int = NOW) -> list[str]:
    """Write a captured request as `Name: value` lines + body; the verify arguments."""
    keys = [decode_whsec(s) for s in secrets or (SECRET,)]
    headers = signature_headers(keys, "evt_0123", ts, body)
    lines = ["POST /hook HTTP/1.1 is not a header line and is skipped"]
    lines += [f"{name.title()}: {value}" for name, value in headers.items()]
    lines += ["Content-Type: application/json", ""]
    (tmp_path / "headers.txt").write_text("\n".join(lines))
    (tmp_path / "body.json").write_bytes(body)
    return [
        "verify",
        "--headers",
        str(tmp_path / "headers.txt"),
        "--body",
        str(tmp_path / "body.json"),
        "--now",
        str(NOW),
    ]


@pytest.fixture
def no_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLBRIDGE_WEBHOOK_SECRET", raising=False)


@pytest.mark.usefixtures("no_env_secret")
def test_verify_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*capture(tmp_path), "--secret", SECRET]) == EXIT_OK
    assert capsys.readouterr().out == "valid: webhook-id evt_0123\n"


@pytest.mark.usefixtures("no_env_secret")
def test_verify_tampered_body(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = capture(tmp_path)
    (tmp_path / "body.json").write_bytes(BODY.replace(b"completed", b"failed"))
    assert main([*args, "--secret", SECRET]) == EXIT_FAILURE
    assert capsys.readouterr().out.startswith("INVALID: no signature matches")


@pytest.mark.usefixtures("no_env_secret")
@pytest.mark.parametrize(
    ("ts", "secret", "why"),
    [
        (NOW, OLD_SECRET, "no signature matches"),
        (NOW - 301, SECRET, "webhook-timestamp is 301s away"),
    ],
)
def test_verify_rejects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ts: int, secret: str, why: str
) -> None:
    assert main([*capture(tmp_path, ts=ts), "--secret", secret]) == EXIT_FAILURE
    assert why in capsys.readouterr().out


@pytest.mark.usefixtures("no_env_secret")
def test_verify_without_secret_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(capture(tmp_path)) == EXIT_CONFIG
    assert "no secret" in capsys.readouterr().err


def test_verify_secrets_from_env_allow_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Signed with the old secret only; the env lists new and old, space-separated.
    monkeypatch.setenv("CALLBRIDGE_WEBHOOK_SECRET", f"{SECRET} {OLD_SECRET}")
    assert main(capture(tmp_path, BODY, OLD_SECRET)) == EXIT_OK
    assert capsys.readouterr().out.startswith("valid")


def test_verify_header_file_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`Name: value` lines: any case, spaces around the colon, other lines ignored."""
    headers = signature_headers([decode_whsec(SECRET)], "evt_x:y", NOW, BODY)
    text = "\n".join(
        [
            "HTTP/1.1 200 OK",
            f"WEBHOOK-ID :  {headers['webhook-id']}  ",
            f"webhook-timestamp:{headers['webhook-timestamp']}",
            f"Webhook-Signature: {headers['webhook-signature']}",
            "X-Forwarded-For: 10.0.0.1:443",
        ]
    )
    (tmp_path / "h.txt").write_text(text + "\n\n")
    (tmp_path / "b.json").write_bytes(BODY)
    args = ["verify", "--headers", str(tmp_path / "h.txt"), "--body", str(tmp_path / "b.json")]
    assert main([*args, "--secret", SECRET, "--now", str(NOW)]) == EXIT_OK
    # The id keeps its colon: only the first colon separates name and value.
    assert "valid" in capsys.readouterr().out
    (tmp_path / "h.txt").write_text(text.replace("WEBHOOK-ID :", "WEBHOOK-ID"))
    assert main([*args, "--secret", SECRET, "--now", str(NOW)]) == EXIT_FAILURE
    assert "missing webhook-id" in capsys.readouterr().out


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "check-config", "simulate", "demo", "verify", "event-schemas"):
        assert command in out


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if a.choices and a.dest == "command")
    return sorted(str(name) for name in sub.choices or ())


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help_exits_zero(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: callbridge {command}")


def test_all_subcommands_have_help_tests() -> None:
    assert _subcommands() == [
        "admin",
        "check-config",
        "demo",
        "event-schemas",
        "run",
        "simulate",
        "verify",
    ]


def test_usage_error_exits_two(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--body", "x"])
    assert exc.value.code == 2
    assert "--headers" in capsys.readouterr().err


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("aiohttp.access").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access)


@pytest.mark.usefixtures("restore_logging")
def test_json_logging_has_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")  # binds sys.stderr now: capsys's capture
    log = logging.getLogger("callbridge.poll.cycle")
    log.info(
        "polled %s",
        "sched_1",
        extra={"action": "poll", "batch_id": "sched_1", "payload": "never logged"},
    )
    log.debug("below the level")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["msg"] == "polled sched_1"
    assert doc["level"] == "info"
    assert doc["logger"] == "callbridge.poll.cycle"
    assert doc["action"] == "poll"
    assert doc["batch_id"] == "sched_1"
    assert "payload" not in doc
    assert doc["ts"].endswith("Z")


@pytest.mark.usefixtures("restore_logging")
def test_json_logging_keeps_a_traceback_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("callbridge.app").exception("crashed", extra={"action": "crash"})
    (line,) = capsys.readouterr().err.splitlines()
    doc = json.loads(line)
    assert doc["action"] == "crash"
    assert "RuntimeError: boom" in doc["exc"]


def test_verify_prints_the_id_whatever_the_header_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = signature_headers([decode_whsec(SECRET)], "evt_0123", NOW, BODY)
    (tmp_path / "h.txt").write_text("\n".join(f"{k.upper()}: {v}" for k, v in headers.items()))
    (tmp_path / "b.json").write_bytes(BODY)
    args = ["verify", "--headers", str(tmp_path / "h.txt"), "--body", str(tmp_path / "b.json")]
    assert main([*args, "--secret", SECRET, "--now", str(NOW)]) == EXIT_OK
    assert capsys.readouterr().out == "valid: webhook-id evt_0123\n"
