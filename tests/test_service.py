"""Operating the agent: reload, limits, run-as users, fork bombs and long silent commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pwd
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cmdgate.agent.errors import ConfigError
from cmdgate.agent.lab import LabPaths
from cmdgate.client import Exited, Output, Started
from cmdgate.client.api import ClientError
from tests.support import PROBE, Agent, Keys, start_test_agent

NOBODY = pwd.getpwnam("nobody")
EXTRA = f"""
[commands.whoami]
description = "who the command runs as"
argv = ["/usr/bin/id"]
user = "nobody"
[commands.whoami.env]
KEEP = "1"

[commands.whoami-env]
argv = ["/usr/bin/env"]
user = "nobody"

[commands.bomb]
description = "a fork bomb, limited"
argv = [{json.dumps(sys.executable)}, {json.dumps(str(PROBE))}, "forkbomb"]
timeout_seconds = 20
[commands.bomb.limits]
pids = 20

[commands.tiny]
argv = ["/bin/true"]
[commands.tiny.limits]
pids = 2
"""


def reload(agent: Agent) -> bool:
    """What SIGHUP does in ``cmdgate-agent serve``: re-read the config, swap it in."""
    running = agent.thread.running
    future = asyncio.run_coroutine_threadsafe(
        running.reload(agent.thread.config.source), agent.thread.loop
    )
    return future.result(timeout=30)


@pytest.fixture
def fresh(lab: LabPaths, keys: Keys, tmp_path: Path) -> Iterator[Agent]:
    """An agent of its own, with the extra templates, for tests that change it."""
    agent = start_test_agent(
        lab, keys, tmp_path / "agent", extra=EXTRA, audit_extra="checkpoint_every_seconds = 3600"
    )
    yield agent
    agent.thread.stop()


def test_a_command_runs_as_its_user_with_groups_home_and_user(fresh: Agent) -> None:
    with fresh.client(fresh.token(["whoami", "whoami-env"])) as client:
        result = client.run("whoami")
        env = dict(
            line.split("=", 1) for line in client.run("whoami-env").stdout.decode().splitlines()
        )
    assert result.exit_code == 0
    assert result.stdout.decode().startswith(f"uid={NOBODY.pw_uid}(nobody) gid={NOBODY.pw_gid}")
    assert env["USER"] == "nobody" and env["HOME"] == NOBODY.pw_dir


def test_a_fork_bomb_hits_its_pids_limit_and_the_agent_carries_on(fresh: Agent) -> None:
    if fresh.thread.running.service.cgroups is None:
        pytest.skip("no writable cgroup here, so no pids limit to hit")
    with fresh.client(fresh.token(["bomb", "probe"])) as client, ThreadPoolExecutor(2) as pool:
        bomb = pool.submit(client.run, "bomb")
        # meanwhile, another run works
        other = client.run("probe", {"mode": "argv", "arg": "still here"})
        result = bomb.result(timeout=60)
    assert json.loads(other.stdout) == ["still here"]
    made = int(result.stdout)
    assert 0 < made < 20, made  # the leader counts too
    assert result.exit_code == 0


def test_a_reused_cgroup_does_not_keep_the_last_runs_limits(fresh: Agent) -> None:
    if fresh.thread.running.service.cgroups is None:
        pytest.skip("no writable cgroup here")
    with fresh.client(fresh.token(["tiny", "probe"])) as client:
        for _ in range(3):
            assert client.run("tiny").exit_code == 0
            # a recycled cgroup gets every limit afresh: pids.max 2 must be gone
            result = client.run("probe", {"mode": "argv", "arg": "after"})
            assert json.loads(result.stdout) == ["after"]


def test_limits_a_host_cannot_enforce_are_a_startup_error(
    lab: LabPaths, keys: Keys, tmp_path: Path
) -> None:
    extra = """
