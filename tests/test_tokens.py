"""Bearer tokens (`[security.jwt]`): what is accepted, and each refusal said in one line.

Pure: keys made in the test, time from a clock the test moves (no sleeps, no NATS).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from kaya.actors.errors import Unauthorized
from kaya.app.cli import build_parser, main
from kaya.app.config import ConfigError, JwtConfig, jwt_key_paths, load_config, parse_config
from kaya.app.security.tokens import TokenVerifier, mint, new_signing_key

NOW = 1_700_000_000.0
ISSUER = "https://id.example"
AUDIENCE = "kaya-bank"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: Any, algorithm: str = "ES256", **changes: Any) -> str:
    """A token for ISSUER/AUDIENCE issued at NOW for an hour; `changes` replace claims."""
    kid = changes.pop("kid", None)
    return mint(
        private_pem(key),
        subject="alice",
        issuer=ISSUER,
        audience=AUDIENCE,
        claims=changes,
        kid=kid,
        algorithm=algorithm,
        now=NOW,
    )


def settings(**fields: Any) -> JwtConfig:
    return JwtConfig(**{"enabled": True, "issuer": ISSUER, "audience": AUDIENCE, **fields})


def key_file_verifier(
    tmp_path: Path, key: Any, clock: Callable[[], float] | None = None, **fields: Any
) -> TokenVerifier:
    (tmp_path / "issuer.pem").write_bytes(public_pem(key))
    return TokenVerifier(
        settings(key_file="issuer.pem", **fields), directory=tmp_path, clock=clock or Clock()
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A token built by hand, as an attacker would: PyJWT refuses to make these."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def claims(**changes: Any) -> dict[str, Any]:
    return {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": int(NOW) + 3600, **changes}


def refusal(verifier: TokenVerifier, authorization: str | None) -> str:
    with pytest.raises(Unauthorized) as raised:
        verifier.verify(authorization)
    message = str(raised.value)
    assert "\n" not in message
    if authorization and len(authorization) > 20:
        assert authorization.removeprefix("Bearer ") not in message  # never echoed
    return message


# ---- accepted ---------------------------------------------------------------------------


def test_es256_with_a_public_key_file(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = key_file_verifier(tmp_path, ec_key)
    caller = verifier.verify("Bearer " + token(ec_key, role="teller"))
    assert caller.subject == "alice"
    assert caller.claims["role"] == "teller"
    assert caller.claims["iss"] == ISSUER
    assert verifier.verify("bearer " + token(ec_key)).subject == "alice"  # scheme: any case


def test_rs256_with_a_public_key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = key_file_verifier(tmp_path, rsa_key)
    assert verifier.verify("Bearer " + token(rsa_key, "RS256")).subject == "alice"


def test_a_certificate_as_key_file(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(ec_key, hashes.SHA256())
    )
    (tmp_path / "issuer.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verifier = TokenVerifier(settings(key_file="issuer.crt"), directory=tmp_path, clock=Clock())
    assert verifier.verify("Bearer " + token(ec_key)).subject == "alice"


def test_a_list_audience_holding_ours_is_accepted(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = key_file_verifier(tmp_path, ec_key)
    assert verifier.verify("Bearer " + token(ec_key, aud=["other", AUDIENCE])).subject == "alice"


def test_a_jwks_with_two_keys_picks_by_kid(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks = {
        "keys": [
            {**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "ec-1", "use": "sig"},
            {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "rsa-1"},
            {"kty": "RSA", "use": "enc", "kid": "enc-1", "n": "AQAB", "e": "AQAB"},  # left out
        ]
    }
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    verifier = TokenVerifier(settings(jwks_file="jwks.json"), directory=tmp_path, clock=Clock())
    assert verifier.verify("Bearer " + token(ec_key, kid="ec-1")).subject == "alice"
    assert verifier.verify("Bearer " + token(rsa_key, "RS256", kid="rsa-1")).subject == "alice"
    assert "kid" in refusal(verifier, "Bearer " + token(ec_key, kid="ec-2"))
    assert "names no key" in refusal(verifier, "Bearer " + token(ec_key))
    # the RSA key's id on an ES256 token: one kind of key never checks another's signature
    mismatch = refusal(verifier, "Bearer " + token(ec_key, kid="rsa-1"))
    assert "signed with ES256, but its key is for RS256" in mismatch
    # another key under a trusted kid
    other = ec.generate_private_key(ec.SECP256R1())
    assert "signature" in refusal(verifier, "Bearer " + token(other, kid="ec-1"))


def test_a_jwks_with_one_key_serves_tokens_without_kid(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks = {"keys": [{**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "k"}]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    verifier = TokenVerifier(settings(jwks_file="jwks.json"), directory=tmp_path, clock=Clock())
    assert verifier.verify("Bearer " + token(ec_key)).subject == "alice"
    assert "kid" in refusal(verifier, "Bearer " + token(ec_key, kid="other"))


# ---- refused ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "said"),
    [
        pytest.param(None, "Authorization: Bearer <JWT> is required", id="no-header"),
        pytest.param("", "Authorization: Bearer <JWT> is required", id="empty-header"),
        pytest.param("Basic YWxpY2U6c2VjcmV0", "must be `Bearer <JWT>`", id="basic"),
        pytest.param("Bearer", "must be `Bearer <JWT>`", id="bearer-alone"),
        pytest.param("Bearer abc", "not a well-formed JWT", id="one-part"),
        pytest.param("Bearer a.b.c", "not a well-formed JWT", id="not-base64-json"),
        pytest.param("Bearer " + "a" * 20_000, "longer than", id="too-long"),
    ],
)
def test_a_missing_or_malformed_header_is_unauthorized(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, authorization: str | None, said: str
) -> None:
    assert said in refusal(key_file_verifier(tmp_path, ec_key), authorization)


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        pytest.param({"exp": int(NOW) - 31}, "has expired", id="expired"),
        pytest.param({"nbf": int(NOW) + 31}, "not valid yet", id="not-yet-valid"),
        pytest.param({"iss": "https://evil.example"}, "'https://evil.example', not", id="iss"),
        pytest.param({"aud": "other"}, f"audience 'other' does not include {AUDIENCE!r}", id="aud"),
        pytest.param({"aud": ["a", "b"]}, "does not include", id="aud-list"),
        pytest.param({"sub": ""}, "`sub` claim is not a non-empty string", id="empty-sub"),
        pytest.param({"exp": "tomorrow"}, "`exp` claim is not a number", id="exp-text"),
    ],
)
def test_each_bad_claim_is_named(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, changes: dict[str, Any], said: str
) -> None:
    message = refusal(key_file_verifier(tmp_path, ec_key), "Bearer " + token(ec_key, **changes))
    assert said in message
    if "iss" in changes:
        assert ISSUER in message  # expected vs got


@pytest.mark.parametrize("missing", ["exp", "iss", "aud", "sub"])
def test_each_required_claim_is_named_when_missing(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, missing: str
) -> None:
    body = claims()
    del body[missing]
    signed = forge(
        {"alg": "ES256", "typ": "JWT"},
        body,
        lambda data: ECAlgorithm(ECAlgorithm.SHA256).sign(data, ec_key),
    )
    assert f"no `{missing}` claim" in refusal(
        key_file_verifier(tmp_path, ec_key), f"Bearer {signed}"
    )


def test_the_leeway_forgives_a_little_clock_difference(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = key_file_verifier(tmp_path, ec_key)  # leeway 30 s
    assert verifier.verify("Bearer " + token(ec_key, exp=int(NOW) - 29)).subject == "alice"
    assert verifier.verify("Bearer " + token(ec_key, nbf=int(NOW) + 29)).subject == "alice"
    strict = key_file_verifier(tmp_path, ec_key, leeway=0)
    assert "expired" in refusal(strict, "Bearer " + token(ec_key, exp=int(NOW)))


def test_a_bad_signature_is_refused(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = key_file_verifier(tmp_path, ec_key)
    other = ec.generate_private_key(ec.SECP256R1())
    assert "signature does not verify" in refusal(verifier, "Bearer " + token(other))
    header, _, signature = token(ec_key).split(".")
    tampered = f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}"
    assert "signature does not verify" in refusal(verifier, f"Bearer {tampered}")


def test_alg_none_is_refused(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    unsigned = forge({"alg": "none", "typ": "JWT"}, claims(), lambda _: b"")
    message = refusal(key_file_verifier(tmp_path, ec_key), f"Bearer {unsigned}")
    assert "algorithm 'none' is not accepted" in message


def test_hs256_signed_with_the_public_key_is_refused(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """The classic confusion: the verifier's public key, which anyone has, as HMAC secret."""
    secret = public_pem(ec_key)
    forged = forge(
        {"alg": "HS256", "typ": "JWT"},
        claims(sub="admin"),
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )
    message = refusal(key_file_verifier(tmp_path, ec_key), f"Bearer {forged}")
    assert "algorithm 'HS256' is not accepted" in message


