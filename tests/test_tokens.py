"""Gate 1: bearer_token() and TokenVerifier.verify(), with real keys and hand-built tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cmdgate.agent.config import load_config
from cmdgate.agent.errors import AuthenticationFailed
from cmdgate.agent.tokens import MAX_TOKEN_BYTES, TokenVerifier, VerifiedClaims, bearer_token
from cmdgate.shared.keys import (
    SigningKey,
    generate_signing_key,
    keygen,
    load_private_key,
    mint_token,
    public_jwk,
)

ISSUER = "https://issuer.example"
AUDIENCE = "host-a"
NOW = 1_750_000_000
LEEWAY = 30
MAX_LIFETIME = 3600
ED_KID = "ed-1"
EC_KID = "ec-1"


@dataclass(frozen=True)
class Auth:
    """The verifier under test, and the private keys of the two kids it trusts."""

    verifier: TokenVerifier
    ed: SigningKey
    ec: SigningKey


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Auth:
    """One EdDSA and one ES256 key in one JWKS, and a verifier built by load_config."""
    root: Path = tmp_path_factory.mktemp("tokens")
    ed_path, jwks, _ = keygen(root / "keys", "EdDSA", kid=ED_KID)
    ec_path, _, _ = keygen(root / "keys", "ES256", kid=EC_KID)
    config = root / "agent.toml"
    config.write_text(
        "[server]\ninsecure = true\n"
        f'[auth]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_file = "{jwks}"\n'
        f'algorithms = ["EdDSA", "ES256"]\nleeway_seconds = {LEEWAY}\n'
        f"max_token_lifetime_seconds = {MAX_LIFETIME}\n"
    )
    auth_config = load_config(config).auth
    assert sorted(auth_config.keys) == [EC_KID, ED_KID]
    return Auth(TokenVerifier(auth_config), load_private_key(ed_path), load_private_key(ec_path))


# --- building tokens by hand ----------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_signature(key: SigningKey, signing_input: bytes) -> bytes:
    """The JWS signature: Ed25519 as is, ECDSA as fixed-size r || s (not DER)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(signing_input)
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def to_json(value: bytes | Mapping[str, Any]) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def signed(
    header: bytes | Mapping[str, Any], payload: bytes | Mapping[str, Any], key: SigningKey
) -> str:
    """A compact JWS over exactly these header and payload bytes, with a real signature."""
    signing_input = f"{b64url(to_json(header))}.{b64url(to_json(payload))}"
    return f"{signing_input}.{b64url(raw_signature(key, signing_input.encode()))}"


def header(kid: object = ED_KID, alg: object = "EdDSA", **extra: Any) -> dict[str, Any]:
    return {"alg": alg, "kid": kid, "typ": "at+jwt", **extra}


def claims(drop: Sequence[str] = (), **changes: Any) -> dict[str, Any]:
    """Good claims at NOW, with ``changes`` applied and the ``drop`` names removed."""
    result: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 300,
        "jti": "j-1",
        "cmds": ["uptime"],
    }
    result.update(changes)
    for name in drop:
        del result[name]
    return result


def with_raw(payload: Mapping[str, Any], name: str, literal: str) -> bytes:
    """``payload`` as JSON with claim ``name`` written as the raw JSON text ``literal``."""
    marker = "@@raw@@"
    text = json.dumps({**payload, name: marker})
    return text.replace(json.dumps(marker), literal).encode()


def ed_token(payload: bytes | Mapping[str, Any], auth: Auth) -> str:
    return signed(header(), payload, auth.ed)


def assert_rejected(auth: Auth, token: str, reason: str, now: float = NOW) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        auth.verifier.verify(token, now=now)
    assert info.value.reason == reason, info.value.detail
    # the client learns only the category; the reason is for the audit
    assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.client_message == "authentication failed"


def accepted(auth: Auth, token: str, now: float = NOW) -> VerifiedClaims:
    return auth.verifier.verify(token, now=now)


def flip_middle_char(segment: str) -> str:
    # the middle character's 6 bits all count; the last one's low bits may be padding
    i = len(segment) // 2
    return segment[:i] + ("A" if segment[i] != "A" else "B") + segment[i + 1 :]


