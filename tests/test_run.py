"""Allowed runs through a real agent: exit codes, exact bytes, streaming, bounds and kills."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cmdgate.agent.lab import LabPaths
from cmdgate.client import AgentUnavailable, Client, Exited, Output, Started
from tests.support import Agent, Keys, pid_alive, start_test_agent, wait_until


def test_exit_code_is_a_result_not_an_error(agent: Agent) -> None:
    with agent.client() as client:
        ok = client.run("probe", {"mode": "exit", "arg": "0"})
        failed = client.run("probe", {"mode": "exit", "arg": "3"})
    assert (ok.exit_code, ok.signal, ok.ok) == (0, None, True)
    assert (failed.exit_code, failed.signal, failed.ok) == (3, None, False)
    assert agent.last_audit("run.finished")["exit_code"] == 3


def test_signal_is_reported(agent: Agent) -> None:
    with agent.client() as client:
        result = client.run("probe", {"mode": "kill", "arg": str(int(signal.SIGKILL))})
    assert (result.exit_code, result.signal) == (None, signal.SIGKILL)


def test_binary_output_is_byte_exact_in_chunks_of_at_most_64_kib(agent: Agent) -> None:
    expected = bytes(range(256)) * 4096  # 1 MiB, every byte value
    with agent.client() as client:
        events = list(client.stream("probe", {"mode": "binary", "arg": "4096"}))
    chunks = [e.data for e in events if isinstance(e, Output)]
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Exited)
    assert b"".join(chunks) == expected
    assert max(len(c) for c in chunks) <= 64 * 1024
    assert events[-1].stdout_bytes == len(expected)


def test_stderr_is_kept_apart(agent: Agent) -> None:
    with agent.client() as client:
        result = client.run("probe", {"mode": "stderr"})
    assert result.stdout == b"to stdout\n"
    assert result.stderr == b"to stderr\n"


def test_shell_metacharacters_are_one_literal_argv_element(agent: Agent) -> None:
    hostile = "a; touch pwned && $(touch pwned2) | `touch pwned3` > out"
    with agent.client() as client:
        result = client.run("probe", {"mode": "argv", "arg": hostile})
    assert json.loads(result.stdout) == [hostile]
    for name in ("pwned", "pwned2", "pwned3", "out"):
        assert not agent.marker(name).exists()
    assert agent.last_audit("run.started")["argv"][-1] == hostile


def test_child_environment_is_exactly_the_templates(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("CMDGATE_SECRET", "leak")
    with agent.client() as client:
        result = client.run("probe", {"mode": "env"})
    env = json.loads(result.stdout)
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "PROBE_MARKER_DIR": str(agent.marker_dir),
        "FIXED": "from-template",
    }


def test_child_has_only_fds_0_1_2_and_stdin_is_dev_null(agent: Agent) -> None:
    with agent.client() as client:
        result = client.run("probe", {"mode": "fds"})
    report = json.loads(result.stdout)
    assert report == {"fds": [0, 1, 2], "stdin": "/dev/null"}


def test_output_streams_as_it_is_written(agent: Agent) -> None:
    with agent.client() as client:
        events = client.stream("probe", {"mode": "slow", "arg": "3"})
        assert isinstance(next(events), Started)
        sent = time.monotonic()
        first = next(events)
        waited = time.monotonic() - sent
        rest = list(events)
    assert isinstance(first, Output) and first.data == b"x"
    # the command sleeps 3 s after writing: the byte must not wait for its exit
    assert waited < 1.5
    assert b"".join(e.data for e in rest if isinstance(e, Output)) == b"y"


def test_timeout_kills_the_process_group(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pid_file = tmp_path_factory.mktemp("tree") / "pids"
    with agent.client() as client:
        started = time.monotonic()
        result = client.run("probe", {"mode": "tree", "arg": str(pid_file)}, timeout=1)
        elapsed = time.monotonic() - started
    assert_no_survivor(agent, pid_file)
    assert result.timed_out and not result.ok
    # the leader ignores SIGTERM: SIGKILL after the grace
    assert result.signal == signal.SIGKILL
    assert elapsed < 20
    record = agent.last_audit("run.finished")
    assert record["timed_out"] is True and record["run_id"] == result.run_id


def assert_no_survivor(agent: Agent, pid_file: Path) -> None:
    """The tree fixture's leader, child and double-forked grandchild are all gone."""
    leader, child, escaped = (int(p) for p in pid_file.read_text().split())
    try:
        # the leader and child ignore SIGTERM: the SIGKILL after the grace gets them
        assert wait_until(lambda: not pid_alive(leader) and not pid_alive(child), timeout=15)
        if agent.thread.running.service.cgroups is None:
            pytest.skip("no writable cgroup v2 here: a setsid'ed grandchild can escape")
        # it left the process group, but not the run's cgroup
        assert wait_until(lambda: not pid_alive(escaped), timeout=15)
    finally:
        if pid_alive(escaped):
            os.kill(escaped, signal.SIGKILL)


