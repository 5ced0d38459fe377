"""The spawn in C (``cmdgate.agent._spawn``): what the child gets, where it is born, how it fails.

These call the extension directly with real processes and, where this host
lets us, real cgroups; the agent-level behaviour is in test_run and test_service.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cmdgate.agent import _spawn
from cmdgate.agent.cgroups import RUNS_FOLDER, RunCgroup, RunCgroups
from cmdgate.agent.lab import LabPaths
from cmdgate.agent.runner import ProcessRun, RunOutcome
from cmdgate.agent.templates import Limits
from tests.support import Agent, Keys, pid_alive, start_test_agent, wait_until

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
    # an inheritable descriptor of the agent's must not reach the command either
    os.dup2(spawned.devnull, 1000, inheritable=True)
    grep = Spawned()
    try:
        got = report(spawned, env={"ONLY": "this"}, cwd=str(tmp_path))
        # (grep, not Python: Python ignores SIGPIPE and SIGXFSZ itself)
        code, status = grep.run(["/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(1000)
        grep.close()
    # the agent's own mask is as it was
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == old
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


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"argv": [b"/bin/touch", b"a\0b"]}, "null"),
        ({"argv": []}, "empty"),
        ({"argv": ["str"]}, "bytes"),
        ({"env": [b"A=\0"]}, "null"),
        # a low fd would be overwritten by the dup of another one
        ({"stdout": 1}, "3 or above"),
        # without its cgroup.procs the child would be in no cgroup at all, were clone3 refused
        ({"cgroup": (5, -1)}, "cgroup"),
        ({"join": [-1]}, "descriptor"),
        # -1 would mean "leave unchanged" and 2**32 would wrap to root: refused, never root
        ({"user": (-1, 0, [])}, "uid"),
        ({"user": (2**32, 0, [])}, "uid"),
        ({"user": (4294967295, 0, [])}, "uid"),
        ({"user": (65534, 2**32, [])}, "gid"),
        ({"user": (65534, 65534, [-1])}, "groups"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(
    spawned: Spawned, tmp_path: Path, change: dict[str, Any], error: str
) -> None:
    marker = tmp_path / "ran"
    arguments: dict[str, Any] = {
        "argv": [b"/usr/bin/touch", str(marker).encode()],
        "env": [],
        "stdout": spawned.devnull,
        "cgroup": None,
        "join": [],
        "user": None,
    } | change
    argv = arguments["argv"]
    with pytest.raises((ValueError, TypeError), match=error):
        _spawn.spawn(
            argv[0] if argv and isinstance(argv[0], bytes) else b"/usr/bin/touch",
            argv,
            arguments["env"],
            b"/",
            spawned.devnull,
            arguments["stdout"],
            spawned.devnull,
            arguments["cgroup"],
            arguments["join"],
            arguments["user"],
        )
    assert not marker.exists()


def test_a_failed_cgroup_join_runs_nothing(spawned: Spawned, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # a cgroup.procs that refuses the write stands for a cgroup that is gone or full
    refusing = os.open("/proc/self/comm", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError, match=r"\] cgroup: ") as raised:
            spawned.run(["/usr/bin/touch", str(marker)], join=[refusing])
    finally:
        os.close(refusing)
    assert (raised.value.strerror or "").startswith("cgroup: ")
    assert not marker.exists()


CLOSED_STDIO = """
import os, sys
from cmdgate.agent import _spawn
for fd in (0, 1, 2):
    os.close(fd)
report = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)  # lands on 0
high = [os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) for _ in range(3)]       # 1, 2, 3
out_r, out_w = os.pipe2(os.O_CLOEXEC)
ls = [b"/bin/ls", b"/proc/self/fd"]
pid = _spawn.spawn(ls[0], ls, [], b"/", high[2], out_w, out_w, None, [], None)
os.close(out_w)
listing = b""
while chunk := os.read(out_r, 4096):
    listing += chunk
os.waitpid(pid, 0)
try:
    _spawn.spawn(b"/nonexistent", [b"x"], [], b"/", high[2], high[2], high[2], None, [], None)
    failed = "no error"
except FileNotFoundError:
    failed = "FileNotFoundError"
