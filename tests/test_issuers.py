"""Several trusted issuers: humans from one provider, bots from another, each with its own
keys, audience and claim name; a key of one never vouches for the other."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cmdgate.agent.config import load_config
from cmdgate.agent.errors import ConfigError
from cmdgate.agent.lab import LabPaths
from cmdgate.client import NotAuthenticated, NotPermitted
from cmdgate.shared.keys import SigningKey, keygen, load_private_key, mint_token
from tests.support import AUDIENCE, ISSUER, KID, Agent, AgentThread, Keys, agent_toml

BOTS = "https://bots.example"


def two_issuers(keys: Keys, bots_jwks: Path) -> str:
    return f"""
leeway_seconds = 30
max_token_lifetime_seconds = 3600

[[auth.issuers]]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = {json.dumps(str(keys.jwks))}
algorithms = ["EdDSA", "ES256"]
commands_claim = "cmds"

[[auth.issuers]]
issuer = "{BOTS}"
audience = "robots"
jwks_file = {json.dumps(str(bots_jwks))}
algorithms = ["EdDSA"]
commands_claim = "robot_cmds"
"""


def config_text(lab: LabPaths, keys: Keys, root: Path, auth: str) -> str:
    """The test agent's config with its [auth] table replaced by ``auth``."""
    text = agent_toml(lab, keys, root / "markers", root / "audit.jsonl")
    head, _, rest = text.partition("[auth]\n")
    _, _, tail = rest.partition("\n[audit]\n")
    return f"{head}[auth]\n{auth}\n[audit]\n{tail}"


@pytest.fixture(scope="module")
def bots_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Path]:
    folder = tmp_path_factory.mktemp("bots")
    key_path, jwks, _ = keygen(folder, "EdDSA", "bot-1")
    return load_private_key(key_path), jwks


@pytest.fixture(scope="module")
def agent2(
    lab: LabPaths,
    keys: Keys,
    bots_key: tuple[SigningKey, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Agent]:
    root = tmp_path_factory.mktemp("issuers")
    (root / "markers").mkdir()
    config = root / "agent.toml"
    config.write_text(config_text(lab, keys, root, two_issuers(keys, bots_key[1])))
    thread = AgentThread(config)
    yield Agent(thread, thread.target, root / "audit.jsonl", root / "markers", lab, keys)
    thread.stop()


def bot_token(
    key: SigningKey,
    claim: str = "robot_cmds",
    issuer: str = BOTS,
    kid: str = "bot-1",
    audience: str = "robots",
) -> str:
    return mint_token(
        key,
        kid=kid,
        issuer=issuer,
        audience=audience,
        subject="ci-bot",
        commands=["touch"],
        ttl_seconds=300,
        commands_claim=claim,
    )


def test_each_issuer_with_its_own_keys_audience_and_claim(
    agent2: Agent, bots_key: tuple[SigningKey, Path]
) -> None:
    with agent2.client(agent2.token(["touch"])) as client:
        assert client.run("touch", {"file": str(agent2.marker("human"))}).exit_code == 0
    with agent2.client(bot_token(bots_key[0])) as client:
        assert client.run("touch", {"file": str(agent2.marker("bot"))}).exit_code == 0
    assert agent2.last_audit("run.finished")["iss"] == BOTS


def test_the_claim_name_is_the_issuers_own(
    agent2: Agent, bots_key: tuple[SigningKey, Path]
) -> None:
    marker = agent2.marker("wrong-claim")
    with agent2.client(bot_token(bots_key[0], claim="cmds")) as client, pytest.raises(NotPermitted):
        client.run("touch", {"file": str(marker)})
    assert not marker.exists()
    assert agent2.last_audit()["reason"] == "COMMANDS_CLAIM_INVALID"


@pytest.mark.parametrize(
    ("issuer", "kid", "audience", "reason"),
    [
        # the bots' key cannot vouch for a human: keys are per issuer
        (ISSUER, "bot-1", AUDIENCE, "TOKEN_KID_UNKNOWN"),
        # nor can a human's audience pass for the bots' one
        (BOTS, "bot-1", AUDIENCE, "TOKEN_AUDIENCE_MISMATCH"),
        # an issuer nobody trusts, and look-alikes of trusted ones
        ("https://evil.example", "bot-1", "robots", "TOKEN_ISSUER_MISMATCH"),
        (BOTS + "/", "bot-1", "robots", "TOKEN_ISSUER_MISMATCH"),
        (BOTS.upper(), "bot-1", "robots", "TOKEN_ISSUER_MISMATCH"),
    ],
)
def test_keys_audiences_and_issuers_do_not_cross(
    agent2: Agent,
    bots_key: tuple[SigningKey, Path],
    issuer: str,
    kid: str,
    audience: str,
    reason: str,
) -> None:
    token = bot_token(bots_key[0], issuer=issuer, kid=kid, audience=audience)
    marker = agent2.marker(f"crossed-{reason}")
    with agent2.client(token) as client, pytest.raises(NotAuthenticated):
        client.run("touch", {"file": str(marker)})
    assert not marker.exists()
    assert agent2.last_audit()["reason"] == reason


def test_the_human_key_cannot_sign_for_the_bots(agent2: Agent) -> None:
    token = mint_token(
        agent2.keys.ed25519,
        kid=KID,
        issuer=BOTS,
        audience="robots",
        subject="mallory",
        commands=["touch"],
        ttl_seconds=300,
        commands_claim="robot_cmds",
    )
    with agent2.client(token) as client, pytest.raises(NotAuthenticated):
        client.run("touch", {"file": str(agent2.marker("forged-bot"))})
    assert agent2.last_audit()["reason"] == "TOKEN_KID_UNKNOWN"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda t: t.replace(f'issuer = "{BOTS}"', f'issuer = "{ISSUER}"'), "listed twice"),
        (
            lambda t: t.replace(
                'commands_claim = "robot_cmds"', 'commands_claim = "robot_cmds"\nleeway_seconds = 5'
            ),
            "is agent-wide",
        ),
        (lambda t: f'issuer = "{ISSUER}"\n' + t, "goes in each [[auth.issuers]] entry"),
    ],
    ids=["duplicate", "agent-wide-in-entry", "issuer-outside"],
)
def test_issuer_lists_are_checked_at_load(
    lab: LabPaths,
    keys: Keys,
    tmp_path: Path,
    bots_key: tuple[SigningKey, Path],
    change: Callable[[str], str],
    words: str,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(config_text(lab, keys, tmp_path, change(two_issuers(keys, bots_key[1]))))
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(config)


def test_check_config_names_every_issuer(agent2: Agent) -> None:
    agent_cli = Path(sys.executable).with_name("cmdgate-agent")
    done = subprocess.run(
        [str(agent_cli), "check-config", "--config", str(agent2.thread.config.source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    issuers = [row[1] for row in rows if row[:1] == ["issuer"]]
    audiences = [row[1] for row in rows if row[:1] == ["audience"]]
    assert (issuers, audiences) == ([ISSUER, BOTS], [AUDIENCE, "robots"])
    assert "bot-1 (EdDSA)" in done.stdout
