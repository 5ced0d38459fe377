"""Fixtures with real parts: a lab PKI, real keys, and a real agent on 127.0.0.1:0 with mTLS."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cmdgate.agent.lab import LabPaths, write_lab
from cmdgate.shared.keys import keygen, load_private_key
from tests.support import ES_KID, KID, Agent, Keys, start_test_agent


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> LabPaths:
    """A CA with server and client certificates, as ``cmdgate-agent init`` writes them."""
    return write_lab(tmp_path_factory.mktemp("lab") / "lab")


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """The test issuer's EdDSA and ES256 keys, both published in one JWKS file."""
    folder = tmp_path_factory.mktemp("keys")
    ed_path, jwks, _ = keygen(folder, "EdDSA", KID)
    es_path, _, _ = keygen(folder, "ES256", ES_KID)
    return Keys(load_private_key(ed_path), load_private_key(es_path), jwks)


@pytest.fixture(scope="module")
def agent(lab: LabPaths, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """A real agent serving the test templates, shared by the tests of one module."""
    running = start_test_agent(lab, keys, tmp_path_factory.mktemp("agent"))
    yield running
    running.thread.stop()


@pytest.fixture
def env_without_cmdgate() -> dict[str, str]:
    """The test process's environment without any CMDGATE_* variable, for CLI subprocesses."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CMDGATE_")}
