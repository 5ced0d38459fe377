"""Real cmdgate agents for the benchmark: one lab, mutual TLS, benchmark templates, a token.

``cmdgate-agent init`` writes the lab (CA, certificates, signing key,
agent.toml), exactly as a user would. The harness then appends its own
templates, mints a token that names them, and starts agents with
``cmdgate-agent serve``: the production entry point, in its own process.
Extra agents (figure 6) share the lab's certificates and keys, each with its
own port and audit log.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from processes import Processes, tail

from cmdgate.agent.lab import LAB_AUDIENCE, LAB_COMMANDS_CLAIM, LAB_ISSUER, LAB_KID
from cmdgate.client import Client, ClientError
from cmdgate.shared.keys import load_private_key, mint_token

GIB = 1 << 30
STREAM_BYTES = GIB
# allowed by the host, left out of the token: the denial of figure 3
DENIED_COMMAND = "denied"
# in the token, not on the host
TOKEN_ONLY_COMMAND = "not-on-host"  # noqa: S105 - a command name
TOKEN_TTL_SECONDS = 3600

# Item 5 runs 500 commands at once for one identity: above the default limits.
SERVER_LIMITS = """\
# --- added by bench/run.py: item 5 runs 500 at once for one identity ---
max_concurrent_runs = 1000
max_runs_per_identity = 1000"""

BENCH_TEMPLATES = f"""
# --- added by bench/run.py ---
[commands.true]
description = "Do nothing, successfully"
argv = ["/bin/true"]
timeout_seconds = 10
max_output_bytes = 1024

[commands.sleep]
description = "Sleep for a fixed time"
argv = ["/bin/sleep", "{{secs}}"]
timeout_seconds = 30
max_output_bytes = 1024

[commands.sleep.params.secs]
type = "enum"
values = ["1"]

[commands.zeros]
description = "Write 1 GiB of zero bytes"
argv = ["/usr/bin/head", "-c", "{STREAM_BYTES}", "/dev/zero"]
timeout_seconds = 600
max_output_bytes = {2 * STREAM_BYTES}

[commands.{DENIED_COMMAND}]
description = "Allowed by this host, not by the benchmark token"
argv = ["/bin/true"]
timeout_seconds = 10
max_output_bytes = 1024
"""


@dataclass(frozen=True)
class BenchLab:
    """A lab folder with the benchmark templates and token."""

    root: Path
    config: Path
    ca: Path
    cert: Path
    key: Path
    token_file: Path
    token: str
    client_env: dict[str, str]

    def client(self, port: int) -> Client:
        return Client(
            f"127.0.0.1:{port}", token=self.token, ca=self.ca, cert=self.cert, key=self.key
        )


@dataclass
class RunningAgent:
    port: int
    process: subprocess.Popen[bytes]
    config: Path
    audit: Path
    log: Path

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def audit_events(self) -> dict[str, int]:
        """How many records of each event the audit log holds."""
        counts: dict[str, int] = {}
        with open(self.audit, "rb") as f:
            for line in f:
                event = json.loads(line)["event"]
                counts[event] = counts.get(event, 0) + 1
        return counts


def script(name: str) -> str:
    """A console script of this venv (beside the running interpreter)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: install cmdgate into this venv first")
    return str(path)


def _read_client_env(path: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines of the lab's client.env."""
    variables: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            variables[name] = value
    return variables


def make_lab(root: Path, port: int) -> BenchLab:
    """``cmdgate-agent init`` into ``root``, then the benchmark templates and token."""
    subprocess.run(
        [script("cmdgate-agent"), "init", str(root), "--listen", f"127.0.0.1:{port}"],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=120,
    )
    config = root / "agent.toml"
    text, count = re.subn(
        r"(?m)^(listen = .*)$", lambda m: m.group(1) + "\n" + SERVER_LIMITS, config.read_text()
    )
    if count != 1:
        raise RuntimeError(f"{config}: cannot find the [server] listen line")
    config.write_text(text + BENCH_TEMPLATES)
    token = mint_token(
        load_private_key(root / "keys" / f"{LAB_KID}.pem"),
        kid=LAB_KID,
        issuer=LAB_ISSUER,
        audience=LAB_AUDIENCE,
        subject="bench",
        commands=["true", "sleep", "zeros", TOKEN_ONLY_COMMAND],
        ttl_seconds=TOKEN_TTL_SECONDS,
        commands_claim=LAB_COMMANDS_CLAIM,
    )
    token_file = root / "bench.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    lab_env = _read_client_env(root / "client.env")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CMDGATE_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(lab_env)
    env["CMDGATE_TOKEN_FILE"] = str(token_file)
    # An installed cmdgate starts from cached bytecode; an editable one, in an
    # environment that forbids writing it, would compile its modules on every run.
    # A private cache keeps the comparison fair without writing into the repo.
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    return BenchLab(
        root=root,
        config=config,
        ca=Path(lab_env["CMDGATE_CA"]),
        cert=Path(lab_env["CMDGATE_CERT"]),
        key=Path(lab_env["CMDGATE_KEY"]),
        token_file=token_file,
        token=token,
        client_env=env,
    )


def extra_config(lab: BenchLab, port: int) -> Path:
    """A copy of the lab's agent.toml for another agent on ``port``, with its own audit log."""
    text = lab.config.read_text()
    text, listens = re.subn(r'(?m)^listen = ".*"$', f'listen = "127.0.0.1:{port}"', text, count=1)
    text, audits = re.subn(
        r'(?m)^path = "audit\.jsonl"$', f'path = "audit-{port}.jsonl"', text, count=1
    )
    if listens != 1 or audits != 1:
        raise RuntimeError(f"{lab.config}: cannot find the listen and audit path lines")
    # beside the original, so its relative paths (tls/, keys/) resolve the same way
    path = lab.root / f"agent-{port}.toml"
    path.write_text(text)
    return path


def launch_agent(
    lab: BenchLab,
    config: Path,
    port: int,
    processes: Processes,
    wrapper: Sequence[str] = (),
) -> RunningAgent:
    """``cmdgate-agent serve --config`` in a process of its own, not waiting for it.

    ``wrapper`` goes before the agent's script, e.g. ``python -m cProfile -o FILE``.
    """
    log = config.with_suffix(".log")
    serve = [script("cmdgate-agent"), "serve", "--config", str(config)]
    process = processes.start(f"agent :{port}", [*wrapper, *serve], log)
    audit = lab.root / ("audit.jsonl" if config == lab.config else f"audit-{port}.jsonl")
    return RunningAgent(port, process, config, audit, log)


def start_agent(
    lab: BenchLab,
    config: Path,
    port: int,
    processes: Processes,
    wrapper: Sequence[str] = (),
) -> RunningAgent:
    """``launch_agent``, and return once it answers."""
    agent = launch_agent(lab, config, port, processes, wrapper)
    wait_until_serving(lab, agent)
    return agent


def wait_until_serving(lab: BenchLab, agent: RunningAgent, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with lab.client(agent.port) as client:
        while time.monotonic() < deadline:
            if agent.process.poll() is not None:
                raise RuntimeError(f"the agent on port {agent.port} exited:\n{tail(agent.log)}")
            try:
                client.list_commands()
                return
            except ClientError:
                time.sleep(0.1)
    raise RuntimeError(f"the agent on port {agent.port} did not answer in {timeout:.0f}s")
