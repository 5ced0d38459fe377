"""Every gate failure, through a real agent: the status, that nothing ran, and the audit reason.

Each case asks the agent to ``touch`` a marker file; a denial must leave no marker.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from cmdgate.client import Client, InvalidParameters, NotAuthenticated, NotPermitted
from cmdgate.client.api import ClientError
from cmdgate.v1 import agent_pb2, agent_pb2_grpc
from tests.support import ES_KID, KID, Agent, good_claims, sign, start_test_agent

_marker_count = 0


def _new_marker(agent: Agent) -> Path:
    global _marker_count
    _marker_count += 1
    return agent.marker(f"denied-{_marker_count}")


def assert_denied(
    agent: Agent,
    token: str,
    error: type[ClientError],
    reason: str,
    command: str = "touch",
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``command`` with ``token``; assert the error, no marker, and the audit reason."""
    marker = _new_marker(agent)
    before = len(agent.audit())
    with agent.client(token) as client, pytest.raises(error):
        client.run(command, {"file": str(marker)} if params is None else params)
    assert not marker.exists(), "a denied call ran its command"
    record = agent.only_new_denial(before)
    assert record["reason"] == reason, record
    return record


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _resign(agent: Agent, header: str, payload: str) -> str:
    """Sign raw header and payload JSON text with the test EdDSA key."""
    signing_input = f"{_b64(header.encode())}.{_b64(payload.encode())}".encode()
    signature = agent.keys.ed25519.sign(signing_input)  # type: ignore[call-arg]
    return f"{signing_input.decode()}.{_b64(signature)}"


# ---- gate 1: authentication → UNAUTHENTICATED ----------------------------------------------


def test_valid_token_runs(agent: Agent) -> None:
    marker = _new_marker(agent)
    with agent.client() as client:
        assert client.run("touch", {"file": str(marker)}).exit_code == 0
    assert marker.exists()
    assert agent.last_audit("run.finished")["sub"] == "alice"


def _raw_run(agent: Agent, metadata: tuple[tuple[str, str], ...], marker: Path) -> grpc.RpcError:
    credentials = grpc.ssl_channel_credentials(
        agent.lab.ca_cert.read_bytes(),
        agent.lab.client_key.read_bytes(),
        agent.lab.client_cert.read_bytes(),
    )
    with grpc.secure_channel(agent.target, credentials) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        request = agent_pb2.RunRequest(command="touch", params={"file": str(marker)})
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Run(request, metadata=metadata, timeout=10))
    return info.value


@pytest.mark.parametrize(
    ("case", "reason"),
    [("none", "TOKEN_MISSING"), ("two", "TOKEN_AMBIGUOUS"), ("basic", "TOKEN_MALFORMED")],
)
def test_authorization_metadata_must_be_exactly_one_bearer(
    agent: Agent, case: str, reason: str
) -> None:
    token = agent.token()
    metadata = {
        "none": (),
        "two": (("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")),
        "basic": (("authorization", "Basic YWxpY2U6c2VjcmV0"),),
    }[case]
    marker = _new_marker(agent)
    error = _raw_run(agent, metadata, marker)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not marker.exists()
    record = agent.last_audit()
    assert (record["event"], record["reason"]) == ("run.denied", reason)


def _flip_signature(token: str) -> str:
    """The same token with the first character of its signature changed."""
    head, signature = token.rsplit(".", 1)
    return f"{head}.{'B' if signature[0] != 'B' else 'C'}{signature[1:]}"


def _claims_case(agent: Agent, **overrides: Any) -> str:
    return sign(good_claims(**overrides), agent.keys.ed25519)


def _now() -> int:
    # read when a case runs, not when the module is collected: minutes may pass between
    return int(time.time())