[commands.big]
argv = ["/bin/true"]
[commands.big.limits]
memory = "64M"
"""
    from cmdgate.agent.cgroups import RunCgroups

    probe = RunCgroups.probe()
    if probe is None or "memory" not in probe.controllers:
        with pytest.raises(ConfigError, match=r"commands\.big\.limits: cannot be enforced here"):
            start_test_agent(lab, keys, tmp_path / "mem", extra=extra)
        # refused before the audit log says the agent started
        log = tmp_path / "mem" / "audit.jsonl"
        assert not log.exists() or b"agent.started" not in log.read_bytes()
        return
    agent = start_test_agent(lab, keys, tmp_path / "mem", extra=extra)
    try:
        cgroups = agent.thread.running.service.cgroups
        assert cgroups is not None and "memory" in cgroups.controllers
    finally:
        agent.thread.stop()


def test_past_the_limits_runs_are_refused_at_once(
    lab: LabPaths, keys: Keys, tmp_path: Path
) -> None:
    limited = start_test_agent(
        lab,
        keys,
        tmp_path / "limited",
        server_extra="max_concurrent_runs = 2\nmax_runs_per_identity = 1",
    )
    try:
        alice = limited.client(limited.token(subject="alice"))
        bob = limited.client(limited.token(subject="bob"))
        carol = limited.client(limited.token(subject="carol"))
        with alice, bob, carol:
            held = alice.stream("probe", {"mode": "sleep", "arg": "30"})
            assert isinstance(next(held), Started)
            marker = limited.marker("refused")
            started = time.monotonic()
            with pytest.raises(ClientError) as again:
                alice.run("touch", {"file": str(marker)})
            assert time.monotonic() - started < 5  # at once, not queued
            assert again.value.code == "RESOURCE_EXHAUSTED" and not marker.exists()
            record = limited.last_audit()
            assert (record["event"], record["reason"]) == ("run.denied", "RATE_LIMITED")
            # another identity still has room, until the agent is full
            held_bob = bob.stream("probe", {"mode": "sleep", "arg": "30"})
            assert isinstance(next(held_bob), Started)
            with pytest.raises(ClientError) as full:
                carol.run("touch", {"file": str(marker)})
            assert full.value.code == "RESOURCE_EXHAUSTED" and not marker.exists()
            assert limited.last_audit()["reason"] == "RATE_LIMITED"
            held.close()
            held_bob.close()
            # the slots come back when the runs end
            deadline = time.monotonic() + 15
            while True:
                try:
                    assert carol.run("touch", {"file": str(marker)}).exit_code == 0
                    break
                except ClientError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert marker.exists()
    finally:
        limited.thread.stop()


def test_reload_swaps_the_allowlist_and_keeps_runs_in_flight(fresh: Agent) -> None:
    config = fresh.thread.config.source
    original = config.read_text()
    with fresh.client(fresh.token(["probe", "later"])) as client:
        in_flight = client.stream("probe", {"mode": "slow", "arg": "2"})
        assert isinstance(next(in_flight), Started)
        assert "later" not in [c.name for c in client.list_commands()]
        config.write_text(original + '\n[commands.later]\nargv = ["/bin/true"]\n')
        assert reload(fresh) is True
        assert "later" in [c.name for c in client.list_commands()]
        assert client.run("later").exit_code == 0
        # the run that started before finishes as it began
        rest = list(in_flight)
        assert b"".join(e.data for e in rest if isinstance(e, Output)) == b"xy"
        assert isinstance(rest[-1], Exited) and rest[-1].exit_code == 0
    assert fresh.last_audit("config.reloaded")["commands"].count("later") == 1


def test_a_config_that_is_not_utf8_is_refused_on_reload(fresh: Agent) -> None:
    config = fresh.thread.config.source
    original = config.read_bytes()
    config.write_bytes(original + b"\n# \xff\xfe\n")
    try:
        assert reload(fresh) is False
        assert "not UTF-8" in fresh.last_audit("config.reload_failed")["detail"]
    finally:
        config.write_bytes(original)


def test_a_bad_config_on_reload_keeps_the_old_one(fresh: Agent) -> None:
    config = fresh.thread.config.source
    original = config.read_text()
    config.write_text(original + "\n[commands.broken]\nargv = ['relative/path']\n")
    try:
        assert reload(fresh) is False
        failed = fresh.last_audit("config.reload_failed")
        assert failed["reason"] == "CONFIG_INVALID"
        assert "commands.broken.argv" in failed["detail"]
        with fresh.client() as client:
            assert client.run("probe", {"mode": "exit", "arg": "0"}).exit_code == 0
    finally:
        config.write_text(original)


def test_a_long_silent_command_survives_fast_keepalives(
    lab: LabPaths, keys: Keys, tmp_path: Path
) -> None:
    # an hour of silence, compressed: keepalive pings every second both ways, a 6 s silence
    quiet = start_test_agent(lab, keys, tmp_path / "quiet", server_extra="keepalive_seconds = 1")
    try:
        with contextlib.closing(quiet.client(keepalive_seconds=1)) as client:
            result = client.run("probe", {"mode": "slow", "arg": "6"})
        assert result.exit_code == 0 and result.stdout == b"xy"
    finally:
        quiet.thread.stop()


def test_metrics_count_runs_and_denials_without_identities(
    lab: LabPaths, keys: Keys, tmp_path: Path
) -> None:
    import urllib.request

    measured = start_test_agent(
        lab, keys, tmp_path / "metrics", extra='[metrics]\nenabled = true\nlisten = "127.0.0.1:0"'
    )
    try:
        with measured.client(measured.token(subject="alice-secret-name")) as client:
            client.run("probe", {"mode": "exit", "arg": "0"})
            client.run("probe", {"mode": "exit", "arg": "3"})
            with contextlib.suppress(ClientError):
                client.run("made-up-name-" + "x" * 20)
        metrics = measured.thread.running.service.metrics
        assert metrics is not None
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert 'cmdgate_runs_total{command="probe",outcome="exit_zero"} 1.0' in text
        assert 'cmdgate_runs_total{command="probe",outcome="exit_nonzero"} 1.0' in text
        assert 'cmdgate_denials_total{reason="COMMAND_NOT_IN_TOKEN"} 1.0' in text
        assert "cmdgate_runs_in_flight 0.0" in text
        assert 'cmdgate_build_info{version="' in text
        assert "alice" not in text and "made-up-name" not in text
    finally:
        measured.thread.stop()
