"""One regression test per published attack class, in the manner of PyJWT's ``test_advisory.py``.

Each test is named after its source (an RFC section, a CVE, a CWE or a report) and goes
through a real agent with mTLS: it asserts the gRPC status (through the client's typed
exceptions), that nothing ran (the marker the ``touch`` template would have created does
not exist), and that the last audit record names the reason code. Every token is signed
for real: by the trusted test keys, by an attacker's own key, or by hand where PyJWT
refuses to build the forgery.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.server
import json
import os
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from cmdgate.agent.errors import InvalidParameters as ParamError
from cmdgate.agent.templates import ParamSpec, ParamType
from cmdgate.agent.tokens import MAX_TOKEN_BYTES
from cmdgate.client import InvalidParameters, NotAuthenticated, NotPermitted
from cmdgate.client.api import ClientError
from cmdgate.shared.keys import public_jwk
from cmdgate.v1 import agent_pb2, agent_pb2_grpc
from tests.support import ES_KID, ISSUER, KID, Agent, good_claims, sign

# ---- helpers ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json_segment(value: Any) -> str:
    return _b64(json.dumps(value).encode())


def _fresh_marker(agent: Agent) -> Path:
    return agent.marker(f"advisory-{secrets.token_hex(6)}")


def _sign_raw(agent: Agent, header: str, payload: str) -> str:
    """Sign raw header and payload JSON text (duplicates and all) with the trusted EdDSA key."""
    signing_input = f"{_b64(header.encode())}.{_b64(payload.encode())}"
    key = agent.keys.ed25519
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return f"{signing_input}.{_b64(key.sign(signing_input.encode()))}"


def _refused(
    agent: Agent,
    token: str,
    error: type[ClientError],
    reason: str,
    command: str = "touch",
    params: dict[str, str] | None = None,
    marker: Path | None = None,
) -> dict[str, Any]:
    """Ask ``command`` to touch a fresh marker; assert ``error``, no marker, that no run
    started, and the reason."""
    marker = marker or _fresh_marker(agent)
    before = len(agent.audit())
    with agent.client(token) as client, pytest.raises(error):
        client.run(command, {"file": str(marker)} if params is None else params)
    assert not marker.exists(), "a refused call ran its command"
    record = agent.only_new_denial(before)
    assert record["reason"] == reason, record
    if error is NotAuthenticated:
        # nothing of an unverified token is trusted, and the token is never written down
        assert record["sub"] is None, record
        assert token not in agent.audit_path.read_text()
    return record


def _unauthenticated(agent: Agent, token: str, reason: str, marker: Path | None = None) -> None:
    _refused(agent, token, NotAuthenticated, reason, marker=marker)


def _attacker_certificate(key: ed25519.Ed25519PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, None)
    )


@dataclass
class AttackerSite:
    """A loopback web server publishing the attacker's key; it counts every request."""

    base: str
    key: ed25519.Ed25519PrivateKey
    certificate: x509.Certificate
    requests: list[str]