def test_client_timeout_is_capped_by_the_template(agent: Agent) -> None:
    with agent.client() as client:
        events = client.stream("short", {"mode": "sleep", "arg": "30"}, timeout=600)
        started = next(events)
        rest = list(events)
    assert isinstance(started, Started) and started.timeout_seconds == 1
    exited = rest[-1]
    assert isinstance(exited, Exited) and exited.timed_out


def test_cancel_kills_the_command(agent: Agent) -> None:
    with agent.client() as client:
        events = client.stream("probe", {"mode": "sleep", "arg": "60"})
        started = next(events)
        first = next(events)
        assert isinstance(started, Started) and isinstance(first, Output)
        pid = int(first.data)
        assert pid_alive(pid)
        events.close()  # cancels the call
    assert wait_until(lambda: not pid_alive(pid))

    def finished() -> bool:
        records = [
            r
            for r in agent.audit()
            if r["event"] == "run.finished" and r["run_id"] == started.run_id
        ]
        return bool(records) and records[0]["cancelled"] is True

    assert wait_until(finished)


def test_output_cap_truncates_and_kills(agent: Agent) -> None:
    with agent.client() as client:
        result = client.run("tiny-output", {"mode": "flood"})
    assert result.truncated and not result.ok
    assert result.stdout == b"z" * 1000
    record = agent.last_audit("run.finished")
    assert record["truncated"] is True and record["stdout_bytes"] == 1000


def test_output_exactly_at_the_cap_is_not_truncated(agent: Agent) -> None:
    with agent.client() as client:
        result = client.run("tiny-output", {"mode": "binary", "arg": "3"})
    assert len(result.stdout) == 768 and not result.truncated and result.exit_code == 0


def test_runs_are_concurrent(agent: Agent) -> None:
    with agent.client() as client, ThreadPoolExecutor(20) as pool:
        started = time.monotonic()
        results = list(
            pool.map(lambda _: client.run("probe", {"mode": "sleep", "arg": "1"}), range(20))
        )
        elapsed = time.monotonic() - started
    assert all(r.exit_code == 0 for r in results)
    # one after another this would take 20 s
    assert elapsed < 10


def test_one_client_is_safe_to_share_across_threads(agent: Agent) -> None:
    errors: list[BaseException] = []
    with agent.client() as client:

        def worker(n: int) -> None:
            try:
                for i in range(5):
                    text = f"t{n}-{i}"
                    result = client.run("probe", {"mode": "argv", "arg": text})
                    assert json.loads(result.stdout) == [text]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_list_commands_is_the_intersection_of_both_gates(agent: Agent) -> None:
    token = agent.token(["probe", "touch", "not-on-this-host", "Probe"])
    with agent.client(token) as client:
        commands = client.list_commands()
    assert [c.name for c in commands] == ["probe", "touch"]
    touch = commands[1]
    assert touch.params[0].name == "file" and touch.params[0].type == "path"
    assert touch.params[0].under == (str(agent.marker_dir),)


