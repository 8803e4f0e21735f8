"""TLS against a real https mock server whose certificate a CA made here signs:
what an untrusted certificate says, --ca-bundle, SSL_CERT_FILE, bad bundles."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from batchrun.errors import UsageError
from batchrun.mock.server import MockServer
from batchrun.runner import EXIT_FATAL, Clock, run_async
from batchrun.state import StateDir
from tests.conftest import chat, make_config, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
ROWS = [chat(f"row {i}") for i in range(5)]


@dataclass(frozen=True)
class Pki:
    ca_pem: Path  # the CA's certificate: what --ca-bundle takes
    server_context: ssl.SSLContext


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, issuer: str, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_pki(directory: Path, *, host_ip: str = "127.0.0.1") -> Pki:
    """A private CA and a server certificate it signs for ``host_ip``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        _certificate("batchrun test CA", "batchrun test CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        _certificate("mock provider", "batchrun test CA", key)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host_ip))]), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem = directory / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(pem))
    chain = directory / "server.pem"
    chain.write_bytes(leaf.public_bytes(pem))
    key_pem = directory / "server.key"
    key_pem.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain, key_pem)
    return Pki(ca_pem=ca_pem, server_context=context)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    return make_pki(directory)


@pytest_asyncio.fixture
async def https_server(pki: Pki) -> AsyncIterator[MockServer]:
    async with MockServer(tls=pki.server_context) as mock:
        yield mock


@pytest.mark.asyncio
async def test_an_untrusted_certificate_says_it_is_the_certificate(
    tmp_path: Path, https_server: MockServer
) -> None:
    config = make_config(tmp_path, ROWS, https_server)
    assert config.base_urls[0].startswith("https://")

    with anyio.fail_after(20):
        summary = await run_async(config, clock=Clock())

    assert summary.exit_code == EXIT_FATAL
    advice = summary.aborted or ""
    assert "certificate" in advice
    assert "unable to get local issuer certificate" in advice  # OpenSSL's own reason
    assert "--ca-bundle" in advice
    assert "SSL_CERT_FILE" in advice
    assert "the quota" not in advice
    assert advice.endswith("then run the same command again: it resumes where it stopped")
    assert https_server.stats.requests == 0  # nothing got past the handshake
    assert not config.out.exists()
    assert StateDir(config.out).read_finished() is None  # resumable


@pytest.mark.asyncio
async def test_batch_mode_says_the_certificate_stopped_it_not_an_answer(
    tmp_path: Path, https_server: MockServer
) -> None:
    config = make_config(tmp_path, ROWS, https_server, mode="batch", poll_interval=0.05)

    with anyio.fail_after(20):
        summary = await run_async(config, clock=Clock())

    assert summary.exit_code == EXIT_FATAL
    advice = summary.aborted or ""
    assert advice.startswith("no request could reach the provider (tls_certificate)")
    assert "the provider answered" not in advice
    assert "--ca-bundle" in advice


@pytest.mark.asyncio
async def test_ca_bundle_trusts_a_private_ca_and_resumes_the_stopped_run(
    tmp_path: Path, https_server: MockServer, pki: Pki
) -> None:
    with anyio.fail_after(20):
        stopped = await run_async(make_config(tmp_path, ROWS, https_server), clock=Clock())
        assert stopped.exit_code == EXIT_FATAL
        config = make_config(tmp_path, ROWS, https_server, ca_bundle=str(pki.ca_pem))
        summary = await run_async(config, clock=Clock())

    assert summary.exit_code == 0
    out = read_jsonl(config.out)
    assert [row["response"]["status_code"] for row in out] == [200] * len(ROWS)
    assert https_server.stats.requests == len(ROWS)


@pytest.mark.asyncio
async def test_ssl_cert_file_keeps_working(
    tmp_path: Path, https_server: MockServer, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_pem))
    config = make_config(tmp_path, ROWS, https_server)

    with anyio.fail_after(20):
        summary = await run_async(config, clock=Clock())

    assert summary.exit_code == 0
    assert https_server.stats.requests == len(ROWS)


@pytest.mark.asyncio
async def test_a_certificate_for_another_host_names_the_mismatch(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir()
    other = make_pki(directory, host_ip="10.9.8.7")
    async with MockServer(tls=other.server_context) as server:
        config = make_config(tmp_path, ROWS, server, ca_bundle=str(other.ca_pem))
        with anyio.fail_after(20):
            summary = await run_async(config, clock=Clock())

    assert summary.exit_code == EXIT_FATAL
    advice = summary.aborted or ""
    assert "IP address mismatch" in advice
    # The CA is trusted already: the URL's host is what to fix.
    assert "the certificate is not for 127.0.0.1: give --base-url the host name it names" in advice
    assert "--ca-bundle PEM" not in advice


@pytest.mark.asyncio
@pytest.mark.parametrize("content", [None, b"", b"not a certificate\n"])
async def test_a_missing_or_invalid_bundle_is_a_usage_error_before_any_request(
    tmp_path: Path, https_server: MockServer, content: bytes | None
) -> None:
    bundle = tmp_path / "bundle.pem"
    if content is not None:
        bundle.write_bytes(content)
    config = make_config(tmp_path, ROWS, https_server, ca_bundle=str(bundle))

    with pytest.raises(UsageError, match="--ca-bundle"):
        await run_async(config, clock=Clock())
    assert https_server.stats.requests == 0
    assert not StateDir(config.out).root.exists()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_cli_bad_bundle_exits_2_with_one_line(
    tmp_path: Path, https_server: MockServer
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    argv = [
        sys.executable, "-m", "batchrun", "run", str(source), "--out", str(tmp_path / "o.jsonl"),
        "--provider", "openai", "--base-url", https_server.base_url,
        "--ca-bundle", str(tmp_path / "nowhere.pem"), "--no-progress",
    ]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-test"}
    with anyio.fail_after(30):
        done = await anyio.run_process(argv, env=env, cwd=ROOT, check=False)

    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert lines == [f"batchrun: error: --ca-bundle {tmp_path / 'nowhere.pem'} does not exist"
                     " or is not a file"]  # fmt: skip
    assert https_server.stats.requests == 0


async def _front(target_port: int) -> tuple[asyncio.Server, list[int]]:
    """A TCP front: its first connection is held silent (a TLS handshake that
    never ends), every later one is piped to ``target_port``."""
    seen = [0]

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        if seen[0] == 1:
            await reader.read()  # silent until the client gives up
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0), seen


@pytest.mark.asyncio
async def test_an_attempt_timed_out_in_its_handshake_leaves_no_doubt(
    tmp_path: Path, pki: Pki
) -> None:
    # Attempt 1 times out (--request-timeout) in its TLS handshake: no byte of
    # the request was written. Attempt 2 gets a 401: not billed either. Taking
    # the timeout for a possibly billed attempt kept the row in doubt.
    async with MockServer(tls=pki.server_context) as https:
        listener, seen = await _front(https.port)
        port = listener.sockets[0].getsockname()[1]
        config = make_config(
            tmp_path, [chat("r mock:fail=401")], https,
            base_url=f"https://127.0.0.1:{port}/v1", ca_bundle=str(pki.ca_pem),
            request_timeout=1, connect_timeout=30, backoff_initial=0.01,
        )  # fmt: skip
        try:
            with anyio.fail_after(30):
                summary = await run_async(config, clock=Clock())
        finally:
            listener.close()

    assert seen[0] == 2
    assert https.stats.requests == 1
    assert summary.exit_code == EXIT_FATAL
    assert summary.extra["in doubt"] == 0
