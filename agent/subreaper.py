"""Where no cgroup is available: the agent as a child subreaper, and a sweep of descendants.

A double-forked, ``setsid()``-ed grandchild leaves its run's process group; with
``PR_SET_CHILD_SUBREAPER`` it is at least re-parented to the agent rather than
to init, so the agent can still find it, kill it and reap it.

Without a cgroup the agent cannot tell whose orphan an adopted process is, so
the rule is conservative: when a run ends, every adopted orphan born while that
run was alive is killed. An orphan of another run that overlapped in time dies
with it; no escapee outlives the runs that could have started it. Where this
is too coarse, give the agent a cgroup (under systemd, ``Delegate=yes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal

import psutil

log = logging.getLogger("cmdgate.agent")

PR_SET_CHILD_SUBREAPER = 36
REAP_INTERVAL_SECONDS = 1.0


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False if the kernel says no."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("PR_SET_CHILD_SUBREAPER failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


class OrphanSweeper:
    """Kills and reaps the processes the agent adopted as a subreaper."""

    def __init__(self) -> None:
        self.leaders: set[int] = set()  # runs' main processes: subprocess reaps those
        self._me = psutil.Process()
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Reap adopted orphans that exit on their own, now and then."""
        self._reaper = asyncio.create_task(self._reap_forever())

    def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    def descendants(self, leader: int) -> list[psutil.Process]:
        """The leader's descendants still attached to it."""
        try:
            return list(psutil.Process(leader).children(recursive=True))
        except psutil.Error:
            return []

    def signal_run(self, leader: int, sig: signal.Signals) -> None:
        """Signal every process still attached to the run's leader, wherever its group."""
        for process in self.descendants(leader):
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)

    @staticmethod
    def create_time(pid: int) -> float:
        """When ``pid`` started, on psutil's clock (which kill_orphans compares with)."""
        try:
            return float(psutil.Process(pid).create_time())
        except psutil.Error:
            return 0.0

    def kill_orphans(self, born_after: float) -> int:
        """SIGKILL every adopted orphan (with its descendants) born no earlier than
        ``born_after`` (a ``create_time`` of the run's leader); returns how many."""
        killed = 0
        orphans = self._orphans()  # one scan of /proc for the kill and the reap
        for orphan in orphans:
            try:
                if orphan.create_time() < born_after:
                    continue
                family = [orphan, *orphan.children(recursive=True)]
            except psutil.Error:
                continue
            for process in family:
                with contextlib.suppress(psutil.Error):
                    process.kill()
                    killed += 1
        if killed:
            log.warning("killed %d process(es) that had escaped their run's group", killed)
        self.reap(orphans)
        return killed

    def reap(self, orphans: list[psutil.Process] | None = None) -> None:
        """Wait for adopted orphans that have exited (never a run's leader: not ours to reap)."""
        for orphan in self._orphans() if orphans is None else orphans:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(orphan.pid, os.WNOHANG)

    def _orphans(self) -> list[psutil.Process]:
        try:
            children = self._me.children()
        except psutil.Error:
            return []
        return [c for c in children if c.pid not in self.leaders]

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_SECONDS)
            self.reap()
