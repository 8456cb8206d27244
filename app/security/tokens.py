"""Bearer tokens: `Authorization: Bearer <JWT>` checked into the `Caller` a policy judges.

    request header -> TokenVerifier.verify -> Caller(sub, claims) -> the app's Policy

On with `[security.jwt]`; the ingress calls `verify` on every command, query and view
request, on the event loop, and answers `unauthorized` with its one-line message when
it raises. Decisions, and why:

- Asymmetric only (ES256, RS256; `algorithms` may narrow it). `none` is never accepted,
  nor HS*: with HS* the verifier's public key, which is no secret, would sign tokens (the
  classic algorithm confusion). The token's `alg` must also be the algorithm of the key
  it is checked with, so one kind of key never checks another kind's signature.
- `exp`, `iss`, `aud` and `sub` are required, `nbf` checked when present: a token
  without an end lives forever once leaked, one without issuer and audience is accepted
  from any issuer trusting the same key or made for another service, and `sub` is the
  caller a policy names. The node's own clock decides, within `leeway` seconds.
- Keys are read once, at construction: a PEM public key or certificate (`key_file`) or a
  JWKS (`jwks_file`, the key picked by the token's `kid`). A bad file is a `ValueError`
  naming it, which stops start-up. Rotation is a restart: no network fetch on the
  request path, and no verifier that half-knows the new keys.
- Verified tokens are cached (LRU, 4096 by default) as (Caller, expiry): a client sends
  the same token with every request, and an ES256 check costs ~100 µs of the loop, a
  cache hit ~1 µs. A hit checks the expiry again, so a cached token stops working when
  it expires; only tokens that passed every check are cached, so a flood of bad tokens
  cannot push out good ones without costing their sender a signature each.

Messages say what was wrong and never repeat the token. The issuer and audience
expected are named (they are not secrets, and the mismatch is the usual mistake).
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from kaya.actors.errors import Unauthorized
from kaya.actors.policy import Caller

if TYPE_CHECKING:
    from kaya.app.config import Config, JwtConfig

ACCEPTED = ("ES256", "RS256")
"""Every algorithm a verifier may be configured with."""
REQUIRED = ("exp", "iss", "aud", "sub")
MAX_TOKEN = 16 * 1024
"""Longer bearer tokens are refused before any parsing: it bounds the work per request."""
MIN_RSA_BITS = 2048
CACHE_SIZE = 4096
SIGNING_KEY = "jwt-signing.key"
PUBLIC_KEY = "jwt-public.pem"


@dataclass(frozen=True)
class VerifierStatistics:
    """A snapshot: tokens held in the cache, and verifications answered from it or not."""

    cached: int
    hits: int
    misses: int


class TokenVerifier:
    """Checks bearer tokens against one issuer's keys; built once per node.

    `directory` is where relative key paths are (`from_config` passes the security dir);
    `clock` gives the current Unix time (tests pass their own).
    """

    def __init__(
        self,
        settings: JwtConfig,
        *,
        directory: Path | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        if not settings.issuer or not settings.audience:
            raise ValueError("security.jwt.issuer and security.jwt.audience are required")
        if bool(settings.key_file) == bool(settings.jwks_file):
            raise ValueError(
                "exactly one of security.jwt.key_file and security.jwt.jwks_file is required"
            )
        algorithms = tuple(settings.algorithms)
        unknown = [alg for alg in algorithms if alg not in ACCEPTED]
        if unknown or not algorithms:
            raise ValueError(
                f"security.jwt.algorithms may hold only {', '.join(ACCEPTED)}, not {unknown}"
            )
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, not {cache_size}")
        base = directory if directory is not None else Path()
        if settings.key_file:
            path = base / settings.key_file
            keys = [_load_key_file(path, algorithms)]
            by_kid: dict[str, jwt.PyJWK] = {}  # a PEM key has no id: the token's kid is moot
        else:
            path = base / settings.jwks_file
            keys = _load_jwks(path, algorithms)
            by_kid = {key.key_id: key for key in keys if key.key_id is not None}
        self._default = keys[0] if len(keys) == 1 else None
        self._by_kid = by_kid
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._algorithms = algorithms
        self._accepted = ", ".join(algorithms)
        self._leeway = float(settings.leeway)
        self._clock = clock
        self._jws = jwt.PyJWS(algorithms=list(algorithms))
        self._cache: OrderedDict[str, tuple[Caller, float]] = OrderedDict()
        self._cache_size = cache_size
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_config(
        cls, config: Config, *, clock: Callable[[], float] = time.time
    ) -> TokenVerifier:
        """The verifier of `[security.jwt]`, its relative key paths under the security dir."""
        return cls(config.security.jwt, directory=config.security_dir, clock=clock)

    def statistics(self) -> VerifierStatistics:
        return VerifierStatistics(cached=len(self._cache), hits=self._hits, misses=self._misses)

    def verify(self, authorization: str | None) -> Caller:
        """The caller an `Authorization` header's token names; `Unauthorized` saying why not."""
        token = _bearer(authorization)
        cached = self._cache.get(token)
        if cached is not None:
            caller, deadline = cached
            if self._clock() < deadline:
                self._hits += 1
                self._cache.move_to_end(token)
                return caller
            del self._cache[token]
            raise Unauthorized("the bearer token has expired")
        self._misses += 1
        caller, deadline = self._check(token)
        caller = Caller(caller.subject, caller.claims, token)  # to ask another node for it
        self._cache[token] = (caller, deadline)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return caller

    def _check(self, token: str) -> tuple[Caller, float]:
        """Signature, then claims: (the caller, the time from which it has expired)."""
        try:
            header = self._jws.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized(_MALFORMED) from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise Unauthorized(
                f"the bearer token's algorithm {_short(alg)} is not accepted"
                f" (accepted: {self._accepted})"
            )
        key = self._key(header.get("kid"))
        if key.algorithm_name != alg:
            raise Unauthorized(
                f"the bearer token is signed with {alg}, but its key is for {key.algorithm_name}"
            )
        try:
            # the key object, not the PyJWK: older PyJWT takes only that (alg checked above)
            decoded = self._jws.decode_complete(token, key=key.key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            raise Unauthorized("the bearer token's signature does not verify") from None
        except jwt.PyJWTError:
            raise Unauthorized(_MALFORMED) from None
        try:
            claims = orjson.loads(decoded["payload"])
        except orjson.JSONDecodeError:
            claims = None
        if not isinstance(claims, dict):
            raise Unauthorized("the bearer token's payload is not a JSON object")
        return self._caller(claims)

    def _key(self, kid: Any) -> jwt.PyJWK:
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("the bearer token's key id (kid) is not a string")
        if kid is not None and self._by_kid:
            key = self._by_kid.get(kid)
            if key is None:
                raise Unauthorized(f"the bearer token's key id (kid) {_short(kid)} is not trusted")
            return key
        if self._default is None:
            raise Unauthorized(
                f"the bearer token names no key (kid), and {len(self._by_kid)} keys are trusted"
            )
        return self._default

    def _caller(self, claims: dict[str, Any]) -> tuple[Caller, float]:
        for name in REQUIRED:
            if name not in claims:
                raise Unauthorized(
                    f"the bearer token has no `{name}` claim (required: {', '.join(REQUIRED)})"
                )
        exp, nbf = claims["exp"], claims.get("nbf")
        if not _is_number(exp):
            raise Unauthorized("the bearer token's `exp` claim is not a number")
        if nbf is not None and not _is_number(nbf):
            raise Unauthorized("the bearer token's `nbf` claim is not a number")
        now = self._clock()
        deadline = exp + self._leeway
        if now >= deadline:
            raise Unauthorized("the bearer token has expired")
        if nbf is not None and nbf > now + self._leeway:
            raise Unauthorized("the bearer token is not valid yet (its `nbf` is ahead)")
        issuer = claims["iss"]
        if issuer != self._issuer:
            raise Unauthorized(
                f"the bearer token's issuer is {_short(issuer)}, not {self._issuer!r}"
            )
        audience = claims["aud"]
        if not (
            audience == self._audience
            or (isinstance(audience, list) and self._audience in audience)
        ):
            raise Unauthorized(
                f"the bearer token's audience {_short(audience)} does not include"
                f" {self._audience!r}"
            )
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("the bearer token's `sub` claim is not a non-empty string")
        return Caller(subject=subject, claims=claims), deadline


_MALFORMED = "the bearer token is not a well-formed JWT (header.payload.signature)"


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("Authorization: Bearer <JWT> is required")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:  # the scheme is case-insensitive (RFC 7235)
        raise Unauthorized("the Authorization header must be `Bearer <JWT>`")
    if len(token) > MAX_TOKEN:
        raise Unauthorized(f"the bearer token is longer than {MAX_TOKEN} characters")
    return token


def _is_number(value: Any) -> bool:
    """A Unix time a token may carry: finite and not absurd (an int past any float would
    overflow the arithmetic; NaN would never compare as expired)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e15


def _short(value: Any) -> str:
    """A claim or header value for a message: repr, cut short (it may come from anyone)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- keys ---------------------------------------------------------------------------------


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"security.jwt.{key} {path}: cannot read it ({exc.strerror})") from None


