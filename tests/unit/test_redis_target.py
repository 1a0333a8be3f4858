"""`redis.url` read as single, Cluster, socket or Sentinel (`models.redis_target`), and the
settings around it: one place for credentials, TLS files, never a password echoed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from callbridge.cli.main import main
from callbridge.config import ConfigError, parse_settings
from callbridge.models.redis_target import RedisTarget, parse_redis_url
from callbridge.store.permissions import acl_rule
from tests.support.settings import SECRET

PASSWORD = "pa55-w0rd-never-shown"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h", RedisTarget("single", False, (("h", 6379),))),
        ("rediss://h:6380/2", RedisTarget("single", True, (("h", 6380),), db=2)),
        (
            f"redis://app:{PASSWORD}@10.0.0.1:7000/0",
            RedisTarget("single", False, (("10.0.0.1", 7000),), 0, None, "app", PASSWORD),
        ),
        (f"redis://:{PASSWORD}@h", RedisTarget("single", False, (("h", 6379),), password=PASSWORD)),
        ("redis://[::1]:7000", RedisTarget("single", False, (("::1", 7000),))),
        ("redis+cluster://n1:7000", RedisTarget("cluster", False, (("n1", 7000),))),
        ("rediss+cluster://n1", RedisTarget("cluster", True, (("n1", 6379),))),
        (
            "redis+sentinel://s1,s2:26380,s3/mymaster",
            RedisTarget(
                "sentinel", False, (("s1", 26379), ("s2", 26380), ("s3", 26379)), 0, "mymaster"
            ),
        ),
        (
            f"rediss+sentinel://cb:{PASSWORD}@s1:26379/my.master-1/3",
            RedisTarget("sentinel", True, (("s1", 26379),), 3, "my.master-1", "cb", PASSWORD),
        ),
        (
            "unix:///run/redis.sock?db=4",
            RedisTarget("unix", False, (), 4, socket_path="/run/redis.sock"),
        ),
    ],
)
def test_urls_are_read(url: str, expected: RedisTarget) -> None:
    assert parse_redis_url(url) == expected
    assert PASSWORD not in repr(parse_redis_url(url))
    assert PASSWORD not in parse_redis_url(url).where()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h", "must start with redis://"),
        ("redis+sentinel://s1,s2", "needs the service name"),
        ("redis+sentinel://s1,,s2/m", "a host is missing"),
        ("redis+sentinel://s1:99999/m", "port must be a number"),
        ("redis+sentinel://s1/m/x", "database number"),
        ("redis+sentinel://s1/bad name/0", "service name"),
        ("redis+sentinel://s1/m?ssl_ca_certs=x", "takes no ?options"),
        ("redis://a,b", "only for redis+sentinel"),
        ("redis+cluster://n1/2", "only database 0"),
        ("redis://h/0/1", "database number"),
        ("redis://h:port", "port must be a number"),
    ],
)
def test_bad_urls_name_the_problem_not_the_url(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as info:
        parse_redis_url(url.replace("://", f"://u:{PASSWORD}@", 1))
    assert PASSWORD not in str(info.value)


def config(**redis: Any) -> dict[str, Any]:
    return {
        "upstream": {"base_url": "https://api.example.com", "api_key": "sk_x"},
        "redis": redis,
        "subscriptions": [{"name": "crm", "url": "https://crm.example.com/h", "secret": SECRET}],
    }


def problems(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, env=env or {})
    assert PASSWORD not in str(info.value)
    return info.value.problems


def test_credentials_from_the_settings_or_secret_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "spw").write_text("sentinel-pw\n")
    settings = parse_settings(
        config(
            url="redis+sentinel://s1,s2,s3/mymaster",
            username="callbridge",
            password=f"${{file:{tmp_path / 'pw'}}}",
            sentinel_password=f"${{file:{tmp_path / 'spw'}}}",
        ),
        env={},
    )
    target = settings.redis.target
    assert target is not None
    assert (target.username, target.password) == ("callbridge", PASSWORD)
    assert settings.redis.sentinel_password is not None
    assert settings.redis.sentinel_password.get_secret_value() == "sentinel-pw"
    assert PASSWORD not in repr(settings)


@pytest.mark.parametrize(
    ("redis", "says"),
    [
        ({"url": "redis+sentinel://s1"}, "redis.url: redis+sentinel:// needs the service name"),
        ({"url": "redis+sentinel://s1/m", "cluster": True}, "choose one"),
        ({"url": f"redis://:{PASSWORD}@h", "password": "other"}, "keep one"),
        ({"url": "redis://u@h", "username": "v"}, "keep one"),
        ({"url": "redis://h", "sentinel_password": "x"}, "only for redis+sentinel"),
        ({"url": "redis://h", "tls": {"verify": False}}, "does not use TLS"),
    ],
)
def test_bad_redis_settings_name_their_key(redis: dict[str, Any], says: str) -> None:
    assert any(says in p for p in problems(config(**redis))), problems(config(**redis))


def test_check_config_names_a_tls_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(url="rediss://h", tls={"ca_file": "/nonexistent/ca"})))
    assert main(["check-config", "--config", str(path)]) == 2
    assert "redis.tls.ca_file: cannot read /nonexistent/ca: No such file" in capsys.readouterr().err


def test_mutual_tls_needs_both_files(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    found = problems(config(url="rediss://h", tls={"cert_file": str(tmp_path / "c.pem")}))
    assert any("redis.tls: set cert_file and key_file together" in p for p in found), found


def test_check_config_exits_2_naming_redis_url_and_never_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config(url=f"redis+sentinel://cb:{PASSWORD}@s1:26379")))
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "redis.url: redis+sentinel:// needs the service name" in err
    assert PASSWORD not in err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config(url=f"rediss+sentinel://cb:{PASSWORD}@s1,s2/mymaster")))
    assert main(["check-config", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "redis: rediss+sentinel://s1:26379,s2:26379/mymaster" in out
    assert PASSWORD not in out


def test_the_readme_gives_the_acl_rule_the_code_needs() -> None:
    """The README's least-privileged user is `acl_rule()`, word for word (the ACL tests
    create that user; the start-up probe checks the same list)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert acl_rule() in readme
