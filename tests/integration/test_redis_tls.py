"""Redis over TLS (issue 21): a real TLS-enabled redis-server, certificates made by
``openssl``. The bridge polls, commits and delivers over ``rediss://`` with a CA file,
and with mutual TLS; a wrong CA, an expired certificate or a missing client
certificate stop the start in one line naming the setting to fix. The turbulence
runs over TLS are in `test_turbulence_redis.py` (slow)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from callbridge.app import Bridge
from callbridge.errors import RedisUnavailableError
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.store.preflight import check_reachable
from tests.support.bridges import run_to_the_end
from tests.support.receivers import Receiver
from tests.support.servers import free_port, start_server
from tests.support.settings import API_KEY, SECRET, make_settings
from tests.support.startup import assert_one_line, cannot_start
from tests.support.tls import (
    Certificates,
    make_certificates,
    tls_args,
    tls_client,
    tls_server_binary,
)


@dataclass(frozen=True)
class TlsServers:
    certs: Certificates
    port: int  # a client certificate is optional
    mutual_port: int  # a client certificate is required
    expired_port: int  # presents a certificate that expired in 2020


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServers]:
    binary = tls_server_binary()
    root = tmp_path_factory.mktemp("tls")
    certs = make_certificates(root / "certs")
    ports = [free_port() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port, clients, cert in zip(
            ports, ("optional", "yes", "optional"), (None, None, certs.expired_cert), strict=True
        ):
            args = [*tls_args(certs, clients=clients, cert=cert), "--port", "0"]
            probe = tls_client(certs, verify=cert is None)
            args += ["--tls-port", str(port)]
            procs.append(start_server(root / str(port), port, *args, binary=binary, client=probe))
        yield TlsServers(certs, *ports)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def redis_tls(tls: TlsServers, *, mutual: bool = False, ca: Path | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {"ca_file": str(ca or tls.certs.ca)}
    if mutual:
        settings.update(cert_file=str(tls.certs.client_cert), key_file=str(tls.certs.client_key))
    return settings


@pytest.mark.parametrize("mutual", [False, True], ids=["ca_file", "mutual_tls"])
async def test_poll_commit_deliver_over_tls(
    tls: TlsServers, mutual: bool, aiohttp_server: Any
) -> None:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=6, calls_per_batch=15))
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    port = tls.mutual_port if mutual else tls.port
    settings = make_settings(
        str(upstream.make_url("")),
        f"rediss://127.0.0.1:{port}/0",
        batches=sim.batch_ids,
        subscriptions=[{"name": "crm", "url": str(hook.make_url("/hook")), "secret": SECRET}],
        redis={"key_prefix": f"tls{int(mutual)}", "tls": redis_tls(tls, mutual=mutual)},
    )
    await check_reachable(settings.redis.url or "", settings.redis)
    svc = await Bridge.create(settings, replica_id="tls")
    try:
        await svc.registry.register_config(settings.batches)
        await run_to_the_end(svc, sim, 100)
    finally:
        await svc.close()
    payloads = receiver.verify_all(SECRET)
    assert [p["type"] for p in payloads].count("batch.completed") == 1


async def test_a_wrong_ca_stops_the_start_in_one_line_naming_the_ca_file(
    tls: TlsServers, tmp_path: Path
) -> None:
    url = f"rediss://:s3cret@127.0.0.1:{tls.port}/0"
    code, seconds, lines = await cannot_start(
        tmp_path, url, tls=redis_tls(tls, ca=tls.certs.other_ca)
    )
    assert code == 3, lines
    assert seconds < 10
    assert_one_line(lines, "its TLS certificate is not trusted")
    assert f"redis.tls.ca_file ({tls.certs.other_ca})" in lines[-1]


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("expired", "not trusted (certificate has expired): check redis.tls.ca_file"),
        ("no_client_certificate", "refused our client certificate"),
    ],
)
async def test_tls_problems_are_named(tls: TlsServers, case: str, says: str) -> None:
    port = {"expired": tls.expired_port, "no_client_certificate": tls.mutual_port}[case]
    url = f"rediss://127.0.0.1:{port}/0"
    settings = make_settings("http://127.0.0.1:1", url, redis={"tls": redis_tls(tls)})
    with pytest.raises(RedisUnavailableError) as info:
        await check_reachable(url, settings.redis)
    assert says in str(info.value), str(info.value)
    if case == "no_client_certificate":
        assert "redis.tls.cert_file" in str(info.value)
