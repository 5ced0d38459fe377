"""Per-run cgroups: a tree that no descendant can leave, killed as a whole.

A double-forked, ``setsid()``-ed grandchild leaves its process group, so
``killpg`` misses it; it cannot leave its cgroup. Each run gets its own cgroup
v2 below the agent's (under systemd, the subtree ``Delegate=yes`` hands over),
and ending a run writes ``cgroup.kill``. The cgroup2 mount is found through
/proc/self/mountinfo, since it is not always at /sys/fs/cgroup.

A command must be inside its cgroup before it runs, or it could fork before
being moved. The spawn (``_spawn.c``) has the child born in the run's cgroup
v2 (clone3 with ``CLONE_INTO_CGROUP``), and join the others (cgroup v1 pids)
itself before execve. The agent itself never moves: every migration waits
for the kernel's RCU grace period, up to 20 ms when the host was idle.

Some kernels kill a child born in a cgroup whose ``cgroup.kill`` count differs
from its parent's. So a run's cgroup is killed only when something is left in
it, only a cgroup never killed is reused, and the agent checks at start that
a child born in a fresh cgroup lives (else children join their cgroup
themselves).

Limits (``pids.max``, ``memory.max``, ``cpu.max``) are written before the
spawn, so the command is never unlimited. Where the cgroup v2 hierarchy has
no pids controller (a hybrid host), the cgroup v1 pids hierarchy, if mounted,
carries the pids limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from cmdgate.agent import _spawn
from cmdgate.agent.templates import Limits

log = logging.getLogger("cmdgate.agent")

RUNS_FOLDER = "cmdgate-runs"
# A run's pids limit when its template sets none.
DEFAULT_RUN_PIDS = 1024
MAX_SPARE_CGROUPS = 64


def _mounts(fstype: str) -> Iterator[tuple[str, str]]:
    """(mount point, super options) of every mount of ``fstype``."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) >= 5 and tail and tail[0] == fstype:
            yield fields[4].replace("\\040", " "), tail[-1] if len(tail) >= 3 else ""


def _own_cgroup(hierarchy: str) -> str | None:
    """This process's cgroup path in a hierarchy: "" for v2, a controller name for v1."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if hierarchy in (controllers.split(",") if controllers else [""]):
            return path
    return None


def _process_tag(pid: int) -> str | None:
    """``<pid>.<start time in clock ticks>``, which no later process shares; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the fields after the command name, which may hold spaces and parentheses
    return f"{pid}.{stat.rpartition(')')[2].split()[19]}"


_AGENT_TAG = _process_tag(os.getpid()) or f"{os.getpid()}.0"