TOKEN_CASES: dict[str, tuple[Callable[[Agent], str], str]] = {
    "garbage": (lambda a: "not-a-jwt", "TOKEN_MALFORMED"),
    "four segments": (lambda a: a.token() + ".x", "TOKEN_MALFORMED"),
    "oversize": (lambda a: _claims_case(a, pad="x" * 9000), "TOKEN_TOO_LARGE"),
    "expired": (lambda a: _claims_case(a, iat=_now() - 600, exp=_now() - 120), "TOKEN_EXPIRED"),
    "no exp": (lambda a: _claims_case(a, exp=None), "TOKEN_CLAIM_MISSING"),
    "nbf in future": (lambda a: _claims_case(a, nbf=_now() + 600), "TOKEN_NOT_YET_VALID"),
    "iat in future": (
        lambda a: _claims_case(a, iat=_now() + 600, exp=_now() + 900),
        "TOKEN_ISSUED_IN_FUTURE",
    ),
    "lifetime too long": (lambda a: _claims_case(a, exp=_now() + 7200), "TOKEN_LIFETIME_TOO_LONG"),
    "iss prefix": (
        lambda a: _claims_case(a, iss="https://cmdgate.test.evil"),
        "TOKEN_ISSUER_MISMATCH",
    ),
    "iss substring": (
        lambda a: _claims_case(a, iss="https://cmdgate.tes"),
        "TOKEN_ISSUER_MISMATCH",
    ),
    "iss list": (
        lambda a: _resign(
            a,
            json.dumps({"alg": "EdDSA", "kid": KID}),
            json.dumps(good_claims(iss=["https://cmdgate.test"])),
        ),
        "TOKEN_ISSUER_MISMATCH",
    ),
    "aud other": (lambda a: _claims_case(a, aud="other"), "TOKEN_AUDIENCE_MISMATCH"),
    "aud list without ours": (
        lambda a: _claims_case(a, aud=["a", "cmdgate-test2"]),
        "TOKEN_AUDIENCE_MISMATCH",
    ),
    "no sub": (lambda a: _claims_case(a, sub=None), "TOKEN_SUBJECT_MISSING"),
    "unknown kid": (
        lambda a: sign(good_claims(), a.keys.ed25519, {"kid": "nope"}),
        "TOKEN_KID_UNKNOWN",
    ),
    "kid of the other algorithm": (
        lambda a: sign(good_claims(), a.keys.ed25519, {"kid": ES_KID}),
        "TOKEN_ALG_NOT_ALLOWED",
    ),
    "bad signature": (lambda a: _flip_signature(a.token()), "TOKEN_SIGNATURE_INVALID"),
    "alg none": (
        lambda a: (
            f"{_b64(json.dumps({'alg': 'none', 'kid': KID}).encode())}."
            f"{_b64(json.dumps(good_claims()).encode())}."
        ),
        "TOKEN_ALG_NOT_ALLOWED",
    ),
    "duplicate payload key": (
        lambda a: _resign(
            a,
            json.dumps({"alg": "EdDSA", "kid": KID}),
            json.dumps(good_claims())[:-1] + ', "sub": "root"}',
        ),
        "TOKEN_DUPLICATE_KEY",
    ),
    "duplicate header key": (
        lambda a: _resign(
            a, '{"alg": "EdDSA", "kid": "' + KID + '", "kid": "x"}', json.dumps(good_claims())
        ),
        "TOKEN_DUPLICATE_KEY",
    ),
    "crit": (
        lambda a: sign(good_claims(), a.keys.ed25519, {"crit": ["exp"]}),
        "TOKEN_CRIT_UNSUPPORTED",
    ),
}


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_bad_tokens_are_unauthenticated(agent: Agent, case: str) -> None:
    make, reason = TOKEN_CASES[case]
    token = make(agent)
    record = assert_denied(agent, token, NotAuthenticated, reason)
    # nothing from an unverified token is trusted, and the token itself is never written
    assert record["sub"] is None
    assert record["token_sha256"].startswith("sha256:")
    assert token not in agent.audit_path.read_text()


def test_hs256_signed_with_the_public_key_is_refused(agent: Agent) -> None:
    public_pem = agent.keys.ed25519.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # PyJWT refuses to HMAC with a PEM key, so build the forgery by hand (CVE-2022-29217)
    import hashlib
    import hmac

    header = _b64(json.dumps({"alg": "HS256", "kid": KID}).encode())
    payload = _b64(json.dumps(good_claims()).encode())
    mac = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert_denied(
        agent, f"{header}.{payload}.{_b64(mac)}", NotAuthenticated, "TOKEN_ALG_NOT_ALLOWED"
    )


def test_es256_token_is_accepted_with_its_own_key(agent: Agent) -> None:
    token = jwt.encode(
        good_claims(), agent.keys.es256, algorithm="ES256", headers={"kid": ES_KID, "typ": "at+jwt"}
    )
    marker = _new_marker(agent)
    with agent.client(token) as client:
        assert client.run("touch", {"file": str(marker)}).exit_code == 0
    assert marker.exists()


def test_unauthenticated_message_reveals_only_the_category(agent: Agent) -> None:
    token = _claims_case(agent, iss="https://evil")
    with agent.client(token) as client, pytest.raises(NotAuthenticated) as info:
        client.run("touch", {"file": str(_new_marker(agent))})
    assert info.value.message == "authentication failed"


# ---- gate 2: authorisation → PERMISSION_DENIED ----------------------------------------------