os.write(report, repr((sorted(listing.split()), failed)).encode())
"""


def test_closed_stdio_of_the_agent_changes_nothing(tmp_path: Path) -> None:
    """With the agent's fds 0 to 2 closed, its own pipes land there; the child still gets
    exactly 0, 1 and 2, and a failed start is still an error."""
    result = tmp_path / "result"
    subprocess.run(
        [sys.executable, "-c", CLOSED_STDIO, str(result)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=30,
    )
    listing, failed = ast.literal_eval(result.read_text())
    assert listing == [b"0", b"1", b"2", b"3"]  # 3: ls's own listing of the folder
    assert failed == "FileNotFoundError"


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


@pytest.mark.parametrize("way", ["born inside (clone3)", "joins itself (vfork)"])
def test_the_child_is_in_its_cgroup_before_it_runs(
    spawned: Spawned, cgroups: RunCgroups, way: str
) -> None:
    cgroup = cgroups.create(f"test-spawn-{os.getpid()}")
    directory = os.open(cgroup.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    procs = os.open(cgroup.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    v1 = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup.v1_procs_files()]
    try:
        # cat's first read is of its own cgroups: it ran nothing before it was inside
        argv = ["/bin/cat", "/proc/self/cgroup"]
        if way.startswith("born"):
            code, out = spawned.run(argv, cgroup=(directory, procs), join=v1)
        else:
            code, out = spawned.run(argv, join=[procs, *v1])
    finally:
        for fd in (directory, procs, *v1):
            os.close(fd)
    assert code == 0
    where = own_cgroups(out)
    assert where[""].endswith(f"/{RUNS_FOLDER}/{cgroup.path.name}")
    if cgroup.pids_v1 is not None:
        assert where["pids"].endswith(f"/{RUNS_FOLDER}/{cgroup.pids_v1.name}")
    cgroup.remove()


@pytest.mark.parametrize("born_inside", [True, False])
def test_a_run_is_limited_and_contained_either_way(
    cgroups: RunCgroups, tmp_path: Path, born_inside: bool
) -> None:
    """The runner's two ways into a cgroup (the start-up probe picks one): the command is
    in its run's cgroup, under its pids limit, and nothing of it is left afterwards."""
    cgroups.born_inside = born_inside
    script = "cat /proc/self/cgroup; for i in 1 2 3 4 5 6; do sleep 5 & done; wait"

    made: list[RunCgroup] = []

    async def run_once() -> tuple[bytes, RunOutcome | None]:
        cgroup = cgroups.create(f"test-run-{born_inside}")
        made.append(cgroup)
        run = ProcessRun(
            ["/bin/sh", "-c", script],
            {"PATH": "/usr/bin:/bin"},
            "/",
            timeout_seconds=3,
            max_output_bytes=65536,
            cgroup=cgroup,
            limits=Limits(pids=4),
        )
        await run.start()
        out = b"".join([chunk async for _, chunk in run.output()])
        return out, run.outcome

    out, outcome = asyncio.run(run_once())
    assert outcome is not None
    where = own_cgroups(b"\n".join(line for line in out.splitlines() if line[:1].isdigit()))
    assert where[""].endswith(f"/{RUNS_FOLDER}/{made[0].path.name}")
    # the shell and at most three sleepers: the fourth fork was refused
    assert b"fork" in out.lower() or b"resource" in out.lower(), out
    left = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "5"]]
    assert left == []


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


class SlowSpawn(ProcessRun):
    """A run whose spawn thread takes its time, so that cancels land during it."""

    entered = threading.Event()
    done = threading.Event()

    def _spawn(self) -> Any:
        self.entered.set()
        try:
            time.sleep(0.3)
            return super()._spawn()
        finally:
            self.done.set()


def test_cancelled_twice_during_the_spawn_leaves_no_process() -> None:
    """The call ends (one cancel), then the agent stops (another) while the spawn thread
    is still at work: the child it starts must still be killed and reaped."""
    argv = ["/bin/sleep", "986.5"]

    async def cancel_twice() -> None:
        SlowSpawn.entered.clear()
        SlowSpawn.done.clear()
        run = SlowSpawn(argv, {}, "/", timeout_seconds=60, max_output_bytes=1024)
        task = asyncio.ensure_future(run.start())
        await asyncio.get_running_loop().run_in_executor(None, SlowSpawn.entered.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    fds_before = sorted(os.listdir("/proc/self/fd"))
    asyncio.run(cancel_twice())
    assert SlowSpawn.done.wait(10)
    time.sleep(0.1)  # what a leak would look like has had time to show
    left = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == argv]
    assert left == []
    assert sorted(os.listdir("/proc/self/fd")) == fds_before


def test_a_process_hidden_in_a_cgroup_below_the_runs_is_killed(
    fresh_agent: Agent, tmp_path: Path
) -> None:
    """cgroup.procs does not list a cgroup a command made below its run's: the run still
    counts as populated, is killed whole, and its cgroups are removed."""
    cgroups = fresh_agent.thread.running.service.cgroups
    if cgroups is None:
        pytest.skip("no writable cgroup v2 here")
    pid_file = tmp_path / "pid"
    # (other agents of this test process share the folder)
    before = set(cgroups.runs.glob("*/hidden"))
    with fresh_agent.client() as client:
        result = client.run("probe", {"mode": "hide", "arg": str(pid_file)})
    assert result.exit_code == 0, result
    hidden = int(pid_file.read_text())
    try:
        assert wait_until(lambda: not pid_alive(hidden), timeout=10)
        assert wait_until(lambda: set(cgroups.runs.glob("*/hidden")) <= before, timeout=10)
    finally:
        if pid_alive(hidden):
            os.kill(hidden, signal.SIGKILL)


def test_runs_of_an_agent_that_is_gone_are_killed_and_removed_at_start(
    cgroups: RunCgroups, spawned: Spawned
) -> None:
    """An agent killed outside a service manager leaves its runs' cgroups, and whatever
    escaped into them: the next agent to start kills and removes them, and leaves those of
    agents still alive alone."""
    start_of = _start_time(os.getpid())
    orphan = cgroups.runs / f"{_reaped_pid()}.{start_of}-leftover"
    # an agent with this very pid, started earlier: pid 1 of a container, restarted
    earlier = cgroups.runs / f"{os.getpid()}.{int(start_of) - 1}-same-pid-before"
    alive = cgroups.runs / f"{os.getppid()}.{_start_time(os.getppid())}-someone-elses"
    for folder in (orphan, earlier, alive):
        folder.mkdir()
    procs = os.open(orphan / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    try:
        pid = _spawn.spawn(
            b"/bin/sleep", [b"/bin/sleep", b"985.5"], [], b"/",
            spawned.devnull, spawned.devnull, spawned.devnull, None, [procs], None,
        )  # fmt: skip
    finally:
        os.close(procs)
    try:
        started = RunCgroups.probe()
        assert started is not None
        started.close()
        assert wait_until(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, timeout=10)
        assert not orphan.exists()
        assert not earlier.exists()
        assert alive.exists()
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        alive.rmdir()


def _reaped_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    child = subprocess.Popen(["/bin/true"])
    child.wait()
    return child.pid


def _start_time(pid: int) -> str:
    """A process's start time in clock ticks (/proc/PID/stat, field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[19]
