"""The processes the benchmark starts, and the guarantee that each one is stopped again.

Every long-lived process (sshd, the ControlMaster, the agents) is started
through ``Processes.start`` in a session of its own, so a Ctrl-C at the
terminal reaches the harness only, which then stops them in order: SIGTERM,
a bounded wait, SIGKILL. Their descendants are collected before the parent
goes, so that nothing they forked outlives the run.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

STOP_GRACE_SECONDS = 15.0
# a benchmark run that takes longer than this has hung
RUN_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class _Started:
    name: str
    process: subprocess.Popen[bytes]
    stop_signal: signal.Signals


class Processes:
    """Starts processes and stops all of them, children included, in ``stop_all``."""

    def __init__(self) -> None:
        self._started: list[_Started] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (``name`` is for messages) with stdout and stderr going to ``log``.

        ``stop_signal`` is what asks it to stop (py-spy writes its profile on SIGINT).
        """
        with open(log, "ab") as out:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self._started.append(_Started(name, process, stop_signal))
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """Stop one process that ``start`` started, and what it left behind."""
        for entry in list(self._started):
            if entry.process is process:
                self._started.remove(entry)
                _stop_tree(entry)

    def stop_all(self) -> None:
        """Stop everything still running, newest first."""
        while self._started:
            _stop_tree(self._started.pop())


def _stop_tree(started: _Started) -> None:
    process = started.process
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if process.poll() is None:
        process.send_signal(started.stop_signal)
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"bench: {started.name} did not stop in {STOP_GRACE_SECONDS:.0f}s; killing it")
            process.kill()
            process.wait(STOP_GRACE_SECONDS)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(descendants, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together, so no two are the same)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0
) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; raise if ``process`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_quietly(argv: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run ``argv`` to completion with no stdin and output discarded; return its exit code."""
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    return wait_exact(process, RUN_TIMEOUT_SECONDS)


def wait_exact(process: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for ``process`` to exit, waking the moment it does; kill it after ``timeout``,
    or when the wait is interrupted (Ctrl-C), so that it never outlives the harness.

    ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, which would round every
    timing up; a pidfd becomes readable exactly when the process exits.
    """
    try:
        try:
            pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            return process.wait(timeout)
        try:
            readable, _, _ = select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if not readable:
            raise subprocess.TimeoutExpired(process.args, timeout)
        return process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