# --- good tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ed", "ec"])
def test_a_minted_token_is_accepted(auth: Auth, which: str) -> None:
    key, kid = (auth.ed, ED_KID) if which == "ed" else (auth.ec, EC_KID)
    token = mint_token(
        key,
        kid=kid,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="alice",
        commands=["uptime", "df"],
        ttl_seconds=300,
        now=NOW,
    )
    verified = accepted(auth, token)
    assert verified.subject == "alice"
    assert verified.issuer == ISSUER
    assert isinstance(verified.jti, str)
    assert verified.claims["cmds"] == ["uptime", "df"]


def test_a_fresh_token_is_accepted_on_the_real_clock(auth: Auth) -> None:
    token = mint_token(
        auth.ed,
        kid=ED_KID,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="bob",
        commands=[],
        ttl_seconds=60,
    )
    assert auth.verifier.verify(token).subject == "bob"


def test_a_hand_signed_es256_token_is_accepted(auth: Auth) -> None:
    # proves the hand-built tokens below are rejected for their flaw, not for their form
    assert accepted(auth, signed(header(EC_KID, "ES256"), claims(), auth.ec)).subject == "alice"
    assert accepted(auth, ed_token(claims(), auth)).jti == "j-1"


def test_a_list_audience_containing_ours_is_accepted(auth: Auth) -> None:
    assert accepted(auth, ed_token(claims(aud=["other", AUDIENCE]), auth)).subject == "alice"


def test_a_token_without_nbf_is_accepted(auth: Auth) -> None:
    assert accepted(auth, ed_token(claims(drop=["nbf"]), auth)).jti == "j-1"


def test_a_token_without_jti_is_refused_by_default(auth: Auth) -> None:
    # RFC 9068 access tokens carry a jti; required_claims can relax it
    assert_rejected(auth, ed_token(claims(drop=["jti"]), auth), "TOKEN_CLAIM_MISSING")


@pytest.mark.parametrize("typ", ["JWT", "jwt", "id_token+jwt", None, 7])
def test_a_token_that_is_not_an_access_token_is_refused(auth: Auth, typ: object) -> None:
    head = header()
    if typ is None:
        del head["typ"]
    else:
        head["typ"] = typ
    assert_rejected(auth, signed(head, claims(), auth.ed), "TOKEN_TYPE_INVALID")


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt"])
def test_access_token_types_are_compared_as_media_types(auth: Auth, typ: str) -> None:
    accepted(auth, signed(header(typ=typ), claims(), auth.ed))


# --- times ----------------------------------------------------------------------------------


def test_expired_beyond_leeway_is_rejected(auth: Auth) -> None:
    exp = NOW - LEEWAY - 1
    assert_rejected(
        auth, ed_token(claims(iat=exp - 300, nbf=exp - 300, exp=exp), auth), "TOKEN_EXPIRED"
    )


@pytest.mark.parametrize("late", [1, LEEWAY])
def test_expired_within_leeway_is_accepted(auth: Auth, late: int) -> None:
    exp = NOW - late
    token = ed_token(claims(iat=exp - 300, nbf=exp - 300, exp=exp), auth)
    assert accepted(auth, token).subject == "alice"


def test_nbf_in_the_future_is_rejected(auth: Auth) -> None:
    assert_rejected(auth, ed_token(claims(nbf=NOW + LEEWAY + 1), auth), "TOKEN_NOT_YET_VALID")
    assert accepted(auth, ed_token(claims(nbf=NOW + LEEWAY), auth)).subject == "alice"


def test_iat_in_the_future_is_rejected(auth: Auth) -> None:
    payload = claims(drop=["nbf"], iat=NOW + LEEWAY + 1, exp=NOW + 600)
    assert_rejected(auth, ed_token(payload, auth), "TOKEN_ISSUED_IN_FUTURE")
    assert accepted(auth, ed_token(claims(drop=["nbf"], iat=NOW + LEEWAY), auth)).subject == "alice"


def test_a_lifetime_over_the_maximum_is_rejected(auth: Auth) -> None:
    assert_rejected(
        auth, ed_token(claims(exp=NOW + MAX_LIFETIME + 1), auth), "TOKEN_LIFETIME_TOO_LONG"
    )
    assert accepted(auth, ed_token(claims(exp=NOW + MAX_LIFETIME), auth)).subject == "alice"