@pytest.fixture(scope="module")
def attacker() -> Iterator[AttackerSite]:
    key = ed25519.Ed25519PrivateKey.generate()
    certificate = _attacker_certificate(key)
    bodies = {
        "/jwks.json": json.dumps(
            {"keys": [public_jwk(key, KID), public_jwk(key, "attacker")]}
        ).encode(),
        "/cert.pem": certificate.public_bytes(serialization.Encoding.PEM),
    }
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = bodies.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="attacker-site", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        base = f"http://{host!s}:{port}"
        # control: the site answers, so zero requests later means the agent never asked
        with urllib.request.urlopen(f"{base}/jwks.json", timeout=5) as response:  # noqa: S310
            assert json.load(response)["keys"][0]["kid"] == KID
        assert requests == ["/jwks.json"]
        requests.clear()
        yield AttackerSite(base, key, certificate, requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _attacker_token(site: AttackerSite, headers: dict[str, Any]) -> str:
    return jwt.encode(
        good_claims(), site.key, algorithm="EdDSA", headers={"typ": "at+jwt", **headers}
    )


# ---- RFC 8725 §3.1: alg none -----------------------------------------------------------------


@pytest.mark.parametrize("signature", ["", _b64(b"garbage-signature")], ids=["empty", "garbage"])
@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_rfc8725_3_1_alg_none_is_refused(agent: Agent, alg: str, signature: str) -> None:
    header = _json_segment({"alg": alg, "kid": KID, "typ": "at+jwt"})
    token = f"{header}.{_json_segment(good_claims())}.{signature}"
    _unauthenticated(agent, token, "TOKEN_ALG_NOT_ALLOWED")


# ---- CVE-2022-29217 (PyJWT), CVE-2016-10555: HS256 keyed with the public key ----------------


def _public_key_forms(agent: Agent, which: str) -> dict[str, bytes]:
    private = agent.keys.ed25519 if which == "ed" else agent.keys.es256
    public = private.public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return {
        "pem": public.public_bytes(serialization.Encoding.PEM, spki),
        "der": public.public_bytes(serialization.Encoding.DER, spki),
        "jwk": json.dumps(public_jwk(private, KID if which == "ed" else ES_KID)).encode(),
        "jwks-file": agent.keys.jwks.read_bytes(),
    }


@pytest.mark.parametrize("form", ["pem", "der", "jwk", "jwks-file"])
@pytest.mark.parametrize("which", ["ed", "es"])
def test_cve_2022_29217_hs256_signed_with_the_public_key(
    agent: Agent, which: str, form: str
) -> None:
    secret = _public_key_forms(agent, which)[form]
    kid = KID if which == "ed" else ES_KID
    # PyJWT refuses to HMAC with a key that looks asymmetric: build the forgery by hand
    signing_input = f"{_json_segment({'alg': 'HS256', 'kid': kid, 'typ': 'at+jwt'})}"
    signing_input += f".{_json_segment(good_claims())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    _unauthenticated(agent, f"{signing_input}.{_b64(mac)}", "TOKEN_ALG_NOT_ALLOWED")


# ---- CVE-2018-0114 (embedded jwk), RFC 8725 §3.10 (jku, x5u, x5c): keys named by the token ---


_KID_CASES = {"trusted-kid": KID, "unknown-kid": "attacker", "no-kid": None}
_KID_REASONS = {
    "trusted-kid": "TOKEN_SIGNATURE_INVALID",
    "unknown-kid": "TOKEN_KID_UNKNOWN",
    "no-kid": "TOKEN_KID_UNKNOWN",
}


def _with_kid(headers: dict[str, Any], kid_case: str) -> dict[str, Any]:
    kid = _KID_CASES[kid_case]
    return headers if kid is None else {**headers, "kid": kid}


@pytest.mark.parametrize("kid_case", sorted(_KID_CASES))
def test_cve_2018_0114_embedded_jwk_header_is_not_trusted(
    agent: Agent, attacker: AttackerSite, kid_case: str
) -> None:
    jwk = public_jwk(attacker.key, _KID_CASES[kid_case] or "attacker")
    token = _attacker_token(attacker, _with_kid({"jwk": jwk}, kid_case))
    _unauthenticated(agent, token, _KID_REASONS[kid_case])


@pytest.mark.parametrize("kid_case", sorted(_KID_CASES))
@pytest.mark.parametrize("header", ["jku", "x5u", "x5c"])
def test_rfc8725_3_10_jku_x5u_x5c_are_never_fetched_or_trusted(
    agent: Agent, attacker: AttackerSite, header: str, kid_case: str
) -> None:
    value: Any = {
        "jku": f"{attacker.base}/jwks.json",
        "x5u": f"{attacker.base}/cert.pem",
        "x5c": [
            base64.b64encode(attacker.certificate.public_bytes(serialization.Encoding.DER)).decode()
        ],
    }[header]
    before = len(attacker.requests)
    token = _attacker_token(attacker, _with_kid({header: value}, kid_case))
    _unauthenticated(agent, token, _KID_REASONS[kid_case])
    time.sleep(0.1)  # a fetch in the background would have arrived by now
    assert attacker.requests[before:] == [], "the agent fetched a URL the token named"


# ---- RFC 8725 §3.10: kid injection -----------------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [
        "../../etc/passwd",
        "/dev/null",
        "' OR 1=1--",
        "test-ed' OR '1'='1",
        "$(touch {marker})",
        "`touch {marker}`; touch {marker}",
        "test-ed\x00",
        "\x00",
        "test-ed ",
        "TEST-ED",
        "",
    ],
    ids=[
        "path",
        "dev-null",
        "sql",
        "sql-after-trusted",
        "shell-subst",
        "shell-backtick",
        "nul-after-trusted",
        "nul",
        "trailing-space",
        "case",
        "empty",
    ],
)
def test_rfc8725_3_10_kid_injection(agent: Agent, kid: str) -> None:
    marker = _fresh_marker(agent)
    token = sign(good_claims(), agent.keys.ed25519, {"kid": kid.replace("{marker}", str(marker))})
    _unauthenticated(agent, token, "TOKEN_KID_UNKNOWN", marker=marker)


