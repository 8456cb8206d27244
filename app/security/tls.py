"""What a connection presents when security is on, and why a handshake was refused.

Kept apart from pki.py, which makes certificates: a client only reads its files.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg


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

    def problem(self) -> str | None:
        """Why the server would refuse these credentials, found by looking at them: with
        TLS 1.3 the server's alert can arrive after the client thinks the handshake is
        done, and the connection then just drops ("connection lost")."""
        import datetime

        from cryptography import x509

        if self.cert is None or self.key is None:
            return _REFUSALS[0][1]
        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
            ca = x509.load_pem_x509_certificate(self.ca.read_bytes())
        except (OSError, ValueError):
            return None
        if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
            return _REFUSALS[2][1]
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return _REFUSALS[1][1]
        return None


def read_context(path: Path) -> tuple[str, Credentials | None]:
    """A NATS CLI context file's url, and its credentials if it names a CA (cert and key
    optional). ValueError says what is wrong with the file."""
    try:
        loaded = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the context file {path}: {exc}") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("url", ""), str):
        raise ValueError(f"{path} is not a NATS context file (a JSON object with a url)")
    url = str(loaded.get("url", ""))
    if not loaded.get("ca"):
        return url, None
    cert, key = loaded.get("cert"), loaded.get("key")
    return url, Credentials(
        Path(cert) if cert else None, Path(key) if key else None, Path(loaded["ca"])
    )


def role_of(credentials: Credentials) -> str | None:
    """The Kaya role a certificate stands for (`CN=kaya-<role>`), or None."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    if credentials.cert is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(credentials.cert.read_bytes())
    except (OSError, ValueError):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    return name.removeprefix("kaya-") if name.startswith("kaya-") else None


class CheckedClient(NATS):
    """A connection that refuses, before sending, a request its role may not publish.

    nats-server answers a forbidden JetStream API call with nothing at all (no -ERR, as it
    does for core publishes), so a tool would wait out its timeout; the role's permissions
    are known here (they are generated, see permissions.py), so it says `forbidden` now.
    """

    def __init__(self, allowed: Callable[[str], bool]) -> None:
        super().__init__()
        self._allowed = allowed

    async def request(self, subject: str, *args: Any, **kwargs: Any) -> Msg:
        if not self._allowed(subject):
            raise PermissionError(f"this role may not publish to {subject}")
        return await super().request(subject, *args, **kwargs)


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


def why_refused(errors: Sequence[BaseException], credentials: Credentials | None) -> str | None:
    """Why a connection attempt that failed with `errors` was refused, if it was a TLS
    refusal: from the server's alert, or (when TLS 1.3 lost it and the connection merely
    dropped) from the credentials themselves."""
    refused = next((r for r in map(tls_refusal, errors) if r is not None), None)
    if refused is None and credentials is not None:
        refused = credentials.problem()
    return refused


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


_VIOLATION = re.compile(r'permissions violation for publish to "?([^"\s]+)"?', re.IGNORECASE)


class Violations:
    """Publishes the server refused on one connection, told to the request that made them.

    A forbidden publish is not an error on the publishing call: nats-server reports it
    asynchronously (`-ERR 'Permissions Violation for Publish to "<subject>"'`, nats-py's
    error callback), and a request simply gets no reply. Kaya's clients hand that callback
    here and race each request against it, so a caller hears `forbidden` in milliseconds
    instead of a timeout seconds later.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[str]] = {}

    def seen(self, exc: BaseException) -> bool:
        """Feed an error from the connection's error callback; True if it was a violation."""
        found = _VIOLATION.search(str(exc))
        if found is None:
            return False
        refused = found.group(1)
        for subject, future in list(self._waiting.items()):
            if _same(subject, refused) and not future.done():
                future.set_result(refused)
        return True

    async def request(
        self,
        nc: NATS,
        subject: str,
        body: bytes,
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        """`nc.request`, or PermissionError naming the subject as soon as it is refused."""
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[subject] = refused
        try:
            reply: asyncio.Future[Msg] = asyncio.ensure_future(
                nc.request(subject, body, timeout=timeout, headers=headers)
            )
            racing: set[asyncio.Future[Any]] = {reply, refused}
            done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            if refused in done:
                reply.cancel()
                raise PermissionError(f"this role may not publish to {refused.result()}")
            return reply.result()
        finally:
            if self._waiting.get(subject) is refused:
                del self._waiting[subject]


def _same(requested: str, refused: str) -> bool:
    """Whether a refused subject is the request's, or what the server's mapping made of it
    (`kaya.cmd.account.a1` is refused as `kaya.shard.3.cmd.account.a1`)."""
    if requested == refused:
        return True
    tail = requested.split(".", 1)[1] if requested.startswith("kaya.") else ""
    return bool(tail) and refused.startswith("kaya.shard.") and refused.endswith("." + tail)