def test_an_old_iat_makes_the_lifetime_too_long(auth: Auth) -> None:
    assert_rejected(auth, ed_token(claims(iat=0, nbf=0), auth), "TOKEN_LIFETIME_TOO_LONG")


@pytest.mark.parametrize("name", ["exp", "iat"])
def test_a_missing_exp_or_iat_is_rejected(auth: Auth, name: str) -> None:
    assert_rejected(auth, ed_token(claims(drop=[name]), auth), "TOKEN_CLAIM_MISSING")
    null_claim = claims()
    null_claim[name] = None
    assert_rejected(auth, ed_token(null_claim, auth), "TOKEN_CLAIM_MISSING")


@pytest.mark.parametrize("value", [str(NOW + 300), True, [NOW + 300], {"t": NOW}])
def test_a_non_numeric_time_is_rejected(auth: Auth, value: object) -> None:
    assert_rejected(auth, ed_token(claims(exp=value), auth), "TOKEN_MALFORMED")


@pytest.mark.parametrize("name", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_nan_and_infinite_times_are_rejected(auth: Auth, name: str, literal: str) -> None:
    assert_rejected(auth, ed_token(with_raw(claims(), name, literal), auth), "TOKEN_MALFORMED")


@pytest.mark.parametrize("name", ["exp", "iat", "nbf"])
def test_a_huge_integer_time_is_rejected_not_a_crash(auth: Auth, name: str) -> None:
    assert_rejected(
        auth, ed_token(with_raw(claims(), name, "1" + "0" * 400), auth), "TOKEN_MALFORMED"
    )


# --- issuer, audience, subject --------------------------------------------------------------


@pytest.mark.parametrize(
    "issuer",
    [
        ISSUER + "/",
        ISSUER + ".evil.example",
        ISSUER[:-1],
        "https://issuer",
        "HTTPS://ISSUER.EXAMPLE",
        "https://Issuer.example",
        " " + ISSUER,
        ISSUER + "\u200b",
        "",
        None,
        [ISSUER],
        1,
        "evil" + ISSUER,
    ],
    ids=[
        "trailing-slash",
        "suffix",
        "prefix-short",
        "prefix",
        "upper",
        "mixed-case",
        "leading-space",
        "zero-width",
        "empty",
        "null",
        "list",
        "number",
        "prefixed",
    ],
)
def test_the_issuer_must_match_exactly(auth: Auth, issuer: object) -> None:
    assert_rejected(auth, ed_token(claims(iss=issuer), auth), "TOKEN_ISSUER_MISMATCH")


def test_a_missing_issuer_is_rejected(auth: Auth) -> None:
    assert_rejected(auth, ed_token(claims(drop=["iss"]), auth), "TOKEN_ISSUER_MISMATCH")


@pytest.mark.parametrize(
    "audience",
    [
        "host-b",
        "host-a-evil",
        "host",
        "Host-A",
        ["host-b", "other"],
        [],
        [AUDIENCE, 1],
        1,
        None,
        {AUDIENCE: True},
        [[AUDIENCE]],
        "host-a host-b",
    ],
    ids=[
        "other",
        "suffix",
        "prefix",
        "case",
        "list-without-ours",
        "empty-list",
        "list-with-non-string",
        "number",
        "null",
        "object",
        "nested-list",
        "space-joined",
    ],
)
def test_the_audience_must_contain_ours(auth: Auth, audience: object) -> None:
    assert_rejected(auth, ed_token(claims(aud=audience), auth), "TOKEN_AUDIENCE_MISMATCH")


def test_a_missing_audience_is_rejected(auth: Auth) -> None:
    assert_rejected(auth, ed_token(claims(drop=["aud"]), auth), "TOKEN_AUDIENCE_MISMATCH")


@pytest.mark.parametrize("subject", ["", None, 42, ["alice"], {"name": "alice"}, True])
def test_the_subject_must_be_a_non_empty_string(auth: Auth, subject: object) -> None:
    assert_rejected(auth, ed_token(claims(sub=subject), auth), "TOKEN_SUBJECT_MISSING")


def test_a_missing_subject_is_rejected(auth: Auth) -> None:
    assert_rejected(auth, ed_token(claims(drop=["sub"]), auth), "TOKEN_SUBJECT_MISSING")


# --- algorithms and keys --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_with_an_empty_signature_is_rejected(auth: Auth, alg: str) -> None:
    token = f"{b64url(to_json(header(alg=alg)))}.{b64url(to_json(claims()))}."
    assert_rejected(auth, token, "TOKEN_ALG_NOT_ALLOWED")


def test_hs256_signed_with_the_public_key_is_rejected(auth: Auth) -> None:
    # the classic confusion: an HMAC "secret" that is the verifier's public key
    public = auth.ed.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwk = json.dumps(public_jwk(auth.ed, ED_KID)).encode()
    for secret in (pem, raw, jwk):
        signing_input = f"{b64url(to_json(header(alg='HS256')))}.{b64url(to_json(claims()))}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        assert_rejected(auth, f"{signing_input}.{b64url(mac)}", "TOKEN_ALG_NOT_ALLOWED")


@pytest.mark.parametrize("alg", ["eddsa", "EDDSA", "Ed25519", "RS256", "ES384", None, 1, ["EdDSA"]])
def test_an_alg_that_is_not_configured_is_rejected(auth: Auth, alg: object) -> None:
    assert_rejected(auth, signed(header(alg=alg), claims(), auth.ed), "TOKEN_ALG_NOT_ALLOWED")


def test_a_header_without_alg_is_rejected(auth: Auth) -> None:
    assert_rejected(auth, signed({"kid": ED_KID}, claims(), auth.ed), "TOKEN_ALG_NOT_ALLOWED")


@pytest.mark.parametrize("kid", ["nope", "ED-1", "ed-1 ", "", 1, None, [ED_KID]])
def test_an_unknown_kid_is_rejected(auth: Auth, kid: object) -> None:
    assert_rejected(auth, signed(header(kid=kid), claims(), auth.ed), "TOKEN_KID_UNKNOWN")


def test_a_header_without_kid_is_rejected(auth: Auth) -> None:
    assert_rejected(auth, signed({"alg": "EdDSA"}, claims(), auth.ed), "TOKEN_KID_UNKNOWN")


def test_a_kid_for_a_key_of_another_algorithm_is_rejected(auth: Auth) -> None:
    # both algorithms are allowed, but each key verifies only its own
    assert_rejected(
        auth, signed(header(ED_KID, "ES256"), claims(), auth.ec), "TOKEN_ALG_NOT_ALLOWED"
    )
    assert_rejected(
        auth, signed(header(EC_KID, "EdDSA"), claims(), auth.ed), "TOKEN_ALG_NOT_ALLOWED"
    )


@pytest.mark.parametrize("which", ["ed", "ec"])
def test_a_flipped_signature_character_is_rejected(auth: Auth, which: str) -> None:
    token = (
        ed_token(claims(), auth)
        if which == "ed"
        else signed(header(EC_KID, "ES256"), claims(), auth.ec)
    )
    head, body, signature = token.split(".")
    assert accepted(auth, token).subject == "alice"
    assert_rejected(auth, f"{head}.{body}.{flip_middle_char(signature)}", "TOKEN_SIGNATURE_INVALID")


@pytest.mark.parametrize(("alg", "kid"), [("EdDSA", ED_KID), ("ES256", EC_KID)])
def test_a_signature_by_another_key_is_rejected(auth: Auth, alg: str, kid: str) -> None:
    intruder = generate_signing_key(alg)
    assert_rejected(auth, signed(header(kid, alg), claims(), intruder), "TOKEN_SIGNATURE_INVALID")


def test_an_empty_signature_is_rejected(auth: Auth) -> None:
    head, body, _ = ed_token(claims(), auth).split(".")
    assert_rejected(auth, f"{head}.{body}.", "TOKEN_SIGNATURE_INVALID")


def test_a_payload_swapped_under_a_good_signature_is_rejected(auth: Auth) -> None:
    head, _, signature = ed_token(claims(), auth).split(".")
    forged = b64url(to_json(claims(sub="root", cmds=["uptime", "reboot"])))
    assert_rejected(auth, f"{head}.{forged}.{signature}", "TOKEN_SIGNATURE_INVALID")


def test_a_key_embedded_in_the_header_is_ignored(auth: Auth) -> None:
    # jwk / jku / x5u must never be trusted or fetched (CVE-2018-0114 style)
    intruder = generate_signing_key("EdDSA")
    forged_header = header(
        jwk=public_jwk(intruder, ED_KID),
        jku="https://evil.example/jwks",
        x5u="https://evil.example/cert",
    )
    assert_rejected(auth, signed(forged_header, claims(), intruder), "TOKEN_SIGNATURE_INVALID")


def test_the_signature_is_checked_before_the_claims(auth: Auth) -> None:
    # an unsigned token must not learn which of its claims were wrong
    intruder = generate_signing_key("EdDSA")
    bad_claims = claims(iss="evil", exp=0, iat=0, nbf=0, drop=["sub"])
    assert_rejected(auth, signed(header(), bad_claims, intruder), "TOKEN_SIGNATURE_INVALID")


# --- JSON and header traps ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_header",
    [
        b'{"alg":"EdDSA","kid":"ed-1","kid":"ed-1"}',
        b'{"alg":"none","alg":"EdDSA","kid":"ed-1"}',
        b'{"alg":"EdDSA","kid":"ec-1","kid":"ed-1"}',
    ],
    ids=["same-kid-twice", "alg-none-then-eddsa", "kid-swap"],
)
def test_duplicate_keys_in_the_header_are_rejected(auth: Auth, raw_header: bytes) -> None:
    assert_rejected(auth, signed(raw_header, claims(), auth.ed), "TOKEN_DUPLICATE_KEY")


