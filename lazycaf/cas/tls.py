"""TLS for the project's HTTP clients (the CAS client and the peer client): the one place
that decides which certificates a client trusts, and that names a certificate that did not
verify.

Trust, first match wins: ``--cacert FILE`` (that CA bundle only, as curl's ``--cacert``),
then ``$SSL_CERT_FILE`` / ``$SSL_CERT_DIR`` (the variables OpenSSL and httpx honour), then
the system's store (``ssl.create_default_context()``; not certifi's bundle, so a CA an
operator installed on the host is trusted). A named file that cannot be loaded is a
``UsageError`` naming it, not a failure at the first request.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from lazycaf.core.errors import UsageError

__all__ = ["certificate_failure", "client_ssl_context"]


def client_ssl_context(cacert: Path | None = None) -> ssl.SSLContext:
    """A verifying client context (hostnames checked) trusting what the module docstring
    says. Building it reads the CA files: call it once per client, for https only."""
    try:
        if cacert is not None:
            return ssl.create_default_context(cafile=str(cacert))
        if cafile := os.environ.get("SSL_CERT_FILE"):
            return ssl.create_default_context(cafile=cafile)
        if capath := os.environ.get("SSL_CERT_DIR"):
            return ssl.create_default_context(capath=capath)
    except (OSError, ssl.SSLError) as exc:
        what = f"--cacert {cacert}" if cacert is not None else _env_source()
        reason = str(exc) if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc)
        raise UsageError(f"cannot load the CA certificates of {what}: {reason}") from exc
    return ssl.create_default_context()


def _env_source() -> str:
    if cafile := os.environ.get("SSL_CERT_FILE"):
        return f"SSL_CERT_FILE={cafile}"
    return f"SSL_CERT_DIR={os.environ.get('SSL_CERT_DIR', '')}"


def certificate_failure(exc: BaseException) -> str | None:
    """Why the server's certificate did not verify, when that is what ``exc`` (an httpx
    transport error) comes down to; None for any other failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or current.reason or str(current)
        current = current.__cause__ or current.__context__
    # httpx/httpcore re-raise some failures by message only
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return text.split("certificate verify failed:", 1)[-1].split("(_ssl.c", 1)[0].strip()
    return None
