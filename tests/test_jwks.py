"""Keys from an identity provider: a JWKS URL or OIDC discovery, rotation, and no fetch storms.

The provider is a real HTTP server on loopback serving a JWKS that the test changes.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cmdgate.agent.config import load_config
from cmdgate.agent.errors import ConfigError
from cmdgate.agent.lab import LabPaths
from cmdgate.client import NotAuthenticated
from cmdgate.shared.keys import SigningKey, generate_signing_key, mint_token, public_jwk
from tests.support import AUDIENCE, KID, Agent, AgentThread, Keys, agent_toml


class Provider:
    """A JWKS (and OIDC discovery document) served over HTTP on loopback."""

    def __init__(self) -> None:
        self.keys: dict[str, SigningKey] = {}
        self.requests: list[str] = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.requests.append(self.path)
                if self.path == "/jwks":
                    body: Any = {"keys": [public_jwk(k, kid) for kid, k in provider.keys.items()]}
                elif self.path == "/.well-known/openid-configuration":
                    body = {"issuer": provider.issuer, "jwks_uri": provider.issuer + "/jwks"}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_key(self, kid: str) -> SigningKey:
        self.keys[kid] = generate_signing_key("EdDSA")
        return self.keys[kid]

    def token(self, kid: str, key: SigningKey | None = None) -> str:
        return mint_token(
            key or self.keys[kid],
            kid=kid,
            issuer=self.issuer,
            audience=AUDIENCE,
            subject="carol",
            commands=["touch"],
            ttl_seconds=300,
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def provider() -> Iterator[Provider]:
    running = Provider()
    yield running
    running.close()


def start(lab: LabPaths, keys: Keys, root: Path, provider: Provider, auth: str) -> Agent:
    """An agent whose [auth] takes its keys from the provider instead of a file."""
    markers = root / "markers"
    markers.mkdir(parents=True)
    text = agent_toml(lab, keys, markers, root / "audit.jsonl")
    lines = [line for line in text.splitlines() if not line.startswith(("jwks_file", "issuer"))]
    at = lines.index("[auth]") + 1
    lines[at:at] = [f'issuer = "{provider.issuer}"', *auth.splitlines()]
    config = root / "agent.toml"
    config.write_text("\n".join(lines) + "\n")
    thread = AgentThread(config)
    return Agent(thread, thread.target, root / "audit.jsonl", markers, lab, keys)


def test_rotation_at_the_provider_and_no_fetch_storm(
    lab: LabPaths, keys: Keys, tmp_path: Path, provider: Provider
) -> None:
    k1 = provider.add_key("k1")
    agent = start(
        lab,
        keys,
        tmp_path,
        provider,
        f'jwks_url = "{provider.issuer}/jwks"\njwks_ttl_seconds = 1\njwks_min_refresh_seconds = 30',
    )
    try:
        with agent.client(provider.token("k1")) as client:
            assert client.run("touch", {"file": str(agent.marker("k1"))}).exit_code == 0
        # a key rotated in at the provider is accepted on first use: an unknown kid fetches
        provider.add_key("k2")
        with agent.client(provider.token("k2")) as client:
            assert client.run("touch", {"file": str(agent.marker("k2"))}).exit_code == 0
        # random kids cannot make the agent fetch per request
        fetched = len(provider.requests)
        for _ in range(20):
            forged = provider.token(secrets.token_hex(4), key=generate_signing_key("EdDSA"))
            with agent.client(forged) as client, pytest.raises(NotAuthenticated):
                client.run("touch", {"file": str(agent.marker("forged"))})
        assert len(provider.requests) - fetched <= 2  # the TTL refresh may fall in between
        assert not agent.marker("forged").exists()
        assert agent.last_audit()["reason"] == "TOKEN_KID_UNKNOWN"
        # a key removed at the provider stops being accepted within the TTL
        del provider.keys["k1"]
        time.sleep(2.5)
        with agent.client(provider.token("k1", k1)) as client, pytest.raises(NotAuthenticated):
            client.run("touch", {"file": str(agent.marker("removed"))})
        assert not agent.marker("removed").exists()
        assert agent.last_audit()["reason"] == "TOKEN_KID_UNKNOWN"
    finally:
        agent.thread.stop()


def test_a_removed_key_is_refused_even_for_a_cached_token(
    lab: LabPaths, keys: Keys, tmp_path: Path, provider: Provider
) -> None:
    key = provider.add_key("old")
    agent = start(
        lab, keys, tmp_path, provider, f'jwks_url = "{provider.issuer}/jwks"\njwks_ttl_seconds = 1'
    )
    try:
        token = provider.token("old", key)
        with agent.client(token) as client:
            assert client.run("touch", {"file": str(agent.marker("once"))}).exit_code == 0
            provider.keys.clear()
            provider.add_key("new")
            time.sleep(2.5)  # the background refresh has a key set without "old"
            with pytest.raises(NotAuthenticated):
                client.run("touch", {"file": str(agent.marker("again"))})
        assert not agent.marker("again").exists()
        assert agent.last_audit()["reason"] == "TOKEN_KID_UNKNOWN"
    finally:
        agent.thread.stop()


def test_oidc_discovery_finds_the_keys(
    lab: LabPaths, keys: Keys, tmp_path: Path, provider: Provider
) -> None:
    provider.add_key("d1")
    agent = start(lab, keys, tmp_path, provider, "discovery = true")
    try:
        with agent.client(provider.token("d1")) as client:
            assert client.run("touch", {"file": str(agent.marker("d1"))}).exit_code == 0
        assert "/.well-known/openid-configuration" in provider.requests
    finally:
        agent.thread.stop()


def test_a_provider_that_cannot_be_reached_refuses_every_token(
    lab: LabPaths, keys: Keys, tmp_path: Path, provider: Provider
) -> None:
    key = provider.add_key("k")
    token = provider.token("k", key)
    provider.close()
    agent = start(lab, keys, tmp_path, provider, f'jwks_url = "{provider.issuer}/jwks"')
    try:
        with agent.client(token) as client, pytest.raises(NotAuthenticated):
            client.run("touch", {"file": str(agent.marker("x"))})
        assert not agent.marker("x").exists()
        assert agent.last_audit()["reason"] == "TOKEN_KID_UNKNOWN"
    finally:
        agent.thread.stop()


@pytest.mark.parametrize(
    ("auth", "words"),
    [
        ('jwks_url = "http://example.org/jwks"', "https only"),
        ('jwks_url = "https://idp.example/jwks"\ndiscovery = true', "exactly one of"),
        ('jwks_file = "x.json"\njwks_url = "https://idp.example/jwks"', "exactly one of"),
    ],
)
def test_key_sources_are_checked_at_load(
    lab: LabPaths, keys: Keys, tmp_path: Path, auth: str, words: str
) -> None:
    text = agent_toml(lab, keys, tmp_path, tmp_path / "audit.jsonl")
    lines = [line for line in text.splitlines() if not line.startswith("jwks_file")]
    at = lines.index("[auth]") + 1
    lines[at:at] = auth.splitlines()
    config = tmp_path / "agent.toml"
    config.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=words):
        load_config(config)


def test_the_file_key_set_still_works(agent: Agent) -> None:
    # the default source: keys from jwks_file, here KID
    with agent.client() as client:
        assert client.run("touch", {"file": str(agent.marker("file-keys"))}).exit_code == 0
    assert KID in agent.thread.config.auth.keys


def test_a_redirect_to_plain_http_is_not_followed() -> None:
    """https only holds for where a redirect leads too: a plain-http hop would let anyone
    on the path supply the verification keys."""
    from cmdgate.agent.jwks import _fetch_json

    class Redirects(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/keys":
                data = b'{"keys": []}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_response(302)
            # /away: a host that is not loopback, over http; /near: this same loopback server
            where = "http://keys.example/keys" if self.path == "/away" else "/keys"
            self.send_header("Location", where)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ValueError, match=re.escape("redirected to http://keys.example/")):
            _fetch_json(base + "/away")
        assert _fetch_json(base + "/near") == {"keys": []}
    finally:
        server.shutdown()
        server.server_close()


def test_a_reload_keeps_the_keys_of_an_unchanged_provider(
    lab: LabPaths, keys: Keys, tmp_path: Path, provider: Provider
) -> None:
    """A reload (logrotate sends one daily) while the provider cannot be reached must not
    refuse its tokens: the issuer's settings did not change, so neither do its keys."""
    key = provider.add_key("k")
    agent = start(lab, keys, tmp_path, provider, f'jwks_url = "{provider.issuer}/jwks"')
    try:
        with agent.client(provider.token("k", key)) as client:
            assert client.run("touch", {"file": str(agent.marker("before"))}).exit_code == 0
        provider.close()
        running = agent.thread.running
        reloaded = asyncio.run_coroutine_threadsafe(
            running.reload(agent.thread.config.source), agent.thread.loop
        ).result(timeout=30)
        assert reloaded is True
        with agent.client(provider.token("k", key)) as client:
            assert client.run("touch", {"file": str(agent.marker("after"))}).exit_code == 0
        assert agent.marker("after").exists()
    finally:
        agent.thread.stop()
