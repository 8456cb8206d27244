"""A development PKI: one CA, a server certificate, and a client certificate per role.

    <dir>/ca.pem, ca.key                   the CA (EC P-256, 10 years)
    <dir>/server.pem, server.key           nats-server's (SAN: localhost, 127.0.0.1, hosts)
    <dir>/route.pem, route.key             CN=kaya-route, what the servers of a cluster present
                                           to each other on their routes (same SANs)
    <dir>/<role>.pem, <role>.key           CN=kaya-<role> for admin, node, client, reader
    <dir>/contexts/kaya-<role>.json        a NATS CLI context per role (url, cert, key, ca)

With security on, every connection to NATS is TLS with a client certificate signed by
this CA, and the certificate is the credential: nats-server maps its subject
(`CN=kaya-node`) to the user whose permissions the role has (`verify_and_map`), so there
is no password to leak or rotate apart from the key files. Made once, on first start or
by `kaya security init`; existing files are never overwritten (a node restarting keeps
its identity). Keys are written 0600. For production, put certificates from your own
CA at the same paths: nothing here cares who signed them, only nats-server does (a route
certificate must keep CN=kaya-route and both serverAuth and clientAuth, see `issue`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kaya.app.security.tls import Credentials

ROLES = ("admin", "node", "client", "reader")
CA_DAYS = 3650
LEAF_DAYS = 825


ROUTE_SUBJECT = "CN=kaya-route"
"""The only subject a cluster's servers accept on their route port: every role's
certificate comes from the same CA, so without this a client could dial a route port
and pose as a server, outside every permission (the cluster maps it, `verify_and_map`)."""


def role_subject(role: str) -> str:
    """The certificate subject nats-server maps to the role's user (RFC 2253 form)."""
    return f"CN=kaya-{role}"


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def route_cert(self) -> Path:
        return self.dir / "route.pem"

    @property
    def route_key(self) -> Path:
        return self.dir / "route.key"

    def role(self, role: str) -> Credentials:
        return Credentials(self.dir / f"{role}.pem", self.dir / f"{role}.key", self.ca)

    def has(self, role: str) -> bool:
        creds = self.role(role)
        return all(p is not None and p.exists() for p in (creds.cert, creds.key, creds.ca))

    def context_file(self, role: str) -> Path:
        return self.dir / "contexts" / f"kaya-{role}.json"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server_hosts: list[str] | None = None,
    peer: bool = False,
    not_before: datetime.datetime | None = None,
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by the CA: a server's (with `server_hosts` as SANs) or a
    client's. `peer` (with `server_hosts`): a route's, which is a server when its peers
    dial it and a client when it dials them, so it needs both usages or the TLS handshake
    fails one way round. `not_before`/`days` let a test make one that has already expired."""
    key = _key()
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server_hosts is not None:
        names: list[x509.GeneralName] = []
        for host in server_hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        if peer:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def new_ca(
    common_name: str = "Kaya development CA",
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def ensure_pki(directory: Path, *, hosts: list[str]) -> Pki:
    """The PKI under `directory`, made if missing (never overwritten)."""
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_key_path = directory / "ca.key"
    if pki.ca.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    else:
        ca_cert, ca_key = new_ca()
        _write_key(ca_key_path, ca_key)
        _write_cert(pki.ca, ca_cert)
    server_hosts = sorted({"localhost", "127.0.0.1", *hosts})
    if not (pki.server_cert.exists() and pki.server_key.exists()):
        cert, key = issue(ca_cert, ca_key, "kaya-server", server_hosts=server_hosts)
        _write_key(pki.server_key, key)
        _write_cert(pki.server_cert, cert)
    if not (pki.route_cert.exists() and pki.route_key.exists()):  # also added to an older PKI
        route_name = ROUTE_SUBJECT.removeprefix("CN=")
        cert, key = issue(ca_cert, ca_key, route_name, server_hosts=server_hosts, peer=True)
        _write_key(pki.route_key, key)
        _write_cert(pki.route_cert, cert)
    for role in ROLES:
        if not pki.has(role):
            creds = pki.role(role)
            assert creds.cert is not None
            assert creds.key is not None
            cert, key = issue(ca_cert, ca_key, f"kaya-{role}")
            _write_key(creds.key, key)
            _write_cert(creds.cert, cert)
    return pki


def write_contexts(pki: Pki, url: str) -> list[Path]:
    """A NATS CLI context per role (`nats --context <file> ...`; `kaya ... --context`)."""
    written = []
    for role in ROLES:
        creds = pki.role(role)
        path = pki.context_file(role)
        path.parent.mkdir(parents=True, exist_ok=True)
        assert creds.cert is not None
        assert creds.key is not None
        body = {
            "description": f"Kaya {role} (written by kaya; certificate CN=kaya-{role})",
            "url": url,
            "cert": str(creds.cert.resolve()),
            "key": str(creds.key.resolve()),
            "ca": str(creds.ca.resolve()),
        }
        path.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
        written.append(path)
    return written


def store_key(directory: Path) -> str:
    """The key the embedded server encrypts JetStream's files with: `$KAYA_JETSTREAM_KEY`
    if set, else `<dir>/jetstream.key`, made once (0600) like the certificates. Lose it
    and the stream files are unreadable: the events are in every node's SQLite too."""
    from_env = os.environ.get("KAYA_JETSTREAM_KEY", "")
    if from_env:
        return from_env
    path = directory / "jetstream.key"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text().strip()
