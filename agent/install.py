"""``cmdgate-agent install`` and ``uninstall``: the systemd units, a starter config, the service.

``install`` writes both units to ``/etc/systemd/system`` with their ``ExecStart`` pointing
at the cmdgate-agent it runs from; creates ``/etc/cmdgate`` (0700, files 0600) with a
starter lab and ``agent.toml`` unless an ``agent.toml`` is there, and
``/etc/cmdgate-readonly`` for the read-only unit alongside; then reloads systemd and
enables and starts ``cmdgate-agent.service``. It never overwrites a config, and running it
again changes nothing. ``uninstall`` stops and disables the services and removes the units,
but keeps config, keys, state and audit. Both print one line per thing they do or skip,
and with ``dry_run`` only say what they would do.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cmdgate
from cmdgate.agent.config import load_config
from cmdgate.agent.errors import ConfigError
from cmdgate.agent.lab import LAB_HEADER, LabError, LabPaths, toml_string, write_lab

UNIT = "cmdgate-agent.service"
READONLY_UNIT = "cmdgate-agent-readonly.service"
UNITS = (UNIT, READONLY_UNIT)
# The path the unit files in the source tree carry; install puts the real one in its place.
UNIT_AGENT_PATH = "/usr/local/bin/cmdgate-agent"

# Where things go on the target system (relative to --root while installing).
UNIT_DIR = PurePosixPath("/etc/systemd/system")
CONFIG_DIR = PurePosixPath("/etc/cmdgate")
STATE_DIR = PurePosixPath("/var/lib/cmdgate")
LOG_DIR = PurePosixPath("/var/log/cmdgate")
READONLY_CONFIG_DIR = PurePosixPath("/etc/cmdgate-readonly")
READONLY_STATE_DIR = PurePosixPath("/var/lib/cmdgate-readonly")
READONLY_LOG_DIR = PurePosixPath("/var/log/cmdgate-readonly")
STARTER_LISTEN = "127.0.0.1:7443"
READONLY_STARTER_LISTEN = "127.0.0.1:7444"
# The read-only unit's dynamic user cannot read the TLS key (0600 root); each start copies
# it into the runtime folder, which only that user can open.
READONLY_TLS_KEY = "/run/cmdgate-readonly/server.key"
# The first line of the lab's agent.toml, which is no longer true once install has edited it.
STARTER_HEADER = (
    "# Starter config written by `cmdgate-agent install` for cmdgate-agent.service.\n"
    "# Replace keys/jwks.json with your issuer's and [commands] with your own, then\n"
    "# `systemctl reload cmdgate-agent`.\n"
)

SYSTEMD_RUNNING_MARKER = Path("/run/systemd/system")
SYSTEMCTL_TIMEOUT_SECONDS = 120
# The read-only unit has ProtectHome=yes and PrivateTmp=yes: an agent under these is out of sight.
_HOME_FOLDERS = (PurePosixPath("/home"), PurePosixPath("/root"), PurePosixPath("/run/user"))
_TMP_FOLDERS = (PurePosixPath("/tmp"), PurePosixPath("/var/tmp"))  # noqa: S108 (looked for, not used)
# A path that can go in an Exec line as it is; anything else is quoted.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9._/+@:-]+")


class InstallError(Exception):
    """The installer cannot go on; the message is one line naming what and why."""


@dataclass(frozen=True)
class _Step:
    """One line of the plan: a change to make, or (``change`` None) a note on what is left be."""

    what: str
    verb: str = ""
    done: str = ""
    change: Callable[[], None] | None = None


def _daemon_reload() -> _Step:
    return _Step(
        "systemd's view of the units (systemctl daemon-reload)",
        "reload",
        "reloaded",
        functools.partial(_run, "daemon-reload"),
    )


def install(root: Path, dry_run: bool) -> int:
    """Install the units and a starter config below ``root``, and start the service if
    ``root`` is / under a running systemd. Returns the exit code."""
    return _carry_out("install", lambda: _plan_install(root, dry_run), dry_run)


def uninstall(root: Path, dry_run: bool) -> int:
    """Stop and disable the services and remove the units; keep config, state and audit."""
    return _carry_out("uninstall", lambda: _plan_uninstall(root, dry_run), dry_run)


def _carry_out(action: str, plan: Callable[[], list[_Step]], dry_run: bool) -> int:
    try:
        for step in plan():
            if step.change is None:
                _say(step.what)
            elif dry_run:
                _say(f"would {step.verb} {step.what}")
            else:
                step.change()
                _say(f"{step.done} {step.what}")
    except InstallError as e:
        print(f"cmdgate-agent: {action}: {e}", file=sys.stderr)
        return 1
    return 0


def _say(line: str) -> None:
    """Print a line; a reader that went away (``| head``) must not stop an install halfway."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# --- install -------------------------------------------------------------------------------


def _plan_install(root: Path, dry_run: bool) -> list[_Step]:
    system = _check_root(root, dry_run)
    agent = find_agent_executable()
    reach = _reachability(agent)
    steps: list[_Step] = [_Step(note) for note in reach.notes]

    config_steps, fresh_starter = _plan_configs(root)
    steps += config_steps

    changed_units: list[str] = []
    for name in UNITS:
        text = render_unit(
            _unit_source(name).read_text(encoding="utf-8"),
            agent,
            protect_home_read_only=reach.under_home,
        )
        target = _below(root, UNIT_DIR / name)
        step = _write_file_step(target, text, 0o644)
        if step.change is not None:
            changed_units.append(name)
        steps.append(step)

    steps += _plan_systemd_start(root, system, changed_units)
    if fresh_starter and not dry_run:
        steps.append(
            _Step(
                f"try it: . /etc/cmdgate/client.env && {agent.with_name('cmdgate')} list 127.0.0.1 "
                "(the starter's signing key keys/lab-1.pem and client key are for trying it "
                "out: in production use your issuer's JWKS and keep keys off this host)"
            )
        )
    return steps


def _check_root(root: Path, dry_run: bool) -> bool:
    """Whether ``root`` is this system's /; refuse what cannot work."""
    if not root.is_dir():
        raise InstallError(f"--root {root}: no such folder")
    system = root.resolve() == Path("/")
    if system and not dry_run and os.geteuid() != 0:
        raise InstallError("must run as root to change / (use sudo, or --root DIR)")
    return system


def find_agent_executable() -> Path:
    """The ``cmdgate-agent`` script of this installation: beside ``sys.executable`` (a venv,
    /usr/local/bin), else the one that is running, else the first on ``PATH``."""
    candidates = [Path(sys.executable).parent / "cmdgate-agent"]
    if sys.argv and Path(sys.argv[0]).name == "cmdgate-agent":
        candidates.append(Path(sys.argv[0]))
    found = shutil.which("cmdgate-agent")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.absolute()
    raise InstallError(
        "cannot find the cmdgate-agent script beside "
        f"{sys.executable} nor on PATH; install cmdgate with pip first"
    )


@dataclass(frozen=True)
class _Reachability:
    under_home: bool
    notes: tuple[str, ...]


def _reachability(agent: Path) -> _Reachability:
    """Whether the installed agent lives where the read-only unit's sandbox hides it."""
    paths = {
        agent,
        agent.resolve(),
        Path(sys.executable),
        Path(sys.executable).resolve(),
        Path(cmdgate.__file__).resolve(),
    }
    posix = sorted(PurePosixPath(p) for p in paths)
    home = [p for p in posix if any(p.is_relative_to(h) for h in _HOME_FOLDERS)]
    tmp = [p for p in posix if any(p.is_relative_to(t) for t in _TMP_FOLDERS)]
    notes: list[str] = []
    if home:
        notes.append(
            f"note: {home[0]} is in a home folder: {READONLY_UNIT} gets ProtectHome=read-only "
            "instead of yes, so that it can reach it"
        )
    if tmp:
        notes.append(
            f"warning: {tmp[0]} is under /tmp or /var/tmp, which systemd-tmpfiles cleans and "
            f"{READONLY_UNIT} (PrivateTmp=yes) cannot see: install cmdgate elsewhere"
        )
    closed = _closed_to_others(paths)
    if closed is not None:
        notes.append(
            f"warning: {closed} is closed to other users, so {READONLY_UNIT} (a dynamic user) "
            "cannot start cmdgate from there; to use it, install cmdgate where all may read it "
            "(e.g. a venv in /opt made with a system python)"
        )
    return _Reachability(bool(home), tuple(notes))


def _closed_to_others(paths: set[Path]) -> Path | None:
    """The first folder on the way to ``paths`` that users other than its owner cannot enter."""
    for path in sorted(paths):
        for folder in [*reversed(path.parents), path]:
            try:
                if folder.is_dir() and not folder.stat().st_mode & stat.S_IXOTH:
                    return folder
            except OSError:
                return folder
    return None


def _unit_source(name: str) -> Path:
    # systemd/ beside agent/: the source tree, or site-packages/cmdgate when packaged
    path = Path(__file__).resolve().parents[1] / "systemd" / name
    if not path.is_file():
        raise InstallError(f"{path}: unit file missing from this installation of cmdgate")
    return path


def render_unit(text: str, agent: Path, *, protect_home_read_only: bool = False) -> str:
    """The unit as installed: its Exec lines run ``agent`` instead of the placeholder path."""
    quoted = exec_path(agent)
    lines = text.splitlines()
    replaced = 0
    for i, line in enumerate(lines):
        key, _, value = line.partition("=")
        if key in ("ExecStart", "ExecStartPre") and value.startswith(UNIT_AGENT_PATH + " "):
            lines[i] = f"{key}={quoted}{value[len(UNIT_AGENT_PATH) :]}"
            replaced += 1
        elif line == "ProtectHome=yes" and protect_home_read_only:
            lines[i] = "ProtectHome=read-only"
    if replaced == 0:
        raise InstallError(f"unit text has no Exec line running {UNIT_AGENT_PATH}")
    header = "# Installed by `cmdgate-agent install`. Change it with a drop-in: systemctl edit"
    return "\n".join([header, *lines]) + "\n"


def exec_path(path: Path) -> str:
    """``path`` as the first word of a unit's Exec line: quoted, with % and $ escaped."""
    text = str(path)
    if not text.isprintable():
        raise InstallError(f"{text!r}: a path with control characters cannot go in a unit")
    if _PLAIN_PATH.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("%", "%%").replace("$", "$$") + '"'


def _below(root: Path, path: PurePosixPath) -> Path:
    return root / path.relative_to("/")


def _write_file_step(target: Path, text: str, mode: int) -> _Step:
    if target.is_file():
        if target.read_text(encoding="utf-8", errors="replace") == text:
            return _Step(f"unchanged {target}")
        return _Step(
            str(target), "update", "updated", lambda: _write_atomically(target, text, mode)
        )
    return _Step(str(target), "create", "created", lambda: _write_atomically(target, text, mode))


def _write_atomically(target: Path, text: str, mode: int) -> None:
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise InstallError(f"{target}: cannot write: {e.strerror}") from None


# --- the starter configs --------------------------------------------------------------------


def _plan_configs(root: Path) -> tuple[list[_Step], bool]:
    """Steps for /etc/cmdgate and /etc/cmdgate-readonly, and whether a starter is made now."""
    config_dir = _below(root, CONFIG_DIR)
    config = config_dir / "agent.toml"
    readonly_dir = _below(root, READONLY_CONFIG_DIR)
    readonly_config = readonly_dir / "readonly.toml"
    for path in (config_dir, readonly_dir):
        if path.exists() and not path.is_dir():
            raise InstallError(f"{path}: exists and is not a folder")
    steps: list[_Step] = []
    if config.exists():
        steps.append(_Step(f"kept {config} (it exists; install never overwrites a config)"))
        fresh = False
    else:
        steps.append(
            _Step(
                f"{config} (0600) and a starter lab beside it (0700 folders, 0600 files): a CA, "
                "server and client certificates in tls/, signing key and jwks.json in keys/, "
                f"a demo token valid 1 h, client.env; listening on {STARTER_LISTEN}",
                "create",
                "created",
                lambda: _write_starter(config_dir),
            )
        )
        fresh = True
    if readonly_config.exists():
        steps.append(_Step(f"kept {readonly_config} (it exists; install never overwrites it)"))
    elif fresh:
        steps.append(
            _Step(
                f"{readonly_config} for {READONLY_UNIT} with the same templates, listening on "
                f"{READONLY_STARTER_LISTEN}; its certificates and jwks.json are copies (0644), "
                "its TLS key a 0600 copy that each start hands over",
                "create",
                "created",
                lambda: _write_readonly_starter(config_dir, readonly_dir),
            )
        )
    else:
        steps.append(
            _Step(
                f"skipped {readonly_config}: a starter is made only together with a new "
                f"agent.toml; write it yourself to use {READONLY_UNIT}"
            )
        )
    return steps, fresh


def _write_starter(config_dir: Path) -> None:
    try:
        config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(config_dir, 0o700)
    except OSError as e:
        raise InstallError(f"{config_dir}: cannot create: {e.strerror}") from None
    try:
        paths = write_lab(config_dir, listen=STARTER_LISTEN)
    except (LabError, ValueError) as e:
        raise InstallError(f"cannot write a starter config: {e}") from None
    text = paths.config.read_text(encoding="utf-8")
    text = _set_keys(text, "server", {"state_dir": toml_string(str(STATE_DIR))})
    text = _set_keys(text, "audit", {"path": toml_string(str(LOG_DIR / "audit.jsonl"))})
    _write_atomically(paths.config, STARTER_HEADER + text.removeprefix(LAB_HEADER), 0o600)
    if paths.root != Path(CONFIG_DIR):
        # --root: client.env names the paths as the installed system will see them
        env = paths.client_env.read_text(encoding="utf-8")
        _write_atomically(paths.client_env, env.replace(str(paths.root), str(CONFIG_DIR)), 0o600)
    _restrict(paths)
    try:
        loaded = load_config(paths.config)
    except ConfigError as e:
        raise InstallError(f"the starter config does not load: {e}") from None
    if loaded.server.state_dir != Path(STATE_DIR) or loaded.audit.path.parent != Path(LOG_DIR):
        raise InstallError(f"{paths.config}: state_dir or audit path did not take")


def _restrict(paths: LabPaths) -> None:
    """0700 folders, 0600 files: /etc/cmdgate is root's alone."""
    files = (paths.config, *paths.written)
    try:
        for folder in {paths.root, paths.ca_cert.parent, paths.signing_key.parent}:
            os.chmod(folder, 0o700)
        for file in files:
            os.chmod(file, 0o600)
    except OSError as e:
        raise InstallError(f"{e.filename}: cannot restrict its mode: {e.strerror}") from None


def _write_readonly_starter(config_dir: Path, readonly_dir: Path) -> None:
    """The read-only unit's folder: public files 0644 for its dynamic user, the key 0600."""
    source = (config_dir / "agent.toml").read_text(encoding="utf-8").removeprefix(STARTER_HEADER)
    text = _set_keys(
        source,
        "server",
        {
            "listen": toml_string(READONLY_STARTER_LISTEN),
            "tls_key": toml_string(READONLY_TLS_KEY),
            "state_dir": toml_string(str(READONLY_STATE_DIR)),
        },
    )
    text = _set_keys(text, "audit", {"path": toml_string(str(READONLY_LOG_DIR / "audit.jsonl"))})
    header = (
        f"# Starter config written by `cmdgate-agent install` for {READONLY_UNIT}.\n"
        "# Its dynamic user reads this folder, so all in it is public but tls/server.key,\n"
        "# which stays 0600 root; each start copies it to the tls_key path below, for that user.\n"
    )
    copies = (
        ("tls/ca.pem", 0o644),
        ("tls/server.pem", 0o644),
        ("tls/server.key", 0o600),
        ("keys/jwks.json", 0o644),
    )
    try:
        for folder in (readonly_dir, readonly_dir / "tls", readonly_dir / "keys"):
            folder.mkdir(mode=0o755, exist_ok=True)
            os.chmod(folder, 0o755)  # noqa: S103 (its dynamic user reads it)
        for name, mode in copies:
            _new_file(readonly_dir / name, (config_dir / name).read_bytes(), mode)
        _new_file(readonly_dir / "readonly.toml", (header + text).encode(), 0o644)
    except OSError as e:
        raise InstallError(f"{e.filename}: cannot write: {e.strerror}") from None
    parsed = tomllib.loads(text)
    if parsed["server"]["listen"] != READONLY_STARTER_LISTEN:
        raise InstallError(f"{readonly_dir / 'readonly.toml'}: listen did not take")


def _new_file(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    os.chmod(path, mode)


def _set_keys(text: str, table: str, values: Mapping[str, str]) -> str:
    """Set ``key = value`` lines (values already TOML) in ``[table]``, adding missing ones."""
    lines = text.splitlines()
    try:
        start = lines.index(f"[{table}]")
    except ValueError:
        raise InstallError(f"the starter config has no [{table}] table") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    pending = dict(values)
    for i in range(start + 1, end):
        key, equals, _ = lines[i].partition("=")
        if equals and key.strip() in pending:
            lines[i] = f"{key.strip()} = {pending.pop(key.strip())}"
    lines[start + 1 : start + 1] = [f"{key} = {value}" for key, value in pending.items()]
    return "\n".join(lines) + "\n"


# --- systemctl ------------------------------------------------------------------------------


def _systemd_usable(root: Path, system: bool) -> str | None:
    """None when systemctl should run, else why not."""
    if not system:
        return f"--root {root} is not /"
    if not SYSTEMD_RUNNING_MARKER.is_dir():
        return f"systemd is not running here (no {SYSTEMD_RUNNING_MARKER})"
    return None


def _systemctl(*args: str, check: bool = True) -> str:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise InstallError("systemctl not found on PATH")
    try:
        done = subprocess.run(
            [systemctl, *args],
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InstallError(
            f"systemctl {' '.join(args)}: no answer in {SYSTEMCTL_TIMEOUT_SECONDS} s"
        ) from None
    if check and done.returncode != 0:
        detail = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        hint = f"; see journalctl -u {args[-1]}" if args[-1] in UNITS else ""
        raise InstallError(f"systemctl {' '.join(args)}: {detail}{hint}")
    return done.stdout.strip()


def _unit_state(name: str) -> tuple[bool, bool]:
    """(enabled, active) as systemd sees ``name`` now."""
    enabled = _systemctl("is-enabled", name, check=False) == "enabled"
    active = _systemctl("is-active", name, check=False) == "active"
    return enabled, active


def _plan_systemd_start(root: Path, system: bool, changed_units: Sequence[str]) -> list[_Step]:
    why_not = _systemd_usable(root, system)
    if why_not is not None:
        return [
            _Step(
                f"skipped systemctl daemon-reload and enable --now {UNIT}: {why_not}",
            )
        ]
    steps: list[_Step] = []
    stale = any(
        _systemctl("show", "--property=NeedDaemonReload", "--value", name, check=False) == "yes"
        for name in UNITS
    )
    if changed_units or stale:
        steps.append(_daemon_reload())
    else:
        steps.append(_Step("no unit changed: no daemon-reload needed"))
    enabled, active = _unit_state(UNIT)
    if enabled and active:
        steps.append(_Step(f"{UNIT} is enabled and active: left running"))
    else:
        steps.append(
            _Step(
                f"{UNIT} (systemctl enable --now; active once the agent listens)",
                "enable and start",
                "enabled and started",
                functools.partial(_run, "enable", "--now", UNIT),
            )
        )
    for name in changed_units:
        if _unit_state(name)[1]:
            steps.append(
                _Step(
                    f"note: {name} runs the old unit until restarted: systemctl restart {name} "
                    "(runs in flight get their drain grace)"
                )
            )
    readonly_enabled, _ = _unit_state(READONLY_UNIT)
    if not readonly_enabled:
        steps.append(
            _Step(
                f"left {READONLY_UNIT} disabled: systemctl enable --now {READONLY_UNIT} "
                "to serve read-only diagnostics from a sandbox"
            )
        )
    return steps


def _run(*args: str) -> None:
    _systemctl(*args)


# --- uninstall ------------------------------------------------------------------------------


def _plan_uninstall(root: Path, dry_run: bool) -> list[_Step]:
    system = _check_root(root, dry_run)
    steps: list[_Step] = []
    targets = [_below(root, UNIT_DIR / name) for name in UNITS]
    why_not = _systemd_usable(root, system)
    if why_not is not None:
        steps.append(_Step(f"skipped systemctl disable --now: {why_not}"))
    else:
        for name in UNITS:
            enabled, active = _unit_state(name)
            if enabled or active:
                steps.append(
                    _Step(
                        f"{name} (systemctl disable --now; runs in flight get their drain grace)",
                        "stop and disable",
                        "stopped and disabled",
                        functools.partial(_run, "disable", "--now", name),
                    )
                )
            else:
                steps.append(_Step(f"{name} is neither enabled nor running"))
    removed = False
    for target in targets:
        if target.exists() or target.is_symlink():
            steps.append(
                _Step(str(target), "remove", "removed", functools.partial(_unlink, target))
            )
            removed = True
        else:
            steps.append(_Step(f"{target} is not there"))
        drop_ins = target.with_name(target.name + ".d")
        if drop_ins.is_dir():
            steps.append(_Step(f"kept {drop_ins} (drop-ins are yours)"))
    if removed and why_not is None:
        steps.append(_daemon_reload())
    kept = [
        str(_below(root, path))
        for path in (
            CONFIG_DIR,
            READONLY_CONFIG_DIR,
            STATE_DIR,
            READONLY_STATE_DIR,
            PurePosixPath("/var/lib/private") / READONLY_STATE_DIR.name,
            LOG_DIR,
            READONLY_LOG_DIR,
            PurePosixPath("/var/log/private") / READONLY_LOG_DIR.name,
        )
        if _below(root, path).exists()
    ]
    if kept:
        steps.append(
            _Step(
                f"kept {', '.join(kept)} (config, keys, the audit signing key and the audit "
                "log): remove them yourself once they are no longer needed"
            )
        )
    return steps


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError as e:
        raise InstallError(f"{path}: cannot remove: {e.strerror}") from None
