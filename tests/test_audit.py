"""The audit log through a real agent: chained, signed, rotated, fail-closed, and readable.

Every tamper case edits a copy of a log that a real agent wrote, and checks that
``cmdgate audit verify`` names the first bad line and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cmdgate.agent.lab import LabPaths
from cmdgate.client import AgentUnavailable, InvalidParameters, NotPermitted
from cmdgate.client.audit import verify_logs
from cmdgate.shared.auditlog import (
    AuditFilter,
    load_public_key,
    log_files,
    read_records,
    record_hash,
)
from tests.support import Agent, Keys, start_test_agent

CMDGATE = Path(sys.executable).parent / "cmdgate"
SECRET_TEMPLATE = """
[commands.login]
description = "takes a secret"
argv = ["/bin/echo", "--password={password}", "--user={user}"]
[commands.login.params.password]
type = "string"
pattern = "[A-Za-z0-9]{8,64}"
secret = true
[commands.login.params.user]
type = "string"
pattern = "[a-z]{1,16}"
"""


def public_key_path(agent: Agent) -> Path:
    return agent.thread.config.server.state_dir / "audit-key.pub"


def verify(agent: Agent, *paths: Path, now: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``cmdgate audit verify`` with the agent's public key."""
    args = [
        str(CMDGATE),
        "audit",
        "verify",
        *map(str, paths or (agent.audit_path,)),
        "--pubkey",
        str(public_key_path(agent)),
    ]
    if now is not None:
        args += ["--now", now]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def agent(lab: LabPaths, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent that checkpoints every 5 records, and keeps a secret-taking template."""
    running = start_test_agent(
        lab,
        keys,
        tmp_path_factory.mktemp("audit"),
        extra=SECRET_TEMPLATE,
        audit_extra="checkpoint_every_records = 5\ncheckpoint_every_seconds = 3600",
    )
    yield running
    running.thread.stop()


@pytest.fixture(scope="module")
def written_log(agent: Agent) -> Path:
    """A log of allowed runs, denials and checkpoints, ending in a checkpoint."""
    with agent.client() as client:
        for i in range(12):
            client.run("probe", {"mode": "exit", "arg": str(i % 3)})
    with agent.client(agent.token(["nothing"])) as client:
        for _ in range(3):
            with contextlib.suppress(NotPermitted):
                client.run("probe", {"mode": "exit", "arg": "0"})
    records = agent.audit()
    assert any(r["event"] == "checkpoint" for r in records)
    return agent.audit_path


def tampered(tmp_path: Path, source: Path, edit: Any) -> Path:
    """A copy of ``source`` cut just after its last checkpoint, then passed through ``edit``."""
    lines = source.read_bytes().splitlines(keepends=True)
    last_checkpoint = max(i for i, line in enumerate(lines) if b'"event":"checkpoint"' in line)
    lines = lines[: last_checkpoint + 1]
    copy = tmp_path / "audit.jsonl"
    copy.write_bytes(b"".join(edit(lines)))
    return copy


def test_a_real_log_verifies(agent: Agent, written_log: Path) -> None:
    done = verify(agent, written_log)
    assert done.returncode == 0, done.stderr
    assert "checkpoint signatures verified" in done.stdout


def test_records_carry_the_contract_fields(agent: Agent, written_log: Path) -> None:
    records = agent.audit()
    finished = next(r for r in records if r["event"] == "run.finished")
    started = next(
        r for r in records if r.get("run_id") == finished["run_id"] and r["event"] == "run.started"
    )
    for key in (
        "ts",
        "seq",
        "prev",
        "hash",
        "run_id",
        "sub",
        "iss",
        "jti",
        "peer",
        "peer_cert_sha256",
        "command",
        "params",
        "argv",
        "template_sha256",
        "decision",
        "reason",
        "grpc_code",
    ):
        assert key in started, key
    for key in (
        "exit_code",
        "signal",
        "timed_out",
        "cancelled",
        "truncated",
        "duration_ms",
        "stdout_bytes",
        "stderr_bytes",
        "stdout_sha256",
        "stderr_sha256",
    ):
        assert key in finished, key
    assert started["seq"] < finished["seq"]
    assert datetime.datetime.strptime(started["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
    denied = next(r for r in records if r["event"] == "run.denied")
    assert (denied["reason"], denied["grpc_code"]) == ("COMMAND_NOT_IN_TOKEN", "PERMISSION_DENIED")


def _edit_byte(lines: list[bytes]) -> list[bytes]:
    target = next(i for i, line in enumerate(lines) if b'"event":"run.finished"' in line)
    lines[target] = lines[target].replace(b'"duration_ms":', b'"duration_ms":9', 1)
    return lines


def _forge(lines: list[bytes]) -> list[bytes]:
    # a well-formed record with a correct hash, slipped in after the third line
    previous = json.loads(lines[2])
    forged = {
        "ts": previous["ts"],
        "event": "run.started",
        "sub": "mallory",
        "seq": previous["seq"] + 1,
        "prev": previous["hash"],
    }
    forged["hash"] = record_hash(forged)
    return [*lines[:3], json.dumps(forged).encode() + b"\n", *lines[3:]]


def _rewrite_chain(lines: list[bytes]) -> list[bytes]:
    # edit one record, then recompute every hash after it: only the signatures can tell
    records = [json.loads(line) for line in lines]
    records[3]["sub"] = "someone-else"
    for i, record in enumerate(records):
        if i:
            record["prev"] = records[i - 1]["hash"]
        record["hash"] = record_hash(record)
    return [json.dumps(r).encode() + b"\n" for r in records]


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_edit_byte, "edited: the hash does not match"),
        (lambda lines: lines[:4] + lines[5:], "deleted: seq"),
        (lambda lines: [*lines[:4], lines[5], lines[4], *lines[6:]], "reordered"),
        (_forge, "inserted"),
        (_rewrite_chain, "checkpoint signature is invalid"),
        (lambda lines: [*lines[:-1], lines[-1][:40] + b"\n"], "edited: the line is not"),
    ],
    ids=[
        "byte-edited",
        "line-deleted",
        "lines-swapped",
        "line-inserted",
        "chain-rewritten",
        "line-cut",
    ],
)
def test_tampering_is_detected(
    agent: Agent, written_log: Path, tmp_path: Path, edit: Any, words: str
) -> None:
    copy = tampered(tmp_path, written_log, edit)
    done = verify(agent, copy)
    assert done.returncode == 1
    assert words in done.stderr, done.stderr
    assert f"{copy}:" in done.stderr  # names the file and the line


def test_the_untouched_copy_verifies(agent: Agent, written_log: Path, tmp_path: Path) -> None:
    done = verify(agent, tampered(tmp_path, written_log, lambda lines: lines))
    assert done.returncode == 0, done.stderr


def test_a_tail_cut_after_a_checkpoint_shows_by_its_age(
    agent: Agent, written_log: Path, tmp_path: Path
) -> None:
    copy = tampered(tmp_path, written_log, lambda lines: lines)
    # checkpoints come at least every 3600 s here: judged three hours later, the tail is missing
    later = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=3)).isoformat()
    done = verify(agent, copy, now=later)
    assert done.returncode == 1
    assert "truncated after the last checkpoint" in done.stderr


def test_a_wrong_key_fails(agent: Agent, written_log: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    other = tmp_path / "other.pub"
    other.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    done = subprocess.run(
        [str(CMDGATE), "audit", "verify", str(written_log), "--pubkey", str(other)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "another key" in done.stderr


def test_what_verify_quotes_from_a_log_is_escaped_on_the_way_out(
    agent: Agent, written_log: Path, tmp_path: Path
) -> None:
    """The log under check is untrusted text: a value it holds reaches the terminal with
    its control characters escaped (OSC 52 would write the operator's clipboard)."""
    hostile = "\x1b]52;c;cm0gLXJmIH4=\x07"

    def forge(lines: list[bytes]) -> list[bytes]:
        checkpoint = json.loads(lines[-1])
        checkpoint["key_id"] = hostile
        checkpoint["hash"] = record_hash(checkpoint)  # a consistent chain: only the key is off
        return [*lines[:-1], json.dumps(checkpoint).encode() + b"\n"]

    done = verify(agent, tampered(tmp_path, written_log, forge))
    assert done.returncode == 1
    assert "checkpoint by another key" in done.stderr
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07" in done.stderr


def test_secret_parameters_never_reach_the_log(agent: Agent) -> None:
    password = "Sup3rSecretValue"
    with agent.client(agent.token(["login"])) as client:
        result = client.run("login", {"password": password, "user": "bob"})
    assert result.stdout == f"--password={password} --user=bob\n".encode()
    text = agent.audit_path.read_text()
    assert password not in text
    started = agent.last_audit("run.started")
    assert started["params"]["password"].startswith("sha256:")
    assert started["params"]["user"] == "bob"
    assert started["argv"][1].startswith("--password=sha256:")
    # a denied call with the secret is redacted too
    with agent.client(agent.token(["other"])) as client, pytest.raises(NotPermitted):
        client.run("login", {"password": password + "2", "user": "bob"})
    denied = agent.last_audit()
    assert denied["reason"] == "COMMAND_NOT_IN_TOKEN"
    assert denied["params"]["password"].startswith("sha256:")
    assert password not in agent.audit_path.read_text()


def test_concurrent_runs_give_exactly_one_started_and_finished_each(agent: Agent) -> None:
    before = {r["run_id"] for r in agent.audit() if r.get("run_id")}
    with agent.client() as client, ThreadPoolExecutor(32) as pool:
        results = list(
            pool.map(lambda i: client.run("probe", {"mode": "argv", "arg": str(i)}), range(200))
        )
    run_ids = {r.run_id for r in results}
    records = [r for r in agent.audit() if r.get("run_id") in run_ids]
    assert len(run_ids) == 200 and not run_ids & before
    assert sum(r["event"] == "run.started" for r in records) == 200
    assert sum(r["event"] == "run.finished" for r in records) == 200
    done = verify(agent)
    assert done.returncode == 0, done.stderr


def test_summary_counts_per_identity(agent: Agent, written_log: Path) -> None:
    done = subprocess.run(
        [str(CMDGATE), "audit", "summary", str(written_log), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {row["sub"]: row for row in map(json.loads, done.stdout.splitlines())}
    records = list(read_records([written_log]))
    alice_started = sum(r["event"] == "run.started" and r["sub"] == "alice" for r in records)
    alice_denied = sum(r["event"] == "run.denied" and r["sub"] == "alice" for r in records)
    alice_failed = sum(
        r["event"] == "run.finished" and r["sub"] == "alice" and r["exit_code"] != 0
        for r in records
    )
    assert rows["alice"]["allowed"] == alice_started >= 12
    assert rows["alice"]["denied"] == alice_denied >= 3
    assert rows["alice"]["failures"] == alice_failed >= 8
    assert "probe" in rows["alice"]["commands"]


def test_query_filters_local_files(agent: Agent, written_log: Path) -> None:
    done = subprocess.run(
        [str(CMDGATE), "audit", "query", str(written_log), "--decision", "denied", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert records and all(r["decision"] == "denied" for r in records)
    table = subprocess.run(
        [str(CMDGATE), "audit", "query", str(written_log), "--sub", "alice", "--command", "probe"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert table.stdout.splitlines()[0].split()[:3] == ["ts", "sub", "event"]
    assert "alice" in table.stdout


def test_audit_query_needs_its_own_claim(agent: Agent) -> None:
    # being allowed to run every command is not enough
    with agent.client() as client, pytest.raises(NotPermitted):
        list(client.audit_query())
    denied = agent.last_audit("audit.query")
    assert (denied["decision"], denied["reason"]) == ("denied", "AUDIT_NOT_PERMITTED")
    token = agent.token(["nothing"], extra_claims={"cmdgate_audit": True}, subject="auditor")
    with agent.client(token) as client:
        records = list(client.audit_query(AuditFilter(sub="alice", decision="denied")))
    assert records and all(r["sub"] == "alice" and r["decision"] == "denied" for r in records)
    asked = agent.last_audit("audit.query")
    assert (asked["sub"], asked["decision"], asked["query"]["sub"]) == (
        "auditor",
        "allowed",
        "alice",
    )


@pytest.mark.parametrize(("targets", "message"), [(",", "empty name"), ("a,a", "named twice")])
def test_a_bad_target_list_for_query_is_a_usage_error(targets: str, message: str) -> None:
    done = subprocess.run(
        [str(CMDGATE), "audit", "query", "--target", targets, "--insecure"],
        capture_output=True,
        text=True,
        env={**os.environ, "CMDGATE_TOKEN": "x"},
        timeout=60,
        check=False,
    )
    assert done.returncode == 64
    assert done.stderr.startswith("cmdgate: ") and message in done.stderr
    assert len(done.stderr.splitlines()) == 1  # no traceback


@pytest.mark.parametrize("since", ["99999999999999d", "0001-01-01T00:00:00+01:00", "yesterday"])
def test_a_query_time_out_of_range_is_invalid_and_recorded(agent: Agent, since: str) -> None:
    token = agent.token(["nothing"], extra_claims={"cmdgate_audit": True}, subject="auditor")
    with agent.client(token) as client, pytest.raises(InvalidParameters):
        list(client.audit_query(AuditFilter(since=since)))
    record = agent.last_audit("audit.query")
    assert (record["decision"], record["reason"]) == ("denied", "QUERY_INVALID"), record


def test_audit_claim_must_be_exactly_true(agent: Agent) -> None:
    for value in ("true", 1, ["query"]):
        token = agent.token(["nothing"], extra_claims={"cmdgate_audit": value})
        with agent.client(token) as client, pytest.raises(NotPermitted):
            list(client.audit_query())


def test_rotation_by_size_and_sighup_reopen_lose_nothing(
    lab: LabPaths, keys: Keys, tmp_path: Path
) -> None:
    rotating = start_test_agent(lab, keys, tmp_path / "a", audit_extra="max_bytes = 8192")
    try:
        with rotating.client() as client, ThreadPoolExecutor(8) as pool:

            def run(i: int) -> str:
                return client.run("probe", {"mode": "argv", "arg": str(i)}).run_id

            first = list(pool.map(run, range(40)))
            # logrotate: move the file away, then SIGHUP
            os.rename(rotating.audit_path, rotating.audit_path.with_name("audit.jsonl.1"))
            rotating.thread.loop.call_soon_threadsafe(rotating.thread.running.audit.reopen)
            second = list(pool.map(run, range(40)))
        files = log_files(rotating.audit_path)
        assert len(files) > 3
        records = list(read_records(files))
        seqs = [r["seq"] for r in records]
        assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, nothing twice
        for run_id in first + second:
            assert sum(r.get("run_id") == run_id for r in records) == 2
        public_key = load_public_key(public_key_path(rotating).read_bytes())
        report = verify_logs(list(reversed(files)), public_key)  # order does not matter
        assert report.ok, report.problem
        # a whole rotated file removed from the middle is a gap between files
        middle = files[len(files) // 2]
        report = verify_logs([f for f in files if f != middle], public_key)
        assert report.problem is not None and "deleted" in report.problem
        assert "between" in report.problem
    finally:
        rotating.thread.stop()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, so that the disk can really fill up."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_refuses_runs_and_recovers_without_restart(
    lab: LabPaths, keys: Keys, tmp_path: Path, tiny_tmpfs: Path
) -> None:
    agent = start_test_agent(lab, keys, tmp_path / "full", audit_path=tiny_tmpfs / "audit.jsonl")
    filler = tiny_tmpfs / "filler"
    try:
        with agent.client() as client:
            assert client.run("probe", {"mode": "exit", "arg": "0"}).exit_code == 0
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                f.write(b"\0" * 1024 * 1024)  # fills the rest of the 256 KiB
            # the file's last page may still hold a record or two; then the disk is full
            refusal: AgentUnavailable | None = None
            for attempt in range(50):
                marker = agent.marker(f"while-full-{attempt}")
                try:
                    client.run("touch", {"file": str(marker)})
                except AgentUnavailable as e:
                    refusal = e
                    break
                assert marker.exists()
            assert refusal is not None, "a full disk never refused a run"
            assert "audit" in refusal.message
            assert not marker.exists()
            filler.unlink()
            after = agent.marker("after-recovery")
            assert client.run("touch", {"file": str(after)}).exit_code == 0
            assert after.exists()
        records = agent.audit()
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        report = verify_logs(
            [agent.audit_path], load_public_key(public_key_path(agent).read_bytes())
        )
        assert report.ok, report.problem
    finally:
        agent.thread.stop()
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()


def test_records_also_go_to_stdout_for_log_shippers(
    lab: LabPaths, keys: Keys, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    agent = start_test_agent(lab, keys, tmp_path / "ship", audit_extra="log_records = true")
    try:
        with agent.client() as client:
            result = client.run("probe", {"mode": "exit", "arg": "0"})
        deadline = time.monotonic() + 10
        shipped: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not any(
            r.get("run_id") == result.run_id and r["event"] == "run.finished" for r in shipped
        ):
            shipped += [
                json.loads(line)
                for line in capfd.readouterr().out.splitlines()
                if line.startswith("{")
            ]
            time.sleep(0.05)
        file_records = {r["hash"]: r for r in agent.audit()}
        mine = [r for r in shipped if r.get("run_id") == result.run_id]
        assert len(mine) == 2 and all(file_records[r["hash"]] == r for r in mine)
    finally:
        agent.thread.stop()


def test_audit_key_is_private_and_stable(agent: Agent, tmp_path: Path) -> None:
    state = agent.thread.config.server.state_dir
    assert (state / "audit-key.pem").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o077 == 0
    copy = tmp_path / "state"
    shutil.copytree(state, copy)
    from cmdgate.agent.audit import load_or_create_audit_key

    assert (
        load_or_create_audit_key(copy).public_key().public_bytes_raw()
        == load_public_key((state / "audit-key.pub").read_bytes()).public_bytes_raw()
    )


def test_files_deleted_while_the_agent_was_down_show_as_a_gap(
    lab: LabPaths, keys: Keys, tmp_path: Path
) -> None:
    from tests.support import AgentThread

    agent = start_test_agent(lab, keys, tmp_path / "gap", audit_extra="max_bytes = 8192")
    with agent.client() as client:
        for i in range(30):
            client.run("probe", {"mode": "argv", "arg": str(i)})
    agent.thread.stop()
    files = log_files(agent.audit_path)
    assert len(files) >= 3
    public_key = load_public_key(public_key_path(agent).read_bytes())
    assert verify_logs(files, public_key).ok
    # the newest files alone, or the oldest alone, are not the whole log
    assert "earlier files are missing" in str(verify_logs(files[1:], public_key).problem)
    assert verify_logs(files[1:], public_key, partial=True).ok
    assert "files after it are missing" in str(verify_logs(files[:-1], public_key).problem)
    # someone deletes the live file while the agent is down; the agent starts again
    agent.audit_path.unlink()
    thread = AgentThread(agent.thread.config.source)
    thread.stop()
    report = verify_logs(log_files(agent.audit_path), public_key)
    assert report.problem is not None and "missing when it started" in report.problem


def test_a_line_torn_by_a_crash_is_set_aside_and_the_chain_goes_on(
    lab: LabPaths, keys: Keys, tmp_path: Path
) -> None:
    from tests.support import AgentThread

    agent = start_test_agent(lab, keys, tmp_path / "torn")
    with agent.client() as client:
        client.run("probe", {"mode": "exit", "arg": "0"})
    agent.thread.stop()
    fragment = b'{"ts":"2026-11-28T00:00:00.000000Z","event":"run.sta'
    with open(agent.audit_path, "ab") as f:
        f.write(fragment)  # what a power cut mid-write leaves
    thread = AgentThread(agent.thread.config.source)
    thread.stop()
    records = agent.audit()  # every line parses again
    torn = next(r for r in records if r["event"] == "audit.torn_tail")
    aside = agent.audit_path.with_name(torn["torn_file"])
    assert aside.read_bytes() == fragment and torn["torn_bytes"] == len(fragment)
    public_key = load_public_key(public_key_path(agent).read_bytes())
    report = verify_logs(log_files(agent.audit_path), public_key)
    assert report.ok, report.problem
