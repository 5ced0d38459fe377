"""A private OpenSSH server on a loopback port: the baseline cmdgate is compared with.

It has a throwaway host key and client key, accepts that one client key for
one user, and reads nothing from ``/etc/ssh``. The user's login shell must be
``/bin/sh``: ``ssh host cmd`` runs ``$SHELL -c cmd``, and a shell that reads
heavy rc files would make ssh look slower than it is.

When the harness runs as root and root's shell is something else, sshd runs
in a private mount namespace (``unshare --mount``) that sees a copy of
``/etc/passwd`` giving the user ``/bin/sh``, and, if the system has none, a
private ``/run/sshd``. Nothing outside that namespace changes, and it goes
away with sshd.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from processes import Processes, free_port, tail, wait_for_port

INSTALL_HINT = "apt-get install -y openssh-server openssh-client"
HOST_ALIAS = "bench"

# Runs inside the new mount namespace, then becomes sshd: $1 passwd copy, $2 sshd, $3.. args.
_NAMESPACE_SCRIPT = r"""
set -e
passwd=$1; shift
mount --bind "$passwd" /etc/passwd
if [ ! -d /run/sshd ]; then
    mount -t tmpfs -o mode=0755 tmpfs /run
    mkdir -m 0755 /run/sshd
fi
exec "$@"
"""


class SshUnavailable(Exception):
    """sshd or ssh cannot be used here; the message says why and how to fix it."""


@dataclass(frozen=True)
class LoginUser:
    """The account ssh logs in as, and how its login shell was made ``/bin/sh``."""

    name: str
    shell: str
    # "native": its shell is /bin/sh already; "namespace": see the module docstring;
    # "as-is": neither was possible, and the ssh figures include the start-up of ``shell``
    how: str


@dataclass(frozen=True)
class SshEndpoint:
    """How to reach the private sshd: argv builders for the ssh client."""

    ssh: str
    client_config: Path
    control_path: Path
    sshd_log: Path
    user: LoginUser
    cipher: str

    def fresh(self, *remote: str) -> list[str]:
        """``ssh host cmd`` on a new connection (key exchange, authentication, session)."""
        return [self.ssh, "-F", str(self.client_config), HOST_ALIAS, *remote]

    def multiplexed(self, *remote: str) -> list[str]:
        """``ssh host cmd`` as a new session on the ControlMaster's connection."""
        return [
            self.ssh,
            "-F",
            str(self.client_config),
            "-o",
            f"ControlPath={self.control_path}",
            HOST_ALIAS,
            *remote,
        ]

    def master(self) -> list[str]:
        """The ControlMaster, in the foreground so that its pid is the one we stop."""
        return [
            self.ssh,
            "-F",
            str(self.client_config),
            "-o",
            "ControlMaster=yes",
            "-o",
            f"ControlPath={self.control_path}",
            "-o",
            "ControlPersist=no",
            "-N",
            HOST_ALIAS,
        ]

    def logins(self) -> int:
        """How many connections sshd has authenticated so far (to prove the master is used)."""
        return self.sshd_log.read_text(errors="replace").count("Accepted publickey")


def ssh_version() -> str | None:
    """``ssh -V`` (OpenSSH prints it on stderr), or None without an ssh client."""
    ssh = shutil.which("ssh")
    if ssh is None:
        return None
    done = subprocess.run([ssh, "-V"], capture_output=True, text=True, check=False, timeout=10)
    return (done.stderr or done.stdout).strip()