def _maker_is_gone(name: str) -> bool:
    """Whether a run cgroup's name says the agent that made it no longer runs."""
    tag, dash, _ = name.partition("-")
    pid, dot, started = tag.partition(".")
    if not (dash and dot and pid.isdigit() and started.isdigit()):
        return False  # not a run's cgroup (a probe's, say)
    return _process_tag(int(pid)) != tag


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class RunCgroups:
    """Makes, fills, limits, kills and removes the cgroups of runs."""

    def __init__(
        self,
        runs: Path,
        controllers: frozenset[str],
        pids_v1: tuple[Path, Path] | None,
        born_inside: bool = True,
    ) -> None:
        self.runs = runs
        # children are born in their cgroup v2 (else they join it themselves)
        self.born_inside = born_inside
        self._spares: list[RunCgroup] = []
        self.controllers = controllers
        # (the agent's own v1 pids cgroup, the folder for runs' v1 pids cgroups)
        self.pids_v1 = pids_v1

    @classmethod
    def probe(cls) -> RunCgroups | None:
        """A manager if a writable cgroup v2 tree is here, else None (say why in the log)."""
        mount = next((m for m, _ in _mounts("cgroup2")), None)
        own = _own_cgroup("")
        if mount is None or own is None:
            log.info("no cgroup v2 here: runs are ended by process group only")
            return None
        home = Path(mount) / own.lstrip("/")
        runs = home / RUNS_FOLDER
        try:
            runs.mkdir(exist_ok=True)
            probe = runs / f"probe-{os.getpid()}"
            probe.mkdir()
            has_kill = (probe / "cgroup.kill").exists()
            probe.rmdir()
        except OSError as e:
            log.info(
                "cgroup v2 at %s is not writable (%s): runs are ended by process group only",
                home,
                e.strerror,
            )
            return None
        if not has_kill:
            log.info("cgroup v2 has no cgroup.kill (kernel < 5.14): process groups only")
            return None
        controllers = cls._delegate(home, runs)
        pids_v1 = None if "pids" in controllers else cls._pids_v1()
        born_inside = cls._born_inside_works(runs)
        log.info(
            "runs get their own cgroup under %s (controllers: %s%s%s)",
            runs,
            ", ".join(sorted(controllers)) or "none",
            "; pids via cgroup v1" if pids_v1 else "",
            "; children are born in it" if born_inside else "; children join it themselves",
        )
        manager = cls(runs, controllers, pids_v1, born_inside)
        manager.sweep_orphans()
        return manager

    def sweep_orphans(self) -> None:
        """Kill and remove the runs' cgroups of an agent that is gone (killed outside a
        service manager, which would have cleaned up): nothing of its runs outlives it.

        Each cgroup is named after the agent that made it (``<pid>.<start time>-<run id>``,
        so that an agent that is pid 1 in a container each time is told from the last);
        one whose agent still runs is left alone."""
        folders = [self.runs] + ([self.pids_v1[1]] if self.pids_v1 else [])
        names = set()
        for folder in folders:
            with contextlib.suppress(OSError):
                names |= {
                    entry.name
                    for entry in folder.iterdir()
                    if entry.is_dir() and _maker_is_gone(entry.name)
                }
        for name in names:
            v1 = self.pids_v1[1] / name if self.pids_v1 else None
            cgroup = RunCgroup(self, self.runs / name, v1 if v1 and v1.is_dir() else None)
            if cgroup.path.is_dir():
                cgroup.kill()
            cgroup.remove()
        if names:
            log.warning(
                "removed %d cgroup(s) of runs of an agent that is gone, and what was left in them",
                len(names),
            )

    @staticmethod
    def _born_inside_works(runs: Path) -> bool:
        """Whether a child born in a fresh cgroup (``CLONE_INTO_CGROUP``) lives: not on
        kernels that compare ``cgroup.kill`` counts, if the agent's cgroup was ever killed."""
        if not _spawn.CLONE_INTO_CGROUP:
            log.info("this build cannot spawn into a cgroup (a shadow-stack build)")
            return False
        probe = runs / f"probe-clone-{os.getpid()}"
        true = next((p for p in ("/bin/true", "/usr/bin/true") if os.access(p, os.X_OK)), None)
        if true is None:
            return False
        opened: list[int] = []
        try:
            probe.mkdir()
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            opened.append(devnull)
            if devnull < 3:  # the spawn takes no fd 0 to 2 for the child's
                devnull = fcntl.fcntl(devnull, fcntl.F_DUPFD_CLOEXEC, 3)
                opened.append(devnull)
            directory = os.open(probe, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            opened.append(directory)
            procs = os.open(probe / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            opened.append(procs)
            argv = [true.encode()]
            pid = _spawn.spawn(
                argv[0], argv, [], b"/", devnull, devnull, devnull, (directory, procs), [], None
            )
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status) == 0
        except OSError as e:
            log.info("cannot try a spawn into a cgroup (%s): children join it themselves", e)
            return False
        finally:
            for fd in opened:
                os.close(fd)
            with contextlib.suppress(OSError):
                probe.rmdir()

    @staticmethod
    def _delegate(home: Path, runs: Path) -> frozenset[str]:
        """Enable what controllers we may for the runs' cgroups."""
        wanted = {"pids", "memory", "cpu"}
        try:
            available = set((home / "cgroup.controllers").read_text().split()) & wanted
        except OSError:
            return frozenset()
        if not available:
            return frozenset()
        is_root = not (home / "cgroup.type").exists()
        if not is_root:
            # no process may live in a cgroup that hands controllers down: step into a leaf
            leaf = home / "agent"
            try:
                leaf.mkdir(exist_ok=True)
                _write(leaf / "cgroup.procs", str(os.getpid()))
            except OSError as e:
                log.warning("cannot move the agent into %s (%s): no limits", leaf, e.strerror)
                return frozenset()
        enabled: set[str] = set()
        for name in sorted(available):
            try:
                _write(home / "cgroup.subtree_control", f"+{name}")
                _write(runs / "cgroup.subtree_control", f"+{name}")
                enabled.add(name)
            except OSError as e:
                log.warning("cannot enable the %s controller for runs: %s", name, e.strerror)
        return frozenset(enabled)

    @staticmethod
    def _pids_v1() -> tuple[Path, Path] | None:
        mount = next((m for m, opts in _mounts("cgroup") if "pids" in opts.split(",")), None)
        own = _own_cgroup("pids")
        if mount is None or own is None:
            return None
        agent_home = Path(mount) / own.lstrip("/")
        runs = agent_home / RUNS_FOLDER
        try:
            runs.mkdir(exist_ok=True)
        except OSError:
            return None
        return agent_home, runs

    def supports(self, limits: Limits) -> str | None:
        """None if these limits can be applied here, else which controller is missing."""
        if limits.pids is not None and "pids" not in self.controllers and not self.pids_v1:
            return "pids"
        if limits.memory_bytes is not None and "memory" not in self.controllers:
            return "memory"
        if limits.cpu_percent is not None and "cpu" not in self.controllers:
            return "cpu"
        return None

    def create(self, name: str) -> RunCgroup:
        """An empty cgroup (and v1 pids cgroup, if used) for one run: a spare one that an
        earlier run left empty, or a new one."""
        if self._spares:
            return self._spares.pop()
        name = f"{_AGENT_TAG}-{name}"  # whose it is, for the sweep after a crash
        path = self.runs / name
        path.mkdir()
        pids_path = None
        if self.pids_v1 is not None:
            pids_path = self.pids_v1[1] / name
            try:
                pids_path.mkdir()
            except OSError:
                path.rmdir()
                raise
        return RunCgroup(self, path, pids_path)

    def recycle(self, cgroup: RunCgroup) -> bool:
        """Keep an emptied cgroup for the next run (saves a mkdir and an rmdir each; the
        next run writes every limit afresh); False if it was killed, is not empty or there
        are spares enough, and it should be removed."""
        if cgroup.killed or len(self._spares) >= MAX_SPARE_CGROUPS or cgroup.populated():
            return False
        if cgroup.pids_v1 is not None:
            try:
                if (cgroup.pids_v1 / "cgroup.procs").read_text().strip():
                    return False
            except OSError:
                return False  # cannot tell: not reused (its removal says why, if it fails)
        self._spares.append(cgroup)
        return True

    def close(self) -> None:
        """Remove the spare cgroups (the agent is stopping)."""
        while self._spares:
            self._spares.pop().remove(timeout=0)


class RunCgroup:
    """One run's cgroup."""

    def __init__(self, owner: RunCgroups, path: Path, pids_v1: Path | None) -> None:
        self.owner = owner
        self.path = path
        self.pids_v1 = pids_v1
        self.killed = False

    def v1_procs_files(self) -> list[Path]:
        """The cgroup v1 ``cgroup.procs`` a child joins itself before it runs (clone3 can
        only place it in a cgroup v2)."""
        return [] if self.pids_v1 is None else [self.pids_v1 / "cgroup.procs"]

    def limit(self, limits: Limits) -> None:
        """Apply the limits, and lift any a recycled cgroup had; before the spawn."""
        controllers = self.owner.controllers
        pids_folder = self.path if "pids" in controllers else self.pids_v1
        if pids_folder is not None:
            # every run is bounded in processes, set or not (a fork bomb stops here)
            _write(pids_folder / "pids.max", str(limits.pids or DEFAULT_RUN_PIDS))
        if "memory" in controllers:
            memory = limits.memory_bytes
            _write(self.path / "memory.max", "max" if memory is None else str(memory))
            with contextlib.suppress(OSError):
                _write(self.path / "memory.swap.max", "max" if memory is None else "0")
        if "cpu" in controllers:
            period = 100_000
            quota = "max" if limits.cpu_percent is None else str(period * limits.cpu_percent // 100)
            _write(self.path / "cpu.max", f"{quota} {period}")

    def signal_all(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every process in the run, wherever its process group went."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL everything in the run at once; nothing inside can fork its way out."""
        if not self.populated():
            return  # nothing to kill (and nothing can enter): it stays reusable
        self.killed = True
        with contextlib.suppress(OSError):
            _write(self.path / "cgroup.kill", "1")

    def populated(self) -> bool:
        """Whether a process is left in the run's cgroup, or in one a command made below it
        (``cgroup.procs`` lists neither of the latter); True when it cannot tell."""
        try:
            lines = (self.path / "cgroup.events").read_text().splitlines()
        except OSError:
            return True
        return "populated 0" not in lines

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def remove(self, timeout: float = 5.0) -> None:
        """Remove the (killed) cgroup once it is empty, with any a command made below it."""
        deadline = time.monotonic() + timeout
        below = [Path(top) for top, _, _ in os.walk(self.path, topdown=False)][:-1]
        for path in (*below, self.path, self.pids_v1):
            if path is None:
                continue
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        log.warning("cgroup %s is not empty; left behind", path)
                        break
                    if path != self.pids_v1:
                        self.kill()
                    time.sleep(0.005)
