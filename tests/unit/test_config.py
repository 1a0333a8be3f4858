from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from callbridge.cli.main import main
from callbridge.config import ConfigError, interpolate, parse_settings
from callbridge.operations import redact_url
from tests.support.settings import SECRET

ROOT = Path(__file__).resolve().parents[2]


def base() -> dict[str, Any]:
    return {
        "upstream": {"base_url": "https://api.example.com", "api_key": "sk_x"},
        "subscriptions": [{"name": "crm", "url": "https://crm.example.com/h", "secret": SECRET}],
    }


def problems(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, env=env or {})
    return info.value.problems


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["upstream"].update(x=1), "upstream.x: unknown key"),
        (lambda c: c["upstream"].update(page_size=501), "upstream.page_size: Input should be less"),
        (lambda c: c["upstream"].update(page_size="many"), "upstream.page_size: Input should be"),
        (lambda c: c["upstream"].update(base_url="not a url"), "upstream.base_url: "),
        (lambda c: c["upstream"].pop("api_key"), "upstream.api_key: required key is missing"),
        (
            lambda c: c["upstream"].update(api_key="${NOPE}"),
            "upstream.api_key: environment variable NOPE",
        ),
        (lambda c: c["subscriptions"][0].update(url="ftp://x"), "subscriptions[0].url: "),
        (
            lambda c: c["subscriptions"][0].update(secret="abc"),
            "subscriptions[0].secret: must be a whsec_",
        ),
        (
            lambda c: c["subscriptions"][0].update(secret="whsec_***"),
            "subscriptions[0].secret: must be a whsec_",
        ),
        (
            lambda c: c["subscriptions"].append(dict(c["subscriptions"][0])),
            "subscriptions[1].name: duplicate",
        ),
        (lambda c: c["subscriptions"][0].update(events=["call"]), "subscriptions[0].events: "),
        (
            lambda c: c["subscriptions"][0].pop("secret"),
            "subscriptions[0]: set exactly one of secret or secrets",
        ),
        (
            lambda c: c["subscriptions"][0].update(headers={"webhook-id": "x"}),
            "subscriptions[0].headers: ",
        ),
        (
            lambda c: c.update(batches=[{"id": "a"}, {"id": "a"}]),
            "batches[1].id: duplicate batch id",
        ),
        (lambda c: c.update(batches=[{"id": "bad id!"}]), "batches[0].id: must be"),
        # "." and ".." would point the request at another path of the API.
        (lambda c: c.update(batches=[{"id": "."}]), "batches[0].id: must not be made of dots"),
        (lambda c: c.update(batches=[{"id": ".."}]), "batches[0].id: must not be made of dots"),
        # A line break in a header value made every delivery fail until dead-lettered.
        (
            lambda c: c["subscriptions"][0].update(headers={"X-Token": "a\r\nX-Evil: 1"}),
            "subscriptions[0].headers: header 'X-Token': the value must not contain CR",
        ),
        *[
            (
                lambda c, name=name: c["subscriptions"][0].update(headers={name: "x"}),
                f"subscriptions[0].headers: header {name!r} is set by callbridge or HTTP",
            )
            for name in (
                "Host",
                "Content-Length",
                "Transfer-Encoding",
                "Authorization",
                "Webhook-Whatever",
            )
        ],
        (lambda c: c.update(redis={"url": "http://x"}), "redis.url: must start with"),
        (lambda c: c.update(admin={"token": "short"}), "admin.token: must be at least 16"),
        (
            lambda c: c.update(poller={"interval_seconds": 0}),
            "poller.interval_seconds: Input should be greater",
        ),
        (lambda c: c.update(surprise=1), "surprise: unknown key"),
        (
            lambda c: c.update(tracing={"trace_url_template": "http://jaeger/trace/"}),
            "tracing.trace_url_template: must contain {trace_id}",
        ),
        (
            lambda c: c.update(tracing={"trace_url_template": "javascript:{trace_id}"}),
            "tracing.trace_url_template: must be an http:// or https:// URL",
        ),
        (lambda c: c.update(tracing={"enabled": "yes"}), "tracing.enabled: Input should be"),
    ],
)
def test_bad_config_names_key_path(mutate: Any, expected: str) -> None:
    raw = base()
    mutate(raw)
    found = problems(raw)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_reported_at_once() -> None:
    raw = base()
    raw["upstream"]["page_size"] = 0
    raw["subscriptions"][0]["secret"] = "nope"
    found = problems(raw)
    assert len(found) == 2