def find_sshd() -> str | None:
    for candidate in ("/usr/sbin/sshd", shutil.which("sshd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _is_bin_sh(shell: str) -> bool:
    return os.path.realpath(shell) == os.path.realpath("/bin/sh")


def _choose_user(workdir: Path) -> tuple[LoginUser, list[str]]:
    """The login user, and the argv prefix that starts sshd for it."""
    entry = pwd.getpwuid(os.getuid())
    if os.geteuid() != 0:
        # an unprivileged sshd can only log in its own user, with that user's shell
        how = "native" if _is_bin_sh(entry.pw_shell) else "as-is"
        return LoginUser(entry.pw_name, entry.pw_shell, how), []
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if unshare is None or mount is None:
        raise SshUnavailable("running as root needs unshare(1) and mount(1) (util-linux)")
    passwd = workdir / "passwd"
    lines = Path("/etc/passwd").read_text().splitlines()
    found = False
    for i, line in enumerate(lines):
        fields = line.split(":")
        if len(fields) == 7 and fields[2] == str(os.getuid()) and fields[0] == entry.pw_name:
            fields[6] = "/bin/sh"
            lines[i] = ":".join(fields)
            found = True
    if not found:
        raise SshUnavailable(f"user {entry.pw_name} is not in /etc/passwd")
    passwd.write_text("\n".join(lines) + "\n")
    passwd.chmod(0o644)
    how = "native" if _is_bin_sh(entry.pw_shell) else "namespace"
    prefix = [unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c"]
    prefix += [_NAMESPACE_SCRIPT, "sh", str(passwd)]
    return LoginUser(entry.pw_name, "/bin/sh", how), prefix


def _keygen(path: Path) -> str:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise SshUnavailable(f"ssh-keygen is not installed: {INSTALL_HINT}")
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "cmdgate-bench", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


def start_sshd(workdir: Path, processes: Processes) -> SshEndpoint:
    """Start the private sshd and return how to reach it; raise ``SshUnavailable`` if not."""
    sshd, ssh = find_sshd(), shutil.which("ssh")
    if sshd is None or ssh is None:
        raise SshUnavailable(f"OpenSSH is not installed: {INSTALL_HINT}")
    workdir.mkdir(mode=0o700, exist_ok=True)
    user, prefix = _choose_user(workdir)
    host_key = workdir / "host_ed25519"
    client_key = workdir / "client_ed25519"
    host_public = _keygen(host_key)
    client_public = _keygen(client_key)
    authorized = workdir / "authorized_keys"
    authorized.write_text(client_public + "\n")
    port = free_port()
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_public}\n")

    server_config = workdir / "sshd_config"
    server_config.write_text(
        "\n".join(
            [
                # no Include of /etc/ssh: only what is written here applies
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                f"AllowUsers {user.name}",
                "AuthenticationMethods publickey",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                # ~/.ssh/rc would run through the shell before every command
                "PermitUserRC no",
                "PermitUserEnvironment no",
                "UseDNS no",
                "PrintMotd no",
                "PrintLastLog no",
                "X11Forwarding no",
                "PidFile none",
                "MaxSessions 1000",
                "MaxStartups 200:30:400",
                "LogLevel INFO",
                "",
            ]
        )
    )
    client_config = workdir / "ssh_config"
    client_config.write_text(
        "\n".join(
            [
                f"Host {HOST_ALIAS}",
                "  HostName 127.0.0.1",
                f"  Port {port}",
                f"  User {user.name}",
                f"  IdentityFile {client_key}",
                "  IdentitiesOnly yes",
                "  IdentityAgent none",
                f"  UserKnownHostsFile {known_hosts}",
                "  GlobalKnownHostsFile /dev/null",
                "  StrictHostKeyChecking yes",
                "  CheckHostIP no",
                "  UpdateHostKeys no",
                "  BatchMode yes",
                "  RequestTTY no",
                "  ForwardAgent no",
                "  ForwardX11 no",
                "  ControlMaster no",
                "  ControlPath none",
                "  LogLevel ERROR",
                "",
            ]
        )
    )
    log = workdir / "sshd.log"
    argv = [*prefix, sshd, "-D", "-e", "-f", str(server_config), "-p", str(port)]
    process = processes.start("sshd", argv, log)
    wait_for_port(port, process, log)
    endpoint = SshEndpoint(ssh, client_config, workdir / "cm.sock", log, user, "")
    probe = subprocess.run(
        [ssh, "-v", *endpoint.fresh("echo", "$0")[1:]],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    if probe.returncode != 0:
        raise SshUnavailable(f"ssh to the private sshd failed: {probe.stderr.strip()[-2000:]}")
    shell_seen = probe.stdout.strip()
    if user.how != "as-is" and not _is_bin_sh(shutil.which(shell_seen) or shell_seen):
        raise SshUnavailable(f"the login shell is {shell_seen!r}, not /bin/sh")
    match = re.search(r"kex: server->client cipher: (\S+)", probe.stderr)
    cipher = match.group(1) if match else "unknown"
    return SshEndpoint(ssh, client_config, endpoint.control_path, log, user, cipher)


def start_master(endpoint: SshEndpoint, processes: Processes, log: Path) -> None:
    """Start the ControlMaster and wait (bounded) until it accepts sessions."""
    process = processes.start("ssh ControlMaster", endpoint.master(), log)
    check = [
        endpoint.ssh,
        "-F",
        str(endpoint.client_config),
        "-o",
        f"ControlPath={endpoint.control_path}",
        "-O",
        "check",
        HOST_ALIAS,
    ]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SshUnavailable(f"the ControlMaster exited: {tail(log)}")
        if endpoint.control_path.exists():
            done = subprocess.run(
                check, capture_output=True, check=False, stdin=subprocess.DEVNULL, timeout=10
            )
            if done.returncode == 0:
                return
        time.sleep(0.05)
    raise SshUnavailable("the ControlMaster did not come up in 20s")