# ---- CVE-2020-28042: a null or a stripped signature -----------------------------------------


@pytest.mark.parametrize(
    "signature", ["", _b64(bytes(64)), _b64(bytes(1))], ids=["stripped", "null-64", "null-1"]
)
def test_cve_2020_28042_null_and_stripped_signature(agent: Agent, signature: str) -> None:
    head = agent.token().rsplit(".", 1)[0]
    _unauthenticated(agent, f"{head}.{signature}", "TOKEN_SIGNATURE_INVALID")


# ---- CVE-2022-21449: the ECDSA psychic signature ---------------------------------------------

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.mark.parametrize(
    "signature",
    [bytes(64), _P256_ORDER.to_bytes(32, "big") * 2],
    ids=["r=s=0", "r=s=n"],
)
def test_cve_2022_21449_ecdsa_psychic_signature(agent: Agent, signature: bytes) -> None:
    header = _json_segment({"alg": "ES256", "kid": ES_KID, "typ": "at+jwt"})
    token = f"{header}.{_json_segment(good_claims())}.{_b64(signature)}"
    _unauthenticated(agent, token, "TOKEN_SIGNATURE_INVALID")


# ---- RFC 7515 §4.1.11: crit, and RFC 7797: b64 false -----------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"crit": ["x-unknown"], "x-unknown": True},
        {"crit": ["exp"]},
        {"crit": []},
        {"crit": "x-unknown"},
    ],
    ids=["extension", "registered-name", "empty-list", "string"],
)
def test_rfc7515_4_1_11_unknown_crit_is_refused(agent: Agent, headers: dict[str, Any]) -> None:
    token = sign(good_claims(), agent.keys.ed25519, headers)
    _unauthenticated(agent, token, "TOKEN_CRIT_UNSUPPORTED")


def test_rfc7797_b64_false_with_crit_is_refused(agent: Agent) -> None:
    header = json.dumps(
        {"alg": "EdDSA", "kid": KID, "typ": "at+jwt", "b64": False, "crit": ["b64"]}
    )
    token = _sign_raw(agent, header, json.dumps(good_claims()))
    _unauthenticated(agent, token, "TOKEN_CRIT_UNSUPPORTED")


def test_rfc7797_b64_false_without_crit_is_refused(agent: Agent) -> None:
    # signed over the ordinary encoded payload: only the header claims it is unencoded
    header = json.dumps({"alg": "EdDSA", "kid": KID, "typ": "at+jwt", "b64": False})
    token = _sign_raw(agent, header, json.dumps(good_claims()))
    _unauthenticated(agent, token, "TOKEN_MALFORMED")


# ---- RFC 8725 §3.11 and RFC 9068 §2.1: typ confusion ----------------------------------------


@pytest.mark.parametrize(
    "typ",
    ["JWT", "jwt", "id_token+jwt", "application/jwt", "secevent+jwt", "at+jwt2", ["at+jwt"], None],
    ids=["JWT", "jwt", "id-token", "application-jwt", "secevent", "suffix", "list", "missing"],
)
def test_rfc8725_3_11_typ_confusion(agent: Agent, typ: Any) -> None:
    header: dict[str, Any] = {"alg": "EdDSA", "kid": KID}
    if typ is not None:
        header["typ"] = typ
    token = _sign_raw(agent, json.dumps(header), json.dumps(good_claims()))
    _unauthenticated(agent, token, "TOKEN_TYPE_INVALID")


# ---- RFC 7519 §5.2 nested JWTs and RFC 7516 JWE ----------------------------------------------


