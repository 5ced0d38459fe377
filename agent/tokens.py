"""Verify the bearer token of a call: gate 1.

The algorithm and the key come from config, never from the token: the header's
``alg`` must be allowed and equal to the one algorithm of the key its ``kid``
names. ``jku``, ``jwk``, ``x5u``, ``x5c`` and ``cty`` are never looked at, let
alone fetched. The signature is checked by PyJWT; the claims are checked here,
one stable reason code per failure, after parsing the JSON ourselves so that
duplicate keys are refused (PyJWT silently keeps the last one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jwt
from jwt.exceptions import InvalidSignatureError, PyJWTError

from cmdgate.agent.config import AuthConfig, normalise_token_type
from cmdgate.agent.errors import AuthenticationFailed

if TYPE_CHECKING:
    from cmdgate.agent.jwks import RemoteKeys
from cmdgate.shared.wire import AUTHORIZATION_KEY

# Checked before any base64 or cryptography runs.
MAX_TOKEN_BYTES = 8192
# one for every token: it holds only its algorithm table, which a call does not change
_JWS = jwt.PyJWS()
VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True)
class VerifiedClaims:
    """The claims of a token whose signature, issuer, audience and times all held."""

    subject: str
    issuer: str
    jti: str | None
    expires_at: float
    # Everything, for the decision function and the audit (azp, client_id, the whitelist...).
    # Read-only: one verified token's claims may serve many calls.
    claims: Mapping[str, Any]
    # The settings of the issuer that vouched for it: its claim names, among others.
    policy: AuthConfig


def token_fingerprint(token: str) -> str:
    """A short hash that identifies a token in the audit without revealing it."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The one ``authorization: Bearer`` token of the call's metadata."""
    values = [v for k, v in (metadata or ()) if k.lower() == AUTHORIZATION_KEY]
    if not values:
        raise AuthenticationFailed("TOKEN_MISSING", "no authorization metadata")
    if len(values) > 1:
        raise AuthenticationFailed("TOKEN_AMBIGUOUS", f"{len(values)} authorization entries")
    value = values[0]
    if isinstance(value, bytes):
        raise AuthenticationFailed("TOKEN_MALFORMED", "binary authorization metadata")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("TOKEN_MALFORMED", "authorization is not 'Bearer <token>'")
    return token


class TokenVerifier:
    """Verifies tokens against one ``[auth]`` config; keys were parsed at load time.

    Tokens that verified are remembered by their SHA-256, so a client that
    reuses its token does not pay for the signature again. The cache is
    bounded, an entry is never used past the token's ``exp`` (plus leeway),
    and it dies with the verifier, which a config reload replaces. Only
    failures are never cached: a bad token always gets the full check.
    """

    def __init__(
        self,
        config: AuthConfig,
        cache_size: int = VERIFIED_CACHE_SIZE,
        remote: RemoteKeys | None = None,
    ) -> None:
        self.config = config
        self.remote = remote
        self._cache_size = cache_size
        self._cache: dict[bytes, VerifiedClaims] = {}
        self._keys_version = 0

    def verify(self, token: str, now: float | None = None) -> VerifiedClaims:
        """Return the verified claims, or raise ``AuthenticationFailed`` with a reason code."""
        now = time.time() if now is None else now
        if self.remote is not None and self.remote.version != self._keys_version:
            # a new key set: what a removed key verified must not be served from the cache
            self._cache.clear()
            self._keys_version = self.remote.version
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if now <= cached.expires_at + self.config.leeway_seconds:
                return cached
            del self._cache[digest]
        claims = self._verify(token, now)
        if len(self._cache) >= self._cache_size:
            # the oldest entry goes first: dicts keep insertion order
            del self._cache[next(iter(self._cache))]
        self._cache[digest] = claims
        return claims

    def _verify(self, token: str, now: float) -> VerifiedClaims:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationFailed("TOKEN_TOO_LARGE", f"{len(token)} bytes > {MAX_TOKEN_BYTES}")
        if not token.isascii():
            raise AuthenticationFailed("TOKEN_MALFORMED", "non-ASCII characters")
        segments = token.split(".")
        if len(segments) != 3:
            raise AuthenticationFailed("TOKEN_MALFORMED", f"{len(segments)} segments, not 3")
        header = _decode_json_segment(segments[0], "header")
        payload = _decode_json_segment(segments[1], "payload")
        key = self._key_for(header)
        try:
            _JWS.decode_complete(token, key.key, algorithms=[key.algorithm])
        except InvalidSignatureError:
            raise AuthenticationFailed(
                "TOKEN_SIGNATURE_INVALID", f"signature does not verify with kid {key.kid!r}"
            ) from None
        except PyJWTError as e:
            raise AuthenticationFailed("TOKEN_MALFORMED", f"rejected by PyJWT: {e}") from None
        claims = self._check_claims(payload, now)
        self._check_type(header)
        return claims

    def _check_type(self, header: dict[str, Any]) -> None:
        wanted = self.config.token_types
        if not wanted:
            return
        typ = header.get("typ")
        # RFC 9068: an ID token, or any other JWT of the issuer, cannot pass for an access token
        if not isinstance(typ, str) or normalise_token_type(typ) not in wanted:
            raise AuthenticationFailed(
                "TOKEN_TYPE_INVALID", f"typ {str(typ)[:64]!r} is not one of {sorted(wanted)}"
            )

    def _key_for(self, header: dict[str, Any]) -> Any:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            raise AuthenticationFailed("TOKEN_ALG_NOT_ALLOWED", f"alg {alg!r} is not allowed")
        if "crit" in header:
            # RFC 7515 4.1.11: extensions we do not understand must be refused
            raise AuthenticationFailed("TOKEN_CRIT_UNSUPPORTED", f"crit {str(header['crit'])[:64]}")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthenticationFailed("TOKEN_KID_UNKNOWN", "no kid in header")
        keys = self.remote.keys if self.remote is not None else self.config.keys
        key = keys.get(kid)
        if key is None:
            raise AuthenticationFailed("TOKEN_KID_UNKNOWN", f"kid {kid[:64]!r} is not known")
        if key.algorithm != alg:
            # one algorithm per key: an EdDSA key never verifies an ES256 header, or worse
            raise AuthenticationFailed(
                "TOKEN_ALG_NOT_ALLOWED", f"kid {kid!r} is for {key.algorithm}, token says {alg}"
            )
        return key

    def _check_claims(self, payload: dict[str, Any], now: float) -> VerifiedClaims:
        cfg = self.config
        leeway = cfg.leeway_seconds
        exp = _numeric_claim(payload, "exp", required=True)
        iat = _numeric_claim(payload, "iat", required=True)
        nbf = _numeric_claim(payload, "nbf", required=False)
        assert exp is not None and iat is not None
        if now > exp + leeway:
            raise AuthenticationFailed("TOKEN_EXPIRED", f"exp {exp} is before now {int(now)}")
        if nbf is not None and nbf > now + leeway:
            raise AuthenticationFailed("TOKEN_NOT_YET_VALID", f"nbf {nbf} is after now {int(now)}")
        if iat > now + leeway:
            raise AuthenticationFailed(
                "TOKEN_ISSUED_IN_FUTURE", f"iat {iat} is after now {int(now)}"
            )
        if exp - iat > cfg.max_token_lifetime_seconds:
            raise AuthenticationFailed(
                "TOKEN_LIFETIME_TOO_LONG",
                f"exp - iat = {exp - iat:.0f}s > {cfg.max_token_lifetime_seconds}s",
            )
        issuer = payload.get("iss")
        # exact match: a substring or prefix test was CVE-2024-53861
        if not isinstance(issuer, str) or issuer != cfg.issuer:
            raise AuthenticationFailed("TOKEN_ISSUER_MISMATCH", f"iss {str(issuer)[:200]!r}")
        audience = payload.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise AuthenticationFailed("TOKEN_AUDIENCE_MISMATCH", "aud is missing or malformed")
        if cfg.audience not in audiences:
            raise AuthenticationFailed("TOKEN_AUDIENCE_MISMATCH", f"aud {audiences[:8]!r}")
        subject = payload.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthenticationFailed("TOKEN_SUBJECT_MISSING", "sub is missing or not a string")
        for name in cfg.required_claims:
            if payload.get(name) is None:
                raise AuthenticationFailed("TOKEN_CLAIM_MISSING", f"{name[:64]} is required")
        jti = payload.get("jti")
        if jti is not None and (not isinstance(jti, str) or not jti):
            # RFC 7519 4.1.7: a string; a number would slip past revocation and replay by jti
            raise AuthenticationFailed("TOKEN_MALFORMED", "jti is not a string")
        return VerifiedClaims(
            subject,
            issuer,
            jti,
            exp,
            MappingProxyType(payload),
            cfg,
        )