def _public_jwk(
    public: Any, where: str, algorithms: Sequence[str], kid: str | None = None
) -> jwt.PyJWK:
    """A cryptography public key as a PyJWK bound to its algorithm, checked against policy."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ec.SECP256R1):
            raise ValueError(f"{where}: an EC key on {public.curve.name}; only P-256 (ES256)")
        alg, data = "ES256", ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"{where}: an RSA key of {public.key_size} bits; at least {MIN_RSA_BITS}"
            )
        alg, data = "RS256", RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        raise ValueError(f"{where}: a {type(public).__name__}; only EC P-256 or RSA keys")
    if alg not in algorithms:
        raise ValueError(
            f"{where}: an {alg} key, but security.jwt.algorithms accepts only"
            f" {', '.join(algorithms)}"
        )
    if kid is not None:
        data["kid"] = kid
    return jwt.PyJWK(data, algorithm=alg)


def _load_key_file(path: Path, algorithms: Sequence[str]) -> jwt.PyJWK:
    where = f"security.jwt.key_file {path}"
    data = _read(path, "key_file")
    if b"PRIVATE KEY" in data:
        raise ValueError(
            f"{where}: holds a private key; give the verifier the public key or certificate"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{where}: not a PEM public key or X.509 certificate") from None
    return _public_jwk(public, where, algorithms)


def _load_jwks(path: Path, algorithms: Sequence[str]) -> list[jwt.PyJWK]:
    """The JWKS's signing keys of an accepted algorithm; those of others are left out."""
    where = f"security.jwt.jwks_file {path}"
    try:
        document = json.loads(_read(path, "jwks_file"))
    except (ValueError, RecursionError):
        raise ValueError(f"{where}: not valid JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: not a JWKS (a JSON object with a non-empty `keys` list)")
    keys: list[jwt.PyJWK] = []
    left_out: list[str] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: keys[{index}] is not a JSON object")
        kid = entry.get("kid")
        name = f"keys[{index}]" + (f" (kid {kid!r})" if kid is not None else "")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"{where}: {name}: `kid` must be a string")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key of the same issuer: not for signatures
        if entry.get("kty") == "oct" or "d" in entry:
            raise ValueError(
                f"{where}: {name} is a private or secret key; a JWKS for verifying holds"
                " public keys only"
            )
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise ValueError(f"{where}: {name}: {str(exc)[:200]}") from None
        if jwk.algorithm_name not in algorithms:
            left_out.append(f"{name} {jwk.algorithm_name}")
            continue
        keys.append(_public_jwk(jwk.key, f"{where}: {name}", algorithms, kid))
    if not keys:
        raise ValueError(
            f"{where}: no signing key of an accepted algorithm ({', '.join(algorithms)});"
            f" left out: {', '.join(left_out) or 'none'}"
        )
    kids = [key.key_id for key in keys]
    if len(keys) > 1 and None in kids:
        raise ValueError(f"{where}: with more than one key, every key needs a `kid`")
    duplicates = sorted({kid for kid in kids if kid is not None and kids.count(kid) > 1})
    if duplicates:
        raise ValueError(f"{where}: more than one key has kid {duplicates[0]!r}")
    return keys