def test_rfc7519_5_2_nested_jwt_is_refused(agent: Agent) -> None:
    inner = agent.token()  # a perfectly good token, wrapped as the payload of another
    header = {"alg": "EdDSA", "kid": KID, "typ": "at+jwt", "cty": "JWT"}
    signing_input = f"{_json_segment(header)}.{_b64(inner.encode())}"
    key = agent.keys.ed25519
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    token = f"{signing_input}.{_b64(key.sign(signing_input.encode()))}"
    _unauthenticated(agent, token, "TOKEN_MALFORMED")


def test_rfc7516_jwe_shaped_token_is_refused(agent: Agent) -> None:
    header = _json_segment({"alg": "dir", "enc": "A256GCM", "kid": KID, "typ": "at+jwt"})
    parts = [header, "", _b64(secrets.token_bytes(12)), _b64(b"ciphertext"), _b64(bytes(16))]
    _unauthenticated(agent, ".".join(parts), "TOKEN_MALFORMED")


# ---- CVE-2024-53861 (PyJWT): iss matched partially --------------------------------------------


@pytest.mark.parametrize(
    "iss",
    [
        ISSUER + ".evil",
        ISSUER + "/",
        ISSUER + "\x00",
        ISSUER + " ",
        "https://evil." + ISSUER.removeprefix("https://"),
        ISSUER[:-1],
        "cmdgate",
        "https://",
        "",
        ISSUER.upper(),
        [ISSUER],
        list(ISSUER),
        {"iss": ISSUER},
        None,
    ],
    ids=[
        "suffix",
        "trailing-slash",
        "trailing-nul",
        "trailing-space",
        "prefix",
        "truncated",
        "substring",
        "scheme-only",
        "empty",
        "upper",
        "list",
        "list-of-chars",
        "dict",
        "missing",
    ],
)
def test_cve_2024_53861_iss_prefix_and_suffix(agent: Agent, iss: Any) -> None:
    claims = good_claims()
    if iss is None:
        del claims["iss"]
    else:
        claims["iss"] = iss
    # by hand: PyJWT refuses to encode an iss that is not a string
    header = json.dumps({"alg": "EdDSA", "kid": KID, "typ": "at+jwt"})
    _unauthenticated(agent, _sign_raw(agent, header, json.dumps(claims)), "TOKEN_ISSUER_MISMATCH")


# ---- RFC 7515 §4 and RFC 7519 §4: duplicate JSON keys ---------------------------------------


@pytest.mark.parametrize("where", ["header", "payload"])
def test_rfc7519_4_duplicate_json_keys_are_refused(agent: Agent, where: str) -> None:
    header = json.dumps({"alg": "EdDSA", "kid": KID, "typ": "at+jwt"})
    payload = json.dumps(good_claims(cmds=[]))
    if where == "header":
        # a parser that kept the first would see an unknown typ; PyJWT keeps the last
        header = header[:-1] + ', "typ": "JWT", "typ": "at+jwt"}'
    else:
        # PyJWT keeps the last: an empty whitelist silently becomes one with "touch"
        payload = payload[:-1] + ', "cmds": ["touch"]}'
    _unauthenticated(agent, _sign_raw(agent, header, payload), "TOKEN_DUPLICATE_KEY")


# ---- CVE-2024-33664 (python-jose "JWT bomb"): size is capped before any cryptography ---------


def _tokens_around_the_cap(agent: Agent) -> tuple[str, str]:
    """Two tokens signed with the trusted key, padded by one claim: the longest one within
    the cap and the shortest one over it."""
    pad = (MAX_TOKEN_BYTES - len(sign(good_claims(pad=""), agent.keys.ed25519))) * 3 // 4 - 8
    within = sign(good_claims(pad="x" * pad), agent.keys.ed25519)
    assert len(within) <= MAX_TOKEN_BYTES
    while True:
        pad += 1
        token = sign(good_claims(pad="x" * pad), agent.keys.ed25519)
        if len(token) > MAX_TOKEN_BYTES:
            return within, token
        within = token


