"""What a connection presents when security is on, and why a handshake was refused.

Kept apart from pki.py (which makes certificates, with `cryptography`): a client only
needs its files and the standard library's `ssl`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Credentials:
    """What one connection presents: its certificate and key, and the CA it trusts."""

    cert: Path | None
    key: Path | None
    ca: Path

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context


_REFUSALS = (
    (
        "CERTIFICATE_REQUIRED",
        "the server requires a client certificate: connect with a context that has cert and"
        " key (<data_dir>/security/contexts/kaya-<role>.json)",
    ),
    (
        "UNKNOWN_CA",
        "the server does not trust this client certificate (it is not from the server's CA)",
    ),
    (
        "CERTIFICATE_EXPIRED",
        "the server refused this client certificate: it has expired (`kaya security init`"
        " makes new ones)",
    ),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the server's certificate is not from a CA this client trusts: security is on there;"
        " connect with --context <data_dir>/security/contexts/kaya-<role>.json",
    ),
)


def tls_refusal(exc: BaseException) -> str | None:
    """One line saying why a TLS handshake failed, for the person who connects; None if
    `exc` is not a TLS failure."""
    if not isinstance(exc, ssl.SSLError):
        return None
    text = str(exc)
    for marker, reason in _REFUSALS:
        if marker in text:
            return reason
    return f"TLS handshake failed: {exc.reason or text}"


def tls_url(url: str) -> str:
    """`nats://h:p` as `tls://h:p`: a client that must not fall back to plaintext."""
    return ",".join(
        "tls://" + part.split("://", 1)[1] if "://" in part else f"tls://{part}"
        for part in (p.strip() for p in url.split(","))
        if part
    )
