"""The ``cmdgate`` console script as a user runs it: a real subprocess against a real agent.

Exit codes, one-line ``cmdgate:`` errors, byte-exact output, escaping on a
terminal, several targets, ``--json``, ``list``, ``keygen`` and ``token mint``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.support import AUDIENCE, ISSUER, KID, Agent, pid_alive, wait_until

CMDGATE = Path(sys.executable).parent / "cmdgate"
EVERY_BYTE = bytes(range(256))


@dataclass(frozen=True)
class Finished:
    """How one ``cmdgate`` process ended."""

    code: int
    stdout: bytes
    stderr: str


@dataclass(frozen=True)
class Cli:
    """Runs ``cmdgate`` against the module's agent with a clean environment."""

    agent: Agent
    env: dict[str, str]
    folder: Path

    @property
    def tls(self) -> list[str]:
        lab = self.agent.lab
        return [
            "--ca",
            str(lab.ca_cert),
            "--cert",
            str(lab.client_cert),
            "--key",
            str(lab.client_key),
        ]

    def token_file(self, token: str | None = None, name: str = "token") -> Path:
        path = self.folder / name
        path.write_text((self.agent.token() if token is None else token) + "\n")
        return path

    def __call__(
        self,
        *args: str,
        stdin: bytes = b"",
        env: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> Finished:
        done = subprocess.run(
            [str(CMDGATE), *args],
            input=stdin,
            capture_output=True,
            env={**self.env, **(env or {})},
            timeout=timeout,
            check=False,
        )
        return Finished(done.returncode, done.stdout, done.stderr.decode())

    def run(
        self,
        command: str,
        *params: str,
        target: str | None = None,
        token: str | None = None,
        options: Sequence[str] = (),
    ) -> Finished:
        """``cmdgate run TARGET COMMAND PARAMS`` with mTLS and a token file."""
        return self(
            "run",
            target or self.agent.target,
            command,
            *params,
            *self.tls,
            "--token-file",
            str(self.token_file(token)),
            *options,
        )


@pytest.fixture
def cli(agent: Agent, env_without_cmdgate: dict[str, str], tmp_path: Path) -> Cli:
    return Cli(agent, env_without_cmdgate, tmp_path)


def assert_one_error(stderr: str, host: str, status: str) -> str:
    """stderr is exactly one ``cmdgate: HOST: STATUS: ...`` line; returns it."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"cmdgate: {host}: {status}: "), stderr
    return lines[0]


def free_port() -> int:
    """A port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def run_on_terminal(args: Sequence[str], env: Mapping[str, str]) -> tuple[int, bytes]:
    """Run ``cmdgate`` with stdout on a pty; return its exit code and what the terminal got."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [str(CMDGATE), *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the slave side
                break
            if not chunk:
                break
            received += chunk
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    return code, bytes(received)


def json_lines(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


# --- exit codes ---------------------------------------------------------------------------


@pytest.mark.parametrize("remote", [0, 3, 42])
def test_remote_exit_code_is_passed_through(cli: Cli, remote: int) -> None:
    done = cli.run("probe", "mode=exit", f"arg={remote}")
    assert (done.code, done.stdout, done.stderr) == (remote, b"", "")


def test_killed_by_signal_exits_128_plus_the_signal(cli: Cli, agent: Agent) -> None:
    done = cli.run("probe", "mode=kill", f"arg={int(signal.SIGKILL)}")
    assert done.code == 128 + signal.SIGKILL
    assert done.stderr.startswith(f"cmdgate: {agent.target}: signal 9")


def test_template_timeout_exits_124(cli: Cli, agent: Agent) -> None:
    started = time.monotonic()
    done = cli.run("short", "mode=sleep", "arg=30")
    assert done.code == 124
    assert time.monotonic() - started < 15
    assert done.stderr.startswith(f"cmdgate: {agent.target}: ") and "timed out" in done.stderr


def test_client_timeout_exits_124(cli: Cli) -> None:
    started = time.monotonic()
    done = cli.run("probe", "mode=sleep", "arg=30", options=["--timeout", "0.5"])
    assert done.code == 124
    assert time.monotonic() - started < 15


def test_nothing_listening_exits_255(cli: Cli) -> None:
    target = f"127.0.0.1:{free_port()}"
    done = cli.run("probe", "mode=argv", target=target)
    assert done.code == 255
    assert_one_error(done.stderr, target, "UNAVAILABLE")


# --- where the token comes from -----------------------------------------------------------


@pytest.mark.parametrize("source", ["--token-file", "stdin", "CMDGATE_TOKEN_FILE", "CMDGATE_TOKEN"])
def test_token_sources(cli: Cli, agent: Agent, source: str) -> None:
    token = agent.token(["probe"])
    path = cli.token_file(token)
    options: list[str] = []
    env: dict[str, str] = {}
    stdin = b""
    if source == "--token-file":
        options = ["--token-file", str(path)]
    elif source == "stdin":
        options, stdin = ["--token-file", "-"], token.encode() + b"\n"
    elif source == "CMDGATE_TOKEN_FILE":
        env = {"CMDGATE_TOKEN_FILE": str(path)}
    else:
        env = {"CMDGATE_TOKEN": token}
    done = cli(
        "run",
        agent.target,
        "probe",
        "mode=argv",
        "arg=hi",
        *cli.tls,
        *options,
        stdin=stdin,
        env=env,
    )
    assert (done.code, done.stdout, done.stderr) == (0, b'["hi"]', "")


def test_tls_files_from_the_environment(cli: Cli, agent: Agent) -> None:
    lab = agent.lab
    env = {
        "CMDGATE_CA": str(lab.ca_cert),
        "CMDGATE_CERT": str(lab.client_cert),
        "CMDGATE_KEY": str(lab.client_key),
        "CMDGATE_TOKEN_FILE": str(cli.token_file()),
    }
    done = cli("run", agent.target, "probe", "mode=argv", "arg=env", env=env)
    assert (done.code, done.stdout) == (0, b'["env"]')


@pytest.mark.parametrize("token_file", [None, "empty", "missing"])
def test_no_token_is_a_usage_error_and_contacts_nobody(
    cli: Cli, agent: Agent, token_file: str | None
) -> None:
    options: list[str] = []
    if token_file == "empty":
        options = ["--token-file", str(cli.token_file("   "))]
    elif token_file == "missing":
        options = ["--token-file", str(cli.folder / "no-such-file")]
    records = len(agent.audit())
    done = cli("run", agent.target, "probe", "mode=argv", *cli.tls, *options)
    assert done.code == 64
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("cmdgate: ")
    assert len(agent.audit()) == records


# --- denials: exit 77 or 64, one line, and nothing ran -------------------------------------


def test_garbage_token_is_unauthenticated(cli: Cli, agent: Agent) -> None:
    marker = agent.marker("cli-garbage-token")
    done = cli.run("touch", f"file={marker}", token="not.a.jwt")
    assert done.code == 77
    assert_one_error(done.stderr, agent.target, "UNAUTHENTICATED")
    assert done.stdout == b""
    assert not marker.exists()
    assert agent.last_audit()["reason"] == "TOKEN_MALFORMED"


def test_command_not_in_token_is_denied_and_nothing_runs(cli: Cli, agent: Agent) -> None:
    marker = agent.marker("cli-not-in-token")
    done = cli.run("touch", f"file={marker}", token=agent.token(["probe"]))
    assert done.code == 77
    assert_one_error(done.stderr, agent.target, "PERMISSION_DENIED")
    assert not marker.exists()
    record = agent.last_audit()
    assert (record["event"], record["reason"]) == ("run.denied", "COMMAND_NOT_IN_TOKEN")


def test_command_not_on_this_host_is_denied(cli: Cli, agent: Agent) -> None:
    done = cli.run("reboot", token=agent.token(["reboot"]))
    assert done.code == 77
    assert_one_error(done.stderr, agent.target, "PERMISSION_DENIED")
    assert agent.last_audit()["reason"] == "COMMAND_NOT_IN_ALLOWLIST"


def test_invalid_parameter_exits_64_and_touches_nothing(cli: Cli, agent: Agent) -> None:
    before = os.stat("/etc/passwd").st_mtime_ns
    done = cli.run("touch", "file=/etc/passwd")
    assert done.code == 64
    assert "'file'" in assert_one_error(done.stderr, agent.target, "INVALID_ARGUMENT")
    assert os.stat("/etc/passwd").st_mtime_ns == before
    record = agent.last_audit()
    assert (record["event"], record["reason"]) == ("run.denied", "PARAM_INVALID")


@pytest.mark.parametrize(
    "args",
    [
        ["run", "TARGET", "probe", "mode"],
        ["run", "TARGET", "probe", "=argv"],
        ["run", "TARGET", "probe", "mode=argv", "mode=env"],
        ["bogus"],
        [],
        ["run", "TARGET", "probe", "mode=argv", "--timeout", "abc"],
        ["run", "TARGET", "probe", "mode=argv", "--timeout", "0"],
        ["run", "TARGET", "probe", "mode=argv", "--timeout", "-1"],
        ["run", "TARGET", "probe", "mode=argv", "--timeout", "nan"],
    ],
)
def test_usage_errors_exit_64_before_any_call(cli: Cli, agent: Agent, args: list[str]) -> None:
    args = [agent.target if a == "TARGET" else a for a in args]
    if args and args[0] == "run":
        args += [*cli.tls, "--token-file", str(cli.token_file())]
    records = len(agent.audit())
    done = cli(*args)
    assert done.code == 64
    assert any(line.startswith("cmdgate: ") for line in done.stderr.splitlines()), done.stderr
    assert done.stdout == b""
    assert len(agent.audit()) == records


def test_infinite_timeout_is_a_usage_error(cli: Cli, agent: Agent) -> None:
    done = cli.run("probe", "mode=argv", options=["--timeout", "inf"])
    assert done.code == 64
    assert done.stderr.startswith("cmdgate: ")


def test_huge_timeout_is_capped_by_the_template(cli: Cli) -> None:
    done = cli.run("probe", "mode=argv", "arg=capped", options=["--timeout", "1e10"])
    assert (done.code, done.stdout) == (0, b'["capped"]')


def test_error_with_control_characters_stays_one_line(cli: Cli, agent: Agent) -> None:
    done = cli.run("probe", "mode=argv", "x\ny=1")
    assert done.code == 64
    assert_one_error(done.stderr, agent.target, "INVALID_ARGUMENT")


# --- output ------------------------------------------------------------------------------


def test_binary_output_is_byte_exact_when_not_a_terminal(cli: Cli) -> None:
    done = cli.run("probe", "mode=binary", "arg=64")
    assert done.code == 0
    assert done.stdout == EVERY_BYTE * 64
    assert done.stderr == ""


def test_output_that_cannot_be_written_exits_120_with_one_line(cli: Cli) -> None:
    args = ["run", cli.agent.target, "probe", "mode=binary", "arg=64", *cli.tls]
    args += ["--token-file", str(cli.token_file())]
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [str(CMDGATE), *args], stdout=full, stderr=subprocess.PIPE, env=cli.env, timeout=30
        )
    assert done.returncode == 120
    assert (
        done.stderr.decode()
        == "cmdgate: cannot write the output to stdout: No space left on device\n"
    )
    # nothing to write: the remote exit code, as ever
    args[3:5] = ["mode=exit", "arg=3"]
    with open("/dev/full", "wb") as full:
        done = subprocess.run([str(CMDGATE), *args], stdout=full, env=cli.env, timeout=30)
    assert done.returncode == 3


def test_stdout_and_stderr_are_kept_apart(cli: Cli) -> None:
    done = cli.run("probe", "mode=stderr")
    assert (done.code, done.stdout, done.stderr) == (0, b"to stdout\n", "to stderr\n")


def _escaped_for_terminal(data: bytes) -> bytes:
    """What the contract says a terminal shows: \\n and \\t as they are, the rest as \\xNN."""
    shown = b"".join(
        bytes([b]) if b in (0x09, 0x0A) or 0x20 <= b < 0x7F else f"\\x{b:02x}".encode()
        for b in data
    )
    return shown.replace(b"\n", b"\r\n")  # the pty's own newline translation


def test_terminal_output_is_escaped(cli: Cli, agent: Agent) -> None:
    args = ["run", agent.target, "probe", "mode=binary", "arg=1", *cli.tls]
    code, shown = run_on_terminal([*args, "--token-file", str(cli.token_file())], cli.env)
    assert code == 0
    assert b"\x1b" not in shown and b"\x9b" not in shown and b"\x07" not in shown
    assert shown == _escaped_for_terminal(EVERY_BYTE)


def test_terminal_output_with_raw_passes_control_characters(cli: Cli, agent: Agent) -> None:
    args = ["run", agent.target, "probe", "mode=binary", "arg=1", "--raw", *cli.tls]
    code, shown = run_on_terminal([*args, "--token-file", str(cli.token_file())], cli.env)
    assert code == 0
    assert b"\x1b" in shown and b"\x9b" in shown
    assert shown == EVERY_BYTE.replace(b"\n", b"\r\n")


# --- several targets ---------------------------------------------------------------------


def test_several_targets_prefix_each_line_and_summarise(cli: Cli, agent: Agent) -> None:
    first, second = agent.target, f"localhost:{agent.thread.port}"
    done = cli.run("probe", "mode=argv", "arg=hi", target=f"{first},{second}")
    assert done.code == 0
    assert sorted(done.stdout.splitlines()) == sorted(
        [f'{first}: ["hi"]'.encode(), f'{second}: ["hi"]'.encode()]
    )
    summary = done.stderr.splitlines()
    assert len(summary) == 2
    for host, line in zip((first, second), summary, strict=True):
        assert line.startswith(f"cmdgate: {host} ") and "exit 0" in line


def test_several_targets_one_unreachable_exits_1(cli: Cli, agent: Agent) -> None:
    dead = f"127.0.0.1:{free_port()}"
    done = cli.run("probe", "mode=argv", "arg=hi", target=f"{agent.target},{dead}")
    assert done.code == 1
    assert done.stdout == f'{agent.target}: ["hi"]\n'.encode()
    lines = done.stderr.splitlines()
    assert any(line.startswith(f"cmdgate: {dead}: UNAVAILABLE: ") for line in lines), lines
    assert any(line.startswith(f"cmdgate: {agent.target} ") and "exit 0" in line for line in lines)


def test_several_targets_any_non_zero_exit_is_1(cli: Cli, agent: Agent) -> None:
    targets = f"{agent.target},localhost:{agent.thread.port}"
    done = cli.run("probe", "mode=exit", "arg=3", target=targets)
    assert done.code == 1
    assert sum("exit 3" in line for line in done.stderr.splitlines()) == 2


def test_several_targets_on_a_terminal_are_escaped(cli: Cli, agent: Agent) -> None:
    second = f"localhost:{agent.thread.port}"
    args = ["run", f"{agent.target},{second}", "probe", "mode=binary", "arg=1", *cli.tls]
    code, shown = run_on_terminal([*args, "--token-file", str(cli.token_file())], cli.env)
    assert code == 0
    assert b"\x1b" not in shown and b"\x9b" not in shown
    assert f"{agent.target}: ".encode() in shown and f"{second}: ".encode() in shown
    assert shown.count(b"\\x1b") == 2


# --- --json ------------------------------------------------------------------------------


def test_json_events_carry_exact_bytes(cli: Cli, agent: Agent) -> None:
    done = cli.run("probe", "mode=binary", "arg=300", options=["--json"])
    assert done.code == 0
    events = json_lines(done.stdout)
    assert {e["host"] for e in events} == {agent.target}
    started, *outputs, exited = events
    assert started["event"] == "started" and started["timeout_seconds"] == 30
    assert started["run_id"] == agent.last_audit("run.finished")["run_id"]
    assert {(o["event"], o["stream"]) for o in outputs} == {("output", "stdout")}
    assert b"".join(base64.b64decode(o["data"]) for o in outputs) == EVERY_BYTE * 300
    assert exited["event"] == "exited"
    assert (exited["exit_code"], exited["signal"], exited["timed_out"]) == (0, None, False)
    assert exited["stdout_bytes"] == 256 * 300


def test_json_reports_signal_and_timeout(cli: Cli) -> None:
    killed = cli.run("probe", "mode=kill", "arg=9", options=["--json"])
    assert killed.code == 137
    exited = json_lines(killed.stdout)[-1]
    assert (exited["event"], exited["exit_code"], exited["signal"]) == ("exited", None, 9)
    slow = cli.run("probe", "mode=sleep", "arg=30", options=["--json", "--timeout", "0.5"])
    assert slow.code == 124
    assert json_lines(slow.stdout)[-1]["timed_out"] is True


def test_json_error_event(cli: Cli, agent: Agent) -> None:
    marker = agent.marker("json-denied")
    done = cli.run("touch", f"file={marker}", token=agent.token(["probe"]), options=["--json"])
    assert done.code == 77
    (error,) = json_lines(done.stdout)
    assert error["host"] == agent.target and error["event"] == "error"
    assert error["code"] == "PERMISSION_DENIED" and error["message"]
    assert_one_error(done.stderr, agent.target, "PERMISSION_DENIED")
    assert not marker.exists()


# --- list --------------------------------------------------------------------------------


def test_list_shows_only_the_intersection_with_parameters(cli: Cli, agent: Agent) -> None:
    token = cli.token_file(agent.token(["probe", "touch", "not-on-this-host"]))
    done = cli("list", agent.target, *cli.tls, "--token-file", str(token))
    assert done.code == 0
    text = done.stdout.decode()
    headings = [line.split()[0] for line in text.splitlines() if not line.startswith(" ")]
    assert headings == ["probe", "touch"]
    assert "mode=ENUM" in text and "arg=STRING" in text
    assert f"file=PATH  under {agent.marker_dir}" in text


def test_list_json(cli: Cli, agent: Agent) -> None:
    token = cli.token_file(agent.token(["touch", "short", "not-on-this-host"]))
    done = cli("list", agent.target, *cli.tls, "--token-file", str(token), "--json")
    assert done.code == 0
    listing = json.loads(done.stdout)
    assert listing["target"] == agent.target
    by_name = {c["name"]: c for c in listing["commands"]}
    assert set(by_name) == {"short", "touch"}
    assert [p["name"] for p in by_name["short"]["params"]] == ["mode", "arg"]
    assert by_name["short"]["timeout_seconds"] == 1
    (file_param,) = by_name["touch"]["params"]
    assert (file_param["name"], file_param["type"]) == ("file", "path")
    assert file_param["under"] == [str(agent.marker_dir)]


def test_list_with_a_garbage_token_exits_77(cli: Cli, agent: Agent) -> None:
    token = cli.token_file("garbage")
    done = cli("list", agent.target, *cli.tls, "--token-file", str(token))
    assert done.code == 77
    assert_one_error(done.stderr, agent.target, "UNAUTHENTICATED")


# --- keygen and token mint ----------------------------------------------------------------


def _jwk(jwks_path: Path, kid: str) -> dict[str, Any]:
    keys: list[dict[str, Any]] = json.loads(jwks_path.read_text())["keys"]
    (jwk,) = [k for k in keys if k["kid"] == kid]
    return jwk


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_keygen_writes_a_private_key_and_jwks_and_never_overwrites(
    cli: Cli, tmp_path: Path, alg: str
) -> None:
    out = tmp_path / "issuer"
    done = cli("keygen", "--out", str(out), "--alg", alg, "--kid", "k1")
    assert done.code == 0, done.stderr
    pem, jwks = out / "k1.pem", out / "jwks.json"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    jwk = _jwk(jwks, "k1")
    assert jwk["alg"] == alg and "d" not in jwk
    before = (pem.read_bytes(), jwks.read_bytes())
    again = cli("keygen", "--out", str(out), "--alg", alg, "--kid", "k1")
    assert again.code != 0
    assert again.stderr.startswith("cmdgate: ")
    assert (pem.read_bytes(), jwks.read_bytes()) == before


def test_keygen_default_kid_is_the_thumbprint_file_name(cli: Cli, tmp_path: Path) -> None:
    done = cli("keygen", "--out", str(tmp_path))
    assert done.code == 0
    (jwk,) = json.loads((tmp_path / "jwks.json").read_text())["keys"]
    assert (tmp_path / f"{jwk['kid']}.pem").is_file()
    assert jwk["kid"] in done.stdout.decode()


@pytest.mark.parametrize(("alg", "ttl", "seconds"), [("EdDSA", None, 900), ("ES256", "90s", 90)])
def test_token_mint_signs_the_claims(
    cli: Cli, tmp_path: Path, alg: str, ttl: str | None, seconds: int
) -> None:
    assert cli("keygen", "--out", str(tmp_path), "--alg", alg, "--kid", "mint").code == 0
    args = ["token", "mint", "--key", str(tmp_path / "mint.pem"), "--kid", "mint"]
    args += ["--iss", "https://iss.example", "--aud", "fleet", "--sub", "bob", "--cmds", "a,b"]
    done = cli(*args, *(["--ttl", ttl] if ttl else []))
    assert done.code == 0, done.stderr
    token = done.stdout.decode().strip()
    assert jwt.get_unverified_header(token)["kid"] == "mint"
    public = jwt.PyJWK(_jwk(tmp_path / "jwks.json", "mint"))
    claims = jwt.decode(
        token, public.key, algorithms=[alg], audience="fleet", issuer="https://iss.example"
    )
    assert (claims["sub"], claims["cmds"]) == ("bob", ["a", "b"])
    assert claims["exp"] - claims["iat"] == seconds
    assert isinstance(claims["jti"], str) and claims["jti"]


@pytest.mark.parametrize(
    ("flag", "value"), [("--ttl", "bogus"), ("--ttl", "0"), ("--cmds", "a,,b")]
)
def test_token_mint_rejects_bad_input_with_64(
    cli: Cli, tmp_path: Path, flag: str, value: str
) -> None:
    assert cli("keygen", "--out", str(tmp_path), "--kid", "k").code == 0
    args = {"--key": str(tmp_path / "k.pem"), "--kid": "k", "--iss": "i", "--aud": "a"}
    args |= {"--sub": "s", "--cmds": "a", flag: value}
    done = cli("token", "mint", *[part for pair in args.items() for part in pair])
    assert done.code == 64
    assert done.stdout == b"" and done.stderr.startswith("cmdgate: ")


def test_a_minted_token_works_against_the_agent(cli: Cli, agent: Agent) -> None:
    key = agent.keys.jwks.parent / f"{KID}.pem"
    args = ["token", "mint", "--key", str(key), "--kid", KID, "--iss", ISSUER, "--aud", AUDIENCE]
    minted = cli(*args, "--sub", "carol", "--cmds", "probe", "--ttl", "2m")
    assert minted.code == 0
    token = minted.stdout.decode().strip()
    done = cli.run("probe", "mode=argv", "arg=minted", token=token)
    assert (done.code, done.stdout) == (0, b'["minted"]')
    assert agent.last_audit("run.finished")["sub"] == "carol"
    marker = agent.marker("minted-touch")
    denied = cli.run("touch", f"file={marker}", token=token)
    assert denied.code == 77 and not marker.exists()


# --- disconnect --------------------------------------------------------------------------


def test_killing_the_cli_kills_the_remote_command(cli: Cli, agent: Agent) -> None:
    args = ["run", agent.target, "probe", "mode=sleep", "arg=60", *cli.tls]
    proc = subprocess.Popen(
        [str(CMDGATE), *args, "--token-file", str(cli.token_file())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cli.env,
    )
    assert proc.stdout is not None
    pid = 0
    try:
        line = proc.stdout.readline()
        pid = int(line)
        assert pid_alive(pid)
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until(lambda: not pid_alive(pid), timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def cancelled() -> bool:
        finished = agent.last_audit("run.finished")
        sleeping = finished["params"] == {"mode": "sleep", "arg": "60"}
        return sleeping and finished["cancelled"] is True

    assert wait_until(cancelled)


def test_list_escapes_what_the_agent_says(cli: Cli, agent: Agent) -> None:
    token = cli.token_file(agent.token(["hostile"]))
    done = cli("list", agent.target, *cli.tls, "--token-file", str(token))
    assert done.code == 0, done.stderr
    assert b"\x1b" not in done.stdout and b"\x07" not in done.stdout
    assert b"remote text \\x1b]52;c;aGk=\\x07\\x1b[2J end" in done.stdout


def test_insecure_ignores_tls_files_from_the_environment(cli: Cli, agent: Agent) -> None:
    lab = agent.lab
    env = {
        "CMDGATE_CA": str(lab.ca_cert),
        "CMDGATE_CERT": str(lab.client_cert),
        "CMDGATE_KEY": str(lab.client_key),
    }
    token = cli.token_file()
    # plaintext to a TLS agent cannot work, but it is tried: no usage error about the files
    done = cli(
        "run",
        agent.target,
        "probe",
        "mode=exit",
        "arg=0",
        "--insecure",
        "--token-file",
        str(token),
        env=env,
    )
    assert done.code == 255, done.stderr
    assert "cannot be combined" not in done.stderr


def test_token_mint_binds_to_a_certificate_and_grants_audit(
    cli: Cli, agent: Agent, tmp_path: Path
) -> None:
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    assert cli("keygen", "--out", str(tmp_path), "--kid", "bind").code == 0
    mint = ["token", "mint", "--key", str(tmp_path / "bind.pem"), "--kid", "bind"]
    mint += ["--iss", "i", "--aud", "a", "--sub", "s", "--cmds", "x"]
    done = cli(*mint, "--audit", "--cnf-cert", str(agent.lab.client_cert))
    assert done.code == 0, done.stderr
    claims = jwt.decode(done.stdout.decode().strip(), options={"verify_signature": False})
    der = x509.load_pem_x509_certificate(agent.lab.client_cert.read_bytes()).public_bytes(
        Encoding.DER
    )
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert claims["cnf"] == {"x5t#S256": expected}
    assert claims["cmdgate_audit"] is True
    missing = cli(*mint, "--cnf-cert", str(tmp_path / "nope.pem"))
    assert missing.code == 64 and missing.stderr.startswith("cmdgate: --cnf-cert")