def test_cve_2024_33664_oversized_tokens_and_claims(agent: Agent) -> None:
    within, just_over = _tokens_around_the_cap(agent)
    assert MAX_TOKEN_BYTES - 2 <= len(within) <= MAX_TOKEN_BYTES < len(just_over) <= 8195
    # control: a token at the cap is fine, so it is the size that refuses the next one
    marker = _fresh_marker(agent)
    with agent.client(within) as client:
        assert client.run("touch", {"file": str(marker)}).exit_code == 0
    assert marker.exists()
    # one claim pushes an otherwise ordinary, validly signed token just over the cap
    _unauthenticated(agent, just_over, "TOKEN_TOO_LARGE")
    # far over: 12 KiB (still under gRPC's metadata limit, so the agent itself says no)
    far_over = sign(good_claims(pad="y" * 9000), agent.keys.ed25519)
    assert len(far_over) > 12 * 1024
    _unauthenticated(agent, far_over, "TOKEN_TOO_LARGE")
    # an oversized garbage token is refused for its size, not parsed
    _unauthenticated(agent, "A" * (MAX_TOKEN_BYTES + 1), "TOKEN_TOO_LARGE")


# ---- RFC 6750 §2: exactly one way to present the token ---------------------------------------


def test_rfc6750_2_two_authorization_entries_are_ambiguous(agent: Agent) -> None:
    marker = _fresh_marker(agent)
    good = agent.token()
    credentials = grpc.ssl_channel_credentials(
        agent.lab.ca_cert.read_bytes(),
        agent.lab.client_key.read_bytes(),
        agent.lab.client_cert.read_bytes(),
    )
    for metadata in (
        (("authorization", f"Bearer {good}"), ("authorization", "Bearer x.y.z")),
        (("authorization", f"Bearer {good}"), ("authorization", f"Bearer {good}")),
    ):
        with grpc.secure_channel(agent.target, credentials) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            request = agent_pb2.RunRequest(command="touch", params={"file": str(marker)})
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Run(request, metadata=metadata, timeout=10))
        error = info.value
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not marker.exists()
        record = agent.last_audit()
        assert (record["event"], record["reason"]) == ("run.denied", "TOKEN_AMBIGUOUS")


# ---- CVE-2024-53861's class again: `in` on a string. The whitelist must be list[str] --------


@pytest.mark.parametrize(
    "claim",
    ["touch probe", "touch", {"touch": True}, None, True, 1, ["touch", None], [["touch"]]],
    ids=["spaced-string", "string", "dict", "null", "bool", "number", "list-with-null", "nested"],
)
def test_cve_2024_53861_class_whitelist_claim_of_the_wrong_type(agent: Agent, claim: Any) -> None:
    # the claim is present, with the value null too: good_claims() would drop a None
    token = sign({**good_claims(), "cmds": claim}, agent.keys.ed25519)
    _refused(agent, token, NotPermitted, "COMMANDS_CLAIM_INVALID")


@pytest.mark.parametrize("jti", [123, 1.5, True, ["a"], {"a": 1}, ""], ids=repr)
def test_rfc7519_4_1_7_jti_must_be_a_string(agent: Agent, jti: Any) -> None:
    # a number would escape revocation and replay, which both go by the jti string
    token = sign({**good_claims(), "jti": jti}, agent.keys.ed25519)
    _unauthenticated(agent, token, "TOKEN_MALFORMED")


# ---- Unicode TR36 / UTS 39: names that look alike are different names ------------------------

_LOOKALIKES = {
    "upper": "TOUCH",
    "title": "Touch",
    "fullwidth": "ｔｏｕｃｈ",
    "cyrillic-o": "tоuch",
    "cyrillic-c": "touсh",
    "zero-width-space": "touch\u200b",
    "zero-width-joiner": "tou\u200dch",
    "bom": "\ufefftouch",
    "combining": "touch\u0301",
    "trailing-space": "touch ",
    "trailing-tab": "touch\t",
    "trailing-newline": "touch\n",
    "nbsp": "touch\u00a0",
    "trailing-nul": "touch\x00",
    "leading-space": " touch",
}


@pytest.mark.parametrize("case", sorted(_LOOKALIKES))
def test_utr36_command_name_lookalikes_are_different_names(agent: Agent, case: str) -> None:
    name = _LOOKALIKES[case]
    # the request names the look-alike; the token holds only the real name
    _refused(agent, agent.token(["touch"]), NotPermitted, "COMMAND_NOT_IN_TOKEN", command=name)
    # the token holds only the look-alike; the request names the real one
    _refused(agent, agent.token([name]), NotPermitted, "COMMAND_NOT_IN_TOKEN")
    # the token holds the look-alike and the request names it: no such template on this host
    _refused(agent, agent.token([name]), NotPermitted, "COMMAND_NOT_IN_ALLOWLIST", command=name)