@pytest.mark.parametrize(
    "claim",
    ["touch", "touch probe", {"touch": True}, None, 42, ["touch", 1], [["touch"]]],
    ids=["string", "spaced-string", "dict", "null", "number", "mixed-list", "nested-list"],
)
def test_whitelist_claim_must_be_a_list_of_strings(agent: Agent, claim: Any) -> None:
    token = sign({**good_claims(), "cmds": claim}, agent.keys.ed25519)
    assert_denied(agent, token, NotPermitted, "COMMANDS_CLAIM_INVALID")


def test_missing_whitelist_claim_denies(agent: Agent) -> None:
    token = _claims_case(agent, cmds=None)
    assert_denied(agent, token, NotPermitted, "COMMANDS_CLAIM_INVALID")


@pytest.mark.parametrize(
    "name",
    [
        "Touch",
        "TOUCH",
        "ｔｏｕｃｈ",
        "tоuch",
        "touch\u200b",
        "touch ",
        " touch",
        "touc",
        "touch*",
        "t.*",
    ],
)
def test_command_names_match_exactly(agent: Agent, name: str) -> None:
    # the token holds the look-alike; the host only has "touch"
    token = agent.token([name, "probe"])
    assert_denied(agent, token, NotPermitted, "COMMAND_NOT_IN_TOKEN")
    # and the other way round: the token holds "touch", the request names the look-alike
    token = agent.token(["touch"])
    assert_denied(agent, token, NotPermitted, "COMMAND_NOT_IN_TOKEN", command=name)


def test_command_in_token_but_not_on_host(agent: Agent) -> None:
    token = agent.token(["reboot"])
    record = assert_denied(
        agent, token, NotPermitted, "COMMAND_NOT_IN_ALLOWLIST", command="reboot", params={}
    )
    assert record["sub"] == "alice"


def test_permission_denied_does_not_say_which_gate(agent: Agent) -> None:
    with agent.client(agent.token(["reboot"])) as client, pytest.raises(NotPermitted) as host:
        client.run("reboot")
    assert agent.last_audit()["reason"] == "COMMAND_NOT_IN_ALLOWLIST"
    with agent.client(agent.token(["probe"])) as client, pytest.raises(NotPermitted) as token:
        client.run("reboot")
    assert agent.last_audit()["reason"] == "COMMAND_NOT_IN_TOKEN"
    # two different gates refused, in words that do not say which
    assert host.value.message == token.value.message


# ---- gate 3: parameters → INVALID_ARGUMENT ---------------------------------------------------


@pytest.mark.parametrize(
    ("params", "reason", "words"),
    [
        ({"file": "x", "extra": "1"}, "PARAM_UNKNOWN", "extra"),
        ({}, "PARAM_MISSING", "'file'"),
        ({"file": "/etc/passwd"}, "PARAM_INVALID", "must stay under"),
        ({"file": "relative"}, "PARAM_INVALID", "absolute"),
        ({"file": "-rf"}, "PARAM_INVALID", "starts with '-'"),
        ({"file": "/tmp/a\nb"}, "PARAM_INVALID", "control character"),
        ({"file": "/tmp/../etc/passwd"}, "PARAM_INVALID", "normalised"),
    ],
)
def test_invalid_parameters(agent: Agent, params: dict[str, str], reason: str, words: str) -> None:
    marker = _new_marker(agent)
    if params.get("file") == "x":
        params = {**params, "file": str(marker)}
    before = len(agent.audit())
    with agent.client() as client, pytest.raises(InvalidParameters) as info:
        client.run("touch", params)
    assert not marker.exists()
    assert words in info.value.message
    # (most of these values name no marker: that no run started is the proof nothing ran)
    assert agent.only_new_denial(before)["reason"] == reason


