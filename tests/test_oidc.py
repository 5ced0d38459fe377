"""Interop with a real OpenID provider: the npm package ``oidc-provider`` on loopback.

``tests/fixtures/oidc/provider.mjs`` runs it with the client-credentials grant and resource
indicators, so that ``resource=urn:cmdgate`` yields an RFC 9068 JWT access token (``typ: at+jwt``,
ES256) carrying the whitelist claim ``cmds`` from the provider's ``extraTokenClaims``. The agent
finds the provider's keys through OIDC discovery (``[auth] discovery = true``).

Needs ``node`` and ``npm install`` in ``tests/fixtures/oidc`` (``make install`` runs it);
without them these tests are skipped.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import select
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cmdgate.agent.lab import LabPaths
from cmdgate.client import NotAuthenticated
from tests.support import AUDIENCE, FIXTURES, Agent, AgentThread, Keys, agent_toml

OIDC_DIR = FIXTURES / "oidc"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (needed for oidc-provider)"),
    pytest.mark.skipif(
        not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir(),
        reason="oidc-provider is not installed: run "
        "`cd tests/fixtures/oidc && npm ci --no-audit --no-fund` (make install does)",
    ),
]


def private_jwk(kid: str) -> dict[str, Any]:
    """A fresh EC P-256 private key as a JWK, for the provider to sign with."""
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True)
    jwk.update(kid=kid, alg="ES256", use="sig")
    return jwk


class OidcProvider:
    """``node provider.mjs`` as a child process; the first key of ``keys`` signs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.issuer = ""
        self.client_id = ""
        self.client_secret = ""
        self.starts = 0
        self.keys: list[dict[str, Any]] = []

    def start(self, keys: list[dict[str, Any]], port: int = 0) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        self.keys = keys
        keys_file = self.root / f"oidc-keys-{self.starts}.json"
        keys_file.write_text(json.dumps({"keys": keys}))
        keys_file.chmod(0o600)
        stderr = open(self.root / f"oidc-stderr-{self.starts}.txt", "wb")  # noqa: SIM115
        assert NODE is not None
        with stderr:
            self.process = subprocess.Popen(
                [NODE, "provider.mjs", str(port), str(keys_file), AUDIENCE],
                cwd=OIDC_DIR,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        ready = self._ready_line(timeout=15)
        self.port = ready["port"]
        self.issuer = ready["issuer"]
        self.client_id = ready["client_id"]
        self.client_secret = ready["client_secret"]
        assert self.issuer == f"http://127.0.0.1:{self.port}"

    def _ready_line(self, timeout: float) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.process.stdout], [], [], max(left, 0))
            if not readable:
                self.stop()
                pytest.fail(f"oidc-provider did not start within {timeout} s: {self.stderr()}")
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                self.stop()
                pytest.fail(f"oidc-provider exited before it was ready: {self.stderr()}")
            line += chunk
        ready: dict[str, Any] = json.loads(line)
        assert ready["ready"] is True
        return ready

    def stderr(self) -> str:
        return (self.root / f"oidc-stderr-{self.starts}.txt").read_text(errors="replace")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def _http(
        self, method: str, path: str, body: str | None = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """One request to the provider, over plain HTTP on loopback (as its issuer says)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        assert response.status == 200, f"{method} {path}: {response.status} {data!r}"
        answer: dict[str, Any] = json.loads(data)
        return answer

    def discovery(self) -> dict[str, Any]:
        return self._http("GET", "/.well-known/openid-configuration")

    def token(self, resource: str) -> str:
        """An access token from the token endpoint: client credentials, one resource indicator."""
        endpoint = urllib.parse.urlsplit(self.discovery()["token_endpoint"])
        assert f"{endpoint.scheme}://{endpoint.netloc}" == self.issuer
        basic = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        answer = self._http(
            "POST",
            endpoint.path,
            body=urllib.parse.urlencode({"grant_type": "client_credentials", "resource": resource}),
            headers={
                "Authorization": f"Basic {basic}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        assert answer["token_type"] == "Bearer"
        token: str = answer["access_token"]
        return token


@pytest.fixture
def oidc(tmp_path: Path) -> Iterator[OidcProvider]:
    provider = OidcProvider(tmp_path)
    provider.start([private_jwk("idp-1")])
    yield provider
    provider.stop()


@pytest.fixture
def agent(lab: LabPaths, keys: Keys, tmp_path: Path, oidc: OidcProvider) -> Iterator[Agent]:
    """A real agent whose [auth] finds the provider's keys through OIDC discovery."""
    markers = tmp_path / "markers"
    markers.mkdir()
    audit = tmp_path / "audit.jsonl"
    text = agent_toml(lab, keys, markers, audit)
    lines = [line for line in text.splitlines() if not line.startswith(("jwks_file", "issuer"))]
    at = lines.index("[auth]") + 1
    lines[at:at] = [f'issuer = "{oidc.issuer}"', "discovery = true"]
    config = tmp_path / "agent.toml"
    config.write_text("\n".join(lines) + "\n")
    thread = AgentThread(config)
    running = Agent(thread, thread.target, audit, markers, lab, keys)
    yield running
    thread.stop()


def test_a_provider_token_runs_an_allowed_command(agent: Agent, oidc: OidcProvider) -> None:
    with agent.client(oidc.token("urn:cmdgate")) as client:
        assert client.run("touch", {"file": str(agent.marker("idp"))}).exit_code == 0
    assert agent.marker("idp").exists()
    record = agent.last_audit()
    assert (record["decision"], record["iss"], record["sub"]) == (
        "allowed",
        oidc.issuer,
        oidc.client_id,
    )


def test_a_token_for_another_resource_is_refused(agent: Agent, oidc: OidcProvider) -> None:
    token = oidc.token("urn:other")
    with agent.client(token) as client, pytest.raises(NotAuthenticated):
        client.run("touch", {"file": str(agent.marker("other"))})
    assert not agent.marker("other").exists()
    assert agent.last_audit()["reason"] == "TOKEN_AUDIENCE_MISMATCH"


def test_a_key_rotated_at_the_provider_is_picked_up(agent: Agent, oidc: OidcProvider) -> None:
    old = oidc.token("urn:cmdgate")
    with agent.client(old) as client:
        assert client.run("touch", {"file": str(agent.marker("before"))}).exit_code == 0
    # the provider restarts on the same port, signing with a new key; the old one is still
    # published (the usual overlap), and the agent fetches the unknown kid at once
    port = oidc.port
    oidc.stop()
    new_kid = "idp-" + secrets.token_hex(4)
    oidc.start([private_jwk(new_kid), *oidc.keys], port=port)
    assert oidc.port == port
    token = oidc.token("urn:cmdgate")
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"] == new_kid
    with agent.client(token) as client:
        assert client.run("touch", {"file": str(agent.marker("after"))}).exit_code == 0
    assert agent.marker("after").exists()