def test_an_algorithm_left_out_of_the_config_is_refused(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = key_file_verifier(tmp_path, ec_key, algorithms=["ES256"])
    message = refusal(verifier, "Bearer " + token(rsa_key, "RS256"))
    assert "algorithm 'RS256' is not accepted (accepted: ES256)" in message
    # an RS256 token on an ES256 key file: the algorithm must be the key's
    both = key_file_verifier(tmp_path, ec_key)
    assert "its key is for ES256" in refusal(both, "Bearer " + token(rsa_key, "RS256"))


# ---- the cache ----------------------------------------------------------------------------


def test_a_cached_token_is_refused_once_it_expires(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    clock = Clock()
    verifier = key_file_verifier(tmp_path, ec_key, clock=clock)
    bearer = "Bearer " + token(ec_key, exp=int(NOW) + 60)
    first = verifier.verify(bearer)
    assert verifier.verify(bearer) is first  # from the cache
    assert verifier.statistics().hits == 1
    clock.now = NOW + 60 + 29  # within the leeway
    assert verifier.verify(bearer) is first
    clock.now = NOW + 60 + 30
    assert "has expired" in refusal(verifier, bearer)
    assert "has expired" in refusal(verifier, bearer)  # and stays refused once dropped
    assert verifier.statistics().cached == 0


def test_the_cache_is_bounded_and_drops_the_least_recently_used(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    (tmp_path / "issuer.pem").write_bytes(public_pem(ec_key))
    verifier = TokenVerifier(
        settings(key_file="issuer.pem"), directory=tmp_path, clock=Clock(), cache_size=3
    )
    bearers = [f"Bearer {token(ec_key, sub=f'user-{n}')}" for n in range(5)]
    for bearer in bearers:
        verifier.verify(bearer)
    assert verifier.statistics().cached == 3
    verifier.verify(bearers[4])  # recent: a hit
    verifier.verify(bearers[0])  # dropped: checked again
    stats = verifier.statistics()
    assert (stats.cached, stats.hits, stats.misses) == (3, 1, 6)


def test_refused_tokens_are_not_cached(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = key_file_verifier(tmp_path, ec_key)
    bearer = "Bearer " + token(ec_key, aud="other")
    refusal(verifier, bearer)
    refusal(verifier, bearer)
    assert verifier.statistics().cached == 0


# ---- key files ----------------------------------------------------------------------------


def bad_key_file(tmp_path: Path, name: str, data: bytes | str, **fields: Any) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    field = "jwks_file" if name.endswith(".json") else "key_file"
    with pytest.raises(ValueError, match=rf"security\.jwt\.{field} ") as raised:
        TokenVerifier(settings(**{field: name}, **fields), directory=tmp_path)
    message = str(raised.value)
    assert str(path) in message
    return message


def test_an_unusable_key_file_is_a_value_error_naming_it(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        TokenVerifier(settings(key_file="absent.pem"), directory=tmp_path)
    assert "not a PEM public key" in bad_key_file(tmp_path, "junk.pem", "hello")
    assert "private key" in bad_key_file(tmp_path, "private.pem", private_pem(ec_key))
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert "only P-256" in bad_key_file(tmp_path, "p384.pem", public_pem(p384))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert "1024 bits" in bad_key_file(tmp_path, "small.pem", public_pem(small))
    message = bad_key_file(tmp_path, "rsa.pem", public_pem(rsa_key), algorithms=["ES256"])
    assert "accepts only ES256" in message


def test_an_unusable_jwks_is_a_value_error_naming_it(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    assert "not valid JSON" in bad_key_file(tmp_path, "a.json", "{")
    assert "not a JWKS" in bad_key_file(tmp_path, "b.json", '{"keys": []}')
    private = ECAlgorithm.to_jwk(ec_key, as_dict=True)
    assert "private or secret" in bad_key_file(tmp_path, "c.json", json.dumps({"keys": [private]}))
    secret = {"kty": "oct", "k": "c2VjcmV0"}
    assert "private or secret" in bad_key_file(tmp_path, "d.json", json.dumps({"keys": [secret]}))
    twins = {"keys": [{**jwk, "kid": "k"}, {**jwk, "kid": "k"}]}
    assert "more than one key has kid 'k'" in bad_key_file(tmp_path, "e.json", json.dumps(twins))
    anonymous = {"keys": [{**jwk, "kid": "k"}, jwk]}
    assert "needs a `kid`" in bad_key_file(tmp_path, "f.json", json.dumps(anonymous))
    p384 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True)
    assert "left out: keys[0] ES384" in bad_key_file(
        tmp_path, "g.json", json.dumps({"keys": [p384]})
    )


# ---- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "said"),
    [
        pytest.param(
            'enabled = true\naudience = "a"\nkey_file = "k.pem"',
            "security.jwt.issuer is required",
            id="no-issuer",
        ),
        pytest.param(
            'enabled = true\nissuer = "i"\nkey_file = "k.pem"',
            "security.jwt.audience is required",
            id="no-audience",
        ),
        pytest.param(
            'enabled = true\nissuer = "i"\naudience = "a"\nkey_file = "k"\njwks_file = "j"',
            "exactly one of security.jwt.key_file and security.jwt.jwks_file (both are set)",
            id="both-key-sources",
        ),
        pytest.param(
            'enabled = true\nissuer = "i"\naudience = "a"',
            "exactly one of security.jwt.key_file and security.jwt.jwks_file (neither",
            id="no-key-source",
        ),
        pytest.param('algorithms = ["HS256"]', "security.jwt.algorithms", id="hs256"),
        pytest.param("algorithms = []", "security.jwt.algorithms", id="no-algorithms"),
        pytest.param("leeway = -1", "security.jwt.leeway", id="negative-leeway"),
    ],
)
def test_config_refuses_an_unusable_jwt_section(toml: str, said: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(f"[security.jwt]\n{toml}\n")
    assert said in str(raised.value)


def test_jwt_is_off_by_default_and_key_paths_are_under_the_security_dir(tmp_path: Path) -> None:
    assert parse_config("").security.jwt.enabled is False
    config = parse_config(
        f'[node]\ndata_dir = "{tmp_path}"\n[security.jwt]\nenabled = true\nissuer = "i"\n'
        'audience = "a"\nkey_file = "jwt-public.pem"\n'
    )
    assert jwt_key_paths(config) == (tmp_path / "security" / "jwt-public.pem", None)
    absolute = parse_config(
        f'[security]\ndir = "{tmp_path}/s"\n[security.jwt]\njwks_file = "/etc/kaya/jwks.json"\n'
    )
    assert jwt_key_paths(absolute) == (None, Path("/etc/kaya/jwks.json"))


# ---- development tokens and `kaya security token` ----------------------------------------


def test_new_signing_key_is_made_once_and_private(tmp_path: Path) -> None:
    key, public = new_signing_key(tmp_path / "security")
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes(), public.read_bytes()
    public.unlink()  # a lost public key is made again from the private one
    assert new_signing_key(tmp_path / "security") == (key, public)
    assert (key.read_bytes(), public.read_bytes()) == before


def test_kaya_security_token_prints_a_token_the_node_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "kaya.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path}"\n[security.jwt]\nenabled = true\n'
        f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\nkey_file = "jwt-public.pem"\n'
    )
    assert main(["security", "token", "--sub", "alice", "--admin", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    bearer = out.out.strip()
    assert out.out == bearer + "\n"  # the token alone
    caller = TokenVerifier.from_config(load_config(config)).verify(f"Bearer {bearer}")
    assert caller.subject == "alice"
    assert caller.claims["admin"] is True
    # the key is kept: a second token verifies with the same public key
    assert main(["security", "token", "--sub", "bob", "--config", str(config)]) == 0
    second = capsys.readouterr().out.strip()
    caller = TokenVerifier.from_config(load_config(config)).verify(f"Bearer {second}")
    assert caller.subject == "bob"
    assert "admin" not in caller.claims


def test_kaya_security_token_needs_an_issuer_and_audience(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["security", "token", "--sub", "alice", "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "error: no issuer: give --issuer or set security.jwt.issuer" in capsys.readouterr().err
    assert main([*argv, "--issuer", "i", "--audience", "a", "--ttl", "60"]) == 0
    printed = capsys.readouterr().out.strip()
    verifier = TokenVerifier(
        JwtConfig(issuer="i", audience="a", key_file="jwt-public.pem"),
        directory=tmp_path / "security",
    )
    issued = verifier.verify(f"Bearer {printed}").claims
    assert issued["exp"] - issued["iat"] == 60


def test_kaya_security_init_still_parses() -> None:
    args = build_parser().parse_args(["security", "init", "--data-dir", "d", "--host", "h"])
    assert (args.action, args.data_dir, args.host) == ("init", "d", ["h"])


# ---- hostile headers ----------------------------------------------------------------------

_JWT_PART = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=",
                    max_size=60)  # fmt: skip
_HEADERS = st.one_of(
    st.text(max_size=200),
    st.builds(lambda t: "Bearer " + t, st.text(max_size=200)),
    st.builds(lambda a, b, c: f"Bearer {a}.{b}.{c}", _JWT_PART, _JWT_PART, _JWT_PART),
    st.builds(  # a well-formed header and payload of random JSON, signature garbage
        lambda h, p, s: f"Bearer {b64(json.dumps(h).encode())}.{b64(json.dumps(p).encode())}.{s}",
        st.dictionaries(
            st.sampled_from(["alg", "typ", "kid", "crit", "jku"]),
            st.one_of(st.text(max_size=10), st.integers(), st.none()),
        ),
        st.dictionaries(
            st.sampled_from(["sub", "iss", "aud", "exp", "nbf"]),
            st.one_of(st.text(max_size=10), st.integers(), st.floats(), st.none()),
        ),
        _JWT_PART,
    ),
)


@pytest.fixture(scope="module")
def hostile_verifier(
    tmp_path_factory: pytest.TempPathFactory, ec_key: ec.EllipticCurvePrivateKey
) -> TokenVerifier:
    return key_file_verifier(tmp_path_factory.mktemp("hostile"), ec_key)


@settings_(max_examples=2000, deadline=None)
@given(authorization=_HEADERS)
def test_any_hostile_authorization_header_is_unauthorized_and_nothing_else(
    hostile_verifier: TokenVerifier, authorization: str
) -> None:
    """What an attacker may put in the header: only ever `Unauthorized`, in one line."""
    with pytest.raises(Unauthorized) as raised:
        hostile_verifier.verify(authorization)
    assert "\n" not in str(raised.value)