def test_path_parameter_cannot_escape_through_a_symlink(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # (a folder of the test's own stands for /etc: a regression must not write the host's)
    outside = tmp_path_factory.mktemp("outside")
    link = agent.marker_dir / "escape"
    link.symlink_to(outside)
    try:
        assert_denied(
            agent, agent.token(), InvalidParameters, "PARAM_INVALID",
            params={"file": str(link / "pwned")},
        )  # fmt: skip
        assert list(outside.iterdir()) == []
    finally:
        link.unlink()


def test_parameters_are_checked_only_after_authorisation(agent: Agent) -> None:
    # an unauthorised caller learns nothing about a template's parameters
    token = agent.token(["probe"])
    assert_denied(agent, token, NotPermitted, "COMMAND_NOT_IN_TOKEN", params={"bogus": "1"})


# ---- the audit log is a gate too ------------------------------------------------------------


def test_unwritable_audit_log_means_nothing_runs(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # /dev/full opens fine and fails every write with ENOSPC: a full disk
    broken = start_test_agent(
        agent.lab, agent.keys, tmp_path_factory.mktemp("full"), audit_path=Path("/dev/full")
    )
    try:
        marker = broken.marker("should-not-exist")
        with broken.client() as client, pytest.raises(ClientError) as info:
            client.run("touch", {"file": str(marker)})
        assert info.value.code == "UNAVAILABLE"
        assert "audit" in info.value.message
        assert not marker.exists()
    finally:
        broken.thread.stop()


def test_every_audit_record_is_one_line_even_with_newlines_in_input(agent: Agent) -> None:
    token = agent.token(['touch\n{"forged": true}'])
    with agent.client(token) as client, pytest.raises(NotPermitted):
        client.run('touch\n{"forged": true}', {"file": "a\nb"})
    lines = agent.audit_path.read_text().splitlines()
    assert all(json.loads(line)["event"] for line in lines)
    assert not any(json.loads(line).get("forged") for line in lines)
    # escaped, not dropped: the record holds the name exactly as it came
    record = agent.last_audit()
    assert (record["reason"], record["command"]) == (
        "COMMAND_NOT_IN_ALLOWLIST",
        'touch\n{"forged": true}',
    )


def test_client_refuses_plaintext_to_a_remote_host() -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        Client("10.0.0.1:7443", token="x.y.z", insecure=True)


def test_an_unauthenticated_flood_cannot_grow_the_audit_much(agent: Agent) -> None:
    before = agent.audit_path.stat().st_size
    # just under the agent's 64 KiB request limit; control characters grow 6x once escaped
    huge = {f"p{i}": "\x01" * 1000 for i in range(40)}
    marker = _new_marker(agent)
    with Client(
        agent.target,
        token="x.y.z",
        ca=agent.lab.ca_cert,
        cert=agent.lab.client_cert,
        key=agent.lab.client_key,
    ) as client:
        for _ in range(5):
            with pytest.raises(NotAuthenticated):
                client.run("c" * 15000, huge)
    grown = agent.audit_path.stat().st_size - before
    # five records of at most 32 parameters of 512 characters each (escaped), plus the rest
    assert grown < 5 * 32 * (6 * 512 + 100) + 5 * 4096
    record = agent.last_audit()
    assert record["reason"] == "TOKEN_MALFORMED"
    assert len(record["command"]) < 200 and record["params"]["..."] == "(+8 more parameters)"
    assert not marker.exists()


def test_revoked_tokens_are_refused_as_soon_as_the_file_says_so(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("revocation")
    revoked = folder / "revoked.txt"
    revoked.write_text("# nothing yet\n")
    guarded = start_test_agent(
        agent.lab,
        agent.keys,
        folder / "agent",
        auth_extra=f"revoked_file = {json.dumps(str(revoked))}",
    )
    try:
        token = guarded.token(extra_claims={"jti": "leaked-1"})
        other = guarded.token(subject="bob")
        with guarded.client(token) as client:
            assert client.run("touch", {"file": str(guarded.marker("before"))}).exit_code == 0
            # revoked while the agent runs, with no reload: the very next call is refused
            revoked.write_text("jti:leaked-1\n")
            record = assert_denied(guarded, token, NotAuthenticated, "TOKEN_REVOKED")
            assert record["jti"] == "leaked-1" and record["sub"] == "alice"
        with guarded.client(other) as client:
            assert client.run("touch", {"file": str(guarded.marker("bob"))}).exit_code == 0
        revoked.write_text("sub:bob\n")
        assert_denied(guarded, other, NotAuthenticated, "TOKEN_REVOKED")
        # a revocation list that cannot be read refuses everyone: fail closed
        revoked.unlink()
        assert_denied(guarded, token, NotAuthenticated, "REVOCATION_UNAVAILABLE")
    finally:
        guarded.thread.stop()


def test_a_bound_token_is_useless_without_its_certificate_rfc8705(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from cmdgate.agent.lab import write_lab
    from cmdgate.shared.keys import certificate_thumbprint
    from tests.support import AgentThread, agent_toml

    folder = tmp_path_factory.mktemp("cnf")
    other = write_lab(folder / "other-lab")  # a second client certificate, from another CA
    both = folder / "both-cas.pem"
    both.write_bytes(agent.lab.ca_cert.read_bytes() + other.ca_cert.read_bytes())
    markers = folder / "markers"
    markers.mkdir()
    text = agent_toml(
        agent.lab, agent.keys, markers, folder / "audit.jsonl", auth_extra="require_cnf = true"
    )
    config = folder / "agent.toml"
    config.write_text(text.replace(json.dumps(str(agent.lab.ca_cert)), json.dumps(str(both))))
    thread = AgentThread(config)
    bound = Agent(thread, thread.target, folder / "audit.jsonl", markers, agent.lab, agent.keys)
    try:
        thumbprint = certificate_thumbprint(agent.lab.client_cert.read_bytes())
        token = bound.token(extra_claims={"cnf": {"x5t#S256": thumbprint}})
        with bound.client(token) as client:
            assert client.run("touch", {"file": str(bound.marker("bound"))}).exit_code == 0
        # the same token, stolen, presented with another (valid) client certificate
        marker = bound.marker("stolen")
        with (
            Client(
                bound.target,
                token=token,
                ca=agent.lab.ca_cert,
                cert=other.client_cert,
                key=other.client_key,
            ) as thief,
            pytest.raises(NotAuthenticated),
        ):
            thief.run("touch", {"file": str(marker)})
        assert not marker.exists()
        assert bound.last_audit()["reason"] == "CNF_MISMATCH"
        # require_cnf: an unbound token is refused; an unknown cnf method too
        assert_denied(bound, bound.token(), NotAuthenticated, "TOKEN_NOT_BOUND")
        odd = bound.token(extra_claims={"cnf": {"jkt": "abc"}})
        assert_denied(bound, odd, NotAuthenticated, "CNF_UNSUPPORTED")
    finally:
        thread.stop()


def test_require_cnf_without_mutual_tls_is_a_config_error(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from cmdgate.agent.config import load_config
    from cmdgate.agent.errors import ConfigError
    from tests.support import agent_toml

    folder = tmp_path_factory.mktemp("cnf-config")
    text = agent_toml(
        agent.lab, agent.keys, folder, folder / "audit.jsonl", auth_extra="require_cnf = true"
    )
    config = folder / "agent.toml"
    config.write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith("client_ca"))
    )
    with pytest.raises(ConfigError, match=r"auth\.require_cnf: needs server\.client_ca"):
        load_config(config)


def test_a_single_use_token_sent_many_times_at_once_runs_once(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The replay guard is loaded by the first call that needs it: calls arriving meanwhile
    must share it, or each would let the same jti through once."""
    from concurrent.futures import ThreadPoolExecutor

    guarded = start_test_agent(
        agent.lab,
        agent.keys,
        tmp_path_factory.mktemp("replay-race") / "agent",
        auth_extra='replay = "reject"',
    )
    token = guarded.token()
    markers = [guarded.marker(f"race-{i}") for i in range(8)]

    def attempt(marker: Path) -> str:
        with guarded.client(token) as client:
            try:
                return str(client.run("touch", {"file": str(marker)}).exit_code)
            except NotAuthenticated:
                return "refused"

    try:
        with ThreadPoolExecutor(len(markers)) as pool:
            outcomes = list(pool.map(attempt, markers))
        assert sorted(outcomes) == ["0"] + ["refused"] * (len(markers) - 1)
        assert sum(m.exists() for m in markers) == 1
        denied = [r for r in guarded.audit() if r["event"] == "run.denied"]
        assert [r["reason"] for r in denied] == ["TOKEN_REPLAYED"] * (len(markers) - 1)
        assert [r["event"] for r in guarded.audit()].count("run.started") == 1
    finally:
        guarded.thread.stop()


def test_single_use_tokens_are_refused_the_second_time_even_after_a_restart(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.support import AgentThread

    folder = tmp_path_factory.mktemp("replay")
    guarded = start_test_agent(
        agent.lab, agent.keys, folder / "agent", auth_extra='replay = "reject"'
    )
    token = guarded.token()
    try:
        with guarded.client(token) as client:
            assert client.run("touch", {"file": str(guarded.marker("first"))}).exit_code == 0
        record = assert_denied(guarded, token, NotAuthenticated, "TOKEN_REPLAYED")
        assert record["sub"] == "alice"
        # a fresh token still works
        with guarded.client(guarded.token()) as client:
            assert client.run("touch", {"file": str(guarded.marker("fresh"))}).exit_code == 0
    finally:
        guarded.thread.stop()
    # the agent restarts: what it saw is still seen
    thread = AgentThread(guarded.thread.config.source)
    restarted = Agent(
        thread, thread.target, guarded.audit_path, guarded.marker_dir, agent.lab, agent.keys
    )
    try:
        assert_denied(restarted, token, NotAuthenticated, "TOKEN_REPLAYED")
    finally:
        thread.stop()
