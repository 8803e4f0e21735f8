"""TLS for the run's session: which CAs are trusted, and what a failed
verification tells the user to do.

The trusted CAs are the system's (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are
honoured, as by every OpenSSL program) plus those of ``--ca-bundle``, for a
server behind a private CA. A bundle that cannot be read is a usage error
before any request.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from batchrun.connections import ConnectFailed
from batchrun.errors import FatalError, UsageError

TRUST_ADVICE = (
    "if the server's certificate comes from a private CA, pass that CA's certificate"
    " with --ca-bundle PEM (job key ca_bundle) or set SSL_CERT_FILE"
)


def client_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """A verifying client context: the default CAs, plus ``ca_bundle`` (PEM)."""
    context = ssl.create_default_context()
    if ca_bundle is None:
        return context
    if not ca_bundle.is_file():
        raise UsageError(f"--ca-bundle {ca_bundle} does not exist or is not a file")
    try:
        context.load_verify_locations(cafile=ca_bundle)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise UsageError(
            f"--ca-bundle {ca_bundle} holds no readable PEM certificate ({exc})"
        ) from None
    return context


def tls_failure(exc: BaseException) -> FatalError | None:
    """The fatal error for a TLS failure, saying what to fix; None if ``exc``
    is not one."""
    if isinstance(exc, ConnectFailed):
        if isinstance(exc.cause, ssl.SSLCertVerificationError):
            return untrusted(exc.host, exc.port, exc.cause)
        exc = exc.cause
    if isinstance(exc, ssl.SSLError):
        return FatalError("tls_error", f"the TLS handshake failed: {exc}")
    return None


def untrusted(host: str | None, port: int | None, cause: BaseException) -> FatalError:
    """The fatal error for a server certificate ``cause`` refused."""
    reason = getattr(cause, "verify_message", None) or str(cause)
    if getattr(cause, "verify_code", None) in _NAME_MISMATCH:
        # A trusted certificate for another name: the URL's host is what to fix.
        advice = f"the certificate is not for {host}: give --base-url the host name it names"
    else:
        advice = TRUST_ADVICE
    return FatalError(
        "tls_certificate",
        f"the TLS certificate of {host}:{port} was not accepted: {reason}; {advice}",
    )


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})