def test_secrets_never_in_errors_or_repr() -> None:
    raw = base()
    raw["upstream"]["api_key"] = "sk_live_supersecret"
    raw["upstream"]["page_size"] = "x"
    found = problems(raw)
    assert "supersecret" not in " ".join(found)
    settings = parse_settings(base(), env={})
    assert SECRET not in repr(settings)
    assert "sk_x" not in repr(settings)


def test_interpolation_forms(tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text("from-file\n")
    tree, errs = interpolate(
        {
            "a": "${A}",
            "b": "${B:-dflt}",
            "c": f"${{file:{secret_file}}}",
            "d": "$${A}",
            "e": [1, "x${A}y"],
        },
        {"A": "1"},
    )
    assert errs == []
    assert tree == {"a": "1", "b": "dflt", "c": "from-file", "d": "${A}", "e": [1, "x1y"]}


def test_rotation_secrets_list() -> None:
    raw = base()
    raw["subscriptions"][0].pop("secret")
    raw["subscriptions"][0]["secrets"] = [SECRET, SECRET]
    s = parse_settings(raw, env={})
    assert len(s.subscriptions[0].signing_keys) == 2


def test_example_config_is_valid_and_documents_defaults() -> None:
    env = {
        "CALLBRIDGE_API_KEY": "sk_example",
        "CRM_WEBHOOK_SECRET": SECRET,
        "CALLBRIDGE_ADMIN_TOKEN": "a" * 32,
    }
    raw = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    settings = parse_settings(raw, env=env)
    assert settings.subscriptions[0].name == "crm"


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    assert main(["check-config", "--config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    raw = base()
    raw["subscriptions"][0]["url"] = "nope"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "subscriptions[0].url:" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("upstream: [\n")
    assert main(["check-config", "--config", str(broken)]) == 2
    assert main(["check-config", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_cli_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "callbridge", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("callbridge ")


def test_example_documents_every_key_with_its_default() -> None:
    from callbridge import config as c

    env = {"CALLBRIDGE_API_KEY": "sk_example", "CRM_WEBHOOK_SECRET": SECRET}
    raw = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    settings = parse_settings(raw, env=env)
    sections: list[tuple[str, Any, Any, Any]] = [
        ("upstream", c.UpstreamSettings, raw["upstream"], settings.upstream),
        ("redis", c.RedisSettings, raw["redis"], settings.redis),
        ("poller", c.PollerSettings, raw["poller"], settings.poller),
        ("delivery", c.DeliverySettings, raw["delivery"], settings.delivery),
        ("server", c.ServerSettings, raw["server"], settings.server),
        ("admin", c.AdminSettings, raw["admin"], settings.admin),
        ("logging", c.LoggingSettings, raw["logging"], settings.logging),
        (
            "subscriptions[0]",
            c.SubscriptionSettings,
            raw["subscriptions"][0],
            settings.subscriptions[0],
        ),
        ("batches[0]", c.BatchSettings, raw["batches"][0], settings.batches[0]),
    ]
    assert set(raw) == set(c.Settings.model_fields)
    for path, model, section_raw, section in sections:
        # `secrets` is the alternative form of `secret`, documented in its comment.
        documented = set(model.model_fields) - {"secrets"}
        assert set(section_raw) >= documented, (path, documented - set(section_raw))
        for name, info in model.model_fields.items():
            if info.is_required() or name in {"secret", "secrets", "token"}:
                continue
            default = info.get_default(call_default_factory=True)
            assert getattr(section, name) == default, (
                f"{path}.{name} differs from the model default"
            )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://crm.example/hook", "https://crm.example/hook"),
        ("https://user:pw@crm.example/hook", "https://***@crm.example/hook"),
        ("https://crm.example/h?token=abc&v=1&flag", "https://crm.example/h?token=***&v=***&flag"),
    ],
)
def test_subscription_urls_are_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown
