"""The systemd units and the installer, judged by systemd itself.

- ``systemd-analyze verify`` and ``security --offline`` on both units, as the installer
  renders them and as shipped.
- ``cmdgate-agent install`` and ``uninstall`` into scratch roots.
- A real systemd (Debian 12's 252) booted as PID 1 in private namespaces, with the agent
  installed into it by ``cmdgate-agent install`` and driven through ``systemctl``: ready
  only once listening, a run, reload, ``kill -9`` and restart, a stop that drains, the
  sandboxed read-only unit, and uninstall.

That systemd shares the host's file system, and its boot would wipe /tmp and /var/tmp and
write to /etc, /var and /dev. So before it starts, the namespace gets fresh tmpfs on /tmp,
/var/tmp, /run and /dev, overlays on /etc and /var whose upper layers live in that fresh
/tmp, a read-only /sys and /proc/sys, its own cgroup, and a mask for every unit that would
touch the host (tmpfiles, sysctl, binfmt, modules, udev, timesyncd, the timers...).
Sentinel files in the host's /tmp and /var/tmp prove that they survived.

A checkout (and venv) under /tmp or /var/tmp, as CI may make one, is carried over the
fresh tmpfs: bound read-only at its own path, and into the read-only unit's private /tmp
by a drop-in that exists only in the namespace's /etc.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

import cmdgate
from cmdgate.agent import install as installer
from cmdgate.agent.config import load_config
from cmdgate.agent.lab import LAB_AUDIENCE, LAB_COMMANDS_CLAIM, LAB_ISSUER, LAB_KID
from cmdgate.shared.keys import load_private_key, mint_token

# `systemd-analyze security --offline=yes` of each unit as shipped; the README states them.
MAX_EXPOSURE = {installer.UNIT: 8.6, installer.READONLY_UNIT: 1.3}
# What install's ProtectHome=read-only (cmdgate in a home folder) adds to the read-only unit.
PROTECT_HOME_READ_ONLY_EXPOSURE = 0.1

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AGENT = BIN / "cmdgate-agent"
CLIENT = BIN / "cmdgate"
SHIPPED_UNITS = {name: REPO / "systemd" / name for name in installer.UNITS}
# Set in CI: a real-systemd test that cannot run is then a failure, not a skip.
REQUIRE_ENV = "CMDGATE_REQUIRE_SYSTEMD_TEST"
BOOT_TIMEOUT = 30.0
READY_MARKER = "cmdgate-test: namespace ready"
# Where the namespace mounts a fresh tmpfs that would hide a checkout or venv on the host's.
TMP_FOLDERS = (Path("/tmp"), Path("/var/tmp"))


def run(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run([str(AGENT), *args])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


# --- the units, judged offline ----------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch root as ``cmdgate-agent install --root`` leaves it."""
    root = tmp_path_factory.mktemp("rendered")
    done = agent_cli("install", "--root", str(root))
    assert done.returncode == 0, done.stderr
    return root


def rendered_unit(root: Path, name: str) -> Path:
    return root / "etc" / "systemd" / "system" / name


def needs_systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")


@pytest.mark.parametrize("name", installer.UNITS)
def test_units_verify(rendered: Path, name: str) -> None:
    needs_systemd_analyze()
    unit = rendered_unit(rendered, name)
    done = run(["systemd-analyze", "verify", "--man=no", "--recursive-errors=one", str(unit)])
    assert done.returncode == 0, done.stderr
    assert name not in done.stderr, done.stderr


def exposure(unit: Path) -> float:
    done = run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)])
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert match, done.stdout
    return float(match[1])


@pytest.mark.parametrize("name", installer.UNITS)
def test_exposure_as_shipped(name: str) -> None:
    needs_systemd_analyze()
    score = exposure(SHIPPED_UNITS[name])
    assert score <= MAX_EXPOSURE[name], f"{name}: exposure {score} > {MAX_EXPOSURE[name]}"


@pytest.mark.parametrize("name", installer.UNITS)
def test_exposure_as_installed(rendered: Path, name: str) -> None:
    needs_systemd_analyze()
    unit = rendered_unit(rendered, name)
    relaxed = "ProtectHome=read-only" in unit.read_text()
    limit = MAX_EXPOSURE[name] + (PROTECT_HOME_READ_ONLY_EXPOSURE if relaxed else 0)
    assert exposure(unit) <= limit + 1e-9


@pytest.mark.parametrize(
    ("name", "config"),
    [
        (installer.UNIT, "/etc/cmdgate/agent.toml"),
        (installer.READONLY_UNIT, "/etc/cmdgate-readonly/readonly.toml"),
    ],
)
def test_units_run_the_installed_agent(rendered: Path, name: str, config: str) -> None:
    lines = rendered_unit(rendered, name).read_text().splitlines()
    agent = installer.exec_path(AGENT)
    assert f"ExecStartPre={agent} check-config --config {config}" in lines
    assert f"ExecStart={agent} serve --config {config}" in lines
    assert not any(installer.UNIT_AGENT_PATH in line for line in lines)


def test_odd_agent_path_is_quoted_and_verifies(tmp_path: Path) -> None:
    needs_systemd_analyze()
    odd = tmp_path / "my venv 100%" / "bin"
    odd.mkdir(parents=True)
    (odd / "cmdgate-agent").symlink_to(AGENT)
    unit = tmp_path / installer.UNIT
    unit.write_text(
        installer.render_unit(SHIPPED_UNITS[installer.UNIT].read_text(), odd / "cmdgate-agent")
    )
    assert f'ExecStart="{odd}/cmdgate-agent" serve'.replace("%", "%%") in unit.read_text()
    done = run(["systemd-analyze", "verify", "--man=no", "--recursive-errors=one", str(unit)])
    assert done.returncode == 0, done.stderr


def test_protect_home_relaxed_only_when_asked() -> None:
    text = SHIPPED_UNITS[installer.READONLY_UNIT].read_text()
    assert "\nProtectHome=yes\n" in installer.render_unit(text, AGENT)
    relaxed = installer.render_unit(text, AGENT, protect_home_read_only=True)
    assert "\nProtectHome=read-only\n" in relaxed
    assert "ProtectHome=yes" not in relaxed