# ---- development tokens -------------------------------------------------------------------


def mint(
    private_key_pem: bytes,
    *,
    subject: str,
    issuer: str,
    audience: str,
    ttl: float = 3600,
    claims: dict[str, Any] | None = None,
    kid: str | None = None,
    algorithm: str = "ES256",
    now: float | None = None,
) -> str:
    """A signed token for trying JWT locally (`kaya security token`) and for tests.

    `claims` are added last, so they may replace `iat` or `exp` or add an `nbf`; `now`
    is the issue time (default: the clock). Production tokens come from your issuer.
    """
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {
        "sub": subject,
        "iss": issuer,
        "aud": audience,
        "iat": int(issued),
        "exp": int(issued + ttl),
    }
    payload.update(claims or {})
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, private_key_pem, algorithm=algorithm, headers=headers)


def new_signing_key(directory: Path) -> tuple[Path, Path]:
    """`<dir>/jwt-signing.key` (EC P-256, PKCS8 PEM, 0600) and `<dir>/jwt-public.pem`, each
    made only if absent (never overwritten: tokens signed before stay valid)."""
    key_path, public_path = directory / SIGNING_KEY, directory / PUBLIC_KEY
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not key_path.exists():
        private = ec.generate_private_key(ec.SECP256R1())
        _write_new(
            key_path,
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
    if not public_path.exists():
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        _write_new(
            public_path,
            loaded.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            0o644,
        )
    return key_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:  # made meanwhile by another process: theirs is kept
        return
    with os.fdopen(fd, "wb") as out:
        out.write(data)