@pytest.mark.parametrize(
    "raw_payload",
    [
        with_raw(claims(), "sub", '"alice", "sub": "root"'),
        with_raw(claims(), "cmds", '["uptime"], "cmds": ["reboot"]'),
        with_raw(claims(), "exp", f'{NOW + 300}, "exp": {NOW + 10**9}'),
        with_raw(claims(), "cnf", '{"x5t#S256": "a", "x5t#S256": "b"}'),
    ],
    ids=["sub", "cmds", "exp", "nested-object"],
)
def test_duplicate_keys_in_the_payload_are_rejected(auth: Auth, raw_payload: bytes) -> None:
    assert_rejected(auth, ed_token(raw_payload, auth), "TOKEN_DUPLICATE_KEY")


@pytest.mark.parametrize("crit", [["exp"], [], ["b64"], "exp"])
def test_a_crit_header_is_rejected(auth: Auth, crit: object) -> None:
    forged = header(crit=crit) if crit != ["b64"] else header(crit=crit, b64=False)
    assert_rejected(auth, signed(forged, claims(), auth.ed), "TOKEN_CRIT_UNSUPPORTED")


def test_an_over_size_token_is_rejected(auth: Auth) -> None:
    big = ed_token(claims(pad="x" * 7000), auth)
    assert len(big) > MAX_TOKEN_BYTES
    assert_rejected(auth, big, "TOKEN_TOO_LARGE")
    fits = ed_token(claims(pad="x" * 5000), auth)
    assert len(fits) <= MAX_TOKEN_BYTES
    assert accepted(auth, fits).subject == "alice"


def test_the_size_is_checked_before_anything_else(auth: Auth) -> None:
    assert_rejected(auth, "a" * (MAX_TOKEN_BYTES + 1), "TOKEN_TOO_LARGE")
    assert_rejected(auth, "a" * MAX_TOKEN_BYTES, "TOKEN_MALFORMED")


def _segments(head: bytes, body: bytes) -> str:
    return f"{b64url(head)}.{b64url(body)}.{b64url(b'sig')}"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",
        "..",
        "a." + b64url(b"{}") + ".c",
        _segments(b"not json", to_json(claims())),
        _segments(b"[]", to_json(claims())),
        _segments(b'"EdDSA"', to_json(claims())),
        _segments(b'{"alg":"EdDSA",', to_json(claims())),
        _segments(b'{"alg":"\xff"}', to_json(claims())),
        _segments(b"{" * 4000, to_json(claims())),
        _segments(to_json(header()), b"not json"),
        _segments(to_json(header()), b"[1]"),
        _segments(to_json(header()), b"[" * 4000),
        "ｅｙ.ｅｙ.ｅｙ",
        "éa.b.c",
    ],
)
def test_malformed_tokens_are_rejected(auth: Auth, token: str) -> None:
    assert_rejected(auth, token, "TOKEN_MALFORMED")