# ---- CWE-88, CWE-22, CWE-59: argument injection and path escapes -----------------------------


@pytest.mark.parametrize(
    "value",
    ["-rf", "--checkpoint-action=exec=touch {marker}", "--reference=/etc/passwd", "-"],
    ids=["rf", "tar-checkpoint-action", "long-option", "lone-dash"],
)
def test_cwe_88_option_injection_in_path_parameters(agent: Agent, value: str) -> None:
    marker = _fresh_marker(agent)
    params = {"file": value.replace("{marker}", str(marker))}
    _refused(agent, agent.token(), InvalidParameters, "PARAM_INVALID", params=params, marker=marker)


@pytest.mark.parametrize(
    "suffix", ["/../escaped", "/./escaped", "/sub/../../escaped", "//escaped", "/escaped/"]
)
def test_cwe_22_dot_dot_in_path_parameters(agent: Agent, suffix: str) -> None:
    params = {"file": f"{agent.marker_dir}{suffix}"}
    # where touch would have written, had the value been taken as it normalises
    target = Path(os.path.normpath(params["file"]))
    _refused(agent, agent.token(), InvalidParameters, "PARAM_INVALID", params=params, marker=target)


def test_cwe_59_symlink_escape_in_path_parameters(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    folder_link = agent.marker_dir / f"to-outside-{secrets.token_hex(4)}"
    file_link = agent.marker_dir / f"to-outside-file-{secrets.token_hex(4)}"
    folder_link.symlink_to(outside, target_is_directory=True)
    file_link.symlink_to(outside / "via-file-link")
    try:
        for path in (folder_link / "via-folder-link", file_link):
            params = {"file": str(path)}
            _refused(agent, agent.token(), InvalidParameters, "PARAM_INVALID", params=params)
        assert list(outside.iterdir()) == [], "a command wrote through a symlink"
    finally:
        folder_link.unlink()
        file_link.unlink()


# ---- GTFOBins / Python int(): Unicode digits in int parameters -------------------------------
# The test agent has no int template (and this file adds none), so this is a unit check of the
# one function the agent validates int parameters with.


def _int_spec() -> ParamSpec:
    return ParamSpec(
        name="count",
        type=ParamType.INT,
        required=True,
        default=None,
        max_length=64,
        allow_leading_dash=False,
        min=0,
        max=1000,
    )


@pytest.mark.parametrize(
    "value",
    [
        "１２",
        "١٢",
        "۱۲",
        "१२",
        "𝟏𝟐",
        "1_000",
        " 12",
        "12 ",
        "12\n",
        "+12",
        "0x10",
        "1e2",
        "²",
        "12\u200b",
        "",
        "-1",
        "1001",
    ],
    ids=[
        "fullwidth",
        "arabic-indic",
        "persian",
        "devanagari",
        "math-bold",
        "underscore",
        "leading-space",
        "trailing-space",
        "trailing-newline",
        "plus",
        "hex",
        "exponent",
        "superscript",
        "zero-width",
        "empty",
        "leading-dash",
        "over-max",
    ],
)
def test_gtfobins_int_unicode_digits_in_int_parameters(value: str) -> None:
    spec = _int_spec()
    with pytest.raises(ParamError) as info:
        spec.validate(value)
    assert info.value.reason == "PARAM_INVALID"


def test_gtfobins_int_ascii_digits_are_accepted_and_canonical() -> None:
    spec = _int_spec()
    assert spec.validate("12") == "12"
    assert spec.validate("007") == "7"


# ---- controls: the forging helpers above make tokens the agent accepts when nothing is off ---


def test_control_hand_signed_and_helper_signed_tokens_run(agent: Agent) -> None:
    header = json.dumps({"alg": "EdDSA", "kid": KID, "typ": "at+jwt"})
    for token in (
        _sign_raw(agent, header, json.dumps(good_claims())),
        sign(good_claims(), agent.keys.ed25519),
    ):
        marker = _fresh_marker(agent)
        with agent.client(token) as client:
            assert client.run("touch", {"file": str(marker)}).exit_code == 0
        assert marker.exists()
        assert agent.last_audit("run.finished")["sub"] == "mallory"
