"""``cmdgate-agent serve`` as a service manager sees it: sd_notify, reload, drain on SIGTERM.

The agent runs as a real process; the test plays systemd's part by binding the
``NOTIFY_SOCKET`` datagram socket and reading what the agent says on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from cmdgate.agent.lab import LabPaths
from cmdgate.client import AgentUnavailable, Started
from tests.support import Agent, AgentThread, Keys, agent_toml, pid_alive, wait_until

AGENT = Path(sys.executable).parent / "cmdgate-agent"


class ServiceManager:
    """The notify socket's reading end, as systemd would hold it."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20) -> dict[str, str]:
        """The next message that sets ``key`` (to ``value``), skipping others."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")


Served = tuple[subprocess.Popen[bytes], ServiceManager, Agent]


@contextlib.contextmanager
def serve(lab: LabPaths, keys: Keys, tmp_path: Path, server_extra: str = "") -> Iterator[Served]:
    """``cmdgate-agent serve`` in a process of its own, under a fake service manager."""
    root = tmp_path / "agent"
    marker_dir = root / "markers"
    marker_dir.mkdir(parents=True)
    config = root / "agent.toml"
    config.write_text(
        agent_toml(
            lab,
            keys,
            marker_dir,
            root / "audit.jsonl",
            server_extra="drain_grace_seconds = 1\n" + server_extra,
        )
    )
    manager = ServiceManager(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env.update(NOTIFY_SOCKET=str(manager.path), WATCHDOG_USEC="400000")
    log = open(root / "agent.log", "wb")  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen([str(AGENT), "serve", "--config", str(config)], env=env, stderr=log)
    try:
        ready = manager.wait_for("READY", "1")
        port = re.search(r"port (\d+)", ready.get("STATUS", ""))
        assert port, ready
        # the client's view of that agent; it runs in its own process, not in a thread here
        view = Agent(
            cast(AgentThread, None),
            f"127.0.0.1:{port.group(1)}",
            root / "audit.jsonl",
            marker_dir,
            lab,
            keys,
        )
        yield process, manager, view
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        log.close()
        manager.sock.close()


@pytest.fixture
def served(lab: LabPaths, keys: Keys, tmp_path: Path) -> Iterator[Served]:
    with serve(lab, keys, tmp_path) as running:
        yield running


def test_ready_only_once_listening_then_watchdog_beats(
    served: tuple[subprocess.Popen[bytes], ServiceManager, Agent],
) -> None:
    _, manager, agent = served
    # READY came with the port in STATUS: the port answers now
    with agent.client() as client:
        assert client.run("probe", {"mode": "exit", "arg": "0"}).exit_code == 0
    beats = [manager.wait_for("WATCHDOG", "1", timeout=5) for _ in range(3)]
    assert len(beats) == 3


def test_sighup_says_reloading_then_ready(
    served: tuple[subprocess.Popen[bytes], ServiceManager, Agent],
) -> None:
    process, manager, _ = served
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    process.send_signal(signal.SIGHUP)
    reloading = manager.wait_for("RELOADING", "1")
    assert int(reloading["MONOTONIC_USEC"]) >= before
    manager.wait_for("READY", "1")


def test_sigterm_drains_refuses_new_runs_and_records_every_end(
    served: tuple[subprocess.Popen[bytes], ServiceManager, Agent],
) -> None:
    process, manager, agent = served
    with agent.client() as client:
        held = client.stream("probe", {"mode": "sleep", "arg": "60"})
        assert isinstance(next(held), Started)
        pid = int(next(held).data)  # type: ignore[union-attr]
        process.send_signal(signal.SIGTERM)
        manager.wait_for("STOPPING", "1")
        marker = agent.marker("after-sigterm")
        with pytest.raises(AgentUnavailable):
            client.run("touch", {"file": str(marker)})
        assert not marker.exists()
        assert process.wait(timeout=20) == 0
    assert not pid_alive(pid)  # the grace (1 s) ran out: killed, not left behind
    records = agent.audit()
    assert [r["reason"] for r in records if r["event"] == "run.denied"] == ["AGENT_STOPPING"]
    finished = [r for r in records if r["event"] == "run.finished"]
    started = [r for r in records if r["event"] == "run.started"]
    assert len(finished) == len(started) >= 1
    assert finished[-1]["cancelled"] is True
    assert records[-1]["event"] == "checkpoint" and records[-1]["final"] is True


def test_without_cgroups_the_subreaper_leaves_no_survivor(
    lab: LabPaths, keys: Keys, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    with serve(lab, keys, tmp_path, 'process_control = "subreaper"') as (process, _, agent):
        with agent.client() as client:
            result = client.run("probe", {"mode": "tree", "arg": str(pid_file)}, timeout=1)
        assert result.timed_out
        pids = [int(p) for p in pid_file.read_text().split()]
        try:
            # leader, child, and the double-forked, setsid'ed grandchild: the agent adopted
            # the grandchild as a subreaper, and killed and reaped it with its run
            assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=15)
        finally:
            for pid in pids:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