# --- the installer, into scratch roots ----------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path below ``root`` with its mode, mtime and content."""
    found: dict[str, tuple[int, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, content)
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    done = agent_cli("install", "--root", str(tmp_path), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []
    lines = done.stdout.splitlines()
    assert f"would create {tmp_path}/etc/systemd/system/{installer.UNIT}" in lines
    assert f"would create {tmp_path}/etc/systemd/system/{installer.READONLY_UNIT}" in lines
    assert any(line.startswith(f"would create {tmp_path}/etc/cmdgate/agent.toml") for line in lines)
    assert any(line.startswith("skipped systemctl") and "--root" in line for line in lines)


def test_install_creates_units_and_a_private_starter_config(tmp_path: Path) -> None:
    done = agent_cli("install", "--root", str(tmp_path))
    assert done.returncode == 0, done.stderr
    units = tmp_path / "etc" / "systemd" / "system"
    for name in installer.UNITS:
        assert mode(units / name) == 0o644
    config_dir = tmp_path / "etc" / "cmdgate"
    assert mode(config_dir) == 0o700
    for path in config_dir.rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path
    config = load_config(config_dir / "agent.toml")
    assert config.server.state_dir == Path("/var/lib/cmdgate")
    assert config.audit.path == Path("/var/log/cmdgate/audit.jsonl")
    assert config.server.listen == installer.STARTER_LISTEN
    # client.env names the files as the installed system will see them
    assert str(tmp_path) not in (config_dir / "client.env").read_text()
    assert "CMDGATE_CA=/etc/cmdgate/tls/ca.pem" in (config_dir / "client.env").read_text()

    readonly_dir = tmp_path / "etc" / "cmdgate-readonly"
    readonly = tomllib.loads((readonly_dir / "readonly.toml").read_text())
    assert readonly["server"]["listen"] == installer.READONLY_STARTER_LISTEN
    assert readonly["server"]["tls_key"] == installer.READONLY_TLS_KEY
    assert readonly["server"]["state_dir"] == "/var/lib/cmdgate-readonly"
    assert readonly["audit"]["path"] == "/var/log/cmdgate-readonly/audit.jsonl"
    assert readonly["commands"].keys() == config.commands.keys()
    # public to the dynamic user, but for the key
    assert mode(readonly_dir) == 0o755
    assert mode(readonly_dir / "tls" / "server.key") == 0o600
    for name in ("readonly.toml", "tls/ca.pem", "tls/server.pem", "keys/jwks.json"):
        assert mode(readonly_dir / name) == 0o644, name
    assert not (readonly_dir / "keys" / f"{LAB_KID}.pem").exists()


def test_second_install_changes_nothing_and_says_so(tmp_path: Path) -> None:
    assert agent_cli("install", "--root", str(tmp_path)).returncode == 0
    before = snapshot(tmp_path)
    again = agent_cli("install", "--root", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert snapshot(tmp_path) == before
    assert not re.search(r"^(created|updated|would)", again.stdout, re.MULTILINE), again.stdout
    lines = again.stdout.splitlines()
    assert f"kept {tmp_path}/etc/cmdgate/agent.toml" in " ".join(lines)
    for name in installer.UNITS:
        assert f"unchanged {tmp_path}/etc/systemd/system/{name}" in lines


def test_install_never_overwrites_a_config_but_restores_a_unit(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "cmdgate" / "agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# mine\n")
    unit = tmp_path / "etc" / "systemd" / "system" / installer.UNIT
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    done = agent_cli("install", "--root", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert config.read_text() == "# mine\n"
    assert f"updated {unit}" in done.stdout.splitlines()
    assert f"ExecStart={installer.exec_path(AGENT)} serve" in unit.read_text()
    # no starter for the read-only unit without a starter agent.toml to take it from
    assert not (tmp_path / "etc" / "cmdgate-readonly" / "readonly.toml").exists()
    assert f"skipped {tmp_path}/etc/cmdgate-readonly/readonly.toml" in done.stdout


def test_uninstall_removes_units_and_keeps_config(tmp_path: Path) -> None:
    assert agent_cli("install", "--root", str(tmp_path)).returncode == 0
    before = snapshot(tmp_path)
    dry = agent_cli("uninstall", "--root", str(tmp_path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert snapshot(tmp_path) == before
    done = agent_cli("uninstall", "--root", str(tmp_path))
    assert done.returncode == 0, done.stderr
    for name in installer.UNITS:
        assert not (tmp_path / "etc" / "systemd" / "system" / name).exists()
        assert f"removed {tmp_path}/etc/systemd/system/{name}" in done.stdout.splitlines()
    assert (tmp_path / "etc" / "cmdgate" / "agent.toml").is_file()
    assert (tmp_path / "etc" / "cmdgate-readonly" / "readonly.toml").is_file()
    assert re.search(r"^kept .*/etc/cmdgate\b", done.stdout, re.MULTILINE), done.stdout


@pytest.mark.parametrize("action", [installer.install, installer.uninstall])
def test_refuses_to_change_slash_unless_root(
    action: Callable[[Path, bool], int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    def must_not_get_here(*_: object) -> NoReturn:
        raise AssertionError("the root check must come first")

    # planning would find the agent before changing anything; this stops it even so
    monkeypatch.setattr(installer, "find_agent_executable", must_not_get_here)
    monkeypatch.setattr(installer, "_plan_configs", must_not_get_here)
    assert action(Path("/"), False) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "must run as root" in err


def test_missing_root_is_one_clear_line(tmp_path: Path) -> None:
    done = agent_cli("install", "--root", str(tmp_path / "nowhere"))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "no such folder" in done.stderr


# --- a real systemd -------------------------------------------------------------------------

# Units that would touch the host from inside the namespace, masked by a link to /dev/null.
MASKED_UNITS = (
    # tmpfiles would clean /tmp and /var/tmp and create nodes in /dev
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-setup-dev-early.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    # kernel-wide settings: sysctl, binfmt, modules, the clock, pstore, udev
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "modprobe@.service",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-journald-audit.socket",
    "systemd-random-seed.service",
    "systemd-remount-fs.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    # timers that would run apt, dpkg, fstrim and friends on the host's disks
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
    "logrotate.timer",
)

# Runs as PID 1 of the new PID namespace, in its own mount namespace, until it execs
# systemd. `set -e`: any step that fails stops it before systemd starts.
BOOT_SCRIPT = r"""
set -eu
# A fresh /run first: for a moment it holds what the fresh /tmp and /var/tmp would hide.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
carried=/run/.cmdgate-carried
mkdir -m 0700 "$carried"
@CARRY_IN@
# A fresh /tmp: it also holds the upper layers of the overlays below.
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
scratch=/tmp/.cmdgate-namespace
mkdir -m 0700 "$scratch"
overlay() {  # writes below $1 land in the scratch tmpfs
    mkdir "$scratch/$2.upper" "$scratch/$2.work"
    mount -t overlay overlay \
        -o "lowerdir=$1,upperdir=$scratch/$2.upper,workdir=$scratch/$2.work" "$1"
}
overlay /etc etc
overlay /var var
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
# What was carried goes back to its own path, read-only: nothing in here writes to it.
@CARRY_BACK@
rmdir "$carried"
@OPEN_FOLDERS@
# /sys read-only, and a cgroup2 rooted at this namespace's own cgroup
if mountpoint -q /sys/fs/cgroup; then umount -R /sys/fs/cgroup; fi
mount -o remount,bind,ro /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
# A /dev of its own: nothing created in it reaches the host's.
mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
mknod -m 0666 /dev/null c 1 3
mknod -m 0666 /dev/zero c 1 5
mknod -m 0666 /dev/full c 1 7
mknod -m 0666 /dev/random c 1 8
mknod -m 0666 /dev/urandom c 1 9
mknod -m 0666 /dev/tty c 5 0
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
touch /dev/console
mount --bind /dev/null /dev/console
mkdir -p /etc/systemd/system
for unit in @MASKED_UNITS@; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done
@DROP_IN@
for folder in /tmp /var/tmp /etc /var /run /dev; do
    mountpoint -q "$folder"
done
ip link set lo up
echo "@READY_MARKER@" >&2
export container=cmdgate-test
exec @SYSTEMD@ --system --unit=basic.target
"""

SLEEP_TEMPLATE = """
[commands.sleep]
description = "Sleep a few seconds"
argv = ["/bin/sleep", "{seconds}"]
timeout_seconds = 30
[commands.sleep.params.seconds]
type = "int"
min = 0
max = 20
"""


def cannot_run(reason: str) -> NoReturn:
    """Skip, saying exactly why; in CI (``$CMDGATE_REQUIRE_SYSTEMD_TEST``) fail instead."""
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"the real-systemd test cannot run: {reason}")
    pytest.skip(f"the real-systemd test cannot run: {reason}")


def systemd_binary() -> Path | None:
    for candidate in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd"):
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def paths_the_units_run_from() -> list[Path]:
    """The venv, the interpreter and its library, and cmdgate's sources."""
    return sorted(
        {
            AGENT,
            Path(sys.prefix),
            Path(sys.prefix).resolve(),
            Path(sys.executable).resolve(),
            Path(sys.base_prefix).resolve(),
            Path(cmdgate.__file__).resolve().parent,
            REPO,
        }
    )


def under_tmp(path: Path) -> bool:
    return any(path.is_relative_to(folder) for folder in TMP_FOLDERS)


def paths_to_carry(paths: Sequence[Path]) -> list[Path]:
    """The outermost of ``paths`` below /tmp or /var/tmp, which the fresh tmpfs would hide."""
    inside = [path for path in paths if under_tmp(path)]
    return sorted(
        path
        for path in inside
        if not any(path != other and path.is_relative_to(other) for other in inside)
    )


def why_not() -> str | None:
    if sys.platform != "linux":
        return f"it needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return f"it needs root for namespaces, mounts and a cgroup; this is uid {os.geteuid()}"
    for tool in ("unshare", "nsenter", "mount", "umount", "mountpoint", "mknod", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if systemd_binary() is None or shutil.which("systemctl") is None:
        return "systemd is not installed (apt-get install systemd)"
    for path in paths_to_carry(paths_the_units_run_from()):
        if path in TMP_FOLDERS:
            return (
                f"the venv or checkout is {path} itself: the namespace mounts a fresh {path} "
                "so that systemd's boot cannot wipe the host's, and cannot carry all of it over"
            )
        if not str(path).isprintable():
            return f"{str(path)!r}: a path with control characters cannot go in a unit"
    return None


def closed_folders(paths: Sequence[Path], carried: Sequence[Path] = ()) -> list[Path]:
    """Folders on the way to ``paths`` that other users cannot enter (e.g. /root, 0700),
    but for those the namespace makes afresh, open, on the way to ``carried``."""
    closed: set[Path] = set()
    for path in paths:
        for folder in [*reversed(path.parents), path]:
            if folder.is_dir() and not folder.stat().st_mode & stat.S_IXOTH:
                closed.add(folder)
    return sorted(
        folder
        for folder in closed
        if not (under_tmp(folder) and any(folder in path.parents for path in carried))
    )


def carry_scripts(carried: Sequence[Path]) -> tuple[str, str]:
    """Lines that bind each of ``carried`` into $carried (before the fresh tmpfs), and lines
    that bind it back at its own path (after), read-only, and let go of the first bind."""
    into: list[str] = []
    back: list[str] = []
    for i, path in enumerate(carried):
        here, held = shlex.quote(str(path)), f'"$carried/{i}"'
        if path.is_dir():
            into.append(f"mkdir {held}")
            back.append(f"(umask 022 && mkdir -p {here})")
        else:
            into.append(f"touch {held}")
            back.append(f"(umask 022 && mkdir -p {shlex.quote(str(path.parent))} && touch {here})")
        into.append(f"mount --bind {here} {held}")
        back += [
            f"mount --bind {held} {here}",
            f"mount -o remount,bind,ro {here}",
            f"umount {held}",
            f"rm -d {held}",
        ]
    return "\n".join(into), "\n".join(back)


def unit_path(path: Path) -> str:
    """``path`` as a word of a unit setting: quoted, with \\, " and % escaped."""
    escaped = str(path).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def drop_in_script(carried: Sequence[Path]) -> str:
    """Lines that write a drop-in binding ``carried`` into the read-only unit's private /tmp
    (PrivateTmp=yes would hide them); none if there is nothing carried."""
    if not carried:
        return ""
    folder = f"/etc/systemd/system/{installer.READONLY_UNIT}.d"
    lines = [
        "# Only in this test: the read-only unit's private /tmp would hide the carried paths.",
        "[Service]",
        *(f"BindReadOnlyPaths={unit_path(path)}" for path in carried),
    ]
    words = " ".join(shlex.quote(line) for line in lines)
    return f"mkdir -p {folder}\nprintf '%s\\n' {words} > {folder}/cmdgate-test.conf"


def open_folders_script(closed: Sequence[Path]) -> str:
    """Lines that let others enter ``closed`` inside the namespace only: an overlay on each
    outermost one (those under /etc and /var but for /var/tmp already are), then chmod o+x."""
    lines: list[str] = []
    tops = [
        folder
        for folder in closed
        if not any(folder.is_relative_to(other) and folder != other for other in closed)
        and not folder.is_relative_to("/etc")
        and not (folder.is_relative_to("/var") and not under_tmp(folder))
    ]
    for i, folder in enumerate(tops):
        lines.append(f"overlay {shlex.quote(str(folder))} open{i}")
    lines += [f"chmod o+x {shlex.quote(str(folder))}" for folder in closed]
    return "\n".join(lines)


def cgroup2_mount() -> Path | None:
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        if tail.split()[:1] == ["cgroup2"]:
            found = Path(fields.split()[4])
    return found


def make_cgroup() -> Path:
    """A cgroup of our own for the namespace's systemd, so that it never shares one."""
    mount = cgroup2_mount()
    if mount is None:
        cannot_run("no cgroup2 file system is mounted")
    own = next(
        (
            line[3:]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        ),
        None,
    )
    if own is None:
        cannot_run("this process is in no cgroup v2")
    parent = mount / own.lstrip("/")
    cgroup = parent / f"cmdgate-systemd-test-{secrets.token_hex(4)}"
    try:
        cgroup.mkdir()
    except OSError as e:
        cannot_run(f"cannot create a cgroup in {parent}: {e.strerror}")
    return cgroup


def remove_cgroup(cgroup: Path) -> None:
    deadline = time.monotonic() + 10
    while cgroup.exists():
        folders = sorted(
            (p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        )
        try:
            for folder in [*folders, cgroup]:
                folder.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class Namespace:
    """A systemd booted as PID 1 in private namespaces, and how to reach into it."""

    process: subprocess.Popen[bytes]
    pid1: int
    log: Path

    def enter(
        self, *argv: str, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", "-n", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            check=False,
        )

    def popen(self, *argv: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", "-n", "--", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env),
        )

    def systemctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.enter("systemctl", *args, timeout=timeout)

    def show(self, unit: str) -> dict[str, str]:
        properties = "ActiveState,SubState,StatusText,MainPID,NRestarts,Type,LoadState"
        done = self.systemctl("show", f"--property={properties}", unit)
        assert done.returncode == 0, done.stderr
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def path(self, inside: str) -> Path:
        """A path inside the namespace, seen from the host."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def journal(self, unit: str) -> str:
        return self.enter("journalctl", "--no-pager", "-n", "60", "-u", unit).stdout

    def audit(self, path: str = "/var/log/cmdgate/audit.jsonl") -> list[dict[str, Any]]:
        text = self.path(path).read_text(encoding="ascii")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def token(self, commands: Sequence[str]) -> str:
        key = load_private_key(self.path(f"/etc/cmdgate/keys/{LAB_KID}.pem"))
        return mint_token(
            key,
            kid=LAB_KID,
            issuer=LAB_ISSUER,
            audience=LAB_AUDIENCE,
            subject="systemd-test",
            commands=commands,
            ttl_seconds=600,
            commands_claim=LAB_COMMANDS_CLAIM,
        )

    def client_env(self, token: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CMDGATE_")}
        env.update(
            CMDGATE_CA="/etc/cmdgate/tls/ca.pem",
            CMDGATE_CERT="/etc/cmdgate/tls/client.pem",
            CMDGATE_KEY="/etc/cmdgate/tls/client.key",
            CMDGATE_TOKEN=token,
        )
        return env

    def cmdgate(self, *args: str, token: str) -> subprocess.CompletedProcess[str]:
        """The real client, over loopback inside the namespace."""
        return self.enter(str(CLIENT), *args, env=self.client_env(token))

    def listed(self, token: str, target: str = "127.0.0.1") -> list[str]:
        done = self.cmdgate("list", target, "--json", token=token)
        assert done.returncode == 0, done.stderr
        return sorted(c["name"] for c in json.loads(done.stdout)["commands"])

    def power_off(self) -> None:
        """Shut the namespace's systemd down, forcefully if it will not go in time."""
        if self.process.poll() is not None:
            return
        try:
            if self.systemctl("poweroff", "--no-block", timeout=10).returncode == 0:
                self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        if self.process.poll() is None:
            # killing a PID namespace's init kills everything in it
            os.kill(self.pid1, signal.SIGKILL)
            self.process.wait(timeout=10)


def find_pid1(process: subprocess.Popen[bytes], log: Path) -> int:
    """The host pid of the namespace's PID 1, once it is systemd."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log.read_text(errors="replace").strip()
            if READY_MARKER not in output:
                cannot_run(f"cannot set up the namespace: {output or 'no output'}")
            pytest.fail(f"systemd exited at once:\n{output}")
        try:
            pids = children.read_text().split()
            if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
                return int(pids[0])
        except OSError:
            pass
        time.sleep(0.02)
    pytest.fail(f"systemd did not start in {BOOT_TIMEOUT:g} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespace]:
    """systemd as PID 1 in private namespaces, isolated from the host's files."""
    reason = why_not()
    if reason:
        cannot_run(reason)
    sentinels = [
        Path(folder) / f"cmdgate-systemd-sentinel-{secrets.token_hex(4)}"
        for folder in ("/tmp", "/var/tmp")
    ]
    for sentinel in sentinels:
        sentinel.write_text("systemd must not clean this away\n")
    cgroup = make_cgroup()
    log = tmp_path_factory.mktemp("systemd") / "boot.log"
    paths = paths_the_units_run_from()
    carried = paths_to_carry(paths)
    carry_in, carry_back = carry_scripts(carried)
    script = (
        BOOT_SCRIPT.replace("@CARRY_IN@", carry_in)
        .replace("@CARRY_BACK@", carry_back)
        .replace("@OPEN_FOLDERS@", open_folders_script(closed_folders(paths, carried)))
        .replace("@DROP_IN@", drop_in_script(carried))
        .replace("@MASKED_UNITS@", " ".join(MASKED_UNITS))
        .replace("@READY_MARKER@", READY_MARKER)
        .replace("@SYSTEMD@", str(systemd_binary()))
    )
    namespace: Namespace | None = None
    try:
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    # join the fresh cgroup first: the new cgroup namespace is rooted there
                    'echo $$ > "$1/cgroup.procs" && exec unshare --pid --fork --mount '
                    '--mount-proc --net --uts --ipc --cgroup sh -c "$2"',
                    "boot",
                    str(cgroup),
                    script,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            namespace = Namespace(process, find_pid1(process, log), log)
            private = namespace.path("/run/systemd/private")
            wait_for(private.exists, BOOT_TIMEOUT, "systemd's control socket")
            state = namespace.systemctl("is-system-running", "--wait", timeout=BOOT_TIMEOUT)
            assert state.stdout.strip() in ("running", "degraded"), (
                state.stdout + namespace.systemctl("--failed", "--no-pager").stdout
            )
            yield namespace
        finally:
            if namespace is not None:
                namespace.power_off()
            elif process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    finally:
        remove_cgroup(cgroup)
        missing = [str(s) for s in sentinels if not s.exists()]
        for sentinel in sentinels:
            sentinel.unlink(missing_ok=True)
        assert not missing, f"the namespace's systemd removed the host's {missing}"


@dataclass(frozen=True)
class Installed:
    namespace: Namespace
    output: str
    observed: str


# Polls the unit from inside the namespace while `install` starts it: every time systemd
# says "active", the port must already listen.
READINESS_PROBE = """
import socket, subprocess, sys, time
states = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    state = subprocess.run(
        ["systemctl", "show", "--property=ActiveState", "--value", "cmdgate-agent.service"],
        capture_output=True, text=True,
    ).stdout.strip()
    if state == "active":
        try:
            socket.create_connection(("127.0.0.1", 7443), timeout=2).close()
            states.append("active+listening")
        except OSError as e:
            states.append(f"active+not-listening({e})")
        break
    if not states or states[-1] != state:
        states.append(state)
print(" ".join(states))
"""


@pytest.fixture(scope="module")
def installed(booted: Namespace) -> Installed:
    """``cmdgate-agent install`` run inside the namespace, watched by a readiness probe."""
    probe = booted.popen(sys.executable, "-c", READINESS_PROBE, env=os.environ)
    try:
        done = booted.enter(str(AGENT), "install", timeout=120)
        if done.returncode != 0:
            probe.kill()
        observed, probe_errors = probe.communicate(timeout=70)
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    assert done.returncode == 0, done.stdout + done.stderr + booted.journal(installer.UNIT)
    assert probe.returncode == 0, probe_errors
    return Installed(booted, done.stdout, observed.strip())


def test_install_enables_and_starts_once_listening(installed: Installed) -> None:
    ns = installed.namespace
    assert "enabled and started cmdgate-agent.service" in installed.output
    # systemd said "activating" while the agent started, and "active" only once it listened
    states = installed.observed.split()
    assert "activating" in states, installed.observed
    assert states[-1] == "active+listening", installed.observed
    shown = ns.show(installer.UNIT)
    assert shown["Type"] == "notify"
    assert shown["ActiveState"] == "active"
    assert "listening" in shown["StatusText"] and "7443" in shown["StatusText"]
    assert ns.systemctl("is-enabled", installer.UNIT).stdout.strip() == "enabled"
    # the files the unit asked systemd for, with the modes it asked for
    for folder in ("/etc/cmdgate", "/var/lib/cmdgate", "/var/log/cmdgate", "/run/cmdgate"):
        assert mode(ns.path(folder)) == 0o700, folder
    assert ns.path("/var/lib/cmdgate/audit-key.pem").is_file()
    # a second install inside changes nothing
    again = ns.enter(str(AGENT), "install")
    assert again.returncode == 0, again.stderr
    assert "enabled and active: left running" in again.stdout
    assert not re.search(r"^(created|updated|reloaded)", again.stdout, re.MULTILINE)


def test_runs_a_command_through_the_service(installed: Installed) -> None:
    ns = installed.namespace
    done = ns.cmdgate(
        "run", "127.0.0.1", "echo", "message=hello from systemd", token=ns.token(["echo"])
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello from systemd\n", "")
    finished = [r for r in ns.audit() if r["event"] == "run.finished"]
    assert finished[-1]["command"] == "echo"
    assert finished[-1]["exit_code"] == 0


def test_reload_swaps_the_allowlist_and_refuses_a_bad_one(installed: Installed) -> None:
    ns = installed.namespace
    config = ns.path("/etc/cmdgate/agent.toml")
    original = config.read_text()
    token = ns.token(["echo", "sleep", "uptime"])
    assert ns.listed(token) == ["echo", "uptime"]
    pid = ns.show(installer.UNIT)["MainPID"]

    config.write_text(original + "\n[commands.broken\n")
    assert ns.systemctl("reload", installer.UNIT).returncode == 0
    wait_for(
        lambda: any(r["event"] == "config.reload_failed" for r in ns.audit()),
        10,
        "config.reload_failed in the audit",
    )
    assert ns.listed(token) == ["echo", "uptime"]

    config.write_text(original + SLEEP_TEMPLATE)
    assert ns.systemctl("reload", installer.UNIT).returncode == 0
    wait_for(lambda: "sleep" in ns.listed(token), 10, "sleep allowed after reload")
    assert ns.listed(token) == ["echo", "sleep", "uptime"]
    assert any(r["event"] == "config.reloaded" for r in ns.audit())
    shown = ns.show(installer.UNIT)
    assert (shown["MainPID"], shown["ActiveState"]) == (pid, "active"), ns.journal(installer.UNIT)


def test_kill_9_is_restarted(installed: Installed) -> None:
    ns = installed.namespace
    before = ns.show(installer.UNIT)
    assert ns.enter("kill", "-9", before["MainPID"]).returncode == 0

    def restarted() -> bool:
        now = ns.show(installer.UNIT)
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

    wait_for(restarted, 20, "systemd restarting the agent after SIGKILL")
    assert int(ns.show(installer.UNIT)["NRestarts"]) == int(before["NRestarts"]) + 1
    done = ns.cmdgate("run", "127.0.0.1", "echo", "message=back", token=ns.token(["echo"]))
    assert (done.returncode, done.stdout) == (0, "back\n"), done.stderr


def test_stop_drains_the_run_in_flight_and_audits_it(installed: Installed) -> None:
    ns = installed.namespace
    if "sleep" not in ns.path("/etc/cmdgate/agent.toml").read_text():
        config = ns.path("/etc/cmdgate/agent.toml")
        config.write_text(config.read_text() + SLEEP_TEMPLATE)
        assert ns.systemctl("restart", installer.UNIT).returncode == 0
    token = ns.token(["sleep", "echo"])
    seen = len(ns.audit())
    client = ns.popen(
        str(CLIENT), "run", "127.0.0.1", "sleep", "seconds=3", env=ns.client_env(token)
    )
    try:
        wait_for(
            lambda: any(r["event"] == "run.started" for r in ns.audit()[seen:]),
            10,
            "run.started for sleep",
        )
        started = next(r for r in ns.audit()[seen:] if r["event"] == "run.started")
        assert ns.systemctl("stop", "--no-block", installer.UNIT).returncode == 0
        wait_for(
            lambda: ns.show(installer.UNIT)["ActiveState"] == "deactivating",
            5,
            "the agent draining",
        )
        # draining: the run goes on, and a new call is refused
        late = ns.cmdgate("run", "127.0.0.1", "echo", "message=late", token=token)
        assert late.returncode == 255, late.stdout + late.stderr
        wait_for(
            lambda: ns.show(installer.UNIT)["ActiveState"] in ("inactive", "failed"),
            30,
            "the agent stopping",
        )
        out, err = client.communicate(timeout=10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert ns.show(installer.UNIT)["ActiveState"] == "inactive", ns.journal(installer.UNIT)
    assert client.returncode == 0, out + err
    finished = [
        r
        for r in ns.audit()
        if r["event"] == "run.finished" and r.get("run_id") == started["run_id"]
    ]
    assert len(finished) == 1
    assert (finished[0]["exit_code"], finished[0]["signal"]) == (0, None)


def test_readonly_unit_runs_sandboxed(installed: Installed) -> None:
    ns = installed.namespace
    unit = installer.READONLY_UNIT
    done = ns.systemctl("enable", "--now", unit)
    assert done.returncode == 0, done.stderr + ns.journal(unit)
    shown = ns.show(unit)
    assert shown["ActiveState"] == "active", ns.journal(unit)
    assert "listening" in shown["StatusText"] and "7444" in shown["StatusText"]
    status = dict(
        line.split(":", 1)
        for line in ns.path(f"/proc/{shown['MainPID']}/status").read_text().splitlines()
    )
    assert status["Uid"].split()[0] != "0"
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    done = ns.cmdgate("run", "127.0.0.1:7444", "uptime", token=ns.token(["uptime"]))
    assert done.returncode == 0, done.stderr + ns.journal(unit)
    assert "load average" in done.stdout
    audit = ns.audit("/var/log/cmdgate-readonly/audit.jsonl")
    assert [r["exit_code"] for r in audit if r["event"] == "run.finished"] == [0]
    assert ns.systemctl("stop", unit).returncode == 0


def test_uninstall_stops_and_removes_and_keeps_config(installed: Installed) -> None:
    ns = installed.namespace
    done = ns.enter(str(AGENT), "uninstall")
    assert done.returncode == 0, done.stdout + done.stderr
    for unit in installer.UNITS:
        assert not ns.path(f"/etc/systemd/system/{unit}").exists()
        assert ns.show(unit)["LoadState"] == "not-found"
    assert ns.path("/etc/cmdgate/agent.toml").is_file()
    assert ns.path("/var/log/cmdgate/audit.jsonl").is_file()
    assert "kept /etc/cmdgate" in done.stdout


def test_power_off_leaves_the_host_untouched(booted: Namespace) -> None:
    host_units = [Path("/etc/systemd/system") / name for name in installer.UNITS]
    existed = [p for p in (*host_units, Path("/etc/cmdgate")) if p.exists()]
    booted.power_off()
    assert booted.process.returncode is not None
    assert [p for p in (*host_units, Path("/etc/cmdgate")) if p.exists()] == existed