def test_a_payload_that_is_not_a_json_object_is_rejected_even_when_signed(auth: Auth) -> None:
    for body in (b"[]", b'"alice"', b"null", b"not json", b'{"exp": NaN'):
        assert_rejected(auth, ed_token(body, auth), "TOKEN_MALFORMED")


# --- bearer_token ---------------------------------------------------------------------------


def test_bearer_token_returns_the_token() -> None:
    assert bearer_token([("authorization", "Bearer abc.def.ghi")]) == "abc.def.ghi"
    # RFC 9110: the scheme is case-insensitive
    assert bearer_token([("user-agent", "x"), ("authorization", "bearer abc")]) == "abc"


@pytest.mark.parametrize("metadata", [None, [], [("x-authorization", "Bearer abc")]])
def test_bearer_token_missing(metadata: list[tuple[str, str | bytes]] | None) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        bearer_token(metadata)
    assert info.value.reason == "TOKEN_MISSING"


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", "Bearer a"), ("authorization", "Bearer b")],
        [("authorization", "Bearer a"), ("Authorization", "Bearer a")],
    ],
)
def test_bearer_token_with_two_entries_is_ambiguous(
    metadata: list[tuple[str, str | bytes]],
) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        bearer_token(metadata)
    assert info.value.reason == "TOKEN_AMBIGUOUS"


@pytest.mark.parametrize(
    "value",
    [
        "Basic YWxpY2U6cGFzcw==",
        "Token abc",
        "Bearer",
        "Bearer ",
        "abc.def.ghi",
        "Bearer\tabc",
        "Bearerabc",
        b"Bearer abc",
    ],
)
def test_bearer_token_with_another_scheme_is_malformed(value: str | bytes) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        bearer_token([("authorization", value)])
    assert info.value.reason == "TOKEN_MALFORMED"


def test_bearer_token_with_only_spaces_after_the_scheme_is_malformed() -> None:
    with pytest.raises(AuthenticationFailed) as info:
        bearer_token([("authorization", "Bearer    ")])
    assert info.value.reason == "TOKEN_MALFORMED"


# --- the cache of verified tokens -----------------------------------------------------------


def test_a_cached_token_still_expires(auth: Auth) -> None:
    verifier = TokenVerifier(auth.verifier.config)
    token = ed_token(claims(), auth)
    first = verifier.verify(token, now=NOW)
    assert verifier.verify(token, now=NOW + 1) is first  # served from the cache
    expired_at = NOW + 300 + LEEWAY + 1
    with pytest.raises(AuthenticationFailed) as info:
        verifier.verify(token, now=expired_at)
    assert info.value.reason == "TOKEN_EXPIRED"


def test_a_failed_token_is_checked_in_full_every_time(auth: Auth) -> None:
    verifier = TokenVerifier(auth.verifier.config)
    token = ed_token(claims(iss="https://other.example"), auth)
    for _ in range(2):
        with pytest.raises(AuthenticationFailed) as info:
            verifier.verify(token, now=NOW)
        assert info.value.reason == "TOKEN_ISSUER_MISMATCH"


def test_the_cache_is_bounded(auth: Auth) -> None:
    verifier = TokenVerifier(auth.verifier.config, cache_size=2)
    tokens = [ed_token(claims(jti=f"j{i}"), auth) for i in range(3)]
    results = [verifier.verify(t, now=NOW) for t in tokens]
    # the oldest was evicted: verifying it again yields a fresh object, the newest is a hit
    assert verifier.verify(tokens[0], now=NOW) is not results[0]
    assert verifier.verify(tokens[0], now=NOW) == results[0]
    assert verifier.verify(tokens[2], now=NOW) is results[2]
