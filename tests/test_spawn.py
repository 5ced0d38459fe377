"""The spawn in C (``cmdgate.agent._spawn``): what the child gets, where it is born, how it fails.

These call the extension directly with real processes and, where this host
lets us, real cgroups; the agent-level behaviour is in test_run and test_service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cmdgate.agent import _spawn
from cmdgate.agent.cgroups import RUNS_FOLDER, RunCgroups
from cmdgate.agent.lab import LabPaths
from cmdgate.agent.runner import ProcessRun
from tests.support import Agent, Keys, start_test_agent

# The child reports what it was given, as JSON on stdout.
REPORT = """
import json, os, sys
json.dump({
    "argv": sys.argv[1:],
    "env": dict(os.environ),
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "cwd": os.getcwd(),
    "sid": os.getsid(0), "pgid": os.getpgid(0), "pid": os.getpid(),
}, sys.stdout)
"""


class Spawned:
    """The fds a spawn needs, closed at the end."""

    def __init__(self) -> None:
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.read, self.write = os.pipe2(os.O_CLOEXEC)

    def run(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: str = "/",
        cgroup: tuple[int, int] | None = None,
        join: list[int] | None = None,
        user: tuple[int, int, list[int]] | None = None,
    ) -> tuple[int, bytes]:
        """Spawn, collect stdout (and stderr) to the end, reap: (exit code, output)."""
        pid = _spawn.spawn(
            argv[0].encode(),
            [a.encode() for a in argv],
            [f"{k}={v}".encode() for k, v in (env or {}).items()],
            cwd.encode(),
            self.devnull,
            self.write,
            self.write,
            cgroup,
            join or [],
            user,
        )
        os.close(self.write)
        chunks = []
        while chunk := os.read(self.read, 65536):
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), b"".join(chunks)

    def close(self) -> None:
        for fd in (self.devnull, self.read, self.write):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def spawned() -> Iterator[Spawned]:
    fds = Spawned()
    yield fds
    fds.close()


def report(spawned: Spawned, env: dict[str, str], cwd: str) -> dict[str, Any]:
    argv = [sys.executable, "-I", "-c", REPORT, "one", "t w o"]
    code, out = spawned.run(argv, env=env, cwd=cwd)
    assert code == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


def test_the_child_gets_only_what_it_was_given(spawned: Spawned, tmp_path: Path) -> None:
    # the agent ignores SIGPIPE (Python does) and may block signals: the command must not
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        got = report(spawned, env={"ONLY": "this"}, cwd=str(tmp_path))
        # (grep, not Python: Python ignores SIGPIPE and SIGXFSZ itself)
        code, status = Spawned().run(["/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert got["argv"] == ["one", "t w o"]
    # nothing of the agent's environment; Python adds LC_CTYPE only on a C locale
    assert {k: v for k, v in got["env"].items() if k != "LC_CTYPE"} == {"ONLY": "this"}
    assert got["fds"] == [0, 1, 2, 3]  # 3: the listdir of /proc/self/fd itself
    assert got["cwd"] == str(tmp_path)
    # a session and process group of its own, so killpg reaches all it starts
    assert got["sid"] == got["pid"] == got["pgid"]
    assert code == 0
    assert status.decode().split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]


def test_run_as_sets_uid_gid_and_exactly_the_groups(spawned: Spawned) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    code, out = spawned.run(["/usr/bin/id"], user=(65534, 65534, [65534, 100]))
    assert code == 0, out
    uid, gid, groups = out.decode().split()
    assert uid.startswith("uid=65534(") and gid.startswith("gid=65534(")
    assert sorted(re.findall(r"(\d+)\(", groups)) == ["100", "65534"]


@pytest.mark.parametrize(
    ("argv", "cwd", "error", "message"),
    [
        (["/nonexistent/program"], "/", FileNotFoundError, "No such file or directory"),
        (["/dev/null"], "/", PermissionError, "Permission denied"),
        (["/bin/true"], "/nonexistent", FileNotFoundError, "chdir: No such file or directory"),
    ],
)
def test_a_failed_start_raises_and_leaves_nothing_behind(
    spawned: Spawned, argv: list[str], cwd: str, error: type[OSError], message: str
) -> None:
    fds_before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(error) as raised:
        spawned.run(argv, cwd=cwd)
    assert raised.value.strerror == message
    # the failed child was reaped, and no descriptor was left open
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
    os.close(spawned.write)
    spawned.write = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    assert sorted(os.listdir("/proc/self/fd")) == fds_before


def test_bad_arguments_are_refused_before_anything_starts(spawned: Spawned) -> None:
    with pytest.raises(ValueError, match="null"):
        spawned.run(["/bin/echo", "a\0b"])
    with pytest.raises(ValueError, match="empty"):
        _spawn.spawn(b"/bin/true", [], [], b"/", 0, 1, 2, None, [], None)
    with pytest.raises(TypeError):
        _spawn.spawn(b"/bin/true", ["str"], [], b"/", 0, 1, 2, None, [], None)  # type: ignore[list-item]


@pytest.fixture
def cgroups() -> Iterator[RunCgroups]:
    probe = RunCgroups.probe()
    if probe is None:
        pytest.skip("no writable cgroup v2 here")
    yield probe
    probe.close()


def own_cgroups(pid_output: bytes) -> dict[str, str]:
    """``/proc/self/cgroup`` lines as {controllers: path}."""
    lines = pid_output.decode().splitlines()
    return {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}


def test_the_child_is_born_in_its_cgroup(spawned: Spawned, cgroups: RunCgroups) -> None:
    cgroup = cgroups.create(f"test-spawn-{os.getpid()}")
    opened = [
        os.open(cgroup.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
        os.open(cgroup.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC),
    ]
    opened += [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup.v1_procs_files()]
    try:
        # cat's first read is of its own cgroups: it ran nothing before it was inside
        code, out = spawned.run(
            ["/bin/cat", "/proc/self/cgroup"], cgroup=(opened[0], opened[1]), join=opened[2:]
        )
    finally:
        for fd in opened:
            os.close(fd)
    assert code == 0
    where = own_cgroups(out)
    assert where[""].endswith(f"/{RUNS_FOLDER}/{cgroup.path.name}")
    if cgroup.pids_v1 is not None:
        assert where["pids"].endswith(f"/{RUNS_FOLDER}/{cgroup.pids_v1.name}")
    cgroup.remove()


@pytest.fixture
def fresh_agent(lab: LabPaths, keys: Keys, tmp_path: Path) -> Iterator[Agent]:
    agent = start_test_agent(lab, keys, tmp_path / "agent")
    yield agent
    agent.thread.stop()


def test_a_killed_cgroup_is_never_reused(fresh_agent: Agent, tmp_path: Path) -> None:
    """Some kernels kill a child born in a cgroup that was killed before (its cgroup.kill
    count differs from the agent's): a killed run's cgroup is removed, not recycled."""
    service = fresh_agent.thread.running.service
    if service.cgroups is None:
        pytest.skip("no writable cgroup v2 here")
    pid_file = tmp_path / "pids"
    with fresh_agent.client() as client:
        # leaves a double-forked grandchild behind: its cgroup is killed
        client.run("probe", {"mode": "tree", "arg": str(pid_file)}, timeout=1)
        for _ in range(3):
            result = client.run("probe", {"mode": "argv", "arg": "ok"})
            assert (result.exit_code, result.signal) == (0, None), result
            assert json.loads(result.stdout) == ["ok"]


@pytest.mark.parametrize("delay", [0.0, 0.0005, 0.002])
def test_a_call_cancelled_during_the_spawn_leaves_no_process(delay: float) -> None:
    """The spawn runs on a thread: a cancel that lands meanwhile must still kill and reap
    a child that started, and close every descriptor."""
    argv = ["/bin/sleep", f"{987 + delay:.4f}"]

    async def start_then_cancel() -> None:
        run = ProcessRun(argv, {}, "/", timeout_seconds=60, max_output_bytes=1024)
        task = asyncio.ensure_future(run.start())
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return
        # the spawn won the race: end the run the usual way
        await run.cancel()

    fds_before = sorted(os.listdir("/proc/self/fd"))
    asyncio.run(start_then_cancel())
    left = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == argv]
    assert left == []
    assert sorted(os.listdir("/proc/self/fd")) == fds_before
