"""Run one rendered argv: execve with no shell, a clean environment, bounded and killable.

The child starts in a new session (so it leads its own process group), with
stdin from /dev/null, only fds 0, 1 and 2, and exactly the template's
environment. Where runs have cgroups, it is inside its own, limited, before
the command's first instruction (``_spawn.c``). Its output is read as it
comes, in chunks of at most 64 KiB, and handed to the caller with
backpressure: a slow client slows the command down instead of filling the
agent's memory.

Every way a run can end early — timeout, output cap, client cancel or
disconnect, agent shutdown — goes through ``terminate()``: SIGTERM to the
group, then SIGKILL after a short grace. When the leader exits, whatever it
left behind in its group is killed before the leader is reaped, so the group
id cannot have been reused by then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import fcntl
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from cmdgate.agent import _spawn
from cmdgate.agent.cgroups import RunCgroup
from cmdgate.agent.errors import SpawnFailed
from cmdgate.agent.subreaper import OrphanSweeper
from cmdgate.agent.templates import Limits, RunAs
from cmdgate.shared.wire import MAX_CHUNK_BYTES

KILL_GRACE_SECONDS = 2.0
# After the leader exits, how long to wait for the pipes to close. A descendant
# that escaped the group (setsid) and keeps them open is not waited for longer.
EOF_GRACE_SECONDS = 1.0
# Spawns run on these threads, so that the event loop never waits for an execve; a few,
# so that one child stuck before its execve (a hung mount) does not hold up every run.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="cmdgate-spawn")
# Pause reading a pipe while this many chunks wait for the client.
_QUEUE_HIGH_WATER = 8


class StreamName(enum.Enum):
    STDOUT = 1
    STDERR = 2


class EndReason(enum.Enum):
    EXITED = "exited"
    TIMED_OUT = "timed_out"
    TRUNCATED = "truncated"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended. Exactly one of ``exit_code`` and ``signal`` is set."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    cancelled: bool
    truncated: bool
    duration_ms: int
    stdout_bytes: int
    stderr_bytes: int
    # SHA-256 of exactly what was sent to the client, per stream, in hex.
    stdout_sha256: str
    stderr_sha256: str


@dataclass(frozen=True)
class _Child:
    """A spawned leader: its pid and the read ends of its output pipes."""

    pid: int
    stdout: int
    stderr: int


class ProcessRun:
    """One spawned command. ``start()``, then iterate ``output()``, then read ``outcome``."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        timeout_seconds: float,
        max_output_bytes: int,
        *,
        run_as: RunAs | None = None,
        cgroup: RunCgroup | None = None,
        limits: Limits | None = None,
        sweeper: OrphanSweeper | None = None,
    ) -> None:
        self.argv = tuple(argv)
        self.run_as = run_as
        self.cgroup = cgroup
        self.limits = limits or Limits()
        # without a cgroup: finds what escaped the process group, as the agent's orphans
        self.sweeper = sweeper
        self._born = 0.0
        self.env = dict(env)
        self.cwd = cwd
        self.timeout_seconds = timeout_seconds
        self.max_output_bytes = max_output_bytes
        self.outcome: RunOutcome | None = None
        self._loop = asyncio.get_running_loop()
        self._proc: _Child | None = None
        self._pidfd = -1
        self._queue: asyncio.Queue[tuple[StreamName, bytes] | None] = asyncio.Queue()
        self._open: dict[StreamName, int] = {}
        self._paused = False
        self._bytes = {StreamName.STDOUT: 0, StreamName.STDERR: 0}
        self._digests = {StreamName.STDOUT: hashlib.sha256(), StreamName.STDERR: hashlib.sha256()}
        self._end: EndReason | None = None
        self._returncode: int | None = None
        self._reaped = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self._started_at = 0.0
        self._duration_ms = 0

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self) -> None:
        """Spawn the process, in its own cgroup where there is one; raise ``SpawnFailed``
        if it cannot be started (or contained).

        With cgroups, the spawn runs on a thread of its own: the parent waits there until
        the child has called execve, which can take milliseconds (a cold binary, the
        kernel's wait to join a cgroup v1), and the event loop serves other calls meanwhile.
        """
        if self.cgroup is not None:
            try:
                # before the spawn: the command is born limited, with no moment unbounded
                self.cgroup.limit(self.limits)
            except OSError as e:
                self._abandon()
                raise SpawnFailed(f"cannot apply limits: {e.strerror}") from None
        try:
            if self.sweeper is not None:
                # the sweeper reaps the agent's unknown children from this loop: the leader
                # must be known to it (in _watch) before the loop runs anything else
                self._proc = self._spawn()
            else:
                self._proc = await self._spawn_on_thread()
        except (OSError, ValueError) as e:  # ValueError: e.g. an embedded NUL
            self._abandon()
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise SpawnFailed(f"{self.argv[0]}: {reason}") from None
        self._watch()

    async def _spawn_on_thread(self) -> _Child:
        spawned = self._loop.run_in_executor(_SPAWNER, self._spawn)
        cancelled = False
        while True:
            # A cancel (the call ended, then perhaps the agent stopping) cannot stop a spawn
            # under way: wait for it however often cancelled, so that a child that started
            # anyway is killed, reaped and its pipes closed.
            try:
                child = await asyncio.shield(spawned)
                break
            except asyncio.CancelledError:
                if spawned.cancelled():
                    raise  # it never began: nothing to undo
                cancelled = True
            except (OSError, ValueError):
                if cancelled:
                    self._abandon()
                    raise asyncio.CancelledError() from None
                raise
        if cancelled:
            self._proc = child
            self._abandon()
            raise asyncio.CancelledError()
        return child

    def _abandon(self) -> None:
        """Kill and reap a child that cannot be run as it should (uncontained, unlimited)."""
        proc = self._proc
        if proc is not None:
            if self.cgroup is not None:
                self.cgroup.kill()
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            for fd in (proc.stdout, proc.stderr):
                os.close(fd)
        if self.cgroup is not None:
            # rmdir waits for the last killed process to leave: not on the event loop
            self._loop.run_in_executor(None, self.cgroup.remove)

    def _spawn(self) -> _Child:
        run_as = self.run_as
        user = None
        if run_as is not None and (run_as.uid, run_as.gid) != (os.geteuid(), os.getegid()):
            # (as the same user, setgroups would need CAP_SETGID for nothing)
            user = (run_as.uid, run_as.gid, list(run_as.groups))
        env = []
        for name, value in self.env.items():
            if not name or "=" in name:
                raise ValueError(f"illegal environment variable name {name!r}")
            env.append(os.fsencode(name) + b"=" + os.fsencode(value))
        # No preexec_fn (unsafe with gRPC's threads): the child's steps are in C.
        opened: list[int] = []
        try:
            stdin = _high(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), opened)
            out_r, out_w = _pipe(opened)
            err_r, err_w = _pipe(opened)
            cgroup = None
            join = []
            if self.cgroup is not None:
                procs = _high(
                    os.open(self.cgroup.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC), opened
                )
                if self.cgroup.owner.born_inside:
                    # born in the cgroup v2 (joins it itself where the kernel cannot)
                    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                    cgroup = (_high(os.open(self.cgroup.path, flags), opened), procs)
                else:
                    join.append(procs)
                join += [
                    _high(os.open(path, os.O_WRONLY | os.O_CLOEXEC), opened)
                    for path in self.cgroup.v1_procs_files()
                ]
            pid = _spawn.spawn(
                os.fsencode(self.argv[0]),
                [os.fsencode(arg) for arg in self.argv],
                env,
                os.fsencode(self.cwd),
                stdin,
                out_w,
                err_w,
                cgroup,
                join,
                user,
            )
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        for fd in opened:
            if fd not in (out_r, err_r):
                os.close(fd)
        return _Child(pid, out_r, err_r)

    def _watch(self) -> None:
        self._started_at = time.monotonic()
        proc = self._proc
        assert proc is not None
        if self.sweeper is not None:
            self.sweeper.leaders.add(proc.pid)
            self._born = self.sweeper.create_time(proc.pid)
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except OSError as e:
            # without a pidfd the run cannot be watched: it must not run unwatched
            self._abandon()
            if self.sweeper is not None:
                self.sweeper.leaders.discard(proc.pid)
            raise SpawnFailed(f"pidfd_open: {e.strerror}") from None
        self._loop.add_reader(self._pidfd, self._on_leader_exit)
        for name, fd in ((StreamName.STDOUT, proc.stdout), (StreamName.STDERR, proc.stderr)):
            os.set_blocking(fd, False)
            self._open[name] = fd
            self._loop.add_reader(fd, self._on_readable, name, fd)
        self._timers.append(self._loop.call_later(self.timeout_seconds, self._on_timeout))

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        """Yield ``(stream, chunk)`` as the command writes; ends when it has exited and
        its pipes are closed. ``outcome`` is set afterwards."""
        while True:
            item = await self._queue.get()
            if item is None:
                break
            if self._paused and self._queue.qsize() <= 1:
                self._resume()
            yield item
        await self._reaped.wait()
        self._finish()

    async def cancel(self) -> None:
        """End the run early (client cancel, disconnect, shutdown) and wait for the reap."""
        self.terminate(EndReason.CANCELLED)
        await self._reaped.wait()
        for name in list(self._open):
            self._close_stream(name)
        self._finish()

    @property
    def reaped(self) -> bool:
        """True once the process has exited and been waited for."""
        return self._reaped.is_set()

    def kill_now(self) -> None:
        """SIGKILL the process group at once (agent shutdown after the grace)."""
        if self._end is None:
            self._end = EndReason.CANCELLED
        self._signal_group(signal.SIGKILL)

    def terminate(self, reason: EndReason) -> None:
        """SIGTERM the process group now and SIGKILL it after the grace; first reason wins."""
        # a client that leaves while the last output drains did not cancel a finished run
        if self._end is None and not (reason is EndReason.CANCELLED and self._reaped.is_set()):
            self._end = reason
        if self._reaped.is_set() or self._proc is None:
            return
        self._signal_group(signal.SIGTERM)
        self._timers.append(
            self._loop.call_later(KILL_GRACE_SECONDS, self._signal_group, signal.SIGKILL)
        )

    def _signal_group(self, sig: signal.Signals) -> None:
        """Signal the run: its cgroup (which nothing leaves) and its process group."""
        if self.cgroup is not None:
            if sig == signal.SIGKILL:
                self.cgroup.kill()
            else:
                self.cgroup.signal_all(sig)
        elif self.sweeper is not None and self._proc is not None and not self._reaped.is_set():
            # descendants that changed process group but are still attached to the leader
            self.sweeper.signal_run(self._proc.pid, sig)
        # Only while the leader is unreaped: its pid, and so the group id, cannot be reused.
        if self._proc is None or self._reaped.is_set():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _on_timeout(self) -> None:
        self.terminate(EndReason.TIMED_OUT)

    def _on_readable(self, name: StreamName, fd: int) -> None:
        try:
            data = os.read(fd, MAX_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_stream(name)
            return
        room = self.max_output_bytes - sum(self._bytes.values())
        over_cap = len(data) > room
        if over_cap:
            data = data[:room]
        if data:
            self._bytes[name] += len(data)
            self._digests[name].update(data)
            self._queue.put_nowait((name, data))
        if over_cap:
            # what is kept is queued first: closing the last stream queues the end
            self.terminate(EndReason.TRUNCATED)
            self._close_all_streams()
            return
        if self._queue.qsize() >= _QUEUE_HIGH_WATER and not self._paused:
            self._paused = True
            for fd_open in self._open.values():
                self._loop.remove_reader(fd_open)

    def _resume(self) -> None:
        self._paused = False
        for name, fd in self._open.items():
            self._loop.add_reader(fd, self._on_readable, name, fd)

    def _close_stream(self, name: StreamName) -> None:
        fd = self._open.pop(name, None)
        if fd is None:
            return
        self._loop.remove_reader(fd)
        os.close(fd)
        if not self._open:
            self._queue.put_nowait(None)

    def _on_leader_exit(self) -> None:
        assert self._proc is not None
        self._loop.remove_reader(self._pidfd)
        # The leader is a zombie until waited for: kill what it left in its group first,
        # and in its cgroup whatever double-forked out of the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()
        elif self.sweeper is not None:
            # the leader's orphans are the agent's now (subreaper): none outlives the run
            self.sweeper.kill_orphans(born_after=self._born)
        _, status = os.waitpid(self._proc.pid, 0)
        self._returncode = os.waitstatus_to_exitcode(status)
        if self.sweeper is not None:
            self.sweeper.leaders.discard(self._proc.pid)
        self._duration_ms = int((time.monotonic() - self._started_at) * 1000)
        os.close(self._pidfd)
        self._pidfd = -1
        self._reaped.set()
        for timer in self._timers:
            timer.cancel()
        self._timers = [self._loop.call_later(EOF_GRACE_SECONDS, self._on_eof_grace)]

    def _on_eof_grace(self) -> None:
        if self._paused:
            # the client is slow, not the pipe: what is in it is still to be delivered
            self._timers = [self._loop.call_later(EOF_GRACE_SECONDS, self._on_eof_grace)]
            return
        self._close_all_streams()

    def _close_all_streams(self) -> None:
        for name in list(self._open):
            self._close_stream(name)

    def _finish(self) -> None:
        if self.outcome is not None:
            return
        for timer in self._timers:
            timer.cancel()
        if self.cgroup is not None and not self.cgroup.owner.recycle(self.cgroup):
            # rmdir waits for the last killed process to leave: not on the event loop
            self._loop.run_in_executor(None, self.cgroup.remove)
        code = self._returncode
        assert code is not None
        self.outcome = RunOutcome(
            exit_code=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            timed_out=self._end is EndReason.TIMED_OUT,
            cancelled=self._end is EndReason.CANCELLED,
            truncated=self._end is EndReason.TRUNCATED,
            duration_ms=self._duration_ms,
            stdout_bytes=self._bytes[StreamName.STDOUT],
            stderr_bytes=self._bytes[StreamName.STDERR],
            stdout_sha256=self._digests[StreamName.STDOUT].hexdigest(),
            stderr_sha256=self._digests[StreamName.STDERR].hexdigest(),
        )


def _high(fd: int, opened: list[int]) -> int:
    """``fd``, moved above 2 if it is not (it becomes one of the child's 0, 1 and 2
    otherwise); kept in ``opened`` for closing."""
    if fd <= 2:
        try:
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        finally:
            os.close(fd)
        fd = high
    opened.append(fd)
    return fd


def _pipe(opened: list[int]) -> tuple[int, int]:
    """A pipe with both ends above 2, both kept in ``opened``."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        read_end = _high(read_end, opened)
    except OSError:
        os.close(write_end)
        raise
    return read_end, _high(write_end, opened)