def test_health_and_reflection_need_no_token(agent: Agent) -> None:
    with grpc.secure_channel(
        agent.target,
        grpc.ssl_channel_credentials(
            agent.lab.ca_cert.read_bytes(),
            agent.lab.client_key.read_bytes(),
            agent.lab.client_cert.read_bytes(),
        ),
    ) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs lack the methods
        for service in ("", "cmdgate.v1.Agent"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names = {
            s.name
            for reply in stub.ServerReflectionInfo(iter([request]), timeout=10)
            for s in reply.list_services_response.service
        }
    assert "cmdgate.v1.Agent" in names


def test_client_without_certificate_is_refused_by_mtls(agent: Agent) -> None:
    with (
        Client(agent.target, token=agent.token(), ca=agent.lab.ca_cert) as client,
        pytest.raises(AgentUnavailable),
    ):
        client.run("touch", {"file": str(agent.marker("no-cert"))})
    assert not agent.marker("no-cert").exists()


def test_cancel_kills_the_whole_group(
    agent: Agent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pid_file = tmp_path_factory.mktemp("cancel-tree") / "pids"
    with agent.client() as client:
        events = client.stream("probe", {"mode": "tree", "arg": str(pid_file)})
        assert isinstance(next(events), Started)
        assert isinstance(next(events), Output)  # "tree ready": the pids are written
        events.close()
    assert_no_survivor(agent, pid_file)


def test_a_slow_client_still_gets_every_byte(agent: Agent) -> None:
    expected = bytes(range(256)) * 18560  # ~4.5 MiB: far more than the pipes and queue hold
    with agent.client() as client:
        events = client.stream("probe", {"mode": "binary", "arg": "18560"})
        assert isinstance(next(events), Started)
        time.sleep(2.5)  # the command has long exited; its output waits for us
        rest = list(events)
    exited = rest[-1]
    assert isinstance(exited, Exited) and exited.exit_code == 0 and not exited.truncated
    assert b"".join(e.data for e in rest if isinstance(e, Output)) == expected
    assert exited.stdout_bytes == len(expected)


def test_a_path_in_a_folder_others_may_write_is_refused(agent: Agent) -> None:
    from cmdgate.client import InvalidParameters

    shared = agent.marker_dir / "world-writable"
    shared.mkdir()
    shared.chmod(0o777)
    sticky = agent.marker_dir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "owned-by-root").mkdir()
    with agent.client() as client:
        with pytest.raises(InvalidParameters, match="could be swapped"):
            client.run("touch", {"file": str(shared / "x")})
        assert not (shared / "x").exists()
        assert agent.last_audit()["reason"] == "PARAM_INVALID"
        # in a sticky folder, an entry owned by root cannot be renamed by others
        assert client.run("touch", {"file": str(sticky / "owned-by-root" / "y")}).exit_code == 0
        with pytest.raises(InvalidParameters, match="could be swapped"):
            client.run("touch", {"file": str(sticky / "not-yet-there")})
        assert not (sticky / "not-yet-there").exists()
        assert agent.last_audit()["reason"] == "PARAM_INVALID"


def test_stopping_the_agent_kills_and_records_runs_in_flight(
    lab: LabPaths, keys: Keys, tmp_path: Path
) -> None:
    stopping = start_test_agent(lab, keys, tmp_path / "stop")
    pid_file = tmp_path / "pids"
    with stopping.client() as client:
        events = client.stream("probe", {"mode": "tree", "arg": str(pid_file)})
        started = next(events)
        assert isinstance(started, Started) and isinstance(next(events), Output)
        stopping.thread.stop()  # a grace of 1 s, then every run is killed
        finished = [
            r
            for r in stopping.audit()
            if r["event"] == "run.finished" and r["run_id"] == started.run_id
        ]
        assert len(finished) == 1 and finished[0]["cancelled"] is True
        assert_no_survivor(stopping, pid_file)
