"""Helpers for the tests: a real agent in a thread, tokens, configs, process checks."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from cmdgate.agent.config import load_config
from cmdgate.agent.lab import LabPaths
from cmdgate.agent.server import RunningAgent, start_agent
from cmdgate.client import Client
from cmdgate.shared.keys import SigningKey, mint_token

FIXTURES = Path(__file__).parent / "fixtures"
PROBE = FIXTURES / "probe.py"
ISSUER = "https://cmdgate.test"
AUDIENCE = "cmdgate-test"
KID = "test-ed"
ES_KID = "test-es"


@dataclass(frozen=True)
class Keys:
    """The test issuer's keys; ``jwks`` publishes both."""

    ed25519: SigningKey
    es256: SigningKey
    jwks: Path


def probe_template(
    name: str,
    mode_values: Sequence[str],
    marker_dir: Path,
    *,
    arg_pattern: str = "[A-Za-z0-9 ._/;$()&|<>'`*-]{0,200}",
    timeout: float = 30,
    max_output: int = 16 * 1024 * 1024,
    extra_env: str = "",
) -> str:
    modes = ", ".join(json.dumps(m) for m in mode_values)
    return f"""
[commands.{name}]
description = "test probe ({name})"
argv = [{json.dumps(sys.executable)}, {json.dumps(str(PROBE))}, "{{mode}}", "{{arg}}"]
cwd = {json.dumps(str(marker_dir))}
timeout_seconds = {timeout}
max_output_bytes = {max_output}
[commands.{name}.env]
PROBE_MARKER_DIR = {json.dumps(str(marker_dir))}
{extra_env}
[commands.{name}.params.mode]
type = "enum"
values = [{modes}]
[commands.{name}.params.arg]
type = "string"
pattern = {json.dumps(arg_pattern)}
default = ""
allow_leading_dash = true
"""


def agent_toml(
    lab: LabPaths,
    keys: Keys,
    marker_dir: Path,
    audit_path: Path,
    extra: str = "",
    audit_extra: str = "",
    server_extra: str = "",
    auth_extra: str = "",
) -> str:
    """A config with mTLS from the lab, the test issuer, and templates writing into marker_dir."""
    return f"""
[server]
listen = "127.0.0.1:0"
{server_extra}
tls_cert = {json.dumps(str(lab.server_cert))}
tls_key = {json.dumps(str(lab.server_key))}
client_ca = {json.dumps(str(lab.ca_cert))}

[auth]
issuer = {json.dumps(ISSUER)}
audience = {json.dumps(AUDIENCE)}
jwks_file = {json.dumps(str(keys.jwks))}
algorithms = ["EdDSA", "ES256"]
commands_claim = "cmds"
leeway_seconds = 30
max_token_lifetime_seconds = 3600
{auth_extra}

[audit]
path = {json.dumps(str(audit_path))}
{audit_extra}

[commands.hostile]
description = "remote text \\u001b]52;c;aGk=\\u0007\\u001b[2J end"
argv = ["/bin/true"]

[commands.touch]
description = "create a marker file"
argv = ["/usr/bin/touch", "--", "{{file}}"]
[commands.touch.params.file]
type = "path"
under = [{json.dumps(str(marker_dir))}]

{
        probe_template(
            "probe",
            [
                "argv",
                "env",
                "fds",
                "exit",
                "kill",
                "binary",
                "stderr",
                "sleep",
                "slow",
                "flood",
                "tree",
                "hide",
            ],
            marker_dir,
            extra_env='FIXED = "from-template"',
        )
    }
{probe_template("tiny-output", ["flood", "binary"], marker_dir, max_output=1000)}
{probe_template("short", ["sleep"], marker_dir, timeout=1)}
{extra}
"""


class AgentThread:
    """A real agent serving from its own event loop thread, as ``cmdgate-agent serve`` does."""

    def __init__(self, config_path: Path) -> None:
        self.config = load_config(config_path)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agent", daemon=True)
        self.thread.start()
        self.running: RunningAgent = asyncio.run_coroutine_threadsafe(
            start_agent(self.config), self.loop
        ).result(timeout=30)
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(1.0), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Agent:
    """What a test needs of a running agent."""

    thread: AgentThread
    target: str
    audit_path: Path
    marker_dir: Path
    lab: LabPaths
    keys: Keys

    def audit(self) -> list[dict[str, Any]]:
        with open(self.audit_path, encoding="ascii") as f:
            return [json.loads(line) for line in f]

    def last_audit(self, event: str | None = None) -> dict[str, Any]:
        records = [
            r
            for r in self.audit()
            if r["event"] == event or (event is None and r["event"] != "checkpoint")
        ]
        assert records, f"no audit record for {event}"
        return records[-1]

    def token(
        self, cmds: Sequence[str] = ("touch", "probe", "tiny-output", "short"), **kwargs: Any
    ) -> str:
        return mint_token(
            self.keys.ed25519,
            kid=KID,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject=kwargs.pop("subject", "alice"),
            commands=cmds,
            ttl_seconds=kwargs.pop("ttl_seconds", 300),
            **kwargs,
        )

    def client(self, token: str | None = None, **kwargs: Any) -> Client:
        return Client(
            self.target,
            token=token or self.token(),
            ca=self.lab.ca_cert,
            cert=self.lab.client_cert,
            key=self.lab.client_key,
            **kwargs,
        )

    def marker(self, name: str = "marker") -> Path:
        return self.marker_dir / name

    def only_new_denial(self, before: int) -> dict[str, Any]:
        """The one record written since the log held ``before`` records (checkpoints aside):
        a ``run.denied``, with no ``run.started`` beside it; not an older record that
        happens to carry the same reason."""
        new = [r for r in self.audit()[before:] if r["event"] != "checkpoint"]
        assert [r["event"] for r in new] == ["run.denied"], new
        assert new[0]["decision"] == "denied", new
        return new[0]


def start_test_agent(
    lab: LabPaths,
    keys: Keys,
    root: Path,
    extra: str = "",
    audit_path: Path | None = None,
    audit_extra: str = "",
    server_extra: str = "",
    auth_extra: str = "",
) -> Agent:
    marker_dir = root / "markers"
    marker_dir.mkdir(parents=True)
    audit = audit_path or root / "audit.jsonl"
    config = root / "agent.toml"
    config.write_text(
        agent_toml(lab, keys, marker_dir, audit, extra, audit_extra, server_extra, auth_extra)
    )
    thread = AgentThread(config)
    return Agent(thread, thread.target, audit, marker_dir, lab, keys)


def sign(
    claims: dict[str, Any],
    key: SigningKey,
    headers: dict[str, Any] | None = None,
    algorithm: str = "EdDSA",
) -> str:
    """A token with exactly these claims, for tests that need odd ones."""
    return jwt.encode(
        claims, key, algorithm=algorithm, headers={"kid": KID, "typ": "at+jwt", **(headers or {})}
    )


def good_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "mallory",
        "iat": now,
        "exp": now + 300,
        "jti": "j1",
        "cmds": ["touch", "probe"],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        # gone before the open, or between the open and the read
        return False
