"""Signing keys, JWKS files and lab tokens.

``cmdgate keygen`` and ``cmdgate token mint`` use this, and so does
``cmdgate-agent init`` when it writes a lab set-up. The agent's token
verification does not: it only reads the JWKS file (see ``cmdgate.agent.tokens``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey

# The algorithms keygen can make. Verification accepts a few more (see the agent).
KEYGEN_ALGORITHMS = ("EdDSA", "ES256")
KID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The token type of RFC 9068 (JWT access tokens), which tells them from ID tokens.
ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret

_EC_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class KeyFileError(Exception):
    """A key file or JWKS file cannot be used; the message says which and why."""


def generate_signing_key(alg: str) -> SigningKey:
    """A new private key for ``alg`` (``EdDSA`` is Ed25519, ``ES256`` is P-256)."""
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unsupported algorithm {alg!r}: choose one of {', '.join(KEYGEN_ALGORITHMS)}")


def algorithm_for_key(key: SigningKey) -> str:
    """The one JWS algorithm this key signs with."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    alg = _EC_CURVE_ALGORITHMS.get(key.curve.name)
    if alg is None:
        raise KeyFileError(f"unsupported EC curve {key.curve.name}")
    return alg


def public_jwk(key: SigningKey, kid: str | None = None) -> dict[str, Any]:
    """The public half of ``key`` as a JWK with ``kid``, ``alg`` and ``use``.

    Without ``kid``, the RFC 7638 thumbprint is used, so the id is stable for a key.
    """
    alg = algorithm_for_key(key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    assert isinstance(jwk, dict)
    jwk_dict: dict[str, Any] = dict(jwk)
    jwk_dict.pop("kid", None)
    jwk_dict["kid"] = kid if kid is not None else jwk_thumbprint(jwk_dict)
    jwk_dict["alg"] = alg
    jwk_dict["use"] = "sig"
    return jwk_dict


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of an OKP or EC public key, base64url."""
    members = ("crv", "kty", "x") if jwk["kty"] == "OKP" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def write_private_key(key: SigningKey, path: Path) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, readable by the owner alone; never overwrite."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_new_file(path, pem, mode=0o600)


def write_new_file(path: Path, content: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` and ``content``; refuse to replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(content)


def load_private_key(path: Path) -> SigningKey:
    """Read a PEM private key made by ``cmdgate keygen`` (Ed25519 or EC)."""
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: only Ed25519 and EC keys are supported")
    return key


def add_to_jwks(jwks_path: Path, jwk: dict[str, Any]) -> None:
    """Add ``jwk`` to the JWKS file, creating it if needed; a kid already present is an error.

    Adding rather than replacing lets a new key be published before the old one retires.
    """
    keys: list[dict[str, Any]] = []
    if jwks_path.exists():
        try:
            existing = json.loads(jwks_path.read_text())
            keys = list(existing["keys"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KeyFileError(f"{jwks_path}: not a readable JWKS file ({e})") from None
    if any(k.get("kid") == jwk["kid"] for k in keys):
        raise KeyFileError(f"{jwks_path}: a key with kid {jwk['kid']!r} is already there")
    keys.append(jwk)
    # a fresh, exclusive temporary name, then an atomic rename: readers never see half a file
    tmp = jwks_path.with_name(f".{jwks_path.name}.{secrets.token_hex(8)}.tmp")
    write_new_file(tmp, (json.dumps({"keys": keys}, indent=2) + "\n").encode(), mode=0o644)
    os.replace(tmp, jwks_path)


def _remove_from_jwks(jwks_path: Path, kid: str) -> None:
    keys = [k for k in json.loads(jwks_path.read_text())["keys"] if k.get("kid") != kid]
    tmp = jwks_path.with_name(f".{jwks_path.name}.{secrets.token_hex(8)}.tmp")
    write_new_file(tmp, (json.dumps({"keys": keys}, indent=2) + "\n").encode(), mode=0o644)
    os.replace(tmp, jwks_path)


def keygen(out_dir: Path, alg: str = "EdDSA", kid: str | None = None) -> tuple[Path, Path, str]:
    """Make a key pair in ``out_dir``: ``<kid>.pem`` (0600) and the public key in ``jwks.json``.

    Returns the private key path, the JWKS path and the kid.
    """
    if kid is not None and not KID_PATTERN.fullmatch(kid):
        raise ValueError(f"kid {kid!r} must match {KID_PATTERN.pattern}")
    key = generate_signing_key(alg)
    jwk = public_jwk(key, kid)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = out_dir / f"{jwk['kid']}.pem"
    jwks_path = out_dir / "jwks.json"
    # publish first: a private key whose public half is not published is of no use
    add_to_jwks(jwks_path, jwk)
    try:
        write_private_key(key, key_path)
    except KeyFileError:
        _remove_from_jwks(jwks_path, jwk["kid"])
        raise
    return key_path, jwks_path, str(jwk["kid"])


def certificate_sha256(pem: bytes) -> bytes:
    """SHA-256 of the DER form of a PEM certificate; ValueError if it is not one."""
    from cryptography import x509

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).digest()


def thumbprint(sha256: bytes) -> str:
    """RFC 8705 ``x5t#S256`` of a certificate, from its ``certificate_sha256``."""
    return base64.urlsafe_b64encode(sha256).rstrip(b"=").decode()


def certificate_thumbprint(pem: bytes) -> str:
    """RFC 8705 ``x5t#S256``: base64url SHA-256 of the DER certificate."""
    return thumbprint(certificate_sha256(pem))


def parse_duration(text: str) -> int:
    """Seconds in ``90``, ``90s``, ``15m``, ``2h`` or ``1d``; raise ValueError otherwise."""
    match = re.fullmatch(r"([0-9]{1,9})([smhd]?)", text.strip())
    if match is None:
        raise ValueError(f"bad duration {text!r}: use e.g. 90s, 15m, 2h")
    seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def mint_token(
    key: SigningKey,
    *,
    kid: str,
    issuer: str,
    audience: str,
    subject: str,
    commands: Sequence[str],
    ttl_seconds: int,
    commands_claim: str = "cmds",
    now: float | None = None,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """A signed access token (``typ: at+jwt``) with a random ``jti``, for labs and small fleets."""
    issued_at = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl_seconds,
        "jti": secrets.token_urlsafe(16),
        commands_claim: list(commands),
        **(extra_claims or {}),
    }
    headers = {"kid": kid, "typ": ACCESS_TOKEN_TYPE}
    return jwt.encode(claims, key, algorithm=algorithm_for_key(key), headers=headers)