class IssuerRouter:
    """Verifies each token with the verifier of the issuer it names, matched exactly."""

    def __init__(self, verifiers: Mapping[str, TokenVerifier]) -> None:
        self.verifiers = dict(verifiers)
        self._first = next(iter(self.verifiers.values()))

    def verify(self, token: str, now: float | None = None) -> VerifiedClaims:
        return self.for_token(token).verify(token, now)

    def for_token(self, token: str) -> TokenVerifier:
        """The verifier for the token's ``iss``; raises for an issuer nobody trusts."""
        if len(self.verifiers) == 1 or len(token) > MAX_TOKEN_BYTES:
            return self._first  # which reports the size, or judges the one issuer
        segments = token.split(".")
        if len(segments) != 3 or not token.isascii():
            return self._first  # which reports the malformed token
        issuer = _decode_json_segment(segments[1], "payload").get("iss")
        verifier = self.verifiers.get(issuer) if isinstance(issuer, str) else None
        if verifier is None:
            # exact match only: a prefix or suffix of a trusted issuer is another issuer
            raise AuthenticationFailed("TOKEN_ISSUER_MISMATCH", f"iss {str(issuer)[:200]!r}")
        return verifier

    @property
    def remotes(self) -> list[RemoteKeys]:
        return [v.remote for v in self.verifiers.values() if v.remote is not None]


def _numeric_claim(payload: dict[str, Any], name: str, required: bool) -> float | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise AuthenticationFailed("TOKEN_CLAIM_MISSING", f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthenticationFailed("TOKEN_MALFORMED", f"{name} is not a number")
    # a 400-digit integer would overflow float(); NaN would slip past every comparison
    if isinstance(value, int) and not -(2**53) < value < 2**53:
        raise AuthenticationFailed("TOKEN_MALFORMED", f"{name} is out of range")
    if not math.isfinite(value):
        raise AuthenticationFailed("TOKEN_MALFORMED", f"{name} is not finite")
    return float(value)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise AuthenticationFailed("TOKEN_DUPLICATE_KEY", f"duplicate JSON key {key[:64]!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_json_segment(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise AuthenticationFailed("TOKEN_MALFORMED", f"{what} is not base64url") from None
    try:
        value = json.loads(
            raw, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError):
        raise AuthenticationFailed("TOKEN_MALFORMED", f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise AuthenticationFailed("TOKEN_MALFORMED", f"{what} is not a JSON object")
    return value
